"""The HTTP protocol that writes each response's head and body together, on a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.protocol.http_server import OneWriteHttpToolsProtocol

WRITES: list[bytes] = []


class CountingTransport:
    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        WRITES.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CountingProtocol(OneWriteHttpToolsProtocol):
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CountingTransport(transport)  # type: ignore[assignment]


async def echo(request: Request) -> Response:
    return Response(await request.body(), headers={"x-seen": "1"}, media_type="application/octet-stream")


async def stream(request: Request) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"one,"
        await asyncio.sleep(0)
        yield b"two"

    return StreamingResponse(chunks())


async def fails(request: Request) -> Response:
    raise RuntimeError("boom")


APP = Starlette(
    routes=[Route("/echo", echo, methods=["POST", "GET", "HEAD"]), Route("/stream", stream), Route("/fails", fails)]
)


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[str]:
    config = uvicorn.Config(APP, host="127.0.0.1", port=0, http=CountingProtocol, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_a_response_is_one_write_and_keep_alive_still_works() -> None:
    async with serving() as url, httpx.AsyncClient(base_url=url) as client:
        for body in (b"first", b"second"):  # one connection, two requests
            WRITES.clear()
            r = await client.post("/echo", content=body)
            assert r.status_code == 200 and r.content == body and r.headers["x-seen"] == "1"
            assert len(WRITES) == 1 and WRITES[0].startswith(b"HTTP/1.1 200 OK\r\n") and WRITES[0].endswith(b"\r\n\r\n" + body)


async def test_head_streaming_and_failing_responses_are_whole() -> None:
    async with serving() as url, httpx.AsyncClient(base_url=url) as client:
        head = await client.head("/echo")
        assert head.status_code == 200 and head.headers["content-length"] == "0"
        streamed = await client.get("/stream")
        assert streamed.status_code == 200 and streamed.content == b"one,two"
        failed = await client.get("/fails")
        assert failed.status_code == 500
        again = await client.post("/echo", content=b"after")
        assert again.content == b"after"


async def test_pipelined_requests_get_their_own_answers_in_order() -> None:
    async with serving() as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        request = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
        writer.write(request % (1, b"a") + request % (2, b"bb"))
        await writer.drain()
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"bb"):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, data
            data += chunk
        assert data.index(b"\r\n\r\na") < data.index(b"\r\n\r\nbb")
        writer.close()


def test_serve_runs_the_infer_serving_protocol_with_or_without_a_cache(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from gateway.__main__ import main
    from gateway.protocol.infer_server import InferHttpToolsProtocol

    ran: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: ran.append(kwargs["http"]))
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)  # serve sets it for worker processes
    base = '[upstream]\ninstances = [{ url = "http://127.0.0.1:8100" }]\n'
    for cache in ["", "[cache]\nenabled = true\n"]:
        config = tmp_path / "gateway.toml"
        config.write_text(base + cache)
        assert main(["serve", "--config", str(config), "--log-level", "warning"]) == 0
        assert ran.pop() is InferHttpToolsProtocol
