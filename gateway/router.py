"""Choosing a Triton instance for each upstream request, and retrying on another one.

The choice is weighted least-outstanding: among healthy instances, the one with the fewest
requests in flight per unit of weight. A failed connect marks the instance unhealthy until the
health checker sees it up again. The request is retried once on another instance when no answer
came (refused, connection dropped) or when the instance says it does not hold the model version.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gateway.batcher import BatchResult
from gateway.config import InstanceConfig
from gateway.errors import GatewayTimeout, Unavailable, UpstreamError, missing_model
from gateway.tensors import Tensor
from gateway.upstream.client import InstanceUnreachable, RawResponse, TritonClient


@dataclass(slots=True, eq=False)
class Instance:
    url: str
    weight: float = 1.0
    healthy: bool = True
    outstanding: int = 0
    requests: int = 0
    failures: int = 0

    @classmethod
    def from_config(cls, config: InstanceConfig) -> Instance:
        return cls(url=config.url, weight=config.weight)


class Router:
    def __init__(
        self,
        instances: Iterable[Instance],
        client: TritonClient,
        clock: Callable[[], float] = time.monotonic,
        max_tries: int = 2,
    ) -> None:
        self.instances = list(instances)
        self._client = client
        self._clock = clock
        self._max_tries = max_tries

    def pick(self, exclude: Iterable[Instance] = ()) -> Instance:
        skip = set(map(id, exclude))
        candidates = [i for i in self.instances if i.healthy and id(i) not in skip]
        if not candidates:
            raise Unavailable("no healthy Triton instance is available")
        return min(candidates, key=lambda i: (i.outstanding + 1) / i.weight)

    def _remaining(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise GatewayTimeout("deadline passed before the request could be sent upstream")
        return remaining

    async def infer(
        self,
        model: str,
        version: str,
        inputs: list[Tensor],
        parameters: dict[str, Any] | None = None,
        deadline: float | None = None,
    ) -> BatchResult:
        tried: list[Instance] = []
        while True:
            instance = self.pick(exclude=tried)
            tried.append(instance)
            instance.outstanding += 1
            instance.requests += 1
            try:
                return await self._client.infer(instance.url, model, version, inputs, parameters, self._remaining(deadline))
            except InstanceUnreachable as exc:
                instance.failures += 1
                if exc.connect_failed:
                    instance.healthy = False  # the health checker re-admits it once it is up again
                if not self._may_retry(tried):
                    raise
            except UpstreamError as exc:
                # This instance does not hold the model version (yet: a rollout in progress, or a
                # failed load); another one may. Any other answer from Triton is final.
                if not (missing_model(exc) and self._may_retry(tried)):
                    raise
            finally:
                instance.outstanding -= 1

    def _may_retry(self, tried: list[Instance]) -> bool:
        return len(tried) < self._max_tries and any(i.healthy and i not in tried for i in self.instances)

    async def get(self, path: str, timeout: float | None = None) -> RawResponse:
        """A read-only request (metadata, config, readiness) to any healthy instance, with failover."""
        tried: list[Instance] = []
        while True:
            instance = self.pick(exclude=tried)
            tried.append(instance)
            try:
                return await self._client.get(instance.url, path, timeout)
            except InstanceUnreachable as exc:
                if exc.connect_failed:
                    instance.healthy = False
                if not any(i.healthy for i in self.instances if i not in tried):
                    raise

    async def get_all(self, path: str, timeout: float | None = None) -> list[RawResponse]:
        """The same request to every healthy instance (statistics are summed across the fleet)."""
        healthy = [i for i in self.instances if i.healthy]
        if not healthy:
            raise Unavailable("no healthy Triton instance is available")
        results = await asyncio.gather(*(self._client.get(i.url, path, timeout) for i in healthy), return_exceptions=True)
        answers = [r for r in results if isinstance(r, RawResponse)]
        if not answers:
            raise Unavailable(f"no Triton instance answered {path}")
        return answers
