#!/usr/bin/env python3
"""Scale-out benchmark: two Triton instances behind the gateway vs one instance directly.

The model is triton/emulated/fixed_latency: each execution sleeps a fixed time (delay_ms, 10 by
default) whatever its batch size, up to 8 rows, then answers y = 2x. It emulates an
accelerator-bound model on a CPU-only machine: the wait is the device's and the CPU stays free,
so two instances on one small machine can serve twice what one does, as two GPUs would. One
run copies the model into a temporary repository, starts two Triton instances and the gateway
in front of both, checks that every target answers y == 2x, then runs perf_analyzer (HTTP,
binary tensors, batch size 1) at the same concurrency against instance 0 directly and against
the gateway:

    .venv/bin/python perf/scaleout.py [--concurrency 32] [--delay-ms 10] [--window-requests 5000]
        [--max-inflight-batches 1] [--max-queue-delay-ms DELAY_MS]
        [--out perf/results/$(date +%F)-scaleout.md]

It prints a table, each instance's Triton statistics over each measurement (executions and the
batch sizes they ran), and the target with PASS/FAIL:

* gateway (2 instances) / direct (1 instance) throughput >= 1.8

The gateway batches with max_inflight_batches 1 (its default) and max_queue_delay_ms equal to
the model's delay_ms (one execution), so that while both instances are busy it waits for full
batches rather than sending partial ones early; perf/README.md has the measurements behind
that choice. Both options can be changed to measure other settings.

Ports: Triton HTTP 8440/8441, gRPC 8540/8541, metrics 8640/8641; gateway 8450 (--base-port
moves them all). Everything it starts runs in its own process group and is stopped (SIGTERM,
then SIGKILL) on exit, error, Ctrl-C or SIGTERM. See perf/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "triton"))
sys.path.insert(0, str(HERE))
import fleet  # noqa: E402  (triton/ is deliberately not a package)
from compare import (  # noqa: E402
    add_window_argument,
    exit_description,
    HOST,
    http_get,
    indent,
    load_average,
    machine_info,
    Measurement,
    other_perf_analyzers,
    PERF_ANALYZER,
    pick,
    port_free,
    Proc,
    PYTHON,
    _raise_interrupt,
    results_table,
    Runner,
    stop_all,
    window_description,
    wait_http_ok,
)

MODEL = "fixed_latency"
EMULATED = REPO / "triton" / "emulated" / MODEL
INSTANCES = 2
TARGET_RATIO = 1.8
DIRECT = "direct (instance 0)"
GATEWAY = "gateway (2 instances)"


# -- the model repository --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    delay_ms: float
    max_batch_size: int

    @property
    def ceiling_per_instance(self) -> float:
        """Infer/s of one instance running full batches back to back, with no overhead at all."""
        return self.max_batch_size * 1000.0 / self.delay_ms


_DELAY = re.compile(r'(key:\s*"delay_ms"\s*value:\s*\{\s*string_value:\s*")([^"]*)(")')
_MAX_BATCH = re.compile(r"^max_batch_size:\s*(\d+)", re.MULTILINE)


def make_repository(root: Path, delay_ms: float | None) -> tuple[Path, ModelSpec]:
    """Copy the emulated model into root/models, with delay_ms rewritten if one is given."""
    repository = root / "models"
    shutil.copytree(EMULATED, repository / MODEL)
    config_path = repository / MODEL / "config.pbtxt"
    text = config_path.read_text()
    if delay_ms is not None:
        text, count = _DELAY.subn(lambda m: f"{m.group(1)}{delay_ms:g}{m.group(3)}", text)
        if count != 1:
            raise RuntimeError(f"{config_path}: no delay_ms parameter to rewrite")
        config_path.write_text(text)
    delay, batch = _DELAY.search(text), _MAX_BATCH.search(text)
    if delay is None or batch is None:
        raise RuntimeError(f"{config_path}: delay_ms or max_batch_size not found")
    return repository, ModelSpec(float(delay.group(2)), int(batch.group(1)))


def gateway_toml(triton_urls: list[str], port: int, max_inflight_batches: int, max_queue_delay_ms: float) -> str:
    instances = ", ".join(f'{{ url = "{url}", weight = 1 }}' for url in triton_urls)
    return f"""\
[server]
host = "{HOST}"
port = {port}

[upstream]
instances = [ {instances} ]

