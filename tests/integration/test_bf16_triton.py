"""BF16 (bfloat16) through the gateway to a real Triton: a Python-backend model that doubles a BF16
tensor in bfloat16 (torch, through DLPack), checked against the same computation in torch here.

Clients send BF16 as binary data (tritonclient refuses it in JSON) or as JSON numbers (the
gateway rounds them as torch does), and read the answer as binary data, as JSON numbers or as
msgpack; batched requests each get their own rows.

Ports: Triton 8188 (gRPC 8288, metrics 8388), gateway 8189.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ml_dtypes
import msgpack
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

import fleet
from conftest import Stack, gateway_config, running_gateway
from gateway.protocol import msgpack as msgpack_codec
from gateway.tensors import Tensor

pytestmark = pytest.mark.integration

TRITON_PORT = 8188
GATEWAY_PORT = 8189
MODEL = "bf16_double"
WIDTH = 4
MAX_BATCH = 8

CONFIG = f"""
name: "{MODEL}"
backend: "python"
max_batch_size: {MAX_BATCH}
input [ {{ name: "x", data_type: TYPE_BF16, dims: [ {WIDTH} ] }} ]
output [ {{ name: "y", data_type: TYPE_BF16, dims: [ {WIDTH} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
"""

MODEL_PY = '''
import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = torch.from_dlpack(pb_utils.get_input_tensor_by_name(request, "x").to_dlpack())
            if x.dtype != torch.bfloat16:
                raise pb_utils.TritonModelException(f"x arrived as {x.dtype}, not bfloat16")
            y = (2 * x).contiguous()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("y", torch.utils.dlpack.to_dlpack(y))]))
        return responses
'''


def build_repository(root: Path) -> Path:
    version = root / MODEL / "1"
    version.mkdir(parents=True)
    (root / MODEL / "config.pbtxt").write_text(CONFIG)
    (version / "model.py").write_text(MODEL_PY)
    return root


def bits_of(values: torch.Tensor) -> np.ndarray:
    return values.view(torch.int16).numpy().view("<u2")


def doubled(values: list | np.ndarray) -> torch.Tensor:
    """The ground truth: 2 * x computed in bfloat16 by torch, x rounded from the values."""
    return 2 * torch.tensor(np.asarray(values, dtype=np.float32), dtype=torch.bfloat16)


def sample(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((rows, WIDTH)) * 10.0 ** rng.integers(-20, 20, (rows, WIDTH))).astype(np.float32)
    values[0, :3] = [0.1, -1 / 3, 1 + 2**-8]  # a tie: rounded to even
    return values


@pytest.fixture(scope="module")
def stack(fleet_module_factory: Callable[..., fleet.Fleet], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    repo = build_repository(tmp_path_factory.mktemp("bf16-repo"))
    triton = fleet_module_factory(1, TRITON_PORT, repository=repo, model_control_mode="none")
    config = gateway_config(triton.http_urls, GATEWAY_PORT, batching={"max_queue_delay_ms": 5})
    with running_gateway(config, GATEWAY_PORT, tmp_path_factory.mktemp("gateway")) as gw:
        yield Stack(triton, gw)


def tritonclient_infer(hostport: str, x: np.ndarray, binary_output: bool) -> httpclient.InferResult:
    with httpclient.InferenceServerClient(hostport) as client:
        item = httpclient.InferInput("x", list(x.shape), "BF16")
        item.set_data_from_numpy(x.astype(ml_dtypes.bfloat16))  # binary: tritonclient's only way for BF16
        return client.infer(MODEL, [item], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary_output)])


def test_a_binary_bf16_request_from_tritonclient_is_answered_as_torch_computes(stack: Stack) -> None:
    x = sample(3, seed=1)
    result = tritonclient_infer(stack.gateway.hostport, x, binary_output=True)
    y = result.as_numpy("y")
    assert y.dtype == ml_dtypes.bfloat16 and y.shape == (3, WIDTH)
    np.testing.assert_array_equal(y.view("<u2"), bits_of(doubled(x)))
    # Bit for bit what Triton answers itself.
    direct = tritonclient_infer(stack.triton.http_urls[0].removeprefix("http://"), x, binary_output=True)
    np.testing.assert_array_equal(y.view("<u2"), direct.as_numpy("y").view("<u2"))


def test_a_bf16_output_asked_for_as_json_is_its_values_exactly(stack: Stack) -> None:
    x = sample(2, seed=2)
    result = tritonclient_infer(stack.gateway.hostport, x, binary_output=False)
    (out,) = result.get_response()["outputs"]
    assert (out["datatype"], out["shape"], "parameters" in out) == ("BF16", [2, WIDTH], False)
    written = np.array(out["data"], dtype=np.float64)
    np.testing.assert_array_equal(written, doubled(x).double().numpy().ravel())
    np.testing.assert_array_equal(result.as_numpy("y").view("<u2"), bits_of(doubled(x)))


def test_json_numbers_in_and_out_are_rounded_as_torch_rounds(stack: Stack) -> None:
    x = sample(2, seed=3)
    body = {
        "inputs": [{"name": "x", "datatype": "BF16", "shape": [2, WIDTH], "data": x.astype(np.float64).tolist()}],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
    }
    answer = httpx.post(f"{stack.gateway.url}/v2/models/{MODEL}/infer", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    (out,) = json.loads(answer.content)["outputs"]
    np.testing.assert_array_equal(np.array(out["data"], dtype=np.float64), doubled(x).double().numpy().ravel())


def test_a_bf16_request_of_the_wrong_size_or_type_is_a_400(stack: Stack) -> None:
    url = f"{stack.gateway.url}/v2/models/{MODEL}/infer"
    head = json.dumps({"inputs": [{"name": "x", "datatype": "BF16", "shape": [1, WIDTH], "parameters": {"binary_data_size": 6}}]}).encode()
    short = httpx.post(url, content=head + bytes(6), headers={"Inference-Header-Content-Length": str(len(head))}, timeout=10)
    assert short.status_code == 400
    assert "input 'x': got 6 bytes of data, BF16 shape [1, 4] needs 8" in short.json()["error"]
    as_uint16 = {"inputs": [{"name": "x", "datatype": "UINT16", "shape": [1, WIDTH], "data": [1, 2, 3, 4]}]}
    wrong = httpx.post(url, json=as_uint16, timeout=10)
    assert wrong.status_code == 400 and "must have datatype BF16, got UINT16" in wrong.json()["error"]


def test_a_msgpack_bf16_request_is_answered_with_the_bits(stack: Stack) -> None:
    x = sample(2, seed=4)
    bits = bits_of(torch.tensor(x, dtype=torch.bfloat16))
    body = msgpack_codec.encode_request([Tensor("x", "BF16", bits)], ["y"])
    answer = httpx.post(
        f"{stack.gateway.url}/v2/models/{MODEL}/infer", content=body, headers={"Content-Type": msgpack_codec.CONTENT_TYPE}, timeout=10
    )
    assert answer.status_code == 200, answer.content
    (out,) = msgpack.unpackb(answer.content, raw=False)["outputs"]
    assert (out["datatype"], out["shape"]) == ("BF16", [2, WIDTH])
    np.testing.assert_array_equal(np.frombuffer(out["data"], "<u2").reshape(2, WIDTH), bits_of(doubled(x)))


def test_concurrent_bf16_requests_each_get_their_own_rows(stack: Stack) -> None:
    """Requests batched together (one to three rows each) come back with exactly their rows."""
    inputs = [sample(1 + i % 3, seed=100 + i) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: tritonclient_infer(stack.gateway.hostport, x, True), inputs))
    for x, result in zip(inputs, results):
        np.testing.assert_array_equal(result.as_numpy("y").view("<u2"), bits_of(doubled(x)))
