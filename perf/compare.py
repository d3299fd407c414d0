#!/usr/bin/env python3
"""Comparison benchmark: Triton direct vs the gateway vs a no-op Starlette endpoint.

One run starts one Triton instance, the gateway in front of it (a temporary one-instance
config), and the no-op endpoint (perf/noop_app.py) on the same ASGI server set-up as the
gateway, then runs perf_analyzer (HTTP, binary tensors) against each, at each concurrency:

    .venv/bin/python perf/compare.py [--model digits_cnn] [--concurrency 1,32]
        [--window-requests 5000] [--server uvicorn|granian|both] [--out perf/results/x.md]

It prints a table, the ratios the project's targets are about, and PASS/FAIL for each:

* concurrency 1:  gateway p50 - direct p50  <= 1 ms      (latency the gateway adds)
* concurrency 32: gateway / no-op throughput >= 0.60     (how close to the Python ceiling)
* concurrency 32: gateway / direct throughput            (reported, no target)

Diagnostics: ``--upstream instant`` puts perf/instant_triton.py (instant zero answers) behind
the gateway instead of Triton, measuring the gateway's own capacity; ``--pin`` gives the gateway
and the no-op a CPU of their own. Neither is the targets' set-up, and the report says so.

Everything it starts runs in its own process group and is stopped (SIGTERM, then SIGKILL) on
exit, error, Ctrl-C or SIGTERM. See perf/README.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import datetime as dt
import io
import json
import os
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "triton"))
import fleet  # noqa: E402  (triton/ is deliberately not a package)

PERF_ANALYZER = REPO / "triton" / "perf_analyzer" / "perf_analyzer.sh"
PYTHON = REPO / ".venv" / "bin" / "python"
HOST = "127.0.0.1"

# Targets (see the module docstring).
LATENCY_OVERHEAD_MS = 1.0
LATENCY_TARGET_CONCURRENCY = 1
CEILING_RATIO = 0.60
THROUGHPUT_TARGET_CONCURRENCY = 32


# -- processes -------------------------------------------------------------------------------


class Proc:
    """A child process in its own process group, logging to a file; stop() ends the group."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
            preexec_fn=fleet._die_with(os.getpid()),
        )

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.popen.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.popen.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # anything left in the group (granian workers), now that the leader is gone
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()

    def tail(self, lines: int = 30) -> str:
        return fleet._tail(self.log_path, lines)


def port_free(port: int) -> bool:
    return fleet._port_free(port, HOST)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http_ok(proc: Proc | None, urls: list[str], timeout: float = 60.0) -> None:
    """Wait until every URL answers 200; raise with the process's log tail if it dies or stalls."""
    deadline = time.monotonic() + timeout
    pending = list(urls)
    name = proc.name if proc else "server"
    while pending:
        if proc is not None and not proc.running():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; log {proc.log_path}:\n{proc.tail()}")
        try:
            if http_get(pending[0], timeout=1.0)[0] == 200:
                pending.pop(0)
                continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            where = f"; log {proc.log_path}:\n{proc.tail()}" if proc else ""
            raise RuntimeError(f"{name}: {pending[0]} not 200 after {timeout:.0f}s{where}")
        time.sleep(0.1)


# -- what the no-op replays ------------------------------------------------------------------


def capture_spec(triton_url: str, model: str) -> dict[str, Any]:
    """Bodies the no-op serves, taken from the real Triton: metadata, config, and the
    response to the request perf_analyzer sends (batch 1, binary inputs, all outputs binary)."""
    _, server = http_get(f"{triton_url}/v2")
    _, metadata = http_get(f"{triton_url}/v2/models/{model}")
    _, config = http_get(f"{triton_url}/v2/models/{model}/config")
    meta = json.loads(metadata)
    inputs, blobs = [], []
    for inp in meta["inputs"]:
        shape = [1 if d < 0 else int(d) for d in inp["shape"]]
        count = 1
        for d in shape:
            count *= d
        size = count * {"FP32": 4, "FP16": 2, "INT64": 8, "INT32": 4, "FP64": 8}.get(inp["datatype"], 1)
        inputs.append({"name": inp["name"], "datatype": inp["datatype"], "shape": shape, "parameters": {"binary_data_size": size}})
        blobs.append(b"\0" * size)
    outputs = [{"name": o["name"], "parameters": {"binary_data": True}} for o in meta["outputs"]]
    header = json.dumps({"id": "", "inputs": inputs, "outputs": outputs}, separators=(",", ":")).encode()
    req = urllib.request.Request(
        f"{triton_url}/v2/models/{model}/infer",
        data=header + b"".join(blobs),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
        header_length = int(resp.headers["Inference-Header-Content-Length"])
    return {
        "server": json.loads(server),
        "models": {
            model: {
                "metadata": meta,
                "config": json.loads(config),
                "infer": {"body_b64": base64.b64encode(body).decode(), "header_length": header_length},
            }
        },
    }


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v) if isinstance(v, str) else repr(v)


