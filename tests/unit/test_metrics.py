"""GET /metrics: the infer route's own counts, and the collector over real gateway components
(a real endpoint, pipeline, router, instances, batcher, response cache and rollouts; a fake
Triton client and metadata, no network), parsed back with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import math
import types
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from gateway import handlers
from gateway.app import routes
from gateway.batcher import Batcher, BatchPolicy, BatchResult
from gateway.cache import ResponseCache
from gateway.cache.host import HostStore, create_segment
from gateway.config import BatchingConfig, CacheConfig
from gateway.errors import GatewayError, GatewayTimeout, NotFound, Unavailable
from gateway.infer_endpoint import InferEndpoint
from gateway.instances import EjectionPolicy, Instance
from gateway.metrics import BUCKETS, CONTENT_TYPE, InferCounts, build_registry, fleet_labels, render
from gateway.models import ModelInfo
from gateway.pipeline import InferencePipeline
from gateway.rollout import ModelRollout, Rollouts, parse_rollout_file
from gateway.router import Router
from gateway.tensors import Tensor
from model_fixtures import INFO


class Metadata:
    """Model "m" version 1 exists; anything else is unknown."""

    def fresh(self, model: str, version: str) -> None:
        return None  # always the awaited path, where unknown names raise

    async def get(self, model: str, version: str) -> ModelInfo:
        if model != "m" or version not in ("", "1"):
            raise NotFound(f"model '{model}' version {version or '-'} is not served")
        return INFO


class FakeClient:
    """A Triton that answers y = 2x, or raises ``fail`` when set."""

    def __init__(self) -> None:
        self.fail: BaseException | None = None

    async def infer(self, url, model, version, tensors, parameters, limit, outputs=None):  # noqa: ANN001, ANN201
        if self.fail is not None:
            raise self.fail
        return BatchResult(version, [Tensor("y", "FP32", tensors[0].data * 2)])


def samples(registry: prometheus_client.CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, parsed back: (sample name, labels) -> value."""
    text = render(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


def named(parsed: dict, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in parsed.items() if n == name}


def holding_any() -> Router:
    """A router with one up instance whose repository index is unknown: it may hold any version."""
    return Router([Instance("http://a")], None)  # type: ignore[arg-type]


def empty_services(router: Router | None = None, cache: ResponseCache | None = None, rollouts: Rollouts | None = None) -> handlers.Services:
    router = router or Router([], None)  # type: ignore[arg-type]  # nothing is sent
    pipeline = InferencePipeline(BatchingConfig(), router, None, cache=cache, rollouts=rollouts)  # type: ignore[arg-type]
    return handlers.Services(router, pipeline, None)


# --- the infer route's counts -------------------------------------------------------------


def test_requests_by_code_and_the_latency_histogram_add_up_exactly() -> None:
    counts = InferCounts()
    for seconds in (0.0004, 0.005, 0.2):  # 0.005 sits on a bound: "le" includes it
        counts.record("m", "1", 200, seconds)
    counts.record("m", "1", 400, 0.02)
    counts.record("n", "3", 200, 11.0)  # beyond the last bound: +Inf only
    parsed = samples(build_registry(counts, empty_services()))
    assert value(parsed, "gateway_infer_requests_total", model="m", version="1", code="200") == 3
    assert value(parsed, "gateway_infer_requests_total", model="m", version="1", code="400") == 1
    assert value(parsed, "gateway_infer_requests_total", model="n", version="3", code="200") == 1
    assert len(named(parsed, "gateway_infer_requests_total")) == 3

    assert value(parsed, "gateway_infer_request_duration_seconds_count", model="m") == 4
    assert value(parsed, "gateway_infer_request_duration_seconds_sum", model="m") == pytest.approx(0.2254)
    buckets = {
        float(dict(labels)["le"]): v
        for labels, v in named(parsed, "gateway_infer_request_duration_seconds_bucket").items()
        if dict(labels)["model"] == "m"
    }
    assert sorted(buckets) == [*BUCKETS, math.inf]
    expected = {0.0005: 1, 0.001: 1, 0.0025: 1, 0.005: 2, 0.01: 2, 0.025: 3, 0.05: 3, 0.1: 3, 0.25: 4}
    assert buckets == {b: expected.get(b, 4) for b in buckets}  # cumulative
    n = {float(dict(k)["le"]): v for k, v in named(parsed, "gateway_infer_request_duration_seconds_bucket").items() if ("model", "n") in k}
    assert n[10.0] == 0 and n[math.inf] == 1


def test_cached_models_requests_have_a_latency_histogram_by_where_the_answer_came_from() -> None:
    counts = InferCounts()
    counts.record("m", "1", 200, 0.0004, "hit")
    counts.record("m", "1", 200, 0.0003, "hit")
    counts.record("m", "1", 200, 0.004, "miss")
    counts.record("m", "1", 200, 0.003, "coalesced")
    counts.record("m", "1", 503, 0.001)  # an error: no cache outcome
    counts.record("n", "2", 200, 0.002)  # a model without the cache
    parsed = samples(build_registry(counts, empty_services()))
    # The requests' counts and the model's histogram take every request, whatever its outcome.
    assert value(parsed, "gateway_infer_requests_total", model="m", version="1", code="200") == 4
    assert value(parsed, "gateway_infer_requests_total", model="m", version="1", code="503") == 1
    assert value(parsed, "gateway_infer_request_duration_seconds_count", model="m") == 5
    name = "gateway_infer_cache_request_duration_seconds"
    counted = {(dict(k)["model"], dict(k)["cache"]): v for k, v in named(parsed, f"{name}_count").items()}
    assert counted == {("m", "hit"): 2, ("m", "miss"): 1, ("m", "coalesced"): 1}
    assert value(parsed, f"{name}_sum", model="m", cache="hit") == pytest.approx(0.0007)
    assert value(parsed, f"{name}_sum", model="m", cache="miss") == pytest.approx(0.004)
    assert value(parsed, f"{name}_bucket", model="m", cache="miss", le="0.0025") == 0
    assert value(parsed, f"{name}_bucket", model="m", cache="miss", le="0.005") == 1


def test_labels_of_an_unanswered_request_come_from_the_fleet_index() -> None:
    a, b = Instance("http://a"), Instance("http://b")
    a.set_index({"m": frozenset({"1", "2"})})
    router = Router([a, b], None)  # type: ignore[arg-type]
    assert fleet_labels(router, "m", "2") == ("m", "2")
    assert fleet_labels(router, "m", "77") == ("m", "")  # a version nobody holds
    assert fleet_labels(router, "made-up", "1") == ("", "")  # a name nobody serves: no new series


# --- the endpoint counts every answer once ---------------------------------------------------


def endpoint_stack(client: FakeClient) -> tuple[InferEndpoint, handlers.Services]:
    instance = Instance("http://triton-0")
    instance.set_index({"m": frozenset({"1"})})
    router = Router([instance], client, max_tries=1)  # type: ignore[arg-type]
    pipeline = InferencePipeline(BatchingConfig(), router, Metadata())  # type: ignore[arg-type]
    services = handlers.Services(router, pipeline, None)
    app = types.SimpleNamespace(state=types.SimpleNamespace(services=services))
    return InferEndpoint(app, 1024), services


def body(name: str = "x", rows: int = 1) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": [rows, 2], "data": [1.0, 2.0] * rows}]})


async def post(endpoint: InferEndpoint, payload: bytes, path: str = "/v2/models/m/infer", gone: bool = False) -> int | None:
    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-type", b"application/json")]}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"} if gone else {"type": "http.request", "body": payload}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await endpoint(scope, receive, send)
    return sent[0]["status"] if sent else None


