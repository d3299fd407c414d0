"""The HTTP protocol that serves infer requests itself (cache hits at once, the rest through the
app's ``serve_held``), on a real uvicorn over real sockets, in front of an app that stands in
for the infer endpoint (its cache lookup, its full path and its ASGI path)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn

import uvicorn_servers
from gateway.cache import RawAnswer
from gateway.protocol.infer_server import InferHttpToolsProtocol, Reply


HIT = RawAnswer(((b"content-type", b"application/octet-stream"), (b"x-cache", b"hit"), (b"content-length", b"6")), b"stored")


class Endpoint:
    """Answers a body it has stored from the cache; serves other infer requests (``serve_held``);
    everything else through ASGI."""

    def __init__(self) -> None:
        self.stored: dict[bytes, RawAnswer] = {b"repeat": HIT}
        self.asgi: list[tuple[str, bytes]] = []  # (path, body) of each request the ASGI path served
        self.served: list[tuple[bytes, bytes, Any, float]] = []  # (url, body, looked, arrival) of serve_held's
        self.gone: list[Callable[[], bool]] = []  # each served request's disconnect probe
        self.lookups: list[tuple[Any, bytes, list[tuple[bytes, bytes]]]] = []
        self.lost: list[Any] = []
        self.failed: list[Any] = []  # (target, arrival) of each request the protocol answered 500
        self.slow = asyncio.Event()
        self.slow.set()

    def may_serve(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[str, str] | None:
        return ("m", "") if url.endswith(b"/infer") else None

    def answer_from_cache(
        self, target: tuple[str, str], headers: list[tuple[bytes, bytes]], body: bytes, start: float
    ) -> tuple[RawAnswer | None, tuple[str, bool] | None]:
        self.lookups.append((target, body, list(headers)))
        return self.stored.get(body), ("7", True)  # the version "chosen" for it

    async def serve_held(
        self, url: bytes, target: tuple[str, str], headers: Any, body: bytes, start: float, looked: Any, gone: Any
    ) -> Reply | None:
        self.served.append((url, body, looked, start))
        self.gone.append(gone)
        await self.slow.wait()
        if body == b"boom":
            raise RuntimeError("a bug")
        if gone():
            return None
        answer = b"served:" + body
        return Reply(200, [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())], answer)

    def request_lost(self, target: tuple[str, str]) -> None:
        self.lost.append(target)

    def request_failed(self, target: tuple[str, str], start: float) -> None:
        self.failed.append((target, start))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.asgi.append((scope["path"], body))
        await self.slow.wait()
        answer = b"asgi:" + body
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})


class AnswersOnly(Endpoint):
    """An app that answers from its cache in the protocol but serves nothing else there."""

    serve_held = None  # type: ignore[assignment]


async def start(app: Endpoint, **settings: Any) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    """A server as the gateway runs it (this protocol, no proxy-header rewriting); its port."""
    settings.setdefault("timeout_graceful_shutdown", 2)  # a failed test's open connections must not hang it
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, http=InferHttpToolsProtocol, log_level="critical", lifespan="off",
        proxy_headers=False, **settings,
    )  # fmt: skip
    return await uvicorn_servers.started(config)


@contextlib.asynccontextmanager
async def serving(app: Endpoint, **settings: Any) -> AsyncIterator[int]:
    server, task, port = await start(app, **settings)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


def post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def send_in_two_pieces(writer: asyncio.StreamWriter, request: bytes) -> None:
    """The request with its body's last bytes sent a moment after the rest."""
    writer.write(request[:-9])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(request[-9:])


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, *lines = head[:-4].split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines)
    body = await reader.readexactly(int(headers[b"content-length"]))
    return status, headers, body


async def test_a_hit_is_written_by_the_protocol_with_the_servers_headers_and_the_app_never_runs() -> None:
    app = Endpoint()
    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v2/models/m/infer", b"repeat", "X-Other: 1"))
        status, headers, body = await read_response(reader)
        assert (status, body) == (b"HTTP/1.1 200 OK", b"stored")
        assert headers[b"x-cache"] == b"hit" and headers[b"content-type"] == b"application/octet-stream"
        assert b"date" in headers  # uvicorn's default header, as on every other answer
        assert app.asgi == [] and app.served == []
        target, seen_body, seen_headers = app.lookups[0]
        assert (target, seen_body) == (("m", ""), b"repeat") and (b"x-other", b"1") in seen_headers
        # The connection stays open for the next request, hit or not.
        for body, answer in ((b"new", b"served:new"), (b"repeat", b"stored")):
            writer.write(post("/v2/models/m/infer", body))
            assert (await read_response(reader))[2] == answer
        assert app.asgi == [] and [b for _, b, _, _ in app.served] == [b"new"]
        writer.close()


