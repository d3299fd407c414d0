"""Connections spread evenly over the gateway's worker processes (``server.workers`` > 1).

uvicorn's workers share one listening socket. A connection goes to whichever worker's event loop
accepts it first, and libuv accepts every connection waiting at that moment, so one burst of
connects can land on a single worker: measured with 4 workers and 16 connections opened at once
or one after another, the busiest worker held 5 to 10 of them and the idlest 0 to 3. A connection
stays with its worker for its life, so with the few long-lived connections of a load balancer or
``perf_analyzer`` in front, one worker carries up to twice its share while another idles.

So each worker publishes how many connections it holds, in a table in the workers' folder
(``host_files.create_workers_folder``), mapped in memory: one slot per worker, with a heartbeat.
A worker listens only while it holds no more connections than the least loaded live worker
(ties listen). When a connection puts it above, it stops listening at the end of that loop turn:
it closes its own server, whose socket is its own duplicate of the shared one, so the others keep
listening and new connections wait in the kernel's queue for them. It listens again, from a
duplicate it kept, once it is back among the least loaded: when one of its connections closes,
or at its polls while it does not listen (every 2 ms, backing off to 20 ms).

Nothing waits long on a worker that does not accept. A worker that does not listen also reads,
at each poll, the length of the listening socket's queue (``TCP_INFO``): connections waiting
there for 2 ms mean the worker that should take them is busy, stuck, dead or without a server,
and it listens again, whatever its count. Slots are claimed with a ``flock`` each, which the
kernel lets go of when a worker dies: the polls also check the lock of the least loaded worker
and leave it out at once if it died; a replacement takes a dead worker's slot. And a worker
counts as live only while its heartbeat (every 0.1 s) is under 0.5 s old, so one whose loop is
stuck is left out after half a second; one that fails to listen again says it is not live.

The price is a stop and a start of listening for each new connection that puts its worker above
the others: about 0.1 ms, which a client opening one connection after another on one thread
notices (2,700 connections a second against 4,200); ``server.balance_connections = false``
leaves connections to the kernel's accept race.

``supervisor.run_workers`` runs uvicorn's own supervisor with ``BalancedServer`` in each worker
instead of ``uvicorn.Server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.supervisors import multiprocess

from gateway.host_files import WORKERS_ENV, claim, held_exclusively

log = logging.getLogger(__name__)

TABLE = "connections"  # the table's file in the workers' folder; slot i is locked by TABLE-i.lock
SLOT = struct.Struct("<qd")  # connections held; heartbeat (time.monotonic(), 0 when not live)
HEARTBEAT_S = 0.1
STALE_S = 0.5  # a slot whose heartbeat is older is left out
POLL_S = (0.002, 0.02)  # while not listening: the first poll, and the longest gap
STALL_S = 0.002  # connections waiting in the kernel's queue this long: whoever should take them does not
STOPPING = "stopping"  # made in the workers' folder when the gateway is told to stop (``mark_stopping``)


class ConnectionTable:
    """The workers' connection counts, in a file mapped in memory; this worker owns one slot."""

    def __init__(self, folder: Path, slots: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._folder = folder
        self._all = struct.Struct("<" + "qd" * slots)
        size = self._all.size
        fd = os.open(folder / TABLE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:  # two workers may both grow it: to the same size
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._lock = -1
        for i in range(slots):
            try:
                self._lock = claim(folder / f"{TABLE}-{i}.lock")
            except OSError:
                continue
            self.index = i
            break
        else:
            self._map.close()
            raise OSError(f"all {slots} slots of the connections table are taken")
        self._offset = self.index * SLOT.size
        self.write(0, live=False)

    def write(self, count: int, live: bool = True) -> None:
        if self._lock < 0:  # closed: the server is shutting down, its connections closing
            return
        SLOT.pack_into(self._map, self._offset, count, self._clock() if live else 0.0)

    def others(self, alive: bool = False) -> list[int]:
        """The connection counts of the other live workers. With ``alive``, a slot of the least
        count also has its lock checked, to leave out at once a worker that died."""
        if self._lock < 0:
            return []
        values = self._all.unpack_from(self._map)
        oldest = self._clock() - STALE_S
        me = 2 * self.index
        live = {i // 2: values[i] for i in range(0, len(values), 2) if i != me and values[i + 1] > oldest}
        while alive and live:
            least = min(live, key=live.__getitem__)
            if held_exclusively(self._folder / f"{TABLE}-{least}.lock"):
                break
            del live[least]  # its worker died (the kernel let go of its lock)
        return list(live.values())

    def close(self) -> None:
        if self._lock >= 0:
            self.write(0, live=False)
            self._map.close()
            os.close(self._lock)
            self._lock = -1


class Balancer:
    """One worker's side: counts its connections, and stops and starts its listening.

    ``stop_listening()`` closes the worker's servers; ``listen()`` opens them again;
    ``held()`` is the server's own count of open connections, which corrects the running count
    at each heartbeat (say a protocol made for a connection that then never opened). A
    connection is counted from its accept, and the server counts it only once it opens, a loop
    turn later, when a heartbeat may come in between: so the accepted but not yet opened are
    counted too, and those still not open a heartbeat later are let go."""

    def __init__(
        self,
        table: ConnectionTable,
        stop_listening: Callable[[], None],
        listen: Callable[[], Awaitable[None]],
        held: Callable[[], int],
        waiting: Callable[[], int] = lambda: 0,
    ) -> None:
        self._table = table
        self._stop_listening = stop_listening
        self._listen = listen
        self._held = held
        self._waiting = waiting
        self._waiting_since: float | None = None
        self.count = 0
        self._unopened = [0, 0]  # accepted, not yet opened: before the last heartbeat, since
        self.listening = True
        self._live = True
        self._pausing = False
        self._resuming: asyncio.Task[None] | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._poll_s = POLL_S[0]
        self._heartbeat: asyncio.TimerHandle | None = None
        self._stopped = False

    def start(self) -> None:
        self._table.write(self.count)
        self._beat()

    # -- the protocol's hooks ------------------------------------------------------------------

    def accepted(self) -> None:
        """A connection was accepted (called as its protocol is made, inside libuv's accept loop,
        where the server cannot be closed: the pause waits for the end of the loop turn)."""
        self.count += 1
        self._unopened[1] += 1
        self._table.write(self.count, self._live)
        if self.listening and not self._pausing and self._above():
            self._pausing = True
            asyncio.get_running_loop().call_soon(self._pause)

    def opened(self) -> None:
        """A connection accepted opened (the server counts it from now on)."""
        before, since = self._unopened
        self._unopened = [before - 1, since] if before else [0, max(0, since - 1)]

    def lost(self) -> None:
        self.count = max(0, self.count - 1)
        self._table.write(self.count, self._live)
        if not self.listening:
            self._check()

    # -- listening -----------------------------------------------------------------------------

    def _above(self, alive: bool = False) -> bool:
        """Whether this worker holds more than the least loaded other."""
        others = self._table.others(alive)
        return bool(others) and self.count > min(others)

    def _pause(self) -> None:
        self._pausing = False
        if self._stopped or not self.listening or not self._above():
            return
        self._stop_listening()
        self.listening = False
        self._poll_s = POLL_S[0]
        self._schedule_poll()

    def _schedule_poll(self) -> None:
        if self._poll is None and not self._stopped:
            self._poll = asyncio.get_running_loop().call_later(self._poll_s, self._polled)

    def _polled(self) -> None:
        self._poll = None
        self._poll_s = min(self._poll_s * 2, POLL_S[1])
        self._check()

    def _check(self) -> None:
        """Not listening: listen again if back among the least loaded, or if connections have
        waited in the kernel's queue for ``STALL_S`` (the worker that should take them is busy,
        or its server failed); else poll again."""
        if self._stopped or self.listening or self._resuming is not None:
            return
        now = time.monotonic()
        if not self._waiting():
            self._waiting_since = None
        elif self._waiting_since is None:
            self._waiting_since = now
        stalled = self._waiting_since is not None and now - self._waiting_since >= STALL_S
        if self._live and not stalled and self._above(alive=True):
            if self._waiting_since is not None:
                self._poll_s = POLL_S[0]  # see soon whether they are taken
            self._schedule_poll()
            return
        self._waiting_since = None
        self._resuming = asyncio.get_running_loop().create_task(self._resume())

    async def _resume(self) -> None:
        try:
            await self._listen()
        except Exception:
            # Say this worker is not live, so that nobody waits for it to accept; try again.
            log.exception("this worker could not listen again; it tries again shortly")
            self._live = False
            self._table.write(self.count, live=False)
            self._poll_s = POLL_S[1]
            self._schedule_poll()
        else:
            self.listening = True
            self._live = True
            self._table.write(self.count)
        finally:
            self._resuming = None

    def _beat(self) -> None:
        if self._stopped:
            return
        try:
            self._unopened = [self._unopened[1], 0]  # those from before the last one never opened
            self.count = self._held() + self._unopened[0]
            self._table.write(self.count, self._live)
            if self.listening and not self._pausing and self._above():
                self._pause()
        finally:
            self._heartbeat = asyncio.get_running_loop().call_later(HEARTBEAT_S, self._beat)

    async def stop(self) -> None:
        """Stop for good (the server shuts down): no more listening again; the slot says not live."""
        self._stopped = True
        for handle in (self._poll, self._heartbeat):
            if handle is not None:
                handle.cancel()
        if self._resuming is not None:
            await asyncio.gather(self._resuming, return_exceptions=True)
        self._table.close()


def counting(protocol_class: type, balancer: Balancer) -> type:
    """``protocol_class`` telling ``balancer`` of each connection it opens and closes."""

    class Counted(protocol_class):  # type: ignore[misc, valid-type]
        __slots__ = ()

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            balancer.accepted()

        def connection_made(self, transport: Any) -> None:
            balancer.opened()
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                balancer.lost()

    Counted.__name__ = Counted.__qualname__ = f"Counted{protocol_class.__name__}"
    return Counted


# struct tcp_info (linux/tcp.h): eight one-byte fields, then __u32 rto, ato, snd_mss, rcv_mss, unacked.
TCP_INFO = getattr(socket, "TCP_INFO", 11)
TCP_INFO_UNACKED = 24
TCP_INFO_BYTES = 28


def still_listening(sock: socket.socket) -> bool:
    """Whether the shared socket listens still: the supervisor stops it when told to stop
    (``supervisor.py``), and listening again on it (``create_server`` calls ``listen``) would
    undo that."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:  # no such reading: as before
        return True


def stop_sockets(sockets: list[socket.socket]) -> None:
    """Refuse new connections on the listening ``sockets`` in every process sharing them
    (``shutdown``: closing one process's descriptor would leave the others listening); those
    already accepted are untouched."""
    for sock in sockets:
        with contextlib.suppress(OSError):  # not listening (any more)
            sock.shutdown(socket.SHUT_RDWR)


def stopped_again(folder: str, sockets: list[socket.socket]) -> bool:
    """For a worker that just listened on the shared ``sockets``: if the gateway was told to
    stop meanwhile (``mark_stopping``), that listening undid the stop; stop them again, and
    say so."""
    if not folder or not stopping(folder):
        return False
    stop_sockets(sockets)
    return True


def mark_stopping(folder: str | Path) -> None:
    """Tell the balanced workers sharing ``folder`` that the gateway is stopping, before the
    supervisor stops the shared socket: a worker that was between its check of the socket and
    its ``listen`` when the socket stopped sees the mark after listening, and stops the socket
    again. Run in a signal handler: nothing logged; without the mark, only that race remains."""
    try:
        Path(folder, STOPPING).touch()
    except OSError:
        pass


def stopping(folder: str | Path) -> bool:
    """Whether the supervisor marked ``folder`` as stopping (``mark_stopping``)."""
    return Path(folder, STOPPING).exists()


class BalancedServer(uvicorn.Server):
    """A uvicorn worker that listens only while it is among the least loaded (module docstring).
    Without the workers' folder, or without a slot in the table, it is uvicorn's server."""

    balancer: Balancer | None = None
    _spares: list[socket.socket]
    _folder = ""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        folder = os.environ.get(WORKERS_ENV)
        self._spares = []
        self._folder = folder or ""
        if sockets and folder and self.config.workers > 1:
            try:
                # Twice the workers: a replacement finds a free slot while a dead worker's lingers.
                table = ConnectionTable(Path(folder), 2 * self.config.workers)
            except OSError as exc:
                log.warning("connections not balanced over the workers: %s", exc)
            else:
                self._spares = [sock.dup() for sock in sockets]
                self.balancer = Balancer(
                    table, self._stop_listening, self._listen, lambda: len(self.server_state.connections), self._waiting
                )
                self.config.http_protocol_class = counting(self.config.http_protocol_class, self.balancer)
        await super().startup(sockets)
        if sockets and stopped_again(self._folder, sockets):
            # Told to stop while starting (the gateway's start, a replacement, a restart): the
            # startup listened on the stopped socket.
            self._stop_listening()
            self.servers = []
        if self.balancer is not None and self.started:
            self.balancer.start()

    def _stop_listening(self) -> None:
        for server in self.servers:
            server.close()  # closes this worker's duplicate of the socket; the others listen on

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        servers = []
        try:
            for spare in self._spares:
                if not still_listening(spare):
                    continue  # the supervisor stopped it: the gateway is stopping
                sock = spare.dup()
                servers.append(await loop.create_server(protocol, sock=sock, ssl=config.ssl, backlog=config.backlog))
        except BaseException:
            for server in servers:
                server.close()
            raise
        if servers and stopped_again(self._folder, self._spares):
            # Told to stop between the check above and the ``listen``.
            for server in servers:
                server.close()
            servers = []
        self.servers = servers

    def _waiting(self) -> int:
        """Connections waiting in the kernel's queue of the listening socket (Linux reports the
        queue's length as a listening socket's ``tcpi_unacked``)."""
        waiting = 0
        for spare in self._spares:
            try:
                info = spare.getsockopt(socket.IPPROTO_TCP, TCP_INFO, TCP_INFO_BYTES)
            except OSError:  # not TCP, or not Linux: no such reading
                continue
            if len(info) >= TCP_INFO_BYTES:
                waiting += struct.unpack_from("<I", info, TCP_INFO_UNACKED)[0]
        return waiting

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.balancer is not None:
            await self.balancer.stop()  # before the servers close: none opens again
        try:
            await super().shutdown(sockets)
        finally:
            for spare in self._spares:
                spare.close()
            self._spares = []


class BalancedProcess(multiprocess.Process):
    """uvicorn's worker process, running a ``BalancedServer``."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = BalancedServer(config=self.config)
        return self._server
