"""Config loading: every mistake is named; cross-field rules hold."""

from __future__ import annotations

import logging
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import fields
from pathlib import Path
from typing import IO, Any

import pytest

from gateway.__main__ import main
from gateway.config import (
    RANGES,
    BatchingConfig,
    CacheConfig,
    ConfigError,
    GatewayConfig,
    InstanceConfig,
    RepositoryConfig,
    RolloutConfig,
    ServerConfig,
    UpstreamConfig,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]
BASE = {"upstream": {"instances": [{"url": "http://127.0.0.1:8100", "weight": 1}]}}


def test_shipped_local_config_loads() -> None:
    config = load_config(ROOT / "configs" / "local.toml")
    assert [i.url for i in config.upstream.instances] == ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]
    assert config.server.port == 8000
    # The default models are deterministic: the shipped config caches them (and nothing else).
    assert not config.cache.enabled
    assert config.cache.for_model("digits_cnn").enabled and config.cache.for_model("breast_cancer_mlp").enabled


def test_the_shipped_configs_let_the_gateway_drive_loading_over_grpc() -> None:
    for name in ("local.toml", "compose.toml"):
        config = load_config(ROOT / "configs" / name)
        assert config.repository.path, name
        assert all(i.grpc_port for i in config.upstream.instances), name


