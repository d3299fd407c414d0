"""Raw answers: the infer endpoint answers a repeated request with the stored bytes of the first
answer, before decoding, and keeps every promise of the response cache. A real pipeline and
cache behind the real endpoint; a fake router and metadata (no network)."""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any

import msgpack
import numpy as np
import orjson
import pytest

from gateway.batcher import BatchResult, NothingToSend
from gateway.cache import ResponseCache, raw_key
from gateway.config import BatchingConfig, CacheConfig
from gateway.errors import UpstreamError
from gateway.infer_endpoint import InferEndpoint, read_headers
from gateway.models import ModelInfo
from gateway.pipeline import InferencePipeline
from gateway.rollout import ModelRollout, Rollouts
from gateway.tensors import Tensor
from model_fixtures import INFO


class Metadata:
    def fresh(self, model: str, version: str) -> ModelInfo:
        return INFO

    async def get(self, model: str, version: str) -> ModelInfo:
        return INFO


class Router:
    """Answers y = 2x (+ the version number, so versions answer differently); can be told to fail."""

    def __init__(self) -> None:
        self.newest = "1"
        self.calls: list[str] = []
        self.fail = False
        self.instances: list = []  # no repository index: errors are counted under model "" (metrics)

    def newest_version(self, model: str) -> str:
        return self.newest

    def available(self, model: str, version: str) -> bool:
        return True

    def routable_count(self) -> int:
        return 1

    async def infer(self, model, version, inputs, parameters=None, deadline=None, outputs=None, affinity=None):  # noqa: ANN001, ANN201
        if callable(inputs):
            inputs = inputs()
            if inputs is None:  # nobody wants the answer any more (the router's contract)
                raise NothingToSend
        self.calls.append(version)
        if self.fail:
            raise UpstreamError("Triton failed", status=502)
        return BatchResult(version, [Tensor("y", "FP32", inputs[0].data * 2 + float(version))])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stack(cache: CacheConfig | None = None, rollouts: Rollouts | None = None, clock: Clock | None = None):  # noqa: ANN201
    router = Router()
    cache_obj = ResponseCache(cache or CacheConfig(enabled=True), clock=clock or Clock())
    pipeline = InferencePipeline(
        BatchingConfig(enabled=False), router, Metadata(), cache=cache_obj, rollouts=rollouts  # type: ignore[arg-type]
    )
    app = types.SimpleNamespace(state=types.SimpleNamespace(services=types.SimpleNamespace(router=router, pipeline=pipeline)))
    return InferEndpoint(app, 1 << 20), router, cache_obj


def json_body(x: list[float], request_id: str | None = None, **extra: Any) -> bytes:
    doc: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": x}], **extra}
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


async def post(
    endpoint: InferEndpoint,
    body: bytes,
    path: str = "/v2/models/m/infer",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, dict[bytes, bytes], bytes, list[tuple[bytes, bytes]]]:
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers or [(b"content-type", b"application/json")]}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body}

    async def send(message: dict) -> None:
        sent.append(message)

    await endpoint(scope, receive, send)
    start, end = sent
    return start["status"], dict(start["headers"]), end["body"], list(start["headers"])