def local_batching() -> dict[str, Any]:
    """configs/local.toml's [batching] scalars (per-model tables left out): the defaults the
    gateway is measured with."""
    table = tomllib.loads((REPO / "configs" / "local.toml").read_text()).get("batching", {})
    return {k: v for k, v in table.items() if not isinstance(v, dict)}


def gateway_toml(triton_url: str, port: int, batching: dict[str, Any] | None = None) -> str:
    """The gateway's config: that one instance, and the [batching] settings of configs/local.toml
    (read from it, so the benchmark measures the defaults in force)."""
    table = local_batching() if batching is None else batching
    lines = "\n".join(f"{k} = {toml_value(v)}" for k, v in table.items())
    return f"""\
[server]
host = "{HOST}"
port = {port}

[upstream]
instances = [ {{ url = "{triton_url}", weight = 1 }} ]

[batching]  # as in configs/local.toml
{lines}
"""


# -- perf_analyzer ---------------------------------------------------------------------------


@dataclass
class Measurement:
    target: str  # "direct", "gateway", "no-op"
    server: str  # ASGI server ("-" for Triton direct)
    concurrency: int
    throughput: float | None = None  # infer/s
    p50_us: float | None = None
    p99_us: float | None = None
    avg_us: float | None = None
    error: str | None = None
    unstable: bool = False
    command: list[str] = field(default_factory=list)
    # Over the whole perf_analyzer run (warm-up and every window): the requests the target's
    # server counted, and the CPU seconds each process group used ("perf_analyzer" among them).
    requests: int | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)

    def cpu_us_per_request(self, name: str) -> float | None:
        if not self.requests or name not in self.cpu_s:
            return None
        return self.cpu_s[name] / self.requests * 1e6

    @property
    def label(self) -> str:
        return self.target if self.server == "-" else f"{self.target} ({self.server})"


_FLOAT = r"([0-9]+(?:\.[0-9]+)?)"


def parse_stdout(text: str, m: Measurement) -> None:
    """Fill what the last 'Request concurrency' block of perf_analyzer's stdout reports."""
    block = text.rsplit("Request concurrency:", 1)[-1] if "Request concurrency:" in text else ""
    for attr, pattern in (
        ("throughput", rf"Throughput:\s*{_FLOAT}\s*infer/sec"),
        ("avg_us", rf"Avg latency:\s*{_FLOAT}\s*usec"),
        ("p50_us", rf"p50 latency:\s*{_FLOAT}\s*usec"),
        ("p99_us", rf"p99 latency:\s*{_FLOAT}\s*usec"),
    ):
        found = re.search(pattern, block)
        if found and getattr(m, attr) is None:
            setattr(m, attr, float(found.group(1)))


def parse_csv(path: Path, m: Measurement) -> bool:
    try:
        text = path.read_text()
    except OSError:
        return False
    rows = list(csv.DictReader(io.StringIO(text)))
    rows = [r for r in rows if r.get("Concurrency", "").strip() == str(m.concurrency)] or rows
    if not rows:
        return False
    row = rows[-1]
    m.throughput = float(row["Inferences/Second"])
    m.p50_us = float(row["p50 latency"])
    m.p99_us = float(row["p99 latency"])
    return True


# -- CPU accounting --------------------------------------------------------------------------