def test_cli_overrides_apply() -> None:
    config = load_config(ROOT / "configs" / "local.toml", host="0.0.0.0", port=9000)
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9000)


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, "upstream.instances"),
        ({"upstream": {"instances": [{"weight": 1}]}}, "needs either a url, or a dns name and a port"),
        ({"upstream": {"instances": [{"url": "http://a:1", "dns": "a", "port": 1}]}}, "needs either a url"),
        ({"upstream": {"instances": [{"dns": "triton"}]}}, "needs a port in 1..65535"),
        ({"upstream": {"instances": [{"dns": "http://triton", "port": 8000}]}}, ".dns must be a host name"),
        ({"upstream": {"instances": [{"url": "http://a:1", "port": 2}]}}, "port goes with dns"),
        ({"upstream": {"instances": [{"dns": "t", "port": 1}, {"dns": "t", "port": 1}]}}, "same instance twice"),
        ({"upstream": 5}, "[upstream] must be a table"),
        ({"upstream": "abc"}, "[upstream] must be a table"),
        *(
            ({"upstream": {"instances": [{"url": url}]}}, "must look like http://host:port")
            for url in ("http://127.0.0.1:99999", "http://127.0.0.1:abc", "http://127.0.0.1:-1", "http://[::1", "http://127.0.0.1:0",
                        "http:// bad host:8000", "https://a:1", "http://a")  # fmt: skip
        ),
        *(
            ({"upstream": {"instances": [{"url": url}]}}, "no path, query or credentials")
            for url in ("http://127.0.0.1:8000/v2", "http://u:p@127.0.0.1:8000", "http://a:1?x=1", "http://a:1#f")
        ),
        ({"upstream": {"instances": [{"url": "http://Host:1"}, {"url": "http://host:1/"}]}}, "same instance twice"),
        ({"upstream": {"instances": [{"dns": "bad host name!", "port": 1}]}}, ".dns must be a host name"),
        ({**BASE, "server": {"host": ""}}, "server.host must name the address to listen on"),
        ({**BASE, "cache": {"enabled": True, "max_bytes": 0}}, "nothing could be cached"),
        ({**BASE, "cache": {"max_bytes": 0, "models": {"m": {"enabled": True}}}}, "nothing could be cached"),
        *(
            ({**BASE, "cache": {"redis_url": url}}, "cache.redis_url must look like redis://host:port/db")
            for url in ("redis://127.0.0.1:abc", "redis://127.0.0.1:99999/0", "redis://[::1", "redis://127.0.0.1:6379/notanumber",
                        "http://127.0.0.1:6379", "redis://")  # fmt: skip
        ),
        ({**BASE, "upstream": {**BASE["upstream"], "max_tries": 0}}, "upstream.max_tries must be >= 1"),
        ({**BASE, "upstream": {**BASE["upstream"], "max_inflight_per_instance": 0}}, "max_inflight_per_instance"),
        ({**BASE, "upstream": {**BASE["upstream"], "health_timeout_s": 0.0}}, "upstream.health_timeout_s must be > 0"),
        ({**BASE, "upstream": {**BASE["upstream"], "eject_max_s": 1.0}}, "eject_max_s must be >= upstream.eject_base_s (5.0), got 1.0"),
        ({**BASE, "upstream": {**BASE["upstream"], "max_ejected_share": 1.5}}, "max_ejected_share must be in 0..1"),
        ({**BASE, "upstream": {**BASE["upstream"], "active_request_bias": -1.0}}, "active_request_bias must be in 0..4"),
        ({"upstream": {"instances": [{"url": "triton:8000"}]}}, "http://host:port"),
        ({"upstream": {"instances": [{"url": "http://a:1", "weight": 0}]}}, "weight must be > 0"),
        ({"upstream": {"instances": [{"url": "http://a:1"}, {"url": "http://a:1/"}]}}, "same instance twice"),
        ({**BASE, "batching": {"max_batch_size": "64"}}, "batching.max_batch_size must be int"),
        ({**BASE, "batching": {"max_bach_size": 64}}, "unknown key(s) in [batching]: max_bach_size"),
        ({**BASE, "caches": {}}, "unknown section(s): caches"),
        ({**BASE, "server": {"port": 70000}}, "server.port"),
        ({**BASE, "server": {"workers": 0}}, "server.workers"),
        ({**BASE, "server": {"read_timeout_s": 0.0}}, "server.read_timeout_s must be > 0"),
        ({**BASE, "server": {"max_header_bytes": 100}}, "server.max_header_bytes must be at least 1024"),
        ({**BASE, "batching": {"max_queue_delay_ms": 40000.0}}, "shorter than upstream.request_timeout_s"),
        ({**BASE, "batching": {"hold_ms": -0.5}}, "batching.hold_ms must be >= 0"),
        ({**BASE, "batching": {"hold_ms": float("nan")}}, "batching.hold_ms must be finite and >= 0, got nan"),
        ({**BASE, "batching": {"models": {"m": {"hold_ms": 40000.0}}}}, "batching.models.m.hold_ms must be shorter than"),
        ({**BASE, "batching": {"hold_cpu_busy": 1.5}}, "batching.hold_cpu_busy must be in [0, 1]"),
        ({**BASE, "batching": {"hold_cpu_busy": float("nan")}}, "batching.hold_cpu_busy must be finite and in [0, 1]"),
        ({**BASE, "batching": {"models": {"m": {"hold_cpu_busy": -0.1}}}}, "batching.models.m.hold_cpu_busy must be in"),
        ({**BASE, "batching": {"max_queue_rows": 8, "max_batch_size": 64}}, "max_queue_rows must be >= "),
        ({**BASE, "repository": {"path": "model_repository"}}, "give every upstream.instances entry its grpc_port"),
        ({"upstream": {"instances": [{"url": "http://a:1", "grpc_port": 70000}]}}, "grpc_port must be in 1..65535"),
        ({**BASE, "repository": {"scan_interval_s": 0.0}}, "repository.scan_interval_s must be > 0"),
        ({**BASE, "repository": {"warm_up": True}}, "unknown key(s) in [repository]: warm_up"),
    ],
)
def test_bad_configs_are_rejected_with_a_message_naming_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_ints_are_accepted_for_float_keys() -> None:
    config = parse_config({**BASE, "batching": {"max_queue_delay_ms": 3}})
    assert config.batching.max_queue_delay_ms == 3.0


