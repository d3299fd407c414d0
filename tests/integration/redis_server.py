"""A real redis-server for tests: fetched by scripts/fetch_redis.sh when missing, run on a fixed
port without persistence in a temporary folder, and stopped afterwards, failed test or not."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_BINARY = REPO_ROOT / ".cache" / "redis" / "bin" / "redis-server"
REDIS_PORT = 8690


def ensure_redis_fetched() -> Path:
    if not os.access(REDIS_BINARY, os.X_OK):
        subprocess.run(["bash", str(REPO_ROOT / "scripts" / "fetch_redis.sh")], check=True)
    return REDIS_BINARY


class RedisServer:
    """One redis-server process on a fixed port, which a test may kill, freeze and start again."""

    def __init__(self, binary: Path, workdir: Path, port: int = REDIS_PORT) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.log_path = workdir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        args = [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--daemonize", "no"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._pong():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not answering after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9: no goodbye to the clients."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def freeze(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.thaw()
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(ensure_redis_fetched(), tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()