def without_x_cache(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers but those saying where an answer came from (``X-Cache``) and its ``Age``."""
    return [h for h in headers if h[0] not in (b"x-cache", b"age")]


async def test_a_repeat_is_the_first_answer_byte_for_byte_and_costs_nothing_upstream() -> None:
    endpoint, router, cache = stack()
    body = json_body([1.0, 2.0], request_id="abc")
    status, headers, first, raw_headers = await post(endpoint, body)
    assert status == 200 and headers[b"x-cache"] == b"miss" and orjson.loads(first)["id"] == "abc"
    status, headers2, second, raw_headers2 = await post(endpoint, body)
    assert status == 200 and headers2[b"x-cache"] == b"hit" and second == first
    assert without_x_cache(raw_headers2) == without_x_cache(raw_headers)  # header order too
    assert b"age" not in headers and headers2[b"age"] == b"0"
    assert headers2[b"model-version"] == b"1" and orjson.loads(second)["model_version"] == "1"
    assert router.calls == ["1"]
    stats = cache.snapshot()["models"]["m"]
    assert (stats["hits"], stats["raw_hits"], stats["misses"]) == (1, 1, 1)


async def test_another_id_or_wire_format_is_another_raw_answer_with_its_own_bytes() -> None:
    endpoint, router, cache = stack()
    await post(endpoint, json_body([1.0, 2.0], request_id="a"))
    _, headers, other, _ = await post(endpoint, json_body([1.0, 2.0], request_id="b"))
    assert headers[b"x-cache"] == b"hit" and orjson.loads(other)["id"] == "b"  # the tensors' entry, not "a"'s bytes
    packed = msgpack.packb({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                        "data": np.array([1, 2], np.float32).tobytes()}]})  # fmt: skip
    mp = [(b"content-type", b"application/msgpack")]
    _, h1, m1, _ = await post(endpoint, packed, headers=mp)
    _, h2, m2, _ = await post(endpoint, packed, headers=mp)
    assert (h1[b"x-cache"], h2[b"x-cache"]) == (b"hit", b"hit") and m1 == m2 and h2[b"content-type"] == b"application/msgpack"
    assert router.calls == ["1"] and cache.snapshot()["models"]["m"]["raw_hits"] == 1


@pytest.mark.parametrize(
    "headers, cached",
    [
        ([(b"cache-control", b"no-cache")], False),
        ([(b"cache-control", b"No-Store")], False),
        ([(b"cache-control", b"max-age=0")], False),  # no stored answer is fresh enough
        ([(b"cache-control", b"max-age = 0, private")], False),
        ([(b"cache-control", b"max-age=600")], True),
        ([(b"cache-control", b"max-age=05")], True),
        ([(b"pragma", b"no-cache")], False),  # HTTP/1.0's way to ask for a fresh answer
        ([(b"pragma", b"no-cache"), (b"cache-control", b"max-age=60")], True),  # Cache-Control overrides Pragma
        ([(b"cache-control", b"max-age=60"), (b"pragma", b"no-cache")], True),
        ([(b"pragma", b"x-other")], True),
        ([(b"cache-control", b"no-cache"), (b"cache-control", b"max-age=5")], False),  # repeated lines: one list
        ([(b"cache-control", b"max-age=5"), (b"cache-control", b"no-store")], False),
        ([(b"pragma", b"no-cache"), (b"pragma", b"x-other")], False),
        ([], True),
    ],
)
def test_cache_control_and_pragma_headers_decide_whether_the_cache_may_answer(headers: list, cached: bool) -> None:
    assert read_headers(headers, (), 0.0).freshness.use is cached


JSON = (b"content-type", b"application/json")


async def test_a_hit_says_its_age_and_a_max_age_refuses_an_older_one() -> None:
    clock = Clock()
    endpoint, router, cache = stack(clock=clock)
    body = json_body([1.0, 2.0])
    assert b"age" not in (await post(endpoint, body))[1]  # the miss: computed now
    clock.now += 7.6
    _, hit, first, _ = await post(endpoint, body)
    assert (hit[b"x-cache"], hit[b"age"]) == (b"hit", b"7")  # whole seconds, rounded down
    _, fresh, again, _ = await post(endpoint, body, headers=[JSON, (b"cache-control", b"max-age=5")])
    assert fresh[b"x-cache"] == b"miss" and b"age" not in fresh and again == first and router.calls == ["1", "1"]
    _, hit, _, _ = await post(endpoint, body)  # the fresh answer replaced the old one
    assert (hit[b"x-cache"], hit[b"age"]) == (b"hit", b"0")
    clock.now += 3.0
    _, hit, _, _ = await post(endpoint, body, headers=[JSON, (b"cache-control", b"max-age=5")])
    assert (hit[b"x-cache"], hit[b"age"]) == (b"hit", b"3") and len(router.calls) == 2


async def test_a_min_fresh_refuses_an_answer_too_near_the_end_of_its_ttl() -> None:
    clock = Clock()
    endpoint, router, _ = stack(CacheConfig(enabled=True, ttl_s=10.0), clock=clock)
    body = json_body([1.0, 2.0])
    await post(endpoint, body)
    clock.now += 4.0  # 6 s of its TTL left
    _, hit, _, _ = await post(endpoint, body, headers=[JSON, (b"cache-control", b"min-fresh=6")])
    assert hit[b"x-cache"] == b"hit" and len(router.calls) == 1
    clock.now += 0.5
    _, fresh, _, _ = await post(endpoint, body, headers=[JSON, (b"cache-control", b"min-fresh=6")])
    assert fresh[b"x-cache"] == b"miss" and len(router.calls) == 2


async def test_a_hit_on_the_tensors_entry_says_the_age_of_the_computation() -> None:
    """A msgpack request for tensors a JSON request had computed: the entry's age, not the
    time its first msgpack answer was encoded; and so for that answer's raw bytes after."""
    clock = Clock()
    endpoint, router, _ = stack(clock=clock)
    await post(endpoint, json_body([1.0, 2.0]))
    clock.now += 4.2
    packed = msgpack.packb({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                        "data": np.array([1, 2], np.float32).tobytes()}]})  # fmt: skip
    mp = [(b"content-type", b"application/msgpack")]
    _, h1, _, _ = await post(endpoint, packed, headers=mp)
    clock.now += 2.0
    _, h2, _, _ = await post(endpoint, packed, headers=mp)  # its raw bytes, kept from the answer above
    assert (h1[b"x-cache"], h1[b"age"], h2[b"x-cache"], h2[b"age"]) == (b"hit", b"4", b"hit", b"6")
    assert router.calls == ["1"]