async def test_the_endpoint_counts_answers_and_errors_by_code_and_disconnects_apart() -> None:
    client = FakeClient()
    endpoint, services = endpoint_stack(client)
    for rows in (1, 2, 3):
        assert await post(endpoint, body(rows=rows)) == 200
    assert await post(endpoint, body(name="wrong")) == 400  # after the version was chosen: "1"
    assert await post(endpoint, body(), "/v2/models/nope/infer") == 404
    assert await post(endpoint, body(), "/v2/models/m/versions/7/infer") == 404
    assert await post(endpoint, body(), "/v2/models/m/versions/latest/infer") == 400
    assert await post(endpoint, b" " * 2000) == 413
    client.fail = Unavailable("busy")
    assert await post(endpoint, body()) == 503
    client.fail = GatewayTimeout("no answer in time")
    assert await post(endpoint, body()) == 504
    client.fail = RuntimeError("a bug")
    assert await post(endpoint, body()) == 500
    assert await post(endpoint, body(), gone=True) is None  # the client left: no answer

    parsed = samples(build_registry(endpoint.counts, services))
    requests = {tuple(sorted(dict(k).items())): v for k, v in named(parsed, "gateway_infer_requests_total").items()}
    assert requests == {
        (("code", "200"), ("model", "m"), ("version", "1")): 3,
        (("code", "400"), ("model", "m"), ("version", "1")): 1,
        (("code", "404"), ("model", ""), ("version", "")): 1,
        (("code", "404"), ("model", "m"), ("version", "")): 1,
        (("code", "400"), ("model", "m"), ("version", "")): 1,
        (("code", "413"), ("model", "m"), ("version", "")): 1,
        (("code", "503"), ("model", "m"), ("version", "1")): 1,
        (("code", "504"), ("model", "m"), ("version", "1")): 1,
        (("code", "500"), ("model", "m"), ("version", "1")): 1,
    }
    assert value(parsed, "gateway_infer_request_duration_seconds_count", model="m") == 10
    assert value(parsed, "gateway_infer_request_duration_seconds_count", model="") == 1
    assert value(parsed, "gateway_infer_client_disconnects_total", model="m") == 1
    # The batcher counts batches that came back answered: the 3 good requests, one batch each.
    assert value(parsed, "gateway_batcher_batches_sent_total", model="m", version="1") == 3
    assert value(parsed, "gateway_batcher_rows_sent_total", model="m", version="1") == 1 + 2 + 3
    # The router's side: every upstream attempt, the instance's failures (the 504 counts; a
    # 503 raised by the client and the bug do not say the instance failed).
    assert value(parsed, "gateway_instance_requests_total", upstream="http://triton-0") == 6
    assert value(parsed, "gateway_instance_failures_total", upstream="http://triton-0") == 1
    # Upstream answers timed: the 3 good requests' batches (no failed attempt).
    assert value(parsed, "gateway_instance_request_duration_seconds_count", upstream="http://triton-0") == 3


