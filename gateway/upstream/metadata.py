"""Model metadata and config fetched from the fleet, cached for a while, fetched once at a time.

An entry is fresh for ``ttl`` (``upstream.metadata_ttl_s``) once fetched; then it is stale, and:

* up to ``STALE_WHILE_REVALIDATE_S`` past its TTL, it is still served at once while one fetch
  refreshes it in the background: no request waits on Triton for a model in use;
* later than that (a model nobody asked for a while), requests wait for the refresh, all for
  the same fetch;
* when a refresh fails for a reason that is not the model's (no instance answered, at all or in
  time: each read is bounded, and tried on the next instance, by ``Router.get``; or Triton
  answered 5xx), the stale entry is served instead of the error, up to ``STALE_IF_ERROR_S`` past
  its TTL, while refreshes are tried again in the background every ``REFRESH_RETRY_S``.

A model Triton says it does not know (404: unloaded, a wrong name) is never masked by a stale
entry: the answer replaces it, remembered for ``NOT_FOUND_TTL_S``.

The versions the fleet serves are fetched before anyone asks: a worker fetches them all before
it takes traffic (``warm``, bounded in time), and those new to the fleet after each health round
(``prefetch``), so that neither the first requests after a start nor a new version's first
requests wait on Triton for its metadata. Never more than ``PREFETCH_AT_ONCE`` such fetches run
at once, so that a fleet of many models does not take the upstream slots from requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import orjson

from gateway.errors import GatewayError, NotFound, UpstreamError
from gateway.models import ModelInfo
from gateway.router import Router
from gateway.upstream.client import RawResponse, model_path, upstream_error

log = logging.getLogger(__name__)

# A negative answer (unknown model) is remembered briefly so that a flood of requests for a
# wrong name does not become a flood of metadata requests to Triton.
NOT_FOUND_TTL_S = 1.0
MAX_ENTRIES = 4096
# How long past its TTL an entry is served while it is refreshed in the background...
STALE_WHILE_REVALIDATE_S = 60.0
# ...and, once a refresh failed for a reason not the model's, while refreshes keep failing.
STALE_IF_ERROR_S = 300.0
# After a failed refresh, how long before the next one (served stale meanwhile).
REFRESH_RETRY_S = 1.0
PREFETCH_AT_ONCE = 8  # fetches of versions nobody asked for yet (``warm``, ``prefetch``) in flight at once
WARM_S = 5.0  # the longest a worker's start waits for them (``warm``)
PREFETCH_RETRY_S = 60.0  # a version's prefetch that failed is not tried again before this

Key = tuple[str, str]


@dataclass(slots=True)
class _Entry:
    value: ModelInfo | GatewayError
    expires: float  # fresh until then
    failing: bool = False  # its last refresh failed (not for the model's reason): served stale
    retry_at: float = 0.0  # after a refresh that failed (not for the model's reason, or a 4xx): none before then


class MetadataCache:
    def __init__(self, router: Router, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._router = router
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[Key, _Entry] = {}
        self._inflight: dict[Key, asyncio.Future[ModelInfo]] = {}
        self._prefetched: dict[Key, float] = {}  # when each key's last prefetch began

    def fresh(self, model: str, version: str) -> ModelInfo | None:
        """The model's info if it is cached and fresh, without awaiting (the common case)."""
        entry = self._entries.get((model, version))
        if entry is None or entry.expires <= self._clock():
            return None
        value = entry.value
        return value if isinstance(value, ModelInfo) else None

    async def get(self, model: str, version: str) -> ModelInfo:
        key = (model, version)
        entry = self._entries.get(key)
        if entry is not None:
            now = self._clock()
            value = entry.value
            if entry.expires > now:
                if isinstance(value, GatewayError):
                    raise NotFound(value.message)  # a fresh error: re-raising one object grows its traceback
                return value
            if isinstance(value, ModelInfo):
                if now - entry.expires < (STALE_IF_ERROR_S if entry.failing else STALE_WHILE_REVALIDATE_S):
                    if now >= entry.retry_at:
                        self._fetching(model, version)  # refreshed in the background
                    return value
        # shield: one caller going away must not cancel the fetch the others wait for
        return await asyncio.shield(self._fetching(model, version))

    def prefetch(self, keys: Iterable[Key]) -> None:
        """Start fetching the keys nothing is known of yet (no entry, no fetch in flight), as
        many as keep ``PREFETCH_AT_ONCE`` fetches in flight; the others wait for a later call.
        A key whose prefetch failed (nothing kept: Triton's 5xx, no answer) is tried again
        ``PREFETCH_RETRY_S`` later at the soonest, not at every call: nobody may ask for it."""
        room = PREFETCH_AT_ONCE - len(self._inflight)
        if room <= 0:
            return
        now = self._clock()
        if len(self._prefetched) > MAX_ENTRIES:  # keys of long ago: forget when they were tried
            self._prefetched = {k: t for k, t in self._prefetched.items() if now - t < PREFETCH_RETRY_S}
        for key in keys:
            if key in self._entries or key in self._inflight or now - self._prefetched.get(key, -PREFETCH_RETRY_S) < PREFETCH_RETRY_S:
                continue
            self._prefetched[key] = now
            self._fetching(*key)
            room -= 1
            if not room:
                return

    async def warm(self, keys: Iterable[Key], within: float) -> None:
        """Fetch every key of ``keys`` nothing is known of yet, ``PREFETCH_AT_ONCE`` at a time,
        each tried once; return when they are all fetched or failed, or after ``within``
        seconds (the fetches under way go on). What a worker does before it takes traffic."""
        todo = [key for key in dict.fromkeys(keys) if key not in self._entries][: MAX_ENTRIES // 2]
        if not todo:
            return
        turns = asyncio.Semaphore(PREFETCH_AT_ONCE)

        async def fetch(key: Key) -> None:
            async with turns:
                if key not in self._entries:
                    # Shielded: the fetch goes on if the wait for it ends first. A failure is
                    # the first request's to meet (fetched again, or remembered as NotFound).
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._fetching(*key))

        tasks = [asyncio.ensure_future(fetch(key)) for key in todo]
        try:
            _, late = await asyncio.wait(tasks, timeout=within)
        finally:  # at the end of the time, or the start itself cancelled: no task left behind
            for task in tasks:
                task.cancel()
        if late:
            await asyncio.wait(late)
            log.info("metadata of %d model version(s) not fetched within %g s of the start: fetched on first use", len(late), within)

    def _fetching(self, model: str, version: str) -> asyncio.Future[ModelInfo]:
        """The fetch of the key in flight, started if there is none."""
        key = (model, version)
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(model, version))
            self._inflight[key] = pending
            pending.add_done_callback(functools.partial(self._fetched, key))
        return pending

    def _fetched(self, key: Key, future: asyncio.Future[ModelInfo]) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # a background refresh's failure is no one's to retrieve

    async def _fetch(self, model: str, version: str) -> ModelInfo:
        key = (model, version)
        try:
            info = await self._ask(model, version)
        except GatewayError as exc:
            if isinstance(exc, UpstreamError) and exc.status in (400, 404) and (
                "unknown model" in exc.message or "not found" in exc.message
            ):
                name = f"model '{model}'" + (f" version {version}" if version else "")
                error = NotFound(f"{name} is not served: {exc.message}")
                self._remember(key, error, NOT_FOUND_TTL_S)  # replaces a stale entry: never masked
                raise error from None
            if exc.status < 500:
                entry = self._entries.get(key)
                if entry is not None:  # served stale meanwhile: not fetched again at every request
                    entry.retry_at = self._clock() + REFRESH_RETRY_S
                raise
            return self._stale(key, exc)  # no answer, too late, or Triton's 5xx: not the model's
        previous = self._entries.get(key)
        if previous is not None and previous.failing:
            log.info("metadata of model '%s' version '%s' refreshed again", model, version)
        self._remember(key, info, self._ttl)
        return info

    async def _ask(self, model: str, version: str) -> ModelInfo:
        path = model_path(model, version)
        meta = asyncio.ensure_future(self._router.get(path, model=model, version=version))
        config = asyncio.ensure_future(self._router.get(path + "/config", model=model, version=version))
        try:
            answers: list[RawResponse] = await asyncio.gather(meta, config)
        except BaseException:
            meta.cancel()  # the other one is of no use now
            config.cancel()
            raise
        for resp in answers:
            if resp.status != 200:
                raise upstream_error(resp.status, resp.body)
        try:
            meta_body, config_body = answers[0].body, answers[1].body
            return ModelInfo.from_triton(orjson.loads(meta_body), orjson.loads(config_body), meta_body, config_body)
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(f"malformed metadata for model '{model}' from Triton: {exc!r}", status=502) from None

    def _stale(self, key: Key, error: GatewayError) -> ModelInfo:
        """The stale entry, in place of a refresh that failed for a reason not the model's, if
        there is one and not too old (else the error); refreshed again after REFRESH_RETRY_S."""
        entry = self._entries.get(key)
        now = self._clock()
        if entry is None or not isinstance(entry.value, ModelInfo) or now - entry.expires >= STALE_IF_ERROR_S:
            raise error
        if not entry.failing:
            log.warning(
                "metadata of model '%s' version '%s' could not be refreshed (%s): serving the entry that "
                "expired %.1f s ago, for %g s past its TTL at most, and refreshing it again every %g s",
                key[0], key[1], error.message, now - entry.expires, STALE_IF_ERROR_S, REFRESH_RETRY_S,
            )  # fmt: skip
        entry.failing = True
        entry.retry_at = now + REFRESH_RETRY_S
        return entry.value

    def _remember(self, key: Key, value: ModelInfo | GatewayError, ttl: float) -> None:
        now = self._clock()
        if len(self._entries) >= MAX_ENTRIES and key not in self._entries:
            # Requests for ever new unknown names must not grow the cache without bound: drop
            # what can no longer be served (errors, and entries too stale), else what expired,
            # else the oldest.
            items = self._entries.items()
            dead = [
                k for k, e in items if e.expires <= now and (isinstance(e.value, GatewayError) or now - e.expires >= STALE_IF_ERROR_S)
            ]
            for k in dead or [k for k, e in items if e.expires <= now] or list(self._entries)[:1]:
                del self._entries[k]
        self._entries[key] = _Entry(value, now + ttl)