[batching]
enabled = true
max_batch_size = 64  # capped by the model's own max_batch_size
max_queue_delay_ms = {max_queue_delay_ms:g}
max_inflight_batches = {max_inflight_batches}
max_queue_rows = 8192
"""


# -- right answers ---------------------------------------------------------------------------


def infer_once(url: str, x: list[float]) -> list[float]:
    """One v2 JSON request with one row; the returned y as a flat list."""
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, len(x)], "datatype": "FP32", "data": x}]}).encode()
    req = urllib.request.Request(
        f"{url}/v2/models/{MODEL}/infer", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
    outputs = {o["name"]: o for o in answer["outputs"]}
    return [float(v) for v in outputs["y"]["data"]]


def check_answers(url: str, concurrent: int = 16) -> None:
    """One request, then `concurrent` at once (the gateway batches them), each with its own x:
    every caller must get y == 2x for its own row. Raises RuntimeError otherwise."""
    # Binary fractions: exact in FP32, so 2x compares exactly.
    rows = [[i + 0.25, -(i + 0.5), i * 3.0, i / 8] for i in range(concurrent)]
    answers = [infer_once(url, rows[0])]
    with ThreadPoolExecutor(concurrent) as pool:
        answers += list(pool.map(lambda row: infer_once(url, row), rows))
    for x, y in zip([rows[0], *rows], answers):
        expected = [2 * v for v in x]
        if y != expected:
            raise RuntimeError(f"{url}: wrong answer for x={x}: y={y}, expected {expected}")


# -- Triton's statistics ---------------------------------------------------------------------


@dataclass
class ModelStats:
    inferences: int = 0  # rows
    executions: int = 0  # model executions (batches Triton ran)
    requests: int = 0  # requests that succeeded
    queue_ns: int = 0  # summed over requests
    compute_infer_ns: int = 0  # summed over requests
    batch_sizes: dict[int, int] = field(default_factory=dict)  # rows per execution -> executions

    def minus(self, before: ModelStats) -> ModelStats:
        return ModelStats(
            self.inferences - before.inferences,
            self.executions - before.executions,
            self.requests - before.requests,
            self.queue_ns - before.queue_ns,
            self.compute_infer_ns - before.compute_infer_ns,
            {
                size: count - before.batch_sizes.get(size, 0)
                for size, count in self.batch_sizes.items()
                if count - before.batch_sizes.get(size, 0)
            },
        )

    def describe(self) -> str:
        if not self.executions:
            return "no executions"
        sizes = ", ".join(f"{size}: {count}" for size, count in sorted(self.batch_sizes.items(), reverse=True))
        ms_per_request = 1e6 * max(1, self.requests)
        return (
            f"{self.inferences} rows in {self.requests} requests, {self.executions} executions, "
            f"mean batch {self.inferences / self.executions:.2f} rows; per request: queue "
            f"{self.queue_ns / ms_per_request:.2f} ms, compute {self.compute_infer_ns / ms_per_request:.2f} ms; "
            f"executions by batch size {{{sizes}}}"
        )


def model_stats(triton_url: str) -> ModelStats:
    """The model's statistics on one instance, summed over its versions."""
    status, body = http_get(f"{triton_url}/v2/models/{MODEL}/stats", timeout=5.0)
    if status != 200:
        raise RuntimeError(f"{triton_url}: statistics answered {status}: {body[:200]!r}")
    total = ModelStats()
    for version in json.loads(body).get("model_stats", []):
        total.inferences += int(version.get("inference_count", 0))
        total.executions += int(version.get("execution_count", 0))
        stats = version.get("inference_stats", {})
        total.requests += int(stats.get("success", {}).get("count", 0))
        total.queue_ns += int(stats.get("queue", {}).get("ns", 0))
        total.compute_infer_ns += int(stats.get("compute_infer", {}).get("ns", 0))
        for entry in version.get("batch_stats", []):
            size = int(entry["batch_size"])
            total.batch_sizes[size] = total.batch_sizes.get(size, 0) + int(entry["compute_infer"]["count"])
    return total


def fleet_stats(urls: list[str]) -> list[ModelStats]:
    return [model_stats(url) for url in urls]


# -- report ----------------------------------------------------------------------------------


