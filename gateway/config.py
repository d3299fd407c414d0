"""One typed, validated gateway configuration, loaded once from a TOML file.

Each concern has a small frozen dataclass; ``load_config`` builds them from the file, applies
command-line overrides, and checks cross-field rules, raising ``ConfigError`` with a message that
names the offending key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import shown


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 64 * 1024 * 1024
    # Processes serving the same port (one listening socket, each connection accepted by one
    # of them, kept even by gateway/accept_balance.py); each batches and routes on its own.
    workers: int = 1
    # With workers > 1: keep the workers' connections even (gateway/accept_balance.py). It costs
    # a new connection that takes its worker above the others a stop and a start of listening
    # (about 0.1 ms); false leaves connections to the kernel's accept race.
    balance_connections: bool = True
    # How long in-flight requests may take to finish on shutdown before they are cancelled.
    shutdown_grace_s: float = 10.0
    # A request that stops arriving (nothing of its head or body for this long) is answered
    # 408 and its connection closed; a connection that sends nothing is closed (uvicorn only).
    read_timeout_s: float = 30.0
    # A request whose head (request line and headers) is larger is answered 431 and its
    # connection closed (uvicorn only).
    max_header_bytes: int = 65536


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """One Triton instance (``url``), or every address a DNS name resolves to (``dns`` and
    ``port``; a Kubernetes headless service), each with this weight."""

    url: str = ""
    weight: float = 1.0
    dns: str = ""
    port: int = 0
    # The instance's gRPC port (same host): needed when the gateway drives loading
    # ([repository] path), whose load calls go over gRPC; 0 = not given.
    grpc_port: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    instances: tuple[InstanceConfig, ...] = ()
    connect_timeout_s: float = 2.0
    # Time limit of one upstream attempt; a timed-out attempt is retried on another instance.
    request_timeout_s: float = 30.0
    # Attempts per upstream request, each on a different instance.
    max_tries: int = 2
    max_connections_per_instance: int = 64
    # Batches (and lone requests) in flight per instance; beyond it, requests wait in the gateway.
    max_inflight_per_instance: int = 8
    # With unequal weights, how strongly requests in flight lower an instance's share (Envoy's
    # active_request_bias): 1 = weighted least-request, 0 = strict weights whatever the load.
    active_request_bias: float = 1.0
    health_interval_s: float = 1.0
    health_timeout_s: float = 1.0
    # How often DNS names in `instances` are resolved again.
    dns_refresh_s: float = 10.0
    # Passive outlier ejection: after this many consecutive failures (no answer, timeout, 5xx)
    # an instance is out for eject_base_s x (its recent ejections), at most eject_max_s, with
    # at most max_ejected_share of the fleet out at once.
    eject_after_failures: int = 5
    eject_base_s: float = 5.0
    eject_max_s: float = 60.0
    max_ejected_share: float = 0.5
    # How long model metadata and config fetched from Triton are reused.
    metadata_ttl_s: float = 10.0


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    enabled: bool = True
    # Upper bound on rows per upstream request; the model's own max_batch_size also applies.
    max_batch_size: int = 64
    # A request never waits longer than this for a free upstream slot before its batch is sent.
    max_queue_delay_ms: float = 2.0
    # Batches of one model version in flight per healthy instance before requests gather.
    max_inflight_batches: int = 1
    # Rows waiting per model version beyond which new requests get 503 (load shedding).
    max_queue_rows: int = 8192
    # How long a batch that is not full waits for more requests even while an upstream slot is
    # free (like Triton's max_queue_delay_microseconds): larger batches for that much latency.
    # Only while requests come concurrently (the last batches carried several), and only until
    # the batch has 8 rows: a lone client is never held. 0: sent at once. Never beyond
    # max_queue_delay_ms, nor past a request's deadline.
    hold_ms: float = 0.0
    # The hold applies only while the host's CPUs are at least this busy (the share of all cores'
    # time, over the last half second, from /proc/stat): fewer batches save the gateway's CPU,
    # and a co-located Triton's, which is worth the wait while cores are short; with cores to
    # spare a hold only adds latency. 0: whatever the load. Unknown (no /proc/stat): it applies.
    hold_cpu_busy: float = 0.8
    # With several workers (server.workers > 1): one batcher per model version for all of them,
    # in one worker (the version's owner, chosen by hashing), which the others hand their
    # requests to over a Unix socket. The host's requests for a model then form one worker's
    # batches instead of one set per worker: fewer, larger upstream executions. An owner that
    # cannot be reached leaves the requests to each worker's own batcher.
    host_wide: bool = False
    # Per-model settings, from [batching.models.<name>] tables: any key above, for that model
    # only; the rest comes from [batching]. (A slow model wants a longer max_queue_delay_ms.)
    models: Mapping[str, BatchingConfig] = field(default_factory=lambda: MappingProxyType({}))

    def for_model(self, model: str) -> BatchingConfig:
        return self.models.get(model, self)

    @property
    def host_wide_anywhere(self) -> bool:
        """Whether some model's batches are host-wide (``host_wide`` for all or for one)."""
        return self.host_wide or any(m.host_wide for m in self.models.values())


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The response cache (see gateway/cache/). Off unless enabled: only deterministic models
    should be cached."""

    enabled: bool = False
    # Bytes of cached outputs held in this process, all models together (LRU beyond it).
    max_bytes: int = 256 * 1024 * 1024
    # How long an entry is served.
    ttl_s: float = 60.0
    # The most of max_bytes one model's entries may hold (per-model tables lower it).
    max_share: float = 1.0
    # Optional shared tier for fleets of gateway replicas: "redis://host:port/db"; "" = none.
    redis_url: str = ""
    # The longest a request waits for Redis; beyond it the gateway goes on without it.
    redis_timeout_ms: float = 5.0
    # With server.workers > 1: bytes of the store the workers share in memory (/dev/shm), so
    # one worker's answer serves the others' clients; -1 = as max_bytes, 0 = none.
    host_max_bytes: int = -1
    # Per-model settings, from [cache.models.<name>] tables: enabled, ttl_s, max_share.
    models: Mapping[str, CacheConfig] = field(default_factory=lambda: MappingProxyType({}))

    def for_model(self, model: str) -> CacheConfig:
        return self.models.get(model, self)

    @property
    def host_bytes(self) -> int:
        return self.max_bytes if self.host_max_bytes < 0 else self.host_max_bytes


CACHE_MODEL_KEYS = frozenset({"enabled", "ttl_s", "max_share"})


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    # The rollout file (see gateway/rollout.py): stable and canary versions per model, read
    # again when it changes. "" = none: requests naming no version get the fleet's newest.
    file: str = ""
    reload_interval_s: float = 1.0
    # Bearer token of the rollout admin API (POST /v2/gateway/rollout/{model}); "" = disabled.
    admin_token: str = ""


@dataclass(frozen=True, slots=True)
class RepositoryConfig:
    # The model repository the Triton instances serve, as the gateway sees it. Set, the gateway
    # drives loading (Triton in explicit model-control mode; see gateway/upstream/repository.py):
    # new version folders are loaded on every instance and warmed before they get traffic,
    # removed ones drained then unloaded. "" = Triton manages its repository itself.
    path: str = ""
    scan_interval_s: float = 1.0   # how often the folder is scanned; a change acts once it is stable
    load_timeout_s: float = 300.0  # the longest one load call to one instance may take
    drain_timeout_s: float = 30.0  # the longest a removed version's requests in flight are awaited
    warmup: bool = True            # a real inference to each new version before it is routed


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)


_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def _build(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, value in table.items():
        expected = _SCALARS.get(str(known[name].type))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is not None and type(value) is not expected:
            raise ConfigError(f"{where}.{name} must be {expected.__name__}, got {shown(value)}")
        values[name] = value
    return cls(**values)


def _instances(raw: Any) -> tuple[InstanceConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("upstream.instances must be a non-empty list of {url, weight} tables")
    out = []
    for i, item in enumerate(raw):
        where = f"upstream.instances[{i}]"
        if not isinstance(item, dict) or ("url" in item) == ("dns" in item):
            raise ConfigError(f"{where} needs either a url, or a dns name and a port")
        inst = _build(InstanceConfig, item, where)
        if inst.url:
            parts = urlsplit(inst.url)
            if parts.scheme != "http" or not parts.hostname or parts.port is None:
                raise ConfigError(f"{where}.url must look like http://host:port, got {shown(inst.url)}")
            if "port" in item:
                raise ConfigError(f"{where}: port goes with dns; a url carries its own")
            inst = replace(inst, url=inst.url.rstrip("/"))
        else:
            if not inst.dns.strip() or "/" in inst.dns or ":" in inst.dns:
                raise ConfigError(f"{where}.dns must be a host name, got {shown(inst.dns)}")
            if not 1 <= inst.port <= 65535:
                raise ConfigError(f"{where} needs a port in 1..65535 with its dns name")
        if inst.weight <= 0:
            raise ConfigError(f"{where}.weight must be > 0")
        if not 0 <= inst.grpc_port <= 65535:
            raise ConfigError(f"{where}.grpc_port must be in 1..65535")
        out.append(inst)
    keys = [i.url or f"{i.dns}:{i.port}" for i in out]
    if len(set(keys)) != len(keys):
        raise ConfigError("upstream.instances lists the same instance twice")
    return tuple(out)


def _with_models(cls: type, raw: Any, section: str, allowed: frozenset[str] | None = None) -> Any:
    """A section with optional [<section>.models.<name>] tables overriding its keys per model."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table")
    table = dict(raw)
    models = table.pop("models", {})
    base = _build(cls, table, section)
    if not isinstance(models, dict):
        raise ConfigError(f"{section}.models must hold one table per model: [{section}.models.<name>]")
    per_model = {name: _override(base, overrides, f"{section}.models.{name}", allowed) for name, overrides in models.items()}
    return replace(base, models=MappingProxyType(per_model))


