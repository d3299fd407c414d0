"""Instance choice, per-instance caps, failover and deadlines in the router, with a fake Triton
client (no network) and a fake clock."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import numpy as np
import pytest

from gateway.batcher import BatchResult, NothingToSend
from gateway.errors import BadRequest, GatewayTimeout, ModelError, Unavailable, UpstreamError
from gateway.instances import EjectionPolicy
from gateway.router import Instance, Router, read_timeout_for
from gateway.tensors import Tensor
from gateway.upstream.client import InstanceUnreachable, RawResponse

INPUTS = [Tensor("x", "FP32", np.zeros((1, 2), np.float32))]
MISSING = UpstreamError("Request for unknown model: 'm' version 2 is not found", status=400)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeClient:
    """Answers per instance url: an exception to raise, or None for success. ``hold`` makes
    calls wait until released."""

    def __init__(self, errors: dict[str, Exception] | None = None) -> None:
        self.errors = errors or {}
        self.calls: list[tuple[str, float | None]] = []
        self.hold: asyncio.Event | None = None
        self.hung: set[str] = set()  # reads to these never answer (kill -STOP), whatever the timeout
        self.answers: dict[str, RawResponse] = {}  # reads: the answer per url (default 200, the url)

    async def get(self, url, path, timeout=None):  # noqa: ANN001, ANN201
        self.calls.append((url, timeout))
        if url in self.hung:
            await asyncio.Event().wait()
        error = self.errors.get(url)
        if error is not None:
            raise error
        return self.answers.get(url) or RawResponse(200, url.encode())

    async def infer(self, url, model, version, inputs, parameters, timeout, outputs=None):  # noqa: ANN001, ANN201
        self.calls.append((url, timeout))
        if self.hold is not None:
            await self.hold.wait()
        error = self.errors.get(url)
        if error is not None:
            raise error
        return BatchResult(version or "1", inputs)

    @property
    def urls(self) -> list[str]:
        return [u for u, _ in self.calls]


def make_router(client: FakeClient, *instances: Instance, **kwargs) -> Router:  # noqa: ANN003
    kwargs.setdefault("rng", random.Random(0))
    return Router(list(instances), client, **kwargs)  # type: ignore[arg-type]


# -- choice ---------------------------------------------------------------------------------------


def test_only_up_instances_holding_the_version_are_candidates() -> None:
    a, b, c, d = Instance("a"), Instance("b"), Instance("c", live=False), Instance("d", ejected_until=5.0)
    a.models = {"m": frozenset({"1", "2"})}
    b.models = {"m": frozenset({"1"})}
    router = make_router(FakeClient(), a, b, c, d)
    assert router.candidates("m", "2") == [a]
    assert router.candidates("m", "1") == [a, b]
    assert router.candidates("m", "") == [a, b]
    assert router.candidates(None, "") == [a, b]


def test_when_nobody_is_known_to_hold_a_version_triton_decides() -> None:
    a, b = Instance("a"), Instance("b")  # no repository index yet
    router = make_router(FakeClient(), a, b)
    assert router.candidates("m", "7") == [a, b]
    a.models, b.models = {"m": frozenset({"1"})}, {}
    assert router.candidates("m", "7") == [a, b]  # nobody holds 7: let Triton answer (404)


def test_a_version_held_only_by_a_down_instance_is_unavailable() -> None:
    a, b = Instance("a", live=False), Instance("b")
    a.models, b.models = {"m": frozenset({"2"})}, {"m": frozenset({"1"})}
    router = make_router(FakeClient(), a, b)
    with pytest.raises(Unavailable, match="holding model 'm' version 2"):
        router.pick("m", "2")


def test_no_routable_instance_is_unavailable() -> None:
    router = make_router(FakeClient(), Instance("a", live=False))
    with pytest.raises(Unavailable):
        router.pick()


async def test_weights_split_sequential_traffic() -> None:
    client = FakeClient()
    router = make_router(client, Instance("a", weight=3), Instance("b", weight=1))
    for _ in range(200):
        await router.infer("m", "", INPUTS)
    assert client.urls.count("a") == 150 and client.urls.count("b") == 50


# -- per-instance cap -----------------------------------------------------------------------------


async def test_requests_beyond_the_per_instance_cap_wait_for_a_slot() -> None:
    client = FakeClient()
    client.hold = asyncio.Event()
    a, b = Instance("a"), Instance("b")
    router = make_router(client, a, b, max_inflight_per_instance=1)
    tasks = [asyncio.create_task(router.infer("m", "", INPUTS)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert len(client.calls) == 2 and a.outstanding == b.outstanding == 1  # the third waits
    client.hold.set()
    await asyncio.gather(*tasks)
    assert len(client.calls) == 3 and a.outstanding == b.outstanding == 0


async def test_a_deadline_passing_while_waiting_for_a_slot_is_504() -> None:
    client = FakeClient()
    client.hold = asyncio.Event()
    router = make_router(client, Instance("a"), max_inflight_per_instance=1)
    busy = asyncio.create_task(router.infer("m", "", INPUTS))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    with pytest.raises(GatewayTimeout, match="waiting for a free Triton instance"):
        await router.infer("m", "", INPUTS, deadline=router._clock() + 0.02)
    assert len(client.calls) == 1
    client.hold.set()
    await busy
    assert loop  # the waiter left no trace behind
    assert router._waiters == []


async def test_a_request_without_a_deadline_waits_for_a_slot_at_most_the_attempt_timeout() -> None:
    client = FakeClient()
    client.hold = asyncio.Event()
    router = make_router(client, Instance("a"), max_inflight_per_instance=1, attempt_timeout=0.05)
    busy = asyncio.create_task(router.infer("m", "", INPUTS))
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    with pytest.raises(GatewayTimeout, match="no Triton instance had a free slot within 0.05 s"):
        await router.infer("m", "", INPUTS)
    assert 0.04 <= asyncio.get_running_loop().time() - started < 1.0
    assert len(client.calls) == 1 and router._waiters == []
    client.hold.set()
    await busy


# -- failover -------------------------------------------------------------------------------------


async def test_a_refused_connection_marks_the_instance_down_and_retries_elsewhere() -> None:
    a, b = Instance("a"), Instance("b")
    client = FakeClient({"a": InstanceUnreachable("a: refused", connect_failed=True)})
    router = make_router(client, a, b, rng=random.Random(1))
    while not client.calls or client.urls[0] != "a":  # until a is tried first
        client.calls.clear()
        a.live = True
        await router.infer("m", "", INPUTS)
    assert client.urls == ["a", "b"] and not a.live and a.state == "down" and b.live


@pytest.mark.parametrize(
    "error",
    [
        InstanceUnreachable("a: connection reset", connect_failed=False),
        GatewayTimeout("a: no answer within the deadline"),
        UpstreamError("internal error in the model", status=502),  # Triton's 5xx
    ],
    ids=["broken-connection", "timeout", "5xx"],
)
async def test_failures_are_counted_and_retried_on_another_instance(error: Exception) -> None:
    a, b = Instance("a"), Instance("b")
    client = FakeClient({"a": error})
    router = make_router(client, a, b)
    for _ in range(20):
        await router.infer("m", "", INPUTS)
    assert a.failures == client.urls.count("a") > 0 and a.live
    assert all(client.urls[i + 1] == "b" for i, u in enumerate(client.urls) if u == "a")


async def test_consecutive_failures_eject_an_instance_which_then_gets_nothing() -> None:
    a, b = Instance("a"), Instance("b")
    client = FakeClient({"a": UpstreamError("boom", status=502)})
    router = make_router(client, a, b, ejection=EjectionPolicy(after_failures=2, base_s=5.0))
    for _ in range(30):
        await router.infer("m", "", INPUTS)
    assert a.ejected and a.ejections == 1 and client.urls.count("a") == 2


async def test_a_model_that_fails_on_every_instance_ejects_none_of_them() -> None:
    """Triton's own 5xx answer for a model that raises: the same on every instance. Counting it
    against the instances would eject healthy ones, for every model, until none was left."""
    a, b, c = Instance("a"), Instance("b"), Instance("c")
    error = ModelError("breast_cancer_mlp: the model raised", status=502)
    client = FakeClient({"a": error, "b": error, "c": error})
    router = make_router(client, a, b, c, ejection=EjectionPolicy(after_failures=2, base_s=5.0), max_tries=3)
    for _ in range(30):
        with pytest.raises(ModelError, match="the model raised"):
            await router.infer("m", "", INPUTS)
    assert len(client.calls) == 60  # two instances failed each alike: not tried on a third
    assert not any(i.ejected for i in (a, b, c)) and a.failures == b.failures == c.failures == 0


async def test_a_model_error_where_another_instance_answers_counts_against_the_instance() -> None:
    a, b = Instance("a"), Instance("b")
    client = FakeClient({"a": ModelError("CUDA error: an illegal memory access", status=502)})
    router = make_router(client, a, b, ejection=EjectionPolicy(after_failures=2, base_s=5.0))
    for _ in range(30):
        await router.infer("m", "", INPUTS)  # b answers every one
    assert a.ejected and a.failures == 2 and client.urls.count("a") == 2


async def test_a_lone_model_error_is_not_counted() -> None:
    a = Instance("a")
    client = FakeClient({"a": ModelError("the model raised", status=502)})
    router = make_router(client, a, Instance("b", live=False))
    with pytest.raises(ModelError):
        await router.infer("m", "", INPUTS)
    assert a.failures == 0 and a.consecutive_failures == 0


async def test_a_4xx_is_final_and_not_counted_against_the_instance() -> None:
    a, b = Instance("a"), Instance("b")
    error = UpstreamError("unexpected shape for input 'x'", status=400)
    client = FakeClient({"a": error, "b": error})
    router = make_router(client, a, b)
    with pytest.raises(UpstreamError, match="unexpected shape"):
        await router.infer("m", "", INPUTS)
    assert len(client.calls) == 1 and a.failures == b.failures == 0


async def test_when_every_try_fails_the_client_sees_the_upstream_error() -> None:
    client = FakeClient({"a": UpstreamError("a failed", status=502), "b": UpstreamError("b failed", status=502)})
    router = make_router(client, Instance("a"), Instance("b"), Instance("c", live=False))
    with pytest.raises(UpstreamError) as err:
        await router.infer("m", "", INPUTS)
    assert len(client.calls) == 2 and err.value.message == f"{client.urls[-1]} failed"


async def test_max_tries_one_never_retries() -> None:
    client = FakeClient({"a": UpstreamError("a failed", status=502), "b": UpstreamError("b failed", status=502)})
    router = make_router(client, Instance("a"), Instance("b"), max_tries=1)
    with pytest.raises(UpstreamError):
        await router.infer("m", "", INPUTS)
    assert len(client.calls) == 1


async def test_an_instance_without_the_version_is_taken_off_it_and_another_serves() -> None:
    a, b = Instance("a"), Instance("b")
    a.models = b.models = {"m": frozenset({"1", "2"})}
    client = FakeClient({"a": MISSING})
    router = make_router(client, a, b)
    for _ in range(10):
        await router.infer("m", "2", INPUTS)
    assert client.urls.count("a") <= 1 and a.models == {"m": frozenset({"1"})} and a.failures == 0


def not_ready() -> ModelError:
    """Triton's answer for a version it is loading or unloading: 503 UNAVAILABLE."""
    error = ModelError("Request for unknown model: 'm' version 2 is not at ready state", status=502)
    error.triton_status = 503
    return error


