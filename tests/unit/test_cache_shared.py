"""The shared (Redis) tier's bounded wait and circuit breaker, against a fake client and a fake
clock: no network, no Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.cache.shared import OPEN_AFTER_FAILURES, Breaker, RedisTier, SharedTier

TIMEOUT_S = 0.02
RETRY_AFTER_S = 1.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeRedis:
    """Answers from a dict, or fails as told: mode "ok", "refuse" (connection refused),
    "hang" (never answers), "error" (Redis answers with an error)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.data: dict[bytes, bytes] = {}
        self.px: dict[bytes, int] = {}
        self.calls = 0
        self.closed = False

    async def _behave(self) -> None:
        self.calls += 1
        if self.mode == "refuse":
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "error":
            raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    async def get(self, name: bytes) -> Any:
        await self._behave()
        return self.data.get(name)

    async def set(self, name: bytes, value: bytes, *, px: int) -> Any:
        await self._behave()
        self.data[name] = value
        self.px[name] = px
        return True

    async def aclose(self) -> None:
        self.closed = True
        if self.mode == "refuse":
            raise RedisConnectionError("already gone")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def tier(fake: FakeRedis, clock: FakeClock) -> RedisTier:
    return RedisTier("redis://unused:6379/0", TIMEOUT_S, retry_after_s=RETRY_AFTER_S, client=fake, clock=clock)


async def fail_until_open(tier: RedisTier, fake: FakeRedis, mode: str = "refuse") -> None:
    fake.mode = mode
    for _ in range(OPEN_AFTER_FAILURES):
        assert await tier.get(b"k") is None
    assert tier.breaker_open


# --- answers ----------------------------------------------------------------------------------


def test_redis_tier_is_a_shared_tier(tier: RedisTier) -> None:
    shared: SharedTier = tier  # the protocol the cache codes against
    assert shared.stats() == {"hits": 0, "misses": 0, "errors": 0, "timeouts": 0, "skipped": 0}


async def test_hits_and_misses_under_the_prefix(tier: RedisTier, fake: FakeRedis) -> None:
    await tier.set(b"key", b"value", 2.5)
    assert fake.data == {b"tritongw:key": b"value"}
    assert fake.px == {b"tritongw:key": 2500}
    assert await tier.get(b"key") == b"value"
    assert await tier.get(b"other") is None
    assert tier.stats() == {"hits": 1, "misses": 1, "errors": 0, "timeouts": 0, "skipped": 0}


async def test_own_prefix(fake: FakeRedis) -> None:
    tier = RedisTier("redis://unused", TIMEOUT_S, prefix=b"gw2/", client=fake)
    await tier.set(b"k", b"v", 1.0)
    assert list(fake.data) == [b"gw2/k"]


async def test_ttl_in_whole_milliseconds_at_least_one(tier: RedisTier, fake: FakeRedis) -> None:
    await tier.set(b"short", b"v", 0.0001)
    await tier.set(b"odd", b"v", 0.0125)
    assert fake.px == {b"tritongw:short": 1, b"tritongw:odd": 12}


async def test_no_ttl_stores_nothing(tier: RedisTier, fake: FakeRedis) -> None:
    await tier.set(b"k", b"v", 0)
    assert fake.calls == 0 and fake.data == {}


# --- failures: bounded, swallowed, counted ---------------------------------------------------------


async def test_connection_error_is_a_miss_and_never_raises(tier: RedisTier, fake: FakeRedis) -> None:
    fake.mode = "refuse"
    assert await tier.get(b"k") is None
    await tier.set(b"k", b"v", 1.0)
    assert tier.stats()["errors"] == 2
    assert not tier.breaker_open  # below OPEN_AFTER_FAILURES


async def test_a_silent_redis_costs_the_bounded_wait_only(tier: RedisTier, fake: FakeRedis) -> None:
    fake.mode = "hang"
    start = time.perf_counter()
    assert await tier.get(b"k") is None
    await tier.set(b"k", b"v", 1.0)
    elapsed = time.perf_counter() - start
    assert elapsed < 2 * TIMEOUT_S + 0.5  # slack for a noisy machine; a hang would be an hour
    assert tier.stats()["timeouts"] == 2


