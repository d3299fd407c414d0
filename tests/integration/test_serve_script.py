"""`make serve`'s script (scripts/serve.py): the stack it starts answers, and SIGINT stops all of
it with exit status 0, also in a run started in the background (SIGINT ignored at start, as a
shell starts background jobs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, ensure_default_weights, ensure_triton_fetched, gateway_config, http_status

pytestmark = pytest.mark.integration

TRITON_PORTS = (8190, 8191)
GATEWAY_PORT = 8197


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid:
                members.append(int(entry.name))
        except ProcessLookupError:
            continue
    return members


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_sigint_stops_the_stack_with_status_0(tmp_path: Path, background: bool) -> None:
    ensure_triton_fetched()
    ensure_default_weights()
    config = tmp_path / "serve.toml"
    urls = [f"http://127.0.0.1:{p}" for p in TRITON_PORTS]
    config.write_text(gateway_config(urls, GATEWAY_PORT, repository={"path": ""}))
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "scripts/serve.py", "--config", str(config)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=ignore_sigint,
        )
    try:
        gateway = f"http://127.0.0.1:{GATEWAY_PORT}"
        deadline = time.monotonic() + 180
        while http_status(f"{gateway}/v2/health/ready") != 200:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the stack did not become ready"
            time.sleep(0.5)
        assert http_status(f"{gateway}/v2/models/digits_cnn/ready") == 200

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does to the foreground group
        status = proc.wait(60)
        output = log.read_text()
        assert status == 0, output
        assert "serve: stopping" in output
        for port in (*TRITON_PORTS, GATEWAY_PORT):
            assert http_status(f"http://127.0.0.1:{port}/v2/health/live") == 0, f"port {port} still answers"
        assert group_members(proc.pid) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