# --- components read at scrape time ------------------------------------------------------


async def test_batcher_counters_and_gauges_while_a_batch_is_in_flight() -> None:
    release = asyncio.Event()
    calls = 0

    async def dispatch(prepare, deadline):  # noqa: ANN001, ANN202
        nonlocal calls
        calls += 1
        tensors = prepare()
        if calls == 1:
            await release.wait()
        return BatchResult("1", [Tensor("y", "FP32", tensors[0].data)])

    batcher = Batcher("m/1", dispatch, BatchPolicy(max_rows=64, max_delay=60.0, max_inflight=1, max_queue_rows=100))
    services = empty_services()
    services.pipeline.batchers[("m", "1")] = batcher
    registry = build_registry(InferCounts(), services)

    def x(rows: int) -> list[Tensor]:
        return [Tensor("x", "FP32", np.ones((rows, 2), np.float32))]

    first = asyncio.ensure_future(batcher.submit(x(1)))
    await asyncio.sleep(0)
    queued = [asyncio.ensure_future(batcher.submit(x(n))) for n in (2, 3)]
    await asyncio.sleep(0)
    during = samples(registry)
    assert value(during, "gateway_batcher_inflight_batches", model="m", version="1") == 1
    assert value(during, "gateway_batcher_queued_rows", model="m", version="1") == 5
    assert value(during, "gateway_batcher_batches_sent_total", model="m", version="1") == 0

    release.set()
    await asyncio.gather(first, *queued)
    after = samples(registry)
    assert value(after, "gateway_batcher_batches_sent_total", model="m", version="1") == 2  # 1, then 2 + 3 together
    assert value(after, "gateway_batcher_rows_sent_total", model="m", version="1") == 6
    assert value(after, "gateway_batcher_queued_rows", model="m", version="1") == 0
    assert value(after, "gateway_batcher_inflight_batches", model="m", version="1") == 0
    # Each of the three requests waited in the batcher until its batch was taken.
    assert value(after, "gateway_batcher_queue_seconds_count", model="m", version="1") == 3
    assert value(after, "gateway_batcher_queue_seconds_sum", model="m", version="1") >= 0
    await batcher.close(0.1)


