"""The in-process store: an LRU over cached results, bounded in bytes, with a TTL per entry.

An entry holds either a computed result (a ``BatchResult``, keyed by ``keys.request_key``) or
a complete encoded answer (a ``RawAnswer``, keyed by ``keys.raw_key``); both kinds share the
bounds, the TTL, the per-model share and ``drop_version``.

One global LRU order and one per model, so that both bounds hold cheaply: the store's
``max_bytes`` (the least recently used entry of any model goes first) and each model's share
of it (that model's least recently used entry goes first). Expired entries are dropped when
met, and swept (``expire``) before each store and at each look at the cache's statistics (every
metrics scrape), soonest first from a heap of expiry times, so that an idle cache does not go on
holding memory for answers no one may be given. Everything is synchronous and O(log n) per
operation (amortised): it runs on the event loop.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.batcher import BatchResult

ENTRY_OVERHEAD = 256  # bytes counted per entry beyond its outputs (key, bookkeeping)


@dataclass(slots=True)
class Entry:
    result: Any  # a BatchResult, or a RawAnswer
    model: str
    version: str
    size: int
    expires: float
    born: float  # when the answer was computed (the clock of ``expires``): its age is counted from it


@dataclass(slots=True)
class ModelCacheStats:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    host_coalesced: int = 0  # answers another worker computed while this one waited (of coalesced)
    shared_hits: int = 0
    host_hits: int = 0  # hits from the store the host's workers share (of hits)
    raw_hits: int = 0  # the hits answered with stored response bytes, before decoding (of hits)
    evictions: int = 0
    expired: int = 0  # entries dropped once past their TTL
    bytes: int = 0
    entries: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


def result_size(result: BatchResult) -> int:
    return ENTRY_OVERHEAD + sum(_tensor_size(t.data) for t in result.outputs)


def _tensor_size(data: np.ndarray) -> int:
    if data.dtype == object:  # BYTES (a classification's strings): the strings, not the pointers
        return data.nbytes + sum(len(x) for x in data.ravel())
    return data.nbytes


class CacheStore:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._by_model: dict[str, OrderedDict[bytes, None]] = {}
        self.stats: dict[str, ModelCacheStats] = {}
        self.bytes = 0
        # Bumped by every drop_version: a result computed before a drop is not stored after it.
        self.drops = 0
        # (expires, n, key) per stored entry, soonest first; an item whose entry has gone or
        # been replaced is skipped when it comes up, and the heap is rebuilt when such items
        # are the most of it.
        self._expiries: list[tuple[float, int, bytes]] = []
        self._counter = itertools.count()

    def model_stats(self, model: str) -> ModelCacheStats:
        stats = self.stats.get(model)
        if stats is None:
            stats = self.stats[model] = ModelCacheStats()
        return stats

    def get(self, key: bytes, now: float) -> Any:
        entry = self.look(key, now)
        return None if entry is None else entry.result

    def look(self, key: bytes, now: float) -> Entry | None:
        """The live entry for ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            self._expire(key, entry)
            return None
        self._entries.move_to_end(key)
        self._by_model[entry.model].move_to_end(key)
        return entry

    def put(
        self,
        key: bytes,
        result: Any,
        model: str,
        version: str,
        expires: float,
        model_max_bytes: int,
        size: int | None = None,
        now: float | None = None,
        born: float | None = None,
    ) -> bool:
        """Store ``result`` (``size`` bytes; by default a BatchResult's); False if it is larger
        than allowed to be held at all. ``now``: expired entries go first (``expire``);
        ``born``: when the answer was computed (by default ``now``)."""
        if size is None:
            size = result_size(result)
        if size > model_max_bytes or size > self.max_bytes:
            return False
        old = self._entries.get(key)
        if old is not None:
            self._remove(key, old)
        if now is not None:
            self.expire(now)
        stats = self.model_stats(model)
        order = self._by_model.setdefault(model, OrderedDict())
        while order and stats.bytes + size > model_max_bytes:
            self._evict(next(iter(order)))
        while self._entries and self.bytes + size > self.max_bytes:
            self._evict(next(iter(self._entries)))
        if born is None:
            born = expires if now is None else now
        self._entries[key] = Entry(result, model, version, size, expires, born)
        heapq.heappush(self._expiries, (expires, next(self._counter), key))
        order[key] = None
        self.bytes += size
        stats.bytes += size
        stats.entries += 1
        return True

    def expire(self, now: float) -> int:
        """Drop every entry past its TTL at ``now``; how many."""
        heap, dropped = self._expiries, 0
        while heap and heap[0][0] <= now:
            expires, _, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.expires == expires:
                self._expire(key, entry)
                dropped += 1
        if len(heap) > 2 * len(self._entries) + 64:  # mostly items of entries gone already
            self._expiries = [(e.expires, next(self._counter), k) for k, e in self._entries.items()]
            heapq.heapify(self._expiries)
        return dropped

    def drop_version(self, model: str, version: str) -> int:
        """Remove every entry of one model version (it was unloaded or replaced)."""
        self.drops += 1
        keys = [k for k in self._by_model.get(model, ()) if self._entries[k].version == version]
        for key in keys:
            self._remove(key, self._entries[key])
        return len(keys)

    def _evict(self, key: bytes) -> None:
        entry = self._entries[key]
        self._remove(key, entry)
        self.model_stats(entry.model).evictions += 1

    def _expire(self, key: bytes, entry: Entry) -> None:
        self._remove(key, entry)
        self.model_stats(entry.model).expired += 1

    def _remove(self, key: bytes, entry: Entry) -> None:
        del self._entries[key]
        del self._by_model[entry.model][key]
        self.bytes -= entry.size
        stats = self.model_stats(entry.model)
        stats.bytes -= entry.size
        stats.entries -= 1
