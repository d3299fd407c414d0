"""Keeping the router's view of the fleet current: membership (DNS) and active health.

``FleetMonitor`` runs in the background and writes ``Instance`` fields the router reads:

* **membership**: each ``upstream.instances`` entry is one URL, or a DNS name whose every
  address is an instance (a Kubernetes headless service), re-resolved every
  ``upstream.dns_refresh_s``. A name that does not resolve keeps its previous addresses.
* **active health**, every ``upstream.health_interval_s``, for each instance at once:
  ``/v2/health/live`` decides whether the instance is up; ``/v2/health/ready`` is recorded for
  the fleet view; the repository index (``POST /v2/repository/index``) says which model
  versions are READY there, so the router sends a version only where it is loaded; and, when
  the response cache is on, model statistics reveal a version reloaded in place (its
  inference count falls back), so its cached results are dropped.

Liveness rather than readiness decides routing: Triton reports itself not ready while it loads
a new model version (poll mode), although it goes on serving the versions already loaded;
probing readiness would take every instance out of routing at once during a rollout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import orjson

from gateway.config import InstanceConfig, UpstreamConfig
from gateway.instances import Instance
from gateway.router import Router
from gateway.upstream.client import TritonClient

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
INDEX_BODY = b'{"ready": true}'
JSON_HEADER = b"Content-Type: application/json\r\n"


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (TCP), in a stable order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def instance_url(address: str, port: int) -> str:
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


def grpc_target(url: str, grpc_port: int) -> str:
    """host:port of the gRPC endpoint beside an instance's HTTP url; "" if no port is known."""
    if not grpc_port:
        return ""
    host = urlsplit(url).hostname or ""
    return f"[{host}]:{grpc_port}" if ":" in host else f"{host}:{grpc_port}"


def ready_models(index: object) -> dict[str, frozenset[str]]:
    """The READY model versions in a repository index answer."""
    if not isinstance(index, list):
        raise ValueError("the repository index is not a list")
    models: dict[str, set[str]] = {}
    for entry in index:
        if isinstance(entry, dict) and entry.get("state") == "READY" and isinstance(entry.get("name"), str):
            models.setdefault(entry["name"], set()).add(str(entry.get("version", "")))
    return {name: frozenset(v for v in versions if v) for name, versions in models.items()}