async def test_whether_a_batchers_hold_applies_now_and_the_cpu_share_it_reads() -> None:
    async def dispatch(prepare, deadline):  # noqa: ANN001, ANN202
        return BatchResult("1", prepare())

    cpu: list[float | None] = [None]
    services = empty_services()
    services.pipeline.cpu_busy = lambda: cpu[0]
    policy = BatchPolicy(max_rows=64, max_delay=0.004, max_inflight=1, max_queue_rows=100, hold=0.004, hold_cpu_busy=0.8)
    held = services.pipeline.batchers[("m", "1")] = Batcher("m/1", dispatch, policy, cpu_busy=services.pipeline.cpu_busy)
    services.pipeline.batchers[("m", "2")] = Batcher("m/2", dispatch, BatchPolicy(64, 0.004, 1, 100))  # no hold
    registry = build_registry(InferCounts(), services)
    held.recent_requests = 4.0  # the last batches carried several requests: company
    for busy, holding in ((None, 1), (0.5, 0), (0.95, 1)):
        cpu[0] = busy
        parsed = samples(registry)
        assert value(parsed, "gateway_batcher_holding", model="m", version="1") == holding
        assert value(parsed, "gateway_batcher_holding", model="m", version="2") == 0
        assert named(parsed, "gateway_host_cpu_busy_ratio") == ({} if busy is None else {frozenset(): busy})
    held.recent_requests = 1.0  # one request at a time: nobody to wait for
    assert value(samples(registry), "gateway_batcher_holding", model="m", version="1") == 0


async def test_cache_counters_match_the_cache_view() -> None:
    cache = ResponseCache(CacheConfig(enabled=True, max_bytes=300))  # room for one entry of 264 bytes
    gate = asyncio.Event()

    def compute(wait: bool = False):  # noqa: ANN202
        async def run(abandoned):  # noqa: ANN001, ANN202
            if wait:
                await gate.wait()
            return BatchResult("1", [Tensor("y", "FP32", np.zeros((1, 2), np.float32))])

        return run

    assert (await cache.get_or_compute("m", "1", b"a", compute()))[1] == "miss"
    assert (await cache.get_or_compute("m", "1", b"a", compute()))[1] == "hit"
    assert (await cache.get_or_compute("m", "1", b"b", compute()))[1] == "miss"  # evicts a
    both = [asyncio.ensure_future(cache.get_or_compute("m", "1", b"c", compute(wait=True))) for _ in range(2)]
    await asyncio.sleep(0)
    gate.set()
    assert sorted(source for _, source, _ in await asyncio.gather(*both)) == ["coalesced", "miss"]  # evicts b

    parsed = samples(build_registry(InferCounts(), empty_services(cache=cache)))
    expected = {"hits": 1, "raw_hits": 0, "misses": 3, "coalesced": 1, "shared_hits": 0, "host_hits": 0, "evictions": 2}
    for name, n in expected.items():
        assert value(parsed, f"gateway_cache_{name}_total", model="m") == n, name
    assert value(parsed, "gateway_cache_entries", model="m") == 1
    assert value(parsed, "gateway_cache_bytes", model="m") == 264 == cache.snapshot()["models"]["m"]["bytes"]
    assert value(parsed, "gateway_cache_max_bytes") == 300
    assert value(parsed, "gateway_cache_in_flight") == 0
    without = samples(build_registry(InferCounts(), empty_services()))  # no cache configured
    assert not [name for name, _ in without if name.startswith("gateway_cache_")]


