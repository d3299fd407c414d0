"""Request checks against the model's metadata, before a request may join a batch."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from gateway.errors import BadRequest
from gateway.models import PLACEMENT_PARAMETER, ModelInfo, check_request
from gateway.tensors import InferRequest, RequestedOutput, Tensor

METADATA = {
    "name": "m",
    "versions": ["1"],
    "inputs": [{"name": "a", "datatype": "FP32", "shape": [-1, 3]}, {"name": "b", "datatype": "INT64", "shape": [-1, -1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
}
CONFIG = {"max_batch_size": 8, "input": [{"name": "b", "optional": True}]}
INFO = ModelInfo.from_triton(METADATA, CONFIG, b"{}", b"{}")


def req(*tensors: Tensor, outputs: list[str] | None = None) -> InferRequest:
    outs = None if outputs is None else [RequestedOutput(n) for n in outputs]
    return InferRequest("m", "", list(tensors), outs)


def a(rows: int = 2, width: int = 3, dtype: type = np.float32, datatype: str = "FP32") -> Tensor:
    return Tensor("a", datatype, np.zeros((rows, width), dtype))


def test_a_good_request_returns_its_batch_size() -> None:
    assert check_request(INFO, req(a(5))) == 5
    assert check_request(INFO, req(a(2), Tensor("b", "INT64", np.zeros((2, 7), np.int64)), outputs=["y"])) == 2


@pytest.mark.parametrize(
    "request_, message",
    [
        (req(Tensor("z", "FP32", np.zeros((1, 3), np.float32))), "unexpected input 'z'"),
        (req(a(dtype=np.float64, datatype="FP64")), "input 'a' of model 'm' must have datatype FP32"),
        (req(a(width=4)), "input 'a' of model 'm' has shape [2, 4]"),
        (req(a(rows=9)), "batch size 9"),
        (req(a(rows=0)), "batch size 0"),
        (req(a(2), Tensor("b", "INT64", np.zeros((3, 1), np.int64))), "disagree on the batch size"),
        (req(Tensor("b", "INT64", np.zeros((1, 1), np.int64))), "missing input(s) ['a']"),
        (req(a(), outputs=["q"]), "unknown output 'q'"),
    ],
)
def test_bad_requests_name_the_problem(request_: InferRequest, message: str) -> None:
    with pytest.raises(BadRequest) as err:
        check_request(INFO, request_)
    assert message in str(err.value)


def test_classification_is_checked_against_the_outputs_datatype() -> None:
    ranked = InferRequest("m", "", [a()], [RequestedOutput("y", class_count=2)])
    assert check_request(INFO, ranked) == 2
    strings = ModelInfo.from_triton(
        {**METADATA, "outputs": [{"name": "s", "datatype": "BYTES", "shape": [-1, 1]}]}, CONFIG, b"{}", b"{}"
    )
    with pytest.raises(BadRequest, match="output 's' of model 'm' is BYTES: classification needs one of"):
        check_request(strings, InferRequest("m", "", [a()], [RequestedOutput("s", class_count=1)]))
    # Values, not classes: any datatype.
    assert check_request(strings, InferRequest("m", "", [a()], [RequestedOutput("s")])) == 2


@pytest.mark.parametrize(
    ("sequence_batching", "stateful", "idle_s"),
    [
        (None, False, 1.0),
        ({}, True, 1.0),  # Triton's default idle time
        ({"max_sequence_idle_microseconds": "5000000"}, True, 5.0),  # a uint64: a string in Triton's JSON
        ({"max_sequence_idle_microseconds": 250000}, True, 0.25),
        ({"max_sequence_idle_microseconds": "0"}, True, 1.0),
        ({"max_sequence_idle_microseconds": "soon"}, True, 1.0),
    ],
)
def test_a_stateful_model_and_its_sequence_idle_time_come_from_its_config(sequence_batching: Any, stateful: bool, idle_s: float) -> None:
    config = dict(CONFIG) if sequence_batching is None else {**CONFIG, "sequence_batching": sequence_batching}
    info = ModelInfo.from_triton(METADATA, config, b"{}", b"{}")
    assert (info.stateful, info.sequence_idle_s) == (stateful, idle_s)


def test_bf16_tensors_are_checked_against_the_metadata_datatype() -> None:
    bf16 = ModelInfo.from_triton(
        {**METADATA, "inputs": [{"name": "h", "datatype": "BF16", "shape": [-1, 2]}],
         "outputs": [{"name": "o", "datatype": "BF16", "shape": [-1, 2]}]},
        {"max_batch_size": 8}, b"{}", b"{}",
    )  # fmt: skip
    bits = np.zeros((3, 2), "<u2")
    assert check_request(bf16, InferRequest("m", "", [Tensor("h", "BF16", bits)], [RequestedOutput("o")])) == 3
    # The same uint16 bits sent as UINT16 are another datatype, as Triton would say.
    with pytest.raises(BadRequest, match="input 'h' of model 'm' must have datatype BF16, got UINT16"):
        check_request(bf16, req(Tensor("h", "UINT16", bits)))
    with pytest.raises(BadRequest, match="input 'a' of model 'm' must have datatype FP32, got BF16"):
        check_request(INFO, req(Tensor("a", "BF16", np.zeros((2, 3), "<u2"))))
    # Triton ranks no BF16 output (nor FP16) for the classification extension.
    with pytest.raises(BadRequest, match="output 'o' of model 'm' is BF16: classification needs one of"):
        check_request(bf16, InferRequest("m", "", [Tensor("h", "BF16", bits)], [RequestedOutput("o", class_count=1)]))


def test_the_config_clients_see_is_tritons_answer_unchanged() -> None:
    raw = b'{"name":"m",  "max_batch_size":8,"parameters":{"labels":{"string_value":"x"}}}'
    info = ModelInfo.from_triton(METADATA, orjson.loads(raw), b"{}", raw)
    assert info.config is raw


def test_the_config_clients_see_leaves_out_the_gateways_record_of_a_load() -> None:
    """What a load records (``gateway.upstream.repository``) is the gateway's own bookkeeping:
    the config served through it looks as the model's own config.pbtxt made it."""
    config = {
        "name": "m",
        "max_batch_size": 8,
        "parameters": {"labels": {"string_value": "x"}, PLACEMENT_PARAMETER: {"string_value": "3f2a"}},
    }
    info = ModelInfo.from_triton(METADATA, config, b"{}", orjson.dumps(config))
    shown = orjson.loads(info.config)
    assert shown["parameters"] == {"labels": {"string_value": "x"}}
    assert {k: v for k, v in shown.items() if k != "parameters"} == {"name": "m", "max_batch_size": 8}
    assert config["parameters"][PLACEMENT_PARAMETER] == {"string_value": "3f2a"}  # what it was given, unchanged
