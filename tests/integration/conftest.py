"""Shared fixtures for integration tests: real Triton servers started through triton/fleet.py.

Set-up (what `make` does) is assumed but repaired when missing: the Triton binary is fetched by
triton/fetch.sh (a no-op once done) and missing default weights are trained.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
DEFAULT_MODELS = ("digits_cnn", "breast_cancer_mlp")

# triton/ is deliberately not a package (it would shadow the Triton compiler torch imports).
sys.path.insert(0, str(REPO_ROOT / "triton"))
import fleet  # noqa: E402
from gateway.host_files import WORKERS_PREFIX, default_directory  # noqa: E402


def http_status(url: str, timeout: float = 2.0) -> int:
    """The status a GET of ``url`` answers, 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def ensure_triton_fetched() -> None:
    subprocess.run(["bash", str(REPO_ROOT / "triton" / "fetch.sh")], check=True)


def ensure_default_weights() -> None:
    if all((MODEL_REPOSITORY / name / "1" / "model.pt").exists() for name in DEFAULT_MODELS):
        return
    subprocess.run(
        [sys.executable, "-m", "training.default_models", "--repository", str(MODEL_REPOSITORY)],
        cwd=REPO_ROOT,
        check=True,
    )


def start_fleet(
    instances: int,
    base_http: int,
    base_grpc: int | None = None,
    base_metrics: int | None = None,
    repository: Path = MODEL_REPOSITORY,
    timeout: float = 120.0,
    **kwargs: Any,
) -> fleet.Fleet:
    """Start a fleet and wait until every instance is ready; the caller must stop() it.

    gRPC and metrics ports default to base_http + 100 and + 200, so one number picks a free
    block of ports per test module."""
    f = fleet.Fleet(
        repository,
        instances=instances,
        base_http=base_http,
        base_grpc=base_http + 100 if base_grpc is None else base_grpc,
        base_metrics=base_http + 200 if base_metrics is None else base_metrics,
        **kwargs,
    )
    f.start()
    try:
        f.wait_ready(timeout)
    except BaseException:
        f.stop()
        raise
    return f


@contextmanager
def running_fleet(instances: int, base_http: int, **kwargs: Any) -> Iterator[fleet.Fleet]:
    f = start_fleet(instances, base_http, **kwargs)
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="session")
def triton_setup() -> None:
    """The Triton binary and the default weights exist."""
    ensure_triton_fetched()
    ensure_default_weights()


@contextmanager
def _fleet_factory(log_root: Path) -> Iterator[Callable[..., fleet.Fleet]]:
    started: list[fleet.Fleet] = []

    def factory(instances: int, base_http: int, **kwargs: Any) -> fleet.Fleet:
        kwargs.setdefault("log_dir", log_root / f"triton-{base_http}-{len(started)}")
        started.append(start_fleet(instances, base_http, **kwargs))
        return started[-1]

    try:
        yield factory
    finally:
        for f in started:
            f.stop()


@pytest.fixture
def fleet_factory(triton_setup: None, tmp_path: Path) -> Iterator[Callable[..., fleet.Fleet]]:
    """`fleet_factory(instances, base_http, **kwargs)` starts a ready fleet (see start_fleet);
    every fleet it started is stopped when the test ends."""
    with _fleet_factory(tmp_path) as factory:
        yield factory


@pytest.fixture(scope="module")
def fleet_module_factory(
    triton_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., fleet.Fleet]]:
    """Like fleet_factory, for fleets shared by the tests of one module."""
    with _fleet_factory(tmp_path_factory.mktemp("fleets")) as factory:
        yield factory


@pytest.fixture(scope="module")
def direct_triton(triton_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fleet.Fleet]:
    """One real Triton instance serving model_repository, on ports away from the default
    fleet's (8100+), so it can run beside a developer's fleet."""
    with running_fleet(1, 8150, log_dir=tmp_path_factory.mktemp("triton-direct")) as f:
        yield f


# --- the gateway, as a real server process ---------------------------------------------------


def gateway_config(
    urls: Sequence[str | Mapping[str, Any]],
    port: int,
    *,
    weights: Sequence[float] | None = None,
    **sections: dict[str, Any],
) -> str:
    """A TOML config for a gateway on ``port`` in front of ``urls``; ``sections`` override keys,
    e.g. ``batching={"max_queue_delay_ms": 5}``.

    An entry of ``urls`` is a url (its weight taken from ``weights``, 1 when not given) or a
    raw instance table written as given, e.g. ``{"dns": "localhost", "port": 8000, "weight": 2}``."""
    if weights is not None and len(weights) != len(urls):
        raise ValueError(f"{len(weights)} weights for {len(urls)} instances")
    tables: dict[str, dict[str, Any]] = {"server": {"host": "127.0.0.1", "port": port}, "upstream": {}, "batching": {}}
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)

    def value(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else str(v)

    def instance(i: int, entry: str | Mapping[str, Any]) -> str:
        table = {"url": entry, "weight": 1 if weights is None else weights[i]} if isinstance(entry, str) else entry
        return "{ " + ", ".join(f"{k} = {value(v)}" for k, v in table.items()) + " }"

    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in values.items()]
        if name == "upstream":
            items = ", ".join(instance(i, u) for i, u in enumerate(urls))
            lines.append(f"instances = [{items}]")
    return "\n".join(lines) + "\n"


@dataclass
class GatewayProcess:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def hostport(self) -> str:
        return self.url.removeprefix("http://")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers_folder(self) -> Path:
        """The one folder ``serve`` made for its workers (``server.workers`` > 1)."""
        [folder] = Path(default_directory()).glob(f"{WORKERS_PREFIX}{self.process.pid}-*")
        return folder

    def worker_pids(self) -> list[int]:
        """The worker processes (uvicorn's spawned children); one that exits while they are
        listed is left out."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        workers = []
        for pid in map(int, path.read_text().split() if path.exists() else []):
            try:
                if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text():
                    workers.append(pid)
            except OSError:  # exited meanwhile
                pass
        return workers


@dataclass
class Stack:
    """A test module's Triton fleet and the gateway in front of it."""

    triton: fleet.Fleet
    gateway: GatewayProcess


@contextmanager
def running_gateway(config_text: str, port: int, workdir: Path, timeout: float = 30.0) -> Iterator[GatewayProcess]:
    config = workdir / f"gateway-{port}.toml"
    config.write_text(config_text)
    log_path = workdir / f"gateway-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--log-level", "warning"],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gw = GatewayProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gw.log()}")
            try:
                with urllib.request.urlopen(gw.url + "/v2/health/live", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not live after {timeout}s:\n{gw.log()}")
            time.sleep(0.1)
        yield gw
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