_CLK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> list[str] | None:
    try:
        return path.read_text().rsplit(")", 1)[1].split()  # from the state on: field 3 of the file
    except (OSError, IndexError):
        return None


def _group(pgid: int | None) -> Iterator[tuple[Path, list[str]]]:
    """Each live process of one process group: its /proc directory and its stat fields."""
    if pgid is None:
        return
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields and int(fields[2]) == pgid:  # pgrp
            yield stat.parent, fields


def group_cpu_s(pgid: int | None) -> float:
    """CPU seconds (user + system) used so far by the live processes of one process group."""
    return sum(int(fields[11]) + int(fields[12]) for _, fields in _group(pgid)) / _CLK  # utime, stime


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy (not idle, not waiting for I/O) since boot."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLK  # user nice system idle iowait irq softirq steal


def process_cpu_s(pid: int) -> float:
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / _CLK if fields else 0.0



def cpu_split() -> tuple[str, str]:
    """(the CPU for the process measured, the CPUs for everything else), as taskset lists."""
    cpus = sorted(os.sched_getaffinity(0))
    return str(cpus[-1]), ",".join(map(str, cpus[:-1]))


def pin_group(pgid: int | None, cpus: str) -> None:
    """Move every live process of a process group (Triton and its stubs) onto ``cpus``."""
    allowed = {int(c) for c in cpus.split(",")}
    for process, _ in _group(pgid):
        with contextlib.suppress(OSError):
            for task in (process / "task").iterdir():  # every thread, not only the main one
                os.sched_setaffinity(int(task.name), allowed)


def served_requests(url: str, model: str) -> int | None:
    """The inference count ``url``'s ``/v2/models/{model}/stats`` reports (summed over
    versions), or None when it cannot be read."""
    try:
        status, body = http_get(f"{url}/v2/models/{model}/stats", timeout=5.0)
        if status != 200:
            return None
        return sum(int(s.get("inference_count", 0)) for s in json.loads(body).get("model_stats", []))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


# perf_analyzer's windows hold a fixed number of requests ("count_windows"), not a fixed time.
# With time windows, each window's bookkeeping costs perf_analyzer time quadratic in the
# requests it holds (it erases the window's records from a vector one at a time), and the
# requests that arrive meanwhile lengthen the next one: at ~10000 requests/s on a small
# machine a 4 s window never finishes. A fixed count keeps that cost bounded for every target.
SLOWEST_EXPECTED_RATE = 200.0  # requests/s; only for the timeout below


def window_args(args: argparse.Namespace) -> list[str]:
    return ["--measurement-mode", "count_windows", "--measurement-request-count", str(args.window_requests)]


def window_description(args: argparse.Namespace) -> str:
    return f"count_windows {args.window_requests} requests"


def measurement_timeout(args: argparse.Namespace) -> float:
    """Seconds after which a perf_analyzer run counts as stuck: every trial window plus
    warm-up at the slowest rate any target here reaches, plus start-up."""
    return args.window_requests / SLOWEST_EXPECTED_RATE * (args.max_trials + 2) + 60


