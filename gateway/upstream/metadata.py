"""Model metadata and config fetched from the fleet, cached for a while, fetched once at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson

from gateway.errors import GatewayError, NotFound, UpstreamError
from gateway.models import ModelInfo
from gateway.router import Router
from gateway.upstream.client import model_path, upstream_error

# A negative answer (unknown model) is remembered briefly so that a flood of requests for a
# wrong name does not become a flood of metadata requests to Triton.
NOT_FOUND_TTL_S = 1.0
MAX_ENTRIES = 4096


class MetadataCache:
    def __init__(self, router: Router, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._router = router
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[float, ModelInfo | GatewayError]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[ModelInfo]] = {}

    def _unexpired(self, key: tuple[str, str]) -> ModelInfo | GatewayError | None:
        """What is remembered for ``key`` (an answer or an error), unless it has expired."""
        entry = self._entries.get(key)
        return entry[1] if entry is not None and entry[0] > self._clock() else None

    def fresh(self, model: str, version: str) -> ModelInfo | None:
        """The model's info if it is cached and fresh, without awaiting (the common case)."""
        known = self._unexpired((model, version))
        return known if isinstance(known, ModelInfo) else None

    async def get(self, model: str, version: str) -> ModelInfo:
        key = (model, version)
        known = self._unexpired(key)
        if isinstance(known, GatewayError):
            raise NotFound(known.message)  # a fresh error: re-raising one object grows its traceback
        if known is not None:
            return known
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(model, version))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        # shield: one caller going away must not cancel the fetch the others wait for
        return await asyncio.shield(pending)

    async def _fetch(self, model: str, version: str) -> ModelInfo:
        key = (model, version)
        path = model_path(model, version)
        try:
            meta, config = await asyncio.gather(
                self._router.get(path, model=model, version=version),
                self._router.get(path + "/config", model=model, version=version),
            )
            for resp in (meta, config):
                if resp.status != 200:
                    raise upstream_error(resp.status, resp.body)
            try:
                info = ModelInfo.from_triton(orjson.loads(meta.body), orjson.loads(config.body), meta.body, config.body)
            except (ValueError, KeyError, TypeError) as exc:
                raise UpstreamError(f"malformed metadata for model '{model}' from Triton: {exc!r}", status=502) from None
        except UpstreamError as exc:
            if exc.status in (400, 404) and ("unknown model" in exc.message or "not found" in exc.message):
                name = f"model '{model}'" + (f" version {version}" if version else "")
                error = NotFound(f"{name} is not served: {exc.message}")
                self._remember(key, error, NOT_FOUND_TTL_S)
                raise error from None
            raise
        self._remember(key, info, self._ttl)
        return info

    def _remember(self, key: tuple[str, str], value: ModelInfo | GatewayError, ttl: float) -> None:
        now = self._clock()
        if len(self._entries) >= MAX_ENTRIES:
            # Requests for ever new unknown names must not grow the cache without bound.
            for k in [k for k, (expires, _) in self._entries.items() if expires <= now] or list(self._entries)[:1]:
                del self._entries[k]
        self._entries[key] = (now + ttl, value)
