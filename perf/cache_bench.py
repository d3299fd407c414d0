#!/usr/bin/env python3
"""Cache benchmark: the gateway's response cache against Triton's own, on a repetitive workload.

One Triton instance (or a fleet: ``--instances``) serves a copy of a real model (digits_cnn by
default) with Triton's response cache enabled (``response_cache { enable: true }`` in the copy's
config.pbtxt, and ``--cache-config=local,size=...`` on the server); the gateway runs in front of
the same instances with its own cache on (``[cache] enabled = true``; batching as in configs/local.toml). Both
targets get the same sequence of requests from perf_analyzer (HTTP, binary tensors, batch size 1,
``--input-data``) at the same concurrency:

    .venv/bin/python perf/cache_bench.py [--model digits_cnn] [--concurrency 16,32]
        [--requests 100000] [--repeat-share 0.9] [--zipf-s 1.1] [--hold-ms 0] [--instances 1]
        [--gateway-workers auto] [--gateway-batching max_inflight_batches=4] [--rounds 3]
        [--out perf/results/$(date +%F)-cache.md]

Each concurrency is measured ``--rounds`` times (3 by default), direct then the gateway each
time, and the target is judged on the median of the rounds' gateway / direct ratios: on a shared
machine one run's throughput moves with the rest of the machine's load by more than the
difference being measured, and the two runs of a pair share most of it.

``--instances N`` runs a fleet of N instances, each with its own response cache, the case the
gateway's cache is for: each run then has N perf_analyzer processes sharing the concurrency,
and client i sends requests i, i+N, i+2N, ... of the sequence, as a round-robin balancer in
front of the fleet deals them. Direct, client i talks to instance i, so a repeat reaches an
instance that has not seen its input whenever the first request went to another; through the
gateway, the same clients send the same requests to the gateway, with the whole fleet behind it.

``--hold-ms X`` gives both targets the same batching delay: the gateway's ``[batching] hold_ms``
(and ``max_queue_delay_ms`` raised to X where it is lower, since it caps the hold; held
whatever the host's load, ``hold_cpu_busy`` 0) and, for the
direct runs, Triton's ``max_queue_delay_microseconds`` in the model copy's config. Triton behind
the gateway keeps the model's own delay (0): the gateway's batches have waited already, and
would otherwise wait twice. ``--hold-ms 0``: neither waits. Without it, each target has its
own settings: the model's own delay (0) for Triton, ``configs/local.toml``'s ``[batching]`` for
the gateway (a hold of 4 ms while the host's CPUs are short).

The workload: real inputs (scikit-learn's digits images, or breast cancer rows) in a sequence in
which each request is a first-time input with probability 1 - repeat_share (0.10), otherwise a
repeat of an earlier input drawn with Zipf(s) weights over the inputs seen so far, ranked by
first appearance. The share of first-time inputs is thus the same in every part of the sequence,
from a cold cache on. Beyond the real rows, new inputs are copies scaled by 1 + k/4096.

The measurement: perf_analyzer sends the whole sequence once (``--request-count``, each client
its share), so each target serves exactly the designed workload, from cold to the end;
throughput and latencies come from perf_analyzer's per-request timestamps (with several
clients, throughput over the time all of them were sending). (compare.py's time windows would replay the sequence
until throughput is stable, hundreds of thousands of requests here: after the first pass every
request repeats an earlier one. See perf/README.md.)

Every measurement starts cold: Triton is restarted (empty response caches) before each run, and
the gateway, started after it, is new for each gateway run. Per concurrency: direct, then the
gateway. Each instance restarted first computes batches of zeros, an input the workload does
not hold (``warm_up``): a model's first executions cost more (on a GPU, CUDA loads kernels on
first use), and neither target's first requests should pay it.

It checks answers first (16 inputs sent at once through the gateway, which batches them, equal to
Triton's answers for the same inputs within 1e-5 with the same argmax; the same 16 again say
``X-Cache: hit`` with the same answers; 16 identical requests at once for a new input give one
miss, the others coalesced or hit), then measures, reads the cache counters after each run
(Triton's ``cache_hit``/``cache_miss`` statistics, the gateway's ``/v2/gateway/cache``), the
time requests spent where (Triton's queue and compute statistics; the gateway's /metrics: mean
time to answer a hit, a miss and a coalesced request, and the batched requests' wait in its
batcher) and the CPU time each process used during the traffic, and reports:

* at each concurrency: gateway / direct throughput > 1.0 (the gateway ahead): PASS/FAIL

Ports: Triton HTTP 8460, gRPC 8560, metrics 8660 (instance i: each + i); gateway 8470
(--base-port moves them all).
Everything it starts runs in its own process group and is stopped (SIGTERM, then SIGKILL) on
exit, error, Ctrl-C or SIGTERM. See perf/README.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "triton"))
sys.path.insert(0, str(HERE))
import fleet  # noqa: E402  (triton/ is deliberately not a package)
from compare import (  # noqa: E402
    exit_description,
    fmt_ms,
    fmt_tp,
    group_cpu_s,
    HOST,
    http_get,
    indent,
    load_average,
    local_batching,
    machine_busy_s,
    machine_info,
    Measurement,
    other_perf_analyzers,
    PERF_ANALYZER,
    pick,
    port_free,
    Proc,
    process_cpu_s,
    PYTHON,
    _raise_interrupt,
    parse_csv,
    parse_stdout,
    stop_all,
    stop_process,
    toml_value,
    wait_http_ok,
)

MODELS = ("digits_cnn", "breast_cancer_mlp")
REDIS_SERVER = REPO / ".cache" / "redis" / "bin" / "redis-server"  # scripts/fetch_redis.sh
DIRECT = "direct (Triton cache)"
GATEWAY = "gateway (gateway cache)"
TARGET_RATIO = 1.0  # the gateway ahead: strictly more infer/s than Triton direct
TOLERANCE = 1e-5  # answers through the gateway against Triton's
OTHERS = "other processes"  # CPU the machine spent outside the processes measured
VARIANT_STEP = 1.0 / 4096  # relative scale between the copies of one real input
MAX_INSTANCES = 8  # Triton's ports base..base+7 stay clear of the gateway's base+10


# -- the workload ----------------------------------------------------------------------------


def real_inputs(model: str) -> np.ndarray:
    """The real rows the workload draws from, float32 in the model's layout (batch dim first)."""
    from sklearn.datasets import load_breast_cancer, load_digits

    if model == "digits_cnn":
        return np.ascontiguousarray(load_digits().images.reshape(-1, 1, 8, 8), dtype=np.float32)
    return np.ascontiguousarray(load_breast_cancer().data, dtype=np.float32)


