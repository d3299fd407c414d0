"""Sending each upstream request to one instance of the fleet, and retrying on another.

For every batch (or lone request) the router:

1. takes the **candidates**: instances that are up (live, not ejected) and have the model
   version READY in their repository index. When no instance is known to hold it (an index not
   fetched yet, a version published a moment ago), every up instance is a candidate and Triton's
   own answer decides;
2. drops candidates already at ``max_inflight_per_instance`` requests in flight; if that leaves
   none, waits for a slot (within the request's deadline; without one, at most
   ``request_timeout_s``): requests meanwhile gather in the batcher, which is where batching pays;
3. lets ``balancer.choose`` pick one (weighted least outstanding, power of two choices);
4. sends the request with a time limit of ``request_timeout_s`` or the deadline's remainder,
   whichever is shorter, and records the outcome on the instance (outlier ejection);
5. retries once (``max_tries``) on a different instance, if the deadline allows, when no answer
   came (connection refused or broken), the attempt timed out, Triton answered 5xx, or Triton
   said it does not hold the model version or has it loading (the instance is then taken off
   that version until its next repository index). Any other 4xx is the client's and is final. When every try
   fails, the client gets the last upstream error.

Reads (model metadata and config, statistics, readiness: small GETs Triton answers in
milliseconds) are not infer requests: each attempt gets a short time limit, ``read_timeout``
(a tenth of ``request_timeout_s``, between 1 and 5 s: ``read_timeout_for``), so that a hung
instance (accepting connections, answering nothing) costs a read seconds, not the 30 s an
inference may take. ``get`` tries the next instance holding the model when no answer came, the
attempt timed out or Triton answered 5xx, within the read's deadline (without one, at most
``request_timeout_s`` in all); ``get_all`` asks every live instance at once and answers with
those that answered in time, naming the others (``FleetAnswers.missing``, and a log line).
A failed read counts against no instance: the health probes judge them.

An attempt that failed counts against its instance (consecutive failures eject it), but for
Triton's own 5xx answer, or one the gateway cannot decode (``ModelError``): a model that raises
(or has an output the gateway cannot read) fails on every instance, and
counting that would eject healthy instances, for every model, until none was left. Such an
answer counts against its instance only once another instance has answered the same request;
when the next instance fails it too, it is the model's error, counted against no instance and
not tried further.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gateway import balancer, sequences
from gateway.batcher import BatchResult, NothingToSend, Prepare
from gateway.errors import GatewayError, GatewayTimeout, ModelError, Unavailable, UpstreamError, missing_model
from gateway.instances import EjectionPolicy, Instance
from gateway.sequences import Affinity
from gateway.tensors import RequestedOutput, Tensor
from gateway.upstream.client import InstanceUnreachable, RawResponse, TritonClient

__all__ = ["FleetAnswers", "Instance", "Router", "read_timeout_for"]

log = logging.getLogger(__name__)

# A read's attempt limit, as a share of request_timeout_s, and its bounds (read_timeout_for).
READ_TIMEOUT_SHARE = 0.1
READ_TIMEOUT_MIN_S = 1.0
READ_TIMEOUT_MAX_S = 5.0


def read_timeout_for(request_timeout_s: float, health_timeout_s: float = 0.0) -> float:
    """The time limit of one attempt of a read (metadata, config, statistics): a tenth of an
    infer attempt's, between 1 and 5 s, never less than a health probe is given nor more than
    an infer attempt."""
    share = min(READ_TIMEOUT_MAX_S, max(READ_TIMEOUT_MIN_S, health_timeout_s, request_timeout_s * READ_TIMEOUT_SHARE))
    return min(request_timeout_s, share)


class FleetAnswers(list[RawResponse]):
    """The answers of every live instance to one read (``Router.get_all``), and ``missing``:
    the instances (their urls) that gave none in time, left out of them."""

    def __init__(self, answers: Iterable[RawResponse] = (), missing: Iterable[str] = ()) -> None:
        super().__init__(answers)
        self.missing = list(missing)


class Router:
    def __init__(
        self,
        instances: Iterable[Instance],
        client: TritonClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tries: int = 2,
        max_inflight_per_instance: int = 8,
        attempt_timeout: float = 30.0,
        read_timeout: float | None = None,
        ejection: EjectionPolicy = EjectionPolicy(),
        active_request_bias: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.instances = list(instances)
        self._client = client
        self._clock = clock
        self._max_tries = max_tries
        self._cap = max_inflight_per_instance
        self._attempt_timeout = attempt_timeout
        self.read_timeout = read_timeout_for(attempt_timeout) if read_timeout is None else read_timeout
        self.ejection = ejection
        self._bias = active_request_bias
        self._rng = rng or random.Random()
        self._waiters: list[asyncio.Future[None]] = []

    # -- membership and state -------------------------------------------------------------------

    def set_instances(self, instances: Sequence[Instance]) -> None:
        """A new member list (DNS discovery). Requests in flight keep their instance objects."""
        self.instances = list(instances)
        self._wake()

    def routable_count(self) -> int:
        return sum(1 for i in self.instances if i.routable)

    def served(self) -> set[tuple[str, str]]:
        """Every (model, version) an up instance holds ready."""
        return {(m, v) for i in self.instances if i.routable for m, versions in (i.models or {}).items() for v in versions}

    def snapshot(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [i.snapshot(now) for i in self.instances]

    def newest_version(self, model: str) -> str:
        """The version a request naming none is pinned to: the newest READY on every up instance
        that holds the model; "" if none is known.

        So a version published to the repository becomes the default only once it is loaded
        across the fleet (not on the first instance to load it, which would then take all the
        traffic), every answer meanwhile comes from one version (left to itself, each Triton
        instance would answer with its own newest), and only instances holding it serve it.
        If the instances hold no version in common, the newest READY anywhere is used."""
        common: set[int] | None = None
        newest_anywhere = None
        for instance in self.instances:
            if not instance.routable or instance.models is None:
                continue
            versions = instance.models.get(model)
            if not versions:
                continue
            numbers = {int(v) for v in versions if v.isdigit()}
            common = numbers if common is None else common & numbers
            top = instance.newest(model)
            if top is not None and (newest_anywhere is None or top > newest_anywhere):
                newest_anywhere = top
        if common:
            return str(max(common))
        return "" if newest_anywhere is None else str(newest_anywhere)

    def index(self) -> list[dict[str, str]]:
        """The fleet's repository index, as Triton's ``/v2/repository/index`` lists its own: each
        model version an up instance holds, READY where one routes it, else in the state of
        its first instance that holds it back (LOADING while loading or warming up, UNLOADING
        while draining, UNAVAILABLE once failed, with the reason), by name and version."""
        ready: set[tuple[str, str]] = set()
        held: dict[tuple[str, str], str] = {}
        for instance in self.instances:
            if not instance.routable:
                continue
            ready.update((m, v) for m, versions in (instance.models or {}).items() for v in versions)
            for key, why in instance.withheld.items():
                held.setdefault(key, why)
        entries = [{"name": m, "version": v, "state": "READY"} for m, v in ready]
        for (model, version), why in held.items():
            if (model, version) not in ready:
                state = _HELD_STATES.get(why, "UNAVAILABLE")
                entries.append({"name": model, "version": version, "state": state, "reason": why})
        return sorted(entries, key=lambda e: (e["name"], _version_number(e["version"])))

    def available(self, model: str, version: str, sequence: bytes | None = None) -> bool:
        """Whether an up instance holds the version, or may (its repository index is unknown);
        for a later request of a ``sequence``, also while the version is being drained."""
        if any(i.routable and i.holds(model, version) is not False for i in self.instances):
            return True
        return sequence is not None and bool(self._draining(model, version, ()))

    # -- choice ---------------------------------------------------------------------------------

    def candidates(self, model: str | None, version: str, exclude: Sequence[Instance] = ()) -> list[Instance]:
        up = [i for i in self.instances if i.routable and i not in exclude]
        if model is None:
            return up
        holding = [i for i in up if i.holds(model, version) is not False]
        if holding:
            return holding
        if any(i.holds(model, version) is not False for i in self.instances if i not in exclude):
            return []  # it is held only by instances that are down or ejected, or tried already
        # Nobody is known to hold it: let Triton answer (404), unless the repository sync holds
        # it back (loading, warming up, failed; for "", the model): then it is sent nowhere.
        return [] if self.withheld_reason(model, version) is not None else up

    def _holders(self, model: str | None, version: str) -> list[Instance]:
        """The instances holding the version (or not known not to), up or not."""
        return [i for i in self.instances if model is None or i.holds(model, version) is not False]

    def _draining(self, model: str | None, version: str, exclude: Sequence[Instance]) -> list[Instance]:
        """The up instances where the version is loaded but drained before it is unloaded."""
        if model is None or not version:
            return []
        return [i for i in self.instances if i.routable and i not in exclude and i.drains(model, version)]

    def withheld_reason(self, model: str, version: str) -> str | None:
        """Why a version (or for "", the model) is not routed, when the repository sync holds it back."""
        for instance in self.instances:
            why = instance.withholds(model, version)
            if why is not None:
                return why
        return None

    def pick(
        self, model: str | None = None, version: str = "", exclude: Sequence[Instance] = (), affinity: Affinity | None = None
    ) -> Instance | None:
        """An instance with a free slot, or None if every candidate is at its cap (with
        ``affinity``, the sequence's own instance). Raises Unavailable when there is no
        candidate at all."""
        candidates = self.candidates(model, version, exclude)
        if affinity is not None:
            candidates, holders = self._sequence_places(model, version, exclude, affinity, candidates)
            if model is not None and not affinity.strict:
                # A start: not where the model is about to be reloaded, if it can be helped...
                candidates = [i for i in candidates if model not in i.quiescing] or candidates
                reloading = [i for i in candidates if model in i.reloading]
                if reloading and len(reloading) == len(candidates):  # ...and never where it is being reloaded
                    raise sequences.gone(affinity.name, f"model '{model}' is being reloaded on every instance that could start it")
                candidates = [i for i in candidates if i not in reloading]
            candidates = affinity.narrow(candidates, holders, exclude)
        if not candidates:
            raise self._no_holder(model, version)
        free = [i for i in candidates if i.outstanding < self._cap]
        return balancer.choose(free, self._rng, self._clock(), self._bias) if free else None

    async def _acquire(
        self, model: str | None, version: str, exclude: Sequence[Instance], deadline: float | None, affinity: Affinity | None = None
    ) -> Instance:
        """An instance with a free slot, waiting for one until the deadline; a request without
        one waits at most ``attempt_timeout`` (as long as one attempt may take), never forever."""
        if deadline is None:
            limit = self._clock() + self._attempt_timeout
            why = f"no Triton instance had a free slot within {self._attempt_timeout:g} s (upstream.request_timeout_s)"
        else:
            limit, why = deadline, "deadline passed while waiting for a free Triton instance"
        while True:
            instance = self.pick(model, version, exclude, affinity)
            if instance is not None:
                instance.begin(self._clock())
                return instance
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(max(0.0, limit - self._clock())):
                    await waiter
            except TimeoutError:
                raise GatewayTimeout(why) from None
            finally:
                waiter.cancel()  # timed out or cancelled: no longer a waiter (a no-op once woken)
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _release(self, instance: Instance) -> None:
        instance.end(self._clock())
        self.wake()

    def wake(self) -> None:
        """Let the requests waiting for a slot look again: a slot was freed, or an instance may
        have become routable (re-admitted, up again, a version admitted)."""
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # -- requests -------------------------------------------------------------------------------

    def _limit(self, deadline: float | None) -> tuple[float, bool]:
        """The time limit of the next attempt, and whether it is the client's deadline."""
        if deadline is None:
            return self._attempt_timeout, False
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise GatewayTimeout("deadline passed before the request could be sent upstream")
        if remaining < self._attempt_timeout:
            return remaining, True
        return self._attempt_timeout, False

    async def infer(
        self,
        model: str,
        version: str,
        inputs: list[Tensor] | Prepare,
        parameters: dict[str, Any] | None = None,
        deadline: float | None = None,
        outputs: list[RequestedOutput] | None = None,
        affinity: Affinity | None = None,
    ) -> BatchResult:
        """Serve ``inputs``: tensors, or a batcher's ``prepare`` called once an instance is
        ready for them (see batcher.Dispatch); ``outputs``: the outputs to ask Triton for, with
        their classification (None: every output); ``affinity``: a request of a sequence, sent
        to the sequence's instance (``gateway.sequences``), which it records in ``served``."""
        tried: list[Instance] = []
        suspect: tuple[Instance, str] | None = None  # answered a ModelError: its fault if another answers
        while True:
            instance = await self._acquire(model, version, tried, deadline, affinity)
            tried.append(instance)
            try:
                limit, is_deadline = self._limit(deadline)
                tensors = inputs() if callable(inputs) else inputs
                if tensors is None:
                    raise NothingToSend()
            except BaseException:
                self._release(instance)  # never sent: an expired or abandoned request is not forwarded
                raise
            instance.started(model, version)
            sent = self._clock()
            try:
                result = await self._client.infer(instance.url, model, version, tensors, parameters, limit, outputs)
            except ModelError as exc:
                if missing_model(exc):  # Triton's 503 "not at ready state": routing's business
                    self._failed(instance, exc, model, version, is_deadline)
                    if affinity is not None:
                        raise
                    if not self._may_retry(model, version, tried, deadline):
                        raise self._left(model, version, exc) from None
                    continue
                if suspect is not None or affinity is not None:  # the model's error; or a sequence's, sent once
                    instance.record_success()  # it answered
                    raise
                suspect = (instance, exc.message)
                if not self._may_retry(model, version, tried, deadline):
                    raise
            except GatewayError as exc:
                retry = self._failed(instance, exc, model, version, is_deadline)
                if affinity is not None:
                    retry = affinity.retries(exc)
                if not retry or not self._may_retry(model, version, tried, deadline, affinity):
                    if affinity is not None and affinity.unreachable and retry:
                        raise sequences.gone(affinity.name, "the Triton instance holding its state is unavailable") from None
                    if affinity is None and isinstance(exc, UpstreamError) and missing_model(exc):
                        raise self._left(model, version, exc) from None
                    raise
            else:
                instance.record_answer(self._clock() - sent)
                if affinity is not None:
                    affinity.served = instance.url
                    instance.sequence_answered(model, version, affinity.key, affinity.ends, self._clock(), affinity.idle_s)
                if suspect is not None:  # another instance answered what it failed: its fault
                    self._count(suspect[0], suspect[1], self._clock())
                return result
            finally:
                instance.finished(model, version)
                self._release(instance)

    def _failed(self, instance: Instance, exc: GatewayError, model: str, version: str, is_deadline: bool) -> bool:
        """Record a failed attempt on its instance; return whether another instance may succeed."""
        now = self._clock()
        if isinstance(exc, InstanceUnreachable):
            if exc.connect_failed:
                instance.mark_down(exc.message, now)  # nothing listens: down until a probe says up
            else:
                self._count(instance, exc.message, now)
            return True
        if isinstance(exc, GatewayTimeout):
            if is_deadline:
                return False  # the client's deadline, not the instance's fault
            self._count(instance, exc.message, now)
            return True
        if isinstance(exc, UpstreamError):
            if missing_model(exc):
                instance.forget(model, version)
                return True
            if exc.status >= 500:
                self._count(instance, exc.message, now)
                return True
            instance.record_success()  # it answered, correctly: the request was at fault
        return False

    def _count(self, instance: Instance, message: str, now: float) -> None:
        if instance.record_failure(message, now, self.instances, self.ejection):
            log.warning(
                "instance %s ejected for %.0f s after %d consecutive failures; the last: %s",
                instance.url, instance.ejected_until - now, instance.consecutive_failures, message,
            )

    def _sequence_places(
        self, model: str | None, version: str, exclude: Sequence[Instance], affinity: Affinity, candidates: list[Instance]
    ) -> tuple[list[Instance], list[Instance]]:
        """For a request of a sequence: the instances it may be sent to now (``candidates``,
        those the version is routed to) and those that may hold the version. A later request's
        version may be draining: still there for it, on every instance where it is."""
        holders = self._holders(model, version)
        if model is not None and affinity.strict:
            holders += [i for i in self.instances if i.drains(model, version)]
            candidates = candidates + self._draining(model, version, exclude)
        return candidates, holders

    def _may_retry(
        self, model: str | None, version: str, tried: list[Instance], deadline: float | None, affinity: Affinity | None = None
    ) -> bool:
        if deadline is not None and deadline <= self._clock():
            return False
        if affinity is not None:  # a sequence's request: along its ranking, however long
            routable, holders = self._sequence_places(model, version, tried, affinity, self.candidates(model, version, exclude=tried))
            return affinity.next(routable, holders, tried) is not None
        if len(tried) >= self._max_tries:
            return False
        return bool(self.candidates(model, version, exclude=tried))

    def _left(self, model: str | None, version: str, error: UpstreamError) -> Unavailable:
        """A request whose version turned out gone from the instance it was sent to (Triton:
        unknown, or not at ready state: unloaded or reloading there), with no other to try: 503,
        as for a version no instance holds, not Triton's error."""
        return Unavailable(f"{self._no_holder(model, version).message}: the instance tried no longer holds it ({error.message})")

    def _no_holder(self, model: str | None, version: str) -> Unavailable:
        """No instance to send a request for ``model`` to: why, where the sync withholds it."""
        why = self.withheld_reason(model, version) if model is not None else None
        what = "" if model is None else f" holding model '{model}'" + (f" version {version}" if version else "")
        return Unavailable(f"no healthy Triton instance{what} is available" + (f" ({why})" if why else ""))

    def _readers(self, model: str | None, version: str, tried: Sequence[Instance]) -> list[Instance]:
        return self.candidates(model, version, exclude=tried) or self._draining(model, version, tried)

    async def _read(self, instance: Instance, path: str, limit: float) -> RawResponse:
        """One attempt of a read, bounded here too (whatever the client does with ``limit``);
        a refused connection marks the instance down."""
        try:
            async with asyncio.timeout(limit):
                return await self._client.get(instance.url, path, limit)
        except TimeoutError:
            raise GatewayTimeout(f"Triton instance did not answer within {limit:.3g} s") from None
        except InstanceUnreachable as exc:
            if exc.connect_failed:
                instance.mark_down(exc.message, self._clock())
            raise

    async def get(
        self, path: str, timeout: float | None = None, model: str | None = None, version: str = "", deadline: float | None = None
    ) -> RawResponse:
        """A read-only request (metadata, config) to an instance that holds ``model`` (when
        given; a version being drained is still there for its sequences under way). Each attempt
        has ``timeout`` (default ``read_timeout``), at most what is left before ``deadline``
        (default: ``request_timeout_s`` from now); when no answer came, the attempt timed out
        or Triton answered 5xx, the next instance is asked, while time is left. Answers the
        last 5xx, or raises the last failure, when none is left. Not counted against the
        per-instance cap, nor against the instances (the health probes judge them)."""
        per_try = self.read_timeout if timeout is None else timeout
        until = self._clock() + self._attempt_timeout if deadline is None else deadline
        tried: list[Instance] = []
        candidates = self._readers(model, version, tried)
        if not candidates:
            raise self._no_holder(model, version)
        while True:
            remaining = until - self._clock()
            if remaining <= 0:
                raise GatewayTimeout(f"no Triton instance answered {path} in time")
            instance = balancer.choose(candidates, self._rng, self._clock(), self._bias)
            tried.append(instance)
            failure: RawResponse | GatewayError
            try:
                failure = answer = await self._read(instance, path, min(per_try, remaining))
            except GatewayError as exc:  # no answer, too late, or a malformed one (502)
                if exc.status < 500:
                    raise
                failure = exc
            else:
                if answer.status < 500:
                    return answer
            candidates = self._readers(model, version, tried)
            if not candidates or until <= self._clock():
                if isinstance(failure, RawResponse):
                    return failure
                raise failure
            why = f"answered {failure.status}" if isinstance(failure, RawResponse) else failure.message
            log.info("GET %s: Triton instance %s failed (%s); asking another", path, instance.url, why)

    async def get_all(self, path: str, timeout: float | None = None) -> FleetAnswers:
        """The same request to every live instance (statistics are summed across the fleet),
        each given ``timeout`` (default ``read_timeout``): the answers that came in time, and
        the instances left out (``FleetAnswers.missing``, also logged). Raises Unavailable when
        no instance answered."""
        live = [i for i in self.instances if i.live]
        if not live:
            raise Unavailable("no healthy Triton instance is available")
        limit = self.read_timeout if timeout is None else timeout
        results = await asyncio.gather(*(self._read(i, path, limit) for i in live), return_exceptions=True)
        answers = FleetAnswers()
        failures = []
        for instance, result in zip(live, results, strict=True):
            if isinstance(result, RawResponse):
                answers.append(result)
                continue
            if not isinstance(result, Exception):
                raise result  # cancelled
            if not isinstance(result, GatewayError):
                log.error("GET %s on %s failed", path, instance.url, exc_info=result)  # a bug
            answers.missing.append(instance.url)
            failures.append(f"{instance.url}: {result}")
        # The urls go to the log, not in errors: those reach clients.
        if failures:
            log.warning("GET %s: no answer from %d of %d instances (%s)", path, len(failures), len(live), "; ".join(failures))
        if not answers:
            raise Unavailable(f"no Triton instance answered {path}")
        return answers


# Triton's model states for the reasons the repository sync holds a loaded version back.
_HELD_STATES = {"loading": "LOADING", "warming up": "LOADING", "draining": "UNLOADING"}


def _version_number(version: str) -> int:
    return int(version) if version.isdigit() else -1
