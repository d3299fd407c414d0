"""Host-wide batching between workers (``gateway.host_batch``), two workers in one event loop
over real Unix sockets, on both event loops (conftest.py): the owner's answers and errors reach
the requesting worker, and every way the owner can fail leaves the request to the requesting
worker's own batcher."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest

from gateway import host_batch
from gateway.batcher import BatchResult
from gateway.errors import GatewayTimeout, NotFound, Unavailable, UpstreamError
from gateway.host_batch import HostBatching, owner_of
from gateway.tensors import Tensor

A, B = 1001, 1002


def model_owned_by(pid: int, pids: list[int]) -> str:
    return next(f"m{i}" for i in range(1000) if owner_of(f"m{i}", "1", pids) == pid)


def rows(n: int, start: float = 0.0) -> list[Tensor]:
    return [Tensor("x", "FP32", np.arange(start, start + 3 * n, dtype=np.float32).reshape(n, 3))]


class Owner:
    """What the owner's pipeline does with a request: here, doubles it (or what ``behaviour`` says)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[Tensor], float | None]] = []
        self.behaviour: Callable[[], BaseException | None] = lambda: None
        self.release = asyncio.Event()
        self.release.set()
        self.cancelled = 0

    async def serve(self, model: str, version: str, inputs: list[Tensor], deadline: float | None) -> BatchResult:
        self.calls.append((model, version, inputs, deadline))
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        error = self.behaviour()
        if error is not None:
            raise error
        return BatchResult("7", [Tensor("y", "FP32", inputs[0].data * 2)], {"note": "ok"})


class Pair:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.owner = Owner()
        self.a = HostBatching(folder, Owner().serve, wait_s=5.0, pid=A)
        self.b = HostBatching(folder, self.owner.serve, wait_s=5.0, pid=B)
        self.model = model_owned_by(B, [A, B])


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    p = Pair(tmp_path)
    await p.a.start()
    await p.b.start()
    yield p
    await p.a.close()
    await p.b.close()


def test_the_owner_is_one_of_the_workers_and_stays_when_another_goes() -> None:
    pids = [11, 22, 33, 44]
    owners = {owner_of(f"model{i}", "1", pids) for i in range(200)}
    assert owners == set(pids)  # versions spread over every worker
    for i in range(50):
        owner = owner_of(f"model{i}", "1", pids)
        other = next(p for p in pids if p != owner)
        assert owner_of(f"model{i}", "1", [p for p in pids if p != other]) == owner
    assert owner_of("m", "1", []) is None


async def test_a_request_is_answered_by_its_versions_owner(pair: Pair) -> None:
    inputs = rows(2)
    result = await pair.a.submit(pair.model, "1", inputs, 123.5)
    assert result is not None and result.version == "7" and result.parameters == {"note": "ok"}
    np.testing.assert_array_equal(result.outputs[0].data, inputs[0].data * 2)
    (model, version, sent, deadline), = pair.owner.calls
    assert (model, version, deadline) == (pair.model, "1", 123.5)
    np.testing.assert_array_equal(sent[0].data, inputs[0].data)
    assert (pair.a.forwarded, pair.b.served, pair.a.kept) == (1, 1, 0)


async def test_the_owner_batches_its_own_requests_itself(pair: Pair) -> None:
    assert await pair.b.submit(pair.model, "1", rows(1), None) is None
    assert pair.owner.calls == [] and pair.b.forwarded == 0


async def test_many_requests_at_once_each_get_their_own_answer(pair: Pair) -> None:
    results = await asyncio.gather(*(pair.a.submit(pair.model, "1", rows(1, 10.0 * i), None) for i in range(50)))
    for i, result in enumerate(results):
        assert result is not None
        np.testing.assert_array_equal(result.outputs[0].data, rows(1, 10.0 * i)[0].data * 2)


@pytest.mark.parametrize(
    "error",
    [UpstreamError("input 'x' has the wrong shape", 400), Unavailable("queue full", 503), GatewayTimeout("deadline passed", 504)],
)
async def test_the_owners_error_is_the_requests_error(pair: Pair, error: Exception) -> None:
    pair.owner.behaviour = lambda: error
    with pytest.raises(type(error)) as caught:
        await pair.a.submit(pair.model, "1", rows(1), None)
    assert (caught.value.status, caught.value.message) == (error.status, error.message)  # type: ignore[attr-defined]


async def test_a_version_the_owner_does_not_know_is_left_to_its_worker(pair: Pair) -> None:
    pair.owner.behaviour = lambda: NotFound("unknown model 'm'", 404)  # its view of the fleet behind
    assert await pair.a.submit(pair.model, "1", rows(1), None) is None
    assert pair.a.kept == 1


async def test_a_request_the_owner_declines_is_counted_by_its_worker_only(pair: Pair) -> None:
    pair.owner.behaviour = lambda: NotFound("unknown model 'm'", 404)
    assert await pair.a.submit(pair.model, "1", rows(1), None) is None
    assert (pair.a.forwarded, pair.b.served, pair.a.kept) == (1, 0, 1)  # kept, never served too
    pair.owner.behaviour = lambda: UpstreamError("input 'x' has the wrong shape", 400)
    with pytest.raises(UpstreamError):
        await pair.a.submit(pair.model, "1", rows(1), None)
    assert pair.b.served == 1  # its error is its answer


