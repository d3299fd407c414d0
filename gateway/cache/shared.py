"""The optional shared tier of the response cache: Redis, so that a fleet of gateway replicas
(or the worker processes of one) share cached results. Off unless configured.

The shared tier is an optimisation, never a dependency: whatever Redis does, a request must not
wait on it longer than it saves, and must never fail because of it. Hence:

- **Bounded wait.** Every call runs under ``asyncio.timeout(timeout_s)`` (a few milliseconds:
  about what one upstream round trip costs). Past it the caller goes on as if it missed; a
  failed or late ``set`` is simply lost. Errors never leave this module: ``get`` answers None,
  ``set`` returns. redis-py's own retries are turned off, so one call is one attempt.
- **Circuit breaker.** A dead Redis would otherwise cost every request the whole bounded wait
  (a host that drops packets), or a failed connect (a refused port). After
  ``OPEN_AFTER_FAILURES`` consecutive connection failures or timeouts the tier stops trying for
  ``retry_after_s``: calls then return at once, counted as "skipped". When that time is over, one
  call goes through as a probe (the others keep skipping until it ends): if it succeeds the tier
  is back, otherwise it waits ``retry_after_s`` again. So the tier recovers on its own when Redis
  comes back, and a dead Redis costs one probe per ``retry_after_s``, not one wait per request.
  An error *answer* from Redis (out of memory, a wrong type) shows Redis is reachable: it is
  counted as an error but does not open the breaker.
- **Bounded pool.** At most ``max_connections`` (``MAX_CONNECTIONS``) commands in flight per
  process, hence as many connections. A call that finds them all busy is skipped at once rather
  than queued: Redis is already behind, and waiting would only add latency to the request.
  (redis-py's blocking pool would queue it, and cost about 18 µs more CPU per call; its plain pool
  would raise "Too many connections", which must not read as Redis being down.)

Skipped calls ("skipped": breaker open, all connections busy, or the tier closed) touch nothing.
One call costs about 100-150 µs of CPU in redis-py (with hiredis; measured on loopback, where
it also takes about that long): the tier pays off for results that cost Triton more than that.

Keys are the caller's bytes behind ``prefix`` (one Redis can then serve other users too);
values are the caller's bytes; entries expire in Redis itself (``SET key value PX ms``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

MAX_CONNECTIONS = 64
# Consecutive connection failures or timeouts that open the breaker: one late answer on a busy
# host must not switch the tier off, a dead Redis is noticed within a few requests.
OPEN_AFTER_FAILURES = 3
CLOSE_TIMEOUT_S = 1.0
STAT_NAMES = ("hits", "misses", "errors", "timeouts", "skipped")


class SharedTier(Protocol):
    async def get(self, key: bytes) -> bytes | None:
        """The value, or None on a miss, on any error, or when the bounded wait expires."""
        ...

    async def set(self, key: bytes, value: bytes, ttl_s: float) -> None:
        """Store for ttl_s seconds; never raises, waits at most the bounded wait."""
        ...

    async def close(self) -> None: ...

    def stats(self) -> dict[str, int]:
        """Counters: hits, misses, errors, timeouts, skipped (calls not sent: breaker open, all
        connections busy, or closed)."""
        ...


class RedisClient(Protocol):
    """The part of redis.asyncio.Redis the tier uses (tests substitute a fake)."""

    async def get(self, name: bytes) -> Any: ...

    async def set(self, name: bytes, value: bytes, *, px: int) -> Any: ...

    async def aclose(self) -> None: ...


class Breaker:
    """Closed, open for ``retry_after_s`` after ``open_after`` consecutive failures, then
    half-open: one probe call at a time until one succeeds (closed) or fails (open again)."""

    def __init__(
        self, retry_after_s: float, open_after: int = OPEN_AFTER_FAILURES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._retry_after_s = retry_after_s
        self._open_after = open_after
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None  # None: closed
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> bool:
        """Whether a call may go to Redis now; a True while open makes that call the probe."""
        if self._open_until is None:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        self._failures = 0
        self._open_until = None
        self._probing = False

    def failed(self, probe: bool = False) -> None:
        """A call failed; ``probe``: the one let through while open (it reopens at once)."""
        self._failures += 1
        if probe or self._failures >= self._open_after:
            self._open_until = self._clock() + self._retry_after_s
        if probe:
            self._probing = False

    def abandoned(self) -> None:
        """The probe ended without telling anything (cancelled from outside): let another go."""
        self._probing = False


class _Failed:
    """Marks a call that did not reach an answer (None is a valid answer: a miss)."""


_FAILED = _Failed()


class RedisTier:
    """The shared tier on one Redis (``redis://host:port/db``, ``rediss://``, ``unix://``).

    The URL is parsed here (a malformed one raises ValueError at start); no connection is made
    until the first call."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        prefix: bytes = b"tritongw:",
        retry_after_s: float = 1.0,
        *,
        client: RedisClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._timeout_s = timeout_s
        self._prefix = prefix
        self._client = client if client is not None else _redis_client(url, max_connections)
        self._breaker = Breaker(retry_after_s, clock=clock)
        self._counts = dict.fromkeys(STAT_NAMES, 0)
        self._closed = False
        self._max_inflight = max_connections
        self._inflight = 0

    async def get(self, key: bytes) -> bytes | None:
        value = await self._call(lambda: self._client.get(self._prefix + key))
        if isinstance(value, _Failed):
            return None
        self._counts["hits" if value is not None else "misses"] += 1
        return value  # type: ignore[no-any-return]

    async def set(self, key: bytes, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        px = max(1, round(ttl_s * 1000))
        await self._call(lambda: self._client.set(self._prefix + key, value, px=px))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._client.aclose()
        except Exception:  # closing a broken connection may fail; nothing to do
            pass

    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def breaker_open(self) -> bool:
        return self._breaker.is_open

    async def _call(self, command: Callable[[], Awaitable[Any]]) -> Any:
        """One Redis command within the bounded wait; its answer, or _FAILED (counted)."""
        if self._closed or self._inflight >= self._max_inflight or not self._breaker.allow():
            self._counts["skipped"] += 1
            return _FAILED
        probe = self._breaker.is_open  # let through while open: this call is the probe
        self._inflight += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await command()
        except (TimeoutError, RedisTimeoutError):
            return self._failed("timeouts", down=True, probe=probe)
        except (RedisConnectionError, OSError):
            return self._failed("errors", down=True, probe=probe)
        except asyncio.CancelledError:
            if probe:
                self._breaker.abandoned()
            raise
        except Exception:  # Redis answered with an error: reachable, not cached
            return self._failed("errors", down=False, probe=probe)
        finally:
            self._inflight -= 1
        self._breaker.succeeded()
        return answer

    def _failed(self, counter: str, down: bool, probe: bool) -> _Failed:
        self._counts[counter] += 1
        if down:
            self._breaker.failed(probe)
        else:
            self._breaker.succeeded()
        return _FAILED


def _redis_client(url: str, max_connections: int) -> redis.asyncio.Redis:
    # One attempt per call (redis-py retries with backoff by default): the breaker decides when
    # to try again. The pool never runs out: the tier holds calls to max_connections in flight.
    pool = redis.asyncio.ConnectionPool.from_url(url, max_connections=max_connections, retry=Retry(NoBackoff(), 0))
    return redis.asyncio.Redis.from_pool(pool)
