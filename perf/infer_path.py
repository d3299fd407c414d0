#!/usr/bin/env python3
"""In-process cost of the gateway's infer path, against the no-op app called the same way.

No sockets, no HTTP server, no Triton: each request is an ASGI call (scope, receive, send) made
in-process, as perf_analyzer's requests reach the app after the server has parsed them: a
digits_cnn-shaped binary-tensor request (one 1x8x8 FP32 image, both outputs asked for in
binary), 32 at a time. Two targets, measured in the same run, the same way:

* the gateway's ``InferEndpoint`` with its real pipeline and batcher (batching on, one batch in
  flight), in front of an in-process router that answers every batch at once with zeros;
* the no-op Starlette app of ``perf/noop_app.py`` (what compare.py's ceiling anchor runs).

A third line: a cache hit as the gateway's HTTP protocol answers it
(``protocol/infer_server.py``: parsing, the lookup, the response written), the request's bytes
fed to the protocol over a stand-in transport, one at a time; the socket's system calls are not
in it.

Each reports CPU µs per request (process time, the best of ``--repeats`` runs of ``--rounds``
rounds of 32 requests; the machine's noise only ever adds), and their ratio. The gap is what the
gateway's own Python costs per request beyond routing and answering: decoding, checking,
batching, splitting, encoding. Garbage collection is tuned as the server tunes it.

    .venv/bin/python perf/infer_path.py [--rounds 100] [--repeats 15]

A diagnostic for work on the hot path (not one of the project's targets): what the server and
the kernel cost per request is measured by perf/compare.py's CPU table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import noop_app  # noqa: E402

from uvicorn.config import Config  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from gateway.app import settle_heap  # noqa: E402
from gateway.batcher import BatchResult  # noqa: E402
from gateway.cache import ResponseCache  # noqa: E402
from gateway.config import BatchingConfig, CacheConfig  # noqa: E402
from gateway.infer_endpoint import InferEndpoint  # noqa: E402
from gateway.models import ModelInfo  # noqa: E402
from gateway.pipeline import InferencePipeline  # noqa: E402
from gateway.protocol.infer_server import InferHttpToolsProtocol  # noqa: E402
from gateway.tensors import Tensor  # noqa: E402

MODEL = "digits_cnn"
CONCURRENCY = 32
METADATA = {
    "name": MODEL,
    "versions": ["1"],
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
    "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ],
}
CONFIG = {"name": MODEL, "max_batch_size": 64}
INFO = ModelInfo.from_triton(METADATA, CONFIG, orjson.dumps(METADATA), orjson.dumps(CONFIG))

App = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


class Metadata:
    def fresh(self, model: str, version: str) -> ModelInfo:
        return INFO

    async def get(self, model: str, version: str) -> ModelInfo:
        return INFO


class InstantRouter:
    """Answers every batch with zeros of the right shapes, after one event-loop turn."""

    instances: list[Any] = []

    def newest_version(self, model: str) -> str:
        return "1"

    def available(self, model: str, version: str) -> bool:
        return True

    def routable_count(self) -> int:
        return 1

    async def infer(self, model, version, inputs, parameters=None, deadline=None) -> BatchResult:  # noqa: ANN001
        if callable(inputs):
            inputs = inputs()
        await asyncio.sleep(0)
        zeros = np.zeros((inputs[0].data.shape[0], 10), np.float32)
        return BatchResult(version, [Tensor("logits", "FP32", zeros), Tensor("probabilities", "FP32", zeros)])


def gateway_app(cache: ResponseCache | None = None) -> InferEndpoint:
    router = InstantRouter()
    pipeline = InferencePipeline(BatchingConfig(enabled=True, max_inflight_batches=1), router, Metadata(), cache=cache)  # type: ignore[arg-type]
    services = types.SimpleNamespace(router=router, pipeline=pipeline)
    return InferEndpoint(types.SimpleNamespace(state=types.SimpleNamespace(services=services)), 1 << 20)


def request() -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The body and headers perf_analyzer sends for one digits_cnn image (binary tensors)."""
    outputs = [{"name": name, "parameters": {"binary_data": True}} for name in ("logits", "probabilities")]
    spec = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}
    header = orjson.dumps({"id": "", "inputs": [spec], "outputs": outputs})  # perf_analyzer's empty id included
    body = header + np.arange(64, dtype=np.float32).tobytes()
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"content-type", b"application/octet-stream"),
        (b"inference-header-content-length", str(len(header)).encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    return body, headers


async def one(app: App, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    scope = {"type": "http", "method": "POST", "path": f"/v2/models/{MODEL}/infer", "headers": headers,
             "http_version": "1.1", "scheme": "http", "query_string": b"", "root_path": "", "app": app}  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"the app answered {sent[0]['status']}: {sent[-1].get('body', b'')[:200]!r}")


async def cost(app: App, rounds: int, repeats: int) -> float:
    """CPU µs per request: the best of ``repeats`` runs of ``rounds`` rounds."""
    body, headers = request()

    async def run(n: int) -> None:
        for _ in range(n):
            await asyncio.gather(*(one(app, body, headers) for _ in range(CONCURRENCY)))

    await run(max(10, rounds // 4))  # warm-up: layouts, batchers, caches
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        await run(rounds)
        best = min(best, (time.process_time() - start) / (rounds * CONCURRENCY) * 1e6)
    return best


class Transport:
    """Stands in for a connection's socket: keeps the last write."""

    def __init__(self) -> None:
        self.last = b""

    def write(self, data: bytes) -> None:
        self.last = data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


async def hit_cost(rounds: int, repeats: int) -> float:
    """CPU µs per cache hit through the HTTP protocol: the best of ``repeats`` runs."""
    app = gateway_app(ResponseCache(CacheConfig(enabled=True)))
    config = Config(app=app, http=InferHttpToolsProtocol, access_log=False, lifespan="off", proxy_headers=False)
    config.load()
    protocol = InferHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    body, headers = request()
    head = b"".join(b"%s: %s\r\n" % h for h in [*headers, (b"accept", b"*/*"), (b"user-agent", b"perf_analyzer")])
    raw = b"POST /v2/models/%s/infer HTTP/1.1\r\n%s\r\n%s" % (MODEL.encode(), head, body)
    protocol.data_received(raw)  # the first: computed (the instant router), and stored
    for _ in range(100):
        if transport.last:
            break
        await asyncio.sleep(0.001)
    n = rounds * CONCURRENCY
    for _ in range(n // 4):  # warm-up
        protocol.data_received(raw)
    if b"\r\nx-cache: hit\r\n" not in transport.last:
        raise RuntimeError(f"the protocol did not answer from the cache: {transport.last[:300]!r}")
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(n):
            protocol.data_received(raw)
        best = min(best, (time.process_time() - start) / n * 1e6)
    protocol.connection_lost(None)
    return best


async def main_async(args: argparse.Namespace) -> None:
    noop = noop_app.build_app({"models": {MODEL: {"metadata": METADATA, "config": CONFIG}}})
    gateway = gateway_app()
    settle_heap()
    gateway_us = await cost(gateway, args.rounds, args.repeats)
    noop_us = await cost(noop, args.rounds, args.repeats)
    hit_us = await hit_cost(args.rounds, args.repeats)
    print(f"in-process infer path, {CONCURRENCY} requests at a time, CPU µs per request (best of {args.repeats}):")
    print(f"  gateway (InferEndpoint, pipeline, batcher; instant router): {gateway_us:6.1f}")
    print(f"  no-op (perf/noop_app.py, Starlette)                      : {noop_us:6.1f}")
    print(f"  gateway / no-op: {gateway_us / noop_us:.2f}; gateway - no-op: {gateway_us - noop_us:+.1f} µs")
    print(f"  gateway, a cache hit through its HTTP protocol (no socket)  : {hit_us:6.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="rounds of 32 requests per run")
    parser.add_argument("--repeats", type=int, default=15, help="runs per target; the best counts")
    uvloop.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
