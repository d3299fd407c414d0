"""/metrics summed over worker processes (gateway/worker_metrics.py): workers are ``WorkerSum``s
over collectors whose counts the tests set, sharing one real folder; the answers are parsed
back with prometheus_client's own parser."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.host_files import HELD, WORKERS_PREFIX, create_workers_folder, sweep_workers_folders
from gateway.metrics import InferCounts, registry_of
from gateway.worker_metrics import WorkerSum, summing


class Counts(Collector):
    """One worker's state: what its collector reports."""

    def __init__(self, requests: float = 0, queued: float = 0, up: float = 1, host_writes: float = 0) -> None:
        self.requests, self.queued, self.up, self.host_writes = requests, queued, up, host_writes
        self.latencies: list[float] = []

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("gateway_infer_requests", "answered", labels=["model", "code"])
        c.add_metric(["m", "200"], self.requests)
        yield c
        h = HistogramMetricFamily("gateway_infer_request_duration_seconds", "latency", labels=["model"])
        fast = sum(1 for s in self.latencies if s <= 0.01)
        h.add_metric(["m"], [("0.01", fast), ("+Inf", len(self.latencies))], sum(self.latencies))
        yield h
        q = GaugeMetricFamily("gateway_batcher_queued_rows", "queued", labels=["model", "version"])
        q.add_metric(["m", "1"], self.queued)
        yield q
        yield GaugeMetricFamily("gateway_instance_up", "up", value=self.up)
        yield CounterMetricFamily("gateway_cache_host_writes", "host-wide", value=self.host_writes)