async def test_a_version_triton_says_is_not_at_ready_state_is_taken_off_that_instance_uncounted() -> None:
    a, b = Instance("a"), Instance("b")
    a.models = b.models = {"m": frozenset({"1", "2"})}
    client = FakeClient({"a": not_ready()})
    router = make_router(client, a, b, ejection=EjectionPolicy(after_failures=2))
    for _ in range(10):
        await router.infer("m", "2", INPUTS)
    assert client.urls.count("a") <= 1 and a.models == {"m": frozenset({"1"})}
    assert a.failures == 0 and not a.ejected


@pytest.mark.parametrize("error", [not_ready, lambda: MISSING], ids=["not at ready state", "unknown"])
async def test_a_version_gone_from_the_only_instance_holding_it_is_a_503_not_tritons_error(error: Callable[[], UpstreamError]) -> None:
    a = Instance("a")
    a.models = {"m": frozenset({"1", "2"})}
    router = make_router(FakeClient({"a": error()}), a)
    with pytest.raises(Unavailable) as raised:
        await router.infer("m", "2", INPUTS)
    assert raised.value.status == 503 and a.models == {"m": frozenset({"1"})}
    assert "no healthy Triton instance holding model 'm' version 2 is available: the instance tried no longer holds it" in raised.value.message
    with pytest.raises(Unavailable, match="no healthy Triton instance holding model 'm' version 2"):
        await router.infer("m", "2", INPUTS)  # known gone now: refused before any attempt