def verdict_lines(results: list[Measurement], concurrency: int, spec: ModelSpec) -> tuple[list[str], bool]:
    """The target with PASS/FAIL, and the figures' distance from the model's own ceiling."""
    direct = pick(results, DIRECT, "-", concurrency)
    gateway = pick(results, GATEWAY, "-", concurrency)
    ceiling = spec.ceiling_per_instance
    lines = [
        f"ceiling (max_batch_size {spec.max_batch_size} rows per {spec.delay_ms:g} ms execution, no overhead): "
        f"{ceiling:.0f} infer/s per instance, {ceiling * INSTANCES:.0f} for {INSTANCES}"
    ]
    for m, instances in ((direct, 1), (gateway, INSTANCES)):
        if m is not None:
            lines.append(f"{m.label}: {m.throughput:.1f} infer/s = {m.throughput / (ceiling * instances):.0%} of its ceiling")
    if direct is None or gateway is None:
        lines.append(f"c={concurrency}: gateway / direct throughput: N/A (missing measurement): FAIL")
        return lines, False
    ratio = gateway.throughput / direct.throughput
    ok = ratio >= TARGET_RATIO
    lines.append(
        f"c={concurrency}: gateway (2 instances) / direct (1 instance) throughput = {gateway.throughput:.1f} / "
        f"{direct.throughput:.1f} = {ratio:.2f} (target >= {TARGET_RATIO:.1f}): {'PASS' if ok else 'FAIL'}"
    )
    return lines, ok