async def test_the_host_tiers_counters_are_each_workers_own_dealings_with_it(tmp_path: Path) -> None:
    made = create_segment(64 * 1024, str(tmp_path))
    assert made is not None
    now = [0.0]
    cache = ResponseCache(CacheConfig(enabled=True, ttl_s=60.0), clock=lambda: now[0], host=HostStore(made.path))

    async def compute(abandoned):  # noqa: ANN001, ANN202
        return BatchResult("1", [Tensor("y", "FP32", np.zeros((1, 2), np.float32))])

    try:
        assert (await cache.get_or_compute("m", "1", b"k" * 16, compute))[1] == "miss"  # claimed and written
        now[0] = 61.0  # past the TTL: this worker's copy and the tier's are both expired
        assert (await cache.get_or_compute("m", "1", b"k" * 16, compute))[1] == "miss"  # stale there, claimed again
        # What contention would count (another process holding the tier's locks; test_cache_host.py),
        # set apart here so that each counter shows its own figure.
        view = cache._host
        assert view is not None
        view.busy, view.unclaimed, view.gave_up = 3, 4, 5
        parsed = samples(build_registry(InferCounts(), empty_services(cache=cache)))
        expected = {"claims": 2, "stale": 1, "skipped_writes": 3, "unclaimed": 4, "claims_gave_up": 5}
        for name, n in expected.items():
            assert value(parsed, f"gateway_cache_host_{name}_total") == n, name
        assert value(parsed, "gateway_cache_host_writes_total") == 2
    finally:
        await cache.close()
        made.remove()


def test_instances_up_ejected_down_and_their_counters() -> None:
    a, b, c = Instance("http://a", weight=3.0), Instance("http://b"), Instance("http://c", live=False)
    # max_share 1.0: c is down, which counts in the share; b may still be ejected beside it.
    policy = EjectionPolicy(after_failures=2, base_s=5.0, max_share=1.0)
    router = Router([a, b, c], None, clock=lambda: 100.0, ejection=policy)  # type: ignore[arg-type]
    a.begin(100.0)
    for _ in range(2):
        b.begin(100.0)
        b.end(100.0)
        b.record_failure("Triton answered 500", 100.0, router.instances, router.ejection)
    b.withhold("m", "2", "warming up")
    parsed = samples(build_registry(InferCounts(), empty_services(router)))

    def per_instance(name: str) -> dict[str, float]:
        return {dict(k)["upstream"].removeprefix("http://"): v for k, v in named(parsed, name).items()}

    assert per_instance("gateway_instance_up") == {"a": 1, "b": 0, "c": 0}
    assert per_instance("gateway_instance_ejected") == {"a": 0, "b": 1, "c": 0}
    assert per_instance("gateway_instance_weight") == {"a": 3, "b": 1, "c": 1}
    assert per_instance("gateway_instance_inflight_requests") == {"a": 1, "b": 0, "c": 0}
    assert per_instance("gateway_instance_requests_total") == {"a": 1, "b": 2, "c": 0}
    assert per_instance("gateway_instance_failures_total") == {"a": 0, "b": 2, "c": 0}
    assert per_instance("gateway_instance_consecutive_failures") == {"a": 0, "b": 2, "c": 0}
    assert per_instance("gateway_instance_ejections_total") == {"a": 0, "b": 1, "c": 0}
    assert per_instance("gateway_instance_ejection_remaining_seconds") == {"a": 0, "b": 5.0, "c": 0}
    # A withheld version counts only where it is loaded (as in the fleet view): b has no index.
    assert per_instance("gateway_instance_withheld_versions") == {"a": 0, "b": 0, "c": 0}


