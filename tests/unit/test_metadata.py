"""The metadata cache: one fetch for many callers, fresh entries served without awaiting, expiry,
unknown models remembered briefly, stale entries served while refreshed and when a refresh fails
for a reason not the model's. A fake router (no network); and the real router with a fake
Triton client, one instance of it hung."""

from __future__ import annotations

import asyncio
import random
import time

import orjson
import pytest

from gateway.errors import GatewayError, GatewayTimeout, ModelError, NotFound, Unavailable, UpstreamError
from gateway.router import Instance
from gateway.router import Router as RealRouter
from gateway.upstream.client import RawResponse
from gateway.upstream.metadata import (
    MAX_ENTRIES,
    NOT_FOUND_TTL_S,
    PREFETCH_AT_ONCE,
    PREFETCH_RETRY_S,
    REFRESH_RETRY_S,
    STALE_IF_ERROR_S,
    STALE_WHILE_REVALIDATE_S,
    MetadataCache,
)

METADATA = {"name": "m", "versions": ["1"], "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}], "outputs": []}


class Router:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.known = {"m"}
        self.failure: GatewayError | None = None  # how every read fails (Router.get's last failure)
        self.hold: asyncio.Event | None = None  # reads wait for it
        self.batch = 8  # the config's max_batch_size
        self.reading = 0  # reads under way now
        self.most = 0  # the most under way at once

    async def get(self, path: str, timeout: float | None = None, model: str | None = None, version: str = "") -> RawResponse:
        self.paths.append(path)
        self.reading += 1
        self.most = max(self.most, self.reading)
        try:
            await asyncio.sleep(0)
            if self.hold is not None:
                await self.hold.wait()
        finally:
            self.reading -= 1
        if self.failure is not None:
            raise self.failure
        if model not in self.known:
            return RawResponse(400, orjson.dumps({"error": f"Request for unknown model: '{model}' is not found"}))
        if path.endswith("/config"):
            return RawResponse(200, orjson.dumps({"max_batch_size": self.batch}))
        return RawResponse(200, orjson.dumps(METADATA))


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_concurrent_callers_share_one_fetch_and_fresh_entries_need_no_await() -> None:
    router, clock = Router(), Clock()
    cache = MetadataCache(router, ttl=5.0, clock=clock)  # type: ignore[arg-type]
    assert cache.fresh("m", "") is None
    infos = await asyncio.gather(*(cache.get("m", "") for _ in range(10)))
    assert router.paths == ["/v2/models/m", "/v2/models/m/config"]
    assert all(info is infos[0] for info in infos) and infos[0].max_batch_size == 8
    assert cache.fresh("m", "") is infos[0]
    clock.now += 5.0 + STALE_WHILE_REVALIDATE_S  # expired long ago: fetched again, awaited
    assert cache.fresh("m", "") is None
    router.batch = 4
    assert (await cache.get("m", "")).max_batch_size == 4
    assert len(router.paths) == 4


async def test_an_unknown_model_is_remembered_briefly_and_never_fresh() -> None:
    router, clock = Router(), Clock()
    cache = MetadataCache(router, ttl=5.0, clock=clock)  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(NotFound, match="model 'nope' is not served"):
            await cache.get("nope", "")
        assert cache.fresh("nope", "") is None
    assert len(router.paths) == 2
    router.known.add("nope")
    clock.now += NOT_FOUND_TTL_S
    assert (await cache.get("nope", "")).name == "m"


async def settle(cache: MetadataCache) -> None:
    """Until the fetches in flight (in the background) are done."""
    async with asyncio.timeout(1):
        while cache._inflight:
            await asyncio.sleep(0)


async def test_a_stale_entry_is_served_at_once_while_one_fetch_refreshes_it() -> None:
    """Stale-while-revalidate: a slow refresh (an instance that answers late) delays no request."""
    router, clock = Router(), Clock()
    cache = MetadataCache(router, ttl=5.0, clock=clock)  # type: ignore[arg-type]
    old = await cache.get("m", "")
    clock.now += 5.0 + STALE_WHILE_REVALIDATE_S / 2
    router.hold, router.batch = asyncio.Event(), 4
    for _ in range(10):  # none of them waits: no await suspends them
        waiting = asyncio.ensure_future(cache.get("m", ""))
        await asyncio.sleep(0)
        assert waiting.done() and waiting.result() is old
    assert cache.fresh("m", "") is None and len(router.paths) == 4  # one refresh in flight, for all
    router.hold.set()
    await settle(cache)
    assert cache.fresh("m", "").max_batch_size == 4 and len(router.paths) == 4  # type: ignore[union-attr]


async def test_a_background_refresh_refused_with_a_4xx_is_not_tried_again_at_every_request() -> None:
    router, clock = Router(), Clock()
    cache = MetadataCache(router, ttl=5.0, clock=clock)  # type: ignore[arg-type]
    old = await cache.get("m", "")
    clock.now += 6.0
    router.failure = UpstreamError("Triton refused the read: forbidden", status=403)
    for _ in range(20):
        assert await cache.get("m", "") is old
        await settle(cache)
    assert len(router.paths) == 2 + 2  # one refresh (metadata and config), then a pause
    clock.now += REFRESH_RETRY_S
    assert await cache.get("m", "") is old
    await settle(cache)
    assert len(router.paths) == 2 + 4


@pytest.mark.parametrize(
    "failure",
    [
        GatewayTimeout("Triton instance did not answer within 3 s"),
        Unavailable("Triton instance unreachable: cannot connect"),
        ModelError("Triton answered 500", status=502),
    ],
    ids=["timeout", "no-answer", "5xx"],
)
async def test_a_refresh_failing_for_a_reason_not_the_models_serves_the_stale_entry(failure: GatewayError) -> None:
    router, clock = Router(), Clock()
    cache = MetadataCache(router, ttl=5.0, clock=clock)  # type: ignore[arg-type]
    old = await cache.get("m", "")
    clock.now += 5.0 + STALE_WHILE_REVALIDATE_S + 1  # too old to be served without a refresh...
    router.failure = failure
    assert await cache.get("m", "") is old  # ...which fails: the stale entry, not the error
    assert len(router.paths) == 4
    for _ in range(5):  # served stale, not fetched again at once: later
        assert await cache.get("m", "") is old
    assert len(router.paths) == 4 and cache.fresh("m", "") is None
    clock.now += REFRESH_RETRY_S
    assert await cache.get("m", "") is old  # refreshed again, in the background
    await settle(cache)
    assert len(router.paths) == 6
    router.failure, router.batch = None, 4
    clock.now += REFRESH_RETRY_S
    assert await cache.get("m", "") is old
    await settle(cache)
    assert len(router.paths) == 8 and cache.fresh("m", "").max_batch_size == 4  # type: ignore[union-attr]


async def test_a_stale_entry_is_served_on_failure_only_for_a_while_and_no_entry_means_the_error() -> None:
    router, clock = Router(), Clock()
    cache = MetadataCache(router, ttl=5.0, clock=clock)  # type: ignore[arg-type]
    router.failure = GatewayTimeout("Triton instance did not answer within 3 s")
    with pytest.raises(GatewayTimeout):
        await cache.get("m", "")  # nothing to fall back on
    router.failure = None
    await cache.get("m", "")
    clock.now += 5.0 + STALE_IF_ERROR_S
    router.failure = GatewayTimeout("Triton instance did not answer within 3 s")
    with pytest.raises(GatewayTimeout):
        await cache.get("m", "")  # too stale to be served


@pytest.mark.parametrize("late_s", [1.0, STALE_WHILE_REVALIDATE_S + 1], ids=["refreshed-in-background", "refresh-awaited"])
async def test_a_model_gone_is_not_masked_by_a_stale_entry(late_s: float) -> None:
    router, clock = Router(), Clock()
    cache = MetadataCache(router, ttl=5.0, clock=clock)  # type: ignore[arg-type]
    await cache.get("m", "")
    router.known.discard("m")  # unloaded: Triton answers "unknown model"
    clock.now += 5.0 + late_s
    if late_s < STALE_WHILE_REVALIDATE_S:
        await cache.get("m", "")  # served stale once, while the refresh learns it is gone
        await settle(cache)
    for _ in range(2):
        with pytest.raises(NotFound, match="model 'm' is not served"):
            await cache.get("m", "")


# -- with the real router: one instance hung ------------------------------------------------------


class HungTriton:
    """A fake Triton client: reads to ``hung`` never answer (kill -STOP), whatever the timeout."""

    def __init__(self, hung: set[str]) -> None:
        self.hung = hung
        self.calls: list[tuple[str, str, float | None]] = []

    async def get(self, url: str, path: str, timeout: float | None = None) -> RawResponse:
        self.calls.append((url, path, timeout))
        if url in self.hung:
            await asyncio.Event().wait()
        body = {"max_batch_size": 8} if path.endswith("/config") else METADATA
        return RawResponse(200, orjson.dumps(body))


def fleet(hung: set[str]) -> tuple[HungTriton, RealRouter]:
    a, b = Instance("a"), Instance("b")
    a.models = b.models = {"m": frozenset({"1"})}
    client = HungTriton(hung)
    # request_timeout_s 30 s, as in production; reads get 0.1 s here.
    return client, RealRouter([a, b], client, attempt_timeout=30.0, read_timeout=0.1, rng=random.Random(0))  # type: ignore[arg-type]


async def test_a_hung_instance_delays_metadata_only_by_the_read_timeout() -> None:
    client, router = fleet({"a"})
    for _ in range(5):
        cache = MetadataCache(router, ttl=5.0)
        started = time.monotonic()
        async with asyncio.timeout(5):
            infos = await asyncio.gather(*(cache.get("m", "1") for _ in range(6)))
        assert time.monotonic() - started < 1.0 and all(i is infos[0] for i in infos)
    assert {u for u, _, _ in client.calls} == {"a", "b"}  # the hung one was asked: and passed over
    assert all(t == 0.1 for _, _, t in client.calls)


async def test_every_instance_hung_the_stale_entry_is_served() -> None:
    client, router = fleet(set())
    clock = Clock()
    cache = MetadataCache(router, ttl=5.0, clock=clock)
    old = await cache.get("m", "1")
    client.hung.update({"a", "b"})
    clock.now += 5.0 + STALE_WHILE_REVALIDATE_S + 1  # the refresh is awaited: it fails, in time
    started = time.monotonic()
    async with asyncio.timeout(5):
        assert await cache.get("m", "1") is old
    assert time.monotonic() - started < 1.0


# -- fetched before anyone asks: a worker's start (warm), versions new to the fleet (prefetch) --


async def test_warm_fetches_every_unknown_version_once_a_few_at_a_time() -> None:
    router = Router()
    router.known = {f"m{i}" for i in range(3 * PREFETCH_AT_ONCE)}
    cache = MetadataCache(router, ttl=5.0)  # type: ignore[arg-type]
    known = await cache.get("m0", "1")
    keys = [(f"m{i}", "1") for i in range(3 * PREFETCH_AT_ONCE)] + [("m1", "1")]  # one twice
    await cache.warm(keys, within=5.0)
    assert all(cache.fresh(*key) is not None for key in keys) and cache.fresh("m0", "1") is known
    assert len(router.paths) == 2 * 3 * PREFETCH_AT_ONCE  # each once (metadata, config); m0 at the get
    assert router.most == 2 * PREFETCH_AT_ONCE  # never more versions fetched at once


async def test_warm_gives_up_waiting_after_its_time_and_the_fetches_go_on_for_the_first_requests() -> None:
    router = Router()
    router.hold = asyncio.Event()
    cache = MetadataCache(router, ttl=5.0)  # type: ignore[arg-type]
    started = time.monotonic()
    await cache.warm([("m", "1")], within=0.05)
    assert time.monotonic() - started < 1.0 and cache.fresh("m", "1") is None
    waiting = asyncio.ensure_future(cache.get("m", "1"))
    await asyncio.sleep(0.01)
    router.hold.set()
    info = await asyncio.wait_for(waiting, 5)
    assert info.max_batch_size == 8 and len(router.paths) == 2  # the first request took the warm-up's fetch


async def test_warm_tries_a_failing_version_once_and_leaves_its_error_to_the_first_request() -> None:
    router = Router()
    router.failure = Unavailable("no instance answered")
    cache = MetadataCache(router, ttl=5.0)  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        await cache.warm([("m", "1"), ("nope", "1")], within=5.0)
    assert len(router.paths) == 4
    router.failure = None
    assert (await cache.get("m", "1")).max_batch_size == 8
    with pytest.raises(NotFound):
        await cache.get("nope", "1")


async def test_prefetch_starts_what_is_unknown_up_to_a_few_fetches_in_flight() -> None:
    router = Router()
    router.known = {f"m{i}" for i in range(PREFETCH_AT_ONCE + 2)}
    router.hold = asyncio.Event()
    cache = MetadataCache(router, ttl=5.0)  # type: ignore[arg-type]
    keys = [(f"m{i}", "1") for i in range(PREFETCH_AT_ONCE + 2)]
    cache.prefetch(keys)
    cache.prefetch(keys)  # all its room is taken: nothing more, nothing twice
    await asyncio.sleep(0.01)
    assert len(router.paths) == 2 * PREFETCH_AT_ONCE
    router.hold.set()
    await asyncio.sleep(0.01)
    cache.prefetch(keys)  # the rest
    await asyncio.sleep(0.01)
    assert all(cache.fresh(*key) is not None for key in keys)
    assert len(router.paths) == 2 * (PREFETCH_AT_ONCE + 2)
    cache.prefetch(keys)  # every one known: nothing fetched again
    await asyncio.sleep(0.01)
    assert len(router.paths) == 2 * (PREFETCH_AT_ONCE + 2)


async def test_a_failed_prefetch_is_tried_again_only_after_a_while_and_never_turns_prefetch_off() -> None:
    router, clock = Router(), Clock()
    router.failure = Unavailable("no instance answered")
    cache = MetadataCache(router, ttl=5.0, clock=clock)  # type: ignore[arg-type]
    for _ in range(10):  # every health round: tried once, not each round
        cache.prefetch([("m", "1")])
        await asyncio.sleep(0.01)
        clock.now += 1.0
    assert len(router.paths) == 2
    clock.now += PREFETCH_RETRY_S
    router.failure = None
    cache.prefetch([("m", "1")])
    await asyncio.sleep(0.01)
    assert cache.fresh("m", "1") is not None and len(router.paths) == 4
    # Unknown names remembered (a scanner, a typo in a loop) fill the cache's entries with
    # errors: a version new to the fleet is still fetched before it is asked for.
    for n in range(MAX_ENTRIES // 2 + 10):
        with pytest.raises(NotFound):
            await cache.get(f"nope{n}", "1")
    router.known.add("new")
    cache.prefetch([("new", "1")])
    await asyncio.sleep(0.01)
    assert cache.fresh("new", "1") is not None