def render(
    args: argparse.Namespace,
    command: str,
    info: dict[str, str],
    spec: ModelSpec,
    results: list[Measurement],
    stats: dict[str, list[ModelStats]],
) -> tuple[str, str, bool]:
    table = results_table(results)
    target_lines, ok = verdict_lines(results, args.concurrency, spec)
    settings = (
        f"model {MODEL} (delay_ms {spec.delay_ms:g}, max_batch_size {spec.max_batch_size}), concurrency "
        f"{args.concurrency}, perf_analyzer -i http, {window_description(args)}, stability "
        f"{args.stability_percentage}%, max trials {args.max_trials}, batch size 1"
    )
    gateway_settings = (
        f"1 worker (uvicorn), batching max_inflight_batches {args.max_inflight_batches} per healthy "
        f"instance, max_queue_delay_ms {args.max_queue_delay_ms:g}, max_batch_size 64 (capped at the model's "
        f"{spec.max_batch_size})"
    )
    stat_lines = [
        f"{target}, instance {i}: {s.describe()}" for target, per_instance in stats.items() for i, s in enumerate(per_instance)
    ]
    text = "\n".join(
        ["", "== Results ==", f"command: {command}", *(f"{k}: {v}" for k, v in info.items())]
        + [f"settings: {settings}", f"gateway: {gateway_settings}", ""]
        + table
        + ["", "== Triton statistics over each measurement =="]
        + stat_lines
        + ["", "== Target =="]
        + target_lines
        + ["", "TARGET PASSES" if ok else "TARGET FAILS"]
    )
    md = "\n".join(
        [
            f"# Scale-out benchmark ({info['date']})",
            "",
            "Two Triton instances behind the gateway against one instance directly, same load. The model",
            f"(`triton/emulated/{MODEL}`) sleeps a fixed time per execution: an emulated accelerator-bound model.",
            "",
            "```",
            command,
            "```",
            "",
            *(f"- {k}: {v}" for k, v in info.items()),
            f"- settings: {settings}",
            f"- gateway: {gateway_settings}",
            "",
            "## Measurements",
            "",
            *table,
            "",
            "Latencies are perf_analyzer's client-side figures; `unstable` means perf_analyzer did not reach",
            "its stability criterion and the numbers are its last window's.",
            "",
            "## Triton statistics over each measurement",
            "",
            "Differences of `/v2/models/fixed_latency/stats` on each instance across the perf_analyzer run",
            "(warm-up and every trial window included).",
            "",
            *(f"- {ln}" for ln in stat_lines),
            "",
            "## Target",
            "",
            *(f"- {ln}" for ln in target_lines),
            "",
            f"**{'The target passes' if ok else 'The target fails'}.**",
            "",
        ]
    )
    return text, md, ok


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Two Triton instances behind the gateway vs one directly, with perf_analyzer.")
    p.add_argument("--concurrency", type=int, default=32, help="perf_analyzer concurrency for both targets (default 32)")
    p.add_argument("--delay-ms", type=float, default=None, help="the model's time per execution (default: its config's, 10)")
    add_window_argument(p)
    p.add_argument("--stability-percentage", type=int, default=25)
    p.add_argument("--max-trials", type=int, default=6)
    p.add_argument(
        "--max-inflight-batches", type=int, default=1,
        help="gateway batching.max_inflight_batches per healthy instance (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--max-queue-delay-ms", type=float, default=None,
        help="gateway batching.max_queue_delay_ms (default: the model's delay_ms, one execution)",
    )  # fmt: skip
    p.add_argument("--out", help="also write the report as markdown to this file")
    p.add_argument(
        "--base-port", type=int, default=8440,
        help="Triton i on HTTP base+i, gRPC base+100+i, metrics base+200+i; gateway base+10",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    if args.delay_ms is not None and args.delay_ms <= 0:
        p.error("--delay-ms must be > 0")
    if args.max_inflight_batches < 1:
        p.error("--max-inflight-batches must be >= 1")
    if args.max_queue_delay_ms is not None and args.max_queue_delay_ms < 0:
        p.error("--max-queue-delay-ms must be >= 0")
    args.model = MODEL  # what compare.Runner measures
    return args


def start_gateway(workdir: Path, triton_urls: list[str], port: int, args: argparse.Namespace) -> Proc:
    config_path = workdir / "gateway.toml"
    config_path.write_text(gateway_toml(triton_urls, port, args.max_inflight_batches, args.max_queue_delay_ms))
    return Proc(
        "gateway",
        [str(PYTHON), "-m", "gateway", "serve", "--config", str(config_path), "--log-level", "warning"],
        workdir / "gateway.log",
    )


def measure(runner: Runner, target: str, port: int, urls: list[str], concurrency: int) -> tuple[Measurement, list[ModelStats]]:
    """One perf_analyzer run, with the Triton statistics of `urls` over it."""
    before = fleet_stats(urls)
    m = runner.measure(target, "-", port, concurrency)
    return m, [after.minus(b) for after, b in zip(fleet_stats(urls), before)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exe = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "perf/scaleout.py"
    python = os.path.relpath(PYTHON, Path.cwd()) if PYTHON.exists() else sys.executable
    command = shlex.join([python, exe, *(sys.argv[1:] if argv is None else argv)])
    info = machine_info()
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so `finally` runs on SIGTERM too
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored

    base = args.base_port
    gw_port = base + 10
    ports = [p for i in range(INSTANCES) for p in (base + i, base + 100 + i, base + 200 + i)] + [gw_port]
    busy = [p for p in ports if not port_free(p)]
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

    workdir = Path(tempfile.mkdtemp(prefix="perf-scaleout-"))
    print(f"command: {command}\nlogs: {workdir}")
    repository, spec = make_repository(workdir, args.delay_ms)
    if args.max_queue_delay_ms is None:
        args.max_queue_delay_ms = spec.delay_ms
    results: list[Measurement] = []
    stats: dict[str, list[ModelStats]] = {}
    runner = Runner(args, workdir)
    gateway: Proc | None = None
    triton = fleet.Fleet(
        repository, instances=INSTANCES, base_http=base, base_grpc=base + 100, base_metrics=base + 200,
        model_control_mode="none", log_dir=workdir,
    )  # fmt: skip
    interrupted = False
    error: str | None = None
    try:
        print(f"starting {INSTANCES} Triton instances on {HOST}:{base}-{base + INSTANCES - 1} ...", flush=True)
        triton.start()
        triton.wait_ready(timeout=120)
        urls = triton.http_urls
        print(f"starting the gateway on {HOST}:{gw_port} ...", flush=True)
        gateway = start_gateway(workdir, urls, gw_port, args)
        gw_url = f"http://{HOST}:{gw_port}"
        wait_http_ok(gateway, [f"{gw_url}/v2/health/ready", f"{gw_url}/v2/models/{MODEL}"])
        for url in (urls[0], gw_url):
            check_answers(url)
        print("answers checked: y == 2x through instance 0 and through the gateway")

        m, stats[DIRECT] = measure(runner, DIRECT, base, urls[:1], args.concurrency)
        results.append(m)
        m, stats[GATEWAY] = measure(runner, GATEWAY, gw_port, urls, args.concurrency)
        results.append(m)
        if m.error or not gateway.running():
            print(f"    gateway log tail ({gateway.log_path}):\n" + indent(gateway.tail(20)))
            if not gateway.running():
                m.error = (m.error or "") + f" [gateway {exit_description(gateway.popen.returncode)}]"
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping everything", file=sys.stderr)
    except Exception as exc:
        error = str(exc)
        print(f"\nerror: {error}", file=sys.stderr)
    finally:
        stop_all(runner, [gateway, triton])

    if not results:
        return 130 if interrupted else 1  # nothing measured: the error is printed above
    if (load := load_average()) is not None:
        info["load average (1/5/15 min) at end"] = load
    text, md, ok = render(args, command, info, spec, results, stats)
    if interrupted or error:
        why = "interrupted" if interrupted else f"error: {error}"
        text += f"\n({why}: partial results)"
        md += f"\n**Partial results ({why}).**\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md)
        print(f"\nwrote {out}")
    print(f"logs: {workdir}")
    if interrupted:
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
