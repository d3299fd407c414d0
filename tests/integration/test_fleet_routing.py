"""Fleet routing against real Triton servers: weights, instances that lack a model version, an
instance killed or frozen under load, client deadlines, and the fleet view (GET /v2/gateway/fleet).

Ground truth is each instance's own statistics (GET /v2/models/{m}/stats on the instance itself,
not through the gateway), every answer is checked against a known one (a torch forward pass of
the served weights, or y = 2x for the emulated fixed-latency model), and where "never sent
upstream" must be shown, a request sent after the one in question proves it (Triton executes
in order, so once the later one is counted, the earlier one would be too).

Ports: Triton fleets 8120..8129 (gRPC +100, metrics +200), gateways 8130..8139.
"""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import shutil
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

import fleet
from conftest import MODEL_REPOSITORY, REPO_ROOT, GatewayProcess, Stack, gateway_config, running_fleet, running_gateway
from served_models import ATOL, DIGITS, torch_reference

pytestmark = pytest.mark.integration

T = TypeVar("T")

FIXED_LATENCY = REPO_ROOT / "triton" / "emulated" / "fixed_latency"
FLEET_PATH = "/v2/gateway/fleet"
# Models loaded once at start, never polled: in poll mode Triton reloads a copied model (and
# resets its statistics) when the Python backend writes model.py's __pycache__ into the copy.
FIXED_MODELS = {"model_control_mode": "none"}
VIEW_KEYS = {
    "url": str, "weight": (int, float), "state": str, "live": bool, "ready": bool, "inflight": int,
    "requests": int, "failures": int, "consecutive_failures": int, "ejections": int,
    "ejected_for_s": (int, float), "recent_errors": list, "models": dict,
}  # fmt: skip


# --- model repositories -----------------------------------------------------------------------


def build_repository(root: Path, digits_versions: Sequence[str] = (), fixed_latency_ms: int | None = None) -> Path:
    """A temporary model repository: digits_cnn with the given versions (each one a copy of the
    served version 1, weights included), and/or the emulated fixed_latency model with its delay."""
    root.mkdir(parents=True)
    if digits_versions:
        src, dst = MODEL_REPOSITORY / "digits_cnn", root / "digits_cnn"
        dst.mkdir()
        shutil.copy(src / "config.pbtxt", dst / "config.pbtxt")
        for version in digits_versions:
            shutil.copytree(src / "1", dst / version, ignore=shutil.ignore_patterns("__pycache__"))
    if fixed_latency_ms is not None:
        dst = root / "fixed_latency"
        shutil.copytree(FIXED_LATENCY, dst, ignore=shutil.ignore_patterns("__pycache__"))
        config = dst / "config.pbtxt"
        default = 'key: "delay_ms"\n  value: { string_value: "10" }'
        text = config.read_text()
        assert default in text, "fixed_latency's config.pbtxt no longer sets delay_ms as expected"
        config.write_text(text.replace(default, default.replace('"10"', f'"{fixed_latency_ms}"')))
    return root


# --- ground truth: each Triton instance's own statistics and repository index ----------------