@pytest.mark.parametrize("how", ["re-admitted", "up again", "version admitted"])
async def test_a_request_waiting_for_a_slot_takes_an_instance_that_becomes_routable(how: str) -> None:
    client = FakeClient()
    client.hold = asyncio.Event()
    a, b = Instance("a"), Instance("b")
    a.set_index({"m": frozenset({"1"})})
    b.set_index({"m": frozenset({"1"})})
    if how == "re-admitted":
        b.ejected_until = 0.0
    elif how == "up again":
        b.live = False
    else:
        b.withhold("m", "1", "warming up")
    router = make_router(client, a, b, max_inflight_per_instance=1, clock=time.monotonic)
    busy = asyncio.create_task(router.infer("m", "1", INPUTS))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(router.infer("m", "1", INPUTS, deadline=time.monotonic() + 5))
    await asyncio.sleep(0.01)
    assert client.urls == ["a"] and not waiting.done()
    if how == "version admitted":
        b.admit("m", "1")
    else:
        b.probed(True, time.monotonic())
    router.wake()  # as the fleet monitor does after each health round
    await asyncio.sleep(0.01)
    assert client.urls == ["a", "b"]  # sent to b while a is still busy
    client.hold.set()
    await asyncio.wait_for(asyncio.gather(busy, waiting), 1)