async def test_only_if_cached_is_answered_from_the_cache_or_504_never_computed() -> None:
    endpoint, router, _ = stack()
    body = json_body([1.0, 2.0])
    only = [JSON, (b"cache-control", b"only-if-cached")]
    status, _, error, _ = await post(endpoint, body, headers=only)
    assert status == 504 and "only-if-cached" in orjson.loads(error)["error"] and router.calls == []
    await post(endpoint, body)
    status, headers, _, _ = await post(endpoint, body, headers=only)
    assert (status, headers[b"x-cache"]) == (200, b"hit")
    status, _, error, _ = await post(endpoint, body, headers=[JSON, (b"cache-control", b"only-if-cached, no-cache")])
    assert status == 504 and "asks for a fresh answer" in orjson.loads(error)["error"]
    status, _, error, _ = await post(endpoint, json_body([1.0, 2.0], parameters={"priority": 1}), headers=only)
    assert status == 504 and "never cached" in orjson.loads(error)["error"]
    assert router.calls == ["1"]


async def test_only_if_cached_while_the_fleet_names_no_version_says_so() -> None:
    endpoint, router, _ = stack()
    router.newest = ""  # no instance has said which versions it holds yet
    status, _, error, _ = await post(endpoint, json_body([1.0, 2.0]), headers=[JSON, (b"cache-control", b"only-if-cached")])
    assert status == 504 and "does not say yet which version" in orjson.loads(error)["error"] and router.calls == []


async def test_only_if_cached_refusals_never_count_against_a_canary() -> None:
    rollouts = Rollouts(seed=0)
    rollouts.set_models({"m": ModelRollout("1", "2", 1.0)})
    endpoint, router, _ = stack(rollouts=rollouts)
    for i in range(20):
        status, headers, _, _ = await post(endpoint, json_body([float(i), 0.0]), headers=[JSON, (b"cache-control", b"only-if-cached")])
        assert status == 504
    window = rollouts.snapshot()["models"]["m"]["windows"].get("2", {})
    assert window.get("requests", 0) == 0 and rollouts.states["m"].status == "canary" and router.calls == []


async def test_only_if_cached_on_a_model_without_the_cache_is_504() -> None:
    endpoint, router, _ = stack(CacheConfig(enabled=False, models={"other": CacheConfig(enabled=True)}))
    status, _, error, _ = await post(endpoint, json_body([1.0, 2.0]), headers=[JSON, (b"cache-control", b"only-if-cached")])
    assert status == 504 and "response cache off" in orjson.loads(error)["error"] and router.calls == []