@dataclass(frozen=True)
class Counts:
    """One model's statistics on one instance: requests Triton completed (each HTTP request once,
    whatever its rows), requests it failed, rows inferred, and executions (batches it ran)."""

    requests: int = 0
    failed: int = 0
    rows: int = 0
    executions: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def __sub__(self, other: Counts) -> Counts:
        return Counts(*(a - b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, int, int, int]:
        return self.requests, self.failed, self.rows, self.executions


def parse_counts(stats: dict, model: str) -> dict[str, Counts]:
    return {
        s["version"]: Counts(
            int(s["inference_stats"]["success"]["count"]),
            int(s["inference_stats"]["fail"]["count"]),
            int(s["inference_count"]),
            int(s["execution_count"]),
        )
        for s in stats["model_stats"]
        if s["name"] == model
    }


def triton_counts(url: str, model: str) -> dict[str, Counts]:
    """Per version, straight from the instance."""
    resp = httpx.get(f"{url}/v2/models/{model}/stats", timeout=10)
    assert resp.status_code == 200, f"{url}: {resp.status_code} {resp.text}"
    return parse_counts(resp.json(), model)


def triton_total(url: str, model: str) -> Counts:
    return sum(triton_counts(url, model).values(), Counts())


def ready_models(url: str) -> dict[str, list[str]]:
    """{model: sorted versions} that the instance's repository index says are READY."""
    resp = httpx.post(f"{url}/v2/repository/index", json={}, timeout=10)
    assert resp.status_code == 200, resp.text
    models: dict[str, list[str]] = {}
    for entry in resp.json():
        if entry.get("state") == "READY":
            models.setdefault(entry["name"], []).append(entry["version"])
    return {name: sorted(versions) for name, versions in models.items()}


# --- the gateway's fleet view -----------------------------------------------------------------


def check_view(body: Any) -> dict[str, dict]:
    assert isinstance(body, dict) and isinstance(body.get("instances"), list), body
    for inst in body["instances"]:
        for key, kind in VIEW_KEYS.items():
            assert key in inst and isinstance(inst[key], kind), f"fleet view: {key!r} missing or mistyped in {inst}"
        assert inst["state"] in ("up", "down", "ejected"), inst
    return {inst["url"]: inst for inst in body["instances"]}


def fleet_view(gw: GatewayProcess) -> dict[str, dict]:
    """The gateway's view of each instance, by url."""
    resp = httpx.get(gw.url + FLEET_PATH, timeout=10)
    assert resp.status_code == 200, f"GET {FLEET_PATH}: {resp.status_code} {resp.text[:500]}"
    return check_view(resp.json())


async def fleet_view_async(http: httpx.AsyncClient) -> dict[str, dict]:
    resp = await http.get(FLEET_PATH)
    assert resp.status_code == 200, f"GET {FLEET_PATH}: {resp.status_code} {resp.text[:500]}"
    return check_view(resp.json())


def wait_until(what: str, probe: Callable[[], T], ok: Callable[[T], bool], timeout: float, interval: float = 0.05) -> T:
    """Poll ``probe`` until ``ok`` holds for its value; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s; last seen: {value}")
        time.sleep(interval)


async def wait_until_async(
    what: str, probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float, interval: float = 0.01
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s; last seen: {value}")
        await asyncio.sleep(interval)


# --- requests with known answers, and closed-loop load ----------------------------------------


@dataclass(frozen=True)
class Case:
    """One infer request through the gateway (v2 JSON) and how to check its answer."""

    path: str
    body: dict
    check: Callable[[dict], str | None]  # the response body -> what is wrong with it, or None
    rows: int


def fixed_latency_body(x: np.ndarray, timeout_us: Any = None) -> dict:
    body: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    if timeout_us is not None:
        body["parameters"] = {"timeout": timeout_us}
    return body


def fixed_latency_problem(answer: dict, x: np.ndarray) -> str | None:
    out = {o["name"]: o for o in answer.get("outputs", [])}
    if "y" not in out:
        return f"no output y in {answer}"
    y = np.asarray(out["y"]["data"], np.float32).reshape(x.shape)
    return None if np.array_equal(y, 2 * x) else f"y = {y.tolist()} for x = {x.tolist()}"


def fixed_latency_cases(n: int, rows: int = 1, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        x = (rng.integers(-400, 400, size=(rows, 4)) / 4).astype(np.float32)  # exact in float32 and JSON
        cases.append(
            Case("/v2/models/fixed_latency/infer", fixed_latency_body(x), lambda a, x=x: fixed_latency_problem(a, x), rows)
        )
    return cases


def digits_cases(n: int, version: str = "", sizes: Sequence[int] = (1, 2, 3)) -> list[Case]:
    """Requests of real held-out images (``sizes`` in turn), answers checked against torch."""
    x = DIGITS.splits().x_test
    _, probs = torch_reference(DIGITS.name, x)
    path = f"/v2/models/{DIGITS.name}" + (f"/versions/{version}" if version else "") + "/infer"
    cases, start = [], 0
    for k in range(n):
        rows = sizes[k % len(sizes)]
        start = (start + rows) % (len(x) - rows)
        xs, expected = x[start : start + rows], probs[start : start + rows]
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(xs.shape), "data": xs.ravel().tolist()}],
                "outputs": [{"name": "probabilities"}]}  # fmt: skip

        def check(answer: dict, expected: np.ndarray = expected) -> str | None:
            if version and answer.get("model_version") != version:
                return f"asked for version {version}, answered by {answer.get('model_version')}"
            out = {o["name"]: o for o in answer.get("outputs", [])}
            if "probabilities" not in out:
                return f"no probabilities in {answer}"
            got = np.asarray(out["probabilities"]["data"], np.float32).reshape(expected.shape)
            return None if np.allclose(got, expected, atol=ATOL, rtol=0) else "wrong probabilities"

        cases.append(Case(path, body, check, rows))
    return cases


class Load:
    """Closed-loop clients sending ``cases`` (round robin) through the gateway, each checking its
    answers, until stopped or ``count`` requests were sent. They run on a thread of their own so
    that the test's main thread stays free to kill and restart Triton instances (a server started
    from a thread is killed when that thread ends, see triton/fleet.py)."""

    def __init__(self, url: str, cases: Sequence[Case], concurrency: int, count: int | None = None) -> None:
        self.url, self.cases, self.concurrency, self.count = url, list(cases), concurrency, count
        self.ok = 0
        self.failures: list[str] = []
        self.slowest = 0.0  # seconds, the longest any request took
        self._sent = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "load clients did not stop"
        if self._error is not None:
            raise self._error

    def wait(self, timeout: float) -> None:
        """Until ``count`` requests were answered."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self.ok} of {self.count} requests answered after {timeout}s"
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by stop()
            self._error = exc

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as http:
            await asyncio.gather(*(self._client(http) for _ in range(self.concurrency)))

    async def _client(self, http: httpx.AsyncClient) -> None:
        while not self._stop.is_set() and (self.count is None or self._sent < self.count):
            case = self.cases[self._sent % len(self.cases)]
            self._sent += 1
            start = time.monotonic()
            try:
                resp = await http.post(case.path, json=case.body)
            except httpx.HTTPError as exc:
                self.failures.append(f"{case.path}: {type(exc).__name__}: {exc}")
                continue
            finally:
                self.slowest = max(self.slowest, time.monotonic() - start)
            problem = f"{resp.status_code} {resp.text[:300]}" if resp.status_code != 200 else case.check(resp.json())
            if problem:
                self.failures.append(f"{case.path}: {problem}")
            else:
                self.ok += 1


