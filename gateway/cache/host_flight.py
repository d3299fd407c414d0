"""Single flight across the worker processes of one host, on the host tier's claims.

``flight.py`` makes identical requests in one worker share one computation. With several
workers, identical requests that reach two of them at once would still be computed by each;
here the first worker to claim the key (``HostStore.claim``) computes it, and the others
follow: they poll the host tier for its answer, which the computing worker writes there before
it lets go of the claim. Only the leader of each worker's own flight takes part, so a worker
has at most one poller per key, whatever the number of its waiting requests.

A follower's wait ends with:

* the answer, found in the host tier: shared with the request's whole flight ("coalesced");
* the leader's error, when its computation failed with an error about the request or the model
  (``SHARED_ERRORS``: Triton's answer, a bad request, an unknown model, an upstream timeout):
  every follower gets the same status and message. Errors of the leader's own worker (its queue
  full, its shutdown) and a leader whose clients all left end the claim without an error;
* nothing: the claim ended without an answer in the host tier (as above, or the answer too large
  for it), its worker died, or it ran past its ``until``; then the follower claims the key in
  turn and computes it (or follows whoever claimed it first);
* its own flight's waiters all gone (``ClientGone``), or a cancellation.

No wait is unbounded: a claim lasts as long as one computation may take (``lifetime``), and a
follower checks, at each poll, that the leader's process is still alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway import errors
from gateway.cache.host import FAILED, HostStore
from gateway.errors import ClientGone, GatewayError

T = TypeVar("T")

# Errors about the request or the model, which any worker computing it would meet too: shared
# with the followers. The rest (Unavailable: one worker's queue full or its shutdown) are not.
SHARED_ERRORS = (errors.UpstreamError, errors.BadRequest, errors.NotFound, errors.GatewayTimeout)
FAILURE_S = 1.0  # how long a failure stays readable for the followers that poll for it
POLL_FIRST_S = 0.001
POLL_MAX_S = 0.01


def _error(kind: str, status: int, message: str) -> GatewayError:
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, GatewayError)):
        cls = GatewayError
    return cls(message, status)


class HostFlight:
    """``do``: compute a key once for all the workers that share ``host``."""

    def __init__(self, host: HostStore, clock: Callable[[], float], lifetime: float) -> None:
        self._host = host
        self._clock = clock
        self._lifetime = lifetime

    async def do(
        self,
        key: bytes,
        fetch: Callable[[], T | None],
        compute: Callable[[], Awaitable[T]],
        abandoned: Callable[[], bool],
    ) -> tuple[T, bool]:
        """The result for ``key`` and whether another worker computed it. ``fetch``: the host
        tier's entry for the key, or None; ``compute``: computes the key and writes its entry
        to the host tier (waiting for the log's lock) before it returns."""
        host = self._host
        delay = POLL_FIRST_S
        while True:
            now = self._clock()
            holder = host.claim(key, now + self._lifetime, now)
            if holder is None:
                break
            while holder is not None and holder.state != FAILED:
                found = fetch()
                if found is not None:
                    return found, True
                if abandoned():
                    raise ClientGone("the client disconnected")
                await asyncio.sleep(delay)
                delay = min(2 * delay, POLL_MAX_S)
                holder = host.look(key, self._clock())
            if holder is not None:
                raise _error(holder.kind, holder.status, holder.message)
            found = fetch()  # the claim ended, perhaps with the answer written just before
            if found is not None:
                return found, True
        # This worker computes the key. Another may have ended its claim between this worker's
        # look in the host tier and its claim: look once more.
        found = fetch()
        if found is not None:
            host.release(key)
            return found, True
        try:
            result = await compute()
        except SHARED_ERRORS as exc:
            host.fail(key, self._clock() + FAILURE_S, exc.status, type(exc).__name__, exc.message)
            raise
        finally:
            host.release(key)  # after fail(): a no-op, the claim is no longer computing
        return result, False
