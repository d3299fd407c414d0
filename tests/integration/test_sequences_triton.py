"""A stateful model (sequence batching) behind the gateway on two real Triton instances: every
request of a sequence reaches the instance that holds its state, whichever of the gateway's
worker processes reads it, and each answer is the sequence's running total so far.

The model is ``triton/emulated/sequence_sum``: a running sum per sequence, kept in the Triton
instance that saw the sequence's start; another instance refuses the sequence's later requests.
"""

from __future__ import annotations

import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import fleet
from conftest import REPO_ROOT, gateway_config, running_fleet, running_gateway
from gateway.client import GatewayClient

pytestmark = pytest.mark.integration

TRITON_PORT = 8130
GATEWAY_PORT = 8136
MANAGED_TRITON_PORT, MANAGED_GATEWAY_PORT = 8112, 8118  # a fleet the gateway loads (explicit mode)
PATH = "/v2/models/sequence_sum/infer"


@pytest.fixture(scope="module")
def triton(triton_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fleet.Fleet]:
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO_ROOT / "triton" / "emulated" / "sequence_sum", repo / "sequence_sum")
    # No repository polling: the Python backend's first import of model.py writes its bytecode
    # into the version folder, which a polling Triton takes for a new version of the model and
    # reloads, dropping the sequences under way (the tests below then failed whenever the
    # machine was slow enough for that reload to fall within them).
    with running_fleet(2, TRITON_PORT, repository=repo, log_dir=tmp_path_factory.mktemp("triton"), model_control_mode="none") as f:
        yield f


def body(sequence: int, x: float, start: bool = False, end: bool = False) -> dict:
    params: dict = {"sequence_id": sequence}
    if start:
        params["sequence_start"] = True
    if end:
        params["sequence_end"] = True
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [x]}], "parameters": params}


