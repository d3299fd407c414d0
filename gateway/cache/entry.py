"""A cached result as bytes, for the host and shared tiers: msgpack, tensors as raw
little-endian bytes, the wall-clock time it was computed at, from which a gateway on another
host counts its age (the shared tier), and the key it is the answer for. Readers on the same
host count its age from the host tier's expiry instead: the workers share a monotonic clock and
a TTL. A reader checks the key: an entry found under another key (copied there) is not that
request's answer. Entries of the formats before, which do not name their key, are read as the
entries of the key they are found under: gateways of the release before write them to the same
Redis during a rolling upgrade, and workers of it to the same host tier during a restart of the
workers."""

from __future__ import annotations

import math

import msgpack

from gateway.batcher import BatchResult
from gateway.tensors import pack_tensors, unpack_tensors

FORMAT = 3  # 1: without the time computed; 2: without the key
FIELDS = {1: 4, 2: 5, 3: 6}


def encode_entry(result: BatchResult, born: float, key: bytes) -> bytes:
    """``born``: when ``result`` was computed, in seconds since the epoch (``time.time()``);
    ``key``: the request key it answers."""
    return msgpack.packb([FORMAT, result.version, pack_tensors(result.outputs), result.parameters, born, key], use_bin_type=True)


def decode_entry(raw: bytes, key: bytes | None = None) -> tuple[BatchResult, float | None]:
    """The result and when it was computed (None: an entry of format 1, which does not say), or
    ValueError if ``raw`` is not an entry; with ``key``, also if it names another key."""
    try:
        fmt, version, outputs, parameters, *rest = fields = msgpack.unpackb(raw, raw=False)
        if FIELDS.get(fmt) != len(fields):
            raise ValueError(f"cache entry format {fmt} with {len(fields)} fields")
        if key is not None and fmt == FORMAT and rest[1] != key:
            raise ValueError("cache entry of another key")
        born = float(rest[0]) if rest else None
        if born is not None and not math.isfinite(born):  # would pass every check of its age
            raise ValueError(f"cache entry computed at {born}")
        return BatchResult(str(version), unpack_tensors(outputs), dict(parameters or {})), born
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"not a cache entry: {exc!r}") from None