async def test_bypass_header_parameters_and_errors_are_never_answered_from_raw_bytes() -> None:
    endpoint, router, cache = stack()
    body = json_body([3.0, 4.0])
    no_cache = [(b"content-type", b"application/json"), (b"cache-control", b"no-cache")]
    assert (await post(endpoint, body, headers=no_cache))[1][b"x-cache"] == b"bypass"
    assert (await post(endpoint, body, headers=no_cache))[1][b"x-cache"] == b"bypass"
    with_params = json_body([3.0, 4.0], parameters={"priority": 1})
    assert (await post(endpoint, with_params))[1][b"x-cache"] == b"bypass"
    assert (await post(endpoint, with_params))[1][b"x-cache"] == b"bypass"
    assert len(router.calls) == 4
    router.fail = True
    failing = json_body([5.0, 6.0])
    assert (await post(endpoint, failing))[0] == 502
    router.fail = False
    status, headers, _, _ = await post(endpoint, failing)
    assert status == 200 and headers[b"x-cache"] == b"miss"
    assert (await post(endpoint, failing))[1][b"x-cache"] == b"hit"


async def test_raw_answers_expire_are_dropped_with_their_version_and_count_in_the_byte_bound() -> None:
    clock = Clock()
    endpoint, router, cache = stack(CacheConfig(enabled=True, ttl_s=10.0), clock=clock)
    body = json_body([1.0, 1.0])
    await post(endpoint, body)
    assert cache.store.bytes > 0 and len(cache.store._entries) == 2  # the tensors' entry and the raw answer
    assert (await post(endpoint, body))[1][b"x-cache"] == b"hit"
    clock.now += 11
    assert (await post(endpoint, body))[1][b"x-cache"] == b"miss"
    cache.drop_version("m", "1")
    assert cache.store.bytes == 0
    assert (await post(endpoint, body))[1][b"x-cache"] == b"miss"
    assert router.calls == ["1", "1", "1"]


async def test_an_answer_computed_across_a_version_drop_is_not_kept() -> None:
    endpoint, router, cache = stack()
    original = router.infer

    async def dropping(*args: Any, **kwargs: Any) -> BatchResult:
        result = await original(*args, **kwargs)
        cache.drop_version("m", "1")  # Triton reloaded the version while this was computed
        return result

    router.infer = dropping  # type: ignore[method-assign]
    body = json_body([7.0, 7.0])
    assert (await post(endpoint, body))[1][b"x-cache"] == b"miss"
    router.infer = original  # type: ignore[method-assign]
    assert (await post(endpoint, body))[1][b"x-cache"] == b"miss" and cache.store.bytes > 0


async def test_a_model_with_the_cache_off_gets_no_raw_answers() -> None:
    config = CacheConfig(enabled=True, models={"m": CacheConfig(enabled=False)})
    endpoint, router, cache = stack(config)
    body = json_body([1.0, 2.0])
    for _ in range(2):
        _, headers, _, _ = await post(endpoint, body)
        assert b"x-cache" not in headers
    assert router.calls == ["1", "1"] and cache.store.bytes == 0


async def test_a_model_share_bounds_raw_answers_too() -> None:
    endpoint, router, cache = stack(CacheConfig(enabled=True, max_bytes=4096, max_share=0.5))
    for i in range(20):
        await post(endpoint, json_body([float(i), 0.0]))
    assert 0 < cache.snapshot()["models"]["m"]["bytes"] <= 2048 and cache.snapshot()["models"]["m"]["evictions"] > 0


async def test_a_named_version_is_its_own_raw_answer() -> None:
    endpoint, router, cache = stack()
    body = json_body([1.0, 2.0])
    await post(endpoint, body)
    router.newest = "2"
    _, headers, answer, _ = await post(endpoint, body)  # the default moved on: not version 1's bytes
    assert headers[b"x-cache"] == b"miss" and headers[b"model-version"] == b"2" and orjson.loads(answer)["model_version"] == "2"
    _, headers, answer, _ = await post(endpoint, body, path="/v2/models/m/versions/1/infer")
    assert headers[b"x-cache"] == b"hit" and headers[b"model-version"] == b"1"
    assert router.calls == ["1", "2"]