def _override(base: Any, overrides: Any, where: str, allowed: frozenset[str] | None) -> Any:
    if isinstance(overrides, dict):
        bad = sorted(k for k in overrides if k == "models" or (allowed is not None and k not in allowed))
        if bad:
            raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(bad)}")
    checked = _build(type(base), overrides, where)  # types and unknown keys
    return replace(base, **{key: getattr(checked, key) for key in overrides})


def parse_config(data: dict[str, Any]) -> GatewayConfig:
    unknown = sorted(set(data) - {"server", "upstream", "batching", "cache", "rollout", "repository"})
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(unknown)}")
    server = _build(ServerConfig, data.get("server", {}), "server")
    upstream_raw = dict(data.get("upstream", {}))
    instances = _instances(upstream_raw.pop("instances", None))
    upstream = replace(_build(UpstreamConfig, upstream_raw, "upstream"), instances=instances)
    batching = _with_models(BatchingConfig, data.get("batching", {}), "batching")
    cache = _with_models(CacheConfig, data.get("cache", {}), "cache", CACHE_MODEL_KEYS)
    rollout = _build(RolloutConfig, data.get("rollout", {}), "rollout")
    repository = _build(RepositoryConfig, data.get("repository", {}), "repository")
    config = GatewayConfig(
        server=server, upstream=upstream, batching=batching, cache=cache, rollout=rollout, repository=repository
    )
    validate(config)
    return config


