"""The HTTP protocol that writes each response's head and body together, on a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgpack
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import uvicorn_servers
from gateway.protocol.http_server import SHUTDOWN_IDLE_S, OneWriteHttpToolsProtocol

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


async def hello(request: Request) -> Response:
    return Response(b"hello", media_type="text/plain")  # GET and HEAD (starlette adds HEAD to GET)


APP = Starlette(
    routes=[
        Route("/echo", echo, methods=["POST", "GET", "HEAD"]),
        Route("/stream", stream),
        Route("/fails", fails),
        Route("/hello", hello),
    ]
)


async def started(app: Any = APP, **settings: Any) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    """A real uvicorn serving ``app`` with the protocol: the server, its task, its port."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=CountingProtocol, log_level="critical", lifespan="off", **settings)
    return await uvicorn_servers.started(config)


@contextlib.asynccontextmanager
async def serving(app: Any = APP, **settings: Any) -> AsyncIterator[str]:
    server, task, port = await started(app, **settings)
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


async def answer_and_close(request: bytes) -> bytes:
    """Everything the server sends for ``request`` until it closes the connection."""
    async with serving() as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            WRITES.clear()
            writer.write(request)
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()


@pytest.mark.parametrize(
    "request_",
    [
        b"HEAD /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        b"HEAD /hello HTTP/1.0\r\n\r\n",  # HTTP/1.0 closes after the response: curl -I --http1.0
        b"HEAD /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",  # content-length: 0
    ],
    ids=["connection-close", "http-1.0", "empty"],
)
async def test_a_head_response_on_a_closing_connection_is_sent_before_the_close(request_: bytes) -> None:
    """uvicorn closes such a connection inside the send of the (empty) body: the held head must
    have gone out by then, not be written afterwards to a closed transport."""
    data = await answer_and_close(request_)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\n"), data
    assert b"connection: close" in data.lower()
    assert b"content-length: 5\r\n" in data if b"/hello" in request_ else b"content-length: 0\r\n" in data
    assert WRITES == [data]  # one write, and no body


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
async def test_a_get_on_a_closing_connection_is_answered_in_one_write(version: bytes) -> None:
    data = await answer_and_close(b"GET /hello HTTP/%s\r\nhost: x\r\nconnection: close\r\n\r\n" % version)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nhello"), data
    assert b"connection: close" in data.lower()
    assert WRITES == [data]


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One answer with a content-length, read whole."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


