"""The shared cache tier against a real redis-server: round trips and expiry, two replicas sharing
entries, and what a dead, frozen or restarted Redis costs (a bounded wait, then nothing) and how
the tier recovers on its own.

The redis-server comes from scripts/fetch_redis.sh (run here when missing) and runs on port 8690,
without persistence, in the test's tmp dir; it is stopped after each test, failed or not. Each
scenario runs on the stock asyncio loop and on uvloop (the gateway's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import pytest
import uvloop

from gateway.cache.shared import OPEN_AFTER_FAILURES, RedisTier
from redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration

TIMEOUT_S = 0.05  # the bounded wait in the failure tests; the gateway's default is 5 ms
PATIENT_S = 2.0  # the bounded wait where a test checks answers, not failures: a busy machine
RETRY_AFTER_S = 0.5
SLACK_S = 0.45  # scheduling on two noisy cores, busy with other tests


LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Runs a scenario to the end on a fresh event loop of the kind named by the param."""
    return LOOPS[request.param]


async def open_tier(stack: AsyncExitStack, url: str, **kwargs: Any) -> RedisTier:
    kwargs.setdefault("timeout_s", TIMEOUT_S)
    kwargs.setdefault("retry_after_s", RETRY_AFTER_S)
    tier = RedisTier(url, **kwargs)
    stack.push_async_callback(tier.close)
    return tier


async def until(predicate: Callable[[], Coroutine[Any, Any, bool]], timeout: float) -> float:
    """Seconds until predicate() held, checking every 20 ms; fails after timeout."""
    start = time.monotonic()
    while not await predicate():
        assert time.monotonic() - start < timeout, f"not within {timeout}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


class Load:
    """Clients using the tier in a loop (get, then set), timing every call; exceptions surface
    when stopped."""

    def __init__(self, tier: RedisTier, clients: int = 8) -> None:
        self.tier = tier
        self.durations: list[float] = []
        self._stopping = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(clients)]

    async def _client(self, n: int) -> None:
        i = 0
        while not self._stopping.is_set():
            for call in (self.tier.get(b"hot"), self.tier.set(b"c%d-%d" % (n, i), b"v" * 512, 5.0)):
                start = time.perf_counter()
                await call
                self.durations.append(time.perf_counter() - start)
            i += 1
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)


# --- answers ----------------------------------------------------------------------------------


def test_round_trip_and_expiry(redis_server: RedisServer, run: Callable[..., None]) -> None:
    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            tier = await open_tier(stack, redis_server.url, timeout_s=PATIENT_S)
            value = bytes(range(256)) * 400  # 100 kB, every byte value
            await tier.set(b"result", value, 0.3)
            assert await tier.get(b"result") == value
            assert await tier.get(b"never set") is None
            await asyncio.sleep(0.45)
            assert await tier.get(b"result") is None  # expired in Redis
            assert tier.stats() == {"hits": 1, "misses": 2, "errors": 0, "timeouts": 0, "skipped": 0}

    run(scenario())


def test_two_replicas_share_entries_under_one_prefix(redis_server: RedisServer, run: Callable[..., None]) -> None:
    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            a = await open_tier(stack, redis_server.url, timeout_s=PATIENT_S)
            b = await open_tier(stack, redis_server.url, timeout_s=PATIENT_S)
            elsewhere = await open_tier(stack, redis_server.url, timeout_s=PATIENT_S, prefix=b"another-app:")
            await a.set(b"k1", b"from a", 10)
            assert await b.get(b"k1") == b"from a"
            await b.set(b"k2", b"from b", 10)
            assert await a.get(b"k2") == b"from b"
            assert await elsewhere.get(b"k1") is None
            assert a.stats()["hits"] == b.stats()["hits"] == 1

    run(scenario())


# --- a Redis that dies, freezes, comes back ----------------------------------------------------


def test_killed_redis_costs_at_most_the_bounded_wait_then_nothing(
    redis_server: RedisServer, run: Callable[..., None]
) -> None:
    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            tier = await open_tier(stack, redis_server.url)
            await tier.set(b"hot", b"x", 60)
            load = Load(tier)
            await asyncio.sleep(0.3)
            before = tier.stats()
            redis_server.kill()
            await asyncio.sleep(0.3)
            after_kill = len(load.durations)
            await asyncio.sleep(0.3)
            await load.stop()  # raises if any call raised
            stats = tier.stats()
            assert before["hits"] > 0 and before["errors"] == 0  # (a busy machine may time out)
            assert stats["errors"] > 0  # refused or reset: an error, at once
            assert stats["skipped"] > before["skipped"] and tier.breaker_open
            assert max(load.durations) < TIMEOUT_S + SLACK_S
            assert len(load.durations) > after_kill  # the clients went on

    run(scenario())


def test_frozen_redis_is_waited_for_timeout_s_then_skipped(redis_server: RedisServer, run: Callable[..., None]) -> None:
    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            tier = await open_tier(stack, redis_server.url)
            await until(lambda: set_and_get(tier, b"k", b"v"), timeout=5.0)
            before = tier.stats()
            redis_server.freeze()  # accepts bytes, answers nothing: a network black hole
            waits = []
            for _ in range(OPEN_AFTER_FAILURES):
                start = time.perf_counter()
                assert await tier.get(b"k") is None
                waits.append(time.perf_counter() - start)
            assert all(TIMEOUT_S * 0.9 <= w < TIMEOUT_S + SLACK_S for w in waits), waits
            start = time.perf_counter()
            assert await tier.get(b"k") is None
            assert time.perf_counter() - start < TIMEOUT_S / 2  # skipped at once
            stats = tier.stats()
            assert stats["timeouts"] - before["timeouts"] == OPEN_AFTER_FAILURES
            assert stats["skipped"] - before["skipped"] == 1
            redis_server.thaw()
            await until(lambda: set_and_get(tier, b"k", b"v"), timeout=RETRY_AFTER_S + 2.0)

    run(scenario())


def test_restarted_redis_is_used_again_on_its_own(redis_server: RedisServer, run: Callable[..., None]) -> None:
    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            a = await open_tier(stack, redis_server.url)
            b = await open_tier(stack, redis_server.url)
            load = Load(a)
            await asyncio.sleep(0.2)
            redis_server.kill()
            await asyncio.sleep(0.3)
            assert a.breaker_open
            redis_server.start()  # same port, empty
            restarted = time.monotonic()

            async def shared_again() -> bool:
                await a.set(b"after", b"restart", 60)
                return await b.get(b"after") == b"restart"

            await until(shared_again, timeout=RETRY_AFTER_S + 2.0)
            assert time.monotonic() - restarted < RETRY_AFTER_S + 2.0
            await load.stop()
            assert not a.breaker_open and not b.breaker_open
            hits = a.stats()["hits"]
            await until(lambda: set_and_get(a, b"hot", b"x"), timeout=2.0)  # the loaded one too
            assert a.stats()["hits"] > hits

    run(scenario())


async def set_and_get(tier: RedisTier, key: bytes, value: bytes) -> bool:
    await tier.set(key, value, 60)
    return await tier.get(key) == value
