"""One batcher per model version for all the workers of a host (``[batching] host_wide``).

Each worker batches the requests it holds (``batcher.py``). With several workers the requests
for a model split among them, and so do its batches: each worker sends small ones, with one in
flight at a time, and the upstream executes several where one process would have sent one. A
model whose cost is largely per execution, or per request in an execution (Triton's Python
backend on a GPU: about 0.8 ms an execution plus 0.1 ms a request, whatever the rows), pays that
in executions, and its clients in waiting for them.

With ``host_wide``, the batcher of each model version lives in one worker, the version's
**owner**, and the others hand it their requests' tensors over a Unix socket: it batches them
with its own and answers each with its rows of the outputs. The owner is the live worker that a
rendezvous hash of (model, version, pid) ranks first, so the workers agree on it without
talking, and a host's versions spread over its workers. Each worker listens on
``<workers folder>/batch/<pid>.sock`` and lists the others there every ``LIST_S``.

Nothing is lost when the owner cannot serve a request:

* an owner that cannot be reached (gone, or not started yet), that is closing, or whose
  connection breaks before its answer, leaves the request to the worker's own batcher: computed
  at most once more, never lost (``submit`` returns None);
* the owner's error about the request (Triton's 4xx, a deadline passed, its queue full) is the
  request's error: the same class, status and message; but an owner that does not know the
  version (its view of the fleet behind) declines it, and the worker batches it itself;
* a caller that stops waiting (its deadline, a cancellation) tells the owner, which drops the
  request if it is still queued; so does a requesting worker's connection closing (the worker
  stopped or was killed);
* no wait is unbounded: without an answer within ``wait_s`` the request fails with 504.

A forwarded request's deadline travels with it (``time.monotonic`` is the host's one clock); its
client's disconnection does not, so the owner computes the rows of a client that left unless the
worker cancels them first.

Frames on the socket: a 4-byte big-endian length, then a msgpack array whose first item is its
kind: ``[REQUEST, id, model, version, deadline, tensors]``, ``[CANCEL, id]``, ``[ANSWER, id,
version, tensors, parameters]``, ``[ERROR, id, class name, status, message]``, ``[DECLINED,
id]``. A tensor is ``[name, datatype, shape, data]``: its bytes, or for ``BYTES`` the list of its
elements.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack

from gateway.batcher import BatchResult
from gateway.errors import GatewayError, GatewayTimeout, NotFound, Unavailable, UpstreamError, rebuilt
from gateway.tensors import Tensor, pack_tensors, unpack_tensors

log = logging.getLogger(__name__)

FOLDER = "batch"  # in the workers' folder: one socket per worker
LIST_S = 1.0  # how often a worker lists the others' sockets
MAX_FRAME = 1 << 30

REQUEST, CANCEL, ANSWER, ERROR, DECLINED = range(5)

# The owner's side: batch these inputs for (model, version) with its own requests, by deadline.
Serve = Callable[[str, str, list[Tensor], "float | None"], Awaitable[BatchResult]]


def owner_of(model: str, version: str, pids: list[int]) -> int | None:
    """The worker among ``pids`` that batches (model, version): the one its rendezvous hash
    ranks first (None: no worker). Removing a worker moves only the versions it owned."""
    if not pids:
        return None

    def rank(pid: int) -> bytes:
        return hashlib.blake2b(f"{model}\0{version}\0{pid}".encode(), digest_size=8).digest()

    return max(pids, key=rank)


class _Link(asyncio.Protocol):
    """One connection between two workers, either side: frames in, frames out."""

    def __init__(self, on_frame: Callable[[_Link, list[Any]], None], on_lost: Callable[[_Link], None]) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buffer = bytearray()
        self.transport: asyncio.BaseTransport | None = None
        self.closed = False
        self.waiting: dict[int, asyncio.Future[list[Any] | None]] = {}  # a worker's requests sent on it
        self.serving: dict[int, asyncio.Task[None]] = {}  # an owner's requests taken from it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's are not asyncio.Transport instances, but write alike

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= 4:
            size = int.from_bytes(buffer[start : start + 4], "big")
            if size > MAX_FRAME:
                log.error("host batching: a frame of %d bytes from another worker; closing its connection", size)
                self.close()
                return
            if len(buffer) - start - 4 < size:
                break
            try:
                frame = msgpack.unpackb(buffer[start + 4 : start + 4 + size], raw=False)
                start += 4 + size
                self._on_frame(self, frame)
            except Exception:  # a malformed frame: this connection cannot be trusted further
                log.exception("host batching: a bad frame from another worker; closing its connection")
                self.close()
                return
        del buffer[:start]

    def send(self, frame: list[Any]) -> bool:
        """Whether the frame went out (False: the connection is closed)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        body = msgpack.packb(frame, use_bin_type=True)
        self.transport.write(len(body).to_bytes(4, "big") + body)  # type: ignore[attr-defined]
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost(self)