async def test_an_http_1_0_client_that_asks_keeps_its_connection() -> None:
    """ab -k: HTTP/1.0 with Connection: keep-alive. uvicorn closed every HTTP/1.0 connection;
    Triton keeps them. The answer says keep-alive (HTTP/1.0's default is to close)."""
    async with serving() as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for body in (b"one", b"two", b"three"):  # one connection
                writer.write(b"POST /echo HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                answer = await read_answer(reader)
                assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + body), answer
                assert b"connection: keep-alive\r\n" in answer.lower() and b"connection: close" not in answer.lower()
            # A streamed answer has no length: HTTP/1.0 ends it with the connection.
            writer.write(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            rest = await asyncio.wait_for(reader.read(), 5)  # to the end of the connection
            assert b"connection: close" in rest.lower() and b"keep-alive" not in rest.lower(), rest
        finally:
            writer.close()
    # Without the ask, HTTP/1.0 still closes.
    data = await answer_and_close(b"GET /hello HTTP/1.0\r\n\r\n")
    assert data.endswith(b"hello") and b"connection: close" in data.lower()


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


class Patient:
    """APP with a short read timeout, and a route that takes longer than it to answer."""

    read_timeout_s = 0.3
    max_header_bytes = 2048

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/think":
            await asyncio.sleep(2 * self.read_timeout_s)
            scope = {**scope, "path": "/echo"}
        await APP(scope, receive, send)


@contextlib.asynccontextmanager
async def connected(app: Any = None, **settings: Any) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with serving(app or Patient(), **settings) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            yield reader, writer
        finally:
            writer.close()


async def everything(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """All the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 5)
    return data, time.monotonic() - started


@pytest.mark.parametrize(
    "sent",
    [b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nhalf", b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-le"],
    ids=["body", "head"],
)
async def test_a_request_that_stops_arriving_is_answered_408_and_its_connection_closed(sent: bytes) -> None:
    async with connected() as (reader, writer):
        writer.write(sent)
        data, waited = await everything(reader)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"connection: close" in data and b"\r\ndate: " in data
    assert data.endswith(b'{"error":"the request did not arrive: nothing came for 0.3 s"}')
    assert 0.25 < waited < 2.0


async def test_a_msgpack_request_that_stops_arriving_is_answered_in_msgpack() -> None:
    async with connected() as (reader, writer):
        writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\nContent-Type: application/msgpack\r\ncontent-length: 10\r\n\r\nhalf")
        data, _ = await everything(reader)
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408") and b"content-type: application/msgpack" in head
    assert msgpack.unpackb(body) == {"error": "the request did not arrive: nothing came for 0.3 s"}


async def test_a_connection_that_sends_nothing_is_closed() -> None:
    async with connected() as (reader, _):
        data, waited = await everything(reader)
    assert data == b"" and 0.25 < waited < 2.0


HELLO = b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n"


async def answered(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(5) == b"hello"
    return head


async def test_a_connection_idle_after_its_answer_is_closed_after_the_keep_alive_timeout() -> None:
    async with connected(APP, timeout_keep_alive=0.3) as (reader, writer):  # read timeout: 30 s
        writer.write(HELLO)
        await answered(reader)
        data, waited = await everything(reader)
    assert data == b"" and 0.25 < waited < 2.0


async def test_a_busy_connection_outlives_its_keep_alive_timeout_and_then_closes_when_idle() -> None:
    async with connected(APP, timeout_keep_alive=0.3) as (reader, writer):
        for _ in range(10):  # 1.5 s of requests, each within the keep-alive timeout of the last answer
            writer.write(HELLO)
            await answered(reader)
            await asyncio.sleep(0.15)
        writer.write(HELLO + HELLO)  # pipelined: the second answered after the first, then idle
        await answered(reader)
        await answered(reader)
        data, waited = await everything(reader)
    assert data == b"" and 0.25 < waited < 2.0


async def test_between_requests_the_keep_alive_timeout_applies_not_the_read_timeout() -> None:
    """Patient's read timeout (0.3 s) bounds a request on its way; a connection waiting for its
    next request gets the keep-alive timeout (1 s), as with uvicorn's own timer."""
    async with connected(timeout_keep_alive=1.0) as (reader, writer):
        writer.write(HELLO)
        await answered(reader)
        await asyncio.sleep(0.6)  # two read timeouts: still open
        writer.write(HELLO)
        await answered(reader)
        data, waited = await everything(reader)
    assert data == b"" and 0.9 < waited < 3.0


async def test_a_slow_request_whose_bytes_keep_coming_and_a_slow_answer_are_served() -> None:
    async with connected() as (reader, writer):
        writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 8\r\n\r\n")
        for byte in b"trickled":  # 8 bytes over 1.2 s: four read timeouts, each wait under one
            await asyncio.sleep(0.15)
            writer.write(bytes([byte]))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(8) == b"trickled"
        writer.write(b"POST /think HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nok")  # answered after 0.6 s
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(2) == b"ok"


@pytest.mark.parametrize(
    "head",
    [
        b"POST /echo HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 4096 + b"\r\ncontent-length: 2\r\n\r\nok",
        b"POST /echo HTTP/1.1\r\nhost: x\r\n" + b"x-many: a\r\n" * 300 + b"content-length: 2\r\n\r\nok",
        b"GET /echo?" + b"q" * 4096 + b" HTTP/1.1\r\nhost: x\r\n\r\n",
    ],
    ids=["one-header", "many-headers", "url"],
)
async def test_a_request_head_over_the_limit_is_answered_431_and_its_connection_closed(head: bytes) -> None:
    async with connected() as (reader, writer):
        writer.write(head)
        data, waited = await everything(reader)
    assert data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n") and b"connection: close" in data
    assert data.endswith(b'{"error":"request head (request line and headers) exceeds the gateway\'s limit of 2048 bytes"}')
    assert waited < 0.25  # at once, not at the read timeout


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /echo HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 4096 + b"\r\n\r\n",  # 431
        b"GET /echo HTTP/1.1\r\nhost x\r\n\r\n",  # not HTTP: 400
    ],
    ids=["431", "400"],
)
async def test_a_refused_request_pipelined_behind_one_being_answered_waits_for_that_answer(bad: bytes) -> None:
    async with connected() as (reader, writer):
        writer.write(b"POST /think HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nok" + bad)  # answered after 0.6 s
        data, _ = await everything(reader)
    first, rest = data.split(b"\r\n\r\nok", 1)
    assert first.startswith(b"HTTP/1.1 200")  # its own answer first, whole...
    assert rest.startswith(b"HTTP/1.1 4") and b"connection: close" in rest  # ...then the refusal, and the close


