"""The response cache in front of a real Triton instance: cached answers are byte-identical to
computed ones in every wire format, identical concurrent requests cost one inference (Triton's
own statistics say so), the bypass header, the freshness a client asks for and the counters
work, and answers stay right.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import fleet
import conftest
from conftest import gateway_config, running_gateway
from gateway.client import GatewayClient
from gateway.protocol.v2 import deserialize_bytes
from served_models import ATOL, DIGITS, MODEL_REPOSITORY, torch_reference

pytestmark = pytest.mark.integration

TRITON_PORT = 8145
GATEWAY_PORT = 8146
PATH = f"/v2/models/{DIGITS.name}/infer"


class Stack(conftest.Stack):
    def inferences(self) -> int:
        """Rows Triton itself has run for the digits model (its own statistics)."""
        stats = httpx.get(f"{self.triton.http_urls[0]}/v2/models/{DIGITS.name}/stats").json()
        return sum(s["inference_count"] for s in stats["model_stats"])


@pytest.fixture(scope="module")
def stack(fleet_module_factory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # noqa: ANN001
    triton = fleet_module_factory(1, TRITON_PORT)
    config = gateway_config(triton.http_urls, GATEWAY_PORT, cache={"enabled": True, "ttl_s": 300.0})
    with running_gateway(config, GATEWAY_PORT, tmp_path_factory.mktemp("gateway")) as gw:
        yield Stack(triton, gw)


def images(start: int, rows: int = 1) -> np.ndarray:
    return DIGITS.splits().x_test[start : start + rows].astype(np.float32)


def json_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


def binary_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = (
        b'{"inputs":[{"name":"image","datatype":"FP32","shape":%s,"parameters":{"binary_data_size":%d}}],'
        b'"parameters":{"binary_data_output":true}}' % (str(list(x.shape)).replace(" ", "").encode(), x.nbytes)
    )
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def msgpack_body(x: np.ndarray) -> bytes:
    return msgpack.packb(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.tobytes()}]}, use_bin_type=True
    )


def test_cached_answers_are_byte_identical_in_every_wire_format_and_right(stack: Stack) -> None:
    x = images(0, 2)
    _, ref_probs = torch_reference(DIGITS.name, x)
    before = stack.inferences()
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        first = http.post(PATH, json=json_body(x))
        assert first.status_code == 200 and first.headers["x-cache"] == "miss", first.text
        again = http.post(PATH, json=json_body(x))
        assert again.headers["x-cache"] == "hit" and again.content == first.content
        body, headers = binary_body(x)
        binary = [http.post(PATH, content=body, headers=headers) for _ in range(2)]
        assert [r.headers["x-cache"] for r in binary] == ["hit", "hit"]  # the JSON request's entry
        assert binary[0].content == binary[1].content
        packed = [
            http.post(PATH, content=msgpack_body(x), headers={"Content-Type": "application/msgpack"}) for _ in range(2)
        ]
        assert [r.headers["x-cache"] for r in packed] == ["hit", "hit"] and packed[0].content == packed[1].content
    assert stack.inferences() - before == 2  # the two rows, computed once for all six answers
    probs = np.asarray({o["name"]: o for o in first.json()["outputs"]}["probabilities"]["data"], np.float32)
    np.testing.assert_allclose(probs.reshape(ref_probs.shape), ref_probs, atol=ATOL, rtol=0)
    reply = msgpack.unpackb(packed[0].content)
    out = {o["name"]: o for o in reply["outputs"]}["probabilities"]
    np.testing.assert_allclose(np.frombuffer(out["data"], "<f4").reshape(ref_probs.shape), ref_probs, atol=ATOL, rtol=0)


async def test_a_hundred_identical_concurrent_requests_cost_one_inference(stack: Stack) -> None:
    x = images(10)
    _, ref_probs = torch_reference(DIGITS.name, x)
    before = stack.inferences()
    async with GatewayClient(stack.gateway.url) as client:
        results = await asyncio.gather(*(client.infer(DIGITS.name, {"image": x}, outputs=["probabilities"]) for _ in range(100)))
    for r in results:
        np.testing.assert_allclose(r.outputs["probabilities"], ref_probs, atol=ATOL, rtol=0)
    assert stack.inferences() - before == 1
    counters = httpx.get(f"{stack.gateway.url}/v2/gateway/cache").json()["models"][DIGITS.name]
    assert counters["misses"] >= 1 and counters["hits"] + counters["coalesced"] >= 99


def test_the_bypass_header_computes_afresh_and_the_counters_move(stack: Stack) -> None:
    x = images(20)
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        http.post(PATH, json=json_body(x))
        before_counters = http.get("/v2/gateway/cache").json()["models"][DIGITS.name]
        before = stack.inferences()
        fresh = http.post(PATH, json=json_body(x), headers={"Cache-Control": "no-cache"})
        assert fresh.status_code == 200 and fresh.headers["x-cache"] == "bypass"
        assert stack.inferences() - before == 1
        hit = http.post(PATH, json=json_body(x))
        assert hit.headers["x-cache"] == "hit" and stack.inferences() - before == 1
        after_counters = http.get("/v2/gateway/cache").json()
    model = after_counters["models"][DIGITS.name]
    assert model["hits"] == before_counters["hits"] + 1 and model["entries"] >= 1 and model["bytes"] > 0
    assert after_counters["enabled"] is True and after_counters["bytes"] >= model["bytes"]


def test_hits_say_their_age_and_clients_may_ask_for_a_younger_answer_or_none_computed(stack: Stack) -> None:
    x = images(60)
    _, ref_probs = torch_reference(DIGITS.name, x)
    before = stack.inferences()
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        refused = http.post(PATH, json=json_body(x), headers={"Cache-Control": "only-if-cached"})
        assert refused.status_code == 504 and "only-if-cached" in refused.json()["error"]
        assert stack.inferences() == before  # nothing computed for it
        first = http.post(PATH, json=json_body(x))
        assert first.headers["x-cache"] == "miss" and "age" not in first.headers
        time.sleep(1.2)
        hit = http.post(PATH, json=json_body(x), headers={"Cache-Control": "only-if-cached"})
        assert (hit.status_code, hit.headers["x-cache"], hit.headers["age"]) == (200, "hit", "1")
        assert hit.content == first.content and stack.inferences() - before == 1
        fresh = http.post(PATH, json=json_body(x), headers={"Cache-Control": "max-age=1"})  # older than 1 s
        assert fresh.headers["x-cache"] == "miss" and stack.inferences() - before == 2
        again = http.post(PATH, json=json_body(x), headers={"Cache-Control": "max-age=1"})
        assert (again.headers["x-cache"], again.headers["age"]) == ("hit", "0") and again.content == fresh.content
    probs = np.asarray({o["name"]: o for o in fresh.json()["outputs"]}["probabilities"]["data"], np.float32)
    np.testing.assert_allclose(probs.reshape(ref_probs.shape), ref_probs, atol=ATOL, rtol=0)


def test_a_repeat_is_answered_with_the_first_answers_bytes(stack: Stack) -> None:
    """The bytes of the first answer, replayed before decoding: same headers (but X-Cache,
    Date and the hit's Age), same body (the id echoed), counted as a raw hit; another id is
    another answer."""
    x = images(30)
    body, headers = binary_body(x)
    body = body.replace(b'{"inputs"', b'{"id":"req-7","inputs"', 1)
    headers["Inference-Header-Content-Length"] = str(int(headers["Inference-Header-Content-Length"]) + len(b'"id":"req-7",'))
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        before = http.get("/v2/gateway/cache").json()["models"].get(DIGITS.name, {}).get("raw_hits", 0)
        first = http.post(PATH, content=body, headers=headers)
        second = http.post(PATH, content=body, headers=headers)
        assert (first.status_code, second.status_code) == (200, 200), first.text
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert second.content == first.content and b'"id":"req-7"' in first.content
        drop = {"x-cache", "date", "age"}
        assert [h for h in second.headers.raw if h[0].decode().lower() not in drop] == [
            h for h in first.headers.raw if h[0].decode().lower() not in drop
        ]
        assert http.get("/v2/gateway/cache").json()["models"][DIGITS.name]["raw_hits"] == before + 1
        other = body.replace(b"req-7", b"req-8")
        third = http.post(PATH, content=other, headers=headers)
        assert third.headers["x-cache"] == "hit" and b'"id":"req-8"' in third.content
        assert third.content.replace(b"req-8", b"req-7") == first.content


def test_top_classes_are_cached_apart_from_the_values_and_json_and_msgpack_share_them(stack: Stack) -> None:
    """A classification (Triton ranks the output) is its own entry, keyed by the outputs and
    class counts asked for; its JSON and msgpack forms share it, as values do."""
    x = images(40, 3)
    _, ref_probs = torch_reference(DIGITS.name, x)
    top3 = {**json_body(x), "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}
    packed = msgpack.packb({**msgpack.unpackb(msgpack_body(x)), "outputs": [{"name": "probabilities", "classification": 3}]})
    before = stack.inferences()
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        values = http.post(PATH, json=json_body(x))
        first, again = (http.post(PATH, json=top3) for _ in range(2))
        top2 = http.post(PATH, json={**top3, "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]})
        as_msgpack = http.post(PATH, content=packed, headers={"Content-Type": "application/msgpack"})
    assert [r.headers["x-cache"] for r in (values, first, again, top2, as_msgpack)] == ["miss", "miss", "hit", "miss", "hit"]
    assert again.content == first.content and stack.inferences() - before == 9  # three rows, computed three times
    ranked = first.json()["outputs"][0]
    assert ranked["datatype"] == "BYTES" and ranked["shape"] == [3, 3]
    rows = np.array(ranked["data"]).reshape(3, 3)
    for row, ref in zip(rows, ref_probs):
        assert [int(item.split(":")[1]) for item in row] == list(np.argsort(-ref, kind="stable")[:3])
        np.testing.assert_allclose([float(item.split(":")[0]) for item in row], np.sort(ref)[::-1][:3], atol=1e-5, rtol=0)
    assert [row[:2] for row in rows.tolist()] == np.array(top2.json()["outputs"][0]["data"]).reshape(3, 2).tolist()
    out = msgpack.unpackb(as_msgpack.content)["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [3, 3]
    strings = deserialize_bytes(out["data"], 9, "probabilities", ValueError)
    assert [item.decode() for item in strings] == rows.ravel().tolist()


def test_stats_count_the_cache_answers_as_triton_counts_its_cache_hits(stack: Stack) -> None:
    """One big Triton would count every request; perf_analyzer, asked for no version, reads the
    version it measured from whose queue count grew, which cached answers alone never moved."""
    x = images(50)

    def version_stats(url: str) -> dict:
        stats = httpx.get(f"{url}/v2/models/{DIGITS.name}/stats", timeout=10).json()["model_stats"]
        return next(s for s in stats if s["version"] == "1")["inference_stats"]

    before, triton_before = version_stats(stack.gateway.url), version_stats(stack.triton.http_urls[0])
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        answers = [http.post(PATH, json=json_body(x)).headers["x-cache"] for _ in range(5)]
    assert answers == ["miss", "hit", "hit", "hit", "hit"]
    after, triton_after = version_stats(stack.gateway.url), version_stats(stack.triton.http_urls[0])
    assert triton_after["queue"]["count"] - triton_before["queue"]["count"] == 1  # Triton computed one
    for key in ("queue", "success"):
        assert after[key]["count"] - before[key]["count"] == 5
    assert after["cache_hit"]["count"] - before["cache_hit"]["count"] == 4 and after["cache_hit"]["ns"] > before["cache_hit"]["ns"]


def test_errors_are_never_cached(stack: Stack) -> None:
    bad = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 7], "data": [0.0] * 56}]}
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        answers = [http.post(PATH, json=bad) for _ in range(2)]
    assert [a.status_code for a in answers] == [400, 400] and all("x-cache" not in a.headers for a in answers)


def worker_views(url: str, workers: int, timeout: float = 30.0) -> dict[int, dict]:
    """The cache view of every worker process, by pid: asked over new connections until each
    worker has answered (the kernel hands each connection to one of them)."""
    views: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(views) < workers:
        assert time.monotonic() < deadline, f"only workers {sorted(views)} answered"
        view = httpx.get(f"{url}/v2/gateway/cache", timeout=10).json()
        if view["pid"] in views:
            time.sleep(0.02)
        views[view["pid"]] = view
    return views


def test_worker_processes_share_one_cache(stack: Stack, tmp_path: Path) -> None:
    """With two workers, an answer one computed serves the other's clients, in another wire
    format too: Triton computes the rows once. The shared segment goes when the gateway stops."""
    config = gateway_config(stack.triton.http_urls, 8152, server={"workers": 2}, cache={"enabled": True, "ttl_s": 300.0})
    x = images(40, 2)
    _, ref_probs = torch_reference(DIGITS.name, x)
    with running_gateway(config, 8152, tmp_path) as gw:
        segment = Path(next(iter(worker_views(gw.url, 2).values()))["host"]["path"])
        assert segment.exists()
        before = stack.inferences()
        first = httpx.post(gw.url + PATH, json=json_body(x), timeout=30)  # each call: a new connection
        assert first.status_code == 200 and first.headers["x-cache"] == "miss", first.text
        # Until the other worker has answered some (the kernel picks the worker per connection).
        repeats: list[httpx.Response] = []
        packed: list[httpx.Response] = []
        counts: list[dict] = []
        while not any(c["host_hits"] for c in counts):
            assert len(repeats) < 200, "no request reached the worker that did not compute the answer"
            for _ in range(10):
                repeats.append(httpx.post(gw.url + PATH, json=json_body(x), timeout=30))
                packed.append(
                    httpx.post(
                        gw.url + PATH, content=msgpack_body(x), headers={"Content-Type": "application/msgpack"}, timeout=30
                    )
                )
            counts = [v["models"].get(DIGITS.name, {"host_hits": 0}) for v in worker_views(gw.url, 2).values()]
        assert all(r.headers["x-cache"] == "hit" and r.content == first.content for r in repeats)
        assert all(r.status_code == 200 and r.headers["x-cache"] == "hit" for r in packed)
        assert len({r.content for r in packed}) == 1
        assert stack.inferences() - before == 2  # the two rows, once, whichever worker answered
        assert sum(c["misses"] for c in counts) == 1
    probs = np.asarray({o["name"]: o for o in repeats[-1].json()["outputs"]}["probabilities"]["data"], np.float32)
    np.testing.assert_allclose(probs.reshape(ref_probs.shape), ref_probs, atol=ATOL, rtol=0)
    out = {o["name"]: o for o in msgpack.unpackb(packed[-1].content)["outputs"]}["probabilities"]
    np.testing.assert_allclose(np.frombuffer(out["data"], "<f4").reshape(ref_probs.shape), ref_probs, atol=ATOL, rtol=0)
    assert not segment.exists()


async def test_identical_requests_reaching_two_workers_at_once_cost_one_inference(stack: Stack, tmp_path: Path) -> None:
    """Single flight across the workers: a hundred identical requests over a hundred connections,
    answered by both workers while the first computation waits in the batcher (a 300 ms hold),
    cost Triton one inference; the worker that did not compute it counts its requests as
    coalesced with the other's."""
    config = gateway_config(
        stack.triton.http_urls,
        8154,
        server={"workers": 2},
        cache={"enabled": True, "ttl_s": 300.0},
        batching={"hold_ms": 300.0, "max_queue_delay_ms": 300.0, "hold_cpu_busy": 0.0},
    )
    with running_gateway(config, 8154, tmp_path) as gw:
        worker_views(gw.url, 2)  # both serving
        for attempt in range(5):  # until both workers took some of the connections
            x = images(50 + attempt)
            _, ref_probs = torch_reference(DIGITS.name, x)
            before = stack.inferences()
            views_before = worker_views(gw.url, 2)
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=gw.url, timeout=30, limits=limits) as http:
                answers = await asyncio.gather(*(http.post(PATH, json=json_body(x)) for _ in range(100)))
            views = worker_views(gw.url, 2)
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
            for a in answers:
                probs = np.asarray({o["name"]: o for o in a.json()["outputs"]}["probabilities"]["data"], np.float32)
                np.testing.assert_allclose(probs.reshape(ref_probs.shape), ref_probs, atol=ATOL, rtol=0)
            assert stack.inferences() - before == 1
            moved = {}
            for pid, view in views.items():
                now = view["models"][DIGITS.name] if DIGITS.name in view["models"] else {}
                was = views_before[pid]["models"].get(DIGITS.name, {})
                moved[pid] = {k: now.get(k, 0) - was.get(k, 0) for k in ("misses", "coalesced", "host_coalesced", "hits")}
            answered = [m["misses"] + m["coalesced"] + m["hits"] for m in moved.values()]
            assert sum(answered) == 100, moved
            assert sum(m["misses"] for m in moved.values()) == 1, moved
            # The worker that did not compute it: its first request waited for the other's answer.
            if min(answered) > 0 and sum(m["host_coalesced"] for m in moved.values()) == 1:
                break
        else:
            pytest.fail(f"in 5 attempts, no request waited for the other worker's computation: {moved}")


