#!/usr/bin/env python3
"""Run a local fleet of real NVIDIA Triton Inference Servers (the binary fetched by fetch.sh).

Command line (foreground; Ctrl-C or SIGTERM stops every server):

    python triton/fleet.py --instances 2 --repository model_repository

From Python (tests): this folder is not a package (a package named `triton` would shadow the
Triton compiler that torch imports), so put it on sys.path and `import fleet`:

    with fleet.Fleet(Path("model_repository"), instances=2) as f:
        ...  # f.http_urls == ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]

Instance i listens on HTTP base_http+i, gRPC base_grpc+i and metrics base_metrics+i. Each
server runs in its own process group, which holds its Python-backend stub processes too, so
stopping an instance signals the whole group. Servers also die with their parent: they get
PR_SET_PDEATHSIG, and an atexit hook stops any fleet still running.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import glob
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
SERVER_DIR = HERE / "server"
TRITONSERVER = SERVER_DIR / "pytriton" / "tritonserver" / "bin" / "tritonserver"
SERVER_LIBS = SERVER_DIR / "nvidia_pytriton.libs"
BACKENDS = SERVER_DIR / "backends"
CACHES = SERVER_DIR / "pytriton" / "tritonserver" / "caches"

ModelControlMode = Literal["poll", "explicit", "none"]
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 40
_generation = itertools.count()


class FleetError(RuntimeError):
    """An instance failed to start or to become ready; the message ends with its log tail."""


def default_python() -> Path:
    """The project's virtualenv interpreter if there is one, else the running interpreter."""
    venv_python = REPO_ROOT / ".venv" / "bin" / "python"
    return venv_python if venv_python.exists() else Path(sys.executable)


def python_backend_env(python_env: Path | str) -> dict[str, str]:
    """Environment variables that make the Python backend stub run model.py in this Python.

    The stub embeds libpython X.Y (fetch.sh picked the stub matching this interpreter) in
    isolated mode, so PYTHONPATH and PYTHONHOME are ignored. What it does honour: it finds its
    "executable" by looking up `python3` on PATH and, like any interpreter, treats a pyvenv.cfg
    next to it as an active virtualenv (site-packages and .pth files included). So put the
    environment's bin/ first on PATH, and its own shared libpython first for the loader.
    `python_env` is an interpreter (not resolved through symlinks) or a virtualenv folder.
    """
    python = Path(python_env).absolute()
    if python.is_dir():
        python = python / "bin" / "python"
    if not (python.parent / "python3").exists():
        raise FleetError(f"{python.parent} has no python3 for the Python backend stub to find")
    probe = (
        "import json, sysconfig; print(json.dumps(["
        "sysconfig.get_config_var('LIBDIR') or '', sysconfig.get_config_var('INSTSONAME') or '']))"
    )
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout
    libdir, soname = json.loads(out)
    env = {"PATH": str(python.parent)}
    if soname and (Path(libdir) / soname).exists():
        # Otherwise the loader falls back to the system's libpython of the same X.Y.
        env["LD_LIBRARY_PATH"] = libdir
    return env


def _join_paths(*parts: str | None) -> str:
    return os.pathsep.join(p for p in parts if p)


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: no dlopen between fork and exec


