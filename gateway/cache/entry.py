"""A cached result as bytes, for the host and shared tiers: msgpack, tensors as raw
little-endian bytes, and the wall-clock time it was computed at, from which a gateway on another
host counts its age (the shared tier). Readers on the same host count it from the host tier's
expiry instead: the workers share a monotonic clock and a TTL."""

from __future__ import annotations

import math

import msgpack

from gateway.batcher import BatchResult
from gateway.tensors import pack_tensors, unpack_tensors

FORMAT = 2  # 1: without the time computed


def encode_entry(result: BatchResult, born: float) -> bytes:
    """``born``: when ``result`` was computed, in seconds since the epoch (``time.time()``)."""
    return msgpack.packb([FORMAT, result.version, pack_tensors(result.outputs), result.parameters, born], use_bin_type=True)


def decode_entry(raw: bytes) -> tuple[BatchResult, float | None]:
    """The result and when it was computed (None: an entry of format 1, which does not say), or
    ValueError if ``raw`` is not an entry."""
    try:
        fmt, version, outputs, parameters, *rest = msgpack.unpackb(raw, raw=False)
        if fmt not in (1, FORMAT) or len(rest) != (fmt == FORMAT):
            raise ValueError(f"cache entry format {fmt} with {4 + len(rest)} fields")
        born = float(rest[0]) if rest else None
        if born is not None and not math.isfinite(born):  # would pass every check of its age
            raise ValueError(f"cache entry computed at {born}")
        return BatchResult(str(version), unpack_tensors(outputs), dict(parameters or {})), born
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"not a cache entry: {exc!r}") from None
