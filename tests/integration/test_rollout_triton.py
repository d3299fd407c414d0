"""Traffic split between two real model versions through the rollout file: the canary's share,
sticky clients, a reload without restart, and a bad file that leaves the rollout in force.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

import fleet
from conftest import gateway_config, running_gateway
from served_models import ATOL, BREAST_CANCER, DIGITS, MODEL_REPOSITORY, torch_reference

pytestmark = pytest.mark.integration

TRITON_PORT = 8147
GATEWAY_PORT = 8148
PATH = f"/v2/models/{BREAST_CANCER.name}/infer"


def write(path: Path, text: str, stamp: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(stamp, stamp))  # a new stamp whatever the file system's clock resolution


def test_canary_share_sticky_clients_reload_and_a_rejected_file(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(MODEL_REPOSITORY / BREAST_CANCER.name, repo / BREAST_CANCER.name)
    shutil.copytree(repo / BREAST_CANCER.name / "1", repo / BREAST_CANCER.name / "2")  # same weights
    triton: fleet.Fleet = fleet_factory(1, TRITON_PORT, repository=repo, model_control_mode="none")
    rollout = tmp_path / "rollout.toml"
    write(rollout, f'[models.{BREAST_CANCER.name}]\nstable = "1"\ncanary = "2"\ncanary_share = 0.1\n'
                   'sticky_header = "x-user"\n', 10**18)  # fmt: skip
    config = gateway_config(triton.http_urls, GATEWAY_PORT, rollout={"file": str(rollout), "reload_interval_s": 0.2})
    x = BREAST_CANCER.splits().x_test[:1]
    _, ref = torch_reference(BREAST_CANCER.name, x)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": x.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}]}  # fmt: skip
    with running_gateway(config, GATEWAY_PORT, tmp_path) as gw, httpx.Client(base_url=gw.url, timeout=30) as http:

        def served(n: int, user: str | None = None) -> Counter[str]:
            versions: Counter[str] = Counter()
            headers = {"x-user": user} if user else {}
            for _ in range(n):
                resp = http.post(PATH, json=body, headers=headers)
                assert resp.status_code == 200, resp.text
                answer = resp.json()
                assert resp.headers["model-version"] == answer["model_version"]
                probs = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(ref.shape)
                np.testing.assert_allclose(probs, ref, atol=ATOL, rtol=0)
                versions[answer["model_version"]] += 1
            return versions

        split = served(2000)
        # Drawn at random: the canary's share of 2,000 has a standard deviation of 0.0067, so
        # within 0.035 (5 of them; 0.02 failed about one run in 400).
        assert abs(split["2"] / 2000 - 0.10) <= 0.035, split
        # A client with the sticky header always gets the same version.
        for user in ("alice", "bob", "carol", "dave"):
            assert len(served(20, user)) == 1
        # A version named in the path bypasses the rollout.
        pinned = http.post(f"/v2/models/{BREAST_CANCER.name}/versions/2/infer", json=body).json()
        assert pinned["model_version"] == "2"
        # Reload without restart.
        write(rollout, f'[models.{BREAST_CANCER.name}]\nstable = "2"\n', 2 * 10**18)
        deadline = time.monotonic() + 10
        while http.get("/v2/gateway/rollout").json()["models"][BREAST_CANCER.name]["stable"] != "2":
            assert time.monotonic() < deadline, "the changed rollout file was not picked up"
            time.sleep(0.1)
        assert served(50) == {"2": 50}
        # A bad file is rejected with a message, and the rollout in force stays.
        write(rollout, f'[models.{BREAST_CANCER.name}]\nstable = "two"\n', 3 * 10**18)
        deadline = time.monotonic() + 10
        while not (view := http.get("/v2/gateway/rollout").json())["error"]:
            assert time.monotonic() < deadline, "the bad rollout file was not noticed"
            time.sleep(0.1)
        assert "version number" in view["error"] and view["models"][BREAST_CANCER.name]["stable"] == "2"
        assert served(20) == {"2": 20}
        # A ramp that completes promotes the canary.
        write(rollout, f'[models.{BREAST_CANCER.name}]\nstable = "1"\ncanary = "2"\nramp = [0.25, 0.5, 1.0]\n'
                       'ramp_min_requests = 20\nramp_min_seconds = 0.0\n', 4 * 10**18)  # fmt: skip
        deadline = time.monotonic() + 10
        while http.get("/v2/gateway/rollout").json()["models"][BREAST_CANCER.name].get("ramp") is None:
            assert time.monotonic() < deadline, "the ramp was not picked up"
            time.sleep(0.1)
        for _ in range(20):
            if http.get("/v2/gateway/rollout").json()["models"][BREAST_CANCER.name]["status"] == "promoted":
                break
            served(40)
        view = http.get("/v2/gateway/rollout").json()["models"][BREAST_CANCER.name]
        assert view["status"] == "promoted" and view["stable"] == "2", view
        assert [e["event"] for e in view["events"]] == ["ramp", "ramp", "promote"]
        assert served(30) == {"2": 30}
        # Shadow mode: version 1 gets a copy of every request; clients only ever see version 2.
        write(rollout, f'[models.{BREAST_CANCER.name}]\nstable = "2"\nshadow = "1"\nshadow_share = 1.0\n', 5 * 10**18)
        deadline = time.monotonic() + 10
        while http.get("/v2/gateway/rollout").json()["models"][BREAST_CANCER.name]["shadow"] is None:
            assert time.monotonic() < deadline, "the shadow was not picked up"
            time.sleep(0.1)
        assert served(40) == {"2": 40}
        deadline = time.monotonic() + 10
        while (shadow := http.get("/v2/gateway/rollout").json()["models"][BREAST_CANCER.name]["shadow"])["compared"] < 40:
            assert time.monotonic() < deadline, shadow
            time.sleep(0.1)
        # Same weights in both versions: the answers agree exactly.
        assert shadow["failed"] == 0 and shadow["max_abs_diff"] == 0.0 and shadow["argmax_agreement"] == 1.0


FAULTY = '''

# --- made faulty for the rollback test: every third execution fails ---------------------------
_execute = TritonPythonModel.execute


def _faulty_execute(self, requests):
    self._calls = getattr(self, "_calls", 0) + 1
    if self._calls % 3 == 0:
        return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError("faulty canary")) for _ in requests]
    return _execute(self, requests)


TritonPythonModel.execute = _faulty_execute
'''


def test_a_faulty_canary_is_rolled_back_within_its_window_and_operators_can_act(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    repo = tmp_path / "repo"
    repo.mkdir()
    model_dir = repo / BREAST_CANCER.name
    shutil.copytree(MODEL_REPOSITORY / BREAST_CANCER.name, model_dir)
    shutil.copytree(model_dir / "1", model_dir / "2")
    (model_dir / "2" / "model.py").write_text((model_dir / "1" / "model.py").read_text() + FAULTY)
    shutil.copytree(MODEL_REPOSITORY / DIGITS.name, repo / DIGITS.name)  # served, with no rollout
    triton: fleet.Fleet = fleet_factory(1, TRITON_PORT, repository=repo, model_control_mode="none")
    window = 50  # a third failing against a clean stable is significant over 50 (z 4.5), not over 20
    rollout = tmp_path / "rollout.toml"
    write(rollout, f'[models.{BREAST_CANCER.name}]\nstable = "1"\ncanary = "2"\ncanary_share = 0.2\n'
                   f'rollback_error_rate = 0.05\nrollback_window = {window}\n', 10**18)  # fmt: skip
    config = gateway_config(
        triton.http_urls, GATEWAY_PORT, rollout={"file": str(rollout), "admin_token": "s3cret"}, batching={"enabled": False}
    )
    x = BREAST_CANCER.splits().x_test[:1]
    _, ref = torch_reference(BREAST_CANCER.name, x)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": x.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}]}  # fmt: skip
    with running_gateway(config, GATEWAY_PORT, tmp_path) as gw, httpx.Client(base_url=gw.url, timeout=30) as http:
        errors, versions = 0, Counter()
        for _ in range(600):
            resp = http.post(PATH, json=body)
            if resp.status_code != 200:
                errors += 1
                assert "faulty canary" in resp.json()["error"], resp.text
                continue
            answer = resp.json()
            versions[answer["model_version"]] += 1
            np.testing.assert_allclose(np.asarray(answer["outputs"][0]["data"], np.float32).reshape(ref.shape), ref, atol=ATOL, rtol=0)
        view = http.get("/v2/gateway/rollout").json()["models"][BREAST_CANCER.name]
        assert view["status"] == "rolled_back" and view["canary_share"] == 0.0
        (event,) = [e for e in view["events"] if e["event"] == "rollback"]
        assert event["by"] == "automatic" and event["canary_error_rate"] > 0.05 and event["window"] == window
        canary_requests = view["served"]["2"]
        # Rolled back within its window (plus one evaluation interval), so the errors clients saw
        # are a third of at most that many canary requests; none after the rollback.
        assert canary_requests <= window + 10 and 0 < errors <= canary_requests
        assert versions["1"] + versions["2"] + errors == 600
        after = [http.post(PATH, json=body) for _ in range(50)]
        assert all(r.status_code == 200 and r.json()["model_version"] == "1" for r in after)

        # The admin API: token-protected, and it moves the rollout.
        action = f"/v2/gateway/rollout/{BREAST_CANCER.name}"
        missing = http.post(action, json={"action": "set_share", "share": 1.0})
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        wrong = http.post(action, json={"action": "set_share", "share": 1.0}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "admin token" in wrong.json()["error"]
        auth = {"Authorization": "Bearer s3cret"}
        assert http.post(action, json={"action": "fly"}, headers=auth).status_code == 400
        unknown = http.post("/v2/gateway/rollout/unknown", json={"action": "promote"}, headers=auth)
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown model 'unknown': no instance serves it"
        plain = http.post(f"/v2/gateway/rollout/{DIGITS.name}", json={"action": "promote"}, headers=auth)
        assert plain.status_code == 404 and f"model '{DIGITS.name}' has no rollout" in plain.json()["error"]
        promoted = http.post(action, json={"action": "promote"}, headers=auth)
        assert promoted.status_code == 200 and promoted.json()["stable"] == "2"
        answered = [r for r in (http.post(PATH, json=body) for _ in range(6)) if r.status_code == 200]
        assert answered and all(r.headers["model-version"] == "2" for r in answered)  # (the faulty one, now)


def test_with_two_workers_a_rollback_made_in_one_reaches_every_worker(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """The admin API reaches the one worker that took its connection; the decision reaches the
    other within moments (gateway/rollout_workers.py). Each request on a new connection, so the
    workers share them."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(MODEL_REPOSITORY / BREAST_CANCER.name, repo / BREAST_CANCER.name)
    shutil.copytree(repo / BREAST_CANCER.name / "1", repo / BREAST_CANCER.name / "2")
    triton: fleet.Fleet = fleet_factory(1, TRITON_PORT, repository=repo, model_control_mode="none")
    rollout = tmp_path / "rollout.toml"
    write(rollout, f'[models.{BREAST_CANCER.name}]\nstable = "1"\ncanary = "2"\ncanary_share = 0.5\n', 10**18)
    config = gateway_config(
        triton.http_urls, GATEWAY_PORT, server={"workers": 2}, rollout={"file": str(rollout), "admin_token": "s3cret"}
    )
    x = BREAST_CANCER.splits().x_test[:1]
    _, ref = torch_reference(BREAST_CANCER.name, x)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": x.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}]}  # fmt: skip
    with running_gateway(config, GATEWAY_PORT, tmp_path) as gw:
        deadline = time.monotonic() + 60
        while len(gw.worker_pids()) < 2:
            assert time.monotonic() < deadline, f"the workers did not both start:\n{gw.log()}"
            time.sleep(0.1)

        def served(n: int) -> tuple[Counter[str], Counter[str]]:
            """Versions that answered, and the rollout status each answering worker reports."""
            versions: Counter[str] = Counter()
            statuses: Counter[str] = Counter()
            for _ in range(n):
                with httpx.Client(base_url=gw.url, timeout=30) as fresh:  # a new connection
                    resp = fresh.post(PATH, json=body)
                    assert resp.status_code == 200, resp.text
                    probs = np.asarray(resp.json()["outputs"][0]["data"], np.float32).reshape(ref.shape)
                    np.testing.assert_allclose(probs, ref, atol=ATOL, rtol=0)
                    versions[resp.headers["model-version"]] += 1
                with httpx.Client(base_url=gw.url, timeout=30) as fresh:
                    statuses[fresh.get("/v2/gateway/rollout").json()["models"][BREAST_CANCER.name]["status"]] += 1
            return versions, statuses

        versions, statuses = served(100)
        assert versions["1"] > 20 and versions["2"] > 20 and statuses == {"canary": 100}, (versions, statuses)
        with httpx.Client(base_url=gw.url, timeout=30) as admin:
            resp = admin.post(f"/v2/gateway/rollout/{BREAST_CANCER.name}", json={"action": "rollback"},
                              headers={"Authorization": "Bearer s3cret"})  # fmt: skip
            assert resp.status_code == 200 and resp.json()["status"] == "rolled_back", resp.text
        time.sleep(0.5)  # the other worker looks every 50 ms
        versions, statuses = served(200)
        assert versions == {"1": 200} and statuses == {"rolled_back": 200}, (versions, statuses)