def test_rollout_shares_requests_windows_and_status() -> None:
    rollouts = Rollouts(clock=lambda: 10.0)
    rollouts.set_models({"m": ModelRollout(stable="1", canary="2", canary_share=0.25)})
    for version in ("1", "1", "1", "2"):
        rollouts.count("m", version)
    rollouts.record("m", "2", False, 0.1)
    rollouts.record("m", "1", True, 0.02)
    registry = build_registry(InferCounts(), empty_services(holding_any(), rollouts=rollouts))
    parsed = samples(registry)
    assert value(parsed, "gateway_rollout_traffic_share", model="m", version="1") == 0.75
    assert value(parsed, "gateway_rollout_traffic_share", model="m", version="2") == 0.25
    assert value(parsed, "gateway_rollout_requests_total", model="m", version="1") == 3
    assert value(parsed, "gateway_rollout_requests_total", model="m", version="2") == 1
    assert value(parsed, "gateway_rollout_window_requests", model="m", version="2") == 1
    assert value(parsed, "gateway_rollout_window_error_ratio", model="m", version="2") == 1.0
    assert value(parsed, "gateway_rollout_window_p99_seconds", model="m", version="2") == pytest.approx(0.1)
    assert {dict(k)["status"]: v for k, v in named(parsed, "gateway_rollout_status").items()} == {
        "stable": 0, "canary": 1, "rolled_back": 0, "promoted": 0,
    }  # fmt: skip
    assert value(parsed, "gateway_rollout_file_error") == 0

    rollouts.act("m", "rollback")
    parsed = samples(registry)
    assert value(parsed, "gateway_rollout_traffic_share", model="m", version="1") == 1.0
    assert value(parsed, "gateway_rollout_traffic_share", model="m", version="2") == 0.0
    assert value(parsed, "gateway_rollout_status", model="m", status="rolled_back") == 1

    rollouts.act("m", "promote")  # stable and canary are now both "2": one series, all traffic
    parsed = samples(registry)
    assert named(parsed, "gateway_rollout_traffic_share") == {frozenset({("model", "m"), ("version", "2")}): 1.0}


def test_the_traffic_share_is_each_rollouts_share_in_force_as_the_json_view_shows_it() -> None:
    rollouts = Rollouts(clock=lambda: 10.0)
    tables = {"m": {"stable": "1", "canary": "2", "canary_share": 0.25}, "n": {"stable": "1"}}
    rollouts.set_file(parse_rollout_file({"models": tables, "defaults": {"canary_share": 0.1}}))
    rollouts.observe("a", "1", lambda v: True)
    rollouts.observe("a", "3", lambda v: True)  # a version dropped in: an automatic canary
    services = empty_services(holding_any(), rollouts=rollouts)
    registry = build_registry(InferCounts(), services)

    def shares() -> dict[str, dict[str, float]]:
        """Per model: the traffic share by version, checked against the states and the JSON view."""
        by_model: dict[str, dict[str, float]] = {}
        for labels, v in named(samples(registry), "gateway_rollout_traffic_share").items():
            by_model.setdefault(dict(labels)["model"], {})[dict(labels)["version"]] = v
        view = services.pipeline.rollout_view()["models"]
        for model, state in rollouts.all_states().items():
            assert view[model]["canary_share_in_force"] == state.share_in_force
            assert by_model[model][state.stable] == 1.0 - state.share_in_force
            if state.canary and state.canary != state.stable:
                assert by_model[model][state.canary] == state.share_in_force
        return by_model

    assert shares() == {"m": {"1": 0.75, "2": 0.25}, "n": {"1": 1.0}, "a": {"1": 0.9, "3": 0.1}}
    rollouts.act("a", "rollback")
    rollouts.act("m", "set_share", 0.5)
    assert shares() == {"m": {"1": 0.5, "2": 0.5}, "n": {"1": 1.0}, "a": {"1": 1.0, "3": 0.0}}
    rollouts.act("m", "promote")
    assert shares() == {"m": {"2": 1.0}, "n": {"1": 1.0}, "a": {"1": 1.0, "3": 0.0}}


