"""A cached result as bytes, for the shared tier: msgpack, tensors as raw little-endian bytes."""

from __future__ import annotations

import msgpack
import numpy as np

from gateway.batcher import BatchResult
from gateway.tensors import V2_TO_NUMPY, Tensor

FORMAT = 1


def encode_entry(result: BatchResult) -> bytes:
    outputs = []
    for t in result.outputs:
        if t.datatype == "BYTES":
            data: object = [x if isinstance(x, bytes) else str(x).encode() for x in t.data.ravel()]
        else:
            data = np.ascontiguousarray(t.data).tobytes()
        outputs.append([t.name, t.datatype, list(t.data.shape), data])
    return msgpack.packb([FORMAT, result.version, outputs, result.parameters], use_bin_type=True)


def decode_entry(raw: bytes) -> BatchResult:
    """The result, or ValueError if ``raw`` is not an entry this version wrote."""
    try:
        fmt, version, outputs, parameters = msgpack.unpackb(raw, raw=False)
        if fmt != FORMAT:
            raise ValueError(f"cache entry format {fmt}")
        tensors = []
        for name, datatype, shape, data in outputs:
            if datatype == "BYTES":
                array = np.empty(len(data), dtype=object)
                array[:] = data
                array = array.reshape(shape)
            else:
                array = np.frombuffer(data, dtype=V2_TO_NUMPY[datatype]).reshape(shape)
            tensors.append(Tensor(name, datatype, array))
        return BatchResult(str(version), tensors, dict(parameters or {}))
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"not a cache entry: {exc!r}") from None
