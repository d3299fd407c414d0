"""Single-flight: identical requests in flight share one computation.

The first request for a key (the leader) starts the computation; every request for that key
while it runs (a follower) waits on a future of its own. So a follower that goes away (its
client disconnected, its deadline passed) cancels only its own wait; a failure reaches every
waiter as the same error (each follower gets its own copy, with its own traceback); and the
computation is told, through ``abandoned()``, when nobody waits any more (every waiter
cancelled or its client gone), so the batcher can drop it before it is sent. A request joining
after that check, before the dropped computation has ended, is not told its client left: the
computation starts again for it (and any others still waiting), in a task of its own.

Where the computation runs depends on whether the leader may give up before it ends:

* a leader with a deadline (``detach=True``) could be cancelled when it passes, so the
  computation runs in a task of its own, which the leader waits for like a follower: the others
  keep their computation, whatever happens to the leader;
* any other leader computes in its own task: no task and no extra event-loop turns per miss.
  Only a shutdown cancels such a leader; if followers still wait then, the computation starts
  again for them in a task of its own (which the shutdown ends in turn, with a 503 for them).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gateway.errors import ClientGone, GatewayError, Unavailable

T = TypeVar("T")
Compute = Callable[[Callable[[], bool]], Awaitable[T]]


Gone = Callable[[], bool]


def _own_copy(error: BaseException) -> BaseException:
    """A copy of ``error`` without its traceback, for one waiter (the error itself if it cannot
    be copied: sharing it beats leaving a waiter without an answer)."""
    try:
        return copy.copy(error).with_traceback(None)
    except Exception:
        return error


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
                future.set_exception(_own_copy(error))


# No waiter: a follower's own ``gone`` may be None (a server that cannot tell), so not that.
_NOBODY = object()


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[bytes, _Flight[T]] = {}
        self._detached: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: bytes) -> bool:
        """Whether a computation of ``key`` is in flight."""
        return key in self._flights

    async def close(self, timeout: float) -> None:
        """At shutdown: let computations running in tasks of their own finish for up to
        ``timeout`` seconds, then cancel the rest (their waiters get 503), so none is left
        pending when the event loop closes."""
        if self._detached:
            await asyncio.wait(set(self._detached), timeout=timeout)
        left = set(self._detached)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)

    async def do(
        self,
        key: bytes,
        compute: Compute[T],
        gone: Gone | None = None,
        detach: bool = False,
        on_follow: Callable[[bool], None] | None = None,
    ) -> tuple[T, bool]:
        """The result for ``key`` and whether it was shared with an earlier request. ``gone``
        tells whether this waiter's client has left (a cancelled waiter leaves by itself);
        ``detach``: this waiter may be cancelled before the computation ends (it has a
        deadline), so if it starts one, the computation runs in a task of its own;
        ``on_follow``: called (with True) when this waiter waits for an earlier request's
        computation."""
        flight = self._flights.get(key)
        if flight is not None:
            if on_follow is not None:
                on_follow(True)
            try:
                return await self._follow(flight, gone), True
            except GatewayError as exc:
                exc.shared = True  # this follower's own copy of the leader's error
                raise
        flight = self._flights[key] = _Flight()
        if detach:
            self._detach(key, flight, compute)
            return await self._follow(flight, gone), False
        flight.waiters.append(gone)
        try:
            result = await compute(flight.abandoned)
        except Exception as exc:
            if isinstance(exc, ClientGone) and self._rejoined(flight, gone):
                self._detach(key, flight, compute)  # for those who came after it was dropped
            else:
                self._close(key, flight, None, exc)
            raise
        except BaseException:  # the leader was cancelled (shutdown): not the computation's failure
            flight.waiters.remove(gone)
            if all(f.done() for f in flight.followers):
                self._end(key, flight)
            else:
                self._detach(key, flight, compute)
            raise
        self._close(key, flight, result, None)
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

    @staticmethod
    def _rejoined(flight: _Flight[T], leaving: Gone | None | object) -> bool:
        """After the computation was dropped for want of waiters (``ClientGone``): whether
        anyone waits still (joined since), ``leaving`` (the leader's client, gone; ``_NOBODY``
        for a computation in a task of its own, whose waiters are all followers) aside."""
        if leaving is not _NOBODY and leaving in flight.waiters:
            flight.waiters.remove(leaving)
        return any(not f.done() for f in flight.followers) and not flight.abandoned()

    def _end(self, key: bytes, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def _close(self, key: bytes, flight: _Flight[T], result: T | None, error: BaseException | None) -> None:
        """The computation is over: later requests start a new one, and every follower gets
        its answer."""
        self._end(key, flight)
        flight.settle(result, error)

    def _detach(self, key: bytes, flight: _Flight[T], compute: Compute[T]) -> None:
        """Run the flight's computation in a task of its own, which settles every waiter."""

        async def run() -> None:
            while True:
                try:
                    result = await compute(flight.abandoned)
                except Exception as exc:
                    if isinstance(exc, ClientGone) and self._rejoined(flight, _NOBODY):
                        continue  # dropped for want of waiters, and someone has come since
                    self._close(key, flight, None, exc)
                    return
                self._close(key, flight, result, None)
                return

        def stopped(task: asyncio.Task[None]) -> None:
            self._detached.discard(task)
            if task.cancelled():  # the gateway is stopping (perhaps before the task ever ran)
                self._close(key, flight, None, Unavailable("the gateway is shutting down"))

        try:
            task = asyncio.get_running_loop().create_task(run())
        except RuntimeError:  # no loop left to compute in: the gateway is stopping
            self._close(key, flight, None, Unavailable("the gateway is shutting down"))
            return
        self._detached.add(task)  # a hard reference until done
        task.add_done_callback(stopped)