class HostBatching:
    """A worker's side of host-wide batching: ``submit`` hands a request to its version's owner;
    the server takes the others' requests for the versions this worker owns (``serve``)."""

    def __init__(
        self, folder: str | Path, serve: Serve, wait_s: float, pid: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._dir = Path(folder) / FOLDER
        self._serve = serve
        self._wait_s = wait_s
        self.pid = pid or os.getpid()
        self._clock = clock
        self._server: asyncio.AbstractServer | None = None
        self._accepted: set[_Link] = set()
        self._closing = False
        self._pids: list[int] = []
        self._listed_at = -LIST_S
        self._owners: dict[tuple[str, str], int | None] = {}
        self._links: dict[int, _Link] = {}
        self._connecting: dict[int, asyncio.Future[_Link | None]] = {}
        self._ids = itertools.count()
        # Requests this worker handed to an owner; requests it batched for the other workers;
        # requests it meant to hand over and batched itself (owner unreachable, closing, gone).
        self.forwarded = 0
        self.served = 0
        self.kept = 0

    @property
    def path(self) -> Path:
        return self._dir / f"{self.pid}.sock"

    async def start(self) -> bool:
        """Listen for the other workers' requests; False if this worker cannot (its batchers are
        then its own, as without ``host_wide``). The socket appears under its name only once it
        listens, so a worker that finds it can connect."""
        loop = asyncio.get_running_loop()
        temporary = self._dir / f".{self.pid}.sock"
        try:
            self._dir.mkdir(exist_ok=True)
            temporary.unlink(missing_ok=True)
            self._server = await loop.create_unix_server(lambda: self._accept(), str(temporary))
            os.replace(temporary, self.path)
        except OSError as exc:  # e.g. a folder whose path is too long for a Unix socket's
            log.warning("host batching: cannot listen at %s (%s); this worker batches its own requests", self.path, exc)
            if self._server is not None:
                self._server.close()
                self._server = None
            return False
        return True

    def _accept(self) -> _Link:
        link = _Link(self._on_request, self._on_requester_lost)
        self._accepted.add(link)
        return link

    def _on_requester_lost(self, link: _Link) -> None:
        """A requesting worker's connection closed (it stopped, or was killed): nobody reads
        the answers to its requests any more, so those still queued here are dropped."""
        self._accepted.discard(link)
        for task in list(link.serving.values()):
            task.cancel()

    # -- the owner's side -----------------------------------------------------------------------

    def _on_request(self, link: _Link, frame: list[Any]) -> None:
        kind, rid = frame[0], frame[1]
        if kind == CANCEL:
            task = link.serving.get(rid)
            if task is not None:
                task.cancel()
            return
        if kind != REQUEST:
            return
        if self._closing:
            link.send([DECLINED, rid])
            return
        _, _, model, version, deadline, tensors = frame
        task = asyncio.get_running_loop().create_task(self._serve_one(link, rid, model, version, deadline, tensors))
        link.serving[rid] = task
        task.add_done_callback(lambda _: link.serving.pop(rid, None))

    async def _serve_one(self, link: _Link, rid: int, model: str, version: str, deadline: float | None, tensors: list[Any]) -> None:
        # Served: counted once its answer or error went out (``send`` returns True). A request
        # declined, or whose connection closed first, is batched by its own worker, counted there.
        try:
            result = await self._serve(model, version, unpack_tensors(tensors), deadline)
            answer = [ANSWER, rid, result.version, pack_tensors(result.outputs), result.parameters]
            self.served += link.send(answer)
        except GatewayError as exc:
            if isinstance(exc, NotFound) or (self._closing and isinstance(exc, Unavailable)):
                # This worker does not know the version (yet), or its batcher shut down: the
                # requesting worker batches the request itself.
                link.send([DECLINED, rid])
            else:
                self.served += link.send([ERROR, rid, type(exc).__name__, exc.status, exc.message])
        except Exception as exc:  # a bug must fail the request, not leave its worker waiting
            log.exception("host batching: serving another worker's request for %s failed", model)
            self.served += link.send([ERROR, rid, UpstreamError.__name__, 500, f"internal error while serving '{model}': {exc}"])

    # -- the requesting side --------------------------------------------------------------------

    def owner(self, model: str, version: str) -> int | None:
        """The pid of the worker that batches (model, version), from the last listing."""
        now = self._clock()
        if now - self._listed_at >= LIST_S:
            self._listed_at = now
            self._owners.clear()
            self._pids = self._list()
        key = (model, version)
        if key not in self._owners:
            self._owners[key] = owner_of(model, version, self._pids)
        return self._owners[key]

    def _list(self) -> list[int]:
        pids = []
        try:
            names = os.listdir(self._dir)
        except OSError:
            return [self.pid]
        for name in names:
            stem, _, suffix = name.partition(".")
            if suffix == "sock" and stem.isdigit():
                pids.append(int(stem))
        return pids if self.pid in pids or self._server is None else [*pids, self.pid]

    async def submit(self, model: str, version: str, inputs: list[Tensor], deadline: float | None) -> BatchResult | None:
        """The owner's answer for this request, or None: this worker batches it itself (it
        owns the version, or the owner cannot serve it). The owner's errors are raised."""
        pid = self.owner(model, version)
        if pid is None or pid == self.pid or self._closing:
            return None
        link = self._links.get(pid)
        if link is None or link.closed:
            link = await self._connect(pid)
            if link is None:
                self.kept += 1
                return None
        rid = next(self._ids)
        waiting: asyncio.Future[list[Any] | None] = asyncio.get_running_loop().create_future()
        if not link.send([REQUEST, rid, model, version, deadline, pack_tensors(inputs)]):
            self.kept += 1
            return None
        link.waiting[rid] = waiting
        self.forwarded += 1
        try:
            async with asyncio.timeout(self._wait_s):
                reply = await waiting
        except TimeoutError:
            link.send([CANCEL, rid])
            raise GatewayTimeout(f"the worker batching model '{model}' did not answer within {self._wait_s:.0f} s") from None
        except asyncio.CancelledError:
            link.send([CANCEL, rid])
            raise
        finally:
            link.waiting.pop(rid, None)
        if reply is None:  # the connection broke, or the owner is closing: batched here
            self.kept += 1
            return None
        if reply[0] == ERROR:
            _, _, kind, status, message = reply
            raise rebuilt(kind, message, status)
        _, _, served_version, outputs, parameters = reply
        return BatchResult(served_version, unpack_tensors(outputs), parameters)

    async def _connect(self, pid: int) -> _Link | None:
        pending = self._connecting.get(pid)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        pending = self._connecting[pid] = loop.create_future()
        path = self._dir / f"{pid}.sock"
        link: _Link | None = None
        try:
            _, link = await loop.create_unix_connection(lambda: _Link(self._on_reply, self._on_link_lost), str(path))
            self._links[pid] = link
        except OSError as exc:
            # Not listening: its worker is gone (it listened before its socket had this name).
            log.warning("host batching: worker %d cannot be reached (%s); batching its versions here", pid, exc)
            if exc.errno == errno.ECONNREFUSED:
                path.unlink(missing_ok=True)
            self._pids = [p for p in self._pids if p != pid]
            self._owners.clear()
        finally:
            del self._connecting[pid]
            pending.set_result(link)
        return link

    def _on_reply(self, link: _Link, frame: list[Any]) -> None:
        waiting = link.waiting.get(frame[1])
        if waiting is not None and not waiting.done():
            waiting.set_result(None if frame[0] == DECLINED else frame)

    def _on_link_lost(self, link: _Link) -> None:
        for waiting in link.waiting.values():
            if not waiting.done():
                waiting.set_result(None)
        for pid, known in list(self._links.items()):
            if known is link:
                del self._links[pid]

    def stats(self) -> dict[str, int]:
        return {"forwarded": self.forwarded, "served": self.served, "kept": self.kept}

    def begin_close(self) -> None:
        """Take no more requests, from the other workers (declined: they batch them themselves)
        nor for them (batched here): the requests being served finish as the batchers drain."""
        self._closing = True
        if self._server is not None:
            self.path.unlink(missing_ok=True)
            self._server.close()

    async def close(self) -> None:
        """After ``begin_close`` and the batchers' drain: cancel what is still being served
        (its workers batch it themselves, seeing the connection close), close every connection."""
        self.begin_close()
        for link in list(self._accepted):
            for task in list(link.serving.values()):
                task.cancel()
            link.close()
        for link in list(self._links.values()):
            link.close()
        if self._server is not None:
            await self._server.wait_closed()
