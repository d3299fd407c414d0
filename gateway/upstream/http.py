"""A small HTTP/1.1 client for the gateway's one upstream: kept-alive connections to one Triton
instance, one request at a time per connection, responses parsed by httptools.

Why not aiohttp, which the gateway used first: every batch the gateway sends costs one upstream
request, and aiohttp spent about 378 µs of CPU on each (16-row digits batch, loopback Triton)
against 133 µs for this client, decoding included; at low load that is latency, at high load
throughput. The parsing is httptools' (the parser uvicorn serves with); what is left here is
connection reuse, limits and timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from dataclasses import dataclass, field

import httptools


def failure_reason(exc: BaseException) -> str:
    """Why a connection failed, in words that name no address: messages reach clients, and the
    one that failed is the caller's to name (asyncio's own loop puts it in its OSError text)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    errno = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(errno, int) and errno > 0:
        return os.strerror(errno)
    return getattr(exc, "strerror", None) or exc.__class__.__name__


class ConnectFailed(Exception):
    """No connection could be made (refused, unreachable, connect timeout)."""


class ConnectionBroke(Exception):
    """An open connection closed or failed before the whole response arrived."""


class Abandoned(ConnectionBroke):
    """The request was given up while in flight: its instance stopped answering (``HostPool.abandon``)."""


class MalformedResponse(Exception):
    """What came back is not HTTP/1.1."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[bytes, bytes]  # lower-case names
    body: bytes


@dataclass(slots=True, eq=False)
class _Connection(asyncio.Protocol):
    transport: asyncio.Transport | None = None
    loop: asyncio.AbstractEventLoop | None = None
    parser: httptools.HttpResponseParser | None = None
    waiter: asyncio.Future[Response] | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    open: bool = True
    reusable: bool = True
    answering: bool = False  # bytes of the response to the request in flight have arrived
    idle_since: float = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()  # once: each lookup costs a getpid() syscall
        self.parser = httptools.HttpResponseParser(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._fail(ConnectionBroke(f"connection closed: {'by the server' if exc is None else failure_reason(exc)}"))

    def data_received(self, data: bytes) -> None:
        self.answering = True
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserError as exc:
            self._fail(MalformedResponse(f"not an HTTP response: {exc}"))
            self.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        response = Response(self.parser.get_status_code(), self.headers, body)  # type: ignore[union-attr]
        self.reusable = self.parser.should_keep_alive()  # type: ignore[union-attr]
        self.headers, self.chunks = {}, []
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(response)

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def send(self, head: bytes, body: bytes) -> asyncio.Future[Response]:
        self.waiter = self.loop.create_future()  # type: ignore[union-attr]
        self.answering = False
        if len(body) < 65536:
            self.transport.write(head + body)  # type: ignore[union-attr]  # one syscall
        else:
            self.transport.writelines((head, body))  # type: ignore[union-attr]  # no copy of a large body
        return self.waiter

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()


class HostPool:
    """Kept-alive connections to one ``host:port``, at most ``limit`` at once."""

    def __init__(self, host: str, port: int, limit: int, connect_timeout: float, idle_timeout: float = 30.0) -> None:
        self.host, self.port = host, port
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._idle: deque[_Connection] = deque()
        self._busy: set[_Connection] = set()  # waiting for a response
        self._closed = False  # the instance left the fleet, or the gateway stops: nothing kept
        self._slots = asyncio.Semaphore(limit)
        self._answered_at = -float("inf")  # when a response last came in whole (monotonic)
        # Requests not sent yet (waiting for a slot, or connecting), and the times ``abandon``
        # gave requests up: one that began waiting before the latest is given up too, unsent.
        self._unsent = 0
        self._abandons = 0
        self._abandon_reason = ""
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    async def _connection(self, reuse: bool = True) -> tuple[_Connection, bool]:
        """A connection, and whether it is a kept-alive one (which the server may have closed)."""
        now = time.monotonic()
        while reuse and self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to have been closed
            if conn.open and now - conn.idle_since < self._idle_timeout:
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(_Connection, self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect: {failure_reason(exc)}") from None
        return conn, False

    async def request(
        self, method: str, target: str, headers: bytes, body: bytes, timeout: float, capped: bool = True
    ) -> Response:
        """One request; ``headers`` are pre-encoded ``Name: value\\r\\n`` lines; ``capped`` False
        (a health probe): not counted against the cap, so never waiting behind the requests it
        is to judge. Raises ConnectFailed, ConnectionBroke, MalformedResponse or TimeoutError."""
        head = b"%s %s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n" % (
            method.encode(), target.encode(), self._host_header, headers, len(body)
        )
        # The limit covers the wait for a connection slot too: a full pool must not hold a
        # request (or a probe) past its time.
        abandons = self._abandons
        self._unsent += 1
        unsent = True
        try:
            async with asyncio.timeout(timeout), self._slots if capped else contextlib.nullcontext():
                self._check_given_up(abandons)
                conn, reused = await self._connection()
                if self._abandons != abandons:
                    conn.close()
                    self._check_given_up(abandons)
                self._unsent -= 1
                unsent = False
                try:
                    response = await self._exchange(conn, head, body)
                except ConnectionBroke as exc:
                    if not reused or conn.answering or isinstance(exc, Abandoned):
                        raise  # the server may have run the request: never sent twice from here
                    # A kept-alive connection the server had already closed: once more, on a new one.
                    conn, _ = await self._connection(reuse=False)
                    response = await self._exchange(conn, head, body)
                return response
        finally:
            if unsent:
                self._unsent -= 1

    def _check_given_up(self, abandons: int) -> None:
        """Raise ConnectFailed (nothing sent: the router may try another instance) if ``abandon``
        gave the requests up since a request began, ``abandons`` being their count then."""
        if self._abandons != abandons:
            raise ConnectFailed(f"{self._abandon_reason}; the request was not sent")

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes) -> Response:
        self._busy.add(conn)
        try:
            response = await conn.send(head, body)
        except BaseException:
            conn.close()  # a response may still be on its way: this connection cannot be reused
            raise
        finally:
            self._busy.discard(conn)
        self._answered_at = now = time.monotonic()
        if conn.reusable and conn.open and not self._closed:
            conn.idle_since = now
            self._idle.append(conn)
        else:
            conn.close()
        return response

    def abandon(self, reason: str, quiet_for: float = 0.0) -> int:
        """Give up every request waiting for its response (each raises ``Abandoned``), closing
        their connections, and every one not sent yet, waiting for a connection slot or
        connecting (each raises ``ConnectFailed`` when it gets there: else each would go on to
        the server its neighbours were given up on); return how many. None if a response came
        in within the last ``quiet_for`` seconds: a server still answering is slow, not gone,
        and what it holds would run twice."""
        if time.monotonic() - self._answered_at < quiet_for:
            return 0
        if self._unsent:  # those waiting for a slot or connecting: given up when they get there
            self._abandons += 1
            self._abandon_reason = reason
        busy, self._busy = self._busy, set()
        for conn in busy:
            conn._fail(Abandoned(reason))
            conn.close()
        return len(busy) + self._unsent

    def close(self) -> None:
        """Close the idle connections, and each one in use once its response is in."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
