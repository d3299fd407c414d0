"""Drop-in model updates with the gateway driving loading: real Triton instances in explicit
model-control mode, a gateway with ``[repository] path`` on a copy of the model repository, and
clients sending requests at concurrency 16 while versions are published (written under a
temporary name, then renamed), removed, or broken. Every answer is checked against a direct
torch forward pass of the served weights.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import fleet
from conftest import GatewayProcess, gateway_config, running_gateway
from gateway.models import PLACEMENT_PARAMETER
from served_models import ATOL, BREAST_CANCER, MODEL_REPOSITORY, torch_reference
from test_rollout_triton import FAULTY

pytestmark = pytest.mark.integration

MODEL = BREAST_CANCER.name
TRITON_PORT, GATEWAY_PORT = 8175, 8185


class Clients:
    """``n`` clients sending the same request in a loop, each answer checked; counts versions."""

    def __init__(
        self, url: str, n: int = 16, model: str = MODEL, tolerate_errors: bool = False, reconnect: bool = False
    ) -> None:
        self.tolerate_errors = tolerate_errors
        # A new connection per request: with several gateway workers, every one gets some.
        self.limits = httpx.Limits(max_keepalive_connections=0) if reconnect else httpx.Limits()
        x = BREAST_CANCER.splits().x_test[:4]
        _, self.expected = torch_reference(BREAST_CANCER.name, x)
        self.body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
                     "outputs": [{"name": "probabilities"}]}  # fmt: skip
        self.url, self.n, self.model = url, n, model
        self.versions: Counter[str] = Counter()
        self.first_seen: dict[str, float] = {}
        self.failures: list[str] = []
        self.failures_sent: list[float] = []  # when each failed request was sent (monotonic)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=self.limits) as http:
            while not self._stop.is_set():
                sent = time.monotonic()
                resp = await http.post(f"/v2/models/{self.model}/infer", json=self.body)
                if resp.status_code != 200:
                    self.failures.append(f"{resp.status_code} {resp.text}")
                    self.failures_sent.append(sent)
                    continue
                answer = resp.json()
                version = answer["model_version"]
                self.versions[version] += 1
                self.first_seen.setdefault(version, time.time())
                probs = np.array(answer["outputs"][0]["data"], np.float32).reshape(self.expected.shape)
                if not np.allclose(probs, self.expected, atol=ATOL):
                    self.failures.append(f"wrong answer from version {version}")

    async def __aenter__(self) -> Clients:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.n)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def until(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert self.tolerate_errors or not self.failures, self.failures[:5]
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.versions}"
            await asyncio.sleep(0.1)


def get_json(url: str, body: bytes | None = None) -> Any:
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status == 200
    except urllib.error.HTTPError:
        return False


def triton_states(url: str, model: str = MODEL) -> dict[str, str]:
    """Version -> state in one Triton instance's repository index."""
    return {e["version"]: e["state"] for e in get_json(url + "/v2/repository/index", b"{}") if e["name"] == model and "version" in e}


def inference_count(url: str, version: str, model: str = MODEL) -> int:
    stats = get_json(f"{url}/v2/models/{model}/versions/{version}/stats")["model_stats"]
    return int(stats[0]["inference_count"])