class Recording(Patient):
    """Patient, keeping what its requests raised (uvicorn's own log is silenced here)."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception as exc:
            self.errors.append(exc)
            raise


async def test_requests_pipelined_behind_one_whose_client_left_are_dropped_quietly() -> None:
    app = Recording()
    async with connected(app) as (reader, writer):
        request = b"POST /think HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nok"
        writer.write(request * 3)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()  # gone before any answer
        await asyncio.sleep(4 * Patient.read_timeout_s)  # the answers come due meanwhile
    assert app.errors == []


async def test_a_header_that_never_ends_is_answered_431_once_its_bytes_pass_the_limit() -> None:
    """httptools hands a header over only once it is complete: the bytes that arrive for an
    unfinished head are counted too, or one endless header would be read into memory."""
    async with connected() as (reader, writer):
        writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\nx-endless: ")
        data = b""
        for _ in range(10):  # up to 10 reads of 500 bytes, none ending the header, until answered
            writer.write(b"a" * 500)
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(reader.read(65536), 0.05)
                break
        data += (await everything(reader))[0]
    assert data.startswith(b"HTTP/1.1 431 ") and data.endswith(b"limit of 2048 bytes\"}")


async def test_a_large_body_is_not_counted_as_head() -> None:
    async with connected() as (reader, writer):
        body = b"b" * 200_000
        writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body))
        await asyncio.sleep(0.05)  # the head is read on its own; the body comes in later reads
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(len(body)) == body


async def test_a_request_head_within_the_limit_is_served_and_the_limit_applies_per_request() -> None:
    async with connected() as (reader, writer):
        near = b"x-near: " + b"a" * 1800 + b"\r\n"  # under 2048 bytes in all; twice would be over
        for body in (b"one", b"two"):  # the same connection: each head is counted on its own
            writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\n" + near + b"content-length: 3\r\n\r\n" + body)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(3) == body


async def test_at_shutdown_an_idle_connection_still_gets_the_request_it_sends_then_is_closed() -> None:
    """A client may be sending its request on an idle connection (new, or between requests) when
    the server begins to stop: answered, with connection: close. One that sends nothing more is
    closed once idle for SHUTDOWN_IDLE_S."""
    server, task, port = await started()
    request = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi"
    fresh = await asyncio.open_connection("127.0.0.1", port)
    used = await asyncio.open_connection("127.0.0.1", port)
    silent = await asyncio.open_connection("127.0.0.1", port)
    used[1].write(request)
    first = await asyncio.wait_for(used[0].readuntil(b"hi"), 5)
    assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first
    await asyncio.sleep(0.05)
    server.should_exit = True
    await asyncio.sleep(0.25)  # uvicorn's loop sees it within 0.1 s, then tells every connection
    asked = time.monotonic()
    for reader, writer in (fresh, used):
        writer.write(request)
        data = await asyncio.wait_for(reader.read(), 5)  # the answer, then the end of the connection
        assert data.startswith(b"HTTP/1.1 200") and b"connection: close" in data and data.endswith(b"hi"), data
    assert await asyncio.wait_for(silent[0].read(), 5) == b""
    assert 0.1 < time.monotonic() - asked + 0.25 < SHUTDOWN_IDLE_S + 0.5
    await asyncio.wait_for(task, 5)
    for _, writer in (fresh, used, silent):
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
        assert main(["serve", "--config", str(config), "--log-level", "warning", "--port", "0"]) == 0
        assert ran.pop() is InferHttpToolsProtocol
