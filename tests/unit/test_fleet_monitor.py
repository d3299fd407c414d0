"""Membership by DNS and active health probes, with a fake Triton client and a fake resolver."""

from __future__ import annotations

import orjson
import pytest

from gateway.config import InstanceConfig, UpstreamConfig
from gateway.instances import Instance
from gateway.router import Router
from gateway.upstream.client import InstanceUnreachable, RawResponse
from gateway.upstream.fleet import FleetMonitor, instance_url, ready_models

INDEX = [
    {"name": "digits_cnn", "version": "1", "state": "READY"},
    {"name": "digits_cnn", "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"},
    {"name": "mlp", "version": "3", "state": "READY"},
]


class FakeClient:
    def __init__(self) -> None:
        self.down: set[str] = set()
        self.not_ready: set[str] = set()
        self.index: dict[str, list] = {}
        self.forgotten: list[str] = []
        self.counts: dict[tuple[str, str, str], int] = {}
        self.not_live: set[str] = set()  # answers /v2/health/live with 503
        self.abandoned: list[str] = []

    async def get(self, url: str, path: str, timeout: float | None = None, capped: bool = True) -> RawResponse:
        assert not capped  # probes never wait behind the requests they judge
        if url in self.down:
            raise InstanceUnreachable(f"{url}: refused", connect_failed=True)
        if path == "/v2/health/live" and url in self.not_live:
            return RawResponse(503, b"")
        if path == "/v2/health/ready" and url in self.not_ready:
            return RawResponse(400, b"")
        if path == "/v2/models/stats":
            stats = [{"name": m, "version": v, "inference_count": n} for (u, m, v), n in self.counts.items() if u == url]
            return RawResponse(200, orjson.dumps({"model_stats": stats}))
        return RawResponse(200, b"")

    async def request(self, method, url, path, body=b"", headers=b"", timeout=None, capped=True):  # noqa: ANN001, ANN201
        assert (method, path) == ("POST", "/v2/repository/index") and orjson.loads(body) == {"ready": True}
        assert not capped
        return RawResponse(200, orjson.dumps(self.index.get(url, INDEX))), None

    def forget(self, url: str) -> None:
        self.forgotten.append(url)

    def abandon(self, url: str, reason: str, quiet_for: float = 0.0) -> int:
        assert quiet_for == 2.0  # the probe's own time limit (health_timeout_s)
        self.abandoned.append(url)
        return 3


class Clock:
    now = 50.0

    def __call__(self) -> float:
        return self.now


def monitor(instances: tuple[InstanceConfig, ...], addresses: dict[str, list[str]] | None = None):  # noqa: ANN201
    client = FakeClient()
    router = Router([], client)  # type: ignore[arg-type]
    names = addresses if addresses is not None else {}

    async def resolver(host: str, port: int) -> list[str]:
        if host not in names:
            raise OSError(f"cannot resolve {host}")
        return names[host]

    m = FleetMonitor(UpstreamConfig(instances=instances, health_timeout_s=2.0), client, router, resolver=resolver, clock=Clock())  # type: ignore[arg-type]
    return m, client, router, names


def test_ready_models_keeps_ready_versions_only() -> None:
    assert ready_models(INDEX) == {"digits_cnn": frozenset({"1"}), "mlp": frozenset({"3"})}
    with pytest.raises(ValueError):
        ready_models({"not": "a list"})


def test_instance_urls_bracket_ipv6() -> None:
    assert instance_url("10.0.0.7", 8000) == "http://10.0.0.7:8000"
    assert instance_url("fd00::7", 8000) == "http://[fd00::7]:8000"


async def test_probes_set_liveness_readiness_and_the_models_each_instance_holds() -> None:
    m, client, router, _ = monitor((InstanceConfig(url="http://a:1"), InstanceConfig(url="http://b:1", weight=3)))
    client.not_ready.add("http://b:1")
    client.index["http://b:1"] = [{"name": "mlp", "version": "3", "state": "READY"}]
    await m.start()
    a, b = router.instances
    assert (a.url, a.weight, b.url, b.weight) == ("http://a:1", 1.0, "http://b:1", 3.0)
    assert a.live and a.ready and a.models == {"digits_cnn": frozenset({"1"}), "mlp": frozenset({"3"})}
    assert b.live and not b.ready and b.models == {"mlp": frozenset({"3"})}
    client.down.add("http://a:1")
    await m.check_all()
    assert a.state == "down" and not a.ready and a.models is not None  # the last index is kept
    client.down.clear()
    await m.check_all()
    assert a.state == "up"


