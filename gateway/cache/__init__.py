"""The response cache: one for the whole fleet, in front of every instance.

``ResponseCache.get_or_compute`` serves a request from, in turn:

1. the in-process store (``store.py``): an LRU bounded in bytes, a TTL per model;
2. a computation already in flight for the same key (``flight.py``): identical requests in
   flight share one upstream inference;
3. the optional shared tier (``shared.py``, Redis), inside that same single flight, so one
   replica's result serves another replica's clients; a slow or dead Redis costs at most its
   bounded wait, and a result from it is kept locally for the model's TTL;
4. the upstream computation, whose result is stored (and written to the shared tier without
   waiting). Errors are never cached.

Keys (``keys.py``) cover the model, the version that serves the request and the raw input
tensors. Entries of a version are dropped when that version leaves the fleet or is reloaded in
place (``upstream.fleet`` tells, within one health interval).

In front of all that, the infer endpoint keeps **raw answers** (``get_raw``/``put_raw``): the
complete encoded response (headers and body) of a cacheable request, keyed by the request as it
arrived (``keys.raw_key``: model, served version, content type, binary-header length, body).
A repeat of the same bytes is answered with them before any decoding. Raw answers live in the
same store, so the same bounds, TTL, share, enablement and version drops apply to them; only
answers the cache produced ("miss", "hit", "coalesced": never errors, never bypassed requests)
are stored, and never across a ``drop_version`` that happened while they were computed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.batcher import BatchResult
from gateway.cache.entry import decode_entry, encode_entry
from gateway.cache.flight import Gone, SingleFlight
from gateway.cache.keys import cacheable, raw_key, request_key
from gateway.cache.store import ENTRY_OVERHEAD, CacheStore
from gateway.config import CacheConfig
from gateway.tensors import Tensor

__all__ = ["RawAnswer", "ResponseCache", "build_cache", "cacheable", "configured", "raw_key", "request_key"]

log = logging.getLogger(__name__)

Compute = Callable[[Gone], Awaitable[BatchResult]]

Headers = Sequence[tuple[bytes, bytes]]


@dataclass(slots=True, frozen=True)
class RawAnswer:
    """A complete 200 answer as sent: its headers (``X-Cache: hit`` among them) and body; and
    the headers as HTTP/1.1 header lines, for the protocol that writes them itself."""

    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    head: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", b"".join(b"%s: %s\r\n" % (k, v) for k, v in self.headers))

    @property
    def size(self) -> int:
        return ENTRY_OVERHEAD + len(self.body) + 2 * len(self.head)


class ResponseCache:
    def __init__(self, config: CacheConfig, shared: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._shared = shared  # a shared.SharedTier, or None
        self._clock = clock
        self.store = CacheStore(config.max_bytes)
        self._flight: SingleFlight[tuple[BatchResult, str]] = SingleFlight()
        self._writes: set[asyncio.Task[None]] = set()

    def enabled_for(self, model: str) -> bool:
        return self._config.for_model(model).enabled

    async def get_or_compute(
        self, model: str, version: str, key: bytes, compute: Compute, gone: Gone | None = None, detach: bool = False
    ) -> tuple[BatchResult, str]:
        """The result and where it came from: "hit" (this gateway's store or the shared tier),
        "coalesced" (shared with an identical request in flight) or "miss" (computed).
        ``detach``: the caller has a deadline, so a computation it starts runs in a task of
        its own, which the caller's timing out does not cancel (``flight``)."""
        stats = self.store.model_stats(model)
        cached = self.store.get(key, self._clock())
        if cached is not None:
            stats.hits += 1
            return cached, "hit"

        async def run(abandoned: Gone) -> tuple[BatchResult, str]:
            drops = self.store.drops
            shared = await self._from_shared(key)
            if shared is not None:
                stats.shared_hits += 1
                if self.store.drops == drops:
                    self._store(model, version, key, shared)
                return shared, "hit"
            result = await compute(abandoned)
            if self.store.drops == drops:  # else a version was dropped meanwhile: maybe this one
                self._store(model, version, key, result)
            self._to_shared(model, key, result)
            return result, "miss"

        (result, source), coalesced = await self._flight.do(key, run, gone, detach)
        if coalesced:
            stats.coalesced += 1
            return result, "coalesced"
        if source == "miss":
            stats.misses += 1
        return result, source

    def get_raw(self, model: str, key: bytes) -> RawAnswer | None:
        """The stored answer for a request's raw key (counted as a hit), or None (not counted:
        the request goes on to ``get_or_compute``, which counts it)."""
        answer = self.store.get(key, self._clock())
        if answer is not None:
            stats = self.store.model_stats(model)
            stats.hits += 1
            stats.raw_hits += 1
        return answer

    def put_raw(self, model: str, version: str, key: bytes, answer: RawAnswer, drops: int) -> bool:
        """Keep ``answer`` for ``key``, unless a version was dropped since ``drops`` (the
        store's ``drops`` read before the answer was computed) or the model's cache is off."""
        policy = self._config.for_model(model)
        if not policy.enabled or self.store.drops != drops:
            return False
        cap = int(self._config.max_bytes * policy.max_share)
        return self.store.put(key, answer, model, version, self._clock() + policy.ttl_s, cap, answer.size)

    def _store(self, model: str, version: str, key: bytes, result: BatchResult) -> None:
        policy = self._config.for_model(model)
        cap = int(self._config.max_bytes * policy.max_share)
        # Own copies: a caller's rows are views into its whole batch's response, which the
        # entry would otherwise keep alive, uncounted.
        owned = BatchResult(result.version, [Tensor(t.name, t.datatype, t.data.copy()) for t in result.outputs], result.parameters)
        self.store.put(key, owned, model, version, self._clock() + policy.ttl_s, cap)

    async def _from_shared(self, key: bytes) -> BatchResult | None:
        if self._shared is None:
            return None
        raw = await self._shared.get(key)
        if raw is None:
            return None
        try:
            return decode_entry(raw)
        except ValueError as exc:
            log.warning("ignoring a shared cache entry: %s", exc)
            return None

    def _to_shared(self, model: str, key: bytes, result: BatchResult) -> None:
        if self._shared is None:
            return
        task = asyncio.ensure_future(self._shared.set(key, encode_entry(result), self._config.for_model(model).ttl_s))
        self._writes.add(task)  # a hard reference until done
        task.add_done_callback(self._writes.discard)

    def drop_version(self, model: str, version: str) -> int:
        dropped = self.store.drop_version(model, version)
        if dropped:
            log.warning("dropped %d cached result(s) of %s version %s", dropped, model, version)
        return dropped

    def snapshot(self) -> dict[str, Any]:
        view: dict[str, Any] = {
            "enabled": self._config.enabled,
            "max_bytes": self.store.max_bytes,
            "bytes": self.store.bytes,
            "in_flight": len(self._flight),
            "models": {m: s.as_dict() for m, s in sorted(self.store.stats.items())},
        }
        if self._shared is not None:
            view["shared"] = self._shared.stats()
        return view

    async def close(self) -> None:
        await self._flight.close(timeout=1.0)
        if self._writes:
            await asyncio.wait(self._writes, timeout=1.0)
        if self._shared is not None:
            await self._shared.close()


def configured(config: CacheConfig) -> bool:
    """Whether any model has the cache enabled (else the gateway runs without one)."""
    return config.enabled or any(m.enabled for m in config.models.values())


def build_cache(config: CacheConfig) -> ResponseCache | None:
    """The configured cache, or None when no model has it enabled."""
    if not configured(config):
        return None
    shared = None
    if config.redis_url:
        from gateway.cache.shared import RedisTier  # only deployments with a shared tier need redis

        shared = RedisTier(config.redis_url, config.redis_timeout_ms / 1000)
    return ResponseCache(config, shared)
