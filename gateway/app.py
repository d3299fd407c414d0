"""build_app(config): routes and the lifespan that owns every background task. Wiring only."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from gateway import handlers
from gateway.cache import build_cache
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.host_batch import HostBatching
from gateway.host_cpu import HostCpu
from gateway.infer_endpoint import InferEndpoint
from gateway.instances import EjectionPolicy
from gateway.metrics import GatewayCollector, InferCounts, registry_of
from gateway.pipeline import InferencePipeline
from gateway.rollout import Rollouts
from gateway.rollout_workers import shared_decisions
from gateway.router import Router, read_timeout_for
from gateway.upstream.client import TritonClient
from gateway.upstream.fleet import FleetMonitor
from gateway.upstream.repository import GrpcControl, RepositorySync
from gateway.upstream.repository_workers import WorkerRepository, worker_repository
from gateway.upstream.metadata import WARM_S, MetadataCache
from gateway.worker_metrics import summing

log = logging.getLogger(__name__)


def routes() -> list[Route]:
    models = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    table = [
        Route("/v2", handlers.server_metadata, methods=["GET"]),
        Route("/v2/health/live", handlers.live, methods=["GET"]),
        Route("/v2/health/ready", handlers.ready, methods=["GET"]),
        Route("/v2/models/stats", handlers.model_stats, methods=["GET"]),
        Route("/v2/gateway/fleet", handlers.fleet, methods=["GET"]),
        Route("/v2/gateway/cache", handlers.cache, methods=["GET"]),
        Route("/v2/gateway/rollout", handlers.rollout, methods=["GET"]),
        Route("/v2/gateway/rollout/{model}", handlers.rollout_action, methods=["POST"]),
        Route("/v2/gateway/repository", handlers.repository, methods=["GET"]),
        Route("/v2/repository/index", handlers.repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", handlers.model_control, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", handlers.model_control, methods=["POST"]),
        Route("/metrics", handlers.metrics, methods=["GET"]),
    ]
    for base in (models, versioned):
        table += [
            Route(base, handlers.model_metadata, methods=["GET"]),
            Route(base + "/config", handlers.model_config, methods=["GET"]),
            Route(base + "/ready", handlers.model_ready, methods=["GET"]),
            Route(base + "/stats", handlers.model_stats, methods=["GET"]),
        ]
    return table


async def watch_rollouts(rollouts: Rollouts, interval: float) -> None:
    """Apply the rollout file's changes as they come (a bad file keeps the rollout in force)."""
    while rollouts.path is not None:
        await asyncio.sleep(interval)
        try:
            rollouts.reload_if_changed()
        except Exception:
            log.exception("rollout reload failed")


