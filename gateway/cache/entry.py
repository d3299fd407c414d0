"""A cached result as bytes, for the shared tier: msgpack, tensors as raw little-endian bytes."""

from __future__ import annotations

import msgpack

from gateway.batcher import BatchResult
from gateway.tensors import pack_tensors, unpack_tensors

FORMAT = 1


def encode_entry(result: BatchResult) -> bytes:
    return msgpack.packb([FORMAT, result.version, pack_tensors(result.outputs), result.parameters], use_bin_type=True)


def decode_entry(raw: bytes) -> BatchResult:
    """The result, or ValueError if ``raw`` is not an entry this version wrote."""
    try:
        fmt, version, outputs, parameters = msgpack.unpackb(raw, raw=False)
        if fmt != FORMAT:
            raise ValueError(f"cache entry format {fmt}")
        return BatchResult(str(version), unpack_tensors(outputs), dict(parameters or {}))
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"not a cache entry: {exc!r}") from None
