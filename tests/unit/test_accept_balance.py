"""Unit tests of the workers' connection balancing (gateway/accept_balance.py): the table of
counts in a folder, and one worker's balancer with its listening stood in for."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn
from uvicorn.supervisors import multiprocess

from gateway import accept_balance, supervisor
from gateway.accept_balance import STALE_S, STALL_S, Balancer, ConnectionTable, counting


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tables(tmp_path: Path, clock: Clock) -> Iterator[Callable[[], ConnectionTable]]:
    made: list[ConnectionTable] = []

    def make() -> ConnectionTable:
        made.append(ConnectionTable(tmp_path, 4, clock))
        return made[-1]

    yield make
    for table in made:
        table.close()


# --- the table ---------------------------------------------------------------------------------


def test_each_worker_takes_its_own_slot_and_sees_the_others_counts(tables: Callable[[], ConnectionTable]) -> None:
    a, b, c = tables(), tables(), tables()
    assert len({a.index, b.index, c.index}) == 3
    a.write(5)
    b.write(2)
    assert sorted(c.others()) == [2, 5]
    assert a.others() == [2]  # c has not said it is live yet


def test_a_slot_whose_heartbeat_is_old_or_that_was_closed_is_left_out(tables: Callable[[], ConnectionTable], clock: Clock) -> None:
    a, b, c = tables(), tables(), tables()
    b.write(1)
    c.write(7)
    assert sorted(a.others()) == [1, 7]
    clock.now += STALE_S / 2
    b.write(1)  # b's heartbeat goes on; c's stops
    clock.now += STALE_S * 0.75
    assert a.others() == [1]
    b.close()
    assert a.others() == []


def test_a_closed_slot_is_taken_again(tables: Callable[[], ConnectionTable]) -> None:
    a = tables()
    index = a.index
    a.close()
    assert tables().index == index


def test_every_slot_taken_is_an_error(tables: Callable[[], ConnectionTable]) -> None:
    for _ in range(4):
        tables()
    with pytest.raises(OSError, match="all 4 slots"):
        tables()


def _die_holding_a_slot(folder: str) -> None:
    table = ConnectionTable(Path(folder), 4)
    table.write(0)
    os._exit(0)  # no close: the slot still says live; only its lock goes with the process


def test_the_least_loaded_slot_of_a_worker_that_died_is_left_out_when_asked(tmp_path: Path) -> None:
    table = ConnectionTable(tmp_path, 4)
    try:
        child = multiprocessing.get_context("fork").Process(target=_die_holding_a_slot, args=(str(tmp_path),))
        child.start()
        child.join(10)
        assert child.exitcode == 0
        assert table.others() == [0]  # its heartbeat is fresh
        assert table.others(alive=True) == []
    finally:
        table.close()


# --- one worker's balancer -----------------------------------------------------------------------


class Listening:
    """Stands in for a worker's servers: records stops and starts."""

    def __init__(self) -> None:
        self.stops = 0
        self.starts = 0
        self.fail = False

    def stop(self) -> None:
        self.stops += 1

    async def listen(self) -> None:
        if self.fail:
            raise OSError("no more file descriptors")
        self.starts += 1


async def turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


class Worker:
    """A balancer as its server drives it, with the server's own count of open connections."""

    def __init__(self, folder: Path) -> None:
        self.listening = Listening()
        self.held = 0
        self.queue = 0  # connections waiting in the kernel's queue
        self.balancer = Balancer(
            ConnectionTable(folder, 4), self.listening.stop, self.listening.listen, lambda: self.held, lambda: self.queue
        )
        self.balancer.start()

    def connect(self, n: int = 1) -> None:
        for _ in range(n):
            self.balancer.accepted()
            self.balancer.opened()
            self.held += 1

    def close(self) -> None:
        self.held -= 1
        self.balancer.lost()


@pytest.fixture
async def worker(tmp_path: Path) -> tuple[Worker, ConnectionTable]:
    """A worker, and one other worker's slot (live, 1 connection)."""
    other = ConnectionTable(tmp_path, 4)
    other.write(1)
    w = Worker(tmp_path)
    yield w, other
    await w.balancer.stop()
    other.close()


async def test_a_worker_above_the_least_loaded_stops_listening_after_the_accepting_turn(worker) -> None:
    w, other = worker
    w.connect(2)  # 2 against 1
    assert w.listening.stops == 0  # not inside libuv's accept loop: at the end of the turn
    await turn()
    assert w.listening.stops == 1 and not w.balancer.listening


async def test_a_worker_level_with_the_least_loaded_keeps_listening(worker) -> None:
    w, other = worker
    other.write(3)
    w.connect(3)
    await turn()
    await asyncio.sleep(0.25)  # heartbeats too
    assert w.listening.stops == 0 and w.balancer.listening