async def test_an_error_answer_is_counted_but_does_not_open_the_breaker(tier: RedisTier, fake: FakeRedis) -> None:
    fake.mode = "error"
    for _ in range(OPEN_AFTER_FAILURES * 2):
        assert await tier.get(b"k") is None
        await tier.set(b"k", b"v", 1.0)
    assert tier.stats()["errors"] == OPEN_AFTER_FAILURES * 4
    assert not tier.breaker_open
    assert fake.calls == OPEN_AFTER_FAILURES * 4


# --- the breaker ---------------------------------------------------------------------------------


async def test_consecutive_failures_open_the_breaker_then_calls_are_skipped_at_once(
    tier: RedisTier, fake: FakeRedis
) -> None:
    await fail_until_open(tier, fake)
    calls = fake.calls
    for _ in range(100):
        assert await tier.get(b"k") is None
        await tier.set(b"k", b"v", 1.0)
    assert fake.calls == calls  # Redis not touched while open
    assert tier.stats() == {"hits": 0, "misses": 0, "errors": OPEN_AFTER_FAILURES, "timeouts": 0, "skipped": 200}


async def test_timeouts_open_the_breaker_too(tier: RedisTier, fake: FakeRedis) -> None:
    await fail_until_open(tier, fake, mode="hang")
    start = time.perf_counter()
    assert await tier.get(b"k") is None
    assert time.perf_counter() - start < TIMEOUT_S / 2
    assert tier.stats()["timeouts"] == OPEN_AFTER_FAILURES and tier.stats()["skipped"] == 1


async def test_a_success_resets_the_count_of_consecutive_failures(tier: RedisTier, fake: FakeRedis) -> None:
    for _ in range(3):
        fake.mode = "refuse"
        for _ in range(OPEN_AFTER_FAILURES - 1):
            await tier.get(b"k")
        fake.mode = "ok"
        await tier.get(b"k")
    assert not tier.breaker_open
    assert tier.stats()["skipped"] == 0


async def test_after_retry_after_one_probe_closes_the_breaker(tier: RedisTier, fake: FakeRedis, clock: FakeClock) -> None:
    await fail_until_open(tier, fake)
    fake.mode = "ok"
    clock.now += RETRY_AFTER_S - 0.01
    assert await tier.get(b"k") is None and tier.breaker_open  # still skipped
    clock.now += 0.02
    await tier.set(b"k", b"back", 1.0)  # the probe
    assert not tier.breaker_open
    assert await tier.get(b"k") == b"back"


async def test_a_failed_probe_opens_it_for_another_retry_after(tier: RedisTier, fake: FakeRedis, clock: FakeClock) -> None:
    await fail_until_open(tier, fake)
    clock.now += RETRY_AFTER_S
    calls = fake.calls
    assert await tier.get(b"k") is None  # the probe, refused: one failure is enough now
    assert fake.calls == calls + 1 and tier.breaker_open
    clock.now += RETRY_AFTER_S / 2
    assert await tier.get(b"k") is None
    assert fake.calls == calls + 1
    clock.now += RETRY_AFTER_S / 2
    fake.mode = "ok"
    assert await tier.get(b"k") is None  # probe: a real miss
    assert not tier.breaker_open and tier.stats()["misses"] == 1


async def test_one_probe_at_a_time_while_half_open(tier: RedisTier, fake: FakeRedis, clock: FakeClock) -> None:
    await fail_until_open(tier, fake)
    fake.mode = "hang"
    clock.now += RETRY_AFTER_S
    probe = asyncio.create_task(tier.get(b"k"))
    await asyncio.sleep(0)  # the probe is waiting on Redis
    calls = fake.calls
    others = await asyncio.gather(*(tier.get(b"k") for _ in range(10)))
    assert others == [None] * 10 and fake.calls == calls  # skipped, not sent
    assert await probe is None  # timed out: open again
    assert tier.breaker_open and tier.stats()["timeouts"] == 1