def test_metrics_of_worker_processes_add_up(stack: Stack, tmp_path: Path) -> None:
    """With two workers, every scrape of /metrics counts the requests both answered, whichever
    worker the scrape reaches; the folder they publish in goes when the gateway stops."""
    config = gateway_config(stack.triton.http_urls, 8153, server={"workers": 2}, cache={"enabled": True, "ttl_s": 300.0})
    with running_gateway(config, 8153, tmp_path) as gw:
        sent, misses = 0, [0, 0]
        while min(misses) == 0:  # until each worker has answered some (the kernel picks one per connection)
            assert sent < 200, f"one worker answered every request: {misses}"
            for _ in range(5):
                x = images(sent % 300)  # each a new input: a miss, counted by the worker that answered it
                resp = httpx.post(gw.url + PATH, json=json_body(x), timeout=30)  # a new connection each
                assert resp.status_code == 200 and resp.headers["x-cache"] == "miss", resp.text
                probs = np.asarray({o["name"]: o for o in resp.json()["outputs"]}["probabilities"]["data"], np.float32)
                np.testing.assert_allclose(probs.reshape(1, -1), torch_reference(DIGITS.name, x)[1], atol=ATOL, rtol=0)
                sent += 1
            misses = [v["models"][DIGITS.name]["misses"] if DIGITS.name in v["models"] else 0 for v in worker_views(gw.url, 2).values()]
        assert sum(misses) == sent

        def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            text = httpx.get(gw.url + "/metrics", timeout=10).text  # a new connection: either worker
            return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}

        answered = ("gateway_infer_requests_total", frozenset({("model", DIGITS.name), ("version", "1"), ("code", "200")}))
        # The worker a scrape does not reach is counted as it published last (every second).
        seen = [scrape()[answered]]
        deadline = time.monotonic() + 15
        while seen[-1] < sent:
            assert time.monotonic() < deadline, f"the answers of both workers never added up to {sent}: {seen}"
            time.sleep(0.2)
            seen.append(scrape()[answered])
        assert seen == sorted(seen), seen  # never back, whichever worker answered
        for _ in range(10):  # over new connections: both workers answer some of these
            parsed = scrape()
            assert parsed[answered] == sent
            assert parsed[("gateway_infer_request_duration_seconds_count", frozenset({("model", DIGITS.name)}))] == sent
            assert parsed[("gateway_cache_misses_total", frozenset({("model", DIGITS.name)}))] == sent
            miss = frozenset({("model", DIGITS.name), ("cache", "miss")})
            assert parsed[("gateway_infer_cache_request_duration_seconds_count", miss)] == sent  # each a miss
            assert parsed[("gateway_batcher_queue_seconds_count", frozenset({("model", DIGITS.name), ("version", "1")}))] == sent
            assert parsed[("gateway_metrics_worker_processes", frozenset())] == 2
        folder = gw.workers_folder()
    assert not folder.exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_version_replaced_in_place_loses_its_cached_results(fleet_factory, tmp_path: Path, workers: int) -> None:  # noqa: ANN001
    """Same version number, new weights (Triton reloads it in poll mode): the gateway notices and
    drops the version's cached answers, so clients get the new weights' answers; with two
    workers, from each of them."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(MODEL_REPOSITORY / DIGITS.name, repo / DIGITS.name)
    triton: fleet.Fleet = fleet_factory(1, 8144, repository=repo)
    config = gateway_config(
        triton.http_urls,
        8143,
        server={"workers": workers},
        cache={"enabled": True, "ttl_s": 300.0},
        upstream={"health_interval_s": 0.5},
    )
    x = images(30)
    with running_gateway(config, 8143, tmp_path) as gw, httpx.Client(base_url=gw.url, timeout=30) as http:
        worker_views(gw.url, workers)  # every worker serving
        old = http.post(PATH, json=json_body(x))
        assert old.headers["x-cache"] == "miss" and http.post(PATH, json=json_body(x)).headers["x-cache"] == "hit"
        weights = repo / DIGITS.name / "1" / "model.pt"
        payload = torch.load(weights, weights_only=True)
        payload["state_dict"] = {k: (v * 0.5 if k.endswith("bias") else v) for k, v in payload["state_dict"].items()}
        staging = weights.with_suffix(".tmp")
        torch.save(payload, staging)
        staging.replace(weights)  # Triton (poll mode) reloads version 1 from the new file
        deadline = time.monotonic() + 60
        while (resp := http.post(PATH, json=json_body(x))).headers["x-cache"] == "hit":
            assert time.monotonic() < deadline, "the replaced version's cached answer is still served"
            time.sleep(0.2)
        # Every worker drops it on its own health round: soon, new connections (any worker)
        # all get the new answer.
        later: list[bytes] = []
        while len(later) < 10:
            assert time.monotonic() < deadline, "a worker still serves the replaced version's cached answer"
            answer = httpx.post(gw.url + PATH, json=json_body(x), timeout=30)
            later = [*later, answer.content] if answer.content == resp.content else []
    assert resp.status_code == 200 and resp.content != old.content
    new_logits = np.asarray({o["name"]: o for o in resp.json()["outputs"]}["logits"]["data"], np.float32)
    expected = served_logits(repo, x)
    np.testing.assert_allclose(new_logits.reshape(expected.shape), expected, atol=ATOL, rtol=0)


def served_logits(repo: Path, x: np.ndarray) -> np.ndarray:
    """A direct torch forward pass with the weights now in the repository."""
    from training.models import load_checkpoint

    model = load_checkpoint(repo / DIGITS.name / "1" / "model.pt").eval()
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()