def instance_requests(gateway: str, instances: list[str]) -> list[float]:
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    sent = {
        s.labels["upstream"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gateway_instance_requests_total"
    }
    return [sent.get(url, 0.0) for url in instances]


def test_each_sequence_keeps_its_instance_across_worker_processes(triton: fleet.Fleet, tmp_path: Path) -> None:
    config = gateway_config(triton.http_urls, GATEWAY_PORT, server={"workers": 2})
    rng = random.Random(0)
    # Integer ids (the model's CORRID is UINT64); 12 sequences open at once, about 6 per
    # instance, within the 8 each holds at once (max_batch_size slots: a start beyond them
    # would wait for a free slot, which this client, waiting for its answer, never frees).
    sequences = list(range(1, 13))
    steps = {s: [float(rng.randint(1, 9)) for _ in range(5)] for s in sequences}
    order = [(s, i) for s in sequences for i in range(5)]
    # Interleaved, each sequence's steps in order.
    order.sort(key=lambda item: (item[1], rng.random()))
    totals: dict[int, float] = {}
    with running_gateway(config, GATEWAY_PORT, tmp_path) as gw:
        for sequence, i in order:
            x = steps[sequence][i]
            request = body(sequence, x, start=i == 0, end=i == 4)
            answer = httpx.post(gw.url + PATH, json=request, timeout=30)  # each request: a new connection
            assert answer.status_code == 200, (sequence, i, answer.text)
            totals[sequence] = totals.get(sequence, 0.0) + x
            assert answer.json()["outputs"][0]["data"] == [totals[sequence]], (sequence, i)
        # A later request of an ended sequence is refused by Triton (by each instance in turn: it
        # could have started on either), and the refusal reaches the client.
        after_end = httpx.post(gw.url + PATH, json=body(3, 1.0), timeout=30)
        assert after_end.status_code == 400 and "START" in after_end.json()["error"]
        # Both instances held sequences: what the gateway sent each, its workers summed (each
        # worker publishes its counts every moment: wait for the last ones).
        deadline = time.monotonic() + 10
        while sum(sent := instance_requests(gw.url, triton.http_urls)) < len(order) + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert sum(sent) == len(order) + 2 and min(sent) > 0, sent


async def test_a_sequence_through_the_msgpack_client(triton: fleet.Fleet, tmp_path: Path) -> None:
    config = gateway_config(triton.http_urls, GATEWAY_PORT + 1, server={"workers": 2})
    with running_gateway(config, GATEWAY_PORT + 1, tmp_path) as gw:
        totals = []
        for sequence in (101, 102):
            async with GatewayClient(gw.url) as client:
                for i, x in enumerate((2.0, 3.0, 5.0)):
                    params = {"sequence_id": sequence, "sequence_start": i == 0, "sequence_end": i == 2}
                    result = await client.infer("sequence_sum", {"x": np.array([[x]], np.float32)}, parameters=params)
                    totals.append(float(result.outputs["total"][0, 0]))
    assert totals == [2.0, 5.0, 10.0] * 2


def repository_index(url: str) -> dict[str, str]:
    """Version -> state of sequence_sum in an index (Triton's, or the gateway's for the fleet)."""
    entries = httpx.post(url + "/v2/repository/index", json={}, timeout=10).json()
    return {e["version"]: e["state"] for e in entries if e["name"] == "sequence_sum" and "version" in e}


@pytest.mark.parametrize("workers", [1, 2])
def test_version_changes_wait_for_the_sequences_under_way_which_keep_their_state(
    fleet_factory: Callable[..., fleet.Fleet], tmp_path: Path, workers: int
) -> None:
    """Triton reloads a model (every version) whenever its versions change on an instance,
    dropping its sequences under way there. The gateway loading the repository waits for them:
    version 2, published while sequences run on version 1, is loaded once they end; version 1,
    removed while sequences run on both versions, is unloaded once they end, and a sequence
    on it keeps reaching it meanwhile. Every answer is its sequence's running total. With two
    worker processes, each request on a new connection: whichever worker reads it."""
    repo = tmp_path / "repo"
    model_dir = repo / "sequence_sum"
    shutil.copytree(REPO_ROOT / "triton" / "emulated" / "sequence_sum", model_dir)
    idle = re.search(r"max_sequence_idle_microseconds:\s*(\d+)", (model_dir / "config.pbtxt").read_text())
    assert idle is not None
    idle_s = int(idle.group(1)) / 1e6  # how long Triton keeps a sequence without a request
    triton = fleet_factory(2, MANAGED_TRITON_PORT, repository=repo, model_control_mode="explicit", auto_complete_config=False)
    instances = [{"url": url, "grpc_port": inst.grpc_port} for url, inst in zip(triton.http_urls, triton.instances)]
    repository = {"path": str(repo), "scan_interval_s": 0.5, "drain_timeout_s": 60.0}
    config = gateway_config(instances, MANAGED_GATEWAY_PORT, repository=repository, server={"workers": workers})
    totals: dict[int, float] = {}
    running: dict[int, str] = {}  # sequence -> the version it runs on
    limits = httpx.Limits(max_keepalive_connections=0 if workers > 1 else None)

    with (
        running_gateway(config, MANAGED_GATEWAY_PORT, tmp_path, timeout=180) as gw,
        httpx.Client(base_url=gw.url, timeout=30, limits=limits) as http,
    ):

        def send(sequence: int, x: float, start: bool = False, end: bool = False, version: str = "") -> str:
            path = PATH.replace("/infer", f"/versions/{version}/infer") if version else PATH
            answer = http.post(path, json=body(sequence, x, start=start, end=end))
            assert answer.status_code == 200, (sequence, answer.text)
            totals[sequence] = (0.0 if start else totals[sequence]) + x
            doc = answer.json()
            assert doc["outputs"][0]["data"] == [totals[sequence]], sequence
            if start:
                running[sequence] = doc["model_version"]
            assert doc["model_version"] == running[sequence], sequence
            if end:
                del running[sequence]
            return doc["model_version"]

        def steps(seconds: float) -> None:
            """Every sequence running sends a step every 0.5 s (within the model's 10 s idle time)."""
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                for sequence in list(running):
                    send(sequence, 1.0)
                time.sleep(0.5)

        def wait(done: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 30
            while not done():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.2)

        def states(version: str) -> list[str | None]:
            return [repository_index(url).get(version) for url in triton.http_urls]

        # 1. Version 2 published while sequences run on version 1 on both instances.
        first = [1, 2, 3, 8, 9, 10]  # three led by each instance (rendezvous hashing)
        for sequence in first:
            assert send(sequence, float(sequence), start=True) == "1"
        if workers == 1:  # (each worker counts its own)
            fleet_view = httpx.get(gw.url + "/v2/gateway/fleet", timeout=10).json()
            assert [i["sequences"] for i in fleet_view["instances"]] == [{"sequence_sum/1": 3}] * 2
        staging = model_dir / ".2.tmp"  # written aside, then renamed
        shutil.copytree(model_dir / "1", staging, ignore=shutil.ignore_patterns("__pycache__"))
        staging.rename(model_dir / "2")
        steps(4.0)  # long enough for the gateway to load it anywhere it could
        assert states("2") == [None, None], "loaded under sequences under way"
        for sequence in first:
            send(sequence, 3.0, end=True)
        # A sequence of one request (start and end) shows where new ones go: version 2 once
        # it is loaded and warm on every instance. Sooner than the model's idle time: the
        # gateway knew the sequences ended, whichever worker answered their ends.
        ended = time.monotonic()
        wait(lambda: send(99, 1.0, start=True, end=True) == "2", "version 2 once the sequences ended")
        assert time.monotonic() - ended < idle_s, "waited for the ended sequences to go idle"

        # 2. Version 1 removed while sequences run on both versions (named: with two workers,
        # the other may follow the driver's change a moment later).
        assert send(100, 7.0, start=True, version="2") == "2"
        assert send(101, 5.0, start=True, version="1") == "1"
        shutil.rmtree(model_dir / "1")
        wait(lambda: repository_index(gw.url).get("1") == "UNLOADING", "version 1 to drain")
        for _ in range(6):
            send(100, 1.0, version="2")
            send(101, 2.0, version="1")  # draining, and still there for its sequence
            time.sleep(0.5)
        assert "READY" in states("1") and "READY" in states("2")
        send(101, 1.0, end=True, version="1")
        send(100, 1.0, end=True, version="2")
        ended = time.monotonic()
        wait(lambda: states("1") == [None, None] or all(s in (None, "UNAVAILABLE") for s in states("1")), "version 1 to unload")
        assert time.monotonic() - ended < idle_s, "waited for the ended sequence to go idle"
        assert send(200, 1.0, start=True) == "2"
        events = httpx.get(gw.url + "/v2/gateway/repository", timeout=10).json()["events"]
    unloaded = [e for e in events if e["event"] == "unloaded" and e["version"] == "1"]
    assert sorted(e["instance"] for e in unloaded) == sorted(triton.http_urls)
    assert [e for e in events if e["event"] in ("sequences dropped", "drain timed out")] == []


def test_a_version_published_under_steady_sequence_traffic_reloads_the_instances_in_turn_and_drops_none(
    fleet_factory: Callable[..., fleet.Fleet], tmp_path: Path
) -> None:
    """Clients keep starting sequences of three requests while version 2 is published. Each
    instance must be reloaded (Triton reloads a stateful model whenever its versions change),
    which waits for the sequences under way there; the instances take turns, so the new
    sequences always start on one that is not waiting: never both at once, no sequence
    dropped, no wait run to its deadline, and every answer its sequence's running total."""
    repo = tmp_path / "repo"
    model_dir = repo / "sequence_sum"
    shutil.copytree(REPO_ROOT / "triton" / "emulated" / "sequence_sum", model_dir)
    triton = fleet_factory(2, MANAGED_TRITON_PORT, repository=repo, model_control_mode="explicit", auto_complete_config=False)
    instances = [{"url": url, "grpc_port": inst.grpc_port} for url, inst in zip(triton.http_urls, triton.instances)]
    repository = {"path": str(repo), "scan_interval_s": 0.5, "drain_timeout_s": 60.0}
    config = gateway_config(instances, MANAGED_GATEWAY_PORT, repository=repository)
    stop = threading.Event()
    failures: list[str] = []
    versions: list[str] = []  # each session's version, in order of its end
    both_quiescing: list[float] = []

    with running_gateway(config, MANAGED_GATEWAY_PORT, tmp_path, timeout=180) as gw:

        def client(first_id: int) -> None:
            with httpx.Client(base_url=gw.url, timeout=30) as http:
                sequence = first_id
                while not stop.is_set() and not failures:
                    total, served = 0.0, None
                    for i, x in enumerate((1.0, 2.0, 3.0)):
                        answer = http.post(PATH, json=body(sequence, x, start=i == 0, end=i == 2))
                        if answer.status_code != 200:
                            failures.append(f"sequence {sequence}, request {i}: {answer.status_code} {answer.text}")
                            return
                        doc, total = answer.json(), total + x
                        served = served or doc["model_version"]
                        if doc["outputs"][0]["data"] != [total] or doc["model_version"] != served:
                            failures.append(f"sequence {sequence}, request {i}: {doc}")
                            return
                        time.sleep(0.1)
                    versions.append(served)
                    sequence += 1

        def watch() -> None:
            with httpx.Client(base_url=gw.url, timeout=10) as http:
                while not stop.is_set():
                    fleet_view = http.get("/v2/gateway/fleet").json()
                    if all(i["quiescing"] == ["sequence_sum"] for i in fleet_view["instances"]):
                        both_quiescing.append(time.monotonic())
                    time.sleep(0.02)

        threads = [threading.Thread(target=client, args=(1000 * (n + 1),)) for n in range(4)]
        threads.append(threading.Thread(target=watch))
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)  # sequences under way on both instances
            staging = model_dir / ".2.tmp"
            shutil.copytree(model_dir / "1", staging, ignore=shutil.ignore_patterns("__pycache__"))
            published = time.monotonic()
            staging.rename(model_dir / "2")
            deadline = published + 50
            while versions[-4:] != ["2"] * 4 and not failures and time.monotonic() < deadline:
                time.sleep(0.2)  # until new sequences start on version 2 (loaded everywhere)
            took = time.monotonic() - published
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        events = httpx.get(gw.url + "/v2/gateway/repository", timeout=10).json()["events"]
    assert not failures, failures[:3]
    assert versions[-4:] == ["2"] * 4, f"new sequences still on version {versions[-4:]} after {took:.0f} s"
    assert not both_quiescing, "both instances waited for their sequences at once: new ones had nowhere to start"
    assert [e for e in events if e["event"] in ("sequences dropped", "drain timed out")] == []
    assert sorted(e["instance"] for e in events if e["event"] == "ready" and e["version"] == "2") == sorted(triton.http_urls)