def test_missing_and_invalid_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_an_instance_may_be_a_dns_name_with_a_port() -> None:
    config = parse_config({"upstream": {"instances": [{"dns": "triton-headless", "port": 8000, "weight": 2}]}})
    (entry,) = config.upstream.instances
    assert (entry.url, entry.dns, entry.port, entry.weight) == ("", "triton-headless", 8000, 2.0)


def test_batching_settings_may_be_set_per_model() -> None:
    config = parse_config(
        {**BASE, "batching": {"max_queue_delay_ms": 2.0, "models": {"slow": {"max_queue_delay_ms": 10, "max_batch_size": 8}}}}
    )
    slow, other = config.batching.for_model("slow"), config.batching.for_model("other")
    assert (slow.max_queue_delay_ms, slow.max_batch_size, slow.max_inflight_batches) == (10.0, 8, 1)
    assert other is config.batching and other.max_queue_delay_ms == 2.0


@pytest.mark.parametrize(
    "models, message",
    [
        ({"slow": {"max_queue_delay": 10}}, "unknown key(s) in [batching.models.slow]: max_queue_delay"),
        ({"slow": {"max_batch_size": 0}}, "batching.models.slow.max_batch_size must be >= 1, got 0"),
        ({"slow": {"max_queue_delay_ms": "10"}}, "batching.models.slow.max_queue_delay_ms must be float"),
        ({"slow": 3}, "[batching.models.slow] must be a table"),
        ({"slow": {"models": {}}}, "unknown key(s) in [batching.models.slow]: models"),
    ],
)
def test_bad_per_model_batching_is_rejected(models: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "batching": {"models": models}})
    assert message in str(err.value)


def test_cache_is_off_by_default_and_set_per_model() -> None:
    assert parse_config(BASE).cache.enabled is False
    cache = parse_config(
        {**BASE, "cache": {"enabled": True, "ttl_s": 30, "models": {"noisy": {"enabled": False}, "big": {"max_share": 0.25}}}}
    ).cache
    assert cache.for_model("other").enabled and cache.for_model("other").ttl_s == 30.0
    assert not cache.for_model("noisy").enabled
    assert cache.for_model("big").max_share == 0.25 and cache.for_model("big").ttl_s == 30.0
    assert cache.host_bytes == cache.max_bytes  # the host tier: as large as max_bytes unless given
    assert parse_config({**BASE, "cache": {"host_max_bytes": 0}}).cache.host_bytes == 0


@pytest.mark.parametrize(
    "cache, message",
    [
        ({"models": {"m": {"max_bytes": 10}}}, "unknown key(s) in [cache.models.m]: max_bytes"),
        ({"models": {"m": {"ttl_s": 0.0}}}, "cache.models.m.ttl_s must be > 0"),
        ({"max_share": 0.0}, "cache.max_share must be in (0, 1]"),
        ({"redis_url": "localhost:6379"}, "cache.redis_url must look like redis://"),
        ({"redis_timeout_ms": 0.0}, "cache.redis_timeout_ms must be > 0"),
        ({"host_max_bytes": -2}, "cache.host_max_bytes must be >= 0"),
        ({"host_max_bytes": 1.5}, "cache.host_max_bytes must be int"),
    ],
)
def test_bad_cache_settings_are_rejected(cache: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "cache": cache})
    assert message in str(err.value)


def test_a_bad_rollout_file_stops_the_gateway_from_starting(tmp_path: Path) -> None:
    rollout = tmp_path / "rollout.toml"
    rollout.write_text('[models.m]\nstable = "1"\ncanary = "1"\n')
    config = tmp_path / "gateway.toml"
    config.write_text(f'[upstream]\ninstances = [{{ url = "http://a:1" }}]\n[rollout]\nfile = "{rollout}"\n')
    with pytest.raises(ConfigError, match="rollout.file: .*the canary is the stable version"):
        load_config(config)
    # A worker of a running gateway is not stopped by it: it starts from the others' rollout.
    assert load_config(config, check_rollout=False).rollout.file == str(rollout)
    rollout.write_text('[models.m]\nstable = "1"\n')
    assert load_config(config).rollout.file == str(rollout)