@dataclass
class Workload:
    sequence: np.ndarray  # index into `inputs` of each request, in order
    inputs: np.ndarray  # the distinct inputs, in order of first appearance
    base_rows: int  # real rows the inputs come from
    first_seen: np.ndarray  # cumulative count of distinct inputs after each request

    @property
    def requests(self) -> int:
        return len(self.sequence)

    def repeat_share(self, prefix: int | None = None) -> float:
        """Share of requests that repeat an earlier input, over the whole sequence or the first
        `prefix` requests (what one run sent, if it did not wrap)."""
        n = self.requests if prefix is None else max(1, min(prefix, self.requests))
        return 1.0 - int(self.first_seen[n - 1]) / n

    def dealt(self, client: int, clients: int) -> np.ndarray:
        """The requests one of ``clients`` clients sends: ``client``, ``client + clients``, ... of
        the sequence, as a round-robin balancer deals them to the instances behind it."""
        return self.sequence[client::clients]

    def describe(self, s: float) -> str:
        distinct = len(self.inputs)
        copies = -(-distinct // self.base_rows)
        return (
            f"{self.requests} requests over {distinct} distinct inputs: {self.repeat_share():.1%} repeat an earlier "
            f"input; repeats drawn with Zipf(s={s:g}) weights by order of first appearance; inputs: "
            f"{self.base_rows} real rows, then copies scaled by 1 + k/4096 (k <= {copies - 1})"
        )


def make_workload(model: str, requests: int, repeat_share: float, s: float, seed: int) -> Workload:
    """A sequence of `requests` in which each one is new with probability 1 - repeat_share, else a
    repeat of an earlier input with Zipf(s) weights over the inputs seen so far (rank 1 = the
    first seen). New inputs are the real rows in a seeded random order, then copies of them
    scaled by 1 + k/4096: as near-duplicates in real traffic, new bytes for any cache."""
    rng = np.random.default_rng(seed)
    is_new = rng.random(requests) >= repeat_share
    is_new[0] = True
    first_seen = np.cumsum(is_new)  # distinct inputs after each request
    distinct = int(first_seen[-1])
    cdf = np.cumsum(np.arange(1, distinct + 1, dtype=np.float64) ** -s)
    u = rng.random(requests) * cdf[first_seen - 1]
    rank = np.minimum(np.searchsorted(cdf, u, side="right"), first_seen - 1)
    sequence = np.where(is_new, first_seen - 1, rank)

    base = real_inputs(model)
    order = rng.permutation(len(base))
    j = np.arange(distinct)
    scale = (1.0 + (j // len(base)) * VARIANT_STEP).astype(np.float32)
    inputs = base[order[j % len(base)]] * scale.reshape((-1,) + (1,) * (base.ndim - 1))
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    if len({row.tobytes() for row in inputs}) != distinct:
        raise RuntimeError("the workload's inputs are not all distinct")
    return Workload(sequence, inputs, len(base), first_seen)


def write_input_data(path: Path, workload: Workload, input_name: str, sequence: np.ndarray) -> None:
    """perf_analyzer's --input-data JSON: one entry per request of ``sequence`` (indices into the
    workload's inputs), in order (binary, base64)."""
    encoded = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in workload.inputs]
    with open(path, "w") as out:
        out.write('{"data":[')
        for n, i in enumerate(sequence):
            out.write(("," if n else "") + f'{{"{input_name}":{{"b64":"{encoded[i]}"}}}}')
        out.write("]}\n")


# -- the model repository and the gateway's config -------------------------------------------


def make_repository(root: Path, model: str, hold_ms: float = 0.0, name: str = "models") -> Path:
    """A copy of model_repository/<model> in ``root/name`` with Triton's response cache enabled
    in its config; with ``hold_ms``, its dynamic batcher's max_queue_delay_microseconds set to
    that hold."""
    repository = root / name
    shutil.copytree(REPO / "model_repository" / model, repository / model, ignore=shutil.ignore_patterns("__pycache__"))
    config = repository / model / "config.pbtxt"
    text = config.read_text()
    if "response_cache" in text:
        raise RuntimeError(f"{config}: already has a response_cache setting")
    if hold_ms:
        text, n = re.subn(r"max_queue_delay_microseconds:\s*\d+", f"max_queue_delay_microseconds: {round(hold_ms * 1000)}", text)
        if n != 1:
            raise RuntimeError(f"{config}: expected one max_queue_delay_microseconds setting, found {n}")
    config.write_text(text.rstrip("\n") + "\n\n# Added by perf/cache_bench.py: Triton's per-model response cache.\nresponse_cache {\n  enable: true\n}\n")
    return repository


def gateway_toml(
    triton_urls: list[str], port: int, batching: dict[str, Any], ttl_s: float, workers: int = 1, redis_url: str = ""
) -> str:
    lines = [
        "[server]",
        f'host = "{HOST}"',
        f"port = {port}",
        f"workers = {workers}",
        "",
        "[upstream]",
        "instances = [ " + ", ".join(f'{{ url = "{url}", weight = 1 }}' for url in triton_urls) + " ]",
        "",
        "[batching]  # as in configs/local.toml",
        *(f"{k} = {toml_value(v)}" for k, v in batching.items()),
        "",
        "[cache]",
        "enabled = true",
        f"ttl_s = {ttl_s:g}  # longer than a run: no entry expires while measured (Triton's have no TTL)",
        f'redis_url = "{redis_url}"',
        "",
    ]
    return "\n".join(lines)


# -- talking to the targets ------------------------------------------------------------------


def model_io(url: str, model: str) -> tuple[str, str, list[str]]:
    status, body = http_get(f"{url}/v2/models/{model}", timeout=5.0)
    if status != 200:
        raise RuntimeError(f"{url}: metadata of {model} answered {status}")
    meta = json.loads(body)
    inp = meta["inputs"][0]
    return inp["name"], inp["datatype"], [o["name"] for o in meta["outputs"]]


def infer_binary(url: str, model: str, input_name: str, row: np.ndarray, output: str = "probabilities") -> tuple[np.ndarray, str]:
    """One batch-1 request with a binary input tensor and a binary output, as perf_analyzer
    sends them; the output row and the X-Cache header ("" when there is none)."""
    return infer_batch(url, model, input_name, row[np.newaxis], output)


def infer_batch(url: str, model: str, input_name: str, rows: np.ndarray, output: str = "probabilities") -> tuple[np.ndarray, str]:
    """``infer_binary`` for a batch of ``rows``: their outputs, flattened."""
    blob = rows.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [{"name": input_name, "datatype": "FP32", "shape": list(rows.shape), "parameters": {"binary_data_size": len(blob)}}],
            "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        }
    ).encode()
    req = urllib.request.Request(
        f"{url}/v2/models/{model}/infer",
        data=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
        x_cache = resp.headers.get("X-Cache", "")
        length = int(resp.headers.get("Inference-Header-Content-Length", len(body)))
    doc = json.loads(body[:length])
    offset = length
    for out in doc["outputs"]:
        size = int(out.get("parameters", {}).get("binary_data_size", 0))
        if out["name"] == output:
            if size:
                return np.frombuffer(body[offset : offset + size], dtype="<f4").copy(), x_cache
            return np.asarray(out["data"], dtype=np.float32), x_cache
        offset += size
    raise RuntimeError(f"{url}: no output {output!r} in the answer")


# The batch sizes each Triton instance computes once after a cold start, before a run.
WARM_UP_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def warm_up(url: str, model: str, input_name: str, workload: Workload) -> None:
    """Have a freshly started instance compute batches of zeros (an input the workload does not
    hold, so no cache holds an answer it will be asked for): the one-time costs of a model's
    first executions (on a GPU, CUDA loading kernels on first use) are then paid before the
    run, for direct Triton and the gateway alike, not by its first requests."""
    zeros = np.zeros((max(WARM_UP_BATCHES), *workload.inputs.shape[1:]), np.float32)
    if any(not row.any() for row in workload.inputs):
        raise RuntimeError("the workload holds an input of zeros, the warm-up's")
    for n in WARM_UP_BATCHES:
        infer_batch(url, model, input_name, zeros[:n])


def check_answers(triton_url: str, gw_url: str, model: str, input_name: str, workload: Workload, n: int = 16) -> list[str]:
    """Right answers and cache behaviour before measuring; raises RuntimeError on a wrong one.
    Uses inputs that the measured sequence also holds: both targets are restarted afterwards."""
    rows = workload.inputs[:n]
    fresh = workload.inputs[n]

    def close(a: np.ndarray, b: np.ndarray) -> bool:
        return a.shape == b.shape and int(a.argmax()) == int(b.argmax()) and float(np.abs(a - b).max()) <= TOLERANCE

    direct = [infer_binary(triton_url, model, input_name, r)[0] for r in rows]
    again = [infer_binary(triton_url, model, input_name, r)[0] for r in rows]  # Triton's cache hits
    for i, (a, b) in enumerate(zip(direct, again)):
        if not close(a, b):
            raise RuntimeError(f"Triton answered input {i} differently from its cache: {a} vs {b}")
    with ThreadPoolExecutor(n) as pool:
        first = list(pool.map(lambda r: infer_binary(gw_url, model, input_name, r), rows))  # batched misses
        second = list(pool.map(lambda r: infer_binary(gw_url, model, input_name, r), rows))  # hits
        same = list(pool.map(lambda _: infer_binary(gw_url, model, input_name, fresh), range(n)))  # one flight
    worst = 0.0
    for i, (d, (g1, c1), (g2, c2)) in enumerate(zip(direct, first, second)):
        if c1 not in ("miss", "coalesced", "hit"):
            raise RuntimeError(f"gateway: first request for input {i} says X-Cache {c1!r}, expected miss")
        if c2 != "hit":
            raise RuntimeError(f"gateway: repeated input {i} says X-Cache {c2!r}, expected hit")
        for g in (g1, g2):
            if not close(d, g):
                raise RuntimeError(f"gateway answered input {i} with {g}, Triton with {d} (tolerance {TOLERANCE})")
            worst = max(worst, float(np.abs(d - g).max()))
    sources = [c for _, c in same]
    if sources.count("miss") != 1 or any(c not in ("miss", "coalesced", "hit") for c in sources):
        raise RuntimeError(f"gateway: {n} identical requests at once said X-Cache {sources}, expected one miss")
    ref = infer_binary(triton_url, model, input_name, fresh)[0]
    if not all(close(ref, g) for g, _ in same):
        raise RuntimeError("gateway: identical requests at once got an answer different from Triton's")
    first_sources = sorted({c for _, c in first})
    return [
        f"{n} inputs sent at once through the gateway (batched, X-Cache {'/'.join(first_sources)}): same argmax as "
        f"Triton, probabilities within {worst:.1e} (tolerance {TOLERANCE:g})",
        f"the same {n} again: all X-Cache hit, same answers; Triton's own repeat of each (its cache): same answers",
        f"{n} identical requests at once for a new input: {sources.count('miss')} miss, "
        f"{sources.count('coalesced')} coalesced, {sources.count('hit')} hit, all with Triton's answer",
    ]


# -- statistics ------------------------------------------------------------------------------


@dataclass
class TritonCounters:
    success: int = 0  # requests answered (cache hits included)
    success_ns: int = 0  # their time in Triton, from its receipt of each to its answer
    cache_hit: int = 0
    cache_miss: int = 0
    inferences: int = 0  # rows executed by the model
    executions: int = 0
    cache_hit_ns: int = 0
    cache_miss_ns: int = 0
    queued: int = 0  # requests through Triton's scheduler queue (cache hits too: looked up after it)
    queue_ns: int = 0
    computed: int = 0  # requests the model computed
    compute_ns: int = 0  # their computation: inputs, execution (each request of a batch counts it whole), outputs

    def times_ms(self) -> tuple[float, float]:
        """A request's mean wait in Triton's queue, and a computed request's mean computation (ms)."""
        return self.queue_ns / max(1, self.queued) / 1e6, self.compute_ns / max(1, self.computed) / 1e6

    def answer_ms(self) -> float:
        """A request's mean time in Triton from its receipt to its answer (ms)."""
        return self.success_ns / max(1, self.success) / 1e6

    def minus(self, before: TritonCounters) -> TritonCounters:
        return TritonCounters(*(getattr(self, f) - getattr(before, f) for f in self.__dataclass_fields__))

    def plus(self, other: TritonCounters) -> TritonCounters:
        return TritonCounters(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))


def triton_counters(url: str, model: str) -> TritonCounters:
    status, body = http_get(f"{url}/v2/models/{model}/stats", timeout=5.0)
    if status != 200:
        raise RuntimeError(f"{url}: statistics answered {status}: {body[:200]!r}")
    total = TritonCounters()
    for version in json.loads(body).get("model_stats", []):
        stats = version.get("inference_stats", {})
        total.success += int(stats.get("success", {}).get("count", 0))
        total.success_ns += int(stats.get("success", {}).get("ns", 0))
        total.cache_hit += int(stats.get("cache_hit", {}).get("count", 0))
        total.cache_miss += int(stats.get("cache_miss", {}).get("count", 0))
        total.cache_hit_ns += int(stats.get("cache_hit", {}).get("ns", 0))
        total.cache_miss_ns += int(stats.get("cache_miss", {}).get("ns", 0))
        total.queued += int(stats.get("queue", {}).get("count", 0))
        total.queue_ns += int(stats.get("queue", {}).get("ns", 0))
        total.computed += int(stats.get("compute_infer", {}).get("count", 0))
        total.compute_ns += sum(int(stats.get(k, {}).get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output"))
        total.inferences += int(version.get("inference_count", 0))
        total.executions += int(version.get("execution_count", 0))
    return total


def fleet_counters(urls: list[str], model: str) -> TritonCounters:
    """``triton_counters`` summed over the instances."""
    total = TritonCounters()
    for url in urls:
        total = total.plus(triton_counters(url, model))
    return total


def gateway_counters(gw_url: str, model: str) -> dict[str, int]:
    status, body = http_get(f"{gw_url}/v2/gateway/cache", timeout=5.0)
    if status != 200:
        raise RuntimeError(f"{gw_url}/v2/gateway/cache answered {status}")
    return {k: int(v) for k, v in json.loads(body).get("models", {}).get(model, {}).items()}


def gateway_metrics(gw_url: str) -> Iterator[Any]:
    """The metric families of the gateway's /metrics, parsed (with several workers: summed over
    them, each worker's as it last published, at most a second ago)."""
    status, body = http_get(f"{gw_url}/metrics", timeout=5.0)
    if status != 200:
        raise RuntimeError(f"{gw_url}/metrics answered {status}")
    return text_string_to_metric_families(body.decode() if isinstance(body, bytes) else body)


def summed_counters(gw_url: str, model: str) -> dict[str, int]:
    """The model's cache counters in the gateway's /metrics (``gateway_metrics``)."""
    counts: dict[str, int] = {}
    for family in gateway_metrics(gw_url):
        for sample in family.samples:
            name = sample.name.removeprefix("gateway_cache_").removesuffix("_total")
            if sample.name.startswith("gateway_cache_") and sample.name.endswith("_total") and sample.labels.get("model") == model:
                counts[name] = int(sample.value)
    return counts


# Times (s) above which the report counts a cache outcome's slow requests (bounds of the
# gateway's latency histogram buckets).
SLOW_S = (0.025, 0.1, 1.0)


@dataclass
class Timing:
    """Requests of one kind, their mean time (ms) and how many took longer than each of
    ``SLOW_S``."""

    count: int = 0
    mean_ms: float = 0.0
    slower: tuple[int, ...] = ()

    def describe(self, name: str) -> str:
        slow = [f"{n} over {bound * 1000:g} ms" for bound, n in zip(SLOW_S, self.slower) if n]
        return f"{name} {self.mean_ms:.2f} ms" + (f" ({', '.join(slow)})" if slow else "")


def gateway_times(gw_url: str, model: str) -> dict[str, Timing]:
    """From the gateway's /metrics (summed over its workers): for each cache outcome (hit, miss,
    coalesced), the model's requests answered 200, their mean time in the gateway, arrival to
    answer, and how many took longer than each of ``SLOW_S`` (from the histogram's buckets);
    under "batcher", the requests the batchers sent and their mean wait there (the hold, and any
    wait for a free upstream slot); under "upstream", the requests sent to Triton and their mean
    time from the gateway's send to their answer decoded."""
    sums: dict[str, list[float]] = {}
    within: dict[str, dict[float, float]] = {}  # key -> bucket bound -> requests within it
    for family in gateway_metrics(gw_url):
        for sample in family.samples:
            if family.name == "gateway_instance_request_duration_seconds":
                key = "upstream"  # summed over the instances (the benchmark serves one model)
            elif sample.labels.get("model") != model:
                continue
            elif family.name == "gateway_infer_cache_request_duration_seconds":
                key = sample.labels["cache"]
            elif family.name == "gateway_batcher_queue_seconds":
                key = "batcher"  # summed over the model's versions
            else:
                continue
            total = sums.setdefault(key, [0.0, 0.0])
            if sample.name.endswith("_count"):
                total[0] += sample.value
            elif sample.name.endswith("_sum"):
                total[1] += sample.value
            elif sample.name.endswith("_bucket") and sample.labels.get("le") != "+Inf":
                bound = float(sample.labels["le"])
                bounds = within.setdefault(key, {})
                bounds[bound] = bounds.get(bound, 0.0) + sample.value
    times = {}
    for key, (n, total) in sums.items():
        bounds = within.get(key, {})
        slower = tuple(int(n - bounds[b]) if b in bounds else 0 for b in SLOW_S)
        times[key] = Timing(int(n), total / n * 1000 if n else 0.0, slower)
    return times


# The host tier's counters in the gateway's /metrics (summed over its workers), as the report names them.
HOST_COUNTERS = {
    "claims": "keys claimed",
    "unclaimed": "computed without a claim",
    "skipped_writes": "writes skipped (another worker writing)",
    "claims_gave_up": "claims left to lapse",
    "stale": "stale entries found",
}


# Host-wide batching's counters ([batching] host_wide), as the report names them.
HOST_BATCH_COUNTERS = {
    "forwarded": "handed to the worker batching for the host",
    "served": "batched there for the other workers",
    "kept": "batched by their own worker (that worker unreachable)",
}


def host_counters(gw_url: str) -> dict[str, int]:
    """The gateway workers' dealings with their shared tier (``HOST_COUNTERS``) and with each
    other's batchers (``HOST_BATCH_COUNTERS``, with host_wide), from /metrics."""
    counts: dict[str, int] = {}
    for family in gateway_metrics(gw_url):
        for sample in family.samples:
            for prefix, names in (("gateway_cache_host_", HOST_COUNTERS), ("gateway_batcher_host_", HOST_BATCH_COUNTERS)):
                name = sample.name.removeprefix(prefix).removesuffix("_total")
                if sample.name.startswith(prefix) and name in names:
                    counts[name] = int(sample.value)
    return counts


def settled_counters(gw_url: str, model: str, requests: int, timeout: float = 15.0) -> dict[str, int]:
    """``summed_counters`` once they count ``requests`` answers (every worker has published
    since the run ended), or as they are at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        counts = summed_counters(gw_url, model)
        if sum(counts.get(k, 0) for k in ("hits", "misses", "coalesced")) >= requests or time.monotonic() > deadline:
            return counts
        time.sleep(0.25)


def redis_answers(port: int) -> bool:
    """Whether the redis-server on ``port`` answers a PING."""
    try:
        with redis.Redis(host=HOST, port=port, socket_timeout=2.0) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


ATTEMPTS = 4  # per measurement, each from cold, when perf_analyzer hung or timed out
HANG_S = 20.0  # perf_analyzer still running this long after its last request was answered: stuck


def groups_cpu_s(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each named set of process groups."""
    return {name: sum(group_cpu_s(g) for g in pgids) for name, pgids in groups.items()}


class TrafficClock(threading.Thread):
    """Watches one perf_analyzer run (one process per client) through the target's request
    counter: notes when the traffic
    starts (the counter first moves, once perf_analyzer has loaded its input data) and, with
    --request-count, when it ends (all requests answered), with every process's CPU clock at
    both moments, so that per-request CPU covers the traffic only (not perf_analyzer's start-up
    nor its writing the export afterwards).

    It is also a watchdog: perf_analyzer 2.48 with --request-count sometimes never exits after
    every request was answered (it keeps waiting for one it counts as outstanding; seen about once
    in ten runs against the gateway, with a second run on the same gateway process). If one is
    still running HANG_S after the last answer, the watchdog stops them all and the run counts
    as failed (main() retries it from cold)."""

    def __init__(self, runner: CacheRunner, answered: Any, groups: dict[str, list[int]], expected: int | None) -> None:
        super().__init__(daemon=True)
        self.runner, self.answered, self.groups, self.expected = runner, answered, groups, expected
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.start_at: float | None = None
        self.end_at: float | None = None
        self.cpu_start: dict[str, float] = {}
        self.cpu_end: dict[str, float] = {}
        self.hung = False
        self.pa_seen: dict[int, float] = {}

    def pa_cpu_s(self, procs: list[subprocess.Popen[bytes]]) -> float:
        """The perf_analyzer processes' CPU seconds; one that has exited (a client done before
        the others) counts as last seen, at most a tick before it ended."""
        for proc in procs:
            seen = process_cpu_s(proc.pid)
            if seen:
                self.pa_seen[proc.pid] = seen
        return sum(self.pa_seen.get(proc.pid, 0.0) for proc in procs)

    def snapshot(self, procs: list[subprocess.Popen[bytes]]) -> dict[str, float]:
        cpu = groups_cpu_s(self.groups)
        cpu["perf_analyzer"] = self.pa_cpu_s(procs)
        cpu["machine"] = machine_busy_s()
        return cpu

    def run(self) -> None:
        try:
            before = self.answered()
            while not self.stop.wait(0.1):
                procs = list(self.runner.procs)
                if not procs:
                    continue
                self.pa_cpu_s(procs)
                done = self.answered() - before
                if self.start_at is None and done > 0:
                    self.start_at, self.cpu_start = time.monotonic(), self.snapshot(procs)
                if self.expected is not None and self.end_at is None and done >= self.expected:
                    self.end_at, self.cpu_end = time.monotonic(), self.snapshot(procs)
                running = any(proc.poll() is None for proc in procs)
                if self.end_at is not None and time.monotonic() - self.end_at > HANG_S and running:
                    self.hung = True
                    self.runner.stop_current()
                    return
        except Exception:  # a failed probe leaves the moments unset: the report then has no CPU figures
            return

    def figures(self, run: Run, pa_cpu_total: float) -> None:
        """Fill the run's traffic time and CPU figures (end = perf_analyzer's exit when the
        counter never reached the expected count)."""
        if self.start_at is None:
            return
        if self.end_at is None:
            self.end_at = time.monotonic()
            self.cpu_end = groups_cpu_s(self.groups)
            self.cpu_end["perf_analyzer"] = pa_cpu_total
            self.cpu_end["machine"] = machine_busy_s()
        run.wall_s, run.load_s = self.end_at - self.start_at, self.start_at - self.started
        run.cpu_s = {k: self.cpu_end[k] - self.cpu_start[k] for k in [*self.groups, "perf_analyzer"]}
        busy = self.cpu_end["machine"] - self.cpu_start["machine"]
        run.cpu_s[OTHERS] = max(0.0, busy - sum(run.cpu_s.values()))


@dataclass
class Run:
    """One measurement and what the counters and CPU clocks say about it."""

    m: Measurement
    wall_s: float = 0.0  # traffic only: from the first answered request to perf_analyzer's exit
    load_s: float = 0.0  # perf_analyzer's start-up (loading the input data) before it
    requests: int = 0  # requests the target answered during the run
    hits: int = 0
    misses: int = 0
    coalesced: int | None = 0  # None: counted among the hits (several gateway workers)
    upstream: TritonCounters = field(default_factory=TritonCounters)  # Triton's counters, over the instances
    spans: list[ClientSpan] = field(default_factory=list)  # each perf_analyzer process's, in order
    opening: Opening | None = None  # the first answers against the rest's, from the exports
    cpu_s: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds over the run
    times: dict[str, Timing] = field(default_factory=dict)  # the gateway's: gateway_times
    host: dict[str, int] = field(default_factory=dict)  # the gateway workers' shared tier: host_counters
    round: int = 0  # its round of --rounds (0: the only one)

    @property
    def label(self) -> str:
        return self.m.label if not self.round else f"{self.m.label}, round {self.round}"

    @property
    def hit_rate(self) -> float | None:
        """Share of the requests answered from the cache."""
        return self.hits / self.requests if self.requests else None

    @property
    def others_cores(self) -> float:
        """Cores that processes not measured here kept busy during the traffic, on average."""
        return self.cpu_s.get(OTHERS, 0.0) / self.wall_s if self.wall_s else 0.0

    def cpu_us_per_request(self, name: str) -> float | None:
        if not self.requests or name not in self.cpu_s:
            return None
        return self.cpu_s[name] / self.requests * 1e6


_SENT = re.compile(rb'"timestamp":(\d+)')
_ANSWERED = re.compile(rb'"response_timestamps":\[(\d+)')


@dataclass
class ClientSpan:
    """When one perf_analyzer process sent its first request and got its last answer (ns)."""

    first_sent: int
    last_answered: int


# The stretch at the start of a run whose answers are set apart from the rest (``Opening``).
OPENING_S = 0.25


@dataclass
class Opening:
    """The answers of a run's first ``OPENING_S`` (from the first request sent) against the
    rest's: what a target's one-time costs at the start (connections, metadata, first batches
    of each size) took from its run."""

    first: int  # requests answered in the opening
    first_ms: float  # their mean latency
    rest: int
    rest_ms: float
    rest_s: float  # from the end of the opening to the last answer

    def describe(self) -> str:
        if not self.first or not self.rest or self.rest_s <= 0:
            return ""
        return (
            f"; answers in the first {OPENING_S:g} s: {self.first} ({self.first / OPENING_S:.0f}/s), mean latency "
            f"{self.first_ms:.2f} ms; after it: {self.rest / self.rest_s:.0f}/s, {self.rest_ms:.2f} ms"
        )


def opening(sent: np.ndarray, answered: np.ndarray) -> Opening:
    """``Opening`` of a run from every request's send and answer times (ns)."""
    latency_ms = (answered - sent) / 1e6
    cut = int(sent.min()) + int(OPENING_S * 1e9)
    early = answered < cut
    late = ~early
    return Opening(
        int(early.sum()), float(latency_ms[early].mean()) if early.any() else 0.0,
        int(late.sum()), float(latency_ms[late].mean()) if late.any() else 0.0,
        (int(answered.max()) - cut) / 1e9,
    )  # fmt: skip


def from_exports(paths: list[Path], m: Measurement) -> tuple[list[ClientSpan], Opening] | None:
    """Throughput and latencies from the perf_analyzer processes' profile exports (every
    request's send and answer timestamps), each one's span, and the run's ``Opening``; the files
    are removed afterwards (they are large). None when one is missing or torn.

    Latencies are over every request. Throughput is over the time every client was sending, from
    the last one's first request to the first one's last answer: the requests answered within it
    over its length. With one client that is the whole run. With several, one that starts late or
    ends early would otherwise count a stretch at part of the concurrency against its target."""
    sent_all, answered_all, spans = [], [], []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        path.unlink(missing_ok=True)
        sent = np.array(_SENT.findall(data), dtype=np.int64)
        answered = np.array(_ANSWERED.findall(data), dtype=np.int64)
        if not len(sent) or len(sent) != len(answered):
            return None
        sent_all.append(sent)
        answered_all.append(answered)
        spans.append(ClientSpan(int(sent.min()), int(answered.max())))
    sent, answered = np.concatenate(sent_all), np.concatenate(answered_all)
    latency_us = (answered - sent) / 1000.0
    m.requests = len(sent)
    start, end = max(s.first_sent for s in spans), min(s.last_answered for s in spans)
    if end <= start:
        return None  # the clients never all sent at once
    m.throughput = int(np.count_nonzero((answered >= start) & (answered <= end))) / ((end - start) / 1e9)
    m.p50_us, m.p99_us = (float(v) for v in np.percentile(latency_us, [50, 99]))
    m.avg_us = float(latency_us.mean())
    return spans, opening(sent, answered)


def measurement_description(args: argparse.Namespace) -> str:
    if args.instances == 1:
        return (
            f"--request-count {args.requests}: the whole sequence, each request once; throughput and latencies over "
            "all of it, from perf_analyzer's per-request timestamps (--profile-export-file)"
        )
    return (
        f"--request-count per client (its share of the {args.requests} requests): the whole sequence, each request "
        "once; latencies over all of it, throughput while every client sent, from perf_analyzer's per-request "
        "timestamps (--profile-export-file)"
    )


def split_concurrency(concurrency: int, clients: int) -> list[int]:
    """``concurrency`` shared as evenly as it goes among ``clients`` perf_analyzer processes."""
    return [concurrency // clients + (i < concurrency % clients) for i in range(clients)]


@dataclass
class Client:
    """One perf_analyzer process of a run: where it sends, at what concurrency, which requests."""

    port: int
    concurrency: int
    input_data: Path
    requests: int


class CacheRunner:
    """perf_analyzer runs with --input-data and --request-count, one process per client side by
    side (``procs`` while they run), and the CPU time they used (their rusage, once reaped).
    ``stop_current`` stops them, as compare.Runner's does its one process (``stop_all``)."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.count = 0  # runs so far: names their files
        self.procs: list[subprocess.Popen[bytes]] = []
        self.last_cpu_s = 0.0
        self.last_spans: list[ClientSpan] = []
        self.last_opening: Opening | None = None

    def stop_current(self) -> None:
        for proc in list(self.procs):
            stop_process(proc)

    def run_clients(self, target: str, clients: list[Client]) -> Measurement:
        """One run: every client's perf_analyzer started at once; the measurement over them all.
        A client that fails stops the others."""
        self.count += 1
        logs, cmds, exports, csvs = [], [], [], []
        for i, client in enumerate(clients):
            name = f"pa-{self.count}" if len(clients) == 1 else f"pa-{self.count}-{i}"
            exports.append(self.workdir / f"{name}-requests.json")
            csvs.append(self.workdir / f"{name}.csv")
            logs.append(self.workdir / f"{name}.log")
            cmds.append([
                str(PERF_ANALYZER),
                "-m", self.args.model,
                "-u", f"{HOST}:{client.port}",
                "-i", "http",
                "--input-data", str(client.input_data),
                "--concurrency-range", str(client.concurrency),
                "--request-count", str(client.requests),
                "--profile-export-file", str(exports[i]),
                "-f", str(csvs[i]),
            ])  # fmt: skip
        concurrency = sum(c.concurrency for c in clients)
        m = Measurement(target, "-", concurrency, command=cmds[0])
        print(f"  perf_analyzer -> {m.label:<24} c={concurrency:<3} ...", end="", flush=True)
        # Worst case, then it is stuck: loading the input data, the sequence at 500 infer/s, exit.
        requests = sum(c.requests for c in clients)
        timeout = requests / 500 + 90 + requests / 5000
        deadline = time.monotonic() + timeout
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        codes: list[int | None] = [None] * len(clients)
        timed_out = False
        try:
            for cmd, log in zip(cmds, logs):
                with open(log, "wb") as out:
                    out.write(shlex.join(cmd).encode() + b"\n\n")
                    out.flush()
                    self.procs.append(
                        subprocess.Popen(
                            cmd,
                            stdin=subprocess.DEVNULL,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                            preexec_fn=fleet._die_with(os.getpid()),
                        )
                    )
            while None in codes:
                codes = [proc.poll() for proc in self.procs]
                if any(code not in (None, 0) for code in codes):
                    break  # one failed: the others' figures would not be the designed run
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.05)
        finally:
            self.stop_current()  # none left running, whatever happened
            self.procs = []
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.last_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
        one = len(clients) == 1
        spans = None
        self.last_opening = None
        if failed is None and not timed_out:
            # One client: perf_analyzer's own figures first (its CSV and stdout), kept if its
            # export is of no use; it times a request-count run in whole seconds (it checks every
            # second whether all requests are done), up to a second too long, so the export's
            # per-request timestamps replace them whenever they can.
            got_csv = one and parse_csv(csvs[0], m)
            if one:
                parse_stdout(logs[0].read_text(errors="replace"), m)
            exported = from_exports(exports, m)
            spans, self.last_opening = exported if exported is not None else (None, None)
            if spans is None and got_csv:
                spans = []
        for export in exports:  # large: gone once read, or of no use
            export.unlink(missing_ok=True)
        self.last_spans = spans or []
        if timed_out:
            m.error = f"perf_analyzer timed out after {timeout:.0f}s"
        elif failed is not None:
            text = logs[failed].read_text(errors="replace")
            lines = [ln.strip() for ln in text.splitlines()[2:] if ln.strip() and not ln.startswith("WARNING: data type")]
            who = "" if one else f" (client {failed}, port {clients[failed].port})"
            m.error = f"perf_analyzer exit {codes[failed]}{who}: " + " | ".join(lines[-4:])[:500]
        elif spans is None:
            m.error = (
                "perf_analyzer's profile export is missing or torn" if one
                else "the clients' profile exports are missing or torn, or the clients never all sent at once"
            )  # fmt: skip
        if m.error:
            print(f" ERROR\n    {m.error}")
        else:
            print(f" {m.throughput:9.1f} infer/s  p50 {m.p50_us / 1000:7.2f} ms  p99 {m.p99_us / 1000:7.2f} ms")
        return m


# -- report ----------------------------------------------------------------------------------


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def us(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def results_table(runs: list[Run]) -> list[str]:
    rows = [("target", "concurrency", "infer/s", "p50 ms", "p99 ms", "avg ms", "hit rate", "note")]
    for r in sorted(runs, key=lambda r: (r.m.concurrency, r.round)):
        m = r.m
        note = ("ERROR: " + m.error[:60]) if m.error else overlap_note(r.spans)
        rows.append(
            (r.label, str(m.concurrency), fmt_tp(m.throughput), fmt_ms(m.p50_us), fmt_ms(m.p99_us), fmt_ms(m.avg_us), pct(r.hit_rate), note)
        )
    return table(rows)


def counters_table(runs: list[Run]) -> list[str]:
    rows = [
        (
            "target", "c", "requests", "traffic s", "hits", "misses", "coalesced",
            "Triton executions (rows)", "CPU µs/request: Triton", "gateway", "perf_analyzer", "other load (cores)",
        )
    ]  # fmt: skip
    for r in sorted(runs, key=lambda r: (r.m.concurrency, r.round)):
        if not r.requests:
            continue
        up = r.upstream
        rows.append(
            (
                r.label,
                str(r.m.concurrency),
                str(r.requests),
                f"{r.wall_s:.1f}",
                str(r.hits),
                str(r.misses),
                "-" if r.coalesced is None else str(r.coalesced),
                f"{up.executions} ({up.inferences})",
                us(r.cpu_us_per_request("triton")),
                us(r.cpu_us_per_request("gateway")),
                us(r.cpu_us_per_request("perf_analyzer")),
                f"{r.others_cores:.2f}",
            )
        )
    return table(rows)


def verdict_lines(runs: list[Run], concurrencies: list[int]) -> tuple[list[str], bool]:
    """Per concurrency, gateway / direct throughput, PASS above ``TARGET_RATIO``. With several
    rounds, each round's pair gives a ratio and the verdict is on their median: a run's
    throughput moves with the machine's other load, and a pair measured side by side shares it.
    A round without its pair (a run that failed) fails the target."""
    lines, ok_all = [], True
    for c in concurrencies:
        pairs, missing = [], []
        for n in sorted({r.round for r in runs}):
            results = [r.m for r in runs if r.round == n]
            d, g = pick(results, DIRECT, "-", c), pick(results, GATEWAY, "-", c)
            if d is not None and g is not None:
                pairs.append((n, d.throughput, g.throughput))
            else:
                missing.append(n)
        if missing:
            which = "" if missing == [0] else f" in round {', '.join(map(str, missing))}"
            lines.append(f"c={c}: gateway / direct throughput: N/A (missing measurement{which}): FAIL")
            ok_all = False
            continue
        ratios = [g / d for _, d, g in pairs]
        ratio = statistics.median(ratios)
        ok = ratio > TARGET_RATIO
        ok_all = ok_all and ok
        verdict = f"(target > {TARGET_RATIO:.1f}, the gateway ahead): {'PASS' if ok else 'FAIL'}"
        if len(pairs) == 1 and not pairs[0][0]:
            _, d, g = pairs[0]
            lines.append(f"c={c}: gateway / direct throughput = {g:.1f} / {d:.1f} = {ratio:.2f} {verdict}")
            continue
        each = ", ".join(f"round {n} {g:.1f} / {d:.1f} = {g / d:.2f}" for n, d, g in pairs)
        lines.append(f"c={c}: gateway / direct throughput: {each}; median {ratio:.2f} {verdict}")
    return lines, ok_all


def traffic_s(spans: list[ClientSpan]) -> float:
    """From the first request any client sent to the last answer any client got."""
    return (max(s.last_answered for s in spans) - min(s.first_sent for s in spans)) / 1e9


def overlap_note(spans: list[ClientSpan]) -> str:
    """With several clients: the share of the run in which all of them sent (the throughput's window)."""
    if len(spans) < 2:
        return ""
    both = (min(s.last_answered for s in spans) - max(s.first_sent for s in spans)) / 1e9
    return f"all {len(spans)} clients sending {both / traffic_s(spans):.0%} of the run"


def instances_description(n: int) -> str:
    return "one Triton instance" if n == 1 else f"{n} Triton instances, each with its own response cache"


def spans_description(spans: list[ClientSpan]) -> str:
    """How far apart the clients of one run started and ended (their requests overlap the rest)."""
    if len(spans) < 2:
        return ""
    starts = [s.first_sent for s in spans]
    ends = [s.last_answered for s in spans]
    return (
        f"; its {len(spans)} clients' first requests within {(max(starts) - min(starts)) / 1e6:.0f} ms of each other, "
        f"last answers within {(max(ends) - min(ends)) / 1e6:.0f} ms"
    )


def stat_lines(runs: list[Run]) -> list[str]:
    lines = []
    for r in sorted(runs, key=lambda r: r.m.concurrency):
        if not r.requests:
            continue
        up = r.upstream
        queue_ms, compute_ms = up.times_ms()
        cpu = ", ".join(f"{k} {v:.1f} s ({v / r.wall_s:.0%} of a core)" for k, v in r.cpu_s.items()) if r.wall_s else ""
        cpu += spans_description(r.spans)
        cpu += r.opening.describe() if r.opening is not None else ""
        if r.m.target == DIRECT:
            lookup = f"{up.cache_hit_ns / max(1, up.cache_hit) / 1000:.1f} µs per hit lookup (Triton's own timing)"
            uncounted = r.requests - up.cache_hit - up.cache_miss
            lines.append(
                f"{r.label}, c={r.m.concurrency}: Triton cache {up.cache_hit} hits, {up.cache_miss} misses, "
                f"{uncounted} requests computed without a hit or miss counted (the rows executed beyond the misses: "
                f"repeats that arrived while their input was being computed; Triton does not coalesce them), hit "
                f"rate {pct(r.hit_rate)}, {lookup}; {up.executions} executions for {up.inferences} rows "
                f"(mean batch {up.inferences / max(1, up.executions):.2f}); a request waited {queue_ms:.2f} ms in "
                f"Triton's queue on average (hits too: Triton looks them up after it), a computed one "
                f"{compute_ms:.2f} ms in computation; CPU: {cpu}"
            )
        else:
            coalesced = "coalesced among the hits" if r.coalesced is None else f"{r.coalesced} coalesced"
            lines.append(
                f"{r.label}, c={r.m.concurrency}: gateway cache {r.hits} hits, {r.misses} misses, {coalesced} "
                f"({pct(r.hit_rate)} hits); behind it Triton answered {up.success} requests "
                f"({up.cache_hit} from its own cache, {up.cache_miss} misses), {up.executions} executions for "
                f"{up.inferences} rows (mean batch {up.inferences / max(1, up.executions):.2f}), each batch "
                f"{queue_ms:.2f} ms in Triton's queue and {compute_ms:.2f} ms in computation, "
                f"{up.answer_ms():.2f} ms in Triton from its receipt to its answer; CPU: {cpu}"
                + times_description(r.times)
                + ("; the workers' shared tier: " + ", ".join(f"{r.host.get(k, 0)} {v}" for k, v in HOST_COUNTERS.items()) if r.host else "")
                + (
                    "; requests of host-wide batching: " + ", ".join(f"{r.host[k]} {v}" for k, v in HOST_BATCH_COUNTERS.items())
                    if "forwarded" in r.host
                    else ""
                )
            )
    return lines


def times_description(times: dict[str, Timing]) -> str:
    """Where a gateway run's requests spent their time in the gateway (``gateway_times``)."""
    names = {"hit": "hits", "miss": "misses", "coalesced": "coalesced"}
    answered = [times[k].describe(name) for k, name in names.items() if k in times and times[k].count]
    if not answered:
        return ""
    text = "; mean time in the gateway, arrival to answer: " + ", ".join(answered)
    if "batcher" in times and times["batcher"].count:
        text += f"; the batched requests waited {times['batcher'].mean_ms:.2f} ms on average in the batcher (the hold, a busy slot)"
    if "upstream" in times and times["upstream"].count:
        text += f"; a request to Triton took {times['upstream'].mean_ms:.2f} ms from the gateway's send to its answer decoded"
    return text


def render(
    args: argparse.Namespace, command: str, info: dict[str, str], workload: Workload, runs: list[Run],
    checks: list[str], batching: dict[str, Any],
) -> tuple[str, str, bool]:  # fmt: skip
    target_lines, ok = verdict_lines(runs, args.concurrency)
    settings = (
        f"model {args.model}, concurrency {','.join(map(str, args.concurrency))}, perf_analyzer -i http --input-data "
        f"(binary tensors, batch size 1), {measurement_description(args)}; {instances_description(args.instances)}, "
        f"response cache local {args.triton_cache_mb} MiB, dynamic batching max_queue_delay_microseconds "
        + (
            f"{round(args.hold_ms * 1000)} direct (--hold-ms, as the gateway's hold_ms), the model's own 0 behind the gateway"
            if args.hold_ms is not None
            else "0 (the model's own)"
        )
    )
    if args.instances > 1:
        settings += (
            f"; clients: {args.instances} perf_analyzer processes per run, sharing the concurrency, client i sending "
            f"requests i, i+{args.instances}, i+{2 * args.instances}, ... of the sequence (as a round-robin balancer "
            "in front of the instances deals them): direct, client i to instance i; through the gateway, the same "
            "clients with the same requests, all to the gateway"
        )
    workers = args.gateway_workers
    gateway = (
        f"{workers} worker{'s' if workers > 1 else ''} (uvicorn)"
        + (" sharing one cache in memory (the cache's host tier)" if workers > 1 else "")
        + (" (answers checked on 1 worker; counts from the gateway's /metrics, summed over its workers; traffic s "
           "from perf_analyzer's timestamps, CPU until it exited)" if workers > 1 else "")
        + ", [cache] enabled"
        + (" with the shared tier on a redis-server of its own (emptied before each run)" if args.redis else "")
        + ", batching "
    )
    gateway += ", ".join(f"{k} {toml_value(v)}" for k, v in batching.items())
    wl = workload.describe(args.zipf_s) + f" (seed {args.seed})"
    method = (
        "Each measurement starts cold: Triton restarted before each run (empty response caches), then warmed on "
        f"batches of zeros ({', '.join(map(str, WARM_UP_BATCHES))} rows: not in the workload); for the gateway's "
        "runs, Triton restarted and warmed, and a new gateway started in front of it. Per concurrency: direct first, "
        "then the gateway."
        + (
            f" {args.rounds} rounds, each measuring every concurrency so; the target is judged on each concurrency's "
            "median ratio over the rounds."
            if args.rounds > 1
            else ""
        )
    )
    odd = [r for r in runs if r.requests and r.requests != workload.requests]
    warn = (
        [f"WARNING: {len(odd)} run(s) answered another number of requests than the sequence holds "
         f"({', '.join(str(r.requests) for r in odd)} instead of {workload.requests})"]
        if odd else []
    )  # fmt: skip
    res = results_table(runs)
    cnt = counters_table(runs)
    stats = stat_lines(runs)
    text = "\n".join(
        ["", "== Results ==", f"command: {command}", *(f"{k}: {v}" for k, v in info.items())]
        + [f"settings: {settings}", f"gateway: {gateway}", f"workload: {wl}", f"method: {method}", ""]
        + ["== Answers checked =="] + checks + [""]
        + res + [""] + cnt + [""]
        + ["== Caches and CPU over each run =="] + stats + warn + [""]
        + ["== Target =="] + target_lines
        + ["", "TARGET PASSES" if ok else "TARGET FAILS"]
    )  # fmt: skip
    md = "\n".join(
        [
            f"# Cache benchmark ({info['date']})",
            "",
            "The gateway's response cache against Triton's own response cache, on the same repetitive",
            "workload (about 90% of requests repeat an earlier input), same load, same run.",
            "",
            "```",
            command,
            "```",
            "",
            *(f"- {k}: {v}" for k, v in info.items()),
            f"- settings: {settings}",
            f"- gateway: {gateway}",
            f"- workload: {wl}",
            f"- method: {method}",
            "",
            "## Answers checked",
            "",
            *(f"- {ln}" for ln in checks),
            "",
            "## Measurements",
            "",
            *res,
            "",
            "Throughput: requests answered / time, from the first request sent to the last answer (with several",
            "clients: from the last client's first request to the first client's last answer, while all of them",
            "sent, counting the answers within); latencies: client-side, per request,",
            "from perf_analyzer's per-request timestamps. Hit rate: requests answered from the cache / requests",
            "answered, over the whole run (Triton's `cache_hit` statistics for direct, the gateway's",
            "`/v2/gateway/cache` for the gateway; a coalesced request shared an identical one's computation).",
            "",
            "## Caches and CPU over each run",
            "",
            *cnt,
            "",
            "`requests`: answered by the target during the run (from its own counters); `traffic s`: from the",
            "first answer to the last (perf_analyzer's start-up, loading the input data, excluded; with several",
            "clients, from any client's first answer); hits, misses,",
            "coalesced: the cache that served the target (Triton's for direct, the gateway's for the gateway);",
            "Triton executions: model executions (rows), over the instances. CPU µs/request: each process group's",
            "user + system CPU over the traffic per request answered (Triton with its Python-backend stub); other",
            "load: the cores the rest of the machine kept busy meanwhile (all busy CPU time, softirq included,",
            "less the processes measured).",
            "",
            *(f"- {ln}" for ln in stats + warn),
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


def auto_workers(cores: int) -> int:
    """Gateway workers for a host with ``cores`` cores: a quarter of them, 1 to 8."""
    return max(1, min(8, cores // 4))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Gateway cache vs Triton's response cache on a repetitive workload.")
    p.add_argument("--model", default="digits_cnn", choices=MODELS)
    p.add_argument("--concurrency", default="16,32", help="comma-separated concurrency levels (default 16,32)")
    p.add_argument("--requests", type=int, default=100_000, help="length of the request sequence (default 100000)")
    p.add_argument("--repeat-share", type=float, default=0.9, help="probability that a request repeats an earlier input")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent of the repeats' popularity (default 1.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--triton-cache-mb", type=int, default=256, help="Triton's response cache size (MiB)")
    p.add_argument(
        "--hold-ms", type=float, default=None,
        help="how long a batch waits for company, for both targets alike: the gateway's [batching] hold_ms "
        "(whatever the load) and direct Triton's max_queue_delay_microseconds in the model's config (0: "
        "neither waits; default: each its own, configs/local.toml's [batching] and the model's 0)",
    )  # fmt: skip
    p.add_argument(
        "--gateway-workers", default="auto",
        help="gateway processes (server.workers), sharing one cache in memory (the cache's host tier); "
        "default auto: a quarter of the cores, 1 to 8 (perf_analyzer and Triton's own threads need the rest); "
        "above 1 the gateway's counts come from its /metrics, summed over the workers",
    )  # fmt: skip
    p.add_argument(
        "--redis", action="store_true",
        help="give the gateway its shared cache tier (cache.redis_url) on a redis-server started here, emptied "
        "before each gateway run: what lets gateway replicas share what each computed (the workers of one "
        "gateway share the host tier without it)",
    )  # fmt: skip
    p.add_argument(
        "--instances", type=int, default=1,
        help="Triton instances, each with its own response cache (default 1). Above 1, each run has one "
        "perf_analyzer process per instance, sharing the concurrency, and client i sends requests i, i+N, ... "
        "of the sequence (as a round-robin balancer deals them): direct, to instance i; through the gateway, "
        "the same clients with the same requests, all to the gateway, which has every instance behind it",
    )  # fmt: skip
    p.add_argument(
        "--gateway-batching", action="append", default=[], metavar="KEY=VALUE",
        help="set one of the gateway's [batching] settings for its runs, over configs/local.toml's (repeatable; "
        "e.g. max_inflight_batches=4; the report's gateway line lists the settings in force)",
    )  # fmt: skip
    p.add_argument(
        "--rounds", type=int, default=3,
        help="measure every concurrency this many times, direct then the gateway each time, and judge the target "
        "on each concurrency's median ratio (default 3: one pair moves with the machine's other load)",
    )  # fmt: skip
    p.add_argument("--out", help="also write the report as markdown to this file")
    p.add_argument(
        "--base-port", type=int, default=8460,
        help="Triton instance i: HTTP/gRPC/metrics on base+i, base+100+i, base+200+i; gateway base+10; "
        "redis-server base+20",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        p.error("--concurrency must be comma-separated integers")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs positive integers")
    if args.requests < 100:
        p.error("--requests must be >= 100")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if not 0.0 <= args.repeat_share < 1.0:
        p.error("--repeat-share must be in [0, 1)")
    if args.zipf_s <= 0:
        p.error("--zipf-s must be > 0")
    if args.gateway_workers == "auto":
        args.gateway_workers = auto_workers(os.cpu_count() or 1)
    elif not args.gateway_workers.isdigit() or not 1 <= int(args.gateway_workers) <= 64:
        p.error("--gateway-workers must be auto or a number in 1..64")
    args.gateway_workers = int(args.gateway_workers)
    if args.hold_ms is not None and not 0 <= args.hold_ms < 1000:
        p.error("--hold-ms must be in [0, 1000)")
    if not 1 <= args.instances <= MAX_INSTANCES:
        p.error(f"--instances must be in 1..{MAX_INSTANCES}")
    if min(args.concurrency) < args.instances:
        p.error("--concurrency must be at least --instances: each instance's client needs one request in flight")
    try:
        args.gateway_batching = batching_overrides(args.gateway_batching, local_batching())
    except ValueError as exc:
        p.error(f"--gateway-batching: {exc}")
    return args


def batching_overrides(items: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """``KEY=VALUE`` items as [batching] settings: each KEY one of ``defaults``' (configs/local.toml's
    [batching]), each VALUE a TOML value of the same type (the gateway checks its range when it
    reads its config)."""
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(defaults))}")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise ValueError(f"{item!r}: {text.strip()!r} is not a TOML value") from None
        default = defaults[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(default), type(default).__name__)
            raise ValueError(f"{item!r}: {key} takes {kind}, like {toml_value(default)}")
        settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exe = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "perf/cache_bench.py"
    python = os.path.relpath(PYTHON, Path.cwd()) if PYTHON.exists() else sys.executable
    command = shlex.join([python, exe, *(sys.argv[1:] if argv is None else argv)])
    info = machine_info()
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so `finally` runs on SIGTERM too
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored

    base = args.base_port
    gw_port = base + 10
    redis_port = base + 20
    n = args.instances
    ports = (
        *(base + offset + i for offset in (0, 100, 200) for i in range(n)), gw_port, *((redis_port,) if args.redis else ())
    )
    busy = [p for p in ports if not port_free(p)]
    if busy:
        print(f"ports already in use: {busy} (pick another --base-port)", file=sys.stderr)
        return 2
    if args.redis and not os.access(REDIS_SERVER, os.X_OK):
        print(f"{REDIS_SERVER} is missing: run scripts/fetch_redis.sh", file=sys.stderr)
        return 2
    if not PERF_ANALYZER.exists():
        print(f"{PERF_ANALYZER} is missing: run triton/fetch_perf_analyzer.sh", file=sys.stderr)
        return 2
    others = other_perf_analyzers()
    if others:
        info["other perf_analyzer processes at start"] = str(len(others))
        print(f"warning: {len(others)} other perf_analyzer process(es) running (pids {others}): numbers will be low")

    workdir = Path(tempfile.mkdtemp(prefix="perf-cache-"))
    print(f"command: {command}\nlogs: {workdir}")
    workload = make_workload(args.model, args.requests, args.repeat_share, args.zipf_s, args.seed)
    print(f"workload: {workload.describe(args.zipf_s)}")
    repository = make_repository(workdir, args.model, args.hold_ms or 0.0)
    # Behind the gateway, Triton does not hold the gateway's batches again.
    behind = make_repository(workdir, args.model, name="models-behind") if args.hold_ms else repository
    batching = local_batching()
    if args.hold_ms is not None:
        # The gateway holds for max_queue_delay_ms at most: raise it to the hold where it is lower.
        batching["hold_ms"] = args.hold_ms
        batching["hold_cpu_busy"] = 0.0  # whatever the load, as Triton's queue delay
        batching["max_queue_delay_ms"] = max(float(batching.get("max_queue_delay_ms", 2.0)), args.hold_ms)
    batching.update(args.gateway_batching)
    ttl_s = 3600.0
    config_path = workdir / "gateway.toml"
    input_data = [workdir / f"input-data-{i}.json" for i in range(n)] if n > 1 else [workdir / "input-data.json"]
    runner = CacheRunner(args, workdir)
    runs: list[Run] = []
    checks: list[str] = []
    gateway: Proc | None = None
    redis_proc: Proc | None = None
    redis_url = f"redis://{HOST}:{redis_port}/0" if args.redis else ""
    triton = fleet.Fleet(
        repository, instances=n, base_http=base, base_grpc=base + 100, base_metrics=base + 200,
        model_control_mode="none", log_dir=workdir, cache_size=args.triton_cache_mb * 1024 * 1024,
    )  # fmt: skip
    triton_urls = triton.http_urls
    triton_url = triton_urls[0]
    gw_url = f"http://{HOST}:{gw_port}"
    interrupted = False
    error: str | None = None

    def start_gateway(name: str) -> Proc:
        proc = Proc(
            "gateway",
            [str(PYTHON), "-m", "gateway", "serve", "--config", str(config_path), "--log-level", "warning"],
            workdir / f"gateway-{name}.log",
        )
        wait_http_ok(proc, [f"{gw_url}/v2/health/ready", f"{gw_url}/v2/models/{args.model}"])
        return proc

    def stop_gateway() -> None:
        nonlocal gateway
        if gateway is not None:
            gateway.stop()
            gateway = None
        deadline = time.monotonic() + 10
        while not port_free(gw_port) and time.monotonic() < deadline:
            time.sleep(0.2)

    def cold_triton(target: str) -> None:
        triton.stop()  # every instance at once, then all started again: empty caches
        triton.repository = behind if target == GATEWAY else repository
        triton.start()
        triton.wait_ready(timeout=120)
        wait_http_ok(None, [f"{url}/v2/models/{args.model}/ready" for url in triton_urls], timeout=60)
        for url in triton_urls:
            warm_up(url, args.model, input_name, workload)

    def start_redis() -> Proc:
        proc = Proc(
            "redis",
            [str(REDIS_SERVER), "--port", str(redis_port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            workdir / "redis.log",
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not redis_answers(redis_port):
            if not proc.running() or time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError(f"redis-server did not start; log {proc.log_path}:\n{proc.tail(10)}")
            time.sleep(0.1)
        return proc

    def clients(target: str, c: int) -> list[Client]:
        """Client i sends its share of the sequence to instance i (direct) or to the gateway."""
        return [
            Client(gw_port if target == GATEWAY else base + i, share, input_data[i], len(workload.dealt(i, n)))
            for i, share in enumerate(split_concurrency(c, n))
        ]

    def measure(target: str, c: int, round_: int) -> Run:
        """One cold run; once more from cold if perf_analyzer found no stable measurement."""
        nonlocal gateway
        for attempt in range(1, ATTEMPTS + 1):
            stop_gateway()
            cold_triton(target)
            if target == GATEWAY:
                if redis_proc is not None:
                    with redis.Redis(host=HOST, port=redis_port, socket_timeout=5.0) as client:
                        client.flushall()  # cold: as empty as the gateway's own cache
                gateway = start_gateway(f"c{c}-{attempt}")
            before_up = fleet_counters(triton_urls, args.model)
            before_gw = gateway_counters(gw_url, args.model) if gateway else {}
            groups: dict[str, list[int]] = {"triton": [inst.pid for inst in triton.instances]}
            expected: int | None = args.requests
            if redis_proc is not None and target == GATEWAY:
                groups["redis"] = [redis_proc.popen.pid]
            if gateway is not None and args.gateway_workers > 1:
                # Each worker counts its own requests and a query reaches one of them: the traffic
                # starts with Triton's first answer (a cold cache's first request is a miss) and
                # ends when perf_analyzer exits.
                groups["gateway"] = [gateway.popen.pid]
                answered = lambda: fleet_counters(triton_urls, args.model).success  # noqa: E731
                expected = None
            elif gateway is not None:
                groups["gateway"] = [gateway.popen.pid]
                answered = lambda: sum(gateway_counters(gw_url, args.model).get(k, 0) for k in ("hits", "misses", "coalesced"))  # noqa: E731
            else:
                answered = lambda: fleet_counters(triton_urls, args.model).success  # noqa: E731
            clock = TrafficClock(runner, answered, groups, expected)
            clock.start()
            m = runner.run_clients(target, clients(target, c))
            clock.stop.set()
            clock.join()
            if clock.hung:
                m.error = f"perf_analyzer did not exit within {HANG_S:.0f} s of its last request's answer (stopped)"
                print(f"    {m.error}")
            run = Run(m, spans=runner.last_spans, opening=runner.last_opening, round=round_)
            clock.figures(run, runner.last_cpu_s)
            run.upstream = fleet_counters(triton_urls, args.model).minus(before_up)
            if gateway is None:
                run.requests, run.hits, run.misses = run.upstream.success, run.upstream.cache_hit, run.upstream.cache_miss
            elif args.gateway_workers > 1:
                # The gateway's /metrics, summed over its workers (a new gateway: from zero).
                counts = settled_counters(gw_url, args.model, m.requests or 0)
                run.hits, run.misses, run.coalesced = (counts.get(k, 0) for k in ("hits", "misses", "coalesced"))
                run.requests = run.hits + run.misses + run.coalesced
                if run.spans:
                    # The window ran until perf_analyzer exited (export written): the traffic's
                    # own duration is the exports', from the first request sent to the last answer.
                    run.wall_s = traffic_s(run.spans)
            else:
                after = gateway_counters(gw_url, args.model)
                delta = {k: after.get(k, 0) - before_gw.get(k, 0) for k in ("hits", "misses", "coalesced", "shared_hits")}
                run.hits, run.misses, run.coalesced = delta["hits"], delta["misses"], delta["coalesced"]
                run.requests = run.hits + run.misses + run.coalesced
            if gateway is not None and gateway.running():
                run.times = gateway_times(gw_url, args.model)  # a new gateway: this run's alone
                if args.gateway_workers > 1:
                    run.host = host_counters(gw_url)
            if gateway is not None:
                if m.error or not gateway.running():
                    print(f"    gateway log tail ({gateway.log_path}):\n" + indent(gateway.tail(20)))
                    if not gateway.running():
                        m.error = (m.error or "") + f" [gateway {exit_description(gateway.popen.returncode)}]"
            print(
                f"    {run.requests} requests ({run.requests / workload.requests:.0%} of the sequence) in "
                f"{run.wall_s:.1f} s after {run.load_s:.1f} s of perf_analyzer start-up, hit rate {pct(run.hit_rate)}; "
                "CPU µs/request: " + ", ".join(f"{k} {us(run.cpu_us_per_request(k))}" for k in run.cpu_s if k != OTHERS)
                + f"; other processes: {run.others_cores:.2f} core(s)"
            )
            retry = m.error and ("did not exit" in m.error or "timed out" in m.error)
            if not retry or attempt == ATTEMPTS:
                return run
            print("    once more, from cold")
        raise AssertionError("unreachable")

    try:
        where = f"{HOST}:{base}" + (f"-{base + n - 1}" if n > 1 else "")
        print(f"starting {n} Triton instance{'s' if n > 1 else ''} on {where} (response cache {args.triton_cache_mb} MiB each) ...", flush=True)
        triton.repository = behind  # the answer checks go through the gateway
        triton.start()
        triton.wait_ready(timeout=120)
        wait_http_ok(None, [f"{url}/v2/models/{args.model}/ready" for url in triton_urls], timeout=60)
        input_name, datatype, _ = model_io(triton_url, args.model)
        if datatype != "FP32":
            raise RuntimeError(f"{args.model}: input {input_name} is {datatype}, expected FP32")
        print(f"writing perf_analyzer's input data ({workload.requests} requests) ...", flush=True)
        for i, path in enumerate(input_data):
            write_input_data(path, workload, input_name, workload.dealt(i, n))
        # One worker for the answer checks: a repeat must reach the cache that saw the first.
        if args.redis:
            print(f"starting redis-server on {HOST}:{redis_port} (the gateway's shared tier) ...", flush=True)
            redis_proc = start_redis()
        config_path.write_text(gateway_toml(triton_urls, gw_port, batching, ttl_s, redis_url=redis_url))
        print(f"starting the gateway on {HOST}:{gw_port} (cache on) ...", flush=True)
        gateway = start_gateway("check")
        checks = check_answers(triton_url, gw_url, args.model, input_name, workload)
        print("answers checked:\n" + indent("\n".join(checks)))
        config_path.write_text(gateway_toml(triton_urls, gw_port, batching, ttl_s, args.gateway_workers, redis_url))
        for number in range(1, args.rounds + 1):
            if args.rounds > 1:
                print(f"round {number} of {args.rounds}", flush=True)
            for c in args.concurrency:
                runs.append(measure(DIRECT, c, number if args.rounds > 1 else 0))
                runs.append(measure(GATEWAY, c, number if args.rounds > 1 else 0))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping everything", file=sys.stderr)
    except Exception as exc:
        error = str(exc)
        traceback.print_exc()
        print(f"\nerror: {error}", file=sys.stderr)
    finally:
        stop_all(runner, [gateway, triton, redis_proc])

    if not runs:
        return 130 if interrupted else 1  # nothing measured: the error is printed above
    if (load := load_average()) is not None:
        info["load average (1/5/15 min) at end"] = load
    text, md, ok = render(args, command, info, workload, runs, checks, batching)
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