async def test_each_instance_times_the_requests_it_answered_and_only_those() -> None:
    clock = Clock()

    class TimedClient(FakeClient):
        async def infer(self, url, model, version, inputs, parameters, timeout, outputs=None):  # noqa: ANN001, ANN201
            clock.now += 0.003 if url == "a" else 0.2  # the time its answer takes
            return await super().infer(url, model, version, inputs, parameters, timeout, outputs)

    a, b = Instance("a"), Instance("b")
    client = TimedClient({"b": UpstreamError("the model failed", status=500)})
    router = make_router(client, a, b, clock=clock)
    for _ in range(4):
        await router.infer("m", "", INPUTS)
    # b failed whatever it was sent (each retried on a): only a's answers are timed.
    assert a.answer_times[-1] == pytest.approx(0.003 * 4)
    assert sum(a.answer_times[:-1]) == 4 and a.answer_times[3] == 4  # the (2.5 ms, 5 ms] bucket
    assert sum(b.answer_times[:-1]) == 0 and b.requests > 0


# -- deadlines ------------------------------------------------------------------------------------


async def test_an_expired_request_is_never_sent() -> None:
    clock = Clock()
    client = FakeClient()
    router = make_router(client, Instance("a"), clock=clock)
    with pytest.raises(GatewayTimeout):
        await router.infer("m", "", INPUTS, deadline=clock.now - 0.001)
    assert client.calls == [] and router.instances[0].outstanding == 0


async def test_an_attempt_gets_the_shorter_of_its_timeout_and_the_deadline() -> None:
    clock = Clock()
    client = FakeClient()
    router = make_router(client, Instance("a"), clock=clock, attempt_timeout=2.0)
    await router.infer("m", "", INPUTS, deadline=clock.now + 0.5)
    await router.infer("m", "", INPUTS, deadline=clock.now + 10)
    await router.infer("m", "", INPUTS)
    assert [t for _, t in client.calls] == [0.5, 2.0, 2.0]


