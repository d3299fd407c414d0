"""``/metrics`` summed over the gateway's worker processes (``server.workers`` > 1).

Each worker counts what it answers; a scrape reaches one of them (they share the port). Read
alone, a worker's counters would jump between workers' totals from one scrape to the next,
which Prometheus takes for resets. So every worker publishes its metric families to a file of
its own in the folder the serving command makes for them (``host_files.create_workers_folder``),
every ``PUBLISH_S`` and when it stops, and a scrape answers with:

* **counters and histograms summed over every worker's file**, its own published first (at
  the scrape, so it is current; the others' as they last published, at most ``PUBLISH_S``
  ago). A worker that exited leaves its file, so a worker replaced by a new process takes
  nothing away: each series only grows for as long as the gateway runs, whichever worker
  answers each scrape (each worker's own file only ever grows, and the one that answers has
  just written its own);
* the gauges that add up across workers (rows queued, batches and requests in flight, bytes
  and entries in the workers' own cache stores) summed over the workers still running;
* every other gauge (an instance's health, a rollout's state, ...) as the answering worker
  sees it: each worker judges those for itself, and they agree within a health interval;
* what the host already shares (the cache's host tier) once, as the answering worker reads it;
* ``gateway_metrics_worker_processes``: the workers whose counters the answer sums.

The JSON views (``/v2/gateway/...``) stay one worker's own (the cache view names its ``pid``).

Liveness, as for the cache's host tier (``host_files.py``): the serving command holds a shared
``flock`` on the folder's ``held`` file and so does every worker; a folder nobody holds (its
server was killed) is removed at the next start, and a worker's file counts as running while its
worker holds a lock on the file beside it (``<pid>.lock``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.host_files import HELD, claim, held_exclusively, hold, publish_every, replace_file

log = logging.getLogger(__name__)

PUBLISH_S = 1.0

# Gauges that add up across workers: each worker's is its share of the host's total.
SUMMED_GAUGES = frozenset(
    {
        "gateway_batcher_queued_rows",
        "gateway_batcher_inflight_batches",
        "gateway_batcher_holding",  # summed: the workers whose batcher holds now
        "gateway_instance_inflight_requests",
        "gateway_cache_bytes",
        "gateway_cache_entries",
        "gateway_cache_in_flight",
    }
)
# Counters every worker reads from the same place already (the host tier): counted once.
HOST_WIDE = frozenset({"gateway_cache_host_written_bytes", "gateway_cache_host_writes"})
_SUMMED_TYPES = ("counter", "histogram", "summary")


def _to_json(families: Iterable[Metric]) -> bytes:
    return orjson.dumps(
        [
            {"name": f.name, "doc": f.documentation, "type": f.type, "unit": f.unit, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
            for f in families
        ]
    )


class WorkerSum(Collector):
    """Wraps the worker's own collector: ``publish`` writes its families to the worker's file;
    ``collect`` answers a scrape with every worker's (see the module's docstring)."""

    def __init__(self, own: Collector, folder: str | Path, name: str | None = None) -> None:
        self._own = own
        self._folder = Path(folder)
        self._path = self._folder / f"{name or os.getpid()}.json"
        self._warned: set[str] = set()
        self._held = hold(self._folder / HELD)  # the folder is in use while this worker runs
        try:
            # Beside its file (which each publish replaces), one the worker holds locked while
            # it runs (``host_files.held_exclusively``).
            self._lock = claim(self._path.with_suffix(".lock"))
        except BaseException:
            os.close(self._held)
            raise

    def publish(self) -> list[Metric]:
        """Write the worker's families to its file (replaced in one step) and return them."""
        families = list(self._own.collect())
        replace_file(self._path, _to_json(families))
        return families

    async def run(self, interval: float = PUBLISH_S) -> None:
        """Publish every ``interval`` seconds, so that a worker no scrape reaches is counted."""
        await publish_every(interval, self.publish, "this worker's metrics")

    def _others(self) -> Iterator[tuple[list[dict[str, Any]], bool]]:
        """(families, still running) of every other worker's file."""
        for path in sorted(self._folder.glob("*.json")):
            if path == self._path:
                continue
            try:
                families = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError) as exc:
                if path.name not in self._warned:
                    self._warned.add(path.name)
                    log.warning("ignoring the metrics in %s: %s", path, exc)
                continue
            yield families, held_exclusively(path.with_suffix(".lock"))

    def collect(self) -> Iterator[Metric]:
        try:
            own = self.publish()
        except OSError as exc:  # answered with this worker's own counts, and said so
            log.warning("could not publish this worker's metrics: %s", exc)
            own = list(self._own.collect())
        yield from merge(own, self._others())

    def close(self) -> None:
        """A last publish (what this worker answered stays counted), then let go of the folder."""
        with contextlib.suppress(OSError):
            self.publish()
        for fd in (self._lock, self._held):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._lock = self._held = -1


def summing(own: Collector, folder: str | Path) -> WorkerSum | None:
    """A ``WorkerSum`` over ``own`` publishing in ``folder``, or None where the folder cannot
    be used (logged: the worker's /metrics then counts that worker alone)."""
    try:
        return WorkerSum(own, folder)
    except OSError as exc:
        log.error("/metrics counts this worker alone: %s", exc)
        return None


def _summed(name: str, kind: str, running: bool) -> bool:
    """Whether another worker's samples of a family are added to the answering worker's."""
    if name in HOST_WIDE:
        return False
    if kind in _SUMMED_TYPES:
        return True
    return running and kind == "gauge" and name in SUMMED_GAUGES


def merge(own: list[Metric], others: Iterable[tuple[list[dict[str, Any]], bool]]) -> Iterator[Metric]:
    """``own`` (the answering worker's families) with the other workers' added where
    ``_summed`` says; the worker count last."""
    order: list[str] = []
    kinds: dict[str, tuple[str, str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    labels: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, str]] = {}

    def add(name: str, meta: tuple[str, str, str], samples: Iterable[tuple[str, dict[str, str], float]]) -> None:
        if name not in values:
            order.append(name)
            kinds[name] = meta
            values[name] = {}
        series = values[name]
        for sample_name, sample_labels, value in samples:
            key = (sample_name, tuple(sorted(sample_labels.items())))
            labels.setdefault(key, sample_labels)
            series[key] = series.get(key, 0.0) + value

    for f in own:
        add(f.name, (f.documentation, f.type, f.unit), ((s.name, s.labels, s.value) for s in f.samples))
    workers = 1
    for families, running in others:
        workers += 1
        for f in families:
            if _summed(f["name"], f["type"], running):
                add(f["name"], (f["doc"], f["type"], f["unit"]), f["samples"])
    for name in order:
        doc, kind, unit = kinds[name]
        family = Metric(name, doc, kind, unit)
        for key, value in values[name].items():
            family.add_sample(key[0], labels[key], value)
        yield family
    yield GaugeMetricFamily(
        "gateway_metrics_worker_processes",
        "Worker processes whose counters this answer sums (those that exited included).",
        value=workers,
    )
