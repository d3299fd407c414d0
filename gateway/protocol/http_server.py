"""uvicorn's httptools HTTP/1.1 protocol, sending each response's head and body in one write.

uvicorn writes the status line and headers when the app sends ``http.response.start`` and the
body when it sends ``http.response.body``: two socket writes, two loopback sends, for every
small response. ``OneWriteHttpToolsProtocol`` holds the head back until the first body message
and writes both together. Everything else is uvicorn's own code: header validation,
keep-alive, flow control, pipelining, HEAD, chunked bodies, 100-continue, errors.

Use it with ``uvicorn.run(app, http=OneWriteHttpToolsProtocol, loop="uvloop")``; both the
gateway (``python -m gateway serve``) and the no-op anchor (``perf/noop_app.py``) do.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


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
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class OneWriteCycle(RequestResponseCycle):
    """One request's cycle whose response head waits for its first body message."""

    _held: bytes | None = None

    async def send(self, message: Any) -> None:
        kind = message["type"]
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
        if first.head and not self.disconnected:  # no body bytes were written (a HEAD request)
            transport.write(first.head)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and type(cycle) is RequestResponseCycle:
            cycle.__class__ = OneWriteCycle
