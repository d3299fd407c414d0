"""The gateway's HTTP/1.1 protocol: uvicorn's, writing each response in one go
(``http_server.OneWriteHttpToolsProtocol``), and serving infer requests itself, without ASGI.

Through uvicorn's ordinary path every request costs a request cycle object, the ASGI scope and
messages, and a head built and checked header by header: for a small infer request, a large
share of what the gateway spends on it. So for a POST the app accepts (``may_serve``: an infer
request with a small body of declared length, not compressed), the protocol holds the body back
instead of starting the ASGI cycle, and once the request is complete:

1. asks the app for a stored answer (``answer_from_cache``: a cache hit, counted as any other
   answer); one is written at once, within the parser's callback: no task at all;
2. otherwise starts a task that awaits the app's answer (``serve_held``: the infer endpoint's
   whole path, with what the lookup learned, so a rollout's draw and the raw key are not done
   twice) and writes it, head and body in one write, with the server's default headers (``date``)
   as uvicorn would add them.

While that task runs, the protocol's request cycle is a ``_Served``: uvicorn's own bookkeeping
reads it as it reads its cycles, so a request pipelined behind it waits in uvicorn's queue (its
order kept), a shutdown lets it finish and then closes the connection, and a lost connection
marks it ``disconnected`` (the batcher drops a queued request whose client left). The task is
one of the server's tasks, which a graceful shutdown waits for; one still running when that
wait runs out (uvicorn cancels it), or a bug, is answered 500 and its connection closed, as
uvicorn answers an ASGI app that fails, so a request pipelined behind it never takes its place;
the app counts it (``request_failed``).

Only a request that uvicorn would run at once is held: HTTP/1.1, kept alive, no ``Expect:
100-continue``, no upgrade, no concurrency limit, no earlier request of the connection still
being answered, and the socket taking writes (a client that does not read its answers gets the
ordinary path, which waits for it). A client that leaves while its request is held is counted
by the app (``request_lost``). Everything else goes the ordinary way, unchanged.

Use it with ``uvicorn.run(app, http=InferHttpToolsProtocol, loop="uvloop")``, where ``app`` has the
methods above (``gateway.infer_endpoint.InferEndpoint``); with any other app it is
``OneWriteHttpToolsProtocol``. An app without ``serve_held`` (perf/instant_triton.py) has the
requests it does not answer at once served the ordinary way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from gateway.protocol import v2
from gateway.protocol.http_server import _READ, OneWriteHttpToolsProtocol

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Reply:
    """The answer ``serve_held`` gives: status, headers (Content-Length among them) and body; ``head``:
    the headers as HTTP/1.1 header lines where they are at hand already (a stored answer)."""

    status: int
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes
    head: bytes | None = None


_ERROR_BODY = v2.error_body("internal gateway error")
INTERNAL_ERROR = Reply(
    500, [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_ERROR_BODY))], _ERROR_BODY
)


class _DefaultHead:
    """The server's default header lines, re-encoded only when uvicorn replaces the list (the
    ``date`` header, once a second)."""

    __slots__ = ("source", "lines")

    def __init__(self) -> None:
        self.source: Any = None
        self.lines = b""

    def get(self, default_headers: list[tuple[bytes, bytes]]) -> bytes:
        if default_headers is not self.source:
            self.lines = b"".join(b"%s: %s\r\n" % (k, v) for k, v in default_headers)
            self.source = default_headers
        return self.lines


_DEFAULT_HEAD = _DefaultHead()


class _NoEvent:
    """uvicorn sets its cycle's ``message_event`` on connection loss; a served request has none."""

    __slots__ = ()

    def set(self) -> None:
        pass


class _Served:
    """The protocol's request cycle while ``serve_held`` answers a request: the attributes
    uvicorn's protocol reads of a cycle."""

    __slots__ = ("response_complete", "disconnected", "keep_alive")

    message_event = _NoEvent()

    def __init__(self) -> None:
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = True

    def gone(self) -> bool:
        return self.disconnected