# --- 1 and 6: weights, and the fleet view -----------------------------------------------------


WEIGHTS = (3, 1)


@pytest.fixture(scope="class")
def weighted_stack(triton_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two instances serving digits_cnn and the emulated fixed_latency model, weights 3 and 1."""
    tmp = tmp_path_factory.mktemp("weights")
    repo = build_repository(tmp / "repo", digits_versions=["1"], fixed_latency_ms=10)
    with running_fleet(2, 8120, repository=repo, log_dir=tmp / "triton", **FIXED_MODELS) as triton:
        with running_gateway(gateway_config(triton.http_urls, 8130, weights=WEIGHTS), 8130, tmp) as gw:
            yield Stack(triton, gw)


class TestWeightsAndFleetView:
    def test_weights_3_to_1_split_traffic_75_25(self, weighted_stack: Stack) -> None:
        # digits_cnn takes about a millisecond a batch: both instances keep capacity to spare, as
        # the contract's "equally fast" means. (With the 10 ms model, closed-loop clients keep
        # the weight-3 instance saturated, and a load-aware balancer rightly gives it less.)
        stack = weighted_stack
        urls = stack.triton.http_urls
        cases = digits_cases(64, sizes=[1])
        with Load(stack.gateway.url, cases[:4], concurrency=4, count=16) as warm:  # metadata, connections
            warm.wait(60)
        assert warm.failures == []
        before = [triton_total(u, "digits_cnn") for u in urls]
        n = 2000
        with Load(stack.gateway.url, cases, concurrency=8, count=n) as load:
            load.wait(120)
        delta = [triton_total(u, "digits_cnn") - b for u, b in zip(urls, before)]
        assert load.failures == [] and load.ok == n
        rows = [d.rows for d in delta]
        assert sum(rows) == n, f"{n} rows sent, Triton inferred {rows}"  # each row once: nothing lost or repeated
        share = rows[0] / n
        assert 0.70 <= share <= 0.80, (
            f"weight-3 instance got {share:.1%} of the rows (want 75% +/- 5); rows {rows}, "
            f"upstream requests {[d.requests for d in delta]}, executions {[d.executions for d in delta]}"
        )

    def test_fleet_view_shows_instances_weights_models_and_moving_counters(self, weighted_stack: Stack) -> None:
        stack = weighted_stack
        urls = stack.triton.http_urls
        view = fleet_view(stack.gateway)
        assert sorted(view) == sorted(urls)
        for url, weight in zip(urls, WEIGHTS):
            inst = view[url]
            assert inst["weight"] == weight, inst
            assert (inst["state"], inst["live"], inst["ready"]) == ("up", True, True), inst
            assert (inst["failures"], inst["consecutive_failures"], inst["ejections"]) == (0, 0, 0), inst
            assert inst["ejected_for_s"] == 0 and inst["recent_errors"] == [], inst
            models = {m: sorted(v) for m, v in inst["models"].items()}
            assert models == ready_models(url) == {"digits_cnn": ["1"], "fixed_latency": ["1"]}, inst

        def upstream_requests() -> list[int]:
            return [sum(c.requests for m in ("digits_cnn", "fixed_latency") for c in triton_counts(u, m).values()) for u in urls]

        triton_before = upstream_requests()
        with Load(stack.gateway.url, digits_cases(40) + fixed_latency_cases(40), concurrency=4, count=80) as load:
            load.wait(60)
        assert load.failures == []
        triton_delta = [a - b for a, b in zip(upstream_requests(), triton_before)]
        after = wait_until(
            "nothing in flight", lambda: fleet_view(stack.gateway), lambda v: all(v[u]["inflight"] == 0 for u in urls), 10
        )
        gateway_delta = [after[u]["requests"] - view[u]["requests"] for u in urls]
        # Every upstream request the gateway counts for an instance is one that instance executed.
        assert gateway_delta == triton_delta and sum(gateway_delta) > 0, (gateway_delta, triton_delta)
        for url in urls:
            assert after[url]["state"] == "up" and after[url]["failures"] == 0, after[url]


# --- 2: an instance that lacks a model version ------------------------------------------------


class RecordingProxy:
    """A plain HTTP/1.1 forwarder in front of one Triton instance that records every request the
    gateway sends it: the ground truth of what an instance was asked, including requests Triton
    would refuse without counting them anywhere."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}

    def __init__(self, upstream: str) -> None:
        self.requests: list[tuple[str, str]] = []
        target = urlsplit(upstream)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=60)

            def finish(self) -> None:
                self.upstream.close()
                super().finish()

            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.requests.append((self.command, self.path))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP}
                try:
                    self.upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = self.upstream.getresponse()
                    status, reply_headers, data = resp.status, resp.getheaders(), resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    self.upstream.close()
                    status, data = 502, f'{{"error": "proxy: {exc}"}}'.encode()
                    reply_headers = [("Content-Type", "application/json")]
                self.send_response(status)
                for k, v in reply_headers:
                    if k.lower() not in proxy.HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def infers(self, since: int = 0) -> list[str]:
        """Paths of the infer requests received since the ``since``-th request."""
        return [p for m, p in self.requests[since:] if m == "POST" and p.endswith("/infer")]


