"""Training throughput of 1 vs 2 workers: `python -m training bench-workers`.

Each configuration trains the model from the same seed for a few epochs, several times; the
figure is training samples per second over the training loop (rows of the global batch times
steps, divided by the time in the loop, evaluation excluded), median of the repeats. The wall
time of a whole run (process start-up and rendezvous included) is shown beside it. On CUDA
(when torch sees a GPU) it adds a one-worker GPU run, and a two-worker one when there are two
GPUs (NCCL gives each worker its own). The results go to a Markdown file with the command.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from training.distributed import TrainConfig, checked, train
from training.progress import table
from training.specs import UsageError

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    label: str
    config: TrainConfig


def cases(model: str, epochs: int, average_every: int, threads_max: int, batch_size: int | None = None) -> list[Case]:
    base = TrainConfig(model, epochs=epochs, batch_size=batch_size, keep_best=False, progress=False, device="cpu")
    out = [Case("1 worker, 1 thread", base)]
    if threads_max >= 2:
        out.append(Case("1 worker, 2 threads", TrainConfig(**{**base.__dict__, "threads": 2})))
    out.append(Case("2 workers (ddp), 1 thread each", TrainConfig(**{**base.__dict__, "workers": 2})))
    out.append(
        Case(
            f"2 workers (average every {average_every}), 1 thread each",
            TrainConfig(**{**base.__dict__, "workers": 2, "mode": "average", "average_every": average_every}),
        )
    )
    if torch.cuda.is_available():
        gpu = TrainConfig(**{**base.__dict__, "device": "cuda"})
        out.append(Case("1 worker, CUDA", gpu))
        if torch.cuda.device_count() >= 2:
            out.append(Case("2 workers (ddp, NCCL), CUDA", TrainConfig(**{**gpu.__dict__, "workers": 2})))
    return out


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(
    model: str, epochs: int, repeats: int, average_every: int, out: Path | None, command: str, batch_size: int | None = None
) -> str:
    all_cases = cases(model, epochs, average_every, os.cpu_count() or 1, batch_size)
    for case in all_cases:  # a configuration that would be refused (a batch 2 workers cannot split) stops all before any runs
        try:
            checked(case.config)
        except UsageError as exc:
            raise UsageError(f"{case.label}: {exc}") from None
    rates: dict[str, list[float]] = {c.label: [] for c in all_cases}
    walls: dict[str, list[float]] = {c.label: [] for c in all_cases}
    accs: dict[str, list[float]] = {c.label: [] for c in all_cases}
    load_before = _loadavg()
    # Round-robin over the configurations, so load from elsewhere on a shared machine falls
    # on all of them alike rather than on whichever ran during a busy minute.
    for r in range(repeats):
        for case in all_cases:
            started = time.perf_counter()
            result = train(case.config)
            assert result is not None
            walls[case.label].append(time.perf_counter() - started)
            rates[case.label].append(result.metrics["samples_per_s"])
            accs[case.label].append(result.metrics["test_accuracy"])
            print(f"{case.label}: run {r + 1}/{repeats}: {rates[case.label][-1]:,.0f} samples/s, "
                  f"{walls[case.label][-1]:.1f} s wall", file=sys.stderr)  # fmt: skip
    load_after = _loadavg()
    rows, raw = [], []
    baseline = statistics.median(rates[all_cases[0].label])
    for case in all_cases:
        rate = statistics.median(rates[case.label])
        rows.append([case.label, f"{rate:,.0f}", f"{rate / baseline:.2f}x", f"{statistics.median(walls[case.label]):.1f}",
                     f"{statistics.median(accs[case.label]):.4f}"])  # fmt: skip
        raw.append(f"- {case.label}: " + ", ".join(f"{v:,.0f}" for v in rates[case.label]))
    headers = ["configuration", "samples/s (median)", "vs 1 worker", "wall s (median)", "test acc"]
    cfg = all_cases[0].config.resolved()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    report = "\n".join(
        [
            f"# Training throughput: 1 vs 2 workers ({model})",
            "",
            f"Recorded {dt.date.today().isoformat()} with:",
            "",
            "```sh",
            command,
            "```",
            "",
            f"Machine: {os.cpu_count()} logical CPUs ({cpu_model()}), GPU: {device}; "
            f"torch {torch.__version__}, Python {platform.python_version()}.",
            f"Each run: {epochs} epochs of {model} from seed 0, global batch {cfg.batch_size} "
            f"(split evenly across workers), gloo on CPU; {repeats} runs per configuration.",
            "samples/s counts the training loop only (evaluation excluded); wall s is the whole run,",
            "process start-up and rendezvous included. Configurations ran round-robin, one run of each in turn.",
            f"Load average (1 min) before: {load_before}, after: {load_after} (the machine is shared).",
            "",
            table(headers, rows),
            "",
            "Every run, samples/s:",
            "",
            *raw,
            "",
        ]
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return report
