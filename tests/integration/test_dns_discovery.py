"""An instance given as a DNS name: every address the name resolves to becomes an instance.

`localhost` is resolved by the machine's own resolver, as a Kubernetes headless service name
would be in a cluster. The Triton instance listens on 127.0.0.1 only: an address the name also
resolves to where nothing listens (::1 on some machines) must show as down and cost no request.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import numpy as np
import pytest

import fleet
from conftest import running_gateway
from served_models import ATOL, BREAST_CANCER, torch_reference

pytestmark = pytest.mark.integration

TRITON_PORT = 8160
GATEWAY_PORT = 8165


def test_a_dns_name_is_resolved_into_instances_that_serve(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    triton: fleet.Fleet = fleet_factory(1, TRITON_PORT)
    addresses = sorted({info[4][0] for info in socket.getaddrinfo("localhost", TRITON_PORT, type=socket.SOCK_STREAM)})
    assert "127.0.0.1" in addresses
    config = f"""
[server]
host = "127.0.0.1"
port = {GATEWAY_PORT}
[upstream]
health_interval_s = 0.5
dns_refresh_s = 1.0
instances = [{{ dns = "localhost", port = {triton.instances[0].http_port}, weight = 1 }}]
"""
    x = BREAST_CANCER.splits().x_test[:8]
    _, ref_probs = torch_reference(BREAST_CANCER.name, x)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}]}  # fmt: skip
    with running_gateway(config, GATEWAY_PORT, tmp_path) as gw, httpx.Client(base_url=gw.url, timeout=30) as http:
        view = http.get("/v2/gateway/fleet").json()["instances"]
        by_url = {i["url"]: i for i in view}
        expected = {f"http://[{a}]:{TRITON_PORT}" if ":" in a else f"http://{a}:{TRITON_PORT}" for a in addresses}
        assert set(by_url) == expected
        local = by_url[f"http://127.0.0.1:{TRITON_PORT}"]
        assert local["state"] == "up" and local["models"][BREAST_CANCER.name] == ["1"]
        assert all(i["state"] == "down" for url, i in by_url.items() if "127.0.0.1" not in url)
        for _ in range(20):
            resp = http.post(f"/v2/models/{BREAST_CANCER.name}/infer", json=body)
            assert resp.status_code == 200, resp.text
            probs = np.asarray(resp.json()["outputs"][0]["data"], np.float32).reshape(ref_probs.shape)
            np.testing.assert_allclose(probs, ref_probs, atol=ATOL, rtol=0)
        after = {i["url"]: i for i in http.get("/v2/gateway/fleet").json()["instances"]}
        assert after[f"http://127.0.0.1:{TRITON_PORT}"]["requests"] == 20  # one batch per sequential request