def validate(config: GatewayConfig) -> None:
    s, u, b = config.server, config.upstream, config.batching
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"server.port must be in 0..65535, got {s.port}")
    if not 1 <= s.workers <= 256:
        raise ConfigError(f"server.workers must be in 1..256, got {s.workers}")
    if s.max_body_bytes < 1024:
        raise ConfigError("server.max_body_bytes must be at least 1024")
    if not s.read_timeout_s > 0:
        raise ConfigError(f"server.read_timeout_s must be > 0, got {s.read_timeout_s}")
    if s.max_header_bytes < 1024:
        raise ConfigError(f"server.max_header_bytes must be at least 1024, got {s.max_header_bytes}")
    for name in ("connect_timeout_s", "request_timeout_s", "health_interval_s", "health_timeout_s", "dns_refresh_s"):
        if getattr(u, name) <= 0:
            raise ConfigError(f"upstream.{name} must be > 0")
    for name in ("max_connections_per_instance", "max_inflight_per_instance", "max_tries", "eject_after_failures"):
        if getattr(u, name) < 1:
            raise ConfigError(f"upstream.{name} must be >= 1")
    if u.eject_base_s <= 0 or u.eject_max_s < u.eject_base_s:
        raise ConfigError("upstream.eject_base_s must be > 0 and upstream.eject_max_s >= eject_base_s")
    if not 0 <= u.active_request_bias <= 4:
        raise ConfigError(f"upstream.active_request_bias must be in 0..4, got {u.active_request_bias}")
    if not 0 <= u.max_ejected_share <= 1:
        raise ConfigError(f"upstream.max_ejected_share must be in 0..1, got {u.max_ejected_share}")
    _validate_batching(b, "batching", u)
    for name, model in b.models.items():
        _validate_batching(model, f"batching.models.{name}", u)
    if config.rollout.reload_interval_s <= 0:
        raise ConfigError("rollout.reload_interval_s must be > 0")
    r = config.repository
    for name in ("scan_interval_s", "load_timeout_s", "drain_timeout_s"):
        if getattr(r, name) <= 0:
            raise ConfigError(f"repository.{name} must be > 0")
    if r.path and any(not i.grpc_port for i in u.instances):
        raise ConfigError(
            "repository.path is set, so the gateway loads models, over gRPC: give every "
            "upstream.instances entry its grpc_port (Triton's --grpc-port)"
        )
    c = config.cache
    if c.max_bytes < 0:
        raise ConfigError("cache.max_bytes must be >= 0")
    if c.redis_timeout_ms <= 0:
        raise ConfigError("cache.redis_timeout_ms must be > 0")
    if c.host_max_bytes < -1:
        raise ConfigError("cache.host_max_bytes must be >= 0 (or -1: as cache.max_bytes)")
    if c.redis_url and not c.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"cache.redis_url must look like redis://host:port/db, got {shown(c.redis_url)}")
    for where, m in [("cache", c), *((f"cache.models.{n}", m) for n, m in c.models.items())]:
        if m.ttl_s <= 0:
            raise ConfigError(f"{where}.ttl_s must be > 0")
        if not 0 < m.max_share <= 1:
            raise ConfigError(f"{where}.max_share must be in (0, 1], got {m.max_share}")