async def test_a_bug_in_the_owner_is_a_500_not_a_hang(pair: Pair) -> None:
    pair.owner.behaviour = lambda: RuntimeError("boom")
    with pytest.raises(UpstreamError) as caught:
        await pair.a.submit(pair.model, "1", rows(1), None)
    assert caught.value.status == 500 and "boom" in caught.value.message


async def test_an_owner_that_is_gone_leaves_the_request_to_its_worker(pair: Pair) -> None:
    assert await pair.a.submit(pair.model, "1", rows(1), None) is not None
    await pair.b.close()
    await asyncio.sleep(0.01)  # the connection's end reaches the other worker
    assert await pair.a.submit(pair.model, "1", rows(1), None) is None
    assert pair.a.kept == 1


async def test_a_socket_left_by_a_killed_worker_is_removed(tmp_path: Path) -> None:
    dead = tmp_path / host_batch.FOLDER / f"{B}.sock"
    dead.parent.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))  # bound, never listening: what a killed worker leaves
    s.close()
    a = HostBatching(tmp_path, Owner().serve, wait_s=5.0, pid=A)
    await a.start()
    try:
        model = model_owned_by(B, [A, B])
        assert await a.submit(model, "1", rows(1), None) is None
        assert not dead.exists() and a.kept == 1
        assert a.owner(model, "1") == A  # batched here from now on
    finally:
        await a.close()


async def test_a_worker_that_cannot_listen_says_so(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)  # beyond a Unix socket path's 107 bytes
    deep.mkdir()
    a = HostBatching(deep, Owner().serve, wait_s=5.0, pid=A)
    assert await a.start() is False
    await a.close()


async def test_an_owner_closing_declines_new_requests(pair: Pair) -> None:
    assert await pair.a.submit(pair.model, "1", rows(1), None) is not None  # connected
    pair.b.begin_close()
    assert await pair.a.submit(pair.model, "1", rows(1), None) is None
    assert len(pair.owner.calls) == 1 and pair.a.kept == 1


async def test_a_request_the_closing_owner_could_not_batch_is_left_to_its_worker(pair: Pair) -> None:
    pair.owner.release.clear()
    pending = asyncio.ensure_future(pair.a.submit(pair.model, "1", rows(1), None))
    while not pair.owner.calls:
        await asyncio.sleep(0.001)
    pair.b.begin_close()
    pair.owner.behaviour = lambda: Unavailable("the gateway is shutting down")  # its batcher's close
    pair.owner.release.set()
    assert await pending is None
    assert (pair.b.served, pair.a.kept) == (0, 1)


async def test_a_connection_lost_mid_request_leaves_the_request_to_its_worker(pair: Pair) -> None:
    pair.owner.release.clear()
    pending = asyncio.ensure_future(pair.a.submit(pair.model, "1", rows(1), None))
    while not pair.owner.calls:
        await asyncio.sleep(0.001)
    await pair.b.close()
    assert await asyncio.wait_for(pending, 5) is None
    assert pair.owner.cancelled == 1


async def test_a_caller_that_stops_waiting_cancels_the_owners_work(pair: Pair) -> None:
    pair.owner.release.clear()
    pending = asyncio.ensure_future(pair.a.submit(pair.model, "1", rows(1), None))
    while not pair.owner.calls:
        await asyncio.sleep(0.001)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    for _ in range(100):
        if pair.owner.cancelled:
            break
        await asyncio.sleep(0.001)
    assert pair.owner.cancelled == 1


async def test_a_requesting_worker_that_goes_has_its_queued_requests_dropped_by_the_owner(pair: Pair) -> None:
    pair.owner.release.clear()
    pending = asyncio.ensure_future(pair.a.submit(pair.model, "1", rows(2), None))
    while len(pair.owner.calls) < 1:
        await asyncio.sleep(0.001)
    await pair.a.close()  # the requesting worker stops: its connection to the owner closes
    for _ in range(200):
        if pair.owner.cancelled:
            break
        await asyncio.sleep(0.001)
    assert pair.owner.cancelled == 1  # nobody would read the answer
    pending.cancel()


async def test_no_wait_for_the_owner_is_unbounded(tmp_path: Path) -> None:
    owner = Owner()
    owner.release.clear()  # never answers
    a = HostBatching(tmp_path, Owner().serve, wait_s=0.05, pid=A)
    b = HostBatching(tmp_path, owner.serve, wait_s=0.05, pid=B)
    await a.start()
    await b.start()
    try:
        with pytest.raises(GatewayTimeout, match="did not answer within"):
            await a.submit(model_owned_by(B, [A, B]), "1", rows(1), None)
        for _ in range(100):
            if owner.cancelled:
                break
            await asyncio.sleep(0.001)
        assert owner.cancelled == 1  # and the owner stops working on it
    finally:
        await a.close()
        await b.close()


async def test_a_bad_frame_closes_the_connection_and_the_owner_keeps_serving(pair: Pair) -> None:
    reader, writer = await asyncio.open_unix_connection(str(pair.b.path))
    writer.write((5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1")  # 0xc1: never valid msgpack
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the owner
    writer.close()
    result = await pair.a.submit(pair.model, "1", rows(1), None)
    assert result is not None
