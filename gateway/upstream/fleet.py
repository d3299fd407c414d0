"""Active health checks: each instance's ``/v2/health/live``, polled in the background.

Liveness, not ``/v2/health/ready``: Triton reports itself not ready while it loads a new model
version (poll mode), although it goes on serving the versions already loaded. Probing readiness
would take every instance out of routing at once during a rollout. An instance that answers that
it does not hold a model version is retried elsewhere by the router.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.router import Instance
from gateway.upstream.client import TritonClient

log = logging.getLogger(__name__)


async def probe(client: TritonClient, instance: Instance, timeout: float) -> None:
    try:
        ready = (await client.get(instance.url, "/v2/health/live", timeout)).status == 200
    except Exception:  # whatever the instance (or whatever answers on its port) does, it is not up
        ready = False
    if ready != instance.healthy:
        log.warning("instance %s is now %s", instance.url, "up" if ready else "DOWN")
    instance.healthy = ready


async def check_all(client: TritonClient, instances: list[Instance], timeout: float) -> None:
    await asyncio.gather(*(probe(client, i, timeout) for i in instances))


async def health_loop(client: TritonClient, instances: list[Instance], interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await check_all(client, instances, timeout=max(interval, 0.5))
        except Exception:  # the loop must outlive any one round: it is what re-admits instances
            log.exception("health check round failed")