async def test_a_timeout_at_the_clients_deadline_is_not_retried_nor_held_against_the_instance() -> None:
    clock = Clock()
    a, b = Instance("a"), Instance("b")
    client = FakeClient({"a": GatewayTimeout("a: late"), "b": GatewayTimeout("b: late")})
    router = make_router(client, a, b, clock=clock, attempt_timeout=5.0)
    with pytest.raises(GatewayTimeout):
        await router.infer("m", "", INPUTS, deadline=clock.now + 1.0)
    assert len(client.calls) == 1 and a.failures == b.failures == 0


async def test_no_retry_once_the_deadline_has_passed() -> None:
    clock = Clock()

    class LateClient(FakeClient):
        async def infer(self, url, *args):  # noqa: ANN001, ANN002, ANN201
            clock.now += 3.0  # the failed attempt used up the deadline
            return await super().infer(url, *args)

    client = LateClient({"a": UpstreamError("a failed", status=502), "b": UpstreamError("b failed", status=502)})
    router = make_router(client, Instance("a"), Instance("b"), clock=clock)
    with pytest.raises(UpstreamError):
        await router.infer("m", "", INPUTS, deadline=clock.now + 2.0)
    assert len(client.calls) == 1


def test_bad_request_is_not_a_router_error() -> None:
    assert not issubclass(BadRequest, UpstreamError)


async def test_inputs_are_prepared_only_once_an_instance_is_free_and_may_be_withdrawn() -> None:
    client = FakeClient()
    client.hold = asyncio.Event()
    a = Instance("a")
    router = make_router(client, a, max_inflight_per_instance=1)
    busy = asyncio.create_task(router.infer("m", "", INPUTS))
    await asyncio.sleep(0)
    prepared: list[bool] = []

    def withdrawn() -> None:
        prepared.append(True)
        return None  # every request of the batch was dropped while it waited

    waiting = asyncio.create_task(router.infer("m", "", withdrawn))
    await asyncio.sleep(0.01)
    assert prepared == []  # not while the instance is at its cap
    client.hold.set()
    await busy
    with pytest.raises(NothingToSend):
        await waiting
    assert prepared == [True] and len(client.calls) == 1 and a.outstanding == 0


def test_the_default_version_is_the_newest_ready_on_every_up_instance_holding_the_model() -> None:
    a, b, c = Instance("a"), Instance("b"), Instance("c", live=False)
    a.models = {"m": frozenset({"1", "2", "10"})}
    b.models = {"m": frozenset({"1", "10"}), "other": frozenset({"4"})}
    c.models = {"m": frozenset({"11"})}  # down: does not count
    router = make_router(FakeClient(), a, b, c)
    assert router.newest_version("m") == "10" and router.newest_version("other") == "4"
    b.forget("m", "10")  # b has not loaded 10 (yet): 10 is not the default until it has
    assert router.newest_version("m") == "1"
    b.models = {"m": frozenset({"3"})}  # nothing in common: the newest anywhere
    assert router.newest_version("m") == "10"
    assert router.newest_version("unknown") == ""
    assert make_router(FakeClient(), Instance("x")).newest_version("m") == ""  # no index yet


def test_a_withheld_version_is_never_sent_and_the_reason_is_given() -> None:
    a, b = Instance("a"), Instance("b")
    a.set_index({"m": frozenset({"1", "2"})})
    b.set_index({"m": frozenset({"1"})})
    a.withhold("m", "2", "warming up")
    router = make_router(FakeClient(), a, b)
    assert a.models == {"m": frozenset({"1"})} and a.loaded == {"m": frozenset({"1", "2"})}
    assert router.newest_version("m") == "1"
    # Nobody routes version 2, yet it is not sent to whoever might hold it: it is withheld.
    with pytest.raises(Unavailable, match=r"version 2 is available \(warming up\)"):
        router.pick("m", "2")
    a.admit("m", "2")
    assert router.candidates("m", "2") == [a]
    a.set_index({"m": frozenset({"1"})})  # a later index no longer has it...
    a.withhold("m", "2", "draining")
    a.release("m", "2")  # ...and the sync lets go of it
    assert router.candidates("m", "2") == [a, b]  # unknown again: Triton decides