def test_a_canary_no_instance_holds_gets_no_traffic_and_the_share_in_force_says_so() -> None:
    rollouts = Rollouts(clock=lambda: 10.0)
    rollouts.set_models({"m": ModelRollout(stable="1", canary="2", canary_share=0.25)})
    instance = Instance("http://a")
    instance.models = {"m": frozenset({"1"})}  # version 2 is not loaded anywhere yet
    services = empty_services(Router([instance], None), rollouts=rollouts)  # type: ignore[arg-type]
    registry = build_registry(InferCounts(), services)

    def in_force() -> tuple[float, float, float]:
        parsed = samples(registry)
        view = services.pipeline.rollout_view()["models"]["m"]
        assert view["canary_share"] == 0.25  # the share configured
        stable = value(parsed, "gateway_rollout_traffic_share", model="m", version="1")
        return stable, value(parsed, "gateway_rollout_traffic_share", model="m", version="2"), view["canary_share_in_force"]

    assert in_force() == (1.0, 0.0, 0.0)
    assert {services.pipeline.choose_version("m", None)[0] for _ in range(50)} == {"1"}  # what routing does
    instance.models = {"m": frozenset({"1", "2"})}
    assert in_force() == (0.75, 0.25, 0.25)
    assert {services.pipeline.choose_version("m", None)[0] for _ in range(200)} == {"1", "2"}


class FakeSync:
    """The repository sync's view (RepositorySync.snapshot's shape)."""

    def snapshot(self) -> dict[str, Any]:
        instances = {"http://a": {"1": "ready"}}
        return {
            "path": "/models",
            "scan_error": None,
            "models": {
                "m": {"on_disk": ["1", "2", "3"], "serving": ["1"], "config_error": None,
                      "failed": {"2": "model.py raised", "3": "warm-up failed"}, "instances": instances},
                "n": {"on_disk": ["1"], "serving": [], "config_error": "bad pbtxt", "failed": {}, "instances": {}},
            },
            "events": [],
        }  # fmt: skip


def test_repository_failures_and_config_errors() -> None:
    services = empty_services()
    parsed = samples(build_registry(InferCounts(), services))
    assert not named(parsed, "gateway_repository_failed_versions")  # the gateway does not drive loading
    services.repository = FakeSync()  # type: ignore[assignment]
    parsed = samples(build_registry(InferCounts(), services))
    assert value(parsed, "gateway_repository_failed_versions", model="m") == 2
    assert value(parsed, "gateway_repository_failed_versions", model="n") == 0
    assert value(parsed, "gateway_repository_config_error", model="n") == 1
    assert value(parsed, "gateway_repository_config_error", model="m") == 0
    assert value(parsed, "gateway_repository_versions_on_disk", model="m") == 3
    assert value(parsed, "gateway_repository_versions_serving", model="m") == 1
    assert value(parsed, "gateway_repository_scan_error") == 0


# --- the route and its registry ------------------------------------------------------------


async def test_metrics_route_is_503_until_started_then_the_exposition() -> None:
    starlette = Starlette(routes=routes(), exception_handlers={GatewayError: handlers.error_response})
    endpoint = InferEndpoint(starlette, 1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=endpoint), base_url="http://gw") as http:
        early = await http.get("/metrics")
        assert early.status_code == 503 and "starting" in early.json()["error"]
        starlette.state.services = empty_services()
        starlette.state.metrics = build_registry(endpoint.counts, starlette.state.services)
        endpoint.counts.record("m", "1", 200, 0.001)
        resp = await http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"] == CONTENT_TYPE
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    assert families["gateway_infer_requests"].type == "counter"
    assert families["gateway_infer_request_duration_seconds"].type == "histogram"
    assert families["gateway_instance_up"].type == "gauge"


def test_each_app_has_its_own_registry_and_the_default_one_stays_clean() -> None:
    one, two = InferCounts(), InferCounts()
    one.record("m", "1", 200, 0.001)
    two.record("m", "1", 200, 0.001)
    two.record("m", "1", 200, 0.001)
    first, second = build_registry(one, empty_services()), build_registry(two, empty_services())
    assert value(samples(first), "gateway_infer_requests_total", model="m", version="1", code="200") == 1
    assert value(samples(second), "gateway_infer_requests_total", model="m", version="1", code="200") == 2
    assert not [m.name for m in prometheus_client.REGISTRY.collect() if m.name.startswith("gateway_")]
