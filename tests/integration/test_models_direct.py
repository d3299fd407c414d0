"""The served default models, talked to directly (no gateway) with tritonclient.

A wrong tensor hand-off in model.py (for example numpy 2 arrays in the bundled Python backend)
fails silently with zeros, so served outputs are compared with a direct torch forward pass of
the same weights, row by row, on the held-out test split.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

import fleet  # on sys.path through conftest.py
from served_models import ATOL, MAX_BATCH, MODEL_REPOSITORY, MODELS, ServedModel, torch_reference

pytestmark = pytest.mark.integration


def make_input(name: str, rows: np.ndarray) -> httpclient.InferInput:
    inp = httpclient.InferInput(name, list(rows.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(rows, dtype=np.float32), binary_data=True)
    return inp


@pytest.fixture(scope="module")
def client(direct_triton: fleet.Fleet) -> Iterator[httpclient.InferenceServerClient]:
    url = direct_triton.http_urls[0].removeprefix("http://")
    c = httpclient.InferenceServerClient(url, concurrency=16)
    yield c
    c.close()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_served_outputs_match_torch_and_reach_target_accuracy(
    client: httpclient.InferenceServerClient, model: ServedModel
) -> None:
    splits = model.splits()
    outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("logits", "probabilities")]
    logits, probs = [], []
    for start in range(0, len(splits.x_test), MAX_BATCH):
        rows = splits.x_test[start : start + MAX_BATCH]
        result = client.infer(model.name, [make_input(model.input_name, rows)], outputs=outputs)
        logits.append(result.as_numpy("logits"))
        probs.append(result.as_numpy("probabilities"))
    served_logits, served_probs = np.concatenate(logits), np.concatenate(probs)

    ref_logits, ref_probs = torch_reference(model.name, splits.x_test)
    assert served_logits.shape == ref_logits.shape and served_logits.dtype == np.float32
    np.testing.assert_allclose(served_logits, ref_logits, atol=ATOL, rtol=0)
    np.testing.assert_allclose(served_probs, ref_probs, atol=ATOL, rtol=0)
    accuracy = float((served_logits.argmax(axis=1) == splits.y_test).mean())
    assert accuracy >= model.target_accuracy


@pytest.fixture(scope="module")
def batching_client(
    fleet_module_factory: Callable[..., fleet.Fleet], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpclient.InferenceServerClient]:
    """A server on a copy of the repository whose batchers wait 100 ms, so concurrent requests
    from a (slow, Python) client reliably meet in one execute() call."""
    repo = tmp_path_factory.mktemp("repo-batching")
    shutil.copytree(MODEL_REPOSITORY, repo, dirs_exist_ok=True)
    for config in repo.glob("*/config.pbtxt"):
        text = re.sub(r"max_queue_delay_microseconds: \d+", "max_queue_delay_microseconds: 100000", config.read_text())
        config.write_text(text)
    f = fleet_module_factory(1, 8156, repository=repo)
    c = httpclient.InferenceServerClient(f.http_urls[0].removeprefix("http://"), concurrency=16)
    yield c
    c.close()


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_concurrent_requests_are_batched_and_split_back_correctly(
    batching_client: httpclient.InferenceServerClient, model: ServedModel
) -> None:
    """Concurrent requests of uneven sizes go through one forward pass in model.py; each must
    get back exactly its own rows, and only the outputs it asked for."""
    client = batching_client
    x = model.splits().x_test[:48]
    sizes = [1, 2, 3] * 8  # 48 rows in 24 requests
    bounds = np.cumsum([0, *sizes])
    wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=True)]
    before = _execution_stats(client, model.name)
    pending = [
        client.async_infer(model.name, [make_input(model.input_name, x[a:b])], outputs=wanted)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    _, ref_probs = torch_reference(model.name, x)
    for (a, b), future in zip(zip(bounds[:-1], bounds[1:]), pending):
        result = future.get_result()
        assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
        np.testing.assert_allclose(result.as_numpy("probabilities"), ref_probs[a:b], atol=ATOL, rtol=0)
    rows, executions = (n - m for n, m in zip(_execution_stats(client, model.name), before))
    assert rows == len(x)
    assert executions <= len(sizes) // 2, "requests were not batched together"


def _execution_stats(client: httpclient.InferenceServerClient, model: str) -> tuple[int, int]:
    """(rows inferred, model executions) so far: inference_count counts rows, not requests."""
    stats = client.get_inference_statistics(model)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def _group_members(pgid: int) -> set[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.add(int(entry.name))
    return members


def test_stop_leaves_no_server_or_stub_processes(fleet_factory: Callable[..., fleet.Fleet]) -> None:
    f = fleet_factory(1, 8155)
    first = f.instances[0].pid
    assert first is not None and len(_group_members(first)) >= 3  # server + one stub per model

    # A crash (SIGKILL of the server alone), then a restart, must not leak the old stubs.
    f.kill(0, signal.SIGKILL)
    assert not f.is_ready(0)
    f.restart(0)
    assert f.is_ready(0)
    second = f.instances[0].pid
    assert second is not None and second != first

    # A hung (SIGSTOPped) server must still stop cleanly.
    f.kill(0, signal.SIGSTOP)
    f.stop()
    for pgid in (first, second):
        assert _group_members(pgid) == set(), f"processes left in group {pgid}"
        with pytest.raises(ProcessLookupError):
            os.kill(pgid, 0)


def test_start_failures_raise_clear_errors(triton_setup: None, tmp_path: Path) -> None:
    # A port already taken: refused before launching anything.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 8157))
        busy.listen()
        with pytest.raises(fleet.FleetError, match=r"8157.*already in use"):
            with fleet.Fleet(MODEL_REPOSITORY, 1, 8157, 8257, 8357, log_dir=tmp_path / "ports"):
                pass

    # A model that cannot load: the server exits and the error carries its log tail.
    broken = tmp_path / "repo" / "broken"
    shutil.copytree(MODEL_REPOSITORY / "breast_cancer_mlp", broken)
    config = broken / "config.pbtxt"
    config.write_text(config.read_text().replace('"breast_cancer_mlp"', '"broken"'))
    (broken / "1" / "model.py").write_text("raise RuntimeError('weights are missing')\n")
    with pytest.raises(fleet.FleetError, match="weights are missing"):
        with fleet.Fleet(broken.parent, 1, 8157, 8257, 8357, log_dir=tmp_path / "logs"):
            pass
