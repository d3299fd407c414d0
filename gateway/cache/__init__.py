"""The response cache: one for the whole fleet, in front of every instance.

``ResponseCache.get_or_compute`` serves a request from, in turn:

1. the in-process store (``store.py``): an LRU bounded in bytes, a TTL per model;
2. with several worker processes, the host tier (``host.py``): a store in shared memory that
   the workers of one host all read and write, so one worker's result serves another's
   clients; a result from it is kept in the process for the rest of its TTL;
3. a computation already in flight for the same key (``flight.py``): identical requests in
   flight share one upstream inference; with the host tier, across the host's workers too
   (``host_flight.py``): one worker computes a key, the others wait for its answer there;
4. the optional shared tier (``shared.py``, Redis), inside that same single flight, so one
   replica's result serves another replica's clients; a slow or dead Redis costs at most its
   bounded wait, and a result from it is kept locally for the rest of its TTL;
5. the upstream computation, whose result is stored (in the process and the host tier, and
   written to the shared tier without waiting). Errors are never cached.

A request's ``Cache-Control`` may limit what it takes from these tiers (``freshness.py``): an
answer older than it allows is passed over in each of them; the request then shares the
computation in flight like any other (but one of its own if the request leading that one took an
older answer than it allows), and the new result replaces the stored one; ``only-if-cached``
gets a stored answer or ``NotCached`` (504), never a computation. Every entry knows when its
answer was computed, for a hit's ``Age``: the host tier's from its expiry (the workers share a
clock and a TTL), the shared tier's from the wall-clock time written with it.

Keys (``keys.py``) cover the model, the version that serves the request and the raw input
tensors (for a classification, the outputs and class counts asked for too). Entries of a version are dropped when that version leaves the fleet or is reloaded in
place (``upstream.fleet`` tells, within one health interval); in the host tier, dropping a
version bumps its generation, which hides its entries from every worker at once; the shared tier,
which a drop does not empty, is passed over where an entry's computation began before this
process last dropped the version, and an answer computed across a drop is not written there.

In front of all that, the infer endpoint keeps **raw answers** (``get_raw``/``put_raw``): the
complete encoded response (headers and body) of a cacheable request, keyed by the request as it
arrived (``keys.raw_key``: model, served version, content type, binary-header length, body).
A repeat of the same bytes is answered with them before any decoding. Raw answers live in the
same store, so the same bounds, TTL, share, enablement and version drops apply to them; only
answers the cache produced ("miss", "hit": never errors, never bypassed requests, never
answers shared with a computation that began earlier) are stored, and never across a
``drop_version`` that happened while they were computed (``epoch``, read before computing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.batcher import BatchResult
from gateway.cache.entry import decode_entry, encode_entry
from gateway.cache.flight import Gone, SingleFlight
from gateway.cache.freshness import ANY, FRESH, Freshness, freshness
from gateway.cache.host import HostStore
from gateway.cache.host_flight import FOUND, HostFlight
from gateway.cache.keys import cacheable, raw_key, request_key
from gateway.cache.store import ENTRY_OVERHEAD, CacheStore, Entry
from gateway.config import CacheConfig
from gateway.errors import NotCached
from gateway.tensors import Tensor

__all__ = [
    "ANY",
    "Epoch",
    "FRESH",
    "Freshness",
    "RawAnswer",
    "ResponseCache",
    "build_cache",
    "cacheable",
    "configured",
    "freshness",
    "raw_key",
    "request_key",
]

log = logging.getLogger(__name__)

Compute = Callable[[Gone], Awaitable[BatchResult]]

Headers = Sequence[tuple[bytes, bytes]]

# What one computation of a key gives the requests sharing it: the result, where it came from
# ("miss", "hit": the shared or host tier; "coalesced": another worker's), and when the result
# was computed (this process's clock; None: just now).
Outcome = tuple[BatchResult, str, "float | None"]


# What must not change while an answer is computed for it to be kept (``ResponseCache.epoch``):
# the process's count of version drops, the version, and the host tier's generation of it.
Epoch = tuple[int, str, int]

_HEAD_LENGTH = struct.Struct("<I")


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

    def to_bytes(self) -> bytes:
        return _HEAD_LENGTH.pack(len(self.head)) + self.head + self.body

    @classmethod
    def from_bytes(cls, raw: bytes) -> RawAnswer:
        """The answer ``to_bytes`` wrote, or ValueError."""
        if len(raw) < 4:
            raise ValueError("a stored answer too short")
        (length,) = _HEAD_LENGTH.unpack_from(raw)
        head = raw[4 : 4 + length]
        if len(head) != length or not head.endswith(b"\r\n"):
            raise ValueError("a stored answer's head is cut short")
        headers = []
        for line in head[:-2].split(b"\r\n"):
            name, sep, value = line.partition(b": ")
            if not sep:
                raise ValueError("a stored answer's header has no value")
            headers.append((name, value))
        return cls(tuple(headers), raw[4 + length :])


class ResponseCache:
    def __init__(
        self,
        config: CacheConfig,
        shared: Any = None,
        clock: Callable[[], float] = time.monotonic,
        host: HostStore | None = None,
        claim_s: float = 60.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``claim_s``: how long other workers wait for one worker's computation of a key
        (while that worker lives and renews its claim, ``host_flight.py``); past it they
        compute the key themselves. ``wall_clock``: the time written with a result into the
        shared tier, whose readers on other hosts count its age from it."""
        self._config = config
        self._shared = shared  # a shared.SharedTier, or None
        self._host = host
        self._host_flight = HostFlight(host, clock, claim_s) if host is not None else None
        # Models whose last computed answer was too large for the host tier: not worth a claim.
        self._unfit: set[str] = set()
        self._clock = clock
        self._wall_clock = wall_clock
        self.store = CacheStore(config.max_bytes)
        self._flight: SingleFlight[Outcome] = SingleFlight()
        self._writes: set[asyncio.Task[None]] = set()
        # (model, version) -> the wall-clock time this process last dropped it: a shared-tier
        # entry whose computation began before is an answer of the version's files then.
        self._dropped: dict[tuple[str, str], float] = {}

    def enabled_for(self, model: str) -> bool:
        return self._config.for_model(model).enabled

    async def get_or_compute(
        self,
        model: str,
        version: str,
        key: bytes,
        compute: Compute,
        gone: Gone | None = None,
        detach: bool = False,
        on_follow: Callable[[bool], None] | None = None,
        freshness: Freshness = ANY,
    ) -> tuple[BatchResult, str, float | None]:
        """The result, where it came from: "hit" (this gateway's store or the shared tier),
        "coalesced" (shared with an identical request in flight, in this worker or another) or
        "miss" (computed); and for a hit its age in seconds.
        ``detach``: the caller has a deadline, so a computation it starts runs in a task of
        its own, which the caller's timing out does not cancel (``flight``); ``on_follow``:
        called with True when the caller waits for an identical request's computation in this
        worker, with False if it then leads a computation afresh.
        ``freshness``: what the request allows of a stored answer (``freshness.py``). One that
        finds none young enough shares the computation in flight like any other; if that was
        led by a request that took an older answer than this one allows, it computes the key
        afresh (sharing that with the others in its case), and the result replaces the stored
        one. With ``only_if_cached``, ``NotCached`` (504) instead of a computation."""
        stats = self.store.model_stats(model)
        now = self._clock()
        entry = self._stored(model, version, key, now, _ENTRY_TAG, freshness)
        if entry is not None:
            stats.hits += 1
            return entry.result, "hit", now - entry.born
        if freshness.only_if_cached:
            return await self._only_if_cached(model, version, key, freshness)

        # The leader's ``run`` serves its whole flight: what it takes from the shared and host
        # tiers is what its own request allows; a follower checks the outcome against its own.
        async def computed(abandoned: Gone, claimed: bool = False) -> tuple[Outcome, bool]:
            """The result from the shared tier or upstream, and whether it is now in the host
            tier (``claimed``: this worker holds the key's claim)."""
            epoch = self.epoch(model, version)
            shared = await self._shared_hit(model, version, key, freshness, epoch, claimed)
            if shared is not None:
                result, born, stored = shared
                return (result, "hit", born), stored
            result, source, stored = await self._computed(model, version, key, compute, abandoned, epoch, claimed)
            return (result, source, None), stored

        async def run(abandoned: Gone) -> Outcome:
            if self._host_flight is None or model in self._unfit:
                return (await computed(abandoned))[0]

            def fetch() -> Outcome | None:
                found = self._from_host(model, version, key, self._clock(), _ENTRY_TAG, False, freshness)
                return None if found is None else (found.result, "coalesced", found.born)

            outcome, how = await self._host_flight.do(key, fetch, lambda claimed: computed(abandoned, claimed), abandoned)
            if how == FOUND:  # in the host tier by the time this worker claimed the key
                stats.host_hits += 1
                return outcome[0], "hit", outcome[2]
            return outcome

        async def afresh(abandoned: Gone) -> Outcome:
            epoch = self.epoch(model, version)
            return (await self._computed(model, version, key, compute, abandoned, epoch))[0], "miss", None

        # Computed afresh in a flight of its own (keys are 16-byte digests: no other key is this
        # one), which a limited request arriving meanwhile joins too.
        renewed = key + _AFRESH
        again = freshness.limited and renewed in self._flight
        if not again:
            (result, source, born), coalesced = await self._flight.do(key, run, gone, detach, on_follow)
            again = coalesced and born is not None and freshness.limited and not self._accepts(model, freshness, born)
            if again and on_follow is not None and renewed not in self._flight:
                on_follow(False)  # it follows no more: it leads the computation afresh
        if again:
            (result, source, born), coalesced = await self._flight.do(renewed, afresh, gone, detach, on_follow)
        age = None if born is None else self._clock() - born
        if coalesced:
            stats.coalesced += 1
            return result, "coalesced", age
        # A "miss" was counted where it was computed.
        if source == "hit":  # the shared tier's, or the host tier's found on claiming
            stats.hits += 1
            return result, source, age or 0.0
        if source == "coalesced":  # another worker's computation
            stats.coalesced += 1
            stats.host_coalesced += 1
        return result, source, age

    def _accepts(self, model: str, freshness: Freshness, born: float) -> bool:
        return freshness.accepts(self._clock() - born, self._config.for_model(model).ttl_s)

    def _stored(self, model: str, version: str, key: bytes, now: float, tag: bytes, freshness: Freshness) -> Entry | None:
        """The stored entry for ``key`` that ``freshness`` accepts: this process's, else the
        host tier's (``_from_host``)."""
        entry = self.store.look(key, now)
        if entry is not None and (freshness is ANY or self._accepts(model, freshness, entry.born)):
            return entry
        if self._host is None:
            return None
        return self._from_host(model, version, key, now, tag, True, freshness)

    async def _computed(
        self, model: str, version: str, key: bytes, compute: Compute, abandoned: Gone, epoch: Epoch, claimed: bool = False
    ) -> tuple[BatchResult, str, bool]:
        """Computed upstream: the result, "miss", and whether it is now in the host tier. It
        goes to the shared tier stamped with when its computation began, unless the version was
        dropped meanwhile (the answer may be the files' before a reload in place)."""
        began = self._wall_clock()
        result = await compute(abandoned)
        # Counted here, once per computation: a detached one whose callers all gave up
        # (their deadlines) still computed an answer, and stored it.
        self.store.model_stats(model).misses += 1
        stored = self._store(model, version, key, result, epoch, claimed)
        if epoch == self.epoch(model, version):
            self._to_shared(model, key, result, began)
        return result, "miss", stored

    async def _only_if_cached(
        self, model: str, version: str, key: bytes, freshness: Freshness
    ) -> tuple[BatchResult, str, float | None]:
        """For an ``only-if-cached`` request that no answer in this host's tiers satisfied: the
        shared tier's, if it does; else ``NotCached``."""
        shared = await self._shared_hit(model, version, key, freshness, self.epoch(model, version))
        if shared is None:
            raise NotCached(f"no stored answer of {model} version {version} for this request (Cache-Control: only-if-cached)")
        result, born, _ = shared
        self.store.model_stats(model).hits += 1
        return result, "hit", self._clock() - born

    async def _shared_hit(
        self, model: str, version: str, key: bytes, freshness: Freshness, epoch: Epoch, claimed: bool = False
    ) -> tuple[BatchResult, float, bool] | None:
        """The shared tier's result that ``freshness`` accepts (``_from_shared``), counted and
        kept here for the rest of its TTL: the result, when it was computed, and whether it is
        now in the host tier (``_store``); or None."""
        shared = await self._from_shared(model, version, key, freshness)
        if shared is None:
            return None
        result, born = shared
        self.store.model_stats(model).shared_hits += 1
        return result, born, self._store(model, version, key, result, epoch, claimed, born)

    def get_raw(self, model: str, version: str, key: bytes, freshness: Freshness = ANY) -> tuple[RawAnswer, float] | None:
        """The stored answer for a request's raw key, served by ``version`` (counted as a hit),
        and its age in seconds; or None (not counted: the request goes on to
        ``get_or_compute``, which counts it), also where no answer is young enough for
        ``freshness``."""
        now = self._clock()
        entry = self._stored(model, version, key, now, _RAW_TAG, freshness)
        if entry is None:
            return None
        stats = self.store.model_stats(model)
        stats.hits += 1
        stats.raw_hits += 1
        return entry.result, now - entry.born

    def epoch(self, model: str, version: str) -> Epoch:
        """Read before computing an answer for ``version`` and given to ``put_raw``: an answer
        is not kept across a version drop that happened while it was computed."""
        return self.store.drops, version, self._host.generation(model, version) if self._host is not None else 0

    def put_raw(
        self, model: str, version: str, key: bytes, answer: RawAnswer, epoch: Epoch, computed: bool = True, age: float = 0.0
    ) -> bool:
        """Keep ``answer`` for ``key``, unless a version was dropped since ``epoch`` or the
        model's cache is off. ``computed``: the answer comes from a computation this request
        started, after ``epoch``; only such answers go to the host tier (a hit from this
        process's store may predate a drop another worker saw first, which ``epoch`` would not
        show). ``age``: how old the answer's result is (a hit's), kept for the rest of its TTL."""
        policy = self._config.for_model(model)
        if not policy.enabled or self.store.drops != epoch[0]:
            return False
        now = self._clock()
        born = now - age
        expires = born + policy.ttl_s
        if expires <= now:
            return False
        kept = self.store.put(key, answer, model, version, expires, self._model_bytes(policy), answer.size, now, born)
        if computed and self._host is not None and epoch[1] == version:
            self._host.put(key, model, version, epoch[2], _RAW_TAG + answer.to_bytes(), expires)
        return kept

    def _store(
        self,
        model: str,
        version: str,
        key: bytes,
        result: BatchResult,
        epoch: Epoch,
        claimed: bool = False,
        born: float | None = None,
    ) -> bool:
        """Keep a computed result, unless a version was dropped since ``epoch`` (maybe this one);
        whether it is in the host tier. ``claimed``: this worker holds the key's claim, and the
        other workers wait for this entry there: written even if that means waiting for the
        log's lock (else skipped when another worker is writing). ``born``: when the result was
        computed (by default now), kept for the rest of its TTL."""
        if self.store.drops != epoch[0]:
            return False
        policy = self._config.for_model(model)
        now = self._clock()
        if born is None:
            born = now
        expires = born + policy.ttl_s
        if expires <= now:
            return False
        # Own copies: a caller's rows are views into its whole batch's response, which the
        # entry would otherwise keep alive, uncounted.
        owned = BatchResult(result.version, [Tensor(t.name, t.datatype, t.data.copy()) for t in result.outputs], result.parameters)
        self.store.put(key, owned, model, version, expires, self._model_bytes(policy), now=now, born=born)
        if self._host is None:
            return False
        value = _ENTRY_TAG + encode_entry(owned, self._wall_clock() - (now - born), key)
        if not self._host.fits(len(value)):
            self._unfit.add(model)  # its next misses are computed without a claim, in parallel
            return False
        self._unfit.discard(model)
        return self._host.put(key, model, version, epoch[2], value, expires, wait=claimed)

    def _from_host(
        self, model: str, version: str, key: bytes, now: float, tag: bytes, counted: bool = True, freshness: Freshness = ANY
    ) -> Entry | None:
        """The host tier's entry for ``key`` (holding a RawAnswer for ``_RAW_TAG``, a
        BatchResult for ``_ENTRY_TAG``), kept in this process for the rest of its TTL; or None,
        also where ``freshness`` does not accept it. ``counted``: as a host hit (not for an
        answer another worker computed while this one waited). The workers share one clock and
        one TTL: an entry was computed its TTL before it expires."""
        if self._host is None:  # closed meanwhile (the worker is stopping)
            return None
        policy = self._config.for_model(model)
        min_expires = 0.0 if freshness is ANY else freshness.earliest_expiry(now, policy.ttl_s)
        found = self._host.get(key, model, version, now, counted, min_expires)
        if found is None:
            return None
        raw, expires = found
        try:
            if raw[:1] != tag:
                raise ValueError("an entry of another kind")
            value: Any = RawAnswer.from_bytes(raw[1:]) if tag == _RAW_TAG else decode_entry(raw[1:], key)[0]
        except ValueError as exc:
            log.warning("ignoring a host cache entry: %s", exc)
            return None
        size = value.size if tag == _RAW_TAG else None
        born = min(now, expires - policy.ttl_s)
        self.store.put(key, value, model, version, expires, self._model_bytes(policy), size, now, born)
        if counted:
            self.store.model_stats(model).host_hits += 1
        return Entry(value, model, version, 0, expires, born)

    def _model_bytes(self, policy: CacheConfig) -> int:
        """The most one model's entries may hold in this process (its share of max_bytes)."""
        return int(self._config.max_bytes * policy.max_share)

    async def _from_shared(
        self, model: str, version: str, key: bytes, freshness: Freshness = ANY
    ) -> tuple[BatchResult, float] | None:
        """The shared tier's result for ``key`` and when it was computed (on this process's
        clock, from the wall-clock time written with it; an entry that does not say, or says a
        time to come, counts as computed now); None if none, one past its TTL here, one
        ``freshness`` does not accept, or one whose computation began before this process or
        another worker of this host last dropped the version (the host tier's generation: its
        answer may be the version's files before a reload in place; replicas' clocks are taken
        to agree within the time a drop takes to be noticed)."""
        if self._shared is None:
            return None
        raw = await self._shared.get(key)
        if raw is None:
            return None
        try:
            result, born_wall = decode_entry(raw, key)
        except ValueError as exc:
            log.warning("ignoring a shared cache entry: %s", exc)
            return None
        dropped = self._dropped.get((model, version), 0.0)
        if self._host is not None:  # dropped by another worker of this host, maybe before this one started
            dropped = max(dropped, self._host.generation(model, version) / 1e9)
        if dropped and (born_wall is None or born_wall < dropped):
            return None
        now = self._clock()
        age = 0.0 if born_wall is None else max(0.0, self._wall_clock() - born_wall)
        ttl = self._config.for_model(model).ttl_s
        if age >= ttl or not (freshness is ANY or freshness.accepts(age, ttl)):
            return None
        return result, now - age

    def _to_shared(self, model: str, key: bytes, result: BatchResult, born: float) -> None:
        """``born``: the wall-clock time the result's computation began."""
        if self._shared is None:
            return
        value = encode_entry(result, born, key)
        task = asyncio.ensure_future(self._shared.set(key, value, self._config.for_model(model).ttl_s))
        self._writes.add(task)  # a hard reference until done
        task.add_done_callback(self._writes.discard)

    def drop_version(self, model: str, version: str) -> int:
        self._dropped[(model, version)] = self._wall_clock()
        if self._host is not None:
            self._host.bump(model, version)
        dropped = self.store.drop_version(model, version)
        if dropped:
            log.warning("dropped %d cached result(s) of %s version %s", dropped, model, version)
        return dropped

    def snapshot(self) -> dict[str, Any]:
        self.store.expire(self._clock())  # looked at every scrape: what is held is what may be given
        view: dict[str, Any] = {
            "pid": os.getpid(),  # with several workers, each answers for itself (but "host")
            "enabled": configured(self._config),  # for some model; which: "default" and "per_model"
            "default": _settings(self._config),  # for the models without a table of their own
            "per_model": {name: _settings(m) for name, m in sorted(self._config.models.items())},
            "max_bytes": self.store.max_bytes,
            "bytes": self.store.bytes,
            "in_flight": len(self._flight),
            "models": {m: s.as_dict() for m, s in sorted(self.store.stats.items())},
        }
        if self._host is not None:
            view["host"] = self._host.stats()
        if self._shared is not None:
            view["shared"] = self._shared.stats()
        return view

    async def close(self) -> None:
        await self._flight.close(timeout=1.0)
        if self._writes:
            await asyncio.wait(self._writes, timeout=1.0)
        if self._shared is not None:
            await self._shared.close()
        if self._host is not None:
            if self._host_flight is not None:
                self._host_flight.close()
            self._host_flight = None
            self._host.close()
            self._host = None