async def test_a_probe_cancelled_from_outside_lets_the_next_call_probe(
    tier: RedisTier, fake: FakeRedis, clock: FakeClock
) -> None:
    await fail_until_open(tier, fake)
    fake.mode = "hang"
    clock.now += RETRY_AFTER_S
    probe = asyncio.create_task(tier.get(b"k"))
    await asyncio.sleep(0)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):  # the caller's cancellation is not swallowed
        await probe
    fake.mode = "ok"
    await tier.set(b"k", b"v", 1.0)
    assert not tier.breaker_open and fake.data == {b"tritongw:k": b"v"}


async def test_a_cancelled_call_that_is_not_the_probe_leaves_the_probe_alone(
    fake: FakeRedis, clock: FakeClock
) -> None:
    tier = RedisTier("redis://unused", 10.0, retry_after_s=RETRY_AFTER_S, client=fake, clock=clock)
    fake.mode = "hang"
    early = asyncio.create_task(tier.get(b"k"))  # sent while closed, still waiting
    await asyncio.sleep(0)
    await fail_until_open(tier, fake)
    fake.mode = "hang"
    clock.now += RETRY_AFTER_S
    probe = asyncio.create_task(tier.get(b"k"))
    await asyncio.sleep(0)
    early.cancel()
    with pytest.raises(asyncio.CancelledError):
        await early
    calls = fake.calls
    assert await tier.get(b"k") is None and fake.calls == calls  # still one probe at a time
    assert tier.stats()["skipped"] == 1
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)


async def test_calls_beyond_max_connections_are_skipped_not_queued(fake: FakeRedis) -> None:
    tier = RedisTier("redis://unused", 1.0, client=fake, max_connections=4)
    fake.mode = "hang"
    waiting = [asyncio.create_task(tier.get(b"k")) for _ in range(4)]
    await asyncio.sleep(0)
    start = time.perf_counter()
    assert await tier.get(b"k") is None
    await tier.set(b"k", b"v", 1.0)
    assert time.perf_counter() - start < 0.1
    assert fake.calls == 4 and tier.stats()["skipped"] == 2
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    fake.mode = "ok"
    await tier.set(b"k", b"v", 1.0)  # the slots are free again
    assert fake.data == {b"tritongw:k": b"v"}
    assert not tier.breaker_open  # busy is not down


def test_a_straggler_failing_while_the_probe_runs_lets_no_second_probe(clock: FakeClock) -> None:
    breaker = Breaker(retry_after_s=2.0, open_after=1, clock=clock)
    breaker.failed()
    clock.now += 2.0
    assert breaker.allow()  # the probe
    breaker.failed()  # a call sent before the breaker opened fails late
    clock.now += 2.0
    assert not breaker.allow()  # the probe still runs: nobody else
    breaker.failed(probe=True)
    assert not breaker.allow()  # open again, for retry_after_s
    clock.now += 2.0
    assert breaker.allow()


def test_breaker_on_its_own(clock: FakeClock) -> None:
    breaker = Breaker(retry_after_s=2.0, open_after=2, clock=clock)
    breaker.failed()
    assert breaker.allow() and not breaker.is_open
    breaker.failed()
    assert breaker.is_open and not breaker.allow()
    clock.now += 2.0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # nobody else while it runs
    breaker.abandoned()
    assert breaker.allow()
    breaker.succeeded()
    assert not breaker.is_open and breaker.allow() and breaker.allow()


# --- closing ------------------------------------------------------------------------------------


async def test_close_closes_the_client_once_and_later_calls_are_skipped(tier: RedisTier, fake: FakeRedis) -> None:
    await tier.close()
    await tier.close()
    assert fake.closed
    assert await tier.get(b"k") is None
    await tier.set(b"k", b"v", 1.0)
    assert fake.calls == 0 and tier.stats()["skipped"] == 2


async def test_close_never_raises(tier: RedisTier, fake: FakeRedis) -> None:
    fake.mode = "refuse"
    await tier.close()
    assert fake.closed


def test_a_malformed_url_fails_at_start() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RedisTier("http://localhost:6379", TIMEOUT_S)


def test_constructing_connects_to_nothing() -> None:
    tier = RedisTier("redis://127.0.0.1:1/0", TIMEOUT_S)  # nothing listens there
    assert tier.stats()["errors"] == 0