class Runner:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.current: subprocess.Popen[bytes] | None = None
        self.count = 0

    def measure(
        self,
        target: str,
        server: str,
        port: int,
        concurrency: int,
        groups: dict[str, int] | None = None,
        stats_url: str | None = None,
    ) -> Measurement:
        """One measurement (tried once more if perf_analyzer found it unstable). With ``groups``
        (name: process group id) and ``stats_url`` (whose model statistics count the requests
        served), also the CPU each group and perf_analyzer used over the whole run, and the
        requests served meanwhile."""
        groups = groups or {}
        cpu_before = {name: group_cpu_s(pgid) for name, pgid in groups.items()}
        served_before = served_requests(stats_url, self.args.model) if stats_url else None
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)  # only perf_analyzer is reaped here
        m = self._measure_once(target, server, port, concurrency)
        if m.error and "stable measurement" in m.error:
            print("    not stable: one more try")
            m = self._measure_once(target, server, port, concurrency)
        if stats_url and served_before is not None:
            served_after = served_requests(stats_url, self.args.model)
            if served_after is not None:
                m.requests = served_after - served_before
                children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                m.cpu_s = {name: group_cpu_s(pgid) - cpu_before[name] for name, pgid in groups.items()}
                m.cpu_s["perf_analyzer"] = (children_after.ru_utime + children_after.ru_stime) - (
                    children_before.ru_utime + children_before.ru_stime
                )
        return m

    def _measure_once(self, target: str, server: str, port: int, concurrency: int) -> Measurement:
        self.count += 1
        csv_path = self.workdir / f"pa-{self.count}.csv"
        cmd = [
            str(PERF_ANALYZER),
            "-m", self.args.model,
            "-u", f"{HOST}:{port}",
            "-i", "http",
            "--concurrency-range", str(concurrency),
            *window_args(self.args),
            "--stability-percentage", str(self.args.stability_percentage),
            "--max-trials", str(self.args.max_trials),
            "-f", str(csv_path),
        ]  # fmt: skip
        m = Measurement(target, server, concurrency, command=cmd)
        label = m.label
        print(f"  perf_analyzer -> {label:<20} c={concurrency:<3} ...", end="", flush=True)
        timeout = measurement_timeout(self.args)
        self.current = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=fleet._die_with(os.getpid()),
        )
        try:
            out, _ = self.current.communicate(timeout=timeout)
            rc = self.current.returncode
        except subprocess.TimeoutExpired:
            self.stop_current()
            out, rc = b"", None
        except BaseException:  # Ctrl-C, SIGTERM: end perf_analyzer before anything else
            self.stop_current()
            raise
        finally:
            self.current = None
        text = out.decode(errors="replace")
        (self.workdir / f"pa-{self.count}.log").write_text(shlex.join(cmd) + "\n\n" + text)
        got_csv = rc == 0 and parse_csv(csv_path, m)
        parse_stdout(text, m)  # avg latency (not in the CSV), or everything when the CSV is missing
        if rc is None:
            m.error = f"perf_analyzer timed out after {timeout:.0f}s"
        elif rc != 0 or not got_csv:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            unstable = any("stable" in ln.lower() for ln in lines[-5:])
            if unstable and m.throughput is not None:
                m.unstable = True  # the numbers are the last window's
            else:
                m.error = f"perf_analyzer exit {rc}: " + " | ".join(lines[-4:])[:500]
        if m.error:
            print(f" ERROR\n    {m.error}")
        else:
            flag = " (unstable)" if m.unstable else ""
            print(f" {m.throughput:9.1f} infer/s  p50 {m.p50_us / 1000:7.2f} ms  p99 {m.p99_us / 1000:7.2f} ms{flag}")
        return m

    def stop_current(self) -> None:
        stop_process(self.current)


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a process started in a session of its own (perf_analyzer): SIGTERM to its group,
    SIGKILL after 5 s."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue


# -- report ----------------------------------------------------------------------------------


def load_average() -> str | None:
    """The 1/5/15-minute load averages, or None where /proc/loadavg cannot be read."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def stop_all(runner: Any, procs: list[Any]) -> None:
    """Stop the running perf_analyzer (``runner.stop_current()``: a ``Runner``, or
    cache_bench's runner of several), then every process in ``procs`` (None entries skipped),
    in order, with Ctrl-C and SIGTERM ignored meanwhile: a second one must not skip the clean-up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    runner.stop_current()
    for proc in procs:
        if proc is not None:
            proc.stop()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = load_average() or "unknown"
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        commit = (commit or "unknown") + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    versions = []
    for pkg in ("starlette", "uvicorn", "granian", "uvloop", "httptools", "numpy", "torch"):
        try:
            from importlib.metadata import version

            versions.append(f"{pkg} {version(pkg)}")
        except Exception:
            pass
    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "cpu": cpu,
        "load average (1/5/15 min) at start": load,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": ", ".join(versions),
        "git": commit,
    }
    try:  # the models run on the GPU when there is one (model.py)
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gpus = ""
    if gpus:
        info["gpu"] = "; ".join(line.split(" (UUID")[0] for line in gpus.splitlines())
    return info


def fmt_ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f}"