def scrape(worker: WorkerSum) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry_of(worker)).decode()
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def val(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    made = create_workers_folder(str(tmp_path))
    yield made.path
    made.remove()


def test_counters_and_histograms_add_up_over_workers_other_gauges_are_the_answering_workers(folder: Path) -> None:
    a, b = Counts(requests=3, queued=2, up=1, host_writes=7), Counts(requests=5, queued=4, up=0, host_writes=7)
    a.latencies, b.latencies = [0.001, 0.5], [0.002]
    wa, wb = WorkerSum(a, folder, "a"), WorkerSum(b, folder, "b")
    wb.publish()
    parsed = scrape(wa)
    assert val(parsed, "gateway_infer_requests_total", model="m", code="200") == 8
    assert val(parsed, "gateway_infer_request_duration_seconds_bucket", model="m", le="0.01") == 2
    assert val(parsed, "gateway_infer_request_duration_seconds_bucket", model="m", le="+Inf") == 3
    assert val(parsed, "gateway_infer_request_duration_seconds_count", model="m") == 3
    assert val(parsed, "gateway_infer_request_duration_seconds_sum", model="m") == pytest.approx(0.503)
    assert val(parsed, "gateway_batcher_queued_rows", model="m", version="1") == 6  # adds up
    assert val(parsed, "gateway_instance_up") == 1  # a's own view
    assert val(parsed, "gateway_cache_host_writes_total") == 7  # already host-wide: once
    assert val(parsed, "gateway_metrics_worker_processes") == 2
    assert val(scrape(wb), "gateway_instance_up") == 0  # b's own view, the same sums
    assert val(scrape(wb), "gateway_infer_requests_total", model="m", code="200") == 8


def test_series_only_one_worker_has_are_summed_in(folder: Path) -> None:
    class Other(Counts):
        def collect(self) -> Iterator[Metric]:
            c = CounterMetricFamily("gateway_infer_requests", "answered", labels=["model", "code"])
            c.add_metric(["m", "404"], 2)
            yield c
            yield CounterMetricFamily("gateway_cache_misses", "misses", value=4)

    wa, wb = WorkerSum(Counts(requests=1), folder, "a"), WorkerSum(Other(), folder, "b")
    wb.publish()
    parsed = scrape(wa)
    assert val(parsed, "gateway_infer_requests_total", model="m", code="200") == 1
    assert val(parsed, "gateway_infer_requests_total", model="m", code="404") == 2
    assert val(parsed, "gateway_cache_misses_total") == 4


def test_counters_never_go_back_whichever_worker_answers(folder: Path) -> None:
    """Each scrape reaches either worker; one of them publishes only when scraped (no timer
    here): the sum still only grows, scrape after scrape."""
    a, b = Counts(), Counts()
    wa, wb = WorkerSum(a, folder, "a"), WorkerSum(b, folder, "b")
    seen, published = [], {}
    for i, answering in enumerate([wa, wb, wb, wa, wb, wa, wa, wb]):
        a.requests += i % 3
        b.requests += 2
        seen.append(val(scrape(answering), "gateway_infer_requests_total", model="m", code="200"))
        published[answering] = a.requests if answering is wa else b.requests
    assert seen == sorted(seen) and len(set(seen)) > 4
    assert seen[-1] == published[wa] + b.requests < a.requests + b.requests  # a's as it last published


def test_a_worker_that_exited_keeps_its_counts_but_not_its_gauges(folder: Path) -> None:
    a, b = Counts(requests=3, queued=2), Counts(requests=5, queued=4)
    wa, wb = WorkerSum(a, folder, "a"), WorkerSum(b, folder, "b")
    b.requests = 6  # answered after its last timer publish: the close publishes it
    wb.close()
    parsed = scrape(wa)
    assert val(parsed, "gateway_infer_requests_total", model="m", code="200") == 9
    assert val(parsed, "gateway_batcher_queued_rows", model="m", version="1") == 2  # b's queue is gone
    assert val(parsed, "gateway_metrics_worker_processes") == 2


def test_a_worker_in_another_process_counts_as_running_until_it_exits(folder: Path) -> None:
    """Liveness is the lock the worker's process holds, not anything it wrote."""
    script = (
        "import sys; from gateway.worker_metrics import WorkerSum; from prometheus_client.core import GaugeMetricFamily\n"
        "class C:\n"
        "    def collect(self):\n"
        "        yield GaugeMetricFamily('gateway_batcher_queued_rows', 'q', value=5)\n"
        f"w = WorkerSum(C(), {str(folder)!r}, 'child'); w.publish(); print('ready', flush=True); sys.stdin.read()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        wa = WorkerSum(Counts(queued=1), folder, "a")
        assert val(scrape(wa), "gateway_batcher_queued_rows") == 5  # the child's, summed (no labels: its own series)
        assert val(scrape(wa), "gateway_batcher_queued_rows", model="m", version="1") == 1
    finally:
        child.communicate("", timeout=30)
    parsed = scrape(wa)
    assert ("gateway_batcher_queued_rows", frozenset()) not in parsed  # exited: its gauge is gone
    assert val(parsed, "gateway_metrics_worker_processes") == 2


def test_a_damaged_file_is_skipped_and_said_once(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    wa = WorkerSum(Counts(requests=3), folder, "a")
    (folder / "broken.json").write_bytes(b"[{not json")
    with caplog.at_level(logging.WARNING, logger="gateway.worker_metrics"):
        first, second = scrape(wa), scrape(wa)
    assert val(first, "gateway_infer_requests_total", model="m", code="200") == 3 == val(second, "gateway_infer_requests_total", model="m", code="200")
    assert sum("broken.json" in r.getMessage() for r in caplog.records) == 1


def test_the_real_collector_of_two_workers_sums(folder: Path) -> None:
    from gateway.metrics import GatewayCollector
    from test_metrics import empty_services

    one, two = InferCounts(), InferCounts()
    for counts, n in ((one, 3), (two, 4)):
        for _ in range(n):
            counts.record("m", "1", 200, 0.002)
    wa = WorkerSum(GatewayCollector(one, empty_services()), folder, "a")
    WorkerSum(GatewayCollector(two, empty_services()), folder, "b").publish()
    parsed = scrape(wa)
    assert val(parsed, "gateway_infer_requests_total", model="m", version="1", code="200") == 7
    assert val(parsed, "gateway_infer_request_duration_seconds_count", model="m") == 7


def test_cache_answers_for_the_stats_are_summed_over_the_workers(folder: Path) -> None:
    from gateway.metrics import GatewayCollector, cache_answers, registry_of
    from test_metrics import empty_services

    one, two = InferCounts(), InferCounts()
    for counts, n in ((one, 3), (two, 4)):
        for _ in range(n):
            counts.record("m", "1", 200, 0.002, "hit")
    wa = WorkerSum(GatewayCollector(one, empty_services()), folder, "a")
    WorkerSum(GatewayCollector(two, empty_services()), folder, "b").publish()
    count, seconds = cache_answers(registry_of(wa))[("m", "1")]
    assert count == 7 and abs(seconds - 0.014) < 1e-9


def test_a_folder_nobody_holds_is_swept_at_the_next_start_a_held_one_stays(tmp_path: Path) -> None:
    left = create_workers_folder(str(tmp_path))
    WorkerSum(Counts(), left.path, "a").close()
    os.close(left._fd)  # its server was killed: nobody holds it now
    left._fd = -1
    held = create_workers_folder(str(tmp_path))
    worker = WorkerSum(Counts(), held.path, "w")
    os.close(held._fd)  # the server was killed, but a worker still runs
    held._fd = -1
    new = create_workers_folder(str(tmp_path))
    try:
        assert not left.path.exists()
        assert held.path.exists() and (held.path / HELD).exists()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(WORKERS_PREFIX)) == sorted([held.path.name, new.path.name])
    finally:
        worker.close()
        new.remove()
    sweep_workers_folders(tmp_path)
    assert not held.path.exists()


def test_a_folder_the_worker_cannot_use_leaves_it_counting_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway.worker_metrics"):
        assert summing(Counts(), tmp_path / "missing") is None
    assert "counts this worker alone" in caplog.text


def test_the_serving_command_makes_the_folder_and_removes_it(tmp_path: Path) -> None:
    made = create_workers_folder(str(tmp_path))
    assert made.path.is_dir() and made.path.name.startswith(f"{WORKERS_PREFIX}{os.getpid()}-")
    made.remove()
    assert not made.path.exists()
    made.remove()  # twice: nothing
