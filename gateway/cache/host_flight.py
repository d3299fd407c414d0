"""Single flight across the worker processes of one host, on the host tier's claims.

``flight.py`` makes identical requests in one worker share one computation. With several
workers, identical requests that reach two of them at once would still be computed by each;
here the first worker to claim the key (``HostStore.claim``) computes it, and the others
follow: they poll the host tier for its answer, which the computing worker writes there before
it lets go of the claim. Only the leader of each worker's own flight takes part, so a worker
has at most one poller per key, whatever the number of its waiting requests.

A follower's wait ends with:

* the answer, found in the host tier: shared with the request's whole flight ("followed");
* the leader's error, when its computation failed with an error about the request itself
  (``shared_error``: Triton's 4xx answer, an upstream timeout): every follower gets the same
  status and message;
* the claim's end without an answer in the tier (``ENDED``: the answer too large for the log,
  a version dropped meanwhile, any other error, such as the leader worker's own queue being
  full or its shutdown, or its clients all gone): each follower computes the key itself, at
  once;
* the claim gone (its worker died, stopped renewing it, or ran past ``lifetime``): the follower
  claims the key in turn (or follows whoever claimed it first);
* its own flight's waiters all gone (``ClientGone``), or a cancellation.

No wait is unbounded. A claim is a lease of ``LEASE_S``, which its worker's event loop renews
every ``RENEW_S`` while the computation runs, for at most ``lifetime`` (as long as one
computation may take). A worker that dies lets go at once (a follower checks the leader's
process at each poll); one whose event loop stalls (stopped, stuck in a call) stops renewing,
and its followers take over within ``LEASE_S``. A lease that lapses under a leader that is
merely slow costs one computation more, never a wrong answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.cache.host import COMPUTING, ENDED, FAILED, UNCLAIMED, Claim, HostStore, Unclaimed
from gateway.errors import ClientGone, GatewayError, GatewayTimeout, UpstreamError, missing_model, rebuilt

T = TypeVar("T")

END_S = 1.0  # how long a failure or an end stays readable for the followers polling for it
POLL_FIRST_S = 0.0005
POLL_MAX_S = 0.002
CLAIM_TRIES = 100  # tries of a claim while another worker changes the claims (microseconds each)
LEASE_S = 2.0  # a claim lapses this long after its worker last renewed it...
RENEW_S = 0.5  # ...which it does this often while it computes

# How the result came: another worker computed it, it was in the host tier when this worker
# claimed the key, or this worker computed it.
FOLLOWED, FOUND, COMPUTED = "followed", "found", "computed"


def shared_error(exc: BaseException) -> bool:
    """Whether a computation's error is about the request itself, so that every worker
    computing it would meet it too: Triton's 4xx answers (but for a model it does not hold,
    which depends on each worker's view of the fleet) and upstream timeouts. Not the leader
    worker's own state: its queue full or its shutdown (``Unavailable``), its clients gone, a
    5xx of its own."""
    if isinstance(exc, GatewayTimeout):
        return True
    return isinstance(exc, UpstreamError) and 400 <= exc.status < 500 and not missing_model(exc)


class HostFlight:
    """``do``: compute a key once for all the workers that share ``host``."""

    def __init__(self, host: HostStore, clock: Callable[[], float], lifetime: float) -> None:
        self._host = host
        self._clock = clock
        self._lifetime = lifetime
        self._held: dict[bytes, float] = {}  # keys this worker claimed: the last time to renew them to
        self._renewing: asyncio.Task[None] | None = None

    async def do(
        self,
        key: bytes,
        fetch: Callable[[], T | None],
        compute: Callable[[bool], Awaitable[tuple[T, bool]]],
        abandoned: Callable[[], bool],
    ) -> tuple[T, str]:
        """The result for ``key`` and how it came (``FOLLOWED``, ``FOUND``, ``COMPUTED``).
        ``fetch``: the host tier's entry for the key, or None. ``compute(claimed)``: computes
        the key and returns the result and whether it is now in the host tier; ``claimed``:
        this worker holds the key's claim, so it writes its entry there even if it has to wait
        for the log's lock."""
        host = self._host
        delay = POLL_FIRST_S
        while True:
            holder = await self._claim(key)
            if holder is UNCLAIMED:  # nobody follows this computation: nothing to hold or wait for
                return (await compute(False))[0], COMPUTED
            if holder is None:
                break
            assert isinstance(holder, Claim)
            while holder is not None and holder.state == COMPUTING:
                found = fetch()
                if found is not None:
                    return found, FOLLOWED
                if abandoned():
                    raise ClientGone("the client disconnected")
                await asyncio.sleep(delay)
                delay = min(2 * delay, POLL_MAX_S)
                holder = host.look(key, self._clock())
            if holder is not None and holder.state == FAILED:
                error = rebuilt(holder.kind, holder.message, holder.status)
                error.shared = True  # another worker's computation failed: counted there
                raise error
            found = fetch()  # written just before the claim ended
            if found is not None:
                return found, FOLLOWED
            if holder is not None and holder.state == ENDED:  # no answer to share: compute it
                return (await compute(False))[0], COMPUTED
            # The claim is gone (its worker died, or past its time): claim the key in turn.
        self._hold(key)
        try:
            # Another worker may have ended its claim between this worker's look in the host
            # tier and its claim: look once more.
            found = fetch()
            if found is not None:
                host.release(key)
                return found, FOUND
            result, stored = await compute(True)
        except BaseException as exc:
            if shared_error(exc):
                assert isinstance(exc, GatewayError)
                host.fail(key, self._clock() + END_S, exc.status, type(exc).__name__, exc.message)
            else:
                host.end(key, self._clock() + END_S)
            raise
        finally:
            self._held.pop(key, None)
        if stored:
            host.release(key)
        else:
            host.end(key, self._clock() + END_S)
        return result, COMPUTED

    def _hold(self, key: bytes) -> None:
        """Renew the claim on ``key`` while this worker computes it, up to ``lifetime``."""
        self._held[key] = self._clock() + self._lifetime
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        while self._held:
            await asyncio.sleep(RENEW_S)
            now = self._clock()
            self._host.renew({key: min(now + LEASE_S, last) for key, last in self._held.items()})

    def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            self._renewing = None

    async def _claim(self, key: bytes) -> Claim | Unclaimed | None:
        """``HostStore.claim``: the other worker's live claim, or None: this worker holds the
        key's claim now. ``UNCLAIMED`` where none could be taken (no room in its bucket, the
        segment closed, or the claims still changing after ``CLAIM_TRIES``): computed without."""
        host = self._host
        for _ in range(CLAIM_TRIES):
            now = self._clock()
            try:
                return host.claim(key, now + min(LEASE_S, self._lifetime), now)
            except BlockingIOError:
                await asyncio.sleep(0)
        host.unclaimed += 1
        return UNCLAIMED
