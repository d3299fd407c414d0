"""Single-flight: identical requests in flight share one computation.

The first request for a key starts the computation as a task of its own; every request for
that key while it runs (the first included) waits for the task through ``asyncio.shield``.
So a waiter that goes away (its client disconnected, its deadline passed) cancels only its own
wait, never the computation the others wait for; a failure reaches every waiter as the same
error (each gets its own copy, with its own traceback); and the computation is told, through
``abandoned()``, when nobody waits any more (every waiter cancelled or its client gone), so the
batcher can drop it before it is sent.
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
    task: asyncio.Task[T] | None = None
    # One entry per waiter: how to tell whether its client has gone (None: it cannot tell).
    waiters: list[Gone | None] = field(default_factory=list)

    def abandoned(self) -> bool:
        return all(g is not None and g() for g in self.waiters)


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[bytes, _Flight[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def do(self, key: bytes, compute: Compute[T], gone: Gone | None = None) -> tuple[T, bool]:
        """The result for ``key`` and whether it was shared with an earlier request. ``gone``
        tells whether this waiter's client has left (a cancelled waiter leaves by itself)."""
        flight = self._flights.get(key)
        shared = flight is not None
        if flight is None:
            flight = _Flight()
            flight.task = asyncio.ensure_future(compute(flight.abandoned))
            self._flights[key] = flight
            new = flight
            flight.task.add_done_callback(lambda task: self._done(key, new, task))
        flight.waiters.append(gone)
        try:
            return await asyncio.shield(flight.task), shared  # type: ignore[arg-type]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise copy.copy(exc).with_traceback(None) from None
        finally:
            flight.waiters.remove(gone)

    def _done(self, key: bytes, flight: _Flight[T], task: asyncio.Task[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody waited for is not an asyncio warning
