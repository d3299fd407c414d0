"""The gateway's HTTP/1.1 protocol: uvicorn's, writing each response in one go
(``http_server.OneWriteHttpToolsProtocol``), and answering repeats from the response cache
itself.

A cache hit needs no ASGI at all: the answer is stored as bytes. Through uvicorn's ordinary path
it would still cost a request cycle, a task, the ASGI messages and the head built header by
header, about half of what the gateway spends on it. So for a POST the app says may be a repeat
(``may_answer_from_cache``: an infer request for a cached model with a small body of declared
length, not compressed), the protocol holds the body back instead of starting the ASGI cycle,
and once the request is complete asks the app for the stored answer
(``answer_from_cache``: the same lookup, counting and rollout bookkeeping as the ASGI path).
A hit is written at once, with the server's default headers (``date``) as uvicorn would add
them; anything else (a miss, a bypass, a passed deadline) goes on exactly as if the headers had
only just arrived: the ordinary cycle starts and gets the whole body, and the scope carries
``HELD`` (the arrival time, and what the app's lookup learned: the version a rollout drew for
the request, so it is drawn once, and the key it was looked up under, so it is hashed once).

Only a request that uvicorn would run at once is held: HTTP/1.1, kept alive, no ``Expect:
100-continue``, no upgrade, no concurrency limit, no earlier request of the connection still
being answered (pipelining keeps its order through uvicorn's own queue), and the socket taking
writes (a client that does not read its answers gets the ordinary path, which waits for it).
A client that leaves while its request is held is counted by the app (``request_lost``).

Use it with ``uvicorn.run(app, http=CachedAnswerHttpToolsProtocol, loop="uvloop")``, where
``app`` has the two methods above (``gateway.infer_endpoint.InferEndpoint``); with any other app
it is ``OneWriteHttpToolsProtocol``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from gateway.protocol.http_server import OneWriteHttpToolsProtocol

# The scope key of a request the protocol held and then handed to the app: (arrival time, what
# ``answer_from_cache`` returned beside its answer). The app reuses both, so the request is timed
# from its arrival and its lookup's work (the rollout's draw, the key) is not done twice.
HELD = "gateway.held"

log = logging.getLogger(__name__)

STATUS_200 = b"HTTP/1.1 200 OK\r\n"


class _DefaultHead:
    """The server's default header lines, re-encoded only when uvicorn replaces the list (the
    ``date`` header, once a second)."""

    __slots__ = ("source", "lines")

    def __init__(self) -> None:
        self.source: Any = None
        self.lines = b""

    def get(self, default_headers: list[tuple[bytes, bytes]]) -> bytes:
        if default_headers is not self.source:
            self.lines = STATUS_200 + b"".join(b"%s: %s\r\n" % (k, v) for k, v in default_headers)
            self.source = default_headers
        return self.lines


_DEFAULT_HEAD = _DefaultHead()


class CachedAnswerHttpToolsProtocol(OneWriteHttpToolsProtocol):
    _held: list[bytes] | None = None  # the body of a request being held, while it arrives
    _held_since = 0.0
    _shutting_down = False

    def on_message_begin(self) -> None:
        # A hit completes its response inside the parser's run, which arms the keep-alive timer
        # (on_response_complete); a request that follows in the same read must disarm it, as the
        # next read would, or the timer could close the connection while that request is served.
        self._unset_keepalive_if_required()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
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
            and self._may_answer()
        ):
            self._held = []
            self._held_since = time.monotonic()
            return
        super().on_headers_complete()

    def _may_answer(self) -> bool:
        check = getattr(self.app, "may_answer_from_cache", None)
        if check is None:
            return False
        try:
            return check(self.url, self.headers)
        except Exception:  # a bug: the ordinary path answers the request
            log.exception("checking a request for the cache in the protocol failed")
            return False

    def on_body(self, body: bytes) -> None:
        if self._held is not None:
            self._held.append(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        held = self._held
        if held is None:
            return super().on_message_complete()
        self._held = None
        body = held[0] if len(held) == 1 else b"".join(held)
        answer = looked = None
        if not self._shutting_down:
            try:
                answer, looked = self.app.answer_from_cache(self.url, self.headers, body, self._held_since)
            except Exception:  # a bug: the ordinary path still answers the request
                log.exception("answering from the cache in the protocol failed")
        if answer is not None:
            head = _DEFAULT_HEAD.get(self.server_state.default_headers)
            self.transport.write(b"".join((head, answer.head, b"\r\n", answer.body)))
            self.on_response_complete()
            return
        # Not answered here: the ordinary way, as if the headers had only just arrived, with when
        # the request arrived and what the lookup learned (``HELD`` in the scope).
        self.scope[HELD] = (self._held_since, looked)
        super().on_headers_complete()
        if self._shutting_down and self.cycle is not None:
            self.cycle.keep_alive = False
        if body:
            super().on_body(body)
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._held is not None:  # the client left while its request arrived
            self._held = None
            lost = getattr(self.app, "request_lost", None)
            if lost is not None:
                try:
                    lost(self.url)
                except Exception:
                    log.exception("counting a request lost in the protocol failed")
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._held is not None:  # a request arriving: answer it, then close
            self._shutting_down = True
            return
        super().shutdown()