class FleetMonitor:
    def __init__(
        self,
        config: UpstreamConfig,
        client: TritonClient,
        router: Router,
        resolver: Resolver = resolve,
        clock: Callable[[], float] = time.monotonic,
        on_version_gone: Callable[[str, str], object] | None = None,
        watch_reloads: bool = False,
    ) -> None:
        self._config = config
        self._client = client
        self._router = router
        self._resolve = resolver
        self._clock = clock
        self._on_version_gone = on_version_gone
        self._fleet_versions: set[tuple[str, str]] = set()
        # Called after every health round (the rollout's view of each model's newest version).
        self.on_round: Callable[[], object] | None = None
        # Reload detection (for the response cache): the inference count Triton reports per
        # instance and version; it only ever grows, unless the version was loaded afresh.
        self._watch_reloads = watch_reloads
        self._counts: dict[tuple[str, str, str], int] = {}
        self._resolved: dict[int, list[str]] = {}  # entry index -> last addresses that resolved

    # -- membership -----------------------------------------------------------------------------

    async def _urls(self, index: int, entry: InstanceConfig) -> list[str]:
        if entry.url:
            return [entry.url]
        assert entry.dns is not None and entry.port is not None
        try:
            addresses = await self._resolve(entry.dns, entry.port)
        except OSError as exc:
            log.warning("cannot resolve %s: %s; keeping its last addresses", entry.dns, exc)
            addresses = self._resolved.get(index, [])
        else:
            if addresses != self._resolved.get(index):
                log.warning("%s resolves to %s", entry.dns, ", ".join(addresses) or "nothing")
            self._resolved[index] = addresses
        return [instance_url(a, entry.port) for a in addresses]

    async def discover(self) -> None:
        """Rebuild the member list from the config, keeping the state of known instances."""
        known = {i.url: i for i in self._router.instances}
        members: dict[str, Instance] = {}
        for index, entry in enumerate(self._config.instances):
            for url in await self._urls(index, entry):
                if url not in members:
                    instance = known.get(url) or Instance(url, entry.weight)
                    instance.weight = entry.weight
                    instance.grpc = grpc_target(url, entry.grpc_port)
                    members[url] = instance
        if list(members) != list(known):
            for url in set(known) - set(members):
                self._client.forget(url)
            self._router.set_instances(list(members.values()))

    # -- health ---------------------------------------------------------------------------------

    async def probe(self, instance: Instance) -> None:
        timeout = self._config.health_timeout_s
        url = instance.url
        why, answered = "", True
        try:
            # Probes go outside the connection cap: a busy instance's full pool must not read as
            # silence (nor hold its index back).
            status = (await self._client.get(url, "/v2/health/live", timeout, capped=False)).status
            live, why = status == 200, f"/v2/health/live answered {status}"
        except Exception as exc:  # whatever the instance (or whatever answers on its port) does, it is not up
            live, why, answered = False, f"/v2/health/live: {exc!r}", False
        if live:
            epoch = instance.index_epoch
            ready, models, _ = await asyncio.gather(
                self._ready(url, timeout), self._index(url, timeout), self._reloads(url, timeout)
            )
            instance.ready = ready
            if models is not None:
                instance.set_index(models, epoch)  # not if the repository sync changed it meanwhile
        else:
            instance.ready = False
        was, was_live = instance.state, instance.live
        instance.probed(live, self._clock())
        if instance.state != was:
            log.warning("instance %s is now %s%s", url, instance.state.upper(), "" if live else f" ({why})")
        if was_live and not answered:
            # No answer at all (frozen, partitioned, gone): the requests in flight there would
            # wait out upstream.request_timeout_s; given up now, the router sends them elsewhere.
            # An instance that answers, even "not live", is left to answer what it holds; so is
            # one that answered a request while the probe waited (busy, not gone: what it holds
            # would run twice).
            given_up = self._client.abandon(
                url, "the instance stopped answering health probes", quiet_for=timeout
            )
            if given_up:
                log.warning("instance %s: %d request(s) in flight or about to be sent given up, to be retried elsewhere", url, given_up)

    async def _reloads(self, url: str, timeout: float) -> None:
        """Report versions Triton loaded afresh (a version folder replaced in place: same
        number, new files) through ``on_version_gone``: what was derived from the old files,
        cached results, must go. Seen as an inference count that went down."""
        if not self._watch_reloads or self._on_version_gone is None:
            return
        try:
            resp = await self._client.get(url, "/v2/models/stats", timeout, capped=False)
            stats = orjson.loads(resp.body)["model_stats"] if resp.status == 200 else None
        except Exception:
            return
        for entry in stats or ():
            try:
                key = (url, str(entry["name"]), str(entry["version"]))
                count = int(entry["inference_count"])
            except (KeyError, TypeError, ValueError):
                continue
            before = self._counts.get(key)
            self._counts[key] = count
            if before is not None and count < before:
                log.warning("%s version %s was reloaded on %s", key[1], key[2], url)
                self._on_version_gone(key[1], key[2])

    async def _ready(self, url: str, timeout: float) -> bool:
        try:
            return (await self._client.get(url, "/v2/health/ready", timeout, capped=False)).status == 200
        except Exception:
            return False

    async def _index(self, url: str, timeout: float) -> dict[str, frozenset[str]] | None:
        try:
            resp, _ = await self._client.request(
                "POST", url, "/v2/repository/index", INDEX_BODY, JSON_HEADER, timeout, capped=False
            )
            if resp.status != 200:
                return None
            return ready_models(orjson.loads(resp.body))
        except Exception as exc:  # an index we cannot read leaves the last one in place
            log.debug("repository index of %s: %r", url, exc)
            return None

    async def check_all(self, instances: Sequence[Instance] | None = None) -> None:
        await asyncio.gather(*(self.probe(i) for i in (self._router.instances if instances is None else instances)))
        self._router.wake()  # an instance re-admitted or up again frees no slot: waiters look again
        self._versions_changed()
        if self.on_round is not None:
            self.on_round()

    def _versions_changed(self) -> None:
        """Tell ``on_version_gone`` of every model version that no instance holds any more
        (unloaded or removed everywhere): what was derived from it, cached results, must go."""
        now = {
            (model, version)
            for instance in self._router.instances
            for model, versions in (instance.models or {}).items()
            for version in versions
        }
        gone = self._fleet_versions - now
        self._fleet_versions = now
        if self._on_version_gone is not None:
            for model, version in sorted(gone):
                self._on_version_gone(model, version)

    async def start(self) -> None:
        """The first membership and health round, before the gateway takes traffic."""
        await self.discover()
        await self.check_all()

    async def run(self) -> None:
        """Probe every ``health_interval_s`` and re-resolve every ``dns_refresh_s``, forever."""
        next_discovery = self._clock() + self._config.dns_refresh_s
        while True:
            await asyncio.sleep(self._config.health_interval_s)
            try:
                if any(e.dns for e in self._config.instances) and self._clock() >= next_discovery:
                    next_discovery = self._clock() + self._config.dns_refresh_s
                    await self.discover()
                await self.check_all()
            except Exception:  # the loop must outlive any one round: it is what re-admits instances
                log.exception("fleet health round failed")