class InferHttpToolsProtocol(OneWriteHttpToolsProtocol):
    _held: list[bytes] | None = None  # the body of a request being held, while it arrives
    _held_target: Any = None  # what may_serve said of it
    _held_since = 0.0

    def on_headers_complete(self) -> None:
        self._head_read()
        target = None
        if (
            self.parser.get_method() == b"POST"
            and not self.expect_100_continue
            and (self.cycle is None or self.cycle.response_complete)
            # A client not reading its answers: the ordinary path, which waits for the socket.
            and not self.flow.write_paused
            and self.limit_concurrency is None
            and self.parser.get_http_version() == "1.1"
            and self.parser.should_keep_alive()
            and not self.parser.should_upgrade()
            and not self._shutting_down
        ):
            target = self._may_serve()
        if target is not None:
            self._held = []
            self._held_target = target
            self._held_since = time.monotonic()
            return
        super().on_headers_complete()

    def _may_serve(self) -> Any:
        check = getattr(self.app, "may_serve", None)
        if check is None:
            return None
        try:
            return check(self.url, self.headers)
        except Exception:  # a bug: the ordinary path answers the request
            log.exception("checking a request in the protocol failed")
            return None

    def on_body(self, body: bytes) -> None:
        if self._held is not None:
            self._held.append(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        held = self._held
        if held is None:
            return super().on_message_complete()
        self._reading = _READ
        self._held = None
        target, start = self._held_target, self._held_since
        body = held[0] if len(held) == 1 else b"".join(held)
        answer = None
        looked: Any = (None, None)
        if not self._shutting_down:
            try:
                answer, looked = self.app.answer_from_cache(target, self.headers, body, start)
            except Exception:  # a bug: the full path still answers the request
                log.exception("answering from the cache in the protocol failed")
        if answer is not None:
            self._write(200, answer.head, answer.body)
            self.on_response_complete()
            return
        serve = getattr(self.app, "serve_held", None)
        if serve is None:  # the ordinary way, as if the headers had only just arrived
            super().on_headers_complete()
            if self._shutting_down and self.cycle is not None:
                self.cycle.keep_alive = False
            if body:
                super().on_body(body)
            super().on_message_complete()
            return
        self.cycle = served = _Served()  # type: ignore[assignment]
        if self._shutting_down:
            served.keep_alive = False
        try:
            answering = serve(self.url, target, self.headers, body, start, looked, served.gone)
        except Exception:  # a bug: answered 500 by _serve
            log.exception("serving a request in the protocol failed")
            answering = None
        task = self.loop.create_task(self._serve(served, answering, target, start))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _serve(self, served: _Served, answering: Any, target: tuple[str, str], start: float) -> None:
        reply = None
        if answering is not None:  # else serve_held failed to start (logged)
            try:
                reply = await answering
            except BaseException as exc:  # a bug, or the server cancelling it (its shutdown grace ran out)
                if not isinstance(exc, asyncio.CancelledError):
                    log.exception("serving a request in the protocol failed")
            else:
                if reply is None and not served.disconnected:
                    log.error("serve_held gave no answer to a client still connected")
        if reply is None and not served.disconnected:
            # Answered 500 as uvicorn answers an ASGI app that failed, and the connection closed:
            # a request pipelined behind this one must never take this one's answer.
            reply = INTERNAL_ERROR
            served.keep_alive = False
            failed = getattr(self.app, "request_failed", None)
            if failed is not None:
                try:
                    failed(target, start)
                except Exception:
                    log.exception("counting a request failed in the protocol failed")
        if reply is not None and not served.disconnected and not self.transport.is_closing():
            head = reply.head
            if head is None:
                head = b"".join(b"%s: %s\r\n" % h for h in reply.headers)
            if not served.keep_alive:
                head += b"connection: close\r\n"
            self._write(reply.status, head, reply.body)
        served.response_complete = True
        if not served.keep_alive:
            self.transport.close()
        self.on_response_complete()

    def _write(self, status: int, head: bytes, body: bytes) -> None:
        """A whole response in one write: the status line, the server's default headers (``date``),
        ``head`` (header lines) and ``body``."""
        default = _DEFAULT_HEAD.get(self.server_state.default_headers)
        self.transport.write(b"".join((STATUS_LINE[status], default, head, b"\r\n", body)))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._held is not None:  # the client left while its request arrived
            self._held = None
            lost = getattr(self.app, "request_lost", None)
            if lost is not None:
                try:
                    lost(self._held_target)
                except Exception:
                    log.exception("counting a request lost in the protocol failed")
        super().connection_lost(exc)