def publish(model_dir: Path, version: str, broken: str | None = None) -> None:
    """A copy of version 1 as a new version, written under a temporary name, then renamed."""
    staging = model_dir / f".{version}.tmp"
    shutil.copytree(model_dir / "1", staging, ignore=shutil.ignore_patterns("__pycache__"))
    if broken is not None:
        (staging / "model.py").write_text(broken)
    staging.rename(model_dir / version)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(MODEL_REPOSITORY / MODEL, root / MODEL, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@contextmanager
def managed_stack(
    fleet_factory: Any, repo: Path, workdir: Path, rollout: dict[str, Any] | None = None, workers: int = 1
) -> Iterator[tuple[fleet.Fleet, GatewayProcess]]:
    triton = fleet_factory(2, TRITON_PORT, repository=repo, model_control_mode="explicit", auto_complete_config=False)
    for url in triton.http_urls:
        assert triton_states(url) == {}, "explicit mode: Triton starts with nothing loaded"
    instances = [{"url": url, "grpc_port": inst.grpc_port} for url, inst in zip(triton.http_urls, triton.instances)]
    config = gateway_config(
        instances,
        GATEWAY_PORT,
        repository={"path": str(repo), "scan_interval_s": 0.5, "drain_timeout_s": 10.0},
        server={"workers": workers},
        **({"rollout": rollout} if rollout else {}),
    )
    with running_gateway(config, GATEWAY_PORT, workdir, timeout=180) as gw:
        yield triton, gw


def repository_view(gw: GatewayProcess) -> dict[str, Any]:
    return get_json(gw.url + "/v2/gateway/repository")


def answers_per_worker(gw: GatewayProcess) -> list[float]:
    """The infer requests each worker process of the gateway answered 200, as they last
    published them (every second) in their folder, for /metrics to sum."""
    folder = gw.workers_folder()
    counts = []
    for path in sorted(folder.glob("*.json")):
        families = json.loads(path.read_bytes())
        counts.append(
            sum(
                value
                for f in families
                if f["name"] == "gateway_infer_requests"
                for name, labels, value in f["samples"]
                if name == "gateway_infer_requests_total" and labels.get("code") == "200"
            )
        )
    return counts


@pytest.mark.parametrize("policy", ["all", "latest"])
async def test_publishing_a_version_and_removing_the_old_one_under_load_fail_no_request(
    fleet_factory: Any, repo: Path, tmp_path: Path, policy: str
) -> None:
    """Version 2 is loaded on both instances and warmed before any client gets it; version 1 is
    drained then unloaded; at concurrency 16 not one request fails and every answer is right.
    With the repository's `version_policy: all`, version 1 leaves when its folder is removed;
    with Triton's default policy (the latest version only), as soon as version 2 is in."""
    if policy == "latest":
        config = repo / MODEL / "config.pbtxt"
        config.write_text(config.read_text().replace("version_policy: { all { } }", ""))
    with managed_stack(fleet_factory, repo, tmp_path) as (triton, gw):
        assert all(triton_states(url) == {"1": "READY"} for url in triton.http_urls)
        async with Clients(gw.url) as clients:
            await clients.until(lambda: clients.versions["1"] >= 50, 60, "version 1 answers")
            publish(repo / MODEL, "2")
            await clients.until(lambda: clients.versions["2"] >= 100, 120, "version 2 to take over")
            ready_events = [e for e in repository_view(gw)["events"] if e["event"] == "ready" and e["version"] == "2"]
            for url in triton.http_urls:
                assert inference_count(url, "2") >= 1  # the warm-up, on each instance
            shutil.rmtree(repo / MODEL / "1")
            removed_at = clients.versions["2"]
            await clients.until(
                lambda: all(triton_states(u).get("1") in (None, "UNAVAILABLE") for u in triton.http_urls), 60, "version 1 to unload"
            )
            await clients.until(lambda: clients.versions["2"] >= removed_at + 200, 60, "more answers")
        view = repository_view(gw)
    assert clients.failures == []
    assert sorted(e["instance"] for e in ready_events) == sorted(triton.http_urls)
    assert clients.first_seen["2"] >= max(e["time"] for e in ready_events), "version 2 served before it was ready everywhere"
    assert {e["instance"] for e in view["events"] if e["event"] == "unloaded" and e["version"] == "1"} == set(triton.http_urls)
    assert view["models"][MODEL]["serving"] == ["2"]


@pytest.mark.parametrize("workers", [1, 2])
async def test_removing_the_newest_version_moves_every_worker_back_without_a_failure(
    fleet_factory: Any, repo: Path, tmp_path: Path, workers: int
) -> None:
    """Versions 1 and 2 serve (2 takes the requests naming no version); version 2's folder is
    removed under load at concurrency 16: requests go back to version 1 and not one fails. With
    two worker processes, both answering clients, one drives loading and the other follows it:
    the version is unloaded only once neither routes to it nor has a request in flight to it."""
    publish(repo / MODEL, "2")
    with managed_stack(fleet_factory, repo, tmp_path, workers=workers) as (triton, gw):
        assert all(triton_states(url) == {"1": "READY", "2": "READY"} for url in triton.http_urls)
        async with Clients(gw.url, reconnect=workers > 1) as clients:
            await clients.until(lambda: clients.versions["2"] >= 200, 60, "version 2 answers")
            if workers > 1:
                await clients.until(
                    lambda: len(answers_per_worker(gw)) == workers and all(answers_per_worker(gw)), 30, "every worker to answer"
                )
                driver = repository_view(gw)["driver_pid"]
                assert all(repository_view(gw)["driver_pid"] == driver for _ in range(10))  # whichever worker answers
            shutil.rmtree(repo / MODEL / "2")
            await clients.until(
                lambda: all(triton_states(u).get("2") in (None, "UNAVAILABLE") for u in triton.http_urls), 60, "version 2 to unload"
            )
            back = clients.versions["1"]
            await clients.until(lambda: clients.versions["1"] >= back + 200, 60, "answers from version 1")
        view = repository_view(gw)
    assert clients.failures == []
    assert {e["instance"] for e in view["events"] if e["event"] == "unloaded" and e["version"] == "2"} == set(triton.http_urls)
    assert not [e for e in view["events"] if e["event"] == "drain timed out"], view["events"]
    assert view["models"][MODEL]["serving"] == ["1"]


BROKEN_AT_LOAD = '''
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("this version is broken on purpose: it never loads")

    def execute(self, requests):
        raise RuntimeError("never reached")
'''

BROKEN_AT_EXECUTE = '''
class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        raise RuntimeError("this version loads, then fails every request")
'''


@pytest.mark.parametrize(
    ("broken", "reason", "reloads_v1"),
    [(BROKEN_AT_LOAD, "never loads", False), (BROKEN_AT_EXECUTE, "warm-up inference failed", True)],
)
async def test_a_broken_version_is_reported_and_never_routed(
    fleet_factory: Any, repo: Path, tmp_path: Path, broken: str, reason: str, reloads_v1: bool
) -> None:
    """A version whose model.py fails at load, or fails every request, is published at
    concurrency 16: it never answers a client, its failure is reported with the reason, and
    version 1 keeps serving without a failed request. A version that fails to load leaves
    version 1 as it is (its inference count only grows). One that loads changes the model's
    version list, twice (added, then taken out), and Triton re-creates version 1 each time,
    serving the old one until the new one is ready."""
    with managed_stack(fleet_factory, repo, tmp_path) as (triton, gw):
        async with Clients(gw.url) as clients:
            await clients.until(lambda: clients.versions["1"] >= 50, 60, "version 1 answers")
            counts = [inference_count(url, "1") for url in triton.http_urls]
            publish(repo / MODEL, "2", broken)
            await clients.until(lambda: "2" in repository_view(gw)["models"][MODEL]["failed"], 120, "the failure report")
            await clients.until(
                lambda: all(triton_states(u).get("2") != "READY" for u in triton.http_urls), 60, "version 2 to be unloaded"
            )
            served = clients.versions["1"]
            await clients.until(lambda: clients.versions["1"] >= served + 100, 60, "more answers")
        view = repository_view(gw)
        after = [inference_count(url, "1") for url in triton.http_urls]
    assert clients.failures == []
    assert clients.versions["2"] == 0
    assert reason in view["models"][MODEL]["failed"]["2"]
    assert view["models"][MODEL]["serving"] == ["1"]
    if not reloads_v1:
        assert all(b > a for a, b in zip(counts, after)), (counts, after)


async def test_a_version_folder_without_model_py_does_not_hold_back_the_next_version(
    fleet_factory: Any, repo: Path, tmp_path: Path
) -> None:
    """Sent to Triton, a version folder without model.py stays LOADING for good and the model's
    later loads wait behind it. The gateway fails it without a load call: version 3, published
    after it, is loaded and serves the right answers, and nothing fails meanwhile."""
    with managed_stack(fleet_factory, repo, tmp_path) as (triton, gw):
        async with Clients(gw.url) as clients:
            await clients.until(lambda: clients.versions["1"] >= 50, 60, "version 1 answers")
            staging = repo / MODEL / ".2.tmp"
            shutil.copytree(repo / MODEL / "1", staging, ignore=shutil.ignore_patterns("__pycache__", "model.py"))
            staging.rename(repo / MODEL / "2")
            publish(repo / MODEL, "3")
            await clients.until(lambda: clients.versions["3"] >= 50, 120, "version 3 answers")
        view = repository_view(gw)
        states = [triton_states(url) for url in triton.http_urls]
    assert clients.failures == [] and clients.versions["2"] == 0
    assert "has no model.py" in view["models"][MODEL]["failed"]["2"]
    assert view["models"][MODEL]["serving"] == ["1", "3"]
    assert all(s.get("3") == "READY" and "2" not in s for s in states), states


async def test_a_new_model_folder_becomes_a_model(fleet_factory: Any, repo: Path, tmp_path: Path) -> None:
    with managed_stack(fleet_factory, repo, tmp_path) as (triton, gw):
        staging = repo / ".copy.tmp"
        shutil.copytree(repo / MODEL, staging)
        config = staging / "config.pbtxt"
        config.write_text(config.read_text().replace(f'name: "{MODEL}"', 'name: "breast_cancer_copy"'))
        staging.rename(repo / "breast_cancer_copy")
        deadline = time.monotonic() + 120
        while not ready(f"{gw.url}/v2/models/breast_cancer_copy/ready"):
            assert time.monotonic() < deadline, repository_view(gw)
            await asyncio.sleep(0.2)
        async with Clients(gw.url, n=4, model="breast_cancer_copy") as clients:
            await clients.until(lambda: clients.versions["1"] >= 50, 60, "the new model to answer")
        assert clients.failures == []
        # Served once one instance holds it; loaded on every instance soon after (each on its own).
        while not all(triton_states(u, "breast_cancer_copy") == {"1": "READY"} for u in triton.http_urls):
            assert time.monotonic() < deadline, [triton_states(u, "breast_cancer_copy") for u in triton.http_urls]
            await asyncio.sleep(0.2)
        metadata = get_json(f"{gw.url}/v2/models/breast_cancer_copy")
        assert metadata["name"] == "breast_cancer_copy" and metadata["versions"] == ["1"]


async def test_a_bad_config_is_reported_and_the_serving_versions_stay(fleet_factory: Any, repo: Path, tmp_path: Path) -> None:
    with managed_stack(fleet_factory, repo, tmp_path) as (triton, gw):
        config = repo / MODEL / "config.pbtxt"
        config.write_text(config.read_text() + "\nthis is not: a field\n")
        publish(repo / MODEL, "2")
        async with Clients(gw.url, n=4) as clients:
            await clients.until(lambda: repository_view(gw)["models"][MODEL]["config_error"], 30, "the config error")
            await asyncio.sleep(2.0)  # several scans
            served = clients.versions["1"]
            await clients.until(lambda: clients.versions["1"] >= served + 50, 60, "more answers")
        assert clients.failures == [] and clients.versions["2"] == 0
        assert all(triton_states(u) == {"1": "READY"} for u in triton.http_urls)
        assert "config.pbtxt" in repository_view(gw)["models"][MODEL]["config_error"]


async def test_an_instance_restarted_empty_is_loaded_again_before_it_gets_traffic(
    fleet_factory: Any, repo: Path, tmp_path: Path
) -> None:
    with managed_stack(fleet_factory, repo, tmp_path) as (triton, gw):
        async with Clients(gw.url) as clients:
            await clients.until(lambda: clients.versions["1"] >= 50, 60, "answers")
            await asyncio.to_thread(triton.restart, 1)  # explicit mode: it comes back with nothing loaded
            await clients.until(lambda: triton_states(triton.http_urls[1]) == {"1": "READY"}, 120, "the reload")
            await clients.until(lambda: inference_count(triton.http_urls[1], "1") > 20, 60, "traffic to the restarted instance")
    assert clients.failures == []


async def test_a_restarted_gateway_leaves_loaded_what_it_loaded_from_these_files(
    fleet_factory: Any, repo: Path, tmp_path: Path
) -> None:
    """A gateway restart (a deploy of the gateway itself) makes no load call for a model loaded
    from the files on disk: Triton would reload it on every instance (its statistics start
    again at zero; a large model briefly takes twice its memory). It serves what was served,
    answers checked against torch."""
    triton = fleet_factory(2, TRITON_PORT, repository=repo, model_control_mode="explicit", auto_complete_config=False)
    instances = [{"url": url, "grpc_port": inst.grpc_port} for url, inst in zip(triton.http_urls, triton.instances)]
    config = gateway_config(instances, GATEWAY_PORT, repository={"path": str(repo), "scan_interval_s": 0.5})
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with running_gateway(config, GATEWAY_PORT, tmp_path / "first", timeout=180) as gw:
        async with Clients(gw.url) as clients:
            await clients.until(
                lambda: all(inference_count(url, "1") >= 20 for url in triton.http_urls), 60, "traffic to both instances"
            )
        assert clients.failures == []
    counts = [inference_count(url, "1") for url in triton.http_urls]
    with running_gateway(config, GATEWAY_PORT, tmp_path / "second", timeout=180) as gw:
        view = repository_view(gw)
        assert sorted(e["instance"] for e in view["events"] if e["event"] == "adopted") == sorted(triton.http_urls)
        assert not [e for e in view["events"] if e["event"] in ("reloaded", "load failed")]
        # Not reloaded: each instance's count goes on from where it was.
        assert [inference_count(url, "1") for url in triton.http_urls] == counts
        # The record is Triton's to keep, not the clients' to see.
        for url in triton.http_urls:
            assert PLACEMENT_PARAMETER in httpx.get(f"{url}/v2/models/{MODEL}/config").json()["parameters"]
        shown = httpx.get(f"{gw.url}/v2/models/{MODEL}/config").json()
        assert shown["name"] == MODEL and PLACEMENT_PARAMETER not in shown.get("parameters", {})
        async with Clients(gw.url) as clients:
            await clients.until(lambda: clients.versions["1"] >= 50, 60, "answers")
        assert clients.failures == []


async def test_a_faulty_version_dropped_in_is_a_canary_rolled_back_by_itself(
    fleet_factory: Any, repo: Path, tmp_path: Path
) -> None:
    """With the rollout file's [defaults], a version dropped into the repository under load
    (one that fails every other execution; it passes its warm-up) starts as a 10% canary of the
    serving version, is rolled back once its window is full, and the clients' errors stay within
    that window; the rollout state and events say so. (A batch of several requests that failed
    is sent again one request at a time, so a client's request fails less often than an
    execution does.)"""
    window = 50  # a third failing is significant over 50 (z 4.5); over 30 only just
    rollout_file = tmp_path / "rollout.toml"
    rollout_file.write_text(
        f"[defaults]\ncanary_share = 0.1\nrollback_error_rate = 0.05\nrollback_window = {window}\n"
    )
    with managed_stack(fleet_factory, repo, tmp_path, rollout={"file": str(rollout_file)}) as (triton, gw):
        async with Clients(gw.url, tolerate_errors=True) as clients:
            await clients.until(lambda: clients.versions["1"] >= 50, 60, "version 1 answers")
            model_dir = repo / MODEL
            staging = model_dir / ".2.tmp"
            shutil.copytree(model_dir / "1", staging, ignore=shutil.ignore_patterns("__pycache__"))
            (staging / "model.py").write_text((staging / "model.py").read_text() + FAULTY.replace("% 3 == 0", "% 2 == 0"))
            staging.rename(model_dir / "2")

            def rolled_back() -> bool:
                return get_json(gw.url + "/v2/gateway/rollout")["models"].get(MODEL, {}).get("status") == "rolled_back"

            await clients.until(rolled_back, 120, "the automatic rollback")
            rolled_back_by = time.monotonic()  # the rollback had happened by then
            served = clients.versions["1"]
            await clients.until(lambda: clients.versions["1"] >= served + 300, 60, "answers after the rollback")
        state = get_json(gw.url + "/v2/gateway/rollout")["models"][MODEL]
    assert state["automatic"] is True and (state["stable"], state["canary"]) == ("1", "2")
    events = [e["event"] for e in state["events"]]
    assert events == ["canary", "rollback"], state["events"]
    rollback = state["events"][-1]
    assert rollback["by"] == "automatic" and rollback["canary_error_rate"] > 0.05
    assert clients.versions["2"] > 0  # it did get its share...
    # ...and the errors clients saw are bounded by the canary's window (at most half of it fails;
    # requests already in flight at the rollback may add a few), none for a request sent after
    # it (some sent before may be answered after the status said so).
    assert 0 < len(clients.failures) <= window // 2 + 16, clients.failures
    assert all(sent < rolled_back_by for sent in clients.failures_sent)
    assert all("faulty canary" in f for f in clients.failures), clients.failures[:3]
