"""The path after decoding, with a fake router and metadata (no network)."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.batcher import BatchResult
from gateway.config import BatchingConfig
from gateway.errors import UpstreamError
from gateway.models import ModelInfo
from gateway.pipeline import InferencePipeline
from gateway.router import Instance
from gateway.tensors import InferRequest, RequestedOutput, Tensor


def info(max_batch_size: int) -> ModelInfo:
    return ModelInfo.from_triton(
        {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
         "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]},
        {"max_batch_size": max_batch_size}, b"{}", b"{}",
    )  # fmt: skip


class FakeMetadata:
    def __init__(self, model_info: ModelInfo) -> None:
        self.info = model_info

    async def get(self, model: str, version: str) -> ModelInfo:
        return self.info


class FakeRouter:
    def __init__(self, outputs: tuple[str, ...] = ("y",)) -> None:
        self.calls: list[tuple[int, dict | None]] = []
        self.outputs = outputs
        self.instances = [Instance("a"), Instance("b")]

    async def infer(self, model, version, inputs, parameters=None, deadline=None):  # noqa: ANN001, ANN201
        self.calls.append((inputs[0].data.shape[0], parameters))
        return BatchResult("1", [Tensor(n, "FP32", inputs[0].data * 2) for n in self.outputs])


def request(rows: int = 1, parameters: dict | None = None, outputs: list[str] | None = None) -> InferRequest:
    outs = None if outputs is None else [RequestedOutput(n) for n in outputs]
    return InferRequest("m", "", [Tensor("x", "FP32", np.ones((rows, 2), np.float32))], outs, parameters=parameters or {})


async def test_a_request_with_parameters_travels_alone_with_them() -> None:
    router = FakeRouter()
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(info(8)))  # type: ignore[arg-type]
    response = await pipeline.infer(request(parameters={"priority": 2}))
    assert router.calls == [(1, {"priority": 2})] and pipeline.batchers == {}
    np.testing.assert_array_equal(response.outputs[0].data, np.full((1, 2), 2, np.float32))
    await pipeline.infer(request())
    assert router.calls[-1] == (1, None) and list(pipeline.batchers) == [("m", "")]
    await pipeline.close(0)


async def test_batches_follow_a_changed_max_batch_size() -> None:
    metadata = FakeMetadata(info(8))
    pipeline = InferencePipeline(BatchingConfig(), FakeRouter(), metadata)  # type: ignore[arg-type]
    await pipeline.infer(request())
    assert pipeline.batchers[("m", "")].policy.max_rows == 8
    metadata.info = info(4)
    await pipeline.infer(request())
    assert pipeline.batchers[("m", "")].policy.max_rows == 4
    await pipeline.close(0)


async def test_a_requested_output_triton_did_not_return_is_502() -> None:
    pipeline = InferencePipeline(BatchingConfig(), FakeRouter(outputs=()), FakeMetadata(info(8)))  # type: ignore[arg-type]
    with pytest.raises(UpstreamError) as err:
        await pipeline.infer(request(outputs=["y"]))
    assert err.value.status == 502 and "'y'" in err.value.message
    await pipeline.close(0)


async def test_batch_slots_follow_the_number_of_healthy_instances() -> None:
    router = FakeRouter()
    pipeline = InferencePipeline(BatchingConfig(max_inflight_batches=2), router, FakeMetadata(info(8)))  # type: ignore[arg-type]
    await pipeline.infer(request())
    assert pipeline.batchers[("m", "")].policy.max_inflight == 4
    router.instances[1].healthy = False
    await pipeline.infer(request())
    assert pipeline.batchers[("m", "")].policy.max_inflight == 2
    await pipeline.close(0)
