"""One typed, validated gateway configuration, loaded once from a TOML file.

Each concern has a small frozen dataclass; ``load_config`` builds them from the file, applies
command-line overrides, and checks every number against its range (``RANGES``: finite, as every
duration must be bounded, and within the bounds its meaning allows) and the cross-field rules,
raising ``ConfigError`` with a message that names the offending key and value.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import SplitResult, urlsplit

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
    # at most max_ejected_share of the fleet out at once (0: no ejection), never all of it.
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


_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")


def _split_url(url: str, said: str) -> tuple[SplitResult, int | None]:
    """``url``'s parts and port, or ConfigError ``said`` where it cannot be read: a port that
    is no number or out of 1..65535, an unclosed IPv6 bracket."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(said) from None
    if port == 0:
        raise ConfigError(said)
    return parts, port


def _instance_url(url: str, where: str) -> str:
    """``url`` as the gateway keys instances by (scheme and host lower case, no trailing "/"),
    or ConfigError: http://host:port and nothing else (a path, a query or credentials would be
    dropped, not used)."""
    said = f"{where}.url must look like http://host:port, got {shown(url)}"
    parts, port = _split_url(url.strip(), said)
    host = parts.hostname or ""
    if parts.scheme.lower() != "http" or port is None:
        raise ConfigError(said)
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"{said} (Triton's API is at the root: no path, query or credentials)")
    if not (_HOST_NAME.fullmatch(host) or ":" in host):  # a name, an IPv4 address, or an IPv6 one in brackets
        raise ConfigError(said)
    shown_host = f"[{host}]" if ":" in host else host
    return f"http://{shown_host}:{port}"


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
            if "port" in item:
                raise ConfigError(f"{where}: port goes with dns; a url carries its own")
            inst = replace(inst, url=_instance_url(inst.url, where))
        else:
            if not _HOST_NAME.fullmatch(inst.dns):
                raise ConfigError(f"{where}.dns must be a host name, got {shown(inst.dns)}")
            if not 1 <= inst.port <= 65535:
                raise ConfigError(f"{where} needs a port in 1..65535 with its dns name")
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
    if not isinstance(data.get("upstream", {}), dict):
        raise ConfigError("[upstream] must be a table")
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