def _settings(config: CacheConfig) -> dict[str, Any]:
    return {"enabled": config.enabled, "ttl_s": config.ttl_s, "max_share": config.max_share}


def configured(config: CacheConfig) -> bool:
    """Whether any model has the cache enabled (else the gateway runs without one)."""
    return config.enabled or any(m.enabled for m in config.models.values())


def build_cache(config: CacheConfig, host_segment: str = "", claim_s: float = 60.0) -> ResponseCache | None:
    """The configured cache, or None when no model has it enabled. ``host_segment``: the
    host tier's shared-memory file, made by the command that started the workers (``host.py``);
    ``claim_s``: how long other workers wait for one worker's computation (``ResponseCache``)."""
    if not configured(config):
        return None
    shared = None
    if config.redis_url:
        from gateway.cache.shared import RedisTier  # only deployments with a shared tier need redis

        shared = RedisTier(config.redis_url, config.redis_timeout_ms / 1000)
    host = None
    if host_segment:
        try:
            host = HostStore(host_segment)
        except (OSError, ValueError) as exc:  # a worker still serves, with a cache of its own
            log.error("no cache shared between workers: %s", exc)
    return ResponseCache(config, shared, host=host, claim_s=claim_s)


# What a host tier entry holds: a complete answer (RawAnswer) or a computed result (entry.py).
_RAW_TAG = b"R"
_ENTRY_TAG = b"E"
_AFRESH = b"afresh"  # a key's suffix in the single flight: computed afresh (``get_or_compute``)
