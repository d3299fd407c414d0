"""`make serve`'s script (scripts/serve.py): the stack it starts answers, and SIGINT stops all of
it with exit status 0, also in a run started in the background (SIGINT ignored at start, as a
shell starts background jobs), and also when a second SIGINT comes while it stops."""

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


def start_stack(tmp_path: Path, background: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
    """scripts/serve.py in a session of its own, once its gateway is ready; and its log."""
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
    except BaseException:
        kill_stack(proc)
        raise
    return proc, log


def kill_stack(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_all_stopped(proc: subprocess.Popen[bytes]) -> None:
    for port in (*TRITON_PORTS, GATEWAY_PORT):
        assert http_status(f"http://127.0.0.1:{port}/v2/health/live") == 0, f"port {port} still answers"
    assert group_members(proc.pid) == []


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_sigint_stops_the_stack_with_status_0(tmp_path: Path, background: bool) -> None:
    proc, log = start_stack(tmp_path, background)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does to the foreground group
        status = proc.wait(60)
        output = log.read_text()
        assert status == 0, output
        assert "serve: stopping" in output
        assert_all_stopped(proc)
    finally:
        kill_stack(proc)


def test_a_second_sigint_while_stopping_still_stops_everything_with_status_0(tmp_path: Path) -> None:
    """An impatient Ctrl-C, pressed again while the stack stops: the gateway is hurried, the
    fleet is still stopped, and the script exits 0 instead of dying of a KeyboardInterrupt
    in its own clean-up (which left the fleet running)."""
    proc, log = start_stack(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while "serve: stopping" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the script did not start stopping"
            time.sleep(0.01)
        assert proc.poll() is None, "the stack stopped before the second SIGINT could come"
        os.killpg(proc.pid, signal.SIGINT)
        status = proc.wait(60)
        output = log.read_text()
        assert 'serve.py", line' not in output, output  # no traceback of the script's own
        assert status == 0, output
        assert "serve: stopping now" in output
        assert_all_stopped(proc)
    finally:
        kill_stack(proc)