async def test_the_canary_split_is_chosen_once_per_request_and_hits_count_for_the_trial_not_its_windows() -> None:
    rollouts = Rollouts(seed=1)
    rollouts.set_models({"m": ModelRollout("1", "2", 0.3)})
    endpoint, router, cache = stack(rollouts=rollouts)
    served = {"1": 0, "2": 0}
    bodies = [json_body([float(i % 5), 0.0]) for i in range(400)]
    for body in bodies:
        _, headers, answer, _ = await post(endpoint, body)
        version = headers[b"model-version"].decode()
        assert orjson.loads(answer)["model_version"] == version
        served[version] += 1
    # Every request counted once, for the version that answered it.
    assert rollouts.served == {("m", "1"): served["1"], ("m", "2"): served["2"]}
    # The split holds for hits and misses alike (0.3 of 400 = 120; 5 sigma is about 46).
    assert abs(served["2"] - 120) < 46, served
    assert cache.snapshot()["models"]["m"]["raw_hits"] >= 380
    # Every canary request counts for the trial; its rollback window holds only what version 2
    # computed (at most the 5 distinct inputs), not the hits.
    assert rollouts.states["m"].step_requests == served["2"]
    assert 0 < rollouts.snapshot()["models"]["m"]["windows"]["2"]["requests"] <= 5


async def shadowed():  # noqa: ANN201
    """A stack whose model's version 3 shadows every request to version 1, and which answered
    one request: (the stack, its rollouts, that request's body)."""
    rollouts = Rollouts(seed=0)
    rollouts.set_models({"m": ModelRollout("1", shadow="3", shadow_share=1.0)})
    endpoint, router, cache = stack(rollouts=rollouts)
    body = json_body([1.0, 2.0])
    await post(endpoint, body)
    return (endpoint, router, cache), rollouts, body


async def test_a_shadowed_rollout_takes_the_full_path_so_requests_are_mirrored() -> None:
    (endpoint, router, cache), rollouts, body = await shadowed()
    _, headers, _, _ = await post(endpoint, body)
    await endpoint.app.state.services.pipeline.close(1.0)
    assert headers[b"x-cache"] == b"hit" and cache.snapshot()["models"]["m"]["raw_hits"] == 0
    assert rollouts.snapshot()["models"]["m"]["shadow"]["sent"] == 2


async def test_a_request_for_a_stored_answer_only_is_not_mirrored_to_the_shadow() -> None:
    (endpoint, router, _), rollouts, body = await shadowed()
    status, headers, _, _ = await post(endpoint, body, headers=[JSON, (b"cache-control", b"only-if-cached")])
    await endpoint.app.state.services.pipeline.close(1.0)
    assert (status, headers[b"x-cache"]) == (200, b"hit")
    assert rollouts.snapshot()["models"]["m"]["shadow"]["sent"] == 1 and sorted(router.calls) == ["1", "3"]


# -- requests the HTTP protocol serves itself (gateway/protocol/infer_server.py) -------------


def arriving(body: bytes, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]


async def test_the_protocol_is_answered_the_asgi_paths_stored_bytes_and_counts_them_the_same_way() -> None:
    endpoint, router, cache = stack()
    body = json_body([1.0, 2.0], request_id="abc")
    url = b"/v2/models/m/infer"
    target = endpoint.may_serve(url, arriving(body))
    assert target == ("m", "")
    key = raw_key("m", "1", b"application/json", None, body)
    assert endpoint.answer_from_cache(target, arriving(body), body, 0.0) == (None, (("1", False), key))  # nothing stored yet
    _, _, first, raw_headers = await post(endpoint, body)  # the miss, on the ASGI path, stores it
    answer, _ = endpoint.answer_from_cache(target, arriving(body), body, 0.0)
    assert answer is not None and answer.body == first
    assert without_x_cache(list(answer.headers)) == without_x_cache(raw_headers) and (b"x-cache", b"hit") in answer.headers
    assert answer.head == b"".join(b"%s: %s\r\n" % h for h in answer.headers)
    stats = cache.snapshot()["models"]["m"]
    assert (stats["hits"], stats["raw_hits"], stats["misses"]) == (1, 1, 1) and router.calls == ["1"]
    answered = {key: sum(row[:-1]) for key, row in endpoint.counts.rows.items()}
    assert answered == {("m", "1", 200, "miss"): 1, ("m", "1", 200, "hit"): 1}  # each once, by where it came from
    # A bypass, a passed deadline, a malformed header: not answered here (the ASGI path answers them).
    assert endpoint.answer_from_cache(target, arriving(body, (b"cache-control", b"no-cache")), body, 0.0)[0] is None
    assert endpoint.answer_from_cache(target, arriving(body, (b"x-request-timeout-ms", b"1")), body, 0.0)[0] is None
    assert endpoint.answer_from_cache(target, arriving(body, (b"x-request-timeout-ms", b"soon")), body, 0.0)[0] is None
    assert cache.snapshot()["models"]["m"]["hits"] == 1
    assert {key: sum(row[:-1]) for key, row in endpoint.counts.rows.items()} == answered  # none of them counted