async def test_a_miss_is_served_in_the_protocol_with_its_whole_body_even_when_it_arrives_in_pieces() -> None:
    app = Endpoint()
    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await send_in_two_pieces(writer, post("/v2/models/m/infer", b"first-time-body"))
        status, headers, body = await read_response(reader)
        assert (status, body) == (b"HTTP/1.1 200 OK", b"served:first-time-body")
        assert headers[b"content-type"] == b"text/plain" and b"date" in headers and b"connection" not in headers
        assert app.asgi == [] and [b for _, b, _ in app.lookups] == [b"first-time-body"]
        url, _, looked, arrival = app.served[0]  # what the lookup learned, and when the request arrived
        assert url == b"/v2/models/m/infer" and looked == ("7", True) and isinstance(arrival, float)
        writer.write(post("/v2/models/m/infer", b"again"))  # kept alive
        assert (await read_response(reader))[2] == b"served:again"
        writer.close()


async def test_requests_the_protocol_may_not_hold_are_never_looked_up() -> None:
    app = Endpoint()
    async with serving(app) as port:
        cases = [
            post("/v2/models/m/other", b"repeat"),  # the app says no
            post("/v2/models/m/infer", b"repeat", "Expect: 100-continue"),
            post("/v2/models/m/infer", b"repeat", "Connection: close"),
            b"POST /v2/models/m/infer HTTP/1.0\r\nContent-Length: 6\r\n\r\nrepeat",
        ]
        for raw in cases:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            if b"100-continue" in raw:
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
            status, _, body = await read_response(reader)
            assert body == b"asgi:repeat", raw
            writer.close()
        assert app.lookups == [] and app.served == []
        assert len(app.asgi) == len(cases)


async def test_pipelined_requests_are_answered_in_order() -> None:
    """A request sent behind one still being served waits its turn (uvicorn's queue)."""
    app = Endpoint()
    app.slow.clear()
    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v2/models/m/infer", b"slow-miss") + post("/v2/models/m/infer", b"repeat"))
        await asyncio.sleep(0.1)
        assert app.asgi == []  # the second waits for the first
        app.slow.set()
        first = await read_response(reader)
        second = await read_response(reader)
        assert first[2] == b"served:slow-miss"
        assert second[2] == b"asgi:repeat"  # not held: it arrived while the first was being answered
        assert [b for _, b, _ in app.lookups] == [b"slow-miss"]
        writer.close()