def test_the_fleets_index_lists_what_it_serves_and_what_it_holds_back() -> None:
    a, b, c = Instance("a"), Instance("b"), Instance("c", live=False)
    a.set_index({"m": frozenset({"1", "2", "10"}), "z": frozenset({"3"})})
    b.set_index({"m": frozenset({"1", "10"}), "other": frozenset({"4"})})
    c.set_index({"gone": frozenset({"1"})})  # down: not listed
    a.withhold("m", "2", "warming up")
    a.withhold("m", "10", "draining")  # still READY on b
    b.withhold("other", "4", "failed: warm-up answered 500")
    router = make_router(FakeClient(), a, b, c)
    assert router.index() == [
        {"name": "m", "version": "1", "state": "READY"},
        {"name": "m", "version": "2", "state": "LOADING", "reason": "warming up"},
        {"name": "m", "version": "10", "state": "READY"},
        {"name": "other", "version": "4", "state": "UNAVAILABLE", "reason": "failed: warm-up answered 500"},
        {"name": "z", "version": "3", "state": "READY"},
    ]
    b.withhold("m", "10", "draining")
    assert {"name": "m", "version": "10", "state": "UNLOADING", "reason": "draining"} in router.index()


def test_requests_in_flight_are_counted_per_version() -> None:
    a = Instance("a")
    a.started("m", "1")
    a.started("m", "1")
    a.started("m", "2")
    a.finished("m", "1")
    assert a.active == {("m", "1"): 1, ("m", "2"): 1}
    a.finished("m", "1")
    assert a.active == {("m", "2"): 1}


def test_an_index_asked_for_before_the_sync_changed_the_instance_is_not_applied() -> None:
    a = Instance("a")
    a.set_index({"m": frozenset({"1"})})
    epoch = a.index_epoch  # a health probe asks for the index...
    a.admit("m", "2")  # ...the repository sync loads and admits version 2 meanwhile...
    a.set_index({"m": frozenset({"1"})}, epoch)  # ...the probe's answer is older: dropped
    assert a.models == {"m": frozenset({"1", "2"})}
    a.set_index({"m": frozenset({"1", "2", "3"})}, a.index_epoch)  # a fresh one applies
    assert a.loaded == {"m": frozenset({"1", "2", "3"})}


# -- reads (metadata, config, statistics) ---------------------------------------------------------


def test_a_read_gets_a_short_time_limit_derived_from_the_request_timeout() -> None:
    assert read_timeout_for(30.0) == 3.0  # the default: a tenth...
    assert read_timeout_for(600.0) == 5.0  # ...at most 5 s...
    assert read_timeout_for(5.0) == 1.0  # ...at least 1 s...
    assert read_timeout_for(0.5) == 0.5  # ...never more than an infer attempt
    assert read_timeout_for(10.0, health_timeout_s=2.0) == 2.0  # never less than a health probe
    assert make_router(FakeClient(), Instance("a"), attempt_timeout=30.0).read_timeout == 3.0
    assert make_router(FakeClient(), Instance("a"), read_timeout=0.25).read_timeout == 0.25


async def test_a_read_fails_over_from_a_hung_instance_within_the_read_timeout() -> None:
    """One instance hung (SIGSTOP: connections accepted, nothing answered) beside a healthy
    one: a read asking the hung one first has the healthy one's answer after the short read
    timeout, not after request_timeout_s."""
    a, b = Instance("a"), Instance("b")
    a.models = b.models = {"m": frozenset({"1"})}
    client = FakeClient()
    client.hung.add("a")
    router = make_router(client, a, b, attempt_timeout=30.0, read_timeout=0.05, rng=random.Random(1))
    async with asyncio.timeout(5):
        while not client.calls or client.urls[0] != "a":  # until the hung one is asked first
            client.calls.clear()
            started = time.monotonic()
            answer = await router.get("/v2/models/m/config", model="m")
            elapsed = time.monotonic() - started
            assert answer == RawResponse(200, b"b")
    assert client.calls == [("a", 0.05), ("b", 0.05)]
    assert 0.04 <= elapsed < 1.0
    assert a.live and a.failures == 0  # the health probes judge it, not a read