async def test_a_connection_closing_puts_a_worker_back_to_listening(worker) -> None:
    w, other = worker
    w.connect(2)
    await turn()
    assert not w.balancer.listening
    w.close()
    await until(lambda: w.balancer.listening)
    assert w.listening.starts == 1 and w.balancer.count == 1


async def test_a_worker_listens_again_once_the_others_catch_up(worker) -> None:
    w, other = worker
    w.connect(3)
    await turn()
    assert not w.balancer.listening
    await asyncio.sleep(0.05)
    assert not w.balancer.listening  # polls, and stays off while it is above
    other.write(3)
    start = time.monotonic()
    await until(lambda: w.balancer.listening)
    assert time.monotonic() - start < STALE_S / 2  # at a poll, not for the other's heartbeat going stale
    assert w.listening.starts == 1


async def test_a_worker_listens_again_when_connections_wait_in_the_queue(worker) -> None:
    """The least loaded worker does not take them (busy, stuck, or its server failed)."""
    w, other = worker
    w.connect(3)
    await turn()
    assert not w.balancer.listening
    w.queue = 2
    start = time.monotonic()
    await until(lambda: w.balancer.listening)
    assert STALL_S <= time.monotonic() - start < STALE_S / 2
    assert other.others() == [3]


async def test_a_worker_listens_again_when_the_least_loaded_stops_its_heartbeat(worker, monkeypatch) -> None:
    w, other = worker
    w.connect(3)
    await turn()
    assert not w.balancer.listening
    # The other's heartbeat is as old as a stuck loop's.
    monkeypatch.setattr(accept_balance, "STALE_S", 0.05)
    await until(lambda: w.balancer.listening)


async def test_a_worker_that_cannot_listen_again_says_it_is_not_live_and_tries_again(worker) -> None:
    w, other = worker
    w.connect(3)
    await turn()
    w.listening.fail = True
    w.close()
    w.close()  # back to 1: it tries
    await until(lambda: other.others() == [])  # nobody waits for it to accept
    assert not w.balancer.listening
    w.listening.fail = False
    await until(lambda: w.balancer.listening)
    assert other.others() == [1]


async def test_the_heartbeat_takes_the_servers_own_count(tmp_path: Path) -> None:
    other = ConnectionTable(tmp_path, 4)
    other.write(0)
    held = [0]
    listening = Listening()
    balancer = Balancer(ConnectionTable(tmp_path, 4), listening.stop, listening.listen, lambda: held[0])
    try:
        balancer.start()
        balancer.accepted()  # a connection whose transport never opened: nothing holds it
        assert other.others() == [1]
        await until(lambda: other.others() == [0])
        assert balancer.count == 0
    finally:
        await balancer.stop()
        other.close()


async def test_a_connection_accepted_but_not_yet_opened_counts_across_a_heartbeat(tmp_path: Path) -> None:
    """The server counts a connection once it opens, a loop turn after its accept: a heartbeat
    in between must not take it for gone."""
    other = ConnectionTable(tmp_path, 4)
    held = [0]
    listening = Listening()
    balancer = Balancer(ConnectionTable(tmp_path, 4), listening.stop, listening.listen, lambda: held[0])
    try:
        balancer.start()
        balancer.accepted()
        balancer._beat()  # the heartbeat comes first
        assert balancer.count == 1 and other.others() == [1]
        balancer.opened()
        held[0] = 1
        balancer._beat()
        balancer._beat()
        assert balancer.count == 1
    finally:
        await balancer.stop()
        other.close()


async def test_a_stopped_balancer_never_listens_again_and_leaves_its_slot(worker) -> None:
    w, other = worker
    w.connect(3)
    await turn()
    await w.balancer.stop()
    other.write(5)
    await asyncio.sleep(0.05)
    assert w.listening.starts == 0
    assert other.others() == []
    w.close()  # its connections close while the server shuts down
    w.connect()
    assert other.others() == []


def test_a_counted_protocol_tells_of_each_connection_it_opens_and_closes() -> None:
    events: list[str] = []

    class Protocol:
        def __init__(self, config: object, server_state: object) -> None:
            self.config = config

        def connection_made(self, transport: object) -> None:
            events.append("made by the protocol")

        def connection_lost(self, exc: Exception | None) -> None:
            events.append("lost by the protocol")

    class Recorder:
        def accepted(self) -> None:
            events.append("accepted")

        def opened(self) -> None:
            events.append("opened")

        def lost(self) -> None:
            events.append("lost")

    counted = counting(Protocol, Recorder())  # type: ignore[arg-type]
    protocol = counted(config="c", server_state=None)
    assert protocol.config == "c" and isinstance(protocol, Protocol)
    protocol.connection_made(None)
    protocol.connection_lost(None)
    assert events == ["accepted", "opened", "made by the protocol", "lost by the protocol", "lost"]