async def test_a_request_arriving_during_shutdown_is_answered_then_the_connection_closes() -> None:
    app = Endpoint()
    server, task, port = await start(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = post("/v2/models/m/infer", b"repeat")
    writer.write(request[:-3])  # held: its body is not complete
    await writer.drain()
    await asyncio.sleep(0.05)
    server.should_exit = True
    await asyncio.sleep(0.3)  # the server is shutting down, waiting for this connection
    assert not task.done()
    writer.write(request[-3:])
    status, headers, body = await read_response(reader)
    assert body == b"served:repeat" and headers.get(b"connection") == b"close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
    await asyncio.wait_for(task, 5)
    writer.close()


async def test_shutdown_lets_a_request_being_served_finish_then_closes_the_connection() -> None:
    app = Endpoint()
    app.slow.clear()
    server, task, port = await start(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/v2/models/m/infer", b"in-flight"))
    await writer.drain()
    await asyncio.sleep(0.05)
    assert len(app.served) == 1
    server.should_exit = True
    await asyncio.sleep(0.3)
    assert not task.done()  # waiting for the request being served
    app.slow.set()
    status, headers, body = await read_response(reader)
    assert body == b"served:in-flight" and headers.get(b"connection") == b"close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await asyncio.wait_for(task, 5)
    writer.close()


async def test_a_client_leaving_while_its_request_is_served_is_seen_and_the_server_serves_on() -> None:
    app = Endpoint()
    app.slow.clear()
    async with serving(app) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v2/models/m/infer", b"leaving"))
        await writer.drain()
        await asyncio.sleep(0.05)
        assert len(app.gone) == 1 and not app.gone[0]()
        writer.close()
        for _ in range(100):
            if app.gone[0]():
                break
            await asyncio.sleep(0.01)
        assert app.gone[0]()  # what the batcher asks before sending the request upstream
        app.slow.set()
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # the server serves on
        writer.write(post("/v2/models/m/infer", b"next"))
        assert (await read_response(reader))[2] == b"served:next"
        writer.close()


async def test_a_request_still_served_when_the_shutdown_grace_runs_out_is_answered_500_and_closed() -> None:
    """uvicorn cancels the server's tasks when its graceful shutdown times out: the request being
    served gets a 500 and the connection closes; a request pipelined behind it is never started,
    so its answer can never be taken for the first one's."""
    for pipelined in (b"", post("/v2/models/m/other", b"behind")):
        app = Endpoint()
        app.slow.clear()  # never answered
        server, task, port = await start(app, timeout_graceful_shutdown=0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v2/models/m/infer", b"stuck") + pipelined)
        await writer.drain()
        await asyncio.sleep(0.1)
        server.should_exit = True
        status, headers, body = await read_response(reader)
        assert status == b"HTTP/1.1 500 Internal Server Error" and headers.get(b"connection") == b"close"
        assert b"internal gateway error" in body
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed: nothing more, no other answer
        await asyncio.wait_for(task, 5)
        assert app.asgi == []  # the pipelined request never ran
        assert app.failed == [(("m", ""), app.served[0][3])]  # counted, with its arrival
        writer.close()


async def test_a_failure_of_the_app_while_serving_is_a_500_and_the_connection_closes() -> None:
    app = Endpoint()
    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v2/models/m/infer", b"boom"))
        status, headers, body = await read_response(reader)
        assert status == b"HTTP/1.1 500 Internal Server Error" and headers.get(b"connection") == b"close"
        assert b"internal gateway error" in body
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert [target for target, _ in app.failed] == [("m", "")]
        writer.close()


async def test_an_app_that_serves_nothing_in_the_protocol_gets_its_misses_the_asgi_way() -> None:
    app = AnswersOnly()
    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await send_in_two_pieces(writer, post("/v2/models/m/infer", b"first-time-body"))
        assert (await read_response(reader))[2] == b"asgi:first-time-body"
        writer.write(post("/v2/models/m/infer", b"repeat"))
        assert (await read_response(reader))[2] == b"stored"
        assert app.asgi == [("/v2/models/m/infer", b"first-time-body")] and app.served == []
        writer.close()


async def test_a_request_pipelined_behind_a_hit_is_not_cut_off_by_the_keep_alive_timer() -> None:
    """The hit completes inside the parser's run and arms the keep-alive timer; the request read
    with it must disarm it, or the timer closes the connection while that request is served."""
    app = Endpoint()
    app.slow.clear()
    async with serving(app, timeout_keep_alive=0.2) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v2/models/m/infer", b"repeat") + post("/v2/models/m/infer", b"slow"))
        assert (await read_response(reader))[2] == b"stored"
        await asyncio.sleep(0.5)  # longer than the keep-alive timeout
        app.slow.set()
        assert (await read_response(reader))[2] == b"served:slow"
        writer.close()


async def test_hits_for_a_client_that_does_not_read_wait_for_the_socket() -> None:
    """Pipelined hits with large answers, never read: once the socket's buffer is full the
    requests go the ordinary way, which waits for it to drain, so the server does not buffer
    every answer; all are answered, in order, once the client reads."""
    app = Endpoint()
    big = b"x" * (1 << 20)
    app.stored[b"big"] = RawAnswer(((b"content-length", str(len(big)).encode()),), big)
    sent = 100
    async with serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v2/models/m/infer", b"big") * sent)
        await asyncio.sleep(0.5)
        assert len(app.lookups) < sent // 2  # bounded by the socket buffers, not by the requests sent
        bodies = [(await read_response(reader))[2] for _ in range(sent)]
        assert all(b == big or b == b"asgi:big" for b in bodies) and len(bodies) == sent
        writer.close()


async def test_a_client_leaving_while_its_request_is_held_is_counted() -> None:
    app = Endpoint()
    async with serving(app) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/v2/models/m/infer", b"repeat")[:-3])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        for _ in range(100):
            if app.lost:
                break
            await asyncio.sleep(0.01)
        assert app.lost == [("m", "")] and app.asgi == [] and app.lookups == [] and app.served == []