# Every section's numbers, where they are written: (dataclass, key prefix, data holding a value).
SECTIONS: list[tuple[type, str, Any]] = [
    (ServerConfig, "server", lambda name, v: {**BASE, "server": {name: v}}),
    (UpstreamConfig, "upstream", lambda name, v: {"upstream": {**BASE["upstream"], name: v}}),
    (InstanceConfig, "upstream.instances[0]", lambda name, v: {"upstream": {"instances": [{"url": "http://a:1", name: v}]}}),
    (BatchingConfig, "batching", lambda name, v: {**BASE, "batching": {name: v}}),
    (BatchingConfig, "batching.models.m", lambda name, v: {**BASE, "batching": {"models": {"m": {name: v}}}}),
    (CacheConfig, "cache", lambda name, v: {**BASE, "cache": {name: v}}),
    (CacheConfig, "cache.models.m", lambda name, v: {**BASE, "cache": {"models": {"m": {name: v}}}}),
    (RolloutConfig, "rollout", lambda name, v: {**BASE, "rollout": {name: v}}),
    (RepositoryConfig, "repository", lambda name, v: {**BASE, "repository": {name: v}}),
]
PER_MODEL_CACHE_KEYS = {"enabled", "ttl_s", "max_share"}


def numeric_fields(cls: type, where: str) -> list[str]:
    names = [f.name for f in fields(cls) if str(f.type) in ("int", "float")]
    return [n for n in names if n in PER_MODEL_CACHE_KEYS] if where == "cache.models.m" else names


def test_every_number_of_every_section_has_a_range() -> None:
    sections = {f.type for f in fields(GatewayConfig)} | {"InstanceConfig"}
    assert {cls.__name__ for cls in RANGES} == sections
    for cls in RANGES:
        assert set(RANGES[cls]) == set(numeric_fields(cls, "")), cls.__name__


FLOAT_KEYS = [
    (key, data)
    for cls, where, data in SECTIONS
    for key in numeric_fields(cls, where)
    if str(next(f for f in fields(cls) if f.name == key).type) == "float"
]


@pytest.mark.parametrize("key, data", FLOAT_KEYS, ids=[k for k, _ in FLOAT_KEYS])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinities_are_refused_for_every_float_setting(key: str, data: Any, value: float) -> None:
    where = next(w for cls, w, d in SECTIONS if d is data)
    with pytest.raises(ConfigError) as err:
        parse_config(data(key, value))
    assert str(err.value).startswith(f"{where}.{key} must be finite and ")
    assert str(err.value).endswith(f"got {value}")


OUT_OF_RANGE = [
    (f"{where}.{key}", data(key, bad))
    for cls, where, data in SECTIONS
    for key in numeric_fields(cls, where)
    if key != "port" or cls is not InstanceConfig  # a url carries its port: see the cases above
    for allowed in [RANGES[cls][key]]
    for bad in [allowed.low if allowed.low_open else allowed.low - 1]
]