@pytest.mark.parametrize(
    "failure",
    [
        RawResponse(503, b'{"error": "overloaded"}'),
        InstanceUnreachable("a: connection reset", connect_failed=False),
        GatewayTimeout("a: no answer in time"),
        UpstreamError("Triton instance gave a malformed answer: bad status line", status=502),
    ],
    ids=["5xx", "broken-connection", "timeout", "malformed"],
)
async def test_a_read_is_tried_on_the_next_instance_after_a_5xx_or_no_answer(failure: object) -> None:
    client = FakeClient()
    if isinstance(failure, RawResponse):
        client.answers["a"] = failure
    else:
        client.errors["a"] = failure  # type: ignore[assignment]
    router = make_router(client, Instance("a"), Instance("b"))
    for _ in range(10):
        assert await router.get("/v2/models/m") == RawResponse(200, b"b")
    assert "a" in client.urls and all(client.urls[i + 1] == "b" for i, u in enumerate(client.urls) if u == "a")


async def test_a_read_4xx_is_final_and_the_last_5xx_is_answered_when_every_instance_fails() -> None:
    client = FakeClient()
    client.answers = {"a": RawResponse(404, b'{"error": "unknown model"}'), "b": RawResponse(404, b'{"error": "unknown model"}')}
    router = make_router(client, Instance("a"), Instance("b"))
    assert (await router.get("/v2/models/x")).status == 404 and len(client.calls) == 1
    client.calls.clear()
    client.answers = {"a": RawResponse(500, b"a"), "b": RawResponse(502, b"b")}
    answer = await router.get("/v2/models/x")
    assert len(client.calls) == 2 and answer.body == client.urls[-1].encode()


async def test_every_instance_hung_a_read_fails_within_its_deadline() -> None:
    client = FakeClient()
    client.hung.update({"a", "b", "c"})
    router = make_router(client, Instance("a"), Instance("b"), Instance("c"), attempt_timeout=0.15, read_timeout=0.1)
    started = time.monotonic()
    async with asyncio.timeout(5):
        with pytest.raises(GatewayTimeout, match="did not answer within"):
            await router.get("/v2/models/m")  # no deadline: request_timeout_s (0.15 s here) in all
    assert 0.14 <= time.monotonic() - started < 1.0
    assert len(client.calls) == 2 and client.calls[0][1] == 0.1 and client.calls[1][1] < 0.1
    client.calls.clear()
    with pytest.raises(GatewayTimeout):
        await router.get("/v2/models/m", deadline=router._clock() + 0.02)  # the read's own deadline
    assert len(client.calls) == 1 and client.calls[0][1] <= 0.02


async def test_a_read_refused_marks_the_instance_down_and_asks_another() -> None:
    a, b = Instance("a"), Instance("b")
    client = FakeClient({"a": InstanceUnreachable("a: refused", connect_failed=True)})
    router = make_router(client, a, b, rng=random.Random(1))
    while not client.calls or client.urls[0] != "a":
        client.calls.clear()
        a.live = True
        assert await router.get("/v2") == RawResponse(200, b"b")
    assert not a.live


async def test_statistics_from_every_instance_do_not_wait_for_a_hung_one_and_name_it(caplog: pytest.LogCaptureFixture) -> None:
    client = FakeClient()
    client.hung.add("a")
    router = make_router(client, Instance("a"), Instance("b"), Instance("c", live=False), attempt_timeout=30.0, read_timeout=0.05)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gateway.router"):
        async with asyncio.timeout(5):
            answers = await router.get_all("/v2/models/stats")
    assert 0.04 <= time.monotonic() - started < 1.0
    assert answers == [RawResponse(200, b"b")] and answers.missing == ["a"]
    assert sorted(client.calls) == [("a", 0.05), ("b", 0.05)]  # c is down: not asked
    assert "no answer from 1 of 2 instances" in caplog.text and "a: Triton instance did not answer within 0.05 s" in caplog.text


async def test_statistics_when_no_instance_answers_are_unavailable() -> None:
    client = FakeClient({"b": InstanceUnreachable("b: refused", connect_failed=True)})
    client.hung.add("a")
    b = Instance("b")
    router = make_router(client, Instance("a"), b, read_timeout=0.02)
    async with asyncio.timeout(5):
        with pytest.raises(Unavailable, match="no Triton instance answered /v2/models/stats"):
            await router.get_all("/v2/models/stats")
    assert not b.live
