"""Two gateway processes sharing their response cache through a real Redis: one replica's result
serves the other's clients (Triton computes it once), and a Redis killed under load costs no
client request.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import fleet
from conftest import gateway_config, running_gateway
from redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)
from served_models import ATOL, DIGITS, torch_reference

pytestmark = pytest.mark.integration

TRITON_PORT = 8149
GATEWAY_PORTS = (8158, 8159)
PATH = f"/v2/models/{DIGITS.name}/infer"


def config(triton: fleet.Fleet, port: int, redis: RedisServer) -> str:
    # A generous bounded wait: this test checks sharing, not Redis's speed on a loaded machine.
    cache = {"enabled": True, "ttl_s": 300.0, "redis_url": redis.url, "redis_timeout_ms": 500.0}
    return gateway_config(triton.http_urls, port, cache=cache)


def body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}]}  # fmt: skip


def inferences(triton: fleet.Fleet) -> int:
    stats = httpx.get(f"{triton.http_urls[0]}/v2/models/{DIGITS.name}/stats").json()
    return sum(s["inference_count"] for s in stats["model_stats"])


def test_one_replicas_result_serves_the_others_clients(fleet_factory, redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: ANN001, F811
    triton: fleet.Fleet = fleet_factory(1, TRITON_PORT)
    a_port, b_port = GATEWAY_PORTS
    x = DIGITS.splits().x_test[:3].astype(np.float32)
    _, ref = torch_reference(DIGITS.name, x)
    with running_gateway(config(triton, a_port, redis_server), a_port, tmp_path) as a, running_gateway(
        config(triton, b_port, redis_server), b_port, tmp_path
    ) as b:
        before = inferences(triton)
        first = httpx.post(a.url + PATH, json=body(x), timeout=30)
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        deadline = time.monotonic() + 5  # A writes to Redis without holding up its answer
        while True:
            other = httpx.post(b.url + PATH, json=body(x), timeout=30)
            if other.headers["x-cache"] == "hit" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert other.status_code == 200 and other.headers["x-cache"] == "hit", other.headers
        assert other.content == first.content
        probs = np.asarray(other.json()["outputs"][0]["data"], np.float32).reshape(ref.shape)
        np.testing.assert_allclose(probs, ref, atol=ATOL, rtol=0)
        assert inferences(triton) - before == 3  # three rows, computed once, by A's request
        assert httpx.get(b.url + "/v2/gateway/cache").json()["models"][DIGITS.name]["shared_hits"] == 1


async def test_a_redis_killed_under_load_fails_no_request(fleet_factory, redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: ANN001, F811
    triton: fleet.Fleet = fleet_factory(1, TRITON_PORT)
    # Mostly new inputs (real images, each slightly changed), so that the shared tier is asked
    # on nearly every request, before and after Redis dies; every answer checked against torch.
    base = DIGITS.splits().x_test.astype(np.float32)
    x = np.concatenate([base + 0.01 * k for k in range(16)])
    _, ref = torch_reference(DIGITS.name, x)
    failures: list[str] = []
    served = 0
    stop = asyncio.Event()

    async def client(url: str, k: int) -> None:
        nonlocal served
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            i = k
            while not stop.is_set():
                row = (i * 7919) % len(x)
                i += 1
                resp = await http.post(PATH, json=body(x[row : row + 1]))
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code}: {resp.text}")
                    continue
                probs = np.asarray(resp.json()["outputs"][0]["data"], np.float32)
                if not np.allclose(probs, ref[row], atol=ATOL, rtol=0):
                    failures.append(f"wrong answer for row {row}")
                served += 1

    ports = GATEWAY_PORTS
    with running_gateway(config(triton, ports[0], redis_server), ports[0], tmp_path) as a, running_gateway(
        config(triton, ports[1], redis_server), ports[1], tmp_path
    ) as b:
        clients = [asyncio.create_task(client(gw.url, k)) for gw in (a, b) for k in range(4)]
        await asyncio.sleep(2.0)
        redis_server.kill()
        at_kill = served
        await asyncio.sleep(4.0)
        stop.set()
        await asyncio.gather(*clients)
        shared = httpx.get(a.url + "/v2/gateway/cache").json()["shared"]
    assert failures == []
    assert served - at_kill > 20, "the gateways stopped serving when Redis died"
    assert shared["errors"] + shared["timeouts"] + shared["skipped"] > 0  # Redis was in use, then gone
