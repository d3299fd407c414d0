"""``GET /metrics``: what the gateway already counts, in the Prometheus text format.

Two halves:

* ``InferCounts``, on the infer path: plain Python, no Prometheus client. Each answered infer
  request adds one to a row keyed by (model, version, status code, cache outcome): its latency
  bucket (found with ``bisect``) and its latency sum. Counts and histograms are derived from
  those rows when scraped; the cache outcome (``X-Cache``: hit, miss, coalesced, bypass; "" for
  a model without the cache, or an error) has a latency histogram of its own, so that an
  operator sees what a miss costs beside a hit. A request whose client disconnected before its
  answer is counted apart, under ``gateway_infer_client_disconnects_total``: it was not
  answered.
* ``GatewayCollector``, at scrape time only: reads the counters the components keep anyway,
  through the same snapshots the JSON views serve (``/v2/gateway/fleet``, ``/cache``,
  ``/rollout``, ``/repository``) so the two views cannot disagree, plus the batchers'
  counters and each rollout's canary share in force (``InferencePipeline.canary_share``: 0
  while no instance holds the canary), and yields metric families for a registry of the
  app's own (``build_registry``: never the process-wide default registry, so two apps in one
  process do not clash). With several worker processes, ``worker_metrics.WorkerSum`` wraps
  the collector, so that a scrape sums the workers' counters.

Labels come from what the fleet serves, never from what a client wrote alone: a request that
got no answer from a model version is counted under the model and version it named only where
the fleet's repository index holds them, else under "" (``fleet_labels``), so requests for
made-up names cannot create series without bound.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from gateway.handlers import Services
    from gateway.router import Router

__all__ = [
    "BUCKETS", "CONTENT_TYPE", "GatewayCollector", "InferCounts", "build_registry", "count_latency", "fleet_labels", "latency_row",
    "registry_of", "render",
]  # fmt: skip

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Upper bounds (seconds) of the infer latency buckets; the last bucket (+Inf) takes the rest.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SUM = len(BUCKETS) + 1  # a row: one count per bucket (+Inf included), then the latency sum


def latency_row() -> list[float]:
    """An empty row of latency bucket counts and sum (``count_latency`` fills it)."""
    return [0] * _SUM + [0.0]


def count_latency(row: list[float], seconds: float) -> None:
    row[bisect_left(BUCKETS, seconds)] += 1
    row[_SUM] += seconds


class InferCounts:
    """Infer requests answered, by (model, version, status code, cache outcome): a row of
    latency bucket counts (not cumulative) and the latency sum. ``record`` is the whole
    per-request cost."""

    __slots__ = ("rows", "disconnects")

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, int, str], list[float]] = {}
        self.disconnects: dict[str, int] = {}  # model -> requests whose client left unanswered

    def record(self, model: str, version: str, code: int, seconds: float, cache: str = "") -> None:
        """``cache``: where the answer came from (the ``X-Cache`` value), "" where the cache had
        no part in it."""
        key = (model, version, code, cache)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = latency_row()
        count_latency(row, seconds)

    def disconnected(self, model: str) -> None:
        self.disconnects[model] = self.disconnects.get(model, 0) + 1


def fleet_labels(router: Router, model: str, version: str) -> tuple[str, str]:
    """The (model, version) labels of a request that no version answered: each as named where
    some instance's repository index holds it (the version of that model), else ""."""
    known = False
    for instance in router.instances:
        versions = (instance.loaded or {}).get(model)
        if versions is not None:
            if version in versions:
                return model, version
            known = True
    return (model if known else ""), ""


def _add_row(rows: dict[tuple[str, ...], list[float]], key: tuple[str, ...], row: list[float]) -> None:
    total = rows.get(key)
    if total is None:
        total = rows[key] = latency_row()
    for i, value in enumerate(row):
        total[i] += value