# --- told to stop ------------------------------------------------------------------------------


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def shared_socket() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    """uvicorn's supervisor takes over the process's signals: given back after the test."""
    handlers = {sig: signal.getsignal(sig) for sig in multiprocess.SIGNALS}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_told_to_stop_the_supervisor_marks_the_workers_folder_and_the_socket_refuses_connections(
    shared_socket: socket.socket, tmp_path: Path, signal_handlers: None
) -> None:
    supervising = supervisor.Supervisor(uvicorn.Config(app, workers=2), [shared_socket], str(tmp_path))
    assert not accept_balance.stopping(tmp_path)
    supervising._stop(signal.SIGTERM, None)
    assert accept_balance.stopping(tmp_path)
    assert not accept_balance.still_listening(shared_socket)
    assert refused(shared_socket.getsockname()[1])


class Starting:
    """A worker process still starting when the gateway was told to stop: the end of its
    startup listens on the shared socket, while the supervisor waits for it to exit."""

    def __init__(self, sock: socket.socket, joins_to_exit: int) -> None:
        self.process = self
        self.exitcode: int | None = None
        self._sock = sock
        self._joins = 0
        self._joins_to_exit = joins_to_exit

    def join(self, timeout: float | None = None) -> None:
        self._joins += 1
        if self._joins == 2:
            self._sock.listen()
        if self._joins == self._joins_to_exit:
            self.exitcode = 0


def test_while_the_workers_finish_the_supervisor_stops_the_socket_again_if_one_listened(
    shared_socket: socket.socket, signal_handlers: None
) -> None:
    """Without balancing (no workers' folder, no mark): a worker whose startup ended after the
    stop listened again; the supervisor's wait for the workers stops the socket again."""
    supervising = supervisor.Supervisor(uvicorn.Config(app, workers=2), [shared_socket])
    supervising._stop(signal.SIGTERM, None)
    supervising.processes = [Starting(shared_socket, 4), Starting(shared_socket, 3)]  # type: ignore[list-item]
    supervising.join_all()
    assert not accept_balance.still_listening(shared_socket)
    assert refused(shared_socket.getsockname()[1])


async def test_a_worker_whose_startup_ends_after_the_stop_stops_the_socket_again(
    shared_socket: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(accept_balance.WORKERS_ENV, str(tmp_path))
    server = accept_balance.BalancedServer(uvicorn.Config(app, workers=2, lifespan="off"))
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)  # as uvicorn's serve sets it
    port = shared_socket.getsockname()[1]
    other = shared_socket.dup()  # another process's descriptor of the socket, say the supervisor's
    accept_balance.stop_sockets([shared_socket])
    accept_balance.mark_stopping(tmp_path)  # told to stop as it started
    await server.startup([shared_socket])
    try:
        assert server.servers == []
        assert not accept_balance.still_listening(other)
        assert refused(port)
    finally:
        await server.shutdown([shared_socket])
        other.close()


async def test_a_worker_listening_again_just_as_the_gateway_is_told_to_stop_stops_the_socket_again(
    shared_socket: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor stops the shared socket between a balanced worker's check that it still
    listens and its ``listen``, which would make it listen again: the worker sees the stop's mark
    and stops it again, so connections are refused rather than queued and reset at exit."""
    server = accept_balance.BalancedServer(uvicorn.Config(app, workers=2))
    server.config.load()
    server._spares = [shared_socket.dup()]
    server._folder = str(tmp_path)
    checked = accept_balance.still_listening

    def told_to_stop_just_after(sock: socket.socket) -> bool:
        listening = checked(sock)
        accept_balance.mark_stopping(tmp_path)
        accept_balance.stop_sockets([shared_socket])
        return listening

    monkeypatch.setattr(accept_balance, "still_listening", told_to_stop_just_after)
    try:
        await server._listen()
        assert server.servers == []
        assert not checked(shared_socket)
        assert refused(shared_socket.getsockname()[1])
    finally:
        server._spares[0].close()


async def app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("no request reaches it")


FAILING_APP = """
import contextlib

from starlette.applications import Starlette


@contextlib.asynccontextmanager
async def lifespan(app):
    raise RuntimeError("this app cannot start")
    yield


app = Starlette(lifespan=lifespan)
"""


def test_workers_that_fail_to_start_make_the_gateway_exit_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signal_handlers: None
) -> None:
    (tmp_path / "failing_app.py").write_text(FAILING_APP)
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned workers import it by name
    config = uvicorn.Config("failing_app:app", host="127.0.0.1", port=0, workers=2, log_level="critical", lifespan="on")
    assert supervisor.run_workers(config, "") == multiprocess.STARTUP_FAILURE