# Container allocations between young-generation collections (CPython's default is 700). An
# infer request allocates a few dozen short-lived containers; at the default, a collection runs
# every few requests and re-walks every request still in flight.
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Once start-up is done: what it built lives as long as the process, so move it out of the
    cyclic collector's sight (``gc.freeze``), and collect young objects less often. The
    collector stays on; it just stops re-walking the same long-lived objects."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def build_app(config: GatewayConfig, cache_segment: str = "", workers_folder: str = "") -> InferEndpoint:
    """The ASGI app: infer requests are answered by InferEndpoint, the rest by Starlette.
    For a worker process: ``cache_segment``, the shared-memory file of the cache's host tier;
    ``workers_folder``, where the workers publish their metrics to sum them (worker_metrics.py),
    share the driving of the repository (upstream/repository_workers.py) and their rollout
    decisions (rollout_workers.py)."""
    counts = InferCounts()  # the infer route counts its answers; /metrics reads them

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        u = config.upstream
        client = TritonClient(u)
        await client.start()
        router = Router(
            [],
            client,
            max_tries=u.max_tries,
            max_inflight_per_instance=u.max_inflight_per_instance,
            attempt_timeout=u.request_timeout_s,
            read_timeout=read_timeout_for(u.request_timeout_s, u.health_timeout_s),
            ejection=EjectionPolicy(u.eject_after_failures, u.eject_base_s, u.eject_max_s, u.max_ejected_share),
            active_request_bias=u.active_request_bias,
        )
        # How long the other workers wait for one worker's computation of a key (while that
        # worker lives), or for the worker batching a model for them (host_wide): its tries,
        # each bounded, and room for queueing; then they compute the key, or fail the request.
        claim_s = u.max_tries * u.request_timeout_s + u.connect_timeout_s + 10.0
        cache = build_cache(config.cache, cache_segment, claim_s)
        monitor = FleetMonitor(
            u, client, router, on_version_gone=cache.drop_version if cache else None, watch_reloads=cache is not None
        )
        await monitor.start()
        sync: RepositorySync | WorkerRepository | None = None
        if config.repository.path:

            def repository_sync(peers: WorkerRepository | None = None) -> RepositorySync:
                control = GrpcControl(config.repository.load_timeout_s)
                on_reloaded = cache.drop_version if cache else None
                return RepositorySync(config.repository, router, control, on_version_reloaded=on_reloaded, peers=peers)

            # With several workers, one drives loading and the others follow it.
            shared = worker_repository(workers_folder, config.repository, router, repository_sync) if workers_folder else None
            sync = shared or repository_sync()
            await sync.start()  # the repository is loaded before the gateway takes traffic
        kept = Path(workers_folder) / "rollout" / "in-force.toml" if workers_folder else None
        rollouts = Rollouts.from_file(Path(config.rollout.file), kept=kept) if config.rollout.file else Rollouts()
        pipeline = InferencePipeline(
            config.batching, router, MetadataCache(router, u.metadata_ttl_s), cache=cache, rollouts=rollouts,
            cpu_busy=HostCpu().busy,
        )  # fmt: skip
        host_wide = bool(workers_folder) and config.batching.host_wide_anywhere
        host_batch = HostBatching(workers_folder, pipeline.batched, claim_s) if host_wide else None
        if host_batch is not None and not await host_batch.start():
            host_batch = None  # logged: this worker batches its own requests
        pipeline.host_batch = host_batch
        decisions = shared_decisions(workers_folder, rollouts) if workers_folder else None
        pipeline.observe_fleet()  # the versions serving now are the rollout defaults' stable ones
        metadata = pipeline.metadata
        await metadata.warm(router.served(), WARM_S)  # the first requests find it known

        def on_round() -> None:
            pipeline.observe_fleet()
            metadata.prefetch(router.served())  # a version new to the fleet: known before it is asked for

        monitor.on_round = on_round
        settle_heap()
        app.state.services = handlers.Services(router, pipeline, sync)
        collector = GatewayCollector(counts, app.state.services)
        summed = summing(collector, workers_folder) if workers_folder else None
        app.state.metrics = registry_of(summed or collector)
        app.state.admin_token = config.rollout.admin_token
        health = asyncio.create_task(monitor.run())
        watcher = asyncio.create_task(watch_rollouts(rollouts, config.rollout.reload_interval_s))
        background = [health, watcher]
        syncing = asyncio.create_task(sync.run()) if sync is not None else None
        if summed is not None:
            background.append(asyncio.create_task(summed.run()))
        if decisions is not None:
            background.append(asyncio.create_task(decisions.run()))
        try:
            yield
        finally:
            # Ordered shutdown: no more loading (nor, in a worker, taking the driving over from
            # one that stopped first); queued batches drain (bounded); background work; sockets.
            if syncing is not None:
                syncing.cancel()
                background.append(syncing)
            if host_batch is not None:
                host_batch.begin_close()  # the other workers batch their requests themselves now
            await pipeline.close(config.server.shutdown_grace_s)
            if host_batch is not None:
                await host_batch.close()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if sync is not None:
                await sync.close()
            if cache is not None:
                await cache.close()
            await client.close()
            if summed is not None:
                summed.close()  # after the last answers: they stay counted

    starlette = Starlette(
        routes=routes(),
        lifespan=lifespan,
        exception_handlers={
            GatewayError: handlers.error_response,
            HTTPException: handlers.error_response,
            Exception: handlers.error_response,  # a bug: logged, answered 500
        },
    )
    # A path with a trailing slash is not another name for the path without it (Triton answers
    # it 404, as here): no redirect, which a client would follow with its POST body or not at all.
    starlette.router.redirect_slashes = False
    server = config.server
    return InferEndpoint(
        starlette, server.max_body_bytes, counts, read_timeout_s=server.read_timeout_s, max_header_bytes=server.max_header_bytes
    )
