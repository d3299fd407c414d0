"""What `python -m gateway serve` says before it serves: where it cannot listen (one line, either
server), and the settings one worker ignores (also said by `check-config`)."""

from __future__ import annotations

import errno
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.__main__ import CANNOT_LISTEN, listen_address, main
from gateway.cache.host import SEGMENT_ENV
from gateway.host_files import WORKERS_ENV

ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE = 'upstream = { instances = [{ url = "http://127.0.0.1:1" }] }\n'


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(UNREACHABLE + text)
    return path


def serve_stderr(config: Path, server: str, *options: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--server", server, *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stderr


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_is_said_in_one_line_whichever_server(
    tmp_path: Path, port_in_use: int, server: str, workers: int
) -> None:
    """granian printed a Python and a Rust traceback; uvicorn several lines, the app started first."""
    config = write_config(tmp_path, f"[server]\nworkers = {workers}\n")
    status, err = serve_stderr(config, server, "--port", str(port_in_use))
    assert err.splitlines() == [f"gateway: cannot listen on 127.0.0.1:{port_in_use}: Address already in use"], err
    assert status == CANNOT_LISTEN


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
@pytest.mark.parametrize("host", ["nonexistent.invalid", "192.0.2.1"])  # no such name; an address not here
def test_a_host_that_cannot_be_bound_is_said_in_one_line_whichever_server(tmp_path: Path, server: str, host: str) -> None:
    config = write_config(tmp_path, "")
    status, err = serve_stderr(config, server, "--host", host, "--port", "0")
    assert len(err.splitlines()) == 1 and re.fullmatch(rf"gateway: cannot listen on {re.escape(host)}:0: \w.*\n", err), err
    assert status == CANNOT_LISTEN


def test_a_host_name_is_handed_to_granian_as_the_address_it_resolves_to() -> None:
    """granian takes only an IP address ("localhost" made it fail with a traceback); uvicorn
    resolves a name to its IPv4 address, and now granian is given that one."""
    assert listen_address("localhost", 0) == "127.0.0.1"
    assert listen_address("127.0.0.1", 0) == "127.0.0.1"


def test_a_port_another_server_shares_by_reuseport_counts_as_in_use() -> None:
    """granian listens with SO_REUSEPORT: a check binding the same way would pass beside any
    such listener, and the kernel would then split the connections between the two."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            listen_address("127.0.0.1", other.getsockname()[1])


def test_an_ipv6_address_is_checked_for_ipv6_alone() -> None:
    """As asyncio's servers bind it (uvicorn, one worker): IPv6 only, so an IPv4 listener on
    the same port is no conflict."""
    with socket.socket() as v4:
        v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        v4.bind(("0.0.0.0", 0))
        v4.listen()
        try:
            assert listen_address("::", v4.getsockname()[1]) == "::"
        except OSError as exc:
            if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                pytest.skip(f"no IPv6 on this machine: {exc}")
            raise


HOST_WIDE = "batching.host_wide = true is ignored because server.workers is 1: batching for all the workers of a host takes server.workers > 1"
MODEL_HOST_WIDE = HOST_WIDE.replace("batching.host_wide", "batching.models.m.host_wide")
HOST_STORE = (
    "cache.host_max_bytes = 1048576 is ignored because server.workers is 1: the cache store the workers share takes server.workers > 1"
)


@pytest.mark.parametrize(
    "text, said",
    [
        ("[batching]\nhost_wide = true\n[cache]\nhost_max_bytes = 1048576\n", [HOST_WIDE, HOST_STORE]),
        # every model's follows [batching]: said once
        ("[batching]\nhost_wide = true\n[batching.models.m]\nmax_batch_size = 8\n", [HOST_WIDE]),
        ("[batching.models.m]\nhost_wide = true\n[batching.models.n]\nmax_batch_size = 8\n", [MODEL_HOST_WIDE]),
        ("[cache]\nhost_max_bytes = -1\n[batching]\nhost_wide = false\n", []),  # the defaults
        ("[cache]\nhost_max_bytes = 0\n", []),  # none asked for
        ("[server]\nworkers = 2\n[batching]\nhost_wide = true\n[cache]\nhost_max_bytes = 1048576\n", []),
    ],
)
def test_settings_one_worker_ignores_are_said_by_serve_and_check_config(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    text: str,
    said: list[str],
) -> None:
    """Said, not refused: the same file serves with more workers, where they act."""
    config = write_config(tmp_path, text)
    assert main(["check-config", "--config", str(config)]) == 0
    assert capsys.readouterr().err.splitlines() == [f"note: {line}" for line in said]

    for name in ("GATEWAY_CONFIG", SEGMENT_ENV, WORKERS_ENV):  # as they were, after serve sets them
        monkeypatch.setenv(name, "")
    monkeypatch.setattr("gateway.__main__._run", lambda *args: 0)  # started, not served
    with caplog.at_level(logging.WARNING, logger="gateway"):
        assert main(["serve", "--config", str(config), "--port", "0"]) == 0
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "gateway"] == [(logging.WARNING, line) for line in said]
