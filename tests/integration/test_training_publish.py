"""The training module end to end against a real Triton: a model trained on two DDP workers,
pruned and int8-quantized, is published as version 2 of a copy of the model repository; Triton
(poll mode) loads it and answers exactly what the artifact's own forward pass gives, at the
accuracy publish measured; a gateway reading the rollout file publish wrote sends it its canary
share of requests; and the accuracy gate refuses a bad model, which Triton then never sees.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

import fleet
from conftest import gateway_config, http_status, running_gateway
from served_models import MAX_BATCH, MODEL_REPOSITORY
from training.compress import compress
from training.compress import save as save_compressed
from training.distributed import TrainConfig, train
from training.distributed import save as save_trained
from training.launch import free_port
from training.models import DigitsCNN
from training.publish import GateRefused, publish, versions
from training.quantize import load_payload, model_from_payload
from training.specs import MODELS, spec

pytestmark = pytest.mark.integration

MODEL = "digits_cnn"
BASE_HTTP = 8196  # this module's port block: 8196 (HTTP), 8296 (gRPC), 8396 (metrics)
ATOL = 1e-4


def _wait_ready(base: str, version: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while http_status(f"{base}/v2/models/{MODEL}/versions/{version}/ready") != 200:
        if time.monotonic() > deadline:
            raise AssertionError(f"Triton did not load {MODEL} version {version} within {timeout}s")
        time.sleep(0.25)


def _served(client: httpclient.InferenceServerClient, x: np.ndarray, version: str) -> tuple[np.ndarray, np.ndarray]:
    logits, probs = [], []
    outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("logits", "probabilities")]
    for start in range(0, len(x), MAX_BATCH):
        rows = np.ascontiguousarray(x[start : start + MAX_BATCH], np.float32)
        inp = httpclient.InferInput(spec(MODEL).input_name, list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows, binary_data=True)
        result = client.infer(MODEL, [inp], outputs=outputs, model_version=version)
        logits.append(result.as_numpy("logits"))
        probs.append(result.as_numpy("probabilities"))
    return np.concatenate(logits), np.concatenate(probs)


async def test_a_trained_compressed_model_is_published_served_and_gated(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    repo = tmp_path / "model_repository"
    shutil.copytree(MODEL_REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))

    # Train on two workers (DDP over gloo), then prune and quantize, as the README shows.
    trained = train(TrainConfig(MODEL, workers=2, epochs=12, progress=False, timeout_s=120))
    assert trained is not None
    checkpoint = tmp_path / "runs" / "digits.pt"
    save_trained(trained, checkpoint)
    compressed = compress(MODEL, checkpoint, prune_amount=0.5, quantize_scheme="dynamic", progress=False, latency_runs=10)
    artifact = tmp_path / "runs" / "digits-pruned-int8.pt"
    save_compressed(compressed, artifact)

    triton: fleet.Fleet = fleet_factory(1, BASE_HTTP, repository=repo)
    base = triton.http_urls[0]
    rollout = tmp_path / "rollout.toml"
    published = publish(MODEL, artifact, repo, margin=0.02, canary_config=rollout, canary_share=0.1,
                        latency_runs=10, log=lambda *_: None)  # fmt: skip
    assert published.version == 2 and published.stable_version == 1
    _wait_ready(base, 2)

    # Triton's answers from version 2 are the artifact's own forward pass, row for row.
    splits = spec(MODEL).splits(0)
    client = httpclient.InferenceServerClient(base.removeprefix("http://"))
    try:
        served_logits, served_probs = _served(client, splits.x_test, "2")
        v1_logits, _ = _served(client, splits.x_test, "1")
    finally:
        client.close()
    network = model_from_payload(load_payload(artifact))

    def reference(x: np.ndarray) -> np.ndarray:
        # Batch for batch as served: dynamic int8 quantizes activations with one scale per batch.
        with torch.inference_mode():
            return np.concatenate([network(torch.from_numpy(x[i : i + MAX_BATCH])).numpy() for i in range(0, len(x), MAX_BATCH)])

    ref_logits = reference(splits.x_test)
    assert served_logits.dtype == np.float32 and served_logits.shape == (len(splits.x_test), 10)
    np.testing.assert_allclose(served_logits, ref_logits, atol=ATOL, rtol=0)
    np.testing.assert_allclose(served_probs, torch.softmax(torch.from_numpy(ref_logits), 1).numpy(), atol=ATOL, rtol=0)
    served_accuracy = float((served_logits.argmax(1) == splits.y_test).mean())
    assert served_accuracy == pytest.approx(published.metrics.test_accuracy, abs=1 / len(splits.y_test))
    assert served_accuracy >= 0.93
    assert not np.allclose(v1_logits, served_logits, atol=ATOL)  # version 1 still answers, with its own weights

    # Through a gateway reading the rollout file publish wrote: version 2 is the canary and
    # takes about 10% of the requests that name no version; each version answers with its weights.
    port = free_port()
    config = gateway_config([base], port, rollout={"file": str(rollout)})
    x8 = splits.x_test[:8]
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [8, 1, 8, 8], "data": x8.ravel().tolist()}],
            "outputs": [{"name": "logits"}]}  # fmt: skip
    expected = {"1": v1_logits[:8], "2": reference(x8)}
    counts: Counter[str] = Counter()
    with running_gateway(config, port, tmp_path) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
            view = (await http.get("/v2/gateway/rollout")).json()["models"][MODEL]
            assert (view["stable"], view["canary"], view["canary_share"]) == ("1", "2", 0.1)
            for _ in range(300):
                resp = await http.post(f"/v2/models/{MODEL}/infer", json=body)
                assert resp.status_code == 200, resp.text
                version = resp.json()["model_version"]
                counts[version] += 1
                logits = np.array(resp.json()["outputs"][0]["data"], np.float32).reshape(8, 10)
                np.testing.assert_allclose(logits, expected[version], atol=ATOL, rtol=0)
    assert set(counts) == {"1", "2"} and 10 <= counts["2"] <= 60, counts  # 30 expected

    # The gate refuses an untrained model: no version 3 in the repository, none in Triton.
    torch.manual_seed(0)
    config = dict(MODELS[MODEL].default_config)
    bad = tmp_path / "runs" / "untrained.pt"
    torch.save({"arch": MODEL, "config": config, "state_dict": DigitsCNN(**config).state_dict()}, bad)
    with pytest.raises(GateRefused, match="refusing to publish digits_cnn"):
        publish(MODEL, bad, repo, margin=0.02, latency_runs=5, log=lambda *_: None)
    assert versions(repo / MODEL) == [1, 2]
    assert sorted(p.name for p in (repo / MODEL).iterdir()) == [".published", ".published.lock", "1", "2", "config.pbtxt"]
    time.sleep(2.5)  # more than Triton's poll interval
    assert http_status(f"{base}/v2/models/{MODEL}/versions/3/ready") != 200
    index = httpx.post(f"{base}/v2/repository/index", json={}).json()
    assert sorted(e["version"] for e in index if e["name"] == MODEL and e.get("state") == "READY") == ["1", "2"]