def test_the_protocol_holds_only_small_plain_infer_requests() -> None:
    config = CacheConfig(enabled=True, models={"off": CacheConfig(enabled=False)})
    endpoint, _, _ = stack(config)
    small = arriving(b"x" * 100)
    assert endpoint.may_serve(b"/v2/models/m/infer", small) == ("m", "")
    assert endpoint.may_serve(b"/v2/models/m/versions/2/infer", small) == ("m", "2")
    assert endpoint.may_serve(b"/v2/models/off/infer", small) == ("off", "")  # served, never looked up
    assert endpoint.answer_from_cache(("off", ""), small, b"x" * 100, 0.0) == (None, (None, None))
    assert endpoint.may_serve(b"/v2/models/m/ready", small) is None
    assert endpoint.may_serve(b"/v2/models/m/versions/x/infer", small) is None  # a 400, the ASGI path's
    assert endpoint.may_serve(b"/v2/models/m%2Fx/infer", small) is None
    assert endpoint.may_serve(b"/v2/models/m/infer?x=1", small) is None
    assert endpoint.may_serve(b"/v2/models/m/infer", [(b"content-type", b"application/json")]) is None
    assert endpoint.may_serve(b"/v2/models/m/infer", [*small, (b"content-encoding", b"gzip")]) is None
    assert endpoint.may_serve(b"/v2/models/m/infer", [*small, (b"transfer-encoding", b"chunked")]) is None
    assert endpoint.may_serve(b"/v2/models/m/infer", arriving(b"x" * 70000)) is None
    no_cache, _, _ = stack(CacheConfig(enabled=False))
    no_cache.app.state.services.pipeline.cache = None
    assert no_cache.may_serve(b"/v2/models/m/infer", small) == ("m", "")
    assert no_cache.answer_from_cache(("m", ""), small, b"x" * 100, 0.0) == (None, (None, None))


async def serve_held(
    endpoint: InferEndpoint, body: bytes, looked: Any = (None, None), start: float = 0.0, gone: Any = lambda: False,
    headers: list[tuple[bytes, bytes]] | None = None, url: bytes = b"/v2/models/m/infer",
) -> tuple[int, dict[bytes, bytes], bytes]:  # fmt: skip
    headers = headers if headers is not None else arriving(body)
    target = endpoint.may_serve(url, headers)
    assert target is not None
    reply = await endpoint.serve_held(url, target, headers, body, start, looked, gone)
    assert reply is not None
    head = b"".join(b"%s: %s\r\n" % h for h in reply.headers)
    assert reply.head is None or reply.head == head
    return reply.status, dict(reply.headers), reply.body


async def test_the_protocol_serves_what_the_asgi_path_serves_errors_included() -> None:
    endpoint, router, cache = stack(CacheConfig(enabled=False))
    endpoint.app.state.services.pipeline.cache = None
    body = json_body([1.0, 2.0])
    status, headers, served = await serve_held(endpoint, body)
    _, asgi_headers, asgi_body, _ = await post(endpoint, body, headers=arriving(body))
    assert status == 200 and served == asgi_body and headers == asgi_headers
    assert orjson.loads(served)["outputs"][0]["data"] == [3.0, 5.0]  # 2x + version 1
    assert sum(endpoint.counts.rows[("m", "1", 200, "")][:-1]) == 2  # "": no cache had a part in it
    bad = b'{"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}'
    status, headers, error = await serve_held(endpoint, bad)
    assert status == 400 and b"nope" in error and headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(error)
    status, _, error = await serve_held(endpoint, b"{not json")
    assert status == 400
    router.fail = True
    status, _, error = await serve_held(endpoint, json_body([7.0, 8.0]))
    assert status == 502 and b"Triton failed" in error


