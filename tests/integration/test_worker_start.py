"""A gateway worker takes traffic warm: before its start is done, it knows the metadata and
config of every version the fleet serves (gateway/upstream/metadata.py, ``warm``), so its first
requests do not wait on Triton for them. The gateway's app in this process, in front of a real
Triton."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

import fleet
from conftest import gateway_config
from gateway.app import build_app
from gateway.config import load_config
from gateway.tensors import InferRequest, Tensor
from served_models import ATOL, BREAST_CANCER, torch_reference

pytestmark = pytest.mark.integration


async def test_a_worker_knows_the_fleets_metadata_before_its_first_request(direct_triton: fleet.Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(gateway_config(direct_triton.http_urls, 8159, upstream={"health_interval_s": 0.2}))
    app = build_app(load_config(path)).app
    async with app.router.lifespan_context(app):
        services = app.state.services
        served = services.router.served()
        assert ("breast_cancer_mlp", "1") in served and ("digits_cnn", "1") in served
        metadata = services.pipeline.metadata
        unknown = [key for key in served if metadata.fresh(*key) is None]
        assert not unknown, f"not fetched at the start: {unknown}"
        info = metadata.fresh(BREAST_CANCER.name, "1")
        assert info is not None and list(info.inputs) == [BREAST_CANCER.input_name]
        # And it answers with it: the first request, against a direct forward pass.
        rows = np.ascontiguousarray(BREAST_CANCER.splits().x_test[:4], dtype=np.float32)
        request = InferRequest(BREAST_CANCER.name, "1", [Tensor(BREAST_CANCER.input_name, "FP32", rows)])
        response = await services.pipeline.infer(request)
        [probabilities] = [t.data for t in response.outputs if t.name == "probabilities"]
        np.testing.assert_allclose(probabilities, torch_reference(BREAST_CANCER.name, rows)[1], atol=ATOL)
        # A version the worker knows nothing of (as one new to the fleet) is fetched after the
        # next health round, before anyone asks for it.
        metadata._entries.clear()
        deadline = asyncio.get_running_loop().time() + 10
        while any(metadata.fresh(*key) is None for key in served):
            assert asyncio.get_running_loop().time() < deadline, "not fetched after the health rounds"
            await asyncio.sleep(0.05)
