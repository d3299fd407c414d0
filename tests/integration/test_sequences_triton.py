"""A stateful model (sequence batching) behind the gateway on two real Triton instances: every
request of a sequence reaches the instance that holds its state, whichever of the gateway's
worker processes reads it, and each answer is the sequence's running total so far.

The model is ``triton/emulated/sequence_sum``: a running sum per sequence, kept in the Triton
instance that saw the sequence's start; another instance refuses the sequence's later requests.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Iterator
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
PATH = "/v2/models/sequence_sum/infer"


@pytest.fixture(scope="module")
def triton(triton_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fleet.Fleet]:
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO_ROOT / "triton" / "emulated" / "sequence_sum", repo / "sequence_sum")
    with running_fleet(2, TRITON_PORT, repository=repo, log_dir=tmp_path_factory.mktemp("triton")) as f:
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
