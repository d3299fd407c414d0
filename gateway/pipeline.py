"""The inference path after decoding: check the request against the model, batch it, route it,
and keep only the outputs the caller asked for.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gateway import deadlines, sequences
from gateway.batcher import Batcher, BatchPolicy, BatchResult, NothingToSend, Prepare
from gateway.cache import ANY, FRESH, Freshness, ResponseCache, cacheable, request_key
from gateway.config import BatchingConfig
from gateway.errors import ClientGone, GatewayTimeout, NotCached, NotFound, Unavailable, UpstreamError, missing_model
from gateway.host_batch import HostBatching
from gateway.models import ModelInfo, check_request
from gateway.rollout import Rollouts
from gateway.router import Router
from gateway.tensors import InferRequest, InferResponse, RequestedOutput, Tensor, bf16_values
from gateway.upstream.metadata import MetadataCache

log = logging.getLogger(__name__)


# Shadow requests in flight at most; beyond, requests are not mirrored (shadows never queue up).
MAX_SHADOWS_IN_FLIGHT = 64


def _classes(request: InferRequest) -> list[RequestedOutput] | None:
    """A request's outputs if it asks for an output's top classes (Triton computes them, so
    they are asked for per request), else None: a batch asks Triton for every output."""
    outputs = request.outputs
    return outputs if outputs is not None and any(o.class_count for o in outputs) else None


def _set_following(following: list[bool], follows: bool) -> None:
    """The cache's ``on_follow`` for a request with a deadline: whether it waits for an
    identical request's computation (its timeout is then that computation's, counted once)."""
    following[:] = [True] if follows else []


class InferencePipeline:
    def __init__(
        self,
        batching: BatchingConfig,
        router: Router,
        metadata: MetadataCache,
        clock: Callable[[], float] = time.monotonic,
        cache: ResponseCache | None = None,
        rollouts: Rollouts | None = None,
        cpu_busy: Callable[[], float | None] | None = None,
    ) -> None:
        """``cpu_busy``: the host's CPUs' busy share now (``HostCpu.busy``), for the batchers'
        ``hold_cpu_busy``; None: unknown, and a hold applies as configured."""
        self._batching = batching
        self._router = router
        self.metadata = metadata
        self._clock = clock
        self.cpu_busy = cpu_busy
        self.cache = cache
        self.rollouts = rollouts or Rollouts()
        self._shadows: set[asyncio.Future[None]] = set()
        # With several workers and [batching] host_wide: hands batched requests to the worker
        # that batches their model version for the whole host (``gateway.host_batch``).
        self.host_batch: HostBatching | None = None
        self.batchers: dict[tuple[str, str], Batcher] = {}
        self._policy_basis: dict[tuple[str, str], tuple[int, int]] = {}
        # Sequences of stateful models: the version (for requests naming none) and the instance
        # each is pinned to (``gateway.sequences``).
        self._sequence_versions: sequences.Pins[tuple[str, bool]] = sequences.Pins(clock)
        self._sequence_instances: sequences.Pins[str] = sequences.Pins(clock)

    def _policy(self, model: str, info: ModelInfo, routable: int) -> BatchPolicy:
        b = self._batching.for_model(model)
        # Slots scale with the fleet: a batch in flight per healthy instance keeps every instance
        # busy, while requests that arrive meanwhile gather into the next batches.
        return BatchPolicy(
            max_rows=min(b.max_batch_size, info.max_batch_size),
            max_delay=b.max_queue_delay_ms / 1000,
            max_inflight=b.max_inflight_batches * max(1, routable),
            max_queue_rows=b.max_queue_rows,
            hold=b.hold_ms / 1000,
            hold_cpu_busy=b.hold_cpu_busy,
        )

    def _batcher(self, model: str, version: str, info: ModelInfo) -> Batcher:
        key = (model, version)
        batcher = self.batchers.get(key)
        # What the policy depends on besides the fixed config: it is rebuilt only when that changes.
        basis = (self._router.routable_count(), info.max_batch_size)
        if batcher is not None and self._policy_basis.get(key) == basis:
            return batcher
        self._policy_basis[key] = basis
        policy = self._policy(model, info, basis[0])
        if batcher is None:

            async def dispatch(prepare: Prepare, deadline: float | None) -> BatchResult:
                return await self._router.infer(model, version, prepare, None, deadline)

            name = f"{model}" + (f"/{version}" if version else "")
            batcher = self.batchers[key] = Batcher(name, dispatch, policy, self._clock, self.cpu_busy)
        elif batcher.policy != policy:
            # The fleet changed size, or the model's max_batch_size changed (config reloaded).
            batcher.policy = policy
        return batcher

    async def infer(
        self,
        request: InferRequest,
        deadline: float | None = None,
        gone: Callable[[], bool] | None = None,
        freshness: Freshness = ANY,
        sticky: dict[bytes, bytes] | None = None,
        chosen: tuple[str, bool] | None = None,
    ) -> InferResponse:
        """Serve one request; ``deadline`` (monotonic seconds) from the client's header, ``gone``
        tells whether the client has disconnected (see ``deadlines`` and ``batcher``);
        ``freshness``: what the client's Cache-Control allows of a cached answer
        (``cache.freshness``; ``use`` False bypasses the cache);
        ``sticky`` holds the request's headers a rollout pins clients by; ``chosen``, for a
        request naming no version, is ``choose_version``'s answer the caller already has."""
        params = request.parameters
        if params and deadlines.PARAMETER in params:  # once: a version chosen again keeps it
            deadline = deadlines.earliest(deadline, deadlines.from_parameter(params.pop(deadlines.PARAMETER), self._clock()))
        if not request.version:
            return await self._gateway_chosen(request, deadline, gone, freshness, sticky, chosen)
        return await self._serve(request, deadline, gone, freshness)

    async def _serve(
        self, request: InferRequest, deadline: float | None, gone: Callable[[], bool] | None, freshness: Freshness
    ) -> InferResponse:
        """Serve a request whose version is decided ("" only when the fleet's is unknown), by
        its deadline (the header's and the ``timeout`` parameter's, the earlier: ``infer``)."""
        if deadline is None:
            return await self._infer(request, None, gone, freshness)
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise GatewayTimeout("the request's deadline had passed before the gateway could send it")
        following: list[bool] = []  # [True] while it waits for an identical request's computation
        try:
            async with asyncio.timeout(remaining):
                return await self._infer(request, deadline, gone, freshness, following)
        except TimeoutError:
            left = remaining * 1000  # whole ms, but for a sub-10 ms deadline ("0.5", not "0")
            error = GatewayTimeout(f"deadline passed: no answer within the {left:{'.0f' if left >= 10 else '.2g'}} ms left")
            error.shared = bool(following)  # that computation's slowness: counted once, by its own request
            raise error from None

    async def _infer(
        self,
        request: InferRequest,
        deadline: float | None,
        gone: Callable[[], bool] | None,
        freshness: Freshness,
        following: list[bool] | None = None,
    ) -> InferResponse:
        info = self.metadata.fresh(request.model, request.version) or await self.metadata.get(request.model, request.version)
        check_request(info, request)
        # The model's input order, so that clients listing inputs differently share batches.
        order = list(info.inputs)
        inputs = sorted(request.inputs, key=lambda t: order.index(t.name)) if len(request.inputs) > 1 else request.inputs
        cache = self.cache
        source, age = "", None
        if cache is not None and cache.enabled_for(request.model):
            if freshness.use and request.version and cacheable(request):
                key = request_key(request.model, request.version, inputs, _classes(request))

                async def compute(abandoned: Callable[[], bool]) -> BatchResult:
                    # Shared by every identical request in flight: no one request's deadline;
                    # dropped unsent once all of them have gone (see cache.flight).
                    return await self._compute(request, info, inputs, None, abandoned)

                on_follow = None if following is None else functools.partial(_set_following, following)
                result, source, age = await cache.get_or_compute(
                    request.model, request.version, key, compute, gone, deadline is not None, on_follow, freshness
                )
            elif freshness.only_if_cached:
                if not freshness.use:
                    why = "it asks for a fresh answer too"
                elif not request.version:
                    why = "the fleet does not say yet which version serves it, and answers are kept per version"
                else:
                    why = "parameters that change the answer are never cached"
                raise NotCached(f"no stored answer may answer this request ({why}); Cache-Control: only-if-cached")
            else:
                result, source = await self._compute(request, info, inputs, deadline, gone), "bypass"
        elif freshness.only_if_cached:
            raise NotCached(f"model '{request.model}' has the response cache off; Cache-Control: only-if-cached")
        else:
            result = await self._compute(request, info, inputs, deadline, gone)
        produced = {t.name for t in result.outputs}
        missing = [o.name for o in request.outputs or () if o.name not in produced]
        if missing:
            raise UpstreamError(f"model '{request.model}' did not produce the requested output(s) {missing}", status=502)
        return InferResponse(
            request.model, result.version, result.outputs, id=request.id, parameters=result.parameters, cache=source, age=age
        )

    async def _gateway_chosen(
        self,
        request: InferRequest,
        deadline: float | None,
        gone: Callable[[], bool] | None,
        freshness: Freshness,
        sticky: dict[bytes, bytes] | None,
        chosen: tuple[str, bool] | None = None,
    ) -> InferResponse:
        """A request naming no version: the gateway picks one. If that version leaves the fleet
        between the choice and the answer (removed, unloaded everywhere), the request is not the
        client's mistake: the gateway picks again, once. A request of a sequence keeps the
        version its sequence has (``gateway.sequences``)."""
        model, params = request.model, request.parameters
        sequence = sequences.sequence_of(params)
        if sequence is not None:
            chosen = None  # chosen before the request was read: not by its sequence
            if not sequences.starts(params):
                pinned = self._sequence_versions.get(model, "", sequence)
                if pinned is not None and not self._router.available(model, pinned[0], sequence):
                    why = f"version {pinned[0]}, which it started on, is no longer served"
                    raise sequences.gone(sequences.shown(params), why)
            else:
                self._sequence_versions.forget(model, "", sequence)  # a new sequence: chosen afresh
        for attempt in (1, 2):
            if attempt == 1 and chosen is not None:
                version, via_rollout = chosen
                if via_rollout:
                    self.rollouts.count(model, version)
            else:
                version, via_rollout = self._version(model, sticky, sequence)
            if attempt == 2 and version == request.version:
                raise vanished
            request.version = version
            try:
                if via_rollout:
                    response = await self._observed(request, deadline, gone, freshness)
                else:
                    response = await self._serve(request, deadline, gone, freshness)
            except (NotFound, Unavailable, UpstreamError) as exc:
                if attempt == 2 or (isinstance(exc, UpstreamError) and not missing_model(exc)):
                    raise
                vanished = exc
                continue
            if sequence is not None:
                if sequences.ends(params):
                    self._sequence_versions.forget(model, "", sequence)
                else:
                    self._sequence_versions.pin(model, "", sequence, (version, via_rollout))
            return response
        raise AssertionError("unreachable")

    def choose_version(
        self, model: str, sticky: dict[bytes, bytes] | None, sequence: bytes | None = None
    ) -> tuple[str, bool]:
        """The version for a request naming none, and whether the rollout chose it: the
        rollout's choice if the model has one (its stable version when the chosen canary is
        held nowhere), else the fleet's newest. When neither the choice nor the stable version
        is held anywhere (removed from the repository and draining, not loaded yet, or a
        version the rollout file names that the fleet never had), the fleet's newest answers:
        a drop-in change fails no request. A request of a ``sequence`` gets the version pinned
        to it while the fleet holds it, else the rollout draws from the sequence. Not counted:
        ``infer(chosen=...)`` counts it."""
        router = self._router
        if sequence is not None:
            pinned = self._sequence_versions.get(model, "", sequence)
            if pinned is not None and router.available(model, pinned[0], sequence):
                return pinned
        chosen = self.rollouts.choose(model, sticky, sequence)
        if not chosen:
            return router.newest_version(model), False
        if router.available(model, chosen):
            return chosen, True
        stable = self.rollouts.stable(model)
        if chosen != stable and router.available(model, stable):
            return stable, True
        newest = router.newest_version(model)
        return (newest, False) if newest else (stable, True)

    def canary_share(self, model: str) -> float:
        """The share of the model's requests naming no version that go to its canary now: the
        rollout's share in force, or 0 while no instance holds the canary (``choose_version``
        then serves them from stable)."""
        state = self.rollouts.state(model)
        if state is None or not state.share_in_force:
            return 0.0
        return state.share_in_force if self._router.available(model, state.canary) else 0.0

    def rollout_view(self) -> dict[str, Any]:
        """The rollouts' view (``/v2/gateway/rollout``), each model's with the canary's share in
        force (``canary_share_in_force``) beside the rollout's own share (``canary_share``: the
        file's, the ramp's step or the operator's; 0 after a rollback)."""
        view = self.rollouts.snapshot()
        for model, state in view["models"].items():
            state["canary_share_in_force"] = self.canary_share(model)
        return view

    def observe_fleet(self) -> None:
        """Tell the rollout each model's newest version on the fleet (after every health round,
        and once before serving): under the rollout file's ``[defaults]``, a model without a
        table of its own gets a canary for each newer version the fleet has everywhere
        (``Rollouts.observe``)."""
        rollouts, router = self.rollouts, self._router
        if rollouts.defaults is None:
            return
        models = {m for i in router.instances if i.routable for m in (i.models or {})}
        for model in sorted(models):
            rollouts.observe(model, router.newest_version(model), lambda v, m=model: router.available(m, v))

    def _version(self, model: str, sticky: dict[bytes, bytes] | None, sequence: bytes | None = None) -> tuple[str, bool]:
        version, via_rollout = self.choose_version(model, sticky, sequence)
        if via_rollout:
            self.rollouts.count(model, version)
        return version, via_rollout

    async def _observed(
        self, request: InferRequest, deadline: float | None, gone: Callable[[], bool] | None, freshness: Freshness
    ) -> InferResponse:
        """Serve a request the rollout sent to a version, and tell the rollout how it went:
        Triton's failures (5xx) and timeouts count against the version; the client's mistakes,
        Triton's 4xx about the request and the gateway's load shedding do not. As with
        answers, a failure enters the rollback windows once per computation: an identical
        request that waited for it (``shared``: in this worker or another, or whose deadline
        passed while it waited) counts for the ramp only. (A computation started by a request
        that named the version, which the rollout does not see, enters them neither as a
        success nor as a failure.)"""
        start = self._clock()
        try:
            response = await self._serve(request, deadline, gone, freshness)
        except GatewayTimeout as exc:
            self.rollouts.record(request.model, request.version, False, self._clock() - start, not exc.shared)
            raise
        except UpstreamError as exc:
            # Triton's 4xx is about the request (a sequence it does not hold, an input it
            # refuses), and "not loaded here" is routing's business: neither is the version's.
            if exc.status >= 500 and not missing_model(exc):
                self.rollouts.record(request.model, request.version, False, self._clock() - start, not exc.shared)
            raise
        computed = response.cache not in ("hit", "coalesced")
        self.rollouts.record(request.model, request.version, True, self._clock() - start, computed)
        shadow = self.rollouts.shadow_for(request.model)
        # Not a classification: the shadow answers values, which its strings cannot be compared
        # with; nor a request of a sequence: the shadow would get a part of the sequence only.
        # Nor one that asked for a stored answer only: mirroring computes.
        if (
            shadow
            and not freshness.only_if_cached
            and shadow != request.version
            and len(self._shadows) < MAX_SHADOWS_IN_FLIGHT
            and not _classes(request)
            and sequences.sequence_of(request.parameters) is None
        ):
            task = asyncio.ensure_future(self._shadow(request, shadow, response))
            self._shadows.add(task)  # a hard reference until done
            task.add_done_callback(self._shadows.discard)
        return response

    async def _shadow(self, request: InferRequest, version: str, served: InferResponse) -> None:
        """Mirror a served request to a shadow version and compare the answers; the client has
        its answer already, and nothing here can reach it."""
        stats = self.rollouts.shadow_stats(request.model)
        if stats is None:
            return
        stats.sent += 1
        mirror = InferRequest(request.model, version, request.inputs, None, None, {})
        try:
            answer = await self._serve(mirror, None, None, freshness=FRESH)
        except Exception as exc:  # a failing shadow is data, not an incident
            stats.failed += 1
            log.debug("shadow %s/%s failed: %r", request.model, version, exc)
            return
        stats.compare(_values(served.outputs), _values(answer.outputs))

    async def _compute(
        self,
        request: InferRequest,
        info: ModelInfo,
        inputs: list[Tensor],
        deadline: float | None,
        gone: Callable[[], bool] | None,
    ) -> BatchResult:
        classes = _classes(request)
        batching = self._batching.for_model(request.model)
        if info.batched and batching.enabled and not request.parameters and not classes:
            if batching.host_wide and self.host_batch is not None:
                result = await self.host_batch.submit(request.model, request.version, inputs, deadline)
                if result is not None:
                    return result
            return await self._batcher(request.model, request.version, info).submit(inputs, deadline, gone)
        # Request parameters (priority, sequence ids, custom ones) belong to one request and
        # cannot be merged, nor can a classification: such a request travels alone, parameters
        # and outputs included (Triton's own scheduler may still batch it). Like a batch, it is
        # not sent if its client left while it waited for a free instance. A request of a
        # sequence goes to its sequence's instance (``gateway.sequences``).
        model, version, params = request.model, request.version, request.parameters
        sequence = sequences.sequence_of(params) if info.stateful else None
        affinity = None
        if sequence is not None:
            start = sequences.starts(params)
            pinned = None if start else self._sequence_instances.get(model, version, sequence)
            affinity = sequences.Affinity(
                sequence, sequences.shown(params), pinned, strict=not start, ends=sequences.ends(params), idle_s=info.sequence_idle_s
            )
        sent: list[Tensor] | Prepare = inputs
        if gone is not None:

            def prepare() -> list[Tensor] | None:
                return None if gone() else inputs

            sent = prepare
        try:
            result = await self._router.infer(model, version, sent, params, deadline, classes, affinity)
        except NothingToSend:
            raise ClientGone("the client disconnected") from None
        if affinity is not None:
            if sequences.ends(params):
                self._sequence_instances.forget(model, version, affinity.key)
            elif affinity.served is not None:
                self._sequence_instances.pin(model, version, affinity.key, affinity.served)
        return result

    async def batched(self, model: str, version: str, inputs: list[Tensor], deadline: float | None) -> BatchResult:
        """Batch another worker's request for a version this worker batches for the host
        (``gateway.host_batch``): checked by that worker already, so only batched here."""
        info = self.metadata.fresh(model, version) or await self.metadata.get(model, version)
        return await self._batcher(model, version, info).submit(inputs, deadline)

    async def close(self, grace: float) -> None:
        if self._shadows:
            await asyncio.wait(self._shadows, timeout=grace)
        await asyncio.gather(*(b.close(grace) for b in self.batchers.values()))


def _values(outputs: list[Tensor]) -> dict[str, np.ndarray]:
    """Outputs by name as comparable values (a BF16 tensor holds its bits: as floats)."""
    return {t.name: bf16_values(t.data) if t.datatype == "BF16" else t.data for t in outputs}