@pytest.mark.parametrize("key, data", OUT_OF_RANGE, ids=[k for k, _ in OUT_OF_RANGE])
def test_a_number_below_its_range_is_refused_naming_key_and_value(key: str, data: dict) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be .*, got -?\d"):
        parse_config(data)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"upstream": {**BASE["upstream"], "metadata_ttl_s": -5}}, "upstream.metadata_ttl_s must be > 0, got -5.0"),
        ({**BASE, "server": {"shutdown_grace_s": -3}}, "server.shutdown_grace_s must be >= 0, got -3.0"),
        ({**BASE, "server": {"workers": 257}}, "server.workers must be in 1..256, got 257"),
        ({"upstream": {**BASE["upstream"], "active_request_bias": 4.5}}, "upstream.active_request_bias must be in 0..4, got 4.5"),
        ({**BASE, "cache": {"models": {"m": {"max_share": 1.5}}}}, "cache.models.m.max_share must be in (0, 1], got 1.5"),
        ({"upstream": {"instances": [{"url": "http://a:1", "weight": float("inf")}]}}, "upstream.instances[0].weight must be finite and > 0, got inf"),
        ({"upstream": {"instances": [{"url": "http://a:1"}, {"url": "http://b:1", "weight": float("nan")}]}}, "upstream.instances[1].weight must be finite and > 0, got nan"),
        ({"upstream": {"instances": [{"dns": "t", "port": 70000}]}}, "needs a port in 1..65535"),
        ({**BASE, "server": {"max_body_bytes": 10}}, "server.max_body_bytes must be at least 1024, got 10"),
    ],
)
def test_numbers_out_of_range_are_named_with_their_value(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_values_documented_as_meaningful_are_accepted() -> None:
    config = parse_config(
        {
            "server": {"port": 0, "shutdown_grace_s": 0},
            "upstream": {
                "instances": [{"url": "http://a:1", "grpc_port": 0, "weight": 0.001}],
                "max_ejected_share": 0.0,
                "active_request_bias": 0,
            },
            "batching": {"hold_ms": 0, "max_queue_delay_ms": 0, "hold_cpu_busy": 0},
            "cache": {"host_max_bytes": -1, "max_bytes": 0},
        }
    )
    assert config.cache.host_bytes == 0 and config.server.shutdown_grace_s == 0.0
    assert parse_config({"upstream": {**BASE["upstream"], "max_ejected_share": 1}}).upstream.max_ejected_share == 1.0
    assert parse_config({**BASE, "cache": {"host_max_bytes": 0}}).cache.host_bytes == 0


def test_instance_urls_are_kept_in_one_spelling_and_good_redis_urls_pass() -> None:
    config = parse_config({"upstream": {"instances": [{"url": "HTTP://Triton-A:8000/"}, {"url": "http://[::1]:8001"}]}})
    assert [i.url for i in config.upstream.instances] == ["http://triton-a:8000", "http://[::1]:8001"]
    for url in ("redis://127.0.0.1:6379/0", "rediss://user:pw@cache.example:6380", "redis://cache", "unix:///run/redis.sock"):
        assert parse_config({**BASE, "cache": {"redis_url": url}}).cache.redis_url == url
    assert parse_config({**BASE, "cache": {"enabled": True, "max_bytes": 0, "redis_url": "redis://r:6379"}}).cache.max_bytes == 0


def test_a_config_that_cannot_be_read_or_names_a_missing_repository_is_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "config.toml"
    folder.mkdir()
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    for path, message in ((folder, "cannot read config file .*Is a directory"), (binary, "invalid TOML")):
        with pytest.raises(ConfigError, match=message):
            load_config(path)
        assert main(["check-config", "--config", str(path)]) == 2
    for repository, said in ((tmp_path / "missing", "does not exist"), (binary, "is not a folder")):
        path = tmp_path / "gateway.toml"
        path.write_text(f'[upstream]\ninstances = [{{ url = "http://a:1", grpc_port = 2 }}]\n[repository]\npath = "{repository}"\n')
        assert load_config(path).repository.path == str(repository)  # a container's config names its own paths
        assert main(["check-config", "--config", str(path)]) == 0  # valid, with a note for this machine
        assert f"note: on this machine, repository.path \"{repository}\" {said}" in capsys.readouterr().err
        assert main(["serve", "--config", str(path), "--port", "1"]) == 2  # refused before anything starts
        assert f"bad configuration: repository.path \"{repository}\" {said}" in capsys.readouterr().err


def test_nan_and_inf_written_in_toml_are_refused_by_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for literal in ("nan", "inf", "+inf", "-nan"):
        path = tmp_path / "gateway.toml"
        path.write_text(f'[server]\nshutdown_grace_s = {literal}\n[upstream]\ninstances = [{{ url = "http://a:1" }}]\n')
        with pytest.raises(ConfigError, match="server.shutdown_grace_s must be finite and >= 0"):
            load_config(path)
        assert main(["check-config", "--config", str(path)]) == 2
        assert "server.shutdown_grace_s must be finite" in capsys.readouterr().err


def test_cli_overrides_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="server.port must be in 0..65535, got 70000"):
        load_config(ROOT / "configs" / "local.toml", port=70000)