def _histogram(name: str, doc: str, labels: list[str], rows: dict[tuple[str, ...], list[float]]) -> HistogramMetricFamily:
    """A histogram family from rows of ``InferCounts``' shape (per-bucket counts, then the sum)."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, row in sorted(rows.items()):
        cumulative, buckets = 0.0, []
        for bound, count in zip((*map(repr, BUCKETS), "+Inf"), row[:_SUM]):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric(list(key), buckets, row[_SUM])
    return family


def _bool(value: Any) -> float:
    return 1.0 if value else 0.0


# The host tier's counters of each worker's own view (``HostStore.stats``): key, metric name, help.
HOST_VIEW_COUNTERS = (
    ("stale", "stale", "Host tier entries found but not usable: expired, of a dropped version, overwritten or torn."),
    ("busy", "skipped_writes", "Writes to the host tier skipped because another worker was writing at that moment."),
    ("claims", "claims", "Keys claimed in the host tier, to compute each once for all the workers."),
    ("unclaimed", "unclaimed", "Keys computed without a claim: every slot of their claim bucket was taken, or the claims stayed busy."),
    (
        "gave_up",
        "claims_gave_up",
        "Claims not renewed or not ended because another worker held the claims' lock too long "
        "(such a claim lapses with its lease; the workers waiting for it then compute the key).",
    ),
)


# Host-wide batching's counters (``HostBatching``): attribute and metric name, help.
HOST_BATCH_COUNTERS = (
    ("forwarded", "Requests handed to the worker that batches their model version for the host ([batching] host_wide)."),
    ("served", "Requests batched for the other workers, for the model versions this worker batches for the host."),
    ("kept", "Requests meant for another worker's batcher but batched by their own worker (that worker unreachable or closing)."),
)


class GatewayCollector(Collector):
    """Reads the gateway's state at scrape time, on the event loop (so nothing changes while it
    reads); nothing here runs per request."""

    def __init__(self, counts: InferCounts, services: Services) -> None:
        self._counts = counts
        self._services = services

    def collect(self) -> Iterator[Metric]:
        yield from self._infer()
        yield from self._batchers()
        yield from self._instances()
        yield from self._cache()
        yield from self._rollouts()
        yield from self._repository()

    def _infer(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gateway_infer_requests",
            "Infer requests answered, by model, the version that served them (\"\" when none was "
            "resolved) and HTTP status code. Clients that disconnected first are not counted here.",
            labels=["model", "version", "code"],
        )
        cached = CounterMetricFamily(
            CACHE_ANSWERS,
            "Infer requests the gateway answered without Triton computing them for them (from its cache: hit; "
            "sharing an identical request's computation: coalesced), by model and the version whose answer it was; "
            "/v2/models/.../stats counts them as Triton counts its own cache hits.",
            labels=["model", "version", "cache"],
        )
        cached_seconds = CounterMetricFamily(
            CACHE_ANSWER_SECONDS,
            f"Arrival to answer, summed over the requests of {CACHE_ANSWERS}_total.",
            labels=["model", "version", "cache"],
        )
        answered: dict[tuple[str, str, str], float] = {}
        by_model: dict[tuple[str, ...], list[float]] = {}
        by_cache: dict[tuple[str, ...], list[float]] = {}
        for (model, version, code, cache), row in self._counts.rows.items():
            key = (model, version, str(code))
            answered[key] = answered.get(key, 0.0) + sum(row[:_SUM])
            _add_row(by_model, (model,), row)
            if cache:
                _add_row(by_cache, (model, cache), row)
            if code == 200 and cache in ("hit", "coalesced"):
                cached.add_metric([model, version, cache], sum(row[:_SUM]))
                cached_seconds.add_metric([model, version, cache], row[_SUM])
        for labels, n in answered.items():
            requests.add_metric(list(labels), n)
        yield requests
        yield cached
        yield cached_seconds
        yield _histogram(
            "gateway_infer_request_duration_seconds",
            "Time from an infer request's arrival to its answer sent, by model (every status code).",
            ["model"],
            by_model,
        )
        yield _histogram(
            "gateway_infer_cache_request_duration_seconds",
            "Time from arrival to answer of the infer requests of models with the response cache on, by model "
            "and where the answer came from (the X-Cache header: hit, miss, coalesced, bypass); errors are not counted here.",
            ["model", "cache"],
            by_cache,
        )
        gone = CounterMetricFamily(
            "gateway_infer_client_disconnects",
            "Infer requests whose client disconnected before the answer (not in gateway_infer_requests_total).",
            labels=["model"],
        )
        for model, n in sorted(self._counts.disconnects.items()):
            gone.add_metric([model], n)
        yield gone

    def _batchers(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        sent = CounterMetricFamily(
            "gateway_batcher_batches_sent", "Batches sent upstream and answered (a failed batch is not counted).", labels=labels
        )
        rows = CounterMetricFamily("gateway_batcher_rows_sent", "Rows of the batches counted in batches_sent.", labels=labels)
        queued = GaugeMetricFamily("gateway_batcher_queued_rows", "Rows waiting in the batcher's queue now.", labels=labels)
        inflight = GaugeMetricFamily("gateway_batcher_inflight_batches", "Batches in flight upstream now.", labels=labels)
        holding = GaugeMetricFamily(
            "gateway_batcher_holding",
            "1 while a batch with a free upstream slot waits for company (hold_ms applies now: requests come "
            "concurrently, and the host's CPUs are at least hold_cpu_busy busy); with several workers, how many hold.",
            labels=labels,
        )
        waits: dict[tuple[str, ...], list[float]] = {}
        for (model, version), batcher in sorted(self._services.pipeline.batchers.items()):
            key = [model, version]
            sent.add_metric(key, batcher.batches_sent)
            rows.add_metric(key, batcher.rows_sent)
            queued.add_metric(key, batcher.queued_rows)
            inflight.add_metric(key, batcher.inflight)
            holding.add_metric(key, float(batcher.holding))
            waits[(model, version)] = batcher.waits
        yield from (sent, rows, queued, inflight, holding)
        host_batch = self._services.pipeline.host_batch
        if host_batch is not None:
            for name, doc in HOST_BATCH_COUNTERS:
                yield CounterMetricFamily(f"gateway_batcher_host_{name}", doc, value=getattr(host_batch, name))
        cpu_busy = self._services.pipeline.cpu_busy
        busy = cpu_busy() if cpu_busy is not None else None
        if busy is not None:
            yield GaugeMetricFamily(
                "gateway_host_cpu_busy_ratio",
                "The share of the host's CPUs (those the gateway may run on) busy over the last half second, "
                "as the batching hold reads it (hold_cpu_busy).",
                value=busy,
            )
        yield _histogram(
            "gateway_batcher_queue_seconds",
            "Time requests waited in the batcher, from their arrival there until an instance took their batch: "
            "the batching hold, and any wait for a free upstream slot.",
            labels,
            waits,
        )

    def _instances(self) -> Iterator[Metric]:
        label = ["upstream"]  # not "instance": Prometheus keeps that label for the scraped gateway
        families = {
            "up": GaugeMetricFamily("gateway_instance_up", "1 when the instance is routable: live and not ejected.", labels=label),
            "ejected": GaugeMetricFamily("gateway_instance_ejected", "1 while the instance is ejected (outlier ejection).", labels=label),
            "ready": GaugeMetricFamily("gateway_instance_ready", "Triton's own readiness (shown only, not routed on).", labels=label),
            "weight": GaugeMetricFamily("gateway_instance_weight", "The instance's routing weight.", labels=label),
            "inflight": GaugeMetricFamily("gateway_instance_inflight_requests", "Upstream requests in flight now.", labels=label),
            "requests": CounterMetricFamily(
                "gateway_instance_requests", "Upstream infer requests (batches and lone requests) sent.", labels=label
            ),
            "failures": CounterMetricFamily(
                "gateway_instance_failures", "Failed upstream requests: no answer, a timeout, a 5xx, a refused connection.", labels=label
            ),
            "consecutive_failures": GaugeMetricFamily(
                "gateway_instance_consecutive_failures", "Failures since the last success (ejection counts these).", labels=label
            ),
            "ejections": CounterMetricFamily("gateway_instance_ejections", "Times the instance was ejected.", labels=label),
            "ejected_for_s": GaugeMetricFamily(
                "gateway_instance_ejection_remaining_seconds", "Time left of the current ejection (0 when not ejected).", labels=label
            ),
            "withheld": GaugeMetricFamily(
                "gateway_instance_withheld_versions",
                "Model versions loaded on the instance but not routed: warming up, draining, failed.",
                labels=label,
            ),
        }
        for view in self._services.router.snapshot():  # the /v2/gateway/fleet view
            url = [view["url"]]
            for key, family in families.items():
                if key == "up":
                    value = _bool(view["state"] == "up")
                elif key == "ejected":
                    value = _bool(view["state"] == "ejected")
                elif key == "withheld":
                    value = len(view["withheld"])
                else:
                    value = float(view[key])
                family.add_metric(url, value)
        yield from families.values()
        yield _histogram(
            "gateway_instance_request_duration_seconds",
            "Time of the upstream infer requests each instance answered with a result, from the gateway beginning to "
            "send one (a batch or a lone request; any wait for a free connection included) to its answer read and "
            "decoded: Triton's own time, the network, and the gateway's event loop getting to the answer.",
            label,
            {(i.url,): i.answer_times for i in self._services.router.instances},
        )

    def _cache(self) -> Iterator[Metric]:
        cache = self._services.pipeline.cache
        if cache is None:
            return
        view = cache.snapshot()  # the /v2/gateway/cache view
        label = ["model"]
        counters = {
            "hits": "Answers from the cache (this gateway's store, the shared tier, or stored answer bytes).",
            "raw_hits": "Hits answered with stored answer bytes, before any decoding (part of hits).",
            "misses": "Requests computed upstream and stored.",
            "coalesced": "Requests that shared an identical request's computation in flight.",
            "host_coalesced": "Requests that shared a computation in flight in another worker of this host (part of coalesced).",
            "shared_hits": "Hits from the shared tier (Redis).",
            "host_hits": "Hits from the store this host's workers share (part of hits).",
            "evictions": "Entries evicted to stay within the byte bounds.",
            "expired": "Entries dropped once past their TTL.",
        }
        families = {k: CounterMetricFamily(f"gateway_cache_{k}", doc, labels=label) for k, doc in counters.items()}
        families["bytes"] = GaugeMetricFamily("gateway_cache_bytes", "Bytes held in the store.", labels=label)
        families["entries"] = GaugeMetricFamily("gateway_cache_entries", "Entries held in the store.", labels=label)
        for model, stats in view["models"].items():
            for key, family in families.items():
                family.add_metric([model], stats[key])
        yield from families.values()
        yield GaugeMetricFamily("gateway_cache_max_bytes", "The store's byte bound (cache.max_bytes).", value=view["max_bytes"])
        yield GaugeMetricFamily("gateway_cache_in_flight", "Cache computations in flight now.", value=view["in_flight"])
        if "host" in view:
            host = view["host"]
            yield GaugeMetricFamily("gateway_cache_host_capacity_bytes", "Bytes of the host tier's log.", value=host["capacity"])
            yield CounterMetricFamily(
                "gateway_cache_host_written_bytes", "Bytes written to the host tier's log by all workers.", value=host["bytes_written"]
            )
            yield CounterMetricFamily(
                "gateway_cache_host_writes", "Entries written to the host tier by all workers.", value=host["writes"]
            )
            # This worker's own dealings with the tier (summed over the workers, as any counter).
            for key, name, doc in HOST_VIEW_COUNTERS:
                yield CounterMetricFamily(f"gateway_cache_host_{name}", doc, value=host[key])
        if "shared" in view:
            calls = CounterMetricFamily(
                "gateway_cache_shared_tier_calls",
                "Calls to the shared tier (Redis) by result: hits, misses, errors, timeouts, skipped (not sent).",
                labels=["result"],
            )
            for result, n in sorted(view["shared"].items()):
                calls.add_metric([result], n)
            yield calls

    def _rollouts(self) -> Iterator[Metric]:
        pipeline = self._services.pipeline
        view = pipeline.rollout_view()  # the /v2/gateway/rollout view
        both = ["model", "version"]
        share = GaugeMetricFamily(
            "gateway_rollout_traffic_share", "Share of the requests naming no version the rollout sends to each version.", labels=both
        )
        served = CounterMetricFamily("gateway_rollout_requests", "Requests the rollout sent to each version.", labels=both)
        status = GaugeMetricFamily(
            "gateway_rollout_status", "1 for the rollout's status: stable, canary, rolled_back or promoted.", labels=["model", "status"]
        )
        window = GaugeMetricFamily(
            "gateway_rollout_window_requests", "Requests in the version's rollback window (its last requests).", labels=both
        )
        errors = GaugeMetricFamily("gateway_rollout_window_error_ratio", "Error rate over the version's rollback window.", labels=both)
        p99 = GaugeMetricFamily("gateway_rollout_window_p99_seconds", "p99 latency over the version's rollback window.", labels=both)
        shadow_sent = CounterMetricFamily("gateway_rollout_shadow_requests", "Requests mirrored to the shadow version.", labels=both)
        shadow_failed = CounterMetricFamily("gateway_rollout_shadow_failures", "Mirrored requests that failed.", labels=both)
        shadow_compared = CounterMetricFamily(
            "gateway_rollout_shadow_compared", "Shadow answers compared with the answers clients got.", labels=both
        )
        for model, state in view["models"].items():
            stable, canary = state["stable"], state["canary"]
            canary_share = state["canary_share_in_force"]  # as requests are routed now
            share.add_metric([model, stable], 1.0 - canary_share)
            if canary and canary != stable:
                share.add_metric([model, canary], canary_share)
            for name in ("stable", "canary", "rolled_back", "promoted"):
                status.add_metric([model, name], _bool(state["status"] == name))
            for version, n in state["served"].items():
                served.add_metric([model, version], n)
            for version, w in state["windows"].items():
                window.add_metric([model, version], w["requests"])
                errors.add_metric([model, version], w["error_rate"])
                p99.add_metric([model, version], w["p99_ms"] / 1000)
            shadow = state["shadow"]
            if shadow is not None:
                key = [model, shadow["version"]]
                shadow_sent.add_metric(key, shadow["sent"])
                shadow_failed.add_metric(key, shadow["failed"])
                shadow_compared.add_metric(key, shadow["compared"])
        yield from (share, served, status, window, errors, p99, shadow_sent, shadow_failed, shadow_compared)
        yield GaugeMetricFamily(
            "gateway_rollout_file_error", "1 while the rollout file on disk is rejected (the rollout in force stays).",
            value=_bool(view["error"]),
        )  # fmt: skip

    def _repository(self) -> Iterator[Metric]:
        sync = self._services.repository
        if sync is None:
            return
        view = sync.snapshot()  # the /v2/gateway/repository view
        label = ["model"]
        failed = GaugeMetricFamily(
            "gateway_repository_failed_versions", "Versions that failed to load or warm up (not retried until their files change).",
            labels=label,
        )  # fmt: skip
        config_error = GaugeMetricFamily(
            "gateway_repository_config_error", "1 while the model's config.pbtxt does not parse or Triton refuses it.", labels=label
        )
        on_disk = GaugeMetricFamily("gateway_repository_versions_on_disk", "Versions in the model's folder.", labels=label)
        serving = GaugeMetricFamily("gateway_repository_versions_serving", "Versions the sync loads and serves.", labels=label)
        for model, state in view["models"].items():
            failed.add_metric([model], len(state["failed"]))
            config_error.add_metric([model], _bool(state["config_error"]))
            on_disk.add_metric([model], len(state["on_disk"]))
            serving.add_metric([model], len(state["serving"]))
        yield from (failed, config_error, on_disk, serving)
        yield GaugeMetricFamily("gateway_repository_scan_error", "1 while the repository folder cannot be read.", value=_bool(view["scan_error"]))


def build_registry(counts: InferCounts, services: Services) -> CollectorRegistry:
    """A registry of the app's own with the gateway's collector on it."""
    return registry_of(GatewayCollector(counts, services))


CACHE_ANSWERS = "gateway_infer_cache_answers"
CACHE_ANSWER_SECONDS = "gateway_infer_cache_answer_seconds"


def cache_answers(registry: CollectorRegistry) -> dict[tuple[str, str], tuple[float, float]]:
    """The requests answered without a computation of their own, by (model, version): their
    count and their seconds from arrival to answer, summed over the worker processes (the
    registry's counters are)."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for family in registry.collect():
        if family.name not in (CACHE_ANSWERS, CACHE_ANSWER_SECONDS):
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            key = (sample.labels["model"], sample.labels["version"])
            count, seconds = out.get(key, (0.0, 0.0))
            if family.name == CACHE_ANSWERS:
                count += sample.value
            else:
                seconds += sample.value
            out[key] = (count, seconds)
    return out


def registry_of(collector: Collector) -> CollectorRegistry:
    """A registry of the app's own with ``collector`` on it."""
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (``CONTENT_TYPE``)."""
    return generate_latest(registry)

