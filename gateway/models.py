"""What the gateway knows of a served model (from Triton's metadata and config), and the checks a
request must pass before it may join a batch: one bad request must never fail a batch of others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import BadRequest
from gateway.tensors import InferRequest


# The output datatypes Triton ranks for the classification extension (others, FP16 and BF16 among
# them: a 400 from Triton).
CLASSIFIABLE = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"})

# The config parameter in which the gateway's load calls record the files they loaded
# (``gateway.upstream.repository.recorded_placement``): the gateway's own bookkeeping, which
# Triton keeps with the model's config; the config clients are shown leaves it out.
PLACEMENT_PARAMETER = "gateway_placement"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # as Triton's metadata reports it: batch dimension first (-1) if batched
    optional: bool = False


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    versions: tuple[str, ...]
    max_batch_size: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    metadata: bytes  # Triton's own answers, returned to clients unchanged...
    config: bytes  # ...but for the gateway's PLACEMENT_PARAMETER (``client_config``)
    stateful: bool = False  # sequence batching: a sequence's requests need its instance
    sequence_idle_s: float = 1.0  # how long Triton keeps an idle sequence (max_sequence_idle_microseconds)

    @classmethod
    def from_triton(cls, metadata: dict[str, Any], config: dict[str, Any], metadata_raw: bytes, config_raw: bytes) -> ModelInfo:
        optional = {i["name"] for i in config.get("input", []) if i.get("optional")}

        def specs(items: list[dict[str, Any]]) -> dict[str, TensorSpec]:
            return {
                t["name"]: TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"]), t["name"] in optional)
                for t in items
            }

        return cls(
            name=metadata["name"],
            versions=tuple(metadata.get("versions", ())),
            max_batch_size=int(config.get("max_batch_size", 0)),
            inputs=specs(metadata.get("inputs", [])),
            outputs=specs(metadata.get("outputs", [])),
            metadata=metadata_raw,
            config=client_config(config, config_raw),
            stateful=config.get("sequence_batching") is not None,
            sequence_idle_s=_sequence_idle_s(config.get("sequence_batching")),
        )

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0


def client_config(config: dict[str, Any], raw: bytes) -> bytes:
    """Triton's answer ``raw`` for a model's config (``config``, parsed), as clients are given
    it: unchanged, but without the gateway's ``PLACEMENT_PARAMETER``."""
    params = config.get("parameters")
    if not isinstance(params, dict) or PLACEMENT_PARAMETER not in params:
        return raw
    return orjson.dumps({**config, "parameters": {k: v for k, v in params.items() if k != PLACEMENT_PARAMETER}})


def _sequence_idle_s(sequence_batching: Any) -> float:
    """Triton's ``max_sequence_idle_microseconds`` in seconds (a uint64, a string in JSON; 0
    or absent: its default, 1 s)."""
    try:
        micros = int((sequence_batching or {}).get("max_sequence_idle_microseconds") or 0)
    except (TypeError, ValueError, AttributeError):
        micros = 0
    return micros / 1e6 if micros > 0 else 1.0


def _fits(expected: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` matches ``expected`` dimension by dimension (-1 matches any size)."""
    for e, d in zip(expected, shape):
        if e != d and e != -1:
            return False
    return True


def check_request(info: ModelInfo, request: InferRequest) -> int:
    """Raise BadRequest naming the tensor at fault; return the request's batch size (rows)."""
    model = info.name
    seen: set[str] = set()
    rows: int | None = None
    for tensor in request.inputs:
        spec = info.inputs.get(tensor.name)
        if spec is None:
            raise BadRequest(f"unexpected input '{tensor.name}' for model '{model}'; it expects {sorted(info.inputs)}")
        seen.add(tensor.name)
        if tensor.datatype != spec.datatype:
            raise BadRequest(
                f"input '{tensor.name}' of model '{model}' must have datatype {spec.datatype}, got {tensor.datatype}"
            )
        shape = tensor.data.shape
        if len(shape) != len(spec.shape) or not _fits(spec.shape, shape):
            raise BadRequest(
                f"input '{tensor.name}' of model '{model}' has shape {list(shape)}; expected {list(spec.shape)} "
                "(-1 means any size)"
            )
        if info.batched:
            if shape[0] < 1 or shape[0] > info.max_batch_size:
                raise BadRequest(
                    f"input '{tensor.name}' of model '{model}' has batch size {shape[0]}; "
                    f"it must be between 1 and {info.max_batch_size}"
                )
            if rows is not None and shape[0] != rows:
                raise BadRequest(f"inputs of model '{model}' disagree on the batch size ({rows} and {shape[0]})")
            rows = shape[0]
    if len(seen) < len(info.inputs):
        missing = sorted(n for n, s in info.inputs.items() if n not in seen and not s.optional)
        if missing:
            raise BadRequest(f"missing input(s) {missing} for model '{model}'")
    for out in request.outputs or ():
        if out.name not in info.outputs:
            raise BadRequest(f"unknown output '{out.name}' for model '{model}'; it has {sorted(info.outputs)}")
        if out.class_count and info.outputs[out.name].datatype not in CLASSIFIABLE:
            raise BadRequest(
                f"output '{out.name}' of model '{model}' is {info.outputs[out.name].datatype}: classification "
                f"needs one of {sorted(CLASSIFIABLE)}"
            )
    return rows or 1