async def test_requests_in_flight_are_given_up_when_an_up_instance_stops_answering_probes() -> None:
    m, client, router, _ = monitor((InstanceConfig(url="http://a:1"), InstanceConfig(url="http://b:1")))
    await m.start()
    client.not_live.add("http://b:1")  # answers, "not live": left to answer what it holds
    client.down.add("http://a:1")  # no answer at all
    await m.check_all()
    assert [i.state for i in router.instances] == ["down", "down"]
    assert client.abandoned == ["http://a:1"]
    await m.check_all()  # still down: nothing new in flight there to give up
    assert client.abandoned == ["http://a:1"]


async def test_each_health_round_wakes_the_requests_waiting_for_a_slot() -> None:
    m, client, router, _ = monitor((InstanceConfig(url="http://a:1"),))
    await m.start()
    woken: list[bool] = []
    router.wake = lambda: woken.append(router.instances[0].routable)  # type: ignore[method-assign]
    await m.check_all()
    assert woken == [True]  # after the probes: they see the instances as the round left them


async def test_a_dns_name_becomes_one_instance_per_address_and_follows_changes() -> None:
    m, client, router, names = monitor(
        (InstanceConfig(dns="triton", port=8000, weight=2), InstanceConfig(url="http://fixed:1")),
        {"triton": ["10.0.0.1", "10.0.0.2"]},
    )
    await m.start()
    assert [i.url for i in router.instances] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://fixed:1"]
    assert all(i.weight == 2 for i in router.instances[:2])
    kept = router.instances[1]
    kept.requests = 7
    names["triton"] = ["10.0.0.2", "10.0.0.3"]
    await m.discover()
    assert [i.url for i in router.instances] == ["http://10.0.0.2:8000", "http://10.0.0.3:8000", "http://fixed:1"]
    assert router.instances[0] is kept and kept.requests == 7  # known instances keep their state
    assert client.forgotten == ["http://10.0.0.1:8000"]
    del names["triton"]  # DNS fails: the last addresses stay
    await m.discover()
    assert [i.url for i in router.instances][:2] == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]


async def test_an_ejected_instance_returns_after_a_successful_probe_once_its_time_is_over() -> None:
    m, client, router, _ = monitor((InstanceConfig(url="http://a:1"), InstanceConfig(url="http://b:1")))
    await m.start()
    a: Instance = router.instances[0]
    a.ejected_until = 60.0
    await m.check_all()  # clock at 50: still out
    assert a.state == "ejected"
    m._clock.now = 61.0  # type: ignore[attr-defined]
    await m.check_all()
    assert a.state == "up"


async def test_a_version_no_instance_holds_any_more_is_reported_gone() -> None:
    gone: list[tuple[str, str]] = []
    m, client, router, _ = monitor((InstanceConfig(url="http://a:1"), InstanceConfig(url="http://b:1")))
    m._on_version_gone = lambda model, version: gone.append((model, version))  # type: ignore[attr-defined]
    await m.start()
    client.index["http://a:1"] = [{"name": "mlp", "version": "3", "state": "READY"}]
    await m.check_all()
    assert gone == []  # b still holds digits_cnn 1
    client.index["http://b:1"] = [{"name": "mlp", "version": "3", "state": "READY"}]
    await m.check_all()
    assert gone == [("digits_cnn", "1")]


async def test_a_version_reloaded_in_place_is_reported_so_its_cached_results_go() -> None:
    gone: list[tuple[str, str]] = []
    m, client, router, _ = monitor((InstanceConfig(url="http://a:1"),))
    m._on_version_gone = lambda model, version: gone.append((model, version))  # type: ignore[attr-defined]
    m._watch_reloads = True  # type: ignore[attr-defined]
    client.counts[("http://a:1", "digits_cnn", "1")] = 10
    await m.start()
    client.counts[("http://a:1", "digits_cnn", "1")] = 25  # served more: the same model object
    await m.check_all()
    assert gone == []
    client.counts[("http://a:1", "digits_cnn", "1")] = 3  # counting from zero again: reloaded
    await m.check_all()
    assert gone == [("digits_cnn", "1")]
