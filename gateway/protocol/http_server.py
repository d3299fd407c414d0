"""uvicorn's httptools HTTP/1.1 protocol, sending each response's head and body in one write.

uvicorn writes the status line and headers when the app sends ``http.response.start`` and the
body when it sends ``http.response.body``: two socket writes, two loopback sends, for every
small response. ``OneWriteHttpToolsProtocol`` holds the head back until the first body message
and writes both together. Everything else is uvicorn's own code: header validation,
keep-alive, flow control, pipelining, HEAD, chunked bodies, 100-continue, errors.

It also bounds how long a request may take to arrive, which uvicorn does not: a connection
whose request stops arriving (its head, or its body before the last byte) for
``read_timeout_s`` is answered 408 and closed, and one that sends nothing at all is closed
after as long; a slow client still gets there, as long as its bytes keep coming. Without it,
a client that stops halfway holds its connection and its request forever. The app may set
the time (its ``read_timeout_s`` attribute; ``server.read_timeout_s`` for the gateway). The
same timer closes a connection left idle for uvicorn's ``timeout_keep_alive`` after its last
response, in place of the timer uvicorn arms at every response and cancels at the next
request. The clock is read once per socket read and once per response, and the timer moved
about once per period, not per request.

And it bounds a request's head (its request line and headers), which httptools reads whole
however large: one over ``max_header_bytes`` (the app's attribute; ``server.max_header_bytes``
for the gateway) is answered 431 and its connection closed, before the app sees it. Both what
the parser has read of it (the URL as it comes, each header once complete) and the bytes that
arrived for it (one header that never ends) are counted.

And at a graceful shutdown, it does not close a connection between requests (or before its first)
at once, as uvicorn does: a client may be sending its request that very moment, and a close with
the request unread resets the connection after the request went out, so the client cannot tell
whether it was served. Such a connection is closed once it has stayed idle for
``SHUTDOWN_IDLE_S``; a request that arrives meanwhile is answered, with ``connection: close``. A
request under way is answered, and its connection closed, as in uvicorn.

And it keeps an HTTP/1.0 connection open when the client asks to (``Connection: keep-alive``,
as ``ab -k`` does) and the response has a length: it says ``connection: keep-alive`` back, as
HTTP/1.0 wants. uvicorn closes every HTTP/1.0 connection, so such a client opened one per
request (Triton's own server keeps them).

Use it with ``uvicorn.run(app, http=OneWriteHttpToolsProtocol, loop="uvloop")``; both the
gateway (``python -m gateway serve``) and the no-op anchor (``perf/noop_app.py``) do.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from gateway.protocol import msgpack as msgpack_codec

READ_TIMEOUT_S = 30.0  # unless the app says otherwise
MAX_HEADER_BYTES = 65536  # unless the app says otherwise
# Where a connection is: waiting for its first request, in a request's head or body, or
# after its request arrived (being answered; once answered, the keep-alive timeout closes it when idle).
_FIRST, _READING, _READ = 0, 1, 2
SHUTDOWN_IDLE_S = 0.5  # at shutdown, how long an idle connection may still bring a request


class _HeldHead:
    """Stands in for the transport while uvicorn writes a response head: keeps the bytes."""

    __slots__ = ("head",)

    def __init__(self) -> None:
        self.head = b""

    def write(self, data: bytes) -> None:
        self.head += data


class _HeadFirst:
    """Stands in for the transport while uvicorn writes the first body bytes: the held head
    goes out with them, in one write."""

    __slots__ = ("transport", "head")

    def __init__(self, transport: Any, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        self.transport.write(head + data if head else data)

    def close(self) -> None:
        # uvicorn closes a connection that is not kept alive inside the send of the last body
        # message, after writing that body: with no body bytes written (a HEAD request), the
        # head is still held and must go out before the close, or the client gets nothing.
        if self.head:
            self.write(b"")
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class OneWriteCycle(RequestResponseCycle):
    """One request's cycle whose response head waits for its first body message."""

    _held: bytes | None = None
    http10_keep_alive = False  # an HTTP/1.0 request that asked to keep its connection

    async def send(self, message: Any) -> None:
        if not self.disconnected and self.transport.is_closing():
            # Gone while pipelined behind another request: uvicorn marks only the connection's
            # latest cycle disconnected, and writing to a closed transport raises.
            self.disconnected = True
        kind = message["type"]
        if kind == "http.response.start" and self.http10_keep_alive:
            message = self._http10_start(message)
        if kind == "http.response.start" and not self.response_started and not self.disconnected:
            transport, held = self.transport, _HeldHead()
            self.transport = held  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            self._held = held.head
            return
        head = self._held
        if head is None or kind != "http.response.body":
            return await super().send(message)
        self._held = None
        transport = self.transport
        self.transport = first = _HeadFirst(transport, head)  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = transport
        if first.head and not self.disconnected and not transport.is_closing():
            # No body bytes were written (a HEAD request) on a connection kept alive; on one
            # closed meanwhile, the head went out before the close (``_HeadFirst.close``).
            transport.write(first.head)

    def _http10_start(self, message: Any) -> Any:
        """The response start for an HTTP/1.0 client that asked to keep its connection: with
        ``connection: keep-alive`` where the response has a length (HTTP/1.0 has no chunked
        bodies: else it ends with the connection) and says nothing of the connection itself."""
        headers = list(message.get("headers", ()))
        names = {bytes(name).lower() for name, _ in headers}
        if b"content-length" not in names:
            self.keep_alive = False  # its end is the connection's: uvicorn says "close"
        if not self.keep_alive or b"connection" in names:  # closing (a shutdown), or the app says
            return message
        return {**message, "headers": [*headers, (b"connection", b"keep-alive")]}