def fmt_tp(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def results_table(results: list[Measurement]) -> list[str]:
    rows = [("target", "concurrency", "infer/s", "p50 ms", "p99 ms", "avg ms", "note")]
    for m in sorted(results, key=lambda r: r.concurrency):  # stable: direct, then run order
        note = ("ERROR: " + m.error[:60]) if m.error else ("unstable" if m.unstable else "")
        rows.append((m.label, str(m.concurrency), fmt_tp(m.throughput), fmt_ms(m.p50_us), fmt_ms(m.p99_us), fmt_ms(m.avg_us), note))
    return markdown_table(rows)


CPU_COLUMNS = (("server", "gateway / no-op"), ("triton", "Triton"), ("perf_analyzer", "perf_analyzer"))


def fmt_us(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def cpu_table(results: list[Measurement]) -> list[str]:
    """CPU µs per request served, per process group, over each whole perf_analyzer run."""
    rows = [("target", "concurrency", "requests", *(f"CPU µs/request: {title}" for _, title in CPU_COLUMNS))]
    for m in sorted(results, key=lambda r: r.concurrency):
        rows.append(
            (m.label, str(m.concurrency), "-" if m.requests is None else str(m.requests),
             *(fmt_us(m.cpu_us_per_request(name)) for name, _ in CPU_COLUMNS))
        )  # fmt: skip
    return markdown_table(rows)


def markdown_table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def pick(results: list[Measurement], target: str, server: str, concurrency: int) -> Measurement | None:
    for m in results:
        if m.target == target and m.concurrency == concurrency and (target == "direct" or m.server == server):
            if m.error is None and m.throughput is not None:
                return m
    return None


def targets(results: list[Measurement], servers: list[str], concurrencies: list[int]) -> tuple[list[str], bool]:
    """Lines with the target ratios and PASS/FAIL; also whether every target passed."""
    lines: list[str] = []
    all_pass = True
    c_lat = LATENCY_TARGET_CONCURRENCY if LATENCY_TARGET_CONCURRENCY in concurrencies else min(concurrencies)
    c_tp = THROUGHPUT_TARGET_CONCURRENCY if THROUGHPUT_TARGET_CONCURRENCY in concurrencies else max(concurrencies)
    lat_note = "" if c_lat == LATENCY_TARGET_CONCURRENCY else f" [target is defined at c={LATENCY_TARGET_CONCURRENCY}]"
    tp_note = "" if c_tp == THROUGHPUT_TARGET_CONCURRENCY else f" [target is defined at c={THROUGHPUT_TARGET_CONCURRENCY}]"

    def verdict(ok: bool | None) -> str:
        nonlocal all_pass
        if ok is None:
            all_pass = False
            return "N/A (missing measurement)"
        all_pass = all_pass and ok
        return "PASS" if ok else "FAIL"

    for server in servers:
        d_lat = pick(results, "direct", server, c_lat)
        g_lat = pick(results, "gateway", server, c_lat)
        if d_lat and g_lat:
            diff = (g_lat.p50_us - d_lat.p50_us) / 1000
            lines.append(
                f"[{server}] c={c_lat}: gateway p50 - direct p50 = {g_lat.p50_us / 1000:.2f} - {d_lat.p50_us / 1000:.2f}"
                f" = {diff:+.2f} ms (target <= {LATENCY_OVERHEAD_MS:.1f} ms): {verdict(diff <= LATENCY_OVERHEAD_MS)}{lat_note}"
            )
        else:
            lines.append(f"[{server}] c={c_lat}: gateway p50 - direct p50: {verdict(None)}")
        g_tp = pick(results, "gateway", server, c_tp)
        n_tp = pick(results, "no-op", server, c_tp)
        d_tp = pick(results, "direct", server, c_tp)
        if g_tp and n_tp:
            ratio = g_tp.throughput / n_tp.throughput
            lines.append(
                f"[{server}] c={c_tp}: gateway / no-op throughput = {g_tp.throughput:.1f} / {n_tp.throughput:.1f}"
                f" = {ratio:.2f} (target >= {CEILING_RATIO:.2f}): {verdict(ratio >= CEILING_RATIO)}{tp_note}"
            )
        else:
            lines.append(f"[{server}] c={c_tp}: gateway / no-op throughput: {verdict(None)}")
        g_cpu = g_tp.cpu_us_per_request("server") if g_tp else None
        n_cpu = n_tp.cpu_us_per_request("server") if n_tp else None
        if g_cpu and n_cpu:
            lines.append(
                f"[{server}] c={c_tp}: no-op / gateway CPU per request = {n_cpu:.0f} / {g_cpu:.0f} µs = {n_cpu / g_cpu:.2f}"
                " (reported, no target: the throughput ratio where each had a core of its own)"
            )
        if g_tp and d_tp:
            lines.append(
                f"[{server}] c={c_tp}: gateway / direct throughput = {g_tp.throughput:.1f} / {d_tp.throughput:.1f}"
                f" = {g_tp.throughput / d_tp.throughput:.2f} (reported, no target)"
            )
    if len(servers) > 1:
        best = []
        for server in servers:
            g = pick(results, "gateway", server, c_tp)
            if g:
                best.append((g.throughput, server))
        if best:
            tp, server = max(best)
            others = ", ".join(f"{s} {t:.1f}" for t, s in sorted(best, reverse=True) if s != server)
            lines.append(f"faster ASGI server for the gateway at c={c_tp}: {server} ({tp:.1f} infer/s; {others})")
    return lines, all_pass


def render(
    args: argparse.Namespace, command: str, info: dict[str, str], results: list[Measurement], servers: list[str]
) -> tuple[str, str, bool]:
    table = results_table(results)
    cpu = cpu_table(results)
    target_lines, all_pass = targets(results, servers, args.concurrency)
    if args.upstream == "instant" or args.pin:
        how = " and ".join(
            what for flag, what in ((args.upstream == "instant", "the instant stand-in for Triton"),
                                    (args.pin, "the gateway and the no-op on a CPU of their own")) if flag
        )  # fmt: skip
        target_lines.insert(0, f"measured with {how}: a diagnostic of the gateway's own cost, not the targets' set-up")
    settings = (
        f"model {args.model}, concurrency {','.join(map(str, args.concurrency))}, perf_analyzer -i http, "
        f"{window_description(args)}, stability {args.stability_percentage}%, max trials {args.max_trials}, "
        f"batch size 1; one Triton instance; gateway batching (configs/local.toml) "
        + ", ".join(f"{k} {toml_value(v)}" for k, v in local_batching().items())
    )
    text = "\n".join(
        ["", "== Results ==", f"command: {command}", *(f"{k}: {v}" for k, v in info.items()), f"settings: {settings}", ""]
        + table
        + ["", "== CPU over each run =="]
        + cpu
        + ["", "== Targets =="]
        + target_lines
        + ["", "ALL TARGETS PASS" if all_pass else "NOT ALL TARGETS PASS"]
    )
    md = "\n".join(
        [
            f"# Gateway comparison benchmark ({info['date']})",
            "",
            "```",
            command,
            "```",
            "",
            *(f"- {k}: {v}" for k, v in info.items()),
            f"- settings: {settings}",
            "",
            "## Measurements",
            "",
            *table,
            "",
            "Latencies are perf_analyzer's client-side figures; `unstable` means perf_analyzer did not reach",
            "its stability criterion and the numbers are its last window's.",
            "",
            "## CPU over each run",
            "",
            *cpu,
            "",
            "Over each whole perf_analyzer run (warm-up and every window): requests counted by the target's",
            "server (Triton's statistics for direct and the gateway, the no-op's own count), and each process",
            "group's user + system CPU per request: the gateway or no-op process, Triton with its Python-backend",
            "stub, and perf_analyzer (its rusage). All of them share the machine's cores.",
            "",
            "## Targets",
            "",
            *(f"- {ln}" for ln in target_lines),
            "",
            f"**{'All targets pass' if all_pass else 'Not all targets pass'}.**",
            "",
        ]
    )
    return text, md, all_pass


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Triton direct vs gateway vs no-op Starlette, with perf_analyzer.")
    p.add_argument("--model", default="digits_cnn")
    p.add_argument("--concurrency", default="1,32", help="comma-separated concurrency levels (default 1,32)")
    add_window_argument(p)
    p.add_argument(
        "--upstream", choices=["triton", "instant"], default="triton",
        help="what the gateway forwards to: the real Triton (default), or perf/instant_triton.py, an instant "
        "stand-in that measures the gateway's own capacity (no direct rows, no latency target then)",
    )  # fmt: skip
    p.add_argument(
        "--pin", action="store_true",
        help="run the gateway and the no-op on the last CPU and Triton (or its stand-in) on the others",
    )  # fmt: skip
    p.add_argument("--server", choices=["uvicorn", "granian", "both"], default="uvicorn", help="ASGI server(s) for gateway and no-op")
    p.add_argument("--out", help="also write the report as markdown to this file")
    p.add_argument("--stability-percentage", type=int, default=25)
    p.add_argument("--max-trials", type=int, default=6)
    p.add_argument("--repository", default=str(REPO / "model_repository"))
    p.add_argument(
        "--base-port", type=int, default=8400,
        help="Triton HTTP/gRPC/metrics on base, base+100, base+200; gateway base+10; no-op base+20; "
        "instant stand-in base+30",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        p.error("--pin needs at least two CPUs")
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        p.error("--concurrency must be comma-separated integers")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs positive integers")
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def add_window_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--window-requests", type=positive_int, default=5000,
        help="requests in each perf_analyzer measurement window (--measurement-request-count)",
    )  # fmt: skip


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    servers = ["uvicorn", "granian"] if args.server == "both" else [args.server]
    exe = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "perf/compare.py"
    python = os.path.relpath(PYTHON, Path.cwd()) if PYTHON.exists() else sys.executable
    command = shlex.join([python, exe, *(sys.argv[1:] if argv is None else argv)])
    info = machine_info()
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so `finally` runs on SIGTERM too
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored

    base = args.base_port
    triton_ports = (base, base + 100, base + 200)
    gw_port, noop_port, instant_port = base + 10, base + 20, base + 30
    busy = [p for p in (*triton_ports, gw_port, noop_port, instant_port) if not port_free(p)]
    if busy:
        print(f"ports already in use: {busy} (pick another --base-port)", file=sys.stderr)
        return 2
    if not PERF_ANALYZER.exists():
        print(f"{PERF_ANALYZER} is missing: run triton/fetch_perf_analyzer.sh", file=sys.stderr)
        return 2

    others = other_perf_analyzers()
    if others:
        info["other perf_analyzer processes at start"] = str(len(others))
        print(f"warning: {len(others)} other perf_analyzer process(es) running (pids {others}): numbers will be low")
    workdir = Path(tempfile.mkdtemp(prefix="perf-compare-"))
    print(f"command: {command}\nlogs: {workdir}")
    results: list[Measurement] = []
    runner = Runner(args, workdir)
    measured_cpu, other_cpus = cpu_split() if args.pin else ("", "")
    pinned = ["taskset", "-c", measured_cpu] if args.pin else []  # the gateway or the no-op
    upstream_pin = ["taskset", "-c", other_cpus] if args.pin else []  # Triton or its stand-in
    if args.pin:
        # perf_analyzer stays unpinned: confined to fewer cores, its main thread starves behind its
        # 32 senders and its window bookkeeping never catches up (see "Why count windows").
        info["pinning"] = f"gateway and no-op on CPU {measured_cpu}; Triton (or its stand-in) on CPUs {other_cpus}"
    procs: list[Proc] = []
    triton = fleet.Fleet(
        args.repository, instances=1, base_http=triton_ports[0], base_grpc=triton_ports[1],
        base_metrics=triton_ports[2], log_dir=workdir,
    )  # fmt: skip
    interrupted = False
    try:
        print(f"starting Triton on {HOST}:{triton_ports[0]} ...", flush=True)
        triton.start()
        triton.wait_ready(timeout=120)
        triton_url = triton.http_urls[0]
        triton_pgid = triton.instances[0].pid  # its own process group: the server and its stubs
        wait_http_ok(None, [f"{triton_url}/v2/models/{args.model}/ready"], timeout=60)
        if args.pin:
            pin_group(triton_pgid, other_cpus)
        spec_path = workdir / "noop-spec.json"
        spec_path.write_text(json.dumps(capture_spec(triton_url, args.model)))
        upstream_url, upstream_pgid = triton_url, triton_pgid
        if args.upstream == "instant":  # the gateway forwards to the stand-in; Triton only gave the spec
            instant = Proc(
                "instant stand-in",
                [*upstream_pin, str(PYTHON), str(HERE / "instant_triton.py"), "--spec", str(spec_path), "--port", str(instant_port)],
                workdir / "instant.log",
            )  # fmt: skip
            procs.append(instant)
            upstream_url, upstream_pgid = f"http://{HOST}:{instant_port}", instant.popen.pid
            wait_http_ok(instant, [f"{upstream_url}/v2/health/ready"])
            info["upstream"] = "perf/instant_triton.py (instant zero answers): the gateway's own capacity"
        config_path = workdir / "gateway.toml"
        config_path.write_text(gateway_toml(upstream_url, gw_port))

        for c in args.concurrency if args.upstream == "triton" else ():
            results.append(runner.measure("direct", "-", triton_ports[0], c, {"triton": triton_pgid}, triton_url))
        for server in servers:
            print(f"starting gateway and no-op on {server} ...", flush=True)
            gateway = Proc(
                f"gateway ({server})",
                [*pinned, str(PYTHON), "-m", "gateway", "serve", "--config", str(config_path), "--port", str(gw_port),
                 "--server", server, "--log-level", "warning"],
                workdir / f"gateway-{server}.log",
            )  # fmt: skip
            procs.append(gateway)
            noop = Proc(
                f"no-op ({server})",
                [*pinned, str(PYTHON), str(HERE / "noop_app.py"), "--spec", str(spec_path), "--port", str(noop_port), "--server", server],
                workdir / f"noop-{server}.log",
            )
            procs.append(noop)
            gw_url, noop_url = f"http://{HOST}:{gw_port}", f"http://{HOST}:{noop_port}"
            wait_http_ok(gateway, [f"{gw_url}/v2/health/ready", f"{gw_url}/v2/models/{args.model}"])
            wait_http_ok(noop, [f"{noop_url}/v2/health/ready", f"{noop_url}/v2/models/{args.model}"])
            for c in args.concurrency:
                m = runner.measure(
                    "gateway", server, gw_port, c, {"server": gateway.popen.pid, "triton": upstream_pgid}, upstream_url
                )
                results.append(m)
                if m.error or not gateway.running():
                    print(f"    gateway log tail ({gateway.log_path}):\n" + indent(gateway.tail(20)))
                    if not gateway.running():
                        how = exit_description(gateway.popen.returncode)
                        print(f"    the gateway is no longer running ({how}); skipping the rest on {server}")
                        m.error = (m.error or "") + f" [gateway {how}]"
                        break
                results.append(runner.measure("no-op", server, noop_port, c, {"server": noop.popen.pid}, noop_url))
            gateway_errors = [ln for ln in gateway.tail(200).splitlines() if "Traceback" in ln or " ERROR " in ln]
            if gateway_errors:
                print(f"    gateway logged {len(gateway_errors)} error line(s); see {gateway.log_path}")
            for proc in (gateway, noop):
                proc.stop()
                procs.remove(proc)
            # the ports must be free again before the next server starts
            deadline = time.monotonic() + 10
            while not (port_free(gw_port) and port_free(noop_port)) and time.monotonic() < deadline:
                time.sleep(0.2)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping everything", file=sys.stderr)
    except Exception as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        interrupted = True
    finally:
        stop_all(runner, [*procs, triton])

    if not results:
        return 1
    if (load := load_average()) is not None:
        info["load average (1/5/15 min) at end"] = load
    text, md, all_pass = render(args, command, info, results, servers)
    if interrupted:
        text += "\n(interrupted: partial results)"
        md += "\n**Interrupted: partial results.**\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md)
        print(f"\nwrote {out}")
    print(f"logs: {workdir}")
    if interrupted:
        return 130
    return 0 if all_pass else 1


def exit_description(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def other_perf_analyzers() -> list[int]:
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "perf_analyzer":
                pids.append(int(comm.parent.name))
        except (OSError, ValueError):
            pass
    return sorted(pids)


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + ln for ln in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