async def test_a_request_whose_client_left_while_served_is_not_answered_and_counted_apart() -> None:
    endpoint, router, _ = stack(CacheConfig(enabled=False))
    endpoint.app.state.services.pipeline.cache = None
    body = json_body([1.0, 2.0])
    target = endpoint.may_serve(b"/v2/models/m/infer", arriving(body))
    reply = await endpoint.serve_held(b"/v2/models/m/infer", target, arriving(body), body, 0.0, (None, None), lambda: True)
    assert reply is None and router.calls == []  # dropped before it was sent upstream
    assert endpoint.counts.disconnects == {"": 1}  # the test router knows no repository index


@pytest.mark.parametrize("cached", [False, True])
async def test_a_client_that_left_while_its_request_was_upstream_is_counted_apart(cached: bool) -> None:
    """Sent upstream before its client left, so computed (and kept, with the cache); but the
    answer reaches nobody: counted as a client gone, not as a 200."""
    endpoint, router, _ = stack(CacheConfig(enabled=cached))
    if not cached:
        endpoint.app.state.services.pipeline.cache = None
    left: list[bool] = []
    answer = router.infer

    async def leaving(*args: Any, **kwargs: Any) -> BatchResult:
        result = await answer(*args, **kwargs)
        left.append(True)  # the client closes its connection while Triton computes
        return result

    router.infer = leaving  # type: ignore[method-assign]
    body = json_body([1.0, 2.0])
    target = endpoint.may_serve(b"/v2/models/m/infer", arriving(body))
    reply = await endpoint.serve_held(b"/v2/models/m/infer", target, arriving(body), body, 0.0, (None, None), lambda: bool(left))
    assert reply is None and router.calls == ["1"]
    assert endpoint.counts.disconnects == {"": 1} and endpoint.counts.rows == {}
    if cached:  # the answer computed is kept for the next request
        status, headers, _, _ = await post(endpoint, body)
        assert status == 200 and headers[b"x-cache"] == b"hit"


def test_a_request_the_protocol_answered_500_itself_is_counted_as_a_500() -> None:
    endpoint, _, _ = stack(CacheConfig(enabled=False))
    endpoint.request_failed(("m", ""), time.monotonic() - 0.2)
    ((labels, row),) = endpoint.counts.rows.items()
    assert labels == ("", "", 500, "")  # the test router knows no repository index
    assert sum(row[:-1]) == 1 and row[-1] >= 0.2  # one request, its time since arrival


async def test_a_request_the_protocol_held_keeps_its_arrival_and_its_rollout_choice() -> None:
    """A miss in the protocol is served with the version drawn for it: the canary's share is
    drawn once per request, not again on the full path."""
    rollouts = Rollouts(seed=3)
    rollouts.set_models({"m": ModelRollout("1", "2", 0.5)})
    endpoint, router, cache = stack(rollouts=rollouts)
    url = b"/v2/models/m/infer"
    for i in range(40):
        body = json_body([float(i), 1.0])
        answer, looked = endpoint.answer_from_cache(("m", ""), arriving(body), body, 5.0)
        chosen, key = looked
        assert answer is None and chosen is not None and chosen[1]  # drawn by the rollout
        assert key == raw_key("m", chosen[0], b"application/json", None, body)  # looked up under it
        _, headers, _ = await serve_held(endpoint, body, looked, start=5.0)
        assert headers[b"model-version"] == chosen[0].encode()
        assert cache.store.get(key, 0.0) is not None  # kept under the key it was looked up under
    assert sum(rollouts.served.values()) == 40  # each request counted once for its version
    row_seconds = endpoint.counts.rows  # timed from the arrival handed on (5.0), long before now
    assert all(row[-1] > 1.0 for row in row_seconds.values())


