"""The path after decoding, with a fake router and metadata (no network)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from gateway.batcher import BatchResult, NothingToSend
from gateway.cache import FRESH, ResponseCache
from gateway.config import BatchingConfig, CacheConfig
from gateway.errors import BadRequest, ClientGone, GatewayTimeout, ModelError, UpstreamError
from gateway.models import ModelInfo
from gateway.pipeline import InferencePipeline, _values
from gateway.rollout import ModelRollout, Rollouts, ShadowStats, parse_rollout_file
from gateway.router import Instance
from gateway.tensors import InferRequest, RequestedOutput, Tensor


def info(max_batch_size: int) -> ModelInfo:
    return ModelInfo.from_triton(
        {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
         "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]},
        {"max_batch_size": max_batch_size}, b"{}", b"{}",
    )  # fmt: skip


class FakeMetadata:
    def __init__(self, model_info: ModelInfo) -> None:
        self.info = model_info

    def fresh(self, model: str, version: str) -> None:
        return None  # every request takes the awaited path, as on a cold or expired entry

    async def get(self, model: str, version: str) -> ModelInfo:
        return self.info


class FakeRouter:
    def __init__(self, outputs: tuple[str, ...] = ("y",)) -> None:
        self.calls: list[tuple[int, dict | None]] = []
        self.outputs = outputs
        self.asked: list[list[RequestedOutput] | None] = []  # the outputs each call asked Triton for
        self.instances = [Instance("a"), Instance("b")]
        self.deadlines: list[float | None] = []
        self.newest = ""
        self.versions: list[str] = []

    def newest_version(self, model: str) -> str:
        return self.newest

    def routable_count(self) -> int:
        return sum(1 for i in self.instances if i.routable)

    async def infer(self, model, version, inputs, parameters=None, deadline=None, outputs=None, affinity=None):  # noqa: ANN001, ANN201
        if callable(inputs):  # a prepare (see batcher.Dispatch), called when an instance is free
            inputs = inputs()
            if inputs is None:
                raise NothingToSend()
        self.calls.append((inputs[0].data.shape[0], parameters))
        self.deadlines.append(deadline)
        self.versions.append(version)
        self.asked.append(outputs)
        if outputs is not None:  # as Triton answers: the outputs asked for, top classes as strings
            return BatchResult("1", [_asked(o, inputs[0].data * 2) for o in outputs])
        return BatchResult("1", [Tensor(n, "FP32", inputs[0].data * 2) for n in self.outputs])


def _asked(out: RequestedOutput, values: np.ndarray) -> Tensor:
    if not out.class_count:
        return Tensor(out.name, "FP32", values)
    top = np.argsort(-values, axis=1, kind="stable")[:, : out.class_count]
    strings = [[b"%f:%d" % (values[r, i], i) for i in row] for r, row in enumerate(top)]
    return Tensor(out.name, "BYTES", np.array(strings, dtype=object))


def request(rows: int = 1, parameters: dict | None = None, outputs: list[str] | None = None) -> InferRequest:
    outs = None if outputs is None else [RequestedOutput(n) for n in outputs]
    return InferRequest("m", "", [Tensor("x", "FP32", np.ones((rows, 2), np.float32))], outs, parameters=parameters or {})


async def test_a_request_with_parameters_travels_alone_with_them() -> None:
    router = FakeRouter()
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(info(8)))  # type: ignore[arg-type]
    response = await pipeline.infer(request(parameters={"priority": 2}))
    assert router.calls == [(1, {"priority": 2})] and pipeline.batchers == {}
    np.testing.assert_array_equal(response.outputs[0].data, np.full((1, 2), 2, np.float32))
    await pipeline.infer(request())
    assert router.calls[-1] == (1, None) and list(pipeline.batchers) == [("m", "")]
    await pipeline.close(0)


async def test_a_classification_travels_alone_with_its_outputs_and_is_cached_under_its_own_key() -> None:
    router = FakeRouter()
    cache = ResponseCache(CacheConfig(enabled=True))
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(info(8)), cache=cache)  # type: ignore[arg-type]
    x = Tensor("x", "FP32", np.array([[1.0, 3.0], [4.0, 2.0]], np.float32))
    top1 = [RequestedOutput("y", class_count=1)]
    first = await pipeline.infer(InferRequest("m", "1", [x], top1))
    again = await pipeline.infer(InferRequest("m", "1", [x], [RequestedOutput("y", True, class_count=1)]))
    top2 = await pipeline.infer(InferRequest("m", "1", [x], [RequestedOutput("y", class_count=2)]))
    values = await pipeline.infer(InferRequest("m", "1", [x], [RequestedOutput("y")]))
    # Alone (no batcher), asking Triton for the output and its class count; values go batched.
    assert router.asked == [top1, [RequestedOutput("y", class_count=2)], None]
    assert list(pipeline.batchers) == [("m", "1")]
    assert [r.cache for r in (first, again, top2, values)] == ["miss", "hit", "miss", "miss"]
    assert first.outputs[0].data.tolist() == again.outputs[0].data.tolist() == [[b"6.000000:1"], [b"8.000000:0"]]
    assert top2.outputs[0].data.tolist() == [[b"6.000000:1", b"2.000000:0"], [b"8.000000:0", b"4.000000:1"]]
    np.testing.assert_array_equal(values.outputs[0].data, x.data * 2)
    await pipeline.close(0)


async def test_batches_follow_a_changed_max_batch_size() -> None:
    metadata = FakeMetadata(info(8))
    pipeline = InferencePipeline(BatchingConfig(), FakeRouter(), metadata)  # type: ignore[arg-type]
    await pipeline.infer(request())
    assert pipeline.batchers[("m", "")].policy.max_rows == 8
    metadata.info = info(4)
    await pipeline.infer(request())
    assert pipeline.batchers[("m", "")].policy.max_rows == 4
    await pipeline.close(0)


async def test_a_requested_output_triton_did_not_return_is_502() -> None:
    pipeline = InferencePipeline(BatchingConfig(), FakeRouter(outputs=()), FakeMetadata(info(8)))  # type: ignore[arg-type]
    with pytest.raises(UpstreamError) as err:
        await pipeline.infer(request(outputs=["y"]))
    assert err.value.status == 502 and "'y'" in err.value.message
    await pipeline.close(0)


async def test_batch_slots_follow_the_number_of_routable_instances() -> None:
    router = FakeRouter()
    pipeline = InferencePipeline(BatchingConfig(max_inflight_batches=2), router, FakeMetadata(info(8)))  # type: ignore[arg-type]
    await pipeline.infer(request())
    assert pipeline.batchers[("m", "")].policy.max_inflight == 4
    router.instances[1].live = False
    await pipeline.infer(request())
    assert pipeline.batchers[("m", "")].policy.max_inflight == 2
    router.instances[1].live = True
    router.instances[0].ejected_until = 99.0
    await pipeline.infer(request())
    assert pipeline.batchers[("m", "")].policy.max_inflight == 2
    await pipeline.close(0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_the_timeout_parameter_becomes_a_deadline_and_does_not_stop_batching() -> None:
    router, clock = FakeRouter(), Clock()
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(info(8)), clock=clock)  # type: ignore[arg-type]
    await pipeline.infer(request(parameters={"timeout": 250_000}))  # microseconds, as Triton reads it
    # Consumed: not forwarded, and the request went through the batcher (no lone parameters).
    assert router.calls == [(1, None)] and list(pipeline.batchers) == [("m", "")]
    assert router.deadlines == [pytest.approx(100.25)]
    await pipeline.infer(request(parameters={"timeout": 250_000}), deadline=100.1)  # the header's, earlier
    assert router.deadlines[-1] == pytest.approx(100.1)
    await pipeline.infer(request(parameters={"timeout": 0}))  # 0: no deadline, as in Triton
    assert router.deadlines[-1] is None
    await pipeline.close(0)


@pytest.mark.parametrize("value", [-1, 1.5, "100", True])
async def test_an_invalid_timeout_parameter_is_400(value: object) -> None:
    pipeline = InferencePipeline(BatchingConfig(), FakeRouter(), FakeMetadata(info(8)))  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="parameter 'timeout'"):
        await pipeline.infer(request(parameters={"timeout": value}))


async def test_an_expired_request_is_504_and_never_routed() -> None:
    router, clock = FakeRouter(), Clock()
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(info(8)), clock=clock)  # type: ignore[arg-type]
    with pytest.raises(GatewayTimeout):
        await pipeline.infer(request(), deadline=99.0)
    assert router.calls == []


class StuckRouter(FakeRouter):
    async def infer(self, model, version, inputs, parameters=None, deadline=None, outputs=None, affinity=None):  # noqa: ANN001, ANN201
        await asyncio.sleep(3600)


async def test_a_deadline_passing_while_the_request_waits_is_504() -> None:
    pipeline = InferencePipeline(BatchingConfig(), StuckRouter(), FakeMetadata(info(8)))  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(GatewayTimeout, match="deadline passed: no answer within the (19|20) ms left"):
        await pipeline.infer(request(parameters={"timeout": 20_000}))
    assert loop.time() - start < 1.0
    with pytest.raises(GatewayTimeout, match=r"within the 0\.[0-9]+ ms left"):  # not "the 0 ms"
        await pipeline.infer(request(parameters={"timeout": 500}))
    await pipeline.close(0)


async def test_a_model_with_its_own_batching_settings_gets_them() -> None:
    base = BatchingConfig(max_queue_delay_ms=2.0)
    batching = dataclasses.replace(base, models={"m": dataclasses.replace(base, max_queue_delay_ms=10.0, hold_ms=0.5, hold_cpu_busy=0.25)})
    pipeline = InferencePipeline(batching, FakeRouter(), FakeMetadata(info(8)))  # type: ignore[arg-type]
    await pipeline.infer(request())
    policy = pipeline.batchers[("m", "")].policy
    assert policy.max_delay == pytest.approx(0.010) and policy.hold == pytest.approx(0.0005)
    assert policy.hold_cpu_busy == 0.25
    await pipeline.close(0)


async def test_the_batchers_read_the_cpu_load_the_pipeline_is_given() -> None:
    cpu = [0.1]
    batching = BatchingConfig(hold_ms=1.0, hold_cpu_busy=0.8)
    pipeline = InferencePipeline(batching, FakeRouter(), FakeMetadata(info(8)), cpu_busy=lambda: cpu[0])  # type: ignore[arg-type]
    await pipeline.infer(request())
    batcher = pipeline.batchers[("m", "")]
    batcher.recent_requests = 4.0  # concurrent clients: company
    assert not batcher.holding  # cores to spare
    cpu[0] = 0.9
    assert batcher.holding
    await pipeline.close(0)


async def test_a_request_naming_no_version_is_pinned_to_the_fleets_newest() -> None:
    router = FakeRouter()
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(info(8)))  # type: ignore[arg-type]
    await pipeline.infer(request())
    router.newest = "3"
    await pipeline.infer(request())
    assert router.versions == ["", "3"] and set(pipeline.batchers) == {("m", ""), ("m", "3")}
    await pipeline.close(0)


async def test_cached_models_answer_from_the_cache_unless_the_client_bypasses_it() -> None:
    router = FakeRouter()
    router.newest = "1"
    cache = ResponseCache(CacheConfig(enabled=True))
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(info(8)), cache=cache)  # type: ignore[arg-type]
    first = await pipeline.infer(request())
    second = await pipeline.infer(request())
    bypassed = await pipeline.infer(request(), freshness=FRESH)
    with_params = await pipeline.infer(request(parameters={"priority": 1}))
    assert [r.cache for r in (first, second, bypassed, with_params)] == ["miss", "hit", "bypass", "bypass"]
    assert len(router.calls) == 3
    np.testing.assert_array_equal(second.outputs[0].data, first.outputs[0].data)
    await pipeline.close(0)


async def test_the_rollout_chooses_the_version_unless_the_request_names_one() -> None:
    router = FakeRouter()
    router.newest = "9"
    rollouts = Rollouts()
    rollouts.set_models({"m": ModelRollout("1", "2", 1.0)})
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(info(8)), rollouts=rollouts)  # type: ignore[arg-type]
    router.available = lambda model, version: True  # type: ignore[attr-defined]
    await pipeline.infer(request())
    named = request()
    named.version = "3"
    await pipeline.infer(named)
    router.available = lambda model, version: version != "2"  # type: ignore[attr-defined]
    await pipeline.infer(request())  # the canary is loaded nowhere: stable serves
    router.available = lambda model, version: version not in ("1", "2")  # type: ignore[attr-defined]
    await pipeline.infer(request())  # stable too (removed, draining): the fleet's newest, not the rollout's
    rollouts.set_models({})
    await pipeline.infer(request())
    assert router.versions == ["2", "3", "1", "9", "9"]
    assert rollouts.served == {("m", "2"): 1, ("m", "1"): 1}
    await pipeline.close(0)


def cached_canary(router: FakeRouter) -> tuple[InferencePipeline, Rollouts]:
    """A pipeline with the cache on, whose requests naming no version all go to canary 2."""
    router.available = lambda model, version: True  # type: ignore[attr-defined]
    rollouts = Rollouts()
    rollouts.set_models({"m": ModelRollout("1", "2", 1.0)})
    cache = ResponseCache(CacheConfig(enabled=True))
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(info(8)), cache=cache, rollouts=rollouts)  # type: ignore[arg-type]
    return pipeline, rollouts


async def test_the_rollout_windows_hold_the_answers_computed_not_the_cache_hits() -> None:
    router = FakeRouter()
    router.newest = "1"
    pipeline, rollouts = cached_canary(router)
    answers = [await pipeline.infer(request()) for _ in range(3)]
    assert [a.cache for a in answers] == ["miss", "hit", "hit"]
    assert len(rollouts.states["m"].window("2").items) == 1 and rollouts.served == {("m", "2"): 3}
    await pipeline.close(0)


class FailingRouter(FakeRouter):
    """Triton fails every request, after a moment (so identical requests gather)."""

    async def infer(self, model, version, inputs, parameters=None, deadline=None, outputs=None, affinity=None):  # noqa: ANN001, ANN201
        await asyncio.sleep(0.01)
        self.versions.append(version)
        raise ModelError("Triton: the model raised", status=500)


async def test_a_failure_enters_the_rollout_windows_once_for_the_identical_requests_that_shared_it() -> None:
    router = FailingRouter()
    pipeline, rollouts = cached_canary(router)
    answers = await asyncio.gather(*(pipeline.infer(request()) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(a, ModelError) and a.status == 500 for a in answers)
    assert router.versions == ["2"]  # one computation, which failed
    window = rollouts.states["m"].window("2")
    assert [ok for ok, _ in window.items] == [False] and rollouts.served == {("m", "2"): 5}
    assert rollouts.states["m"].step_requests == 5  # every request counts for the ramp
    await pipeline.close(0)


class SlowRouter(FakeRouter):
    async def infer(self, model, version, inputs, parameters=None, deadline=None, outputs=None, affinity=None):  # noqa: ANN001, ANN201
        await asyncio.sleep(0.2)
        return await super().infer(model, version, inputs, parameters, deadline, outputs)


async def test_a_computation_too_slow_for_the_deadlines_of_its_identical_requests_is_one_failure() -> None:
    router = SlowRouter()
    pipeline, rollouts = cached_canary(router)
    deadline = time.monotonic() + 0.05
    answers = await asyncio.gather(*(pipeline.infer(request(), deadline) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(a, GatewayTimeout) for a in answers)
    assert [a.shared for a in answers] == [False, True, True, True, True]  # type: ignore[union-attr]
    assert [ok for ok, _ in rollouts.states["m"].window("2").items] == [False]
    assert rollouts.states["m"].step_requests == 5
    await pipeline.close(1.0)


async def test_a_classification_is_not_mirrored_to_the_shadow() -> None:
    router = FakeRouter()
    router.available = lambda model, version: True  # type: ignore[attr-defined]
    rollouts = Rollouts(seed=0)
    rollouts.set_models({"m": ModelRollout("1", shadow="3", shadow_share=1.0)})
    pipeline = InferencePipeline(BatchingConfig(enabled=False), router, FakeMetadata(info(8)), rollouts=rollouts)  # type: ignore[arg-type]
    ranked = InferRequest("m", "", [Tensor("x", "FP32", np.ones((1, 2), np.float32))], [RequestedOutput("y", class_count=1)])
    await pipeline.infer(ranked)
    await pipeline.infer(request())
    await pipeline.close(1.0)
    assert sorted(router.versions) == ["1", "1", "3"]  # the values request only was mirrored
    assert rollouts.snapshot()["models"]["m"]["shadow"]["sent"] == 1


class VanishingRouter(FakeRouter):
    """Version 2 disappears from the fleet after the pipeline chose it."""

    async def infer(self, model, version, inputs, parameters=None, deadline=None, outputs=None, affinity=None):  # noqa: ANN001, ANN201
        if version == "2":
            self.newest = "1"  # the router forgot it on every instance that said so
            raise UpstreamError("Request for unknown model: 'm' version 2 is not found", status=400)
        return await super().infer(model, version, inputs, parameters, deadline)


async def test_a_version_that_leaves_between_choice_and_answer_is_chosen_again_once() -> None:
    router = VanishingRouter()
    router.newest = "2"
    pipeline = InferencePipeline(BatchingConfig(enabled=False), router, FakeMetadata(info(8)))  # type: ignore[arg-type]
    response = await pipeline.infer(request())
    assert response.version == "1" and router.versions == ["1"]
    named = request()
    named.version = "2"  # the client named it: its answer is the client's
    router.newest = "2"
    with pytest.raises(UpstreamError, match="not found"):
        await pipeline.infer(named)
    await pipeline.close(0)


async def test_the_timeout_parameter_still_bounds_a_request_whose_version_is_chosen_again() -> None:
    router = VanishingRouter()
    router.newest = "2"
    pipeline = InferencePipeline(BatchingConfig(enabled=False), router, FakeMetadata(info(8)))  # type: ignore[arg-type]
    before = time.monotonic()
    await pipeline.infer(request(parameters={"timeout": 5_000_000}))  # 5 s, in µs
    assert router.versions == ["1"] and router.deadlines[0] is not None  # version 1's attempt has it too
    assert before + 4.5 < router.deadlines[0] < time.monotonic() + 5.0
    await pipeline.close(0)


async def test_a_shadow_version_gets_a_copy_and_is_compared_but_never_answers() -> None:
    router = FakeRouter()
    rollouts = Rollouts(seed=0)
    rollouts.set_models({"m": ModelRollout("1", shadow="3", shadow_share=1.0)})
    pipeline = InferencePipeline(BatchingConfig(enabled=False), router, FakeMetadata(info(8)), rollouts=rollouts)  # type: ignore[arg-type]
    router.available = lambda model, version: True  # type: ignore[attr-defined]
    response = await pipeline.infer(request(rows=3))
    await pipeline.close(1.0)  # lets the shadow finish
    assert response.version == "1" and sorted(router.versions) == ["1", "3"]
    shadow = rollouts.snapshot()["models"]["m"]["shadow"]
    assert shadow == {"version": "3", "share": 1.0, "sent": 1, "failed": 0, "compared": 1, "max_abs_diff": 0.0,
                      "argmax_agreement": 1.0}  # fmt: skip


async def test_under_rollout_defaults_the_fleets_new_version_becomes_a_canary_of_the_serving_one() -> None:
    router = FakeRouter()
    router.available = lambda model, version: True  # type: ignore[attr-defined]
    for instance in router.instances:
        instance.set_index({"m": frozenset({"1"})})
    router.newest = "1"
    rollouts = Rollouts(seed=0)
    rollouts.set_file(parse_rollout_file({"defaults": {"canary_share": 1.0}}))
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(info(8)), rollouts=rollouts)  # type: ignore[arg-type]
    pipeline.observe_fleet()  # before serving: version 1 serves
    router.newest = "2"  # version 2 arrives everywhere, before the next health round
    await pipeline.infer(request())
    pipeline.observe_fleet()  # the health round: version 2 starts as a canary (share 1.0 here)
    await pipeline.infer(request())
    assert router.versions == ["1", "2"]
    assert rollouts.auto["m"].status == "canary" and rollouts.served == {("m", "1"): 1, ("m", "2"): 1}
    await pipeline.close(0)


async def test_a_lone_request_whose_client_left_while_waiting_is_not_sent() -> None:
    router = FakeRouter()
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(info(8)))  # type: ignore[arg-type]
    with pytest.raises(ClientGone):
        await pipeline.infer(request(parameters={"priority": 2}), gone=lambda: True)
    assert router.calls == []
    response = await pipeline.infer(request(parameters={"priority": 2}), gone=lambda: False)
    assert router.calls == [(1, {"priority": 2})] and response.outputs
    await pipeline.close(0)


def test_a_shadows_bf16_outputs_are_compared_as_values_not_as_bits() -> None:
    served = [Tensor("y", "BF16", np.array([[0x3F80, 0x4000]], dtype="<u2"))]  # 1.0, 2.0
    shadow = [Tensor("y", "BF16", np.array([[0x4000, 0x4000]], dtype="<u2"))]  # 2.0, 2.0
    stats = ShadowStats()
    stats.compare(_values(served), _values(shadow))
    assert stats.max_abs_diff == 1.0  # (the bits differ by 128)
