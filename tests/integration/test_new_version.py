"""Publishing a version the way the README says (write under a temporary name, then rename) while
clients send requests: Triton (poll mode) loads it, the gateway keeps every request succeeding,
and requests that name no version move to the new one.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

import fleet
from conftest import gateway_config, running_gateway
from served_models import ATOL, BREAST_CANCER, MODEL_REPOSITORY, torch_reference

pytestmark = pytest.mark.integration


async def test_publishing_a_version_and_removing_the_old_one_under_load_fail_no_request(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    repo = tmp_path / "repo"
    shutil.copytree(MODEL_REPOSITORY, repo)
    triton: fleet.Fleet = fleet_factory(2, 8175, repository=repo)
    x = BREAST_CANCER.splits().x_test[:4]
    _, ref_probs = torch_reference(BREAST_CANCER.name, x)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}]}  # fmt: skip
    with running_gateway(gateway_config(triton.http_urls, 8185), 8185, tmp_path) as gw:
        versions: Counter[str] = Counter()
        failures: list[str] = []
        stop = asyncio.Event()

        async def client() -> None:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
                while not stop.is_set():
                    resp = await http.post(f"/v2/models/{BREAST_CANCER.name}/infer", json=body)
                    if resp.status_code != 200:
                        failures.append(f"{resp.status_code} {resp.text}")
                        continue
                    answer = resp.json()
                    versions[answer["model_version"]] += 1
                    probs = np.array(answer["outputs"][0]["data"], np.float32).reshape(ref_probs.shape)
                    if not np.allclose(probs, ref_probs, atol=ATOL):
                        failures.append(f"wrong answer from version {answer['model_version']}")

        clients = [asyncio.create_task(client()) for _ in range(4)]
        await asyncio.sleep(1.0)
        staging = repo / BREAST_CANCER.name / ".2.tmp"
        shutil.copytree(repo / BREAST_CANCER.name / "1", staging)
        staging.rename(repo / BREAST_CANCER.name / "2")
        deadline = time.monotonic() + 60
        while versions["2"] < 50 and time.monotonic() < deadline and not failures:
            await asyncio.sleep(0.2)
        # Then the old version goes: requests keep succeeding, on version 2.
        shutil.rmtree(repo / BREAST_CANCER.name / "1")
        removed_at = versions["2"]
        deadline = time.monotonic() + 30
        while versions["2"] < removed_at + 200 and time.monotonic() < deadline and not failures:
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    assert versions["1"] > 0 and versions["2"] >= removed_at + 200, versions


BROKEN_MODEL = '''
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("this version is broken on purpose: it never loads")

    def execute(self, requests):
        raise RuntimeError("never reached")
'''


async def test_a_broken_version_gets_no_traffic(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """At concurrency 16, a version whose model.py cannot load is published: Triton never makes it
    READY, so the gateway never routes to it, and not one client request fails."""
    repo = tmp_path / "repo"
    shutil.copytree(MODEL_REPOSITORY, repo)
    model_dir = repo / BREAST_CANCER.name
    triton: fleet.Fleet = fleet_factory(2, 8175, repository=repo)
    x = BREAST_CANCER.splits().x_test[:4]
    _, ref_probs = torch_reference(BREAST_CANCER.name, x)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}]}  # fmt: skip
    with running_gateway(gateway_config(triton.http_urls, 8185), 8185, tmp_path) as gw:
        versions: Counter[str] = Counter()
        failures: list[str] = []
        stop = asyncio.Event()

        async def client() -> None:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
                while not stop.is_set():
                    resp = await http.post(f"/v2/models/{BREAST_CANCER.name}/infer", json=body)
                    if resp.status_code != 200:
                        failures.append(f"{resp.status_code} {resp.text}")
                        continue
                    answer = resp.json()
                    versions[answer["model_version"]] += 1
                    probs = np.array(answer["outputs"][0]["data"], np.float32).reshape(ref_probs.shape)
                    if not np.allclose(probs, ref_probs, atol=ATOL):
                        failures.append(f"wrong answer from version {answer['model_version']}")

        clients = [asyncio.create_task(client()) for _ in range(16)]
        try:
            deadline = time.monotonic() + 30
            while versions["1"] < 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            staging = model_dir / ".2.tmp"
            shutil.copytree(model_dir / "1", staging)
            (staging / "model.py").write_text(BROKEN_MODEL)
            staging.rename(model_dir / "2")
            served = versions["1"]
            await asyncio.sleep(5.0)  # several repository polls and health rounds
            view = httpx.get(f"{gw.url}/v2/gateway/fleet").json()["instances"]
        finally:
            stop.set()
            await asyncio.gather(*clients)
    assert failures == [], failures[:5]
    assert versions["2"] == 0 and versions["1"] > served, versions
    assert all(i["models"][BREAST_CANCER.name] == ["1"] for i in view), view