def _die_with(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: the kernel sends SIGKILL to the server when the thread that started it exits,
    so a crashed or killed test run leaves no server behind (start fleets from a long-lived
    thread, normally the main one). The server's stubs notice its death and exit by themselves
    within seconds."""

    def preexec() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _port_free(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option Triton uses, so sockets lingering in TIME_WAIT do not count as busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Instance:
    index: int
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    shm_prefix: str = ""
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Fleet:
    """A set of tritonserver processes on consecutive ports, all serving one model repository."""

    def __init__(
        self,
        repository: Path | str,
        instances: int = 2,
        base_http: int = 8100,
        base_grpc: int = 8200,
        base_metrics: int = 8300,
        model_control_mode: ModelControlMode = "poll",
        extra_args: Sequence[str] = (),
        log_dir: Path | str | None = None,
        python_env: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        cache_size: int | None = None,
        poll_secs: int = 1,
        stop_timeout: float = 10.0,
        auto_complete_config: bool = True,
    ) -> None:
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self.repository = Path(repository).resolve()
        self.model_control_mode = model_control_mode
        self.extra_args = tuple(extra_args)
        self.host = host
        self.cache_size = cache_size
        self.poll_secs = poll_secs
        # Off, Triton takes each config.pbtxt as written: a Python-backend model then loads with
        # one stub process instead of two (auto-complete starts one just to ask model.py).
        self.auto_complete_config = auto_complete_config
        self.stop_timeout = stop_timeout
        self.python_env = Path(python_env) if python_env else default_python()
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="triton-fleet-"))
        self.instances = [
            Instance(i, base_http + i, base_grpc + i, base_metrics + i, self.log_dir / f"triton-{i}.log")
            for i in range(instances)
        ]
        self._env: dict[str, str] | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def http_urls(self) -> list[str]:
        return [f"http://{self.host}:{inst.http_port}" for inst in self.instances]

    @property
    def grpc_urls(self) -> list[str]:
        return [f"{self.host}:{inst.grpc_port}" for inst in self.instances]

    @property
    def metrics_urls(self) -> list[str]:
        return [f"http://{self.host}:{inst.metrics_port}/metrics" for inst in self.instances]

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Fleet:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch every instance that is not running (does not wait for readiness)."""
        if not TRITONSERVER.exists():
            raise FleetError(f"{TRITONSERVER} is missing: run triton/fetch.sh first")
        if not self.repository.is_dir():
            raise FleetError(f"model repository {self.repository} does not exist")
        _live_fleets.add(self)
        for inst in self.instances:
            if not inst.running():
                self._launch(inst)

    def stop(self) -> None:
        """Stop every instance: SIGTERM to its process group, SIGKILL after stop_timeout."""
        for inst in self.instances:
            self._signal_group(inst, signal.SIGCONT)  # a SIGSTOPped server would never see SIGTERM
            self._signal_group(inst, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for inst in self.instances:
            self._reap(inst, max(0.0, deadline - time.monotonic()))
        _live_fleets.discard(self)

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the server process of one instance only (a crash or hang, as in
        production: SIGKILL, SIGSTOP, SIGCONT...). Its stubs are cleaned up by restart/stop."""
        inst = self.instances[index]
        if inst.process is not None:
            try:
                inst.process.send_signal(sig)
            except ProcessLookupError:
                pass
            if sig == signal.SIGKILL:
                inst.process.wait()

    def restart(self, index: int, timeout: float = 60.0) -> None:
        """Stop one instance (whatever state it is in), start it again, wait until ready."""
        inst = self.instances[index]
        self._signal_group(inst, signal.SIGCONT)
        self._signal_group(inst, signal.SIGTERM)
        self._reap(inst, self.stop_timeout)
        self._launch(inst)
        self.wait_ready(timeout, indices=[index])

    def wait_ready(self, timeout: float = 60.0, indices: Iterable[int] | None = None) -> None:
        """Poll /v2/health/ready until every chosen instance answers 200.

        Raises FleetError with the server log tail if an instance exits or times out."""
        pending = [self.instances[i] for i in (range(len(self.instances)) if indices is None else indices)]
        deadline = time.monotonic() + timeout
        while pending:
            for inst in list(pending):
                if not inst.running():
                    code = inst.process.returncode if inst.process else None
                    raise FleetError(self._describe(inst, f"exited with status {code} before becoming ready"))
                if self._ready(inst):
                    pending.remove(inst)
            if pending and time.monotonic() > deadline:
                raise FleetError(self._describe(pending[0], f"not ready after {timeout:.0f}s"))
            if pending:
                time.sleep(0.1)

    def is_ready(self, index: int) -> bool:
        return self._ready(self.instances[index])

    # -- internals ---------------------------------------------------------------------------

    def _command(self, inst: Instance) -> list[str]:
        cmd = [
            str(TRITONSERVER),
            f"--model-repository={self.repository}",
            f"--backend-directory={BACKENDS}",
            f"--cache-directory={CACHES}",
            f"--model-control-mode={self.model_control_mode}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={inst.http_port}",
            f"--grpc-port={inst.grpc_port}",
            f"--metrics-port={inst.metrics_port}",
            "--log-verbose=0",
            # A per-launch prefix for the Python backend's /dev/shm files, so the files a
            # killed server leaves behind can be recognised and removed (see _reap).
            f"--backend-config=python,shm-region-prefix-name={inst.shm_prefix}",
            # Bounded graceful shutdown, well within our own SIGKILL timeout.
            f"--exit-timeout-secs={max(1, int(self.stop_timeout / 2))}",
        ]
        if self.model_control_mode == "poll":
            cmd.append(f"--repository-poll-secs={self.poll_secs}")
        if not self.auto_complete_config:
            cmd.append("--disable-auto-complete-config")
        if self.cache_size:
            cmd.append(f"--cache-config=local,size={self.cache_size}")
        cmd.extend(self.extra_args)
        return cmd

    def _environment(self) -> dict[str, str]:
        if self._env is None:
            py = python_backend_env(self.python_env)
            env = dict(os.environ)
            env["PATH"] = _join_paths(py["PATH"], os.environ.get("PATH"))
            env["LD_LIBRARY_PATH"] = _join_paths(
                str(SERVER_LIBS), py.get("LD_LIBRARY_PATH"), os.environ.get("LD_LIBRARY_PATH")
            )
            self._env = env
        return self._env

    def _launch(self, inst: Instance) -> None:
        busy = [p for p in (inst.http_port, inst.grpc_port, inst.metrics_port) if not _port_free(p, self.host)]
        if busy:
            raise FleetError(f"instance {inst.index}: port(s) {busy} on {self.host} already in use")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        inst.shm_prefix = f"fleet{os.getpid()}_{inst.index}_{next(_generation)}_"
        inst._log = open(inst.log_path, "ab")  # appended across restarts
        try:
            inst.process = subprocess.Popen(
                self._command(inst),
                stdin=subprocess.DEVNULL,
                stdout=inst._log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                # Not the repository root: the stub puts its working directory on sys.path,
                # and there the `triton/` folder would pose as a `triton` package in model.py.
                cwd=self.log_dir,
                start_new_session=True,  # own process group: the server and its stubs
                preexec_fn=_die_with(os.getpid()),
            )
        except BaseException:
            inst._log.close()
            inst._log = None
            raise

    def _ready(self, inst: Instance) -> bool:
        url = f"http://{self.host}:{inst.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _signal_group(self, inst: Instance, sig: int) -> None:
        if inst.process is None:
            return
        try:
            os.killpg(inst.process.pid, sig)  # the server is its group's leader
        except (ProcessLookupError, PermissionError):  # group already gone
            pass

    def _reap(self, inst: Instance, timeout: float) -> None:
        """Wait for the server to exit (SIGKILL its group after `timeout`), kill any leftover
        stubs, and remove the shared-memory files a killed server could not clean up."""
        if inst.process is None:
            return
        try:
            inst.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(inst, signal.SIGKILL)
            inst.process.wait()
        self._signal_group(inst, signal.SIGKILL)  # stubs outliving a killed server
        if inst._log is not None:
            inst._log.close()
            inst._log = None
        for leftover in glob.glob(f"/dev/shm/{glob.escape(inst.shm_prefix)}*"):
            try:
                os.unlink(leftover)
            except OSError:
                pass

    def _describe(self, inst: Instance, problem: str) -> str:
        return (
            f"Triton instance {inst.index} (http {inst.http_port}, grpc {inst.grpc_port}, "
            f"metrics {inst.metrics_port}) {problem}; log {inst.log_path}:\n{_tail(inst.log_path)}"
        )


_live_fleets: weakref.WeakSet[Fleet] = weakref.WeakSet()


@atexit.register
def _stop_live_fleets() -> None:
    for fleet in list(_live_fleets):
        fleet.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local fleet of Triton Inference Servers.")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository")
    parser.add_argument("--base-http", type=int, default=8100)
    parser.add_argument("--base-grpc", type=int, default=8200)
    parser.add_argument("--base-metrics", type=int, default=8300)
    parser.add_argument("--model-control-mode", choices=["poll", "explicit", "none"], default="poll")
    parser.add_argument("--cache-size", type=int, default=None, help="bytes of Triton response cache")
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--python-env", type=Path, default=None, help="interpreter or virtualenv for model.py")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    parser.add_argument("extra_args", nargs="*", help="passed to tritonserver (after --)")
    args = parser.parse_args(argv)

    # SIGTERM takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    fleet = Fleet(
        args.repository,
        args.instances,
        args.base_http,
        args.base_grpc,
        args.base_metrics,
        args.model_control_mode,
        args.extra_args,
        args.log_dir,
        args.python_env,
        cache_size=args.cache_size,
    )
    try:
        fleet.start()
        fleet.wait_ready(args.timeout)
        print(f"ready: {' '.join(fleet.http_urls)} (logs in {fleet.log_dir})", flush=True)
        reported: set[int] = set()
        while True:
            for inst in fleet.instances:
                if not inst.running() and inst.index not in reported:
                    reported.add(inst.index)
                    print(f"instance {inst.index} exited; log tail:\n{_tail(inst.log_path)}", file=sys.stderr)
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except FleetError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        fleet.stop()


if __name__ == "__main__":
    sys.exit(main())
