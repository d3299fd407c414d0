"""Config loading: every mistake is named; cross-field rules hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config

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
        ({**BASE, "upstream": {**BASE["upstream"], "max_tries": 0}}, "upstream.max_tries must be >= 1"),
        ({**BASE, "upstream": {**BASE["upstream"], "max_inflight_per_instance": 0}}, "max_inflight_per_instance"),
        ({**BASE, "upstream": {**BASE["upstream"], "health_timeout_s": 0.0}}, "upstream.health_timeout_s must be > 0"),
        ({**BASE, "upstream": {**BASE["upstream"], "eject_max_s": 1.0}}, "eject_max_s >= eject_base_s"),
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
        ({**BASE, "batching": {"hold_ms": float("nan")}}, "batching.hold_ms must be >= 0"),
        ({**BASE, "batching": {"models": {"m": {"hold_ms": 40000.0}}}}, "batching.models.m.hold_ms must be shorter than"),
        ({**BASE, "batching": {"hold_cpu_busy": 1.5}}, "batching.hold_cpu_busy must be in [0, 1]"),
        ({**BASE, "batching": {"hold_cpu_busy": float("nan")}}, "batching.hold_cpu_busy must be in [0, 1]"),
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
        ({"slow": {"max_batch_size": 0}}, "batching.models.slow: max_batch_size"),
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
    rollout.write_text('[models.m]\nstable = "1"\n')
    assert load_config(config).rollout.file == str(rollout)