def test_instance_without_a_version_gets_none_of_its_traffic(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    a = fleet_factory(1, 8122, repository=build_repository(tmp_path / "a", digits_versions=["1", "2"]), **FIXED_MODELS)
    b = fleet_factory(1, 8123, repository=build_repository(tmp_path / "b", digits_versions=["1"]), **FIXED_MODELS)
    assert ready_models(a.http_urls[0]) == {"digits_cnn": ["1", "2"]}
    assert ready_models(b.http_urls[0]) == {"digits_cnn": ["1"]}
    with RecordingProxy(a.http_urls[0]) as pa, RecordingProxy(b.http_urls[0]) as pb:
        with running_gateway(gateway_config([pa.url, pb.url], 8131), 8131, tmp_path) as gw:
            want = {pa.url: {"digits_cnn": ["1", "2"]}, pb.url: {"digits_cnn": ["1"]}}
            wait_until(
                "fleet view lists each instance's versions",
                lambda: fleet_view(gw),
                lambda v: all({m: sorted(vs) for m, vs in v[u]["models"].items()} == models for u, models in want.items()),
                10,
            )
            v1, v2 = digits_cases(60, version="1"), digits_cases(60, version="2")
            with Load(gw.url, [v1[0], v2[0]], concurrency=2, count=4) as warm:  # metadata of both versions
                warm.wait(60)
            assert warm.failures == []
            before_a, before_b = triton_counts(a.http_urls[0], "digits_cnn"), triton_counts(b.http_urls[0], "digits_cnn")
            asked_a, asked_b = len(pa.requests), len(pb.requests)
            # Alternately version 1 and version 2, then version 1 alone (with version 2 keeping A
            # busy, least-loaded routing rightly sends most version 1 traffic to B).
            mixed = [c for pair in zip(v1, v2) for c in pair]
            sent: list[Case] = []
            for cases, n in ((mixed, 400), (v1, 200)):
                with Load(gw.url, cases, concurrency=8, count=n) as load:
                    load.wait(120)
                assert load.failures == [] and load.ok == n
                sent += [cases[k % len(cases)] for k in range(n)]
            rows = {v: sum(c.rows for c in sent if f"/versions/{v}/" in c.path) for v in ("1", "2")}
            after_a, after_b = triton_counts(a.http_urls[0], "digits_cnn"), triton_counts(b.http_urls[0], "digits_cnn")
            a_asked, b_asked = pa.infers(asked_a), pb.infers(asked_b)
            # No version named: pinned to the newest version every instance holds (1): version 2
            # is not loaded across the fleet, so it is not the default; one version answers all.
            asked_b_unversioned = len(pb.requests)
            with httpx.Client(base_url=gw.url, timeout=30) as http:
                for case in digits_cases(12):
                    resp = http.post(case.path, json=case.body)
                    assert resp.status_code == 200 and resp.json()["model_version"] == "1", resp.text
                    assert case.check(resp.json()) is None
            assert len(pb.infers(asked_b_unversioned)) > 0  # both instances serve version 1

    # Version 2: every row on A, none on B, and B was never even asked for it.
    assert "2" not in after_b, after_b
    assert after_a["2"].rows - before_a["2"].rows == rows["2"]
    assert [p for p in b_asked if p != "/v2/models/digits_cnn/versions/1/infer"] == []
    v2_on_a = [p for p in a_asked if p == "/v2/models/digits_cnn/versions/2/infer"]
    assert len(v2_on_a) == after_a["2"].requests - before_a["2"].requests > 0
    # Version 1: on both instances, each row once.
    v1_a, v1_b = after_a["1"].rows - before_a["1"].rows, after_b["1"].rows - before_b["1"].rows
    assert v1_a + v1_b == rows["1"], (v1_a, v1_b, rows["1"])
    assert v1_a >= 0.1 * rows["1"] and v1_b >= 0.1 * rows["1"], f"version 1 rows: A {v1_a}, B {v1_b}"


# --- 3 and 4: an instance killed, or frozen, under load ---------------------------------------


def wait_served(url: str, model: str, since: Counts, at_least: int, timeout: float) -> Counts:
    """Until the instance has completed ``at_least`` more requests than ``since``."""
    return wait_until(
        f"{url} serves {at_least} more requests",
        lambda: triton_total(url, model),
        lambda c: c.requests - since.requests >= at_least,
        timeout,
    )


def test_killed_instance_loses_no_request_and_rejoins_after_restart(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    triton = fleet_factory(2, 8124, repository=build_repository(tmp_path / "repo", digits_versions=["1"]), **FIXED_MODELS)
    urls = triton.http_urls
    config = gateway_config(urls, 8132, upstream={"health_interval_s": 0.5})
    duration = 20.0
    with running_gateway(config, 8132, tmp_path) as gw, Load(gw.url, digits_cases(64), concurrency=16) as load:
        for url in urls:  # both serve before the kill
            wait_served(url, "digits_cnn", Counts(), 20, 15)
        triton.kill(1)  # SIGKILL: connections refused from now on
        view = wait_until("killed instance marked down", lambda: fleet_view(gw), lambda v: v[urls[1]]["state"] == "down", 5)
        survivor = triton_total(urls[0], "digits_cnn")
        wait_served(urls[0], "digits_cnn", survivor, 100, 15)  # traffic moved to the survivor
        # Routing skips the dead one: no attempt on it while it is down.
        assert fleet_view(gw)[urls[1]]["requests"] == view[urls[1]]["requests"]
        assert load.failures == []

        triton.restart(1)  # from the main thread: a server dies with the thread that started it
        wait_until("restarted instance up again", lambda: fleet_view(gw), lambda v: v[urls[1]]["state"] == "up", 10)
        # A new process: its statistics start from zero. More than the clients' concurrency, so
        # that it is new traffic being routed there.
        wait_served(urls[1], "digits_cnn", Counts(), 50, 15)
        remaining = duration - (time.monotonic() - load.started)
        if remaining > 0:
            time.sleep(remaining)  # the load runs its full length: the stretch after the rejoin counts too
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.ok >= 500, load.ok


def test_frozen_instance_is_ejected_and_readmitted_after_it_thaws(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    triton = fleet_factory(2, 8126, repository=build_repository(tmp_path / "repo", digits_versions=["1"]), **FIXED_MODELS)
    urls = triton.http_urls
    upstream = {
        "request_timeout_s": 1.0, "health_interval_s": 0.5, "health_timeout_s": 3.0,
        "eject_after_failures": 2, "eject_base_s": 1.0, "eject_max_s": 5.0, "max_ejected_share": 0.5,
    }  # fmt: skip
    # Unbatched, so that several requests are in flight on the instance when it freezes: their
    # timeouts are the consecutive failures that eject it. The probes wait longer (3 s) than the
    # requests (1 s): a probe marking the instance down first would leave nothing to eject (down
    # instances count as out), which made this test fail a CI run.
    config = gateway_config(urls, 8133, upstream=upstream, batching={"enabled": False})
    with running_gateway(config, 8133, tmp_path) as gw, Load(gw.url, digits_cases(64), concurrency=8) as load:
        for url in urls:
            wait_served(url, "digits_cnn", Counts(), 20, 15)
        triton.kill(1, signal.SIGSTOP)
        try:
            view = wait_until(
                "frozen instance ejected",
                lambda: fleet_view(gw),
                lambda v: v[urls[1]]["state"] != "up" and v[urls[1]]["ejections"] >= 1,
                10,
            )
            survivor = triton_total(urls[0], "digits_cnn")
            wait_served(urls[0], "digits_cnn", survivor, 100, 15)
            # Frozen for longer than its ejection lasts (eject_base_s): failed probes keep it out.
            hold = time.monotonic() + 3.0
            while time.monotonic() < hold:
                now = fleet_view(gw)[urls[1]]
                assert now["state"] != "up" and now["requests"] == view[urls[1]]["requests"], now
                time.sleep(0.2)
            assert load.failures == [], load.failures[:5]
        finally:
            triton.kill(1, signal.SIGCONT)
        wait_until("thawed instance re-admitted", lambda: fleet_view(gw), lambda v: v[urls[1]]["state"] == "up", 10)
        # It answers the requests it held while frozen (timed out at the gateway, at most the
        # clients' concurrency) at once; beyond those, new traffic.
        thawed = triton_total(urls[1], "digits_cnn")
        wait_served(urls[1], "digits_cnn", thawed, 50, 15)
        load.stop()
    assert load.failures == [], load.failures[:5]


def test_requests_in_flight_on_an_instance_that_freezes_are_retried_elsewhere_at_once(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    triton = fleet_factory(2, 8126, repository=build_repository(tmp_path / "repo", digits_versions=["1"]), **FIXED_MODELS)
    urls = triton.http_urls
    # An attempt may take 30 s; the probes give up after 0.5 s. Ejection is out of the way.
    upstream = {"request_timeout_s": 30.0, "health_interval_s": 0.5, "health_timeout_s": 0.5, "eject_after_failures": 1000}
    config = gateway_config(urls, 8133, upstream=upstream, batching={"enabled": False})  # several in flight on each
    with running_gateway(config, 8133, tmp_path) as gw, Load(gw.url, digits_cases(64), concurrency=8) as load:
        for url in urls:
            wait_served(url, "digits_cnn", Counts(), 20, 15)
        triton.kill(1, signal.SIGSTOP)
        try:
            wait_until("frozen instance down", lambda: fleet_view(gw), lambda v: v[urls[1]]["state"] == "down", 10)
            survivor = triton_total(urls[0], "digits_cnn")
            wait_served(urls[0], "digits_cnn", survivor, 100, 15)
            # The requests it held when it froze were given up when the probe found it gone
            # (each a failed attempt of that instance), and answered by the other one: no client
            # waited for the 30 s an attempt may take. The load stops while it is still frozen.
            assert fleet_view(gw)[urls[1]]["failures"] >= 1
            load.stop()
        finally:
            triton.kill(1, signal.SIGCONT)
    assert load.failures == [], load.failures[:5]
    assert load.slowest < 10.0, load.slowest


# --- 5: deadlines -----------------------------------------------------------------------------


SLOW_MS = 500  # the emulated model's time per batch: the "busy" request the others queue behind


@pytest.fixture(scope="class")
def slow_stack(triton_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One instance of a slow model, at most one request in flight on it (TestDeadlines)."""
    tmp = tmp_path_factory.mktemp("deadlines")
    repo = build_repository(tmp / "repo", fixed_latency_ms=SLOW_MS)
    with running_fleet(1, 8128, repository=repo, log_dir=tmp / "triton", **FIXED_MODELS) as triton:
        config = gateway_config(triton.http_urls, 8134, upstream={"max_inflight_per_instance": 1})
        with running_gateway(config, 8134, tmp) as gw:
            yield Stack(triton, gw)


class TestDeadlines:
    """One instance of a slow model, at most one request in flight on it: the others wait in the
    gateway's queue."""

    @pytest.fixture
    async def http(self, slow_stack: Stack) -> Any:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=slow_stack.gateway.url, timeout=30, limits=limits) as client:
            # Idle to start with: nothing of an earlier test still in flight.
            url = slow_stack.triton.http_urls[0]
            await wait_until_async("gateway idle", lambda: fleet_view_async(client), lambda v: v[url]["inflight"] == 0, 10)
            yield client

    @staticmethod
    async def infer(
        http: httpx.AsyncClient, x: np.ndarray, timeout_us: Any = None, header_ms: str | None = None
    ) -> tuple[httpx.Response, float, float]:
        """(response, seconds it took, when it came)."""
        headers = {"X-Request-Timeout-Ms": header_ms} if header_ms is not None else {}
        start = time.monotonic()
        resp = await http.post("/v2/models/fixed_latency/infer", json=fixed_latency_body(x, timeout_us), headers=headers)
        done = time.monotonic()
        return resp, done - start, done

    @staticmethod
    def x(seed: int, rows: int = 1) -> np.ndarray:
        return (np.random.default_rng(seed).integers(-400, 400, size=(rows, 4)) / 4).astype(np.float32)

    async def busy(self, http: httpx.AsyncClient, slow_stack: Stack) -> asyncio.Task:
        """A request without deadline, in flight upstream once this returns."""
        task = asyncio.create_task(self.infer(http, self.x(999)))
        url = slow_stack.triton.http_urls[0]
        await wait_until_async("busy request in flight", lambda: fleet_view_async(http), lambda v: v[url]["inflight"] >= 1, 5)
        return task

    async def served_since(self, http: httpx.AsyncClient, slow_stack: Stack, before: Counts, rows: int) -> Counts:
        """A last request, then Triton's counts since ``before`` once they include it: anything
        sent upstream before it has been executed by then."""
        x = self.x(12345)
        resp, _, _ = await self.infer(http, x)
        assert resp.status_code == 200 and fixed_latency_problem(resp.json(), x) is None, resp.text
        url = slow_stack.triton.http_urls[0]

        async def counts() -> Counts:
            return triton_total(url, "fixed_latency") - before

        return await wait_until_async("last request counted", counts, lambda c: c.rows >= rows + 1, 5)

    @staticmethod
    def assert_504(resp: httpx.Response) -> None:
        assert resp.status_code == 504, resp.text
        assert isinstance(resp.json().get("error"), str) and resp.json()["error"], resp.text

    async def test_expired_request_is_504_and_never_reaches_triton(self, slow_stack: Stack, http: httpx.AsyncClient) -> None:
        url = slow_stack.triton.http_urls[0]
        before = triton_total(url, "fixed_latency")
        self.assert_504((await self.infer(http, self.x(1), timeout_us=1))[0])  # 1 µs, as tritonclient sends it
        self.assert_504((await self.infer(http, self.x(2), header_ms="0.001"))[0])
        # Only the last request reached Triton.
        assert await self.served_since(http, slow_stack, before, 0) == Counts(requests=1, rows=1, executions=1)

    # Each waits behind the busy request with a 100 ms deadline: by header, by parameter, and as
    # the earlier of the two given together (either way round).
    EXPIRING = [
        {"header_ms": "100"},
        {"timeout_us": 100_000},
        {"timeout_us": 100_000, "header_ms": "5000"},
        {"timeout_us": 5_000_000, "header_ms": "100"},
    ]

    async def expire_behind_busy(self, http: httpx.AsyncClient, slow_stack: Stack, patient_x: np.ndarray | None) -> None:
        """The EXPIRING requests (and, if given, one with a 10 s deadline) queued behind a busy one:
        each expiring one gets 504 after its 100 ms, well before the busy one ends."""
        busy = await self.busy(http, slow_stack)
        queued = [asyncio.create_task(self.infer(http, self.x(10 + k), **d)) for k, d in enumerate(self.EXPIRING)]
        if patient_x is not None:
            patient = asyncio.create_task(self.infer(http, patient_x, timeout_us=10_000_000))
        expired = await asyncio.gather(*queued)
        busy_resp, _, busy_done = await busy
        assert busy_resp.status_code == 200 and fixed_latency_problem(busy_resp.json(), self.x(999)) is None
        for d, (resp, took, done) in zip(self.EXPIRING, expired):
            self.assert_504(resp)
            # Well before the busy one's 500 ms; the margin allows for a loaded machine.
            assert 0.1 <= took < 0.45, f"{d}: 504 after {took:.3f}s, for a 100 ms deadline"
            assert busy_done - done >= 0.1, f"{d}: 504 only {busy_done - done:.3f}s before the busy request ended"
        if patient_x is not None:
            resp, _, _ = await patient
            assert resp.status_code == 200 and fixed_latency_problem(resp.json(), patient_x) is None, resp.text

    async def test_deadline_passing_in_the_queue_is_504_before_the_busy_request_ends(
        self, slow_stack: Stack, http: httpx.AsyncClient
    ) -> None:
        before = triton_total(slow_stack.triton.http_urls[0], "fixed_latency")
        await self.expire_behind_busy(http, slow_stack, None)
        # Triton executed the busy one and the last one; none of the expired.
        assert await self.served_since(http, slow_stack, before, 1) == Counts(requests=2, rows=2, executions=2)

    async def test_expired_requests_are_not_sent_with_a_live_one_queued_beside_them(
        self, slow_stack: Stack, http: httpx.AsyncClient
    ) -> None:
        before = triton_total(slow_stack.triton.http_urls[0], "fixed_latency")
        await self.expire_behind_busy(http, slow_stack, self.x(20))  # and one with 10 s to spare, served
        # Triton executed the busy one, the one with time to spare and the last one; none of the
        # expired, although they queued together with one that was still wanted.
        delta = await self.served_since(http, slow_stack, before, 2)
        assert delta.rows == 3, f"{delta.rows - 3} expired row(s) sent upstream: {delta}"

    async def test_upstream_attempt_gets_only_the_remaining_time(self, slow_stack: Stack, http: httpx.AsyncClient) -> None:
        resp, took, _ = await self.infer(http, self.x(3), header_ms="200")  # the model takes 500 ms
        self.assert_504(resp)
        assert 0.2 <= took < 0.45, f"504 after {took:.3f}s for a 200 ms deadline on a {SLOW_MS} ms model"
        # Triton itself finishes it (nothing cancels an execution): wait for that, by a request
        # that Triton runs after it, so that the next test finds the instance idle.
        x = self.x(6)
        resp, _, _ = await self.infer(http, x)
        assert resp.status_code == 200 and fixed_latency_problem(resp.json(), x) is None, resp.text

    async def test_client_gone_while_queued_is_never_sent_upstream(self, slow_stack: Stack, http: httpx.AsyncClient) -> None:
        url = slow_stack.triton.http_urls[0]
        before = triton_total(url, "fixed_latency")
        busy = await self.busy(http, slow_stack)
        body = json.dumps(fixed_latency_body(self.x(4))).encode()
        head = (
            f"POST /v2/models/fixed_latency/infer HTTP/1.1\r\nHost: {slow_stack.gateway.hostport}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        host, port = slow_stack.gateway.hostport.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + body)
        await writer.drain()
        await asyncio.sleep(0.15)  # nothing observable says it has joined the queue: give it the time to
        assert not busy.done(), "the busy request ended before the client left: nothing was shown"
        writer.close()
        await writer.wait_closed()
        busy_resp, _, _ = await busy
        assert busy_resp.status_code == 200, busy_resp.text
        # The busy one and the last one; not the abandoned one.
        delta = await self.served_since(http, slow_stack, before, 1)
        assert delta == Counts(requests=2, rows=2, executions=2), f"{delta.rows - 2} abandoned row(s) sent upstream: {delta}"

    async def test_timeout_parameter_alone_does_not_stop_batching(self, slow_stack: Stack, http: httpx.AsyncClient) -> None:
        url = slow_stack.triton.http_urls[0]
        before = triton_total(url, "fixed_latency")
        busy = await self.busy(http, slow_stack)
        xs = [self.x(30 + k) for k in range(6)]
        answers = await asyncio.gather(*(self.infer(http, x, timeout_us=10_000_000) for x in xs))
        for x, (resp, _, _) in zip(xs, answers):
            assert resp.status_code == 200 and fixed_latency_problem(resp.json(), x) is None, resp.text
        assert (await busy)[0].status_code == 200
        delta = await self.served_since(http, slow_stack, before, 7)
        assert delta.rows == 8
        upstream = delta.requests - 2  # less the busy one and the last one
        assert 0 < upstream < len(xs), f"{len(xs)} requests with a timeout parameter became {upstream} upstream requests"

    async def test_invalid_timeouts_are_400_and_never_reach_triton(self, slow_stack: Stack, http: httpx.AsyncClient) -> None:
        url = slow_stack.triton.http_urls[0]
        before = triton_total(url, "fixed_latency")
        invalid = [
            {"timeout_us": -1}, {"timeout_us": "100"}, {"timeout_us": 2.5}, {"timeout_us": True},
            {"header_ms": "abc"}, {"header_ms": "-5"}, {"header_ms": "0"}, {"header_ms": "nan"},
        ]  # fmt: skip
        wrong = []
        for deadline in invalid:
            resp, _, _ = await self.infer(http, self.x(5), **deadline)
            error = resp.json().get("error") if resp.headers.get("content-type", "").startswith("application/json") else None
            if resp.status_code != 400 or not isinstance(error, str):
                wrong.append(f"{deadline}: {resp.status_code} {resp.text[:200]}")
        assert wrong == []
        assert await self.served_since(http, slow_stack, before, 0) == Counts(requests=1, rows=1, executions=1)

    async def test_valid_timeouts_are_served(self, slow_stack: Stack, http: httpx.AsyncClient) -> None:
        xs = [self.x(40 + k) for k in range(3)]
        # 0 means no deadline, as in Triton; a fractional number of milliseconds is a number.
        given = [{"timeout_us": 0}, {"header_ms": "5000.5"}, {"timeout_us": 10_000_000, "header_ms": "10000"}]
        answers = await asyncio.gather(*(self.infer(http, x, **d) for x, d in zip(xs, given)))
        for x, d, (resp, _, _) in zip(xs, given, answers):
            assert resp.status_code == 200 and fixed_latency_problem(resp.json(), x) is None, (d, resp.text)


FAILING_EXECUTE = '''

def _failing_execute(self, requests):
    raise RuntimeError("version 2 is broken")


TritonPythonModel.execute = _failing_execute
'''


def test_a_model_that_fails_everywhere_ejects_no_instance_and_other_models_are_served(fleet_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """Triton answers a model that raises with a 5xx of its own. Counted against the instances,
    a dozen such requests would eject healthy ones, and every model would lose them."""
    repo = build_repository(tmp_path / "repo", digits_versions=["1", "2"])
    model_py = repo / "digits_cnn" / "2" / "model.py"
    model_py.write_text(model_py.read_text() + FAILING_EXECUTE)
    triton = fleet_factory(2, 8140, repository=repo, **FIXED_MODELS)
    urls = triton.http_urls
    config = gateway_config(urls, 8142, upstream={"eject_after_failures": 3}, batching={"enabled": False})
    case = digits_cases(1, version="2")[0]
    with running_gateway(config, 8142, tmp_path) as gw, httpx.Client(base_url=gw.url, timeout=30) as http:
        for _ in range(12):
            resp = http.post(case.path, json=case.body)
            assert resp.status_code == 502 and "version 2 is broken" in resp.json()["error"], resp.text
        view = fleet_view(gw)
        assert [view[u]["state"] for u in urls] == ["up", "up"], view
        assert all(view[u]["ejections"] == 0 and view[u]["consecutive_failures"] == 0 for u in urls), view
        # Version 1 on both instances, as before.
        for good in digits_cases(8, version="1"):
            resp = http.post(good.path, json=good.body)
            assert resp.status_code == 200, resp.text
            assert good.check(resp.json()) is None