async def test_answers_say_their_format_binary_with_the_json_header_length() -> None:
    endpoint, _, _ = stack(CacheConfig(enabled=False))
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    header = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}],
                           "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})  # fmt: skip
    binary = [(b"content-type", b"application/octet-stream"), (b"inference-header-content-length", str(len(header)).encode())]
    status, headers, body, _ = await post(endpoint, header + x.tobytes(), headers=binary)
    length = int(headers[b"inference-header-content-length"])
    assert status == 200 and headers[b"content-type"] == b"application/octet-stream"
    assert orjson.loads(body[:length])["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(body[length:], dtype="<f4").tolist() == [3.0, 5.0]  # 2x + version 1
    status, headers, body, _ = await post(endpoint, json_body([1.0, 2.0]))
    assert status == 200 and headers[b"content-type"] == b"application/json"
    assert b"inference-header-content-length" not in headers and orjson.loads(body)["outputs"][0]["data"] == [3.0, 5.0]


async def test_an_answer_from_another_version_than_the_one_looked_up_is_kept_under_its_own_key() -> None:
    """The version chosen for a request left the fleet before it was served, so another one
    answered it: that answer must not be kept under the first version's key."""
    endpoint, router, cache = stack()
    body = json_body([1.0, 2.0])
    url = b"/v2/models/m/infer"
    answer, looked = endpoint.answer_from_cache(("m", ""), arriving(body), body, 0.0)
    assert answer is None and looked[0] == ("1", False)
    serve = router.infer

    async def vanishing(model, version, inputs, parameters=None, deadline=None, outputs=None, affinity=None):  # noqa: ANN001, ANN202
        if version == "1":
            router.newest = "2"
            raise UpstreamError("Request for unknown model: 'm' version 1 is not found", status=400)
        return await serve(model, version, inputs, parameters, deadline)

    router.infer = vanishing
    status, headers, _ = await serve_held(endpoint, body, looked)
    assert status == 200 and headers[b"model-version"] == b"2"
    assert cache.store.get(looked[1], 0.0) is None  # nothing under version 1's key
    assert cache.store.get(raw_key("m", "2", b"application/json", None, body), 0.0) is not None


async def test_a_request_whose_deadline_passes_leaves_its_computation_to_an_identical_one() -> None:
    """Two identical requests in flight share one inference; the first one's deadline passing
    (504 for it) neither cancels that inference nor makes the second one start another."""
    endpoint, router, _ = stack()
    release = asyncio.Event()
    serve = router.infer

    started: list[str] = []

    async def slow(model, version, inputs, parameters=None, deadline=None, outputs=None, affinity=None):  # noqa: ANN001, ANN202
        started.append(version)
        await release.wait()
        return await serve(model, version, inputs, parameters, deadline)

    router.infer = slow
    body = json_body([3.0, 4.0])
    headers = [(b"content-type", b"application/json"), (b"x-request-timeout-ms", b"30")]
    hurried = asyncio.create_task(post(endpoint, body, headers=headers))
    await asyncio.sleep(0)
    patient = asyncio.create_task(post(endpoint, body))
    status, _, _, _ = await hurried
    assert status == 504
    release.set()
    status, headers, answer, _ = await patient
    assert status == 200 and orjson.loads(answer)["outputs"][0]["data"] == [7.0, 9.0]
    assert started == ["1"] and router.calls == ["1"]  # one inference, shared


@pytest.mark.parametrize(
    "path, extra",
    [
        ("/v2/models/m/versions/abc/infer", []),  # a bad version in the path
        ("/v2/models/m/infer", [(b"x-request-timeout-ms", b"soon")]),  # a bad header
        ("/v2/models/m/infer", [(b"content-encoding", b"br")]),
    ],
)
async def test_an_error_before_the_body_is_read_is_answered_in_msgpack_to_a_msgpack_client(path: str, extra: list) -> None:
    endpoint, _, _ = stack()
    status, headers, body, _ = await post(endpoint, b"\x80", path, headers=[(b"content-type", b"application/msgpack"), *extra])
    assert status in (400, 415) and headers[b"content-type"] == b"application/msgpack"
    assert set(msgpack.unpackb(body)) == {"error"}