def _app_setting(app: Any, name: str, default: float) -> float:
    """The app's attribute ``name``, looked for through the middleware uvicorn may wrap it in."""
    for _ in range(4):
        if hasattr(app, name):
            return getattr(app, name)
        app = getattr(app, "app", None)
    return default


class HeadTooLarge(Exception):
    """Raised inside the parser's callbacks to stop reading a head over the limit."""


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    _reading = _FIRST
    _last_read = 0.0
    _idle_since = 0.0  # when the connection's last response completed, nothing read after it
    _read_timer: asyncio.TimerHandle | None = None  # the connection's one timer (_check_reading)
    _check_at = 0.0  # when it runs
    _head_left = 0  # bytes the request's head may still take, by what the parser read of it
    _head_arrived = -1  # bytes that arrived for it after the read it began in; -1: no head being read
    _head_began = False  # a head began in the read being parsed
    _head_over = False
    _shutting_down = False  # the server is stopping: answer what arrives, then close
    _refusal: bytes | None = None  # an error answer waiting for the answers owed before it
    read_timeout_s = READ_TIMEOUT_S
    max_header_bytes = MAX_HEADER_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.read_timeout_s = float(_app_setting(self.app, "read_timeout_s", READ_TIMEOUT_S))
        self.max_header_bytes = int(_app_setting(self.app, "max_header_bytes", MAX_HEADER_BYTES))
        self._last_read = self.loop.time()
        self._check_at_time(self._last_read + self.read_timeout_s)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        super().data_received(data)
        if self._head_arrived >= 0 and not self._head_began:  # every byte of this read is the head's
            self._head_arrived += len(data)
            if self._head_arrived > self.max_header_bytes and not self.transport.is_closing():
                self._send_431()
        self._head_began = False

    def on_message_begin(self) -> None:
        self._reading = _READING
        self._head_left = self.max_header_bytes
        self._head_arrived, self._head_began = 0, True
        super().on_message_begin()

    def _head_read(self) -> None:
        """The request's head is complete (called by every ``on_headers_complete``)."""
        self._head_arrived = -1

    def on_url(self, url: bytes) -> None:
        self._head_left -= len(url)
        if self._head_left < 0:
            self._refuse_head()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_left -= len(name) + len(value) + 4  # as sent: "name: value\r\n"
        if self._head_left < 0:
            self._refuse_head()
        # uvicorn's own, here rather than called: once per header of every request.
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def _refuse_head(self) -> None:
        self._head_over = True
        raise HeadTooLarge  # the parser stops; uvicorn answers its error with send_400_response

    def send_400_response(self, msg: str) -> None:
        if not self._head_over:
            return self._refuse(400, msg)  # a request that is not HTTP/1.1
        self._send_431()

    def _send_431(self) -> None:
        limit = self.max_header_bytes
        self._refuse(431, f"request head (request line and headers) exceeds the gateway's limit of {limit} bytes")

    def _refuse(self, status: int, message: str) -> None:
        """Answer the request arriving with an error of the protocol's own, and close; after the
        answers still owed to requests read before it on the connection (pipelined), which
        would otherwise be lost behind it, reading nothing more meanwhile. In msgpack where the
        request's head was read and says its body is msgpack (a 408), else JSON."""
        content_type = b""
        if self._reading == _READING and self._head_arrived < 0:  # its head was read
            content_type = next((value for name, value in self.headers if name == b"content-type"), b"")
        body, media = msgpack_codec.error_answer(message, content_type)
        head = b"content-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (media, len(body))
        common = b"".join(b"%s: %s\r\n" % pair for pair in self.server_state.default_headers)  # date, server
        self._refusal = b"".join((STATUS_LINE[status], common, head, body))
        self._send_refusal()

    def _owes_answers(self) -> bool:
        """Whether requests read before the one refused still wait for their answers."""
        if self.pipeline:
            return True
        if self._reading == _READING and self._head_arrived < 0:
            return False  # the refused request's head was read: ``cycle`` is its own
        return self.cycle is not None and not self.cycle.response_complete

    def _send_refusal(self) -> None:
        if self._refusal is None or self.transport.is_closing():
            return
        if self._owes_answers():
            self.flow.pause_reading()  # read nothing more meanwhile (an answer completing resumes it)
            return
        self.transport.write(self._refusal)
        self.transport.close()

    def on_response_complete(self) -> None:
        """uvicorn's, but for its keep-alive timer, which it arms at every response and the next
        request's bytes cancel: for a cache hit that pair of timer operations cost as much as
        the lookup. Here the connection's one timer (``_check_reading``) closes a connection
        left idle ``timeout_keep_alive`` seconds after its last response, as uvicorn's timer
        would, and is moved only when it would look too late: about once per keep-alive period
        on a busy connection."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._reading != _READING:  # nothing of a next request read yet: idle from now on
            self._idle_since = now = self.loop.time()
            if self._check_at > now + self.timeout_keep_alive:
                self._check_at_time(now + self.timeout_keep_alive)
        self._send_refusal()

    def on_message_complete(self) -> None:
        self._reading = _READ
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().connection_lost(exc)

    def _check_at_time(self, when: float) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._check_at = when
        self._read_timer = self.loop.call_at(when, self._check_reading)

    def _check_reading(self) -> None:
        """The connection's timer: a request that stopped arriving is answered 408; a connection
        that sent nothing for ``read_timeout_s``, or nothing for ``timeout_keep_alive`` after
        its last response, is closed. Else it looks again when one of those could come due."""
        self._read_timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._reading == _READ:
            answered = not self.pipeline and (self.cycle is None or self.cycle.response_complete)
            if not answered:  # a request being answered: no limit of the protocol's own
                return self._check_at_time(now + self.read_timeout_s)
            due = self._idle_since + self.timeout_keep_alive
        elif self.flow.read_paused:  # paused by uvicorn: its bytes are not being read
            return self._check_at_time(now + self.read_timeout_s)
        else:  # a request on its way, or none yet
            due = self._last_read + self.read_timeout_s
        if now < due:
            return self._check_at_time(due)
        if self._reading == _READING:
            self._refuse(408, f"the request did not arrive: nothing came for {self.read_timeout_s:g} s")
        else:
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._head_read()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and type(cycle) is RequestResponseCycle:
            cycle.__class__ = OneWriteCycle
            if self.parser.get_http_version() == "1.0" and self.parser.should_keep_alive() and not self.parser.should_upgrade():
                cycle.keep_alive = cycle.http10_keep_alive = True  # (uvicorn closes every HTTP/1.0 one)
        if self._shutting_down and cycle is not None:
            cycle.keep_alive = False

    def shutdown(self) -> None:
        """The server is stopping (module docstring): a request under way is answered and its
        connection closed; an idle connection is closed once idle for ``SHUTDOWN_IDLE_S``."""
        self._shutting_down = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif self._reading != _READING:
            self.loop.call_later(SHUTDOWN_IDLE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.transport.is_closing() or self._reading == _READING:
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