def _validate_batching(b: BatchingConfig, where: str, u: UpstreamConfig) -> None:
    if b.max_batch_size < 1 or b.max_inflight_batches < 1 or b.max_queue_rows < 1:
        raise ConfigError(f"{where}: max_batch_size, max_inflight_batches and max_queue_rows must be >= 1")
    for name in ("max_queue_delay_ms", "hold_ms"):
        delay = getattr(b, name)
        if not delay >= 0:  # also refuses NaN
            raise ConfigError(f"{where}.{name} must be >= 0")
        if delay / 1000 >= u.request_timeout_s:
            raise ConfigError(
                f"{where}.{name} must be shorter than upstream.request_timeout_s: requests would time out while queued"
            )
    if not 0 <= b.hold_cpu_busy <= 1:  # also refuses NaN
        raise ConfigError(f"{where}.hold_cpu_busy must be in [0, 1], got {b.hold_cpu_busy}")
    if b.max_queue_rows < b.max_batch_size:
        raise ConfigError(f"{where}.max_queue_rows must be >= {where}.max_batch_size")


def load_config(path: str | Path, *, host: str | None = None, port: int | None = None) -> GatewayConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    config = parse_config(data)
    server = config.server
    if host is not None:
        server = replace(server, host=host)
    if port is not None:
        server = replace(server, port=port)
    config = replace(config, server=server)
    validate(config)
    if config.rollout.file:
        from gateway.rollout import RolloutError, load_rollouts

        try:
            load_rollouts(Path(config.rollout.file))  # refuse to start on a bad rollout file
        except RolloutError as exc:
            raise ConfigError(f"rollout.file: {exc}") from None
    return config
