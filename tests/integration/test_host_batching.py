"""Host-wide batching (``[batching] host_wide``): real gateway workers in front of a real Triton.
One worker batches a model version's requests for the host, answers are right (against a torch
forward pass), and when that worker is killed the others' clients are still answered."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import fleet
from conftest import GatewayProcess, gateway_config, running_gateway
from gateway.host_batch import FOLDER, owner_of
from served_models import ATOL, DIGITS, torch_reference

pytestmark = pytest.mark.integration

TRITON_PORT = 8167
PORTS = iter((8168, 8169))  # one gateway per test
VERSION = "1"
PATH = f"/v2/models/{DIGITS.name}/versions/{VERSION}/infer"


@pytest.fixture(scope="module")
def triton(fleet_module_factory) -> fleet.Fleet:  # noqa: ANN001
    return fleet_module_factory(1, TRITON_PORT)


def inferences(triton: fleet.Fleet) -> int:
    stats = httpx.get(f"{triton.http_urls[0]}/v2/models/{DIGITS.name}/versions/{VERSION}/stats").json()
    return sum(s["inference_count"] for s in stats["model_stats"])


def counters(gw: GatewayProcess) -> dict[str, float]:
    """The gateway's counters, summed over its workers and labels, by name."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(gw.url + "/metrics", timeout=10).text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def settled(gw: GatewayProcess, timeout: float = 15.0, **least: float) -> dict[str, float]:
    """The gateway's counters once each counter named in ``least`` has reached its value there
    (each worker publishes its counters for the others' /metrics every second), or as they are
    at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        totals = counters(gw)
        if all(totals.get(name, 0.0) >= value for name, value in least.items()) or time.monotonic() > deadline:
            return totals
        time.sleep(0.2)


def images(start: int, n: int) -> np.ndarray:
    return DIGITS.splits().x_test[start : start + n].astype(np.float32)


def body(x: np.ndarray) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    ).encode()


class Connection:
    """A kept-alive connection to the gateway, and the worker holding it."""

    def __init__(self, url: str) -> None:
        u = urlparse(url)
        self.http = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        self.pid = self.get("/v2/gateway/cache")["pid"]

    def get(self, path: str) -> dict:
        self.http.request("GET", path)
        return json.loads(self.http.getresponse().read())

    def infer(self, x: np.ndarray) -> tuple[int, bytes]:
        self.http.request("POST", PATH, body(x), {"Content-Type": "application/json"})
        answer = self.http.getresponse()
        return answer.status, answer.read()


@pytest.fixture
def opened() -> Iterator[list[Connection]]:
    """Connections a test opened, closed at its end."""
    conns: list[Connection] = []
    yield conns
    for conn in conns:
        conn.http.close()


def by_worker(gw: GatewayProcess, opened: list[Connection], workers: int, each: int) -> dict[int, list[Connection]]:
    """At least ``each`` connections held by each of ``workers`` workers (the kernel picks)."""
    held: dict[int, list[Connection]] = {}
    deadline = time.monotonic() + 60
    while len(held) < workers or min(len(c) for c in held.values()) < each:
        assert time.monotonic() < deadline, f"connections by worker: { {p: len(c) for p, c in held.items()} }"
        conn = Connection(gw.url)
        opened.append(conn)
        held.setdefault(conn.pid, []).append(conn)
    return held


def check(answers: list[tuple[int, bytes]], x: np.ndarray) -> None:
    _, ref_probs = torch_reference(DIGITS.name, x)
    assert [status for status, _ in answers] == [200] * len(x), [text[:200] for status, text in answers if status != 200]
    for i, (_, text) in enumerate(answers):
        probs = {o["name"]: o for o in json.loads(text)["outputs"]}["probabilities"]["data"]
        np.testing.assert_allclose(np.asarray(probs, np.float32), ref_probs[i], atol=ATOL, rtol=0)


def send(conns: list[Connection], x: np.ndarray) -> list[tuple[int, bytes]]:
    """Row i of ``x`` over connection i, all at once."""
    with ThreadPoolExecutor(len(conns)) as pool:
        return list(pool.map(lambda i: conns[i].infer(x[i : i + 1]), range(len(x))))


@pytest.fixture
def gateway(triton: fleet.Fleet, tmp_path: Path) -> Iterator[GatewayProcess]:
    port = next(PORTS)
    config = gateway_config(
        triton.http_urls,
        port,
        server={"workers": 2},
        batching={"host_wide": True},
        cache={"enabled": True, "ttl_s": 300.0},  # every row new: misses, batched (and its view names the worker)
    )
    with running_gateway(config, port, tmp_path) as gw:
        yield gw


def test_one_worker_batches_the_hosts_requests_for_a_model(
    triton: fleet.Fleet, gateway: GatewayProcess, opened: list[Connection]
) -> None:
    held = by_worker(gateway, opened, 2, 8)
    conns = [c for cs in held.values() for c in cs[:8]]  # 8 on each worker
    x = images(0, len(conns))
    before, rows_before = inferences(triton), counters(gateway).get("gateway_batcher_rows_sent_total", 0.0)
    check(send(conns, x), x)
    after = settled(
        gateway,
        gateway_batcher_rows_sent_total=rows_before + len(x),
        gateway_batcher_host_forwarded_total=8,
        gateway_batcher_host_served_total=8,
    )
    assert inferences(triton) - before == len(x)  # each row computed once
    assert after["gateway_batcher_rows_sent_total"] - rows_before == len(x)  # and batched once
    # The worker that does not own the version handed its 8 requests to the one that does.
    assert after["gateway_batcher_host_forwarded_total"] == after["gateway_batcher_host_served_total"] == 8
    assert after["gateway_batcher_host_kept_total"] == 0
    pids = sorted(int(p.name.removesuffix(".sock")) for p in (gateway.workers_folder() / FOLDER).glob("*.sock"))
    assert pids == sorted(held) and owner_of(DIGITS.name, VERSION, pids) in held


def test_the_other_workers_clients_are_answered_when_the_owner_is_killed(
    triton: fleet.Fleet, gateway: GatewayProcess, opened: list[Connection]
) -> None:
    held = by_worker(gateway, opened, 2, 16)
    owner = owner_of(DIGITS.name, VERSION, sorted(held))
    other = next(pid for pid in held if pid != owner)
    conns = held[other][:16]
    x = images(100, 32)
    check(send(conns, x[:16]), x[:16])  # handed to the owner
    with ThreadPoolExecutor(1) as pool:
        during = pool.submit(send, conns, x[16:32])
        time.sleep(0.005)
        os.kill(owner, signal.SIGKILL)  # some of those may be at the owner now
        check(during.result(), x[16:32])
    y = images(200, 16)
    check(send(conns, y), y)  # after: the other worker batches them itself
    assert settled(gateway, gateway_batcher_host_kept_total=1)["gateway_batcher_host_kept_total"] >= 1