@dataclass(frozen=True, slots=True)
class Range:
    """The values a numeric setting may take: finite (NaN and infinities never: a duration must be
    bounded, a weight or share a number), at least ``low`` (above it, with ``low_open``) and at
    most ``high``. ``text``: the rule as the error says it, when the bounds do not say it alone."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    text: str = ""

    def check(self, key: str, value: float) -> None:
        finite = isinstance(value, int) or math.isfinite(value)
        if (
            finite
            and (self.low is None or (value > self.low if self.low_open else value >= self.low))
            and (self.high is None or value <= self.high)
        ):
            return
        rule = self.text or self.said()
        raise ConfigError(f"{key} must be {rule if finite else 'finite and ' + rule}, got {shown(value)}")

    def said(self) -> str:
        low, high = (f"{b:g}" if b is not None else "" for b in (self.low, self.high))
        if self.high is None:
            return f"> {low}" if self.low_open else f">= {low}"
        return f"in ({low}, {high}]" if self.low_open else f"in {low}..{high}"


POSITIVE = Range(0, low_open=True)  # durations that must pass: a timeout, an interval, a TTL
NOT_NEGATIVE = Range(0)  # where 0 means "at once" or "none"
COUNT = Range(1)
SHARE = Range(0, 1)  # 0 is meaningful (off)

# Every int and float field of every section, with the range it must be in (tests check that
# none is left out). Cross-field rules follow in ``validate``.
RANGES: dict[type, dict[str, Range]] = {
    ServerConfig: {
        "port": Range(0, 65535),  # 0: any free port
        "max_body_bytes": Range(1024, text="at least 1024"),
        "workers": Range(1, 256),
        "shutdown_grace_s": NOT_NEGATIVE,  # 0: requests in flight are cancelled at once
        "read_timeout_s": POSITIVE,
        "max_header_bytes": Range(1024, text="at least 1024"),
    },
    InstanceConfig: {
        "weight": POSITIVE,
        # 0 with a url (which carries its port); a dns name needs one in 1..65535 (``_instances``).
        "port": Range(0, 65535),
        "grpc_port": Range(0, 65535, text="in 1..65535 (or 0: not given)"),
    },
    UpstreamConfig: {
        "connect_timeout_s": POSITIVE,
        "request_timeout_s": POSITIVE,
        "max_tries": COUNT,
        "max_connections_per_instance": COUNT,
        "max_inflight_per_instance": COUNT,
        "active_request_bias": Range(0, 4),
        "health_interval_s": POSITIVE,
        "health_timeout_s": POSITIVE,
        "dns_refresh_s": POSITIVE,
        "eject_after_failures": COUNT,
        "eject_base_s": POSITIVE,
        "eject_max_s": POSITIVE,  # and >= eject_base_s
        "max_ejected_share": SHARE,  # 0: no ejection; the fleet is never emptied (instances.py)
        "metadata_ttl_s": POSITIVE,
    },
    BatchingConfig: {
        "max_batch_size": COUNT,
        "max_queue_delay_ms": NOT_NEGATIVE,  # and shorter than upstream.request_timeout_s
        "max_inflight_batches": COUNT,
        "max_queue_rows": COUNT,  # and >= max_batch_size
        "hold_ms": NOT_NEGATIVE,  # 0: no hold; shorter than upstream.request_timeout_s
        "hold_cpu_busy": Range(0, 1, text="in [0, 1]"),  # 0: whatever the load
    },
    CacheConfig: {
        "max_bytes": NOT_NEGATIVE,
        "ttl_s": POSITIVE,
        "max_share": Range(0, 1, low_open=True),
        "redis_timeout_ms": POSITIVE,
        "host_max_bytes": Range(-1, text=">= 0 (or -1: as cache.max_bytes)"),
    },
    RolloutConfig: {"reload_interval_s": POSITIVE},
    RepositoryConfig: {"scan_interval_s": POSITIVE, "load_timeout_s": POSITIVE, "drain_timeout_s": POSITIVE},
}


def _check_numbers(section: Any, where: str) -> None:
    for name, allowed in RANGES[type(section)].items():
        allowed.check(f"{where}.{name}", getattr(section, name))


def validate(config: GatewayConfig) -> None:
    s, u, b, c, r = config.server, config.upstream, config.batching, config.cache, config.repository
    _check_numbers(s, "server")
    _check_numbers(u, "upstream")
    for i, instance in enumerate(u.instances):
        _check_numbers(instance, f"upstream.instances[{i}]")
    for where, batching in [("batching", b), *((f"batching.models.{n}", m) for n, m in b.models.items())]:
        _check_numbers(batching, where)
        _validate_batching(batching, where, u)
    for where, cache in [("cache", c), *((f"cache.models.{n}", m) for n, m in c.models.items())]:
        _check_numbers(cache, where)
    _check_numbers(config.rollout, "rollout")
    _check_numbers(r, "repository")
    if u.eject_max_s < u.eject_base_s:
        raise ConfigError(
            f"upstream.eject_max_s must be >= upstream.eject_base_s ({shown(u.eject_base_s)}), got {shown(u.eject_max_s)}"
        )
    if r.path and any(not i.grpc_port for i in u.instances):
        raise ConfigError(
            "repository.path is set, so the gateway loads models, over gRPC: give every "
            "upstream.instances entry its grpc_port (Triton's --grpc-port)"
        )
    if c.redis_url:
        _check_redis_url(c.redis_url)
    if not s.host.strip():
        raise ConfigError("server.host must name the address to listen on (0.0.0.0 or :: for every interface), got \"\"")
    cached = c.enabled or any(m.enabled for m in c.models.values())
    if cached and c.max_bytes == 0 and not c.redis_url and (s.workers == 1 or c.host_bytes == 0):
        raise ConfigError(
            "cache.max_bytes is 0 with the cache enabled and no other tier (redis_url, host_max_bytes): nothing could be cached"
        )


def _check_redis_url(url: str) -> None:
    """ConfigError unless ``url`` is one the Redis client can use: redis[s]://[user:pw@]host[:port][/db]
    (db a number) or unix://path."""
    said = f"cache.redis_url must look like redis://host:port/db, got {shown(url)}"
    parts, _ = _split_url(url, said)
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"cache.redis_url unix:// needs the socket's path, got {shown(url)}")
        return
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(said)
    db = parts.path.strip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ConfigError(f"{said} (the database is a number)")


