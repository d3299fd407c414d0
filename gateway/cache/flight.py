"""Single-flight: identical requests in flight share one computation.

The first request for a key (the leader) runs the computation in its own task; every request
for that key while it runs (a follower) waits on a future of its own, which the leader
resolves. So a follower that goes away (its client disconnected, its deadline passed) cancels
only its own wait; a failure reaches every waiter as the same error (each follower gets its own
copy, with its own traceback); and the computation is told, through ``abandoned()``, when
nobody waits any more (every waiter cancelled or its client gone), so the batcher can drop it
before it is sent.

The leader computing in its own task spares every miss a task and two event-loop turns. If the
leader itself is cancelled (its deadline passed) while followers still wait, its computation is
cancelled with it and started again in a task of its own for them: the only case in which a key
is computed twice, and then only because the leader gave up first.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
Compute = Callable[[Callable[[], bool]], Awaitable[T]]


Gone = Callable[[], bool]


@dataclass(slots=True, eq=False)
class _Flight(Generic[T]):
    # One entry per waiter: how to tell whether its client has gone (None: it cannot tell).
    waiters: list[Gone | None] = field(default_factory=list)
    followers: list[asyncio.Future[T]] = field(default_factory=list)

    def abandoned(self) -> bool:
        return all(g is not None and g() for g in self.waiters)

    def settle(self, result: T | None, error: BaseException | None) -> None:
        for future in list(self.followers):
            if future.done():
                continue
            if error is None:
                future.set_result(result)  # type: ignore[arg-type]
            else:
                future.set_exception(copy.copy(error).with_traceback(None))

    def cancel(self) -> None:
        for future in list(self.followers):
            future.cancel()


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[bytes, _Flight[T]] = {}
        self._handed_over: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._flights)

    async def do(self, key: bytes, compute: Compute[T], gone: Gone | None = None) -> tuple[T, bool]:
        """The result for ``key`` and whether it was shared with an earlier request. ``gone``
        tells whether this waiter's client has left (a cancelled waiter leaves by itself)."""
        flight = self._flights.get(key)
        if flight is not None:
            return await self._follow(flight, gone), True
        flight = self._flights[key] = _Flight([gone])
        try:
            result = await compute(flight.abandoned)
        except Exception as exc:
            self._end(key, flight)
            flight.settle(None, exc)
            raise
        except BaseException:  # the leader was cancelled: not the computation's failure
            flight.waiters.remove(gone)
            self._hand_over(key, flight, compute)
            raise
        self._end(key, flight)
        flight.settle(result, None)
        return result, False

    async def _follow(self, flight: _Flight[T], gone: Gone | None) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        flight.followers.append(future)
        flight.waiters.append(gone)
        try:
            return await future
        finally:
            flight.waiters.remove(gone)
            flight.followers.remove(future)

    def _end(self, key: bytes, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def _hand_over(self, key: bytes, flight: _Flight[T], compute: Compute[T]) -> None:
        """The leader gave up: compute again, in a task of its own, for the followers still
        waiting (or end the flight if none is)."""
        if all(f.done() for f in flight.followers):
            self._end(key, flight)
            return

        async def finish() -> None:
            try:
                result = await compute(flight.abandoned)
            except Exception as exc:
                self._end(key, flight)
                flight.settle(None, exc)
                return
            except BaseException:  # cancelled in turn (shutdown): so are the followers
                self._end(key, flight)
                flight.cancel()
                raise
            self._end(key, flight)
            flight.settle(result, None)

        try:
            task = asyncio.get_running_loop().create_task(finish())
        except RuntimeError:  # no loop left to compute in (the gateway is stopping)
            self._end(key, flight)
            flight.cancel()
            return
        self._handed_over.add(task)  # a hard reference until done
        task.add_done_callback(self._handed_over.discard)
