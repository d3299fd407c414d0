"""The in-memory form of inference requests and responses, shared by every wire format.

Codecs in ``gateway.protocol`` turn bytes into these objects and back; the batcher, router and
upstream client only ever see these objects. Tensor data is always a numpy array whose shape is
the tensor's shape; ``BYTES`` tensors are numpy object arrays of ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# KServe v2 datatype <-> numpy dtype. Multi-byte types are little-endian on the wire. numpy has no
# bfloat16: a BF16 tensor holds its raw bits as uint16 (the upper half of a float32), which is
# what travels in binary data; only JSON data converts them (``bf16_bits``, ``bf16_values``).
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
# A uint16 array is UINT16, never BF16 (which shares its numpy dtype).
NUMPY_TO_V2: dict[np.dtype, str] = {dt: name for name, dt in V2_TO_NUMPY.items() if name != "BF16"}


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """Float32 values as bfloat16 bits ("<u2"), rounded to nearest even, as torch rounds; any NaN
    becomes the quiet NaN 0x7FC0. A finite value past bfloat16's largest rounds to infinity."""
    bits = np.asarray(values, dtype="<f4", order="C").view("<u4")
    nan = np.isnan(bits.view("<f4"))
    if nan.any():
        bits = np.where(nan, _U32_NAN, bits)  # rounding a NaN's bits could carry into the sign
    rounded = bits + (((bits >> _U32_16) & _U32_1) + _U32_7FFF)
    return np.asarray(rounded >> _U32_16).astype("<u2")  # a 0-d array's result is a scalar


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits as the float32 values they are, exactly."""
    wide = np.asarray(bits, dtype="<u2").astype("<u4")
    wide <<= _U32_16
    return wide.view("<f4")


# numpy's own integers, so that arithmetic on a 0-d array stays uint32.
_U32_1, _U32_16, _U32_7FFF, _U32_NAN = np.uint32(1), np.uint32(16), np.uint32(0x7FFF), np.uint32(0x7FC00000)


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str  # a key of V2_TO_NUMPY
    data: np.ndarray  # shape is the tensor's shape; dtype matches ``datatype``

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


def pack_tensors(tensors: list[Tensor]) -> list[list[Any]]:
    """Tensors as msgpack-ready lists ``[name, datatype, shape, data]`` for another process: data
    as raw row-major bytes, or a BYTES tensor's elements as a list of bytes."""
    packed = []
    for t in tensors:
        if t.datatype == "BYTES":
            data: object = [x if isinstance(x, bytes) else str(x).encode() for x in t.data.ravel()]
        else:
            data = t.data.tobytes()  # row-major whatever the array's layout
        packed.append([t.name, t.datatype, list(t.data.shape), data])
    return packed


def unpack_tensors(items: list[list[Any]]) -> list[Tensor]:
    """The tensors ``pack_tensors`` wrote (after a msgpack round trip). Raises ValueError,
    KeyError or TypeError on anything else."""
    tensors = []
    for name, datatype, shape, data in items:
        if datatype == "BYTES":
            array = np.empty(len(data), dtype=object)
            array[:] = data
        else:
            array = np.frombuffer(data, dtype=V2_TO_NUMPY[datatype])
        tensors.append(Tensor(name, datatype, array.reshape(shape)))
    return tensors


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # the output's ``binary_data`` parameter; None: request default
    parameters: dict[str, Any] = field(default_factory=dict)  # any others, which Triton ignores
    # The classification extension (the ``classification`` parameter, tritonclient's
    # ``class_count``): N > 0 asks for the output's top N classes per row, as BYTES strings
    # "value:index[:label]" computed by Triton; 0 asks for the values themselves.
    class_count: int = 0


@dataclass(slots=True)
class InferRequest:
    model: str
    version: str  # "" lets the server choose (Triton's version policy)
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False  # the request-level ``binary_data_output`` parameter


@dataclass(slots=True)
class InferResponse:
    model: str
    version: str
    outputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    cache: str = ""  # "hit", "miss", "coalesced" or "bypass" when the model is cached
    age: float | None = None  # a hit's: seconds since its answer was computed
