"""The Triton client against a fake Triton (aiohttp.web on loopback): every failure becomes the
right gateway error."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import numpy as np
import orjson
import pytest
from aiohttp import web

from gateway.config import UpstreamConfig
from gateway.errors import GatewayTimeout, ModelError, UpstreamError
from gateway.protocol import v2
from gateway.tensors import Tensor
from gateway.upstream.client import InstanceUnreachable, TritonClient

INPUTS = [Tensor("x", "FP32", np.arange(6, dtype=np.float32).reshape(2, 3))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def fake_triton() -> AsyncIterator[Callable[[web.Response | Callable], str]]:
    runners: list[web.AppRunner] = []

    async def serve(handler) -> str:  # noqa: ANN001
        app = web.Application()
        app.router.add_post("/v2/models/{model}/infer", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[TritonClient]:
    c = TritonClient(UpstreamConfig(request_timeout_s=5.0))
    await c.start()
    yield c
    await c.close()


async def test_binary_round_trip_without_compression(fake_triton, client: TritonClient) -> None:  # noqa: ANN001
    seen: dict[str, str] = {}

    async def echo_doubled(request: web.Request) -> web.Response:
        seen["accept-encoding"] = request.headers.get("Accept-Encoding", "")
        body = await request.read()
        length = int(request.headers["Inference-Header-Content-Length"])
        x = np.frombuffer(body[length:], np.float32).reshape(2, 3) * 2
        head = orjson.dumps(
            {"model_name": "m", "model_version": "3", "outputs": [
                {"name": "y", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": x.nbytes}}]}
        )  # fmt: skip
        return web.Response(body=head + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))})

    url = await fake_triton(echo_doubled)
    result = await client.infer(url, "m", "", INPUTS, None)
    assert result.version == "3"
    np.testing.assert_array_equal(result.outputs[0].data, INPUTS[0].data * 2)
    assert "gzip" not in seen["accept-encoding"]  # Triton compresses only when asked


@pytest.mark.parametrize("status, expected", [(400, 400), (404, 404), (500, 502), (503, 502)])
async def test_triton_errors_keep_their_message(fake_triton, client: TritonClient, status: int, expected: int) -> None:  # noqa: ANN001
    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=status, body=v2.error_body("model said no"), content_type="application/json")

    url = await fake_triton(fail)
    with pytest.raises(UpstreamError) as err:
        await client.infer(url, "m", "", INPUTS, None)
    assert err.value.status == expected and err.value.message == "model said no"
    assert isinstance(err.value, ModelError) is (status >= 500)  # Triton's own 5xx: maybe the model's fault


async def test_a_5xx_that_is_not_tritons_error_answer_is_the_instances_fault(fake_triton, client: TritonClient) -> None:  # noqa: ANN001
    async def proxy_page(request: web.Request) -> web.Response:
        return web.Response(status=503, text="<html>Service Unavailable</html>", content_type="text/html")

    url = await fake_triton(proxy_page)
    with pytest.raises(UpstreamError) as err:
        await client.infer(url, "m", "", INPUTS, None)
    assert err.value.status == 502 and not isinstance(err.value, ModelError) and "Service Unavailable" in err.value.message


async def test_malformed_answer_is_502_not_the_clients_fault(fake_triton, client: TritonClient) -> None:  # noqa: ANN001
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=b"{}", headers={"Inference-Header-Content-Length": "99"})

    url = await fake_triton(garbage)
    with pytest.raises(UpstreamError) as err:
        await client.infer(url, "m", "", INPUTS, None)
    assert err.value.status == 502 and err.value.message.startswith("Triton instance gave a malformed answer: ")
    assert "127.0.0.1" not in err.value.message  # messages reach clients: no internal address


async def test_refused_connection_is_unreachable(client: TritonClient) -> None:
    with pytest.raises(InstanceUnreachable) as err:
        await client.infer(f"http://127.0.0.1:{free_port()}", "m", "", INPUTS, None)
    # asyncio's own error names the address; the message that reaches clients does not.
    assert err.value.connect_failed and err.value.message == "Triton instance unreachable: cannot connect: Connection refused"


async def test_a_connection_closed_without_an_answer_is_unreachable_but_not_down(client: TritonClient) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        with pytest.raises(InstanceUnreachable) as err:
            await client.infer(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", "m", "", INPUTS, None)
        assert not err.value.connect_failed
        assert err.value.message == "Triton instance did not answer: connection closed: by the server"
    finally:
        server.close()
        await server.wait_closed()


async def test_no_answer_within_the_deadline_is_504(fake_triton, client: TritonClient) -> None:  # noqa: ANN001
    answer = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await answer.wait()  # until the test is over: the server's clean-up does not wait for it
        return web.Response()

    url = await fake_triton(hang)
    try:
        with pytest.raises(GatewayTimeout) as err:
            await client.infer(url, "m", "", INPUTS, None, timeout=0.2)
    finally:
        answer.set()
    assert err.value.message == "Triton instance did not answer within 0.2 s"


async def test_connections_are_kept_alive_and_a_closed_idle_one_is_replaced(fake_triton, client: TritonClient) -> None:  # noqa: ANN001
    peers: list[object] = []

    async def ok(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(status=400, body=v2.error_body("fine"), content_type="application/json")

    url = await fake_triton(ok)
    for _ in range(3):
        with pytest.raises(UpstreamError, match="fine"):
            await client.infer(url, "m", "", INPUTS, None)
    assert len(set(peers)) == 1  # one kept-alive connection served all three
    pool = client._pool(url)
    for conn in pool._idle:
        conn.transport.close()  # as a server closing an idle connection would
    await asyncio.sleep(0.05)
    with pytest.raises(UpstreamError, match="fine"):
        await client.infer(url, "m", "", INPUTS, None)
    assert len(set(peers)) == 2


async def test_an_answer_that_is_not_http_is_502(client: TritonClient) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"garbage not http\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(UpstreamError) as err:
            await client.infer(f"http://127.0.0.1:{port}", "m", "", INPUTS, None)
        assert err.value.status == 502 and err.value.message.startswith("Triton instance gave a malformed answer: not an HTTP")
        assert str(port) not in err.value.message
    finally:
        server.close()
        await server.wait_closed()


async def test_abandoned_requests_fail_at_once_as_unreachable_and_the_instance_serves_again(fake_triton, client: TritonClient) -> None:  # noqa: ANN001
    release = asyncio.Event()
    arrived: list[None] = []

    async def hang_then_answer(request: web.Request) -> web.Response:
        arrived.append(None)
        if len(arrived) <= 2:
            await release.wait()  # the first two hang (until the test is over)
        return web.Response(status=400, body=v2.error_body("answered"), content_type="application/json")

    url = await fake_triton(hang_then_answer)
    try:
        hung = [asyncio.create_task(client.infer(url, "m", "", INPUTS, None, timeout=30)) for _ in range(2)]
        while len(arrived) < 2:
            await asyncio.sleep(0.01)
        assert client.abandon(url, "gone quiet") == 2
        assert client.abandon("http://127.0.0.1:1", "never used") == 0
        async with asyncio.timeout(1):  # not the 30 s of the attempts' own limit
            errors = await asyncio.gather(*hung, return_exceptions=True)
        for err in errors:
            assert isinstance(err, InstanceUnreachable) and not err.connect_failed
            assert err.message == "Triton instance did not answer: gone quiet"
        assert client.abandon(url, "nothing in flight") == 0
        with pytest.raises(UpstreamError, match="answered"):  # a new request: a new connection, served
            await client.infer(url, "m", "", INPUTS, None)
    finally:
        release.set()


async def test_requests_waiting_for_a_connection_slot_are_given_up_too_unsent(fake_triton) -> None:  # noqa: ANN001
    """With the instance's connections all taken by requests it does not answer, the requests
    waiting for one are given up with them, never sent: else each would go on to the server
    its neighbours were given up on, and wait there in turn."""
    release = asyncio.Event()
    arrived: list[None] = []

    async def hang_then_answer(request: web.Request) -> web.Response:
        arrived.append(None)
        if len(arrived) == 1:
            await release.wait()
        return web.Response(status=400, body=v2.error_body("answered"), content_type="application/json")

    url = await fake_triton(hang_then_answer)
    client = TritonClient(UpstreamConfig(request_timeout_s=30.0, max_connections_per_instance=1))
    await client.start()
    try:
        hung = asyncio.create_task(client.infer(url, "m", "", INPUTS, None))
        while not arrived:
            await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(client.infer(url, "m", "", INPUTS, None)) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert client.abandon(url, "gone quiet") == 4
        async with asyncio.timeout(1):  # not the 30 s of the attempts' own limit
            in_flight, *unsent = await asyncio.gather(hung, *waiting, return_exceptions=True)
        assert isinstance(in_flight, InstanceUnreachable) and not in_flight.connect_failed
        for err in unsent:
            assert isinstance(err, InstanceUnreachable) and err.connect_failed  # may be sent elsewhere
            assert err.message == "Triton instance unreachable: gone quiet; the request was not sent"
        assert len(arrived) == 1
        with pytest.raises(UpstreamError, match="answered"):  # a request after it: sent, served
            await client.infer(url, "m", "", INPUTS, None)
        assert client.abandon(url, "nothing waiting") == 0
    finally:
        release.set()
        await client.close()


async def test_an_instance_that_answered_within_the_quiet_time_keeps_its_requests(fake_triton, client: TritonClient) -> None:  # noqa: ANN001
    release = asyncio.Event()
    arrived: list[None] = []

    async def answer_once_then_hang(request: web.Request) -> web.Response:
        arrived.append(None)
        if len(arrived) > 1:
            await release.wait()
        return web.Response(status=400, body=v2.error_body("answered"), content_type="application/json")

    url = await fake_triton(answer_once_then_hang)
    try:
        with pytest.raises(UpstreamError, match="answered"):
            await client.infer(url, "m", "", INPUTS, None)
        hung = asyncio.create_task(client.infer(url, "m", "", INPUTS, None, timeout=30))
        while len(arrived) < 2:
            await asyncio.sleep(0.01)
        # Busy, not gone: it answered a moment ago, so what it holds is left to it.
        assert client.abandon(url, "slow", quiet_for=5.0) == 0
        assert not hung.done()
        await asyncio.sleep(0.2)
        assert client.abandon(url, "gone quiet", quiet_for=0.1) == 1  # nothing came for longer
        async with asyncio.timeout(1):
            with pytest.raises(InstanceUnreachable, match="gone quiet"):
                await hung
    finally:
        release.set()


async def test_a_health_probe_is_not_held_behind_a_full_connection_pool() -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=400, body=v2.error_body("answered"), content_type="application/json")

    async def live(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", hang)
    app.router.add_get("/v2/health/live", live)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    client = TritonClient(UpstreamConfig(max_connections_per_instance=1))
    try:
        busy = asyncio.create_task(client.infer(url, "m", "", INPUTS, None, timeout=30))
        await asyncio.sleep(0.1)  # the one connection the cap allows is taken
        with pytest.raises(GatewayTimeout):
            await client.get(url, "/v2/health/live", timeout=0.3)  # capped: waits behind it
        assert (await client.get(url, "/v2/health/live", timeout=0.3, capped=False)).status == 200
        release.set()
        with pytest.raises(UpstreamError, match="answered"):
            await busy
    finally:
        release.set()
        await client.close()
        await runner.cleanup()


class RawServer:
    """A loopback HTTP/1.1 server counting the requests it reads; ``behaviour(n)`` says what it
    does with the n-th (0-based): "ok", "ok-then-close" (answers, then closes the connection),
    "drop" (closes without answering), "partial" (half an answer, then closes), "slow" (answers
    after 0.2 s)."""

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def __init__(self, behaviour: Callable[[int], str]) -> None:
        self.behaviour = behaviour
        self.received = 0
        self.open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                what = self.behaviour(self.received)
                self.received += 1
                if what == "slow":
                    await asyncio.sleep(0.2)
                if what in ("ok", "ok-then-close", "slow"):
                    writer.write(self.OK)
                elif what == "partial":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
                await writer.drain()
                if what not in ("ok", "slow"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.open -= 1

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


@pytest.mark.parametrize(
    "first, second",
    [
        ("ok-then-close", "drop"),  # the kept-alive connection was closed: the second goes on a new one, which breaks
        ("ok", "partial"),  # the kept-alive connection broke in the middle of the answer
    ],
)
async def test_a_request_the_instance_may_have_run_is_not_sent_to_it_again(first: str, second: str) -> None:
    server = RawServer(lambda n: first if n == 0 else second)
    async with server as url:
        client = TritonClient(UpstreamConfig(request_timeout_s=2.0))
        assert (await client.get(url, "/one")).status == 200
        await asyncio.sleep(0.1)  # a close of the first connection has reached the client
        with pytest.raises(InstanceUnreachable):
            await client.get(url, "/two")
        await client.close()
    assert server.received == 2  # once each: the router, not the pool, decides where to retry


async def test_a_kept_alive_connection_closed_before_the_request_is_replaced_and_the_request_sent_once_more() -> None:
    server = RawServer(lambda n: "ok")
    async with server as url:
        client = TritonClient(UpstreamConfig(request_timeout_s=2.0))
        assert (await client.get(url, "/one")).status == 200
        for conn in client._pool(url)._idle:
            conn.open = True  # the server's close not seen yet: the request goes out on it...
            conn.transport.abort()  # ...and finds it closed, before any answer
        assert (await client.get(url, "/two")).status == 200
        await client.close()
    assert server.received == 2


async def test_a_forgotten_instance_keeps_no_connection_open_once_its_requests_are_answered() -> None:
    server = RawServer(lambda n: "slow")
    async with server as url:
        client = TritonClient(UpstreamConfig(request_timeout_s=5.0))
        in_flight = asyncio.create_task(client.get(url, "/v2/health/live"))
        await asyncio.sleep(0.05)
        client.forget(url)  # the instance left the fleet while a request was in flight
        assert (await in_flight).status == 200
        await asyncio.sleep(0.1)
        assert server.open == 0
        await client.close()


async def test_an_answer_the_gateway_cannot_decode_is_counted_like_a_model_error(fake_triton, client: TritonClient) -> None:  # noqa: ANN001
    async def bf16(request: web.Request) -> web.Response:
        head = orjson.dumps({"model_name": "m", "model_version": "1", "outputs": [
            {"name": "y", "datatype": "BF16", "shape": [1, 2], "parameters": {"binary_data_size": 3}}]})  # fmt: skip
        return web.Response(body=head + bytes(3), headers={"Inference-Header-Content-Length": str(len(head))})  # a byte short

    url = await fake_triton(bf16)
    with pytest.raises(ModelError) as err:  # the router holds it against the instance only once another answers
        await client.infer(url, "m", "", INPUTS, None)
    assert err.value.status == 502 and err.value.triton_status == 200
    assert err.value.message.startswith("Triton instance gave a malformed answer:") and "BF16" in err.value.message