def _validate_batching(b: BatchingConfig, where: str, u: UpstreamConfig) -> None:
    """The cross-field rules of [batching] or one [batching.models.<name>] (numbers checked)."""
    for name in ("max_queue_delay_ms", "hold_ms"):
        if getattr(b, name) / 1000 >= u.request_timeout_s:
            raise ConfigError(
                f"{where}.{name} must be shorter than upstream.request_timeout_s: requests would time out while queued"
            )
    if b.max_queue_rows < b.max_batch_size:
        raise ConfigError(f"{where}.max_queue_rows must be >= {where}.max_batch_size")


def load_config(
    path: str | Path, *, host: str | None = None, port: int | None = None, check_rollout: bool = True
) -> GatewayConfig:
    """The config of ``path``, with the command line's overrides; ``check_rollout``: refuse a bad
    rollout file too (not in a worker of a running gateway: it starts from the rollout in force
    in the others, ``Rollouts.from_file``)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:  # a folder, no permission
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    config = parse_config(data)
    server = config.server
    if host is not None:
        server = replace(server, host=host)
    if port is not None:
        server = replace(server, port=port)
    config = replace(config, server=server)
    validate(config)
    if config.rollout.file and check_rollout:
        from gateway.rollout import RolloutError, load_rollouts

        try:
            load_rollouts(Path(config.rollout.file))  # refuse to start on a bad rollout file
        except RolloutError as exc:
            raise ConfigError(f"rollout.file: {exc}") from None
    return config


def ignored_with_one_worker(config: GatewayConfig) -> list[str]:
    """One line for each setting ``config`` turns on that acts only between several workers,
    where it has one (``server.workers`` = 1, as ``serve`` runs it). Said, by ``serve`` at start and
    by ``check-config``, not refused: the setting is valid and does what it says once the workers
    are raised, but with one worker it was ignored without a word, which left whoever set it
    believing it acted."""
    if config.server.workers > 1:
        return []
    batching = config.batching
    if batching.host_wide:  # every model's too
        host_wide = ["batching.host_wide"]
    else:
        host_wide = [f"batching.models.{name}.host_wide" for name, model in batching.models.items() if model.host_wide]
    said = [
        f"{key} = true is ignored because server.workers is 1: batching for all the workers of a host takes server.workers > 1"
        for key in host_wide
    ]
    if config.cache.host_max_bytes > 0:  # -1 (as max_bytes) is the default; 0 asks for none
        said.append(
            f"cache.host_max_bytes = {config.cache.host_max_bytes} is ignored because server.workers is 1:"
            " the cache store the workers share takes server.workers > 1"
        )
    return said


def check_here(config: GatewayConfig) -> None:
    """ConfigError where what the config names is not on this machine: the model repository
    (checked by the commands that start or check a gateway here, not by ``load_config``: a
    container's config names its own paths)."""
    repository = config.repository.path
    if repository and not Path(repository).is_dir():
        what = "does not exist" if not Path(repository).exists() else "is not a folder"
        raise ConfigError(f"repository.path {shown(repository)} {what}: it is the model repository Triton serves")