def test_sighup_is_caught_while_one_server_runs_and_the_handler_restored_after(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.__main__ import SIGHUP_IGNORED, _sighup_ignored

    before = signal.getsignal(signal.SIGHUP)
    with _sighup_ignored():
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler) and handler is not before
        assert signal.getsignal(signal.SIGTERM) is not handler  # uvicorn's own are not touched
        with caplog.at_level(logging.WARNING, logger="gateway"):
            handler(signal.SIGHUP, None)
    assert SIGHUP_IGNORED in caplog.text and "server.workers > 1" in caplog.text
    assert signal.getsignal(signal.SIGHUP) is before


def test_a_worker_process_logs_the_gateways_lines_with_their_time_and_level() -> None:
    """uvicorn sets up each spawned worker's logging from the config it is given; a fresh
    interpreter has no handler of its own, so without one the lines came bare."""
    code = (
        "import logging, logging.config\n"
        "from gateway.__main__ import log_config\n"
        "logging.config.dictConfig(log_config('info'))\n"
        "logging.getLogger('gateway.app').warning('routed %s', 'v2')\n"
        "logging.getLogger('gateway.app').debug('not at info')\n"
        "logging.getLogger('uvicorn.error').info('Started server process')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    lines = done.stderr.splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING gateway\.app: routed v2", lines[0]), lines
    assert lines[1:] == ["INFO:     Started server process"]  # uvicorn's own, as before


def _lines(stream: IO[str], into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)
    into.put("")  # end of output


def _wait_for(lines: queue.Queue[str], seen: list[str], text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if text in line:
            return line
        if not line:
            break
    raise AssertionError(f"no {text!r} in the gateway's output:\n{''.join(seen)}")


def test_sighup_leaves_a_single_worker_gateway_serving(tmp_path: Path) -> None:
    """`python -m gateway serve` with one worker (the default), no Triton needed: the instance's
    port is bound but not listening, so connections to it are refused and it is marked down."""
    with socket.socket() as unreachable:
        unreachable.bind(("127.0.0.1", 0))
        config = tmp_path / "gateway.toml"
        config.write_text(
            "[server]\nport = 0\nshutdown_grace_s = 1.0\n"
            f'[upstream]\ninstances = [{{ url = "http://127.0.0.1:{unreachable.getsockname()[1]}" }}]\n'
        )
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert gateway.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=_lines, args=(gateway.stdout, lines), daemon=True)
        reader.start()
        seen: list[str] = []
        try:
            started = _wait_for(lines, seen, "Uvicorn running on http://")
            url = started.split("running on ", 1)[1].split()[0]
            gateway.send_signal(signal.SIGHUP)
            _wait_for(lines, seen, "SIGHUP ignored")
            with urllib.request.urlopen(f"{url}/v2/health/live", timeout=5) as answer:  # still serving
                assert answer.status == 200
            assert gateway.poll() is None
            gateway.send_signal(signal.SIGTERM)
            _wait_for(lines, seen, "Application shutdown complete")  # a graceful stop, as before
            # uvicorn raises the signal it stopped for again once it has shut down.
            assert gateway.wait(timeout=15) in (0, -signal.SIGTERM)
        finally:
            if gateway.poll() is None:
                gateway.kill()
                gateway.wait()
            reader.join(timeout=5)
            gateway.stdout.close()
