"""The batcher: policy with a fake clock, and the worker loop driven by events (no sleeping)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.batcher import (
    HOLD_ROWS,
    RESEND_PAUSE_S,
    Batcher,
    BatchPolicy,
    BatchResult,
    NothingToSend,
    Pending,
    Prepare,
    select_batch,
    signature_of,
)
from gateway.errors import ClientGone, GatewayError, GatewayTimeout, ModelError, Unavailable, UpstreamError
from gateway.tensors import Tensor
from gateway.upstream.client import InstanceUnreachable, upstream_error

POLICY = BatchPolicy(max_rows=8, max_delay=0.002, max_inflight=1, max_queue_rows=64)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rows(n: int, start: float = 0.0, width: int = 3, dtype: str = "FP32") -> list[Tensor]:
    data = (np.arange(n * width, dtype=np.float32).reshape(n, width) + start).astype(
        np.float32 if dtype == "FP32" else np.float64
    )
    return [Tensor("x", dtype, data)]


def pending(n: int, t: float, width: int = 3) -> Pending:
    inputs = rows(n, width=width)
    return Pending(inputs, n, signature_of(inputs), None, t)  # type: ignore[arg-type]  # policy never touches it


# --- policy -------------------------------------------------------------------------------


def test_free_slot_sends_at_once_without_waiting_for_a_timer() -> None:
    queue = [pending(1, 100.0)]
    sel = select_batch(queue, inflight=0, now=100.0, policy=POLICY)
    assert sel.batch == queue


def test_busy_slots_gather_until_the_oldest_has_waited_max_delay() -> None:
    queue = [pending(1, 100.0), pending(2, 100.001)]
    sel = select_batch(queue, inflight=1, now=100.001, policy=POLICY)
    assert sel.batch == [] and sel.wake_at == pytest.approx(100.002)
    sel = select_batch(queue, inflight=1, now=100.0021, policy=POLICY)
    assert sel.batch == queue


def test_with_a_hold_a_free_slot_waits_for_company_until_the_oldest_has_waited_it() -> None:
    policy = BatchPolicy(max_rows=8, max_delay=0.002, max_inflight=1, max_queue_rows=64, hold=0.001)
    queue = [pending(1, 100.0), pending(2, 100.0005)]
    sel = select_batch(queue, inflight=0, now=100.0005, policy=policy)
    assert sel.batch == [] and sel.wake_at == pytest.approx(100.001)
    assert select_batch(queue, inflight=0, now=100.001, policy=policy).batch == queue
    full = [pending(4, 100.0), pending(4, 100.0)]
    assert select_batch(full, inflight=0, now=100.0, policy=policy).batch == full  # full: no wait


def test_a_hold_never_outlasts_max_delay_nor_a_deadline() -> None:
    longer = BatchPolicy(max_rows=8, max_delay=0.002, max_inflight=1, max_queue_rows=64, hold=0.004)
    queue = [pending(1, 100.0)]
    assert select_batch(queue, inflight=0, now=100.001, policy=longer).wake_at == pytest.approx(100.002)
    assert select_batch(queue, inflight=0, now=100.002, policy=longer).batch == queue  # as a busy slot would
    hurried = [pending(1, 100.0), pending(1, 100.0)]
    hurried[1].deadline = 100.0015  # would pass during the hold: the batch goes now
    assert select_batch(hurried, inflight=0, now=100.0, policy=longer).batch == hurried
    hurried[1].deadline = 100.5
    assert select_batch(hurried, inflight=0, now=100.0, policy=longer).batch == []


def test_a_hold_ends_once_the_batch_has_hold_rows() -> None:
    policy = BatchPolicy(max_rows=64, max_delay=0.004, max_inflight=1, max_queue_rows=256, hold=0.004)
    short = [pending(1, 100.0) for _ in range(HOLD_ROWS - 1)]
    assert select_batch(short, inflight=0, now=100.0, policy=policy).batch == []
    enough = [*short, pending(1, 100.0)]
    assert select_batch(enough, inflight=0, now=100.0, policy=policy).batch == enough


def test_without_company_a_free_slot_sends_at_once_whatever_the_hold() -> None:
    policy = BatchPolicy(max_rows=8, max_delay=0.002, max_inflight=1, max_queue_rows=64, hold=0.001)
    queue = [pending(1, 100.0)]
    assert select_batch(queue, inflight=0, now=100.0, policy=policy, hold_now=False).batch == queue
    assert select_batch(queue, inflight=0, now=100.0, policy=policy, hold_now=True).batch == []


async def batches_of(batcher: Batcher, up: FakeUpstream, clock: FakeClock, sizes: list[int], start: int = 0) -> None:
    """Send batches of ``sizes`` requests, one after another: each set submitted while the
    previous batch is in flight, so that the set goes as one batch once the slot frees (the
    clock moved past any hold)."""
    busy = asyncio.create_task(batcher.submit(rows(1, start=start)))
    await up.wait_batches(len(up.batches) + 1)
    for n, size in enumerate(sizes):
        waiting = [asyncio.create_task(batcher.submit(rows(1, start=start + 10 * n + k))) for k in range(size)]
        await settle()
        before = len(up.batches)
        up.release_all()
        await busy
        clock.now += 0.002
        await up.wait_batches(before + 1)
        busy = asyncio.gather(*waiting)  # type: ignore[assignment]
    up.release_all()
    await busy


async def test_a_lone_client_is_never_held() -> None:
    clock = FakeClock()
    up = FakeUpstream()
    batcher = Batcher("m", up, BatchPolicy(8, 0.002, 1, 64, hold=0.001), clock=clock)
    for n in range(5):  # one request at a time, each answered before the next: the clock never moves
        task = asyncio.create_task(batcher.submit(rows(1, start=n)))
        await asyncio.wait_for(up.wait_batches(n + 1), 1.0)  # held: times out, the clock being still
        up.release_all()
        await task
    assert len(up.batches) == 5 and not batcher.company
    await batcher.close(0)


async def test_a_hold_applies_only_while_the_hosts_cpus_are_busy_enough() -> None:
    clock = FakeClock()
    up = FakeUpstream()
    cpu: list[float | None] = [0.5]
    policy = BatchPolicy(8, 0.002, 1, 64, hold=0.001, hold_cpu_busy=0.8)
    batcher = Batcher("m", up, policy, clock=clock, cpu_busy=lambda: cpu[0])
    await batches_of(batcher, up, clock, [3, 3])  # concurrent clients: company
    assert batcher.company and not batcher.holding
    # Cores to spare: two requests reaching the idle batcher go at once, without waiting.
    sent = len(up.batches)
    tasks = [asyncio.create_task(batcher.submit(rows(1, start=n))) for n in range(2)]
    await settle()
    assert len(up.batches) == sent + 1  # the first went at once, the clock being still
    up.release_all()
    await up.wait_batches(sent + 2)  # the second, once the slot freed: no hold either
    up.release_all()
    await asyncio.gather(*tasks)
    await batches_of(batcher, up, clock, [3, 3])
    # Cores short (and, as where /proc/stat is unreadable, unknown): the same requests are held.
    for busy in (0.9, None):
        cpu[0] = busy
        assert batcher.company and batcher.holding
        sent = len(up.batches)
        tasks = [asyncio.create_task(batcher.submit(rows(1, start=n))) for n in range(2)]
        await settle()
        assert len(up.batches) == sent
        clock.now += 0.001
        await up.wait_batches(sent + 1)
        up.release_all()
        await asyncio.gather(*tasks)
        assert up.batches[-1].shape[0] == 2
    await batcher.close(0)


async def test_a_hold_gathers_requests_while_they_come_concurrently_and_stops_when_they_no_longer_do() -> None:
    clock = FakeClock()
    up = FakeUpstream()
    batcher = Batcher("m", up, BatchPolicy(8, 0.002, 1, 64, hold=0.001), clock=clock)
    await batches_of(batcher, up, clock, [3, 3])  # concurrent clients: batches of several requests
    assert batcher.company
    # Now two requests reach the idle batcher in one loop turn: held for company, one batch.
    sent = len(up.batches)
    tasks = [asyncio.create_task(batcher.submit(rows(n, start=10 * n))) for n in (1, 2)]
    await settle()
    assert len(up.batches) == sent  # idle, but holding: the fake clock has not moved
    clock.now += 0.001
    await up.wait_batches(sent + 1)  # the worker's timer looks again and finds the hold over
    up.release_all()
    results = await asyncio.gather(*tasks)
    assert up.batches[-1].shape[0] == 3
    for n, result in zip((1, 2), results):
        np.testing.assert_array_equal(result.outputs[0].data, rows(n, start=10 * n)[0].data * 2)
    # The clients no longer overlap: a few batches of one request, then nothing is held.
    for n in range(4):
        if not batcher.company:
            break
        task = asyncio.create_task(batcher.submit(rows(1, start=n)))
        await settle()
        clock.now += 0.001
        await up.wait_batches(len(up.batches) + 1)
        up.release_all()
        await task
    assert not batcher.company
    task = asyncio.create_task(batcher.submit(rows(1)))
    await settle()
    assert up.batches[-1].shape[0] == 1 and len(up.gates) == len(up.batches)  # sent at once, clock still
    up.release_all()
    await task
    await batcher.close(0)


async def test_the_time_each_request_waited_here_is_counted_the_hold_included() -> None:
    clock = FakeClock()
    up = FakeUpstream()
    batcher = Batcher("m", up, BatchPolicy(8, 0.002, 1, 64, hold=0.001), clock=clock)
    task = asyncio.create_task(batcher.submit(rows(1)))  # alone and idle: sent at once
    await up.wait_batches(1)
    up.release_all()
    await task
    assert (sum(batcher.waits[:-1]), batcher.waits[-1]) == (1, 0.0)
    await batches_of(batcher, up, clock, [3, 3])  # concurrent clients: a hold applies now
    counted, waited = sum(batcher.waits[:-1]), batcher.waits[-1]
    tasks = [asyncio.create_task(batcher.submit(rows(1, start=n))) for n in (1, 2)]
    await settle()
    clock.now += 0.0007
    tasks.append(asyncio.create_task(batcher.submit(rows(1, start=3))))  # joins the held batch late
    await settle()
    clock.now += 0.0004  # the hold is over (past it: a fake clock's sums are not exact)
    await up.wait_batches(len(up.batches) + 1)
    up.release_all()
    await asyncio.gather(*tasks)
    assert up.batches[-1].shape[0] == 3
    assert sum(batcher.waits[:-1]) == counted + 3
    assert batcher.waits[-1] - waited == pytest.approx(0.0011 + 0.0011 + 0.0004)  # as long as each was held
    await batcher.close(0)


def test_full_batch_is_sent_even_when_slots_are_busy() -> None:
    queue = [pending(4, 100.0), pending(4, 100.0), pending(1, 100.0)]
    sel = select_batch(queue, inflight=1, now=100.0, policy=POLICY)
    assert sel.batch == queue[:2]  # 8 rows: full; the third waits for the next batch


def test_batch_never_exceeds_max_rows_and_keeps_arrival_order() -> None:
    queue = [pending(3, 100.0), pending(3, 100.0), pending(3, 100.0)]
    sel = select_batch(queue, inflight=0, now=100.0, policy=POLICY)
    assert sel.batch == queue[:2]


def test_only_one_signature_per_batch_starting_with_the_oldest() -> None:
    a1, b1, a2 = pending(1, 100.0, width=3), pending(1, 100.0, width=5), pending(1, 100.0, width=3)
    sel = select_batch([a1, b1, a2], inflight=0, now=100.0, policy=POLICY)
    assert sel.batch == [a1, a2]
    sel = select_batch([b1], inflight=0, now=100.0, policy=POLICY)
    assert sel.batch == [b1]


def test_dtype_is_part_of_the_signature() -> None:
    assert signature_of(rows(1, dtype="FP32")) != signature_of(rows(1, dtype="FP64"))
    assert signature_of(rows(1)) == signature_of(rows(5))  # the batch dimension is not


# --- worker loop --------------------------------------------------------------------------


class FakeUpstream:
    """Each dispatched batch waits until the test releases it; outputs are inputs * 2."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.gates: list[asyncio.Event] = []
        self.fail_with: Exception | None = None
        self.arrived = asyncio.Event()

    async def __call__(self, prepare: Prepare, deadline: float | None) -> BatchResult:
        inputs = prepare()
        if inputs is None:
            raise NothingToSend()
        gate = asyncio.Event()
        self.batches.append(inputs[0].data.copy())
        self.gates.append(gate)
        self.arrived.set()
        await gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return BatchResult("1", [Tensor("y", "FP32", inputs[0].data * 2)])

    async def wait_batches(self, n: int) -> None:
        while len(self.batches) < n:
            self.arrived.clear()
            await self.arrived.wait()

    def release_all(self) -> None:
        for gate in self.gates:
            gate.set()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_requests_arriving_while_the_slot_is_busy_share_one_batch_and_get_their_own_rows() -> None:
    up = FakeUpstream()
    batcher = Batcher("m", up, POLICY, clock=FakeClock())
    first = asyncio.create_task(batcher.submit(rows(1, start=1000)))
    await up.wait_batches(1)  # sent at once: the slot was free
    later = [asyncio.create_task(batcher.submit(rows(n, start=100 * i))) for i, n in enumerate([1, 2, 3], 1)]
    await settle()
    assert len(up.batches) == 1  # slot busy, max_delay not reached on the fake clock: gathering
    up.release_all()
    await up.wait_batches(2)
    up.release_all()
    results = await asyncio.gather(first, *later)
    assert [b.shape[0] for b in up.batches] == [1, 6]
    for i, (n, res) in enumerate(zip([1, 2, 3], results[1:]), 1):
        np.testing.assert_array_equal(res.outputs[0].data, rows(n, start=100 * i)[0].data * 2)
    np.testing.assert_array_equal(results[0].outputs[0].data, rows(1, start=1000)[0].data * 2)
    await batcher.close(0)


async def test_requests_queued_behind_a_busy_slot_wake_the_worker_only_when_the_policy_may_change() -> None:
    up = FakeUpstream()
    batcher = Batcher("m", up, POLICY, clock=FakeClock())  # max_rows 8, one slot
    passes = 0
    pump = batcher._pump

    def counted() -> float | None:
        nonlocal passes
        passes += 1
        return pump()

    batcher._pump = counted  # type: ignore[method-assign]
    tasks = [asyncio.create_task(batcher.submit(rows(1, start=0)))]
    await up.wait_batches(1)  # the slot is now busy
    tasks.append(asyncio.create_task(batcher.submit(rows(1, start=1))))
    await settle()
    assert passes == 1  # a new head of the queue: the worker arms its max_delay timer
    tasks += [asyncio.create_task(batcher.submit(rows(2, start=10 * i))) for i in (2, 3, 4)]
    await settle()
    assert (passes, batcher.queued_rows, len(up.batches)) == (1, 7, 1)  # nothing to decide: not woken
    tasks.append(asyncio.create_task(batcher.submit(rows(1, start=50))))
    await up.wait_batches(2)  # 8 rows: a full batch goes at once, slot busy or not
    assert passes == 2 and up.batches[1].shape[0] == 8
    up.release_all()
    results = await asyncio.gather(*tasks)
    for res, (n, start) in zip(results, [(1, 0), (1, 1), (2, 20), (2, 30), (2, 40), (1, 50)]):
        np.testing.assert_array_equal(res.outputs[0].data, rows(n, start=start)[0].data * 2)
    await batcher.close(0)


async def test_a_new_policy_is_acted_on_at_once_even_at_the_hard_cap() -> None:
    """The fleet grew: more batches may be in flight. Requests queued at the old cap go out
    without waiting for a batch to come back (no request would wake the worker for them)."""
    up = FakeUpstream()
    batcher = Batcher("m", up, BatchPolicy(8, 0.0, 1, 64), clock=FakeClock())  # no delay: overflow at once
    tasks = [asyncio.create_task(batcher.submit(rows(1, start=i))) for i in range(2)]
    await up.wait_batches(2)  # one in its slot, one overflowing: the hard cap (2 x 1)
    tasks.append(asyncio.create_task(batcher.submit(rows(1, start=2))))
    await settle()
    assert len(up.batches) == 2 and batcher.queued_rows == 1  # waits at the cap
    batcher.policy = BatchPolicy(8, 0.0, 2, 64)  # two instances now
    await asyncio.wait_for(up.wait_batches(3), 2.0)
    up.release_all()
    results = await asyncio.gather(*tasks)
    for i, res in enumerate(results):
        np.testing.assert_array_equal(res.outputs[0].data, rows(1, start=i)[0].data * 2)
    await batcher.close(0)


async def test_a_failed_batch_fails_every_request_in_it_and_the_loop_keeps_serving() -> None:
    up = FakeUpstream()
    batcher = Batcher("m", up, BatchPolicy(8, 0.002, 1, 64), clock=FakeClock())
    blocker = asyncio.create_task(batcher.submit(rows(1)))
    await up.wait_batches(1)
    waiters = [asyncio.create_task(batcher.submit(rows(1))) for _ in range(3)]
    await settle()
    up.fail_with = UpstreamError("boom", status=502)
    up.release_all()
    await up.wait_batches(2)
    up.release_all()
    for task in [blocker, *waiters]:
        with pytest.raises(UpstreamError, match="boom"):
            await task
    up.fail_with = None
    ok = asyncio.create_task(batcher.submit(rows(2)))
    await up.wait_batches(3)
    up.release_all()
    assert (await ok).outputs[0].data.shape == (2, 3)
    await batcher.close(0)


async def test_a_cancelled_caller_is_dropped_without_disturbing_the_others() -> None:
    up = FakeUpstream()
    batcher = Batcher("m", up, POLICY, clock=FakeClock())
    blocker = asyncio.create_task(batcher.submit(rows(1)))
    await up.wait_batches(1)
    gone = asyncio.create_task(batcher.submit(rows(1, start=5)))
    stays = asyncio.create_task(batcher.submit(rows(1, start=7)))
    await settle()
    gone.cancel()
    await settle()
    up.release_all()
    await up.wait_batches(2)
    up.release_all()
    await blocker
    np.testing.assert_array_equal((await stays).outputs[0].data, rows(1, start=7)[0].data * 2)
    assert up.batches[1].shape[0] == 1  # the cancelled request was never sent
    await batcher.close(0)


async def test_a_caller_cancelled_while_queued_stops_counting_against_max_queue_rows_at_once() -> None:
    """At the hard cap only a batch coming back makes the worker look at the queue again: the
    rows of callers that stopped waiting meanwhile must neither shed new requests nor show."""
    up = FakeUpstream()
    batcher = Batcher("m", up, BatchPolicy(8, 0.0, 1, 8), clock=FakeClock())  # no delay: overflow at once
    busy = [asyncio.create_task(batcher.submit(rows(1, start=i))) for i in range(2)]
    await up.wait_batches(2)  # the hard cap (2 x 1): the queue grows
    queued = [asyncio.create_task(batcher.submit(rows(4, start=10 * i))) for i in range(2)]
    await settle()
    assert batcher.queued_rows == 8
    for task in queued:
        task.cancel()  # as their deadlines would
    await settle()
    assert batcher.queued_rows == 0
    later = asyncio.create_task(batcher.submit(rows(4, start=50)))  # taken, not shed
    await settle()
    assert batcher.queued_rows == 4
    up.release_all()
    await up.wait_batches(3)
    up.release_all()
    await asyncio.gather(*busy)
    np.testing.assert_array_equal((await later).outputs[0].data, rows(4, start=50)[0].data * 2)
    assert [b.shape[0] for b in up.batches] == [1, 1, 4]  # the cancelled requests were never sent
    assert batcher.queued_rows == 0  # nor their rows subtracted twice when dropped
    await batcher.close(0)


async def test_a_request_whose_client_disconnected_is_dropped_unsent() -> None:
    up = FakeUpstream()
    batcher = Batcher("m", up, POLICY, clock=FakeClock())
    blocker = asyncio.create_task(batcher.submit(rows(1)))
    await up.wait_batches(1)
    disconnected = False
    left = asyncio.create_task(batcher.submit(rows(1, start=5), gone=lambda: disconnected))
    stays = asyncio.create_task(batcher.submit(rows(1, start=7), gone=lambda: False))
    await settle()
    disconnected = True
    up.release_all()
    with pytest.raises(ClientGone):
        await left
    await up.wait_batches(2)
    up.release_all()
    await blocker
    np.testing.assert_array_equal((await stays).outputs[0].data, rows(1, start=7)[0].data * 2)
    assert up.batches[1].shape[0] == 1 and batcher.queued_rows == 0  # never sent
    await batcher.close(0)


async def test_expired_requests_get_504_and_are_never_sent() -> None:
    clock = FakeClock()
    up = FakeUpstream()
    batcher = Batcher("m", up, BatchPolicy(8, 10.0, 1, 64), clock=clock)
    blocker = asyncio.create_task(batcher.submit(rows(1)))
    await up.wait_batches(1)
    doomed = asyncio.create_task(batcher.submit(rows(1), deadline=clock.now + 0.5))
    await settle()
    clock.now += 1.0
    up.release_all()  # the slot frees after the deadline passed
    with pytest.raises(GatewayTimeout):
        await doomed
    await blocker
    assert len(up.batches) == 1
    await batcher.close(0)


async def test_queue_bound_sheds_load_with_503() -> None:
    up = FakeUpstream()
    batcher = Batcher("m", up, BatchPolicy(8, 10.0, 1, 8), clock=FakeClock())
    blocker = asyncio.create_task(batcher.submit(rows(1)))
    await up.wait_batches(1)
    queued = asyncio.create_task(batcher.submit(rows(5)))
    await settle()
    assert batcher.queued_rows == 5
    with pytest.raises(Unavailable, match="queue is full"):
        await batcher.submit(rows(4))
    up.release_all()
    await up.wait_batches(2)
    up.release_all()
    await asyncio.gather(blocker, queued)
    await batcher.close(0)


async def test_a_request_larger_than_max_queue_rows_is_taken_while_nothing_else_is_queued() -> None:
    """The model's own max_batch_size may allow more rows than max_queue_rows: such a request
    waits behind nobody, and is shed only while others are queued (else a 503 would be its
    every answer, however often retried)."""
    up = FakeUpstream()
    batcher = Batcher("m", up, BatchPolicy(8, 10.0, 1, 8), clock=FakeClock())
    sent = [asyncio.create_task(batcher.submit(rows(10, start=1)))]  # idle: sent at once
    await asyncio.wait_for(up.wait_batches(1), 1.0)
    sent.append(asyncio.create_task(batcher.submit(rows(10, start=2))))  # a full batch: sent, overflowing
    await up.wait_batches(2)
    queued = asyncio.create_task(batcher.submit(rows(10, start=3)))  # at the hard cap, the queue empty
    await settle()
    assert batcher.queued_rows == 10
    with pytest.raises(Unavailable, match="queue is full"):
        await batcher.submit(rows(1))
    up.release_all()
    await up.wait_batches(3)
    up.release_all()
    for start, result in zip((1, 2, 3), await asyncio.gather(*sent, queued)):
        np.testing.assert_array_equal(result.outputs[0].data, rows(10, start=start)[0].data * 2)
    await batcher.close(0)


async def test_wrong_output_row_count_from_upstream_fails_the_batch_clearly() -> None:
    async def bad(prepare: Prepare, deadline: float | None) -> BatchResult:
        return BatchResult("1", [Tensor("y", "FP32", np.zeros((1, 3), np.float32))])

    batcher = Batcher("m", bad, POLICY, clock=FakeClock())
    with pytest.raises(UpstreamError, match="batch of 4 rows"):
        await batcher.submit(rows(4))
    await batcher.close(0)


def test_at_the_hard_cap_even_a_full_or_old_batch_waits() -> None:
    queue = [pending(8, 100.0)]
    assert select_batch(queue, inflight=1, now=200.0, policy=POLICY).batch == queue  # overflow allowed
    at_cap = select_batch(queue, inflight=2, now=200.0, policy=POLICY)  # 2 = OVERFLOW_FACTOR * max_inflight
    assert at_cap.batch == [] and at_cap.wake_at is None


async def test_a_batch_rejected_with_4xx_is_retried_one_request_at_a_time() -> None:
    """A model that fails on one request's data must not fail the others batched with it."""
    calls: list[int] = []
    release_first = asyncio.Event()

    async def picky(prepare: Prepare, deadline: float | None) -> BatchResult:
        inputs = prepare()
        assert inputs is not None
        calls.append(inputs[0].data.shape[0])
        if len(calls) == 1:
            await release_first.wait()
        if np.isnan(inputs[0].data).any():
            raise UpstreamError("input contains NaN", status=400)
        return BatchResult("1", [Tensor("y", "FP32", inputs[0].data * 2)])

    batcher = Batcher("m", picky, BatchPolicy(8, 10.0, 1, 64), clock=FakeClock())
    first = asyncio.create_task(batcher.submit(rows(1)))  # occupies the only slot
    await asyncio.sleep(0)
    bad_rows = rows(1)
    bad_rows[0].data[0, 0] = np.nan
    good, bad = asyncio.create_task(batcher.submit(rows(2, start=3))), asyncio.create_task(batcher.submit(bad_rows))
    await settle()
    release_first.set()
    await first
    np.testing.assert_array_equal((await good).outputs[0].data, rows(2, start=3)[0].data * 2)
    with pytest.raises(UpstreamError, match="NaN"):
        await bad
    assert calls == [1, 3, 2, 1]  # the slot, the shared batch, then each request alone
    await batcher.close(0)


POISON = -1.0  # a row holding this value makes the model raise


def poisoned(start: float) -> list[Tensor]:
    inputs = rows(1, start=start)
    inputs[0].data[0, 0] = POISON
    return inputs


class PoisonUpstream:
    """A model that raises on a poison row, failing the whole request that carries it (as
    Triton fails a batch for one row's ``pb_utils.TritonError``); ``error`` is what such a
    request fails with. The first request holds the only slot until ``release_first`` is set,
    so the requests submitted meanwhile gather into one batch. ``clock``: moved by ``advance``
    seconds once a request of several rows was sent (time passes while the batch is computed)."""

    def __init__(self, error: GatewayError, clock: FakeClock | None = None, advance: float = 0.0) -> None:
        self.error = error
        self.calls: list[int] = []
        self.release_first = asyncio.Event()
        self.clock, self.advance = clock, advance

    async def __call__(self, prepare: Prepare, deadline: float | None) -> BatchResult:
        inputs = prepare()
        if inputs is None:
            raise NothingToSend()
        self.calls.append(inputs[0].data.shape[0])
        if len(self.calls) == 1:
            await self.release_first.wait()
        if self.clock is not None and inputs[0].data.shape[0] > 1:
            self.clock.now += self.advance
        if (inputs[0].data == POISON).any():
            raise self.error
        return BatchResult("1", [Tensor("y", "FP32", inputs[0].data * 2)])


async def one_batch_with_a_poison_row(
    up: PoisonUpstream, clock: FakeClock | None = None, deadlines: tuple[float | None, ...] = (None, None, None, None)
) -> tuple[Batcher, list[asyncio.Task[BatchResult]]]:
    """A batch of four requests, the third poisoned, sent once the first request's slot frees;
    returns the batcher and the four tasks (the first request's was answered)."""
    batcher = Batcher("m", up, BatchPolicy(8, 10.0, 1, 64), clock=clock or FakeClock())
    first = asyncio.create_task(batcher.submit(rows(1, start=500)))  # occupies the only slot
    await asyncio.sleep(0)
    inputs = [rows(1, start=10), rows(1, start=20), poisoned(30), rows(1, start=40)]
    tasks = [asyncio.create_task(batcher.submit(x, deadline=d)) for x, d in zip(inputs, deadlines)]
    await settle()
    up.release_first.set()
    await first
    await asyncio.gather(*tasks, return_exceptions=True)
    return batcher, tasks


async def test_a_batch_failed_by_the_models_5xx_on_one_request_is_retried_one_request_at_a_time() -> None:
    """Triton's own 5xx answer (a Python model's TritonError on one row) must fail only the
    request that carried the row, not every request batched with it."""
    up = PoisonUpstream(upstream_error(500, b'{"error":"boom"}'))
    batcher, tasks = await one_batch_with_a_poison_row(up)
    for task, start in zip([tasks[0], tasks[1], tasks[3]], (10, 20, 40)):
        np.testing.assert_array_equal(task.result().outputs[0].data, rows(1, start=start)[0].data * 2)
    error = tasks[2].exception()
    assert isinstance(error, ModelError) and error.message == "boom" and error.status == 502
    # The slot, the shared batch, then each request alone, once: the poison one is not resent again.
    assert up.calls == [1, 4, 1, 1, 1, 1]
    assert (batcher.batches_sent, batcher.rows_sent) == (4, 4)  # the slot's, and the three answered alone
    assert batcher.inflight == 0
    await batcher.close(0)


async def test_a_model_failing_on_every_input_is_not_made_to_fail_once_per_request_for_a_while() -> None:
    clock = FakeClock()
    up = PoisonUpstream(upstream_error(500, b'{"error":"boom"}'))
    batcher = Batcher("m", up, BatchPolicy(8, 10.0, 1, 64), clock=clock)

    async def a_batch_of_poison() -> list[int]:
        """Four poisoned requests gathered behind one holding the slot: the calls it took."""
        up.calls.clear()
        up.release_first = asyncio.Event()
        holder = asyncio.create_task(batcher.submit(rows(1, start=500)))
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(batcher.submit(poisoned(10 * i))) for i in range(1, 5)]
        await settle()
        up.release_first.set()
        await holder
        await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(t.exception(), ModelError) for t in tasks)
        return list(up.calls)

    assert await a_batch_of_poison() == [1, 4, 1, 1, 1, 1]  # resent alone: every one failed again
    assert await a_batch_of_poison() == [1, 4]  # within RESEND_PAUSE_S: the batch fails as a whole
    clock.now += RESEND_PAUSE_S
    assert await a_batch_of_poison() == [1, 4, 1, 1, 1, 1]  # then one request at a time again
    await batcher.close(0)


async def test_requests_resent_alone_keep_their_own_deadlines() -> None:
    clock = FakeClock()
    up = PoisonUpstream(upstream_error(500, b'{"error":"boom"}'), clock=clock, advance=1.0)
    # The second request's deadline passes while the batch is computed: it gets 504, unsent.
    batcher, tasks = await one_batch_with_a_poison_row(up, clock, (None, clock.now + 0.5, None, clock.now + 5.0))
    assert isinstance(tasks[1].exception(), GatewayTimeout)
    assert isinstance(tasks[2].exception(), ModelError)
    np.testing.assert_array_equal(tasks[0].result().outputs[0].data, rows(1, start=10)[0].data * 2)
    np.testing.assert_array_equal(tasks[3].result().outputs[0].data, rows(1, start=40)[0].data * 2)
    assert up.calls == [1, 4, 1, 1, 1]
    await batcher.close(0)


def malformed_200() -> ModelError:
    error = ModelError("Triton instance gave a malformed answer: output 'y': unknown datatype \"BF16\"", status=502)
    error.triton_status = 200
    return error


@pytest.mark.parametrize(
    "error",
    [
        InstanceUnreachable("Triton instance unreachable: connection refused", connect_failed=True),
        InstanceUnreachable("Triton instance did not answer: connection reset", connect_failed=False),
        GatewayTimeout("Triton instance did not answer within 30 s"),
        GatewayTimeout("deadline passed before the request could be sent upstream"),
        Unavailable("no healthy Triton instance is available"),
        Unavailable("model 'm' is overloaded: its queue is full, try again later"),
        # Triton's 503 answers (UNAVAILABLE), which reach the batcher as ModelError 502.
        upstream_error(503, b'{"error":"Exceeds maximum queue size"}'),
        upstream_error(503, b'{"error":"Server is not ready"}'),
        # A 5xx that is not Triton's own answer: a proxy's error page, a malformed answer.
        UpstreamError("<html>502 Bad Gateway</html>", status=502),
        UpstreamError("Triton instance gave a malformed answer: bad status line", status=502),
        malformed_200(),  # an answer the gateway cannot decode: the same for every request
        # A version Triton does not hold (the router tries elsewhere; one by one would not help).
        UpstreamError("Request for unknown model: 'm' version 3 is not found", status=404),
    ],
    ids=lambda e: f"{type(e).__name__}:{e}",
)
async def test_a_batch_that_failed_on_the_way_there_is_not_resent_one_request_at_a_time(error: GatewayError) -> None:
    """Resending alone what never reached a model (or what the fleet refused as overloaded)
    would only multiply the load on a failing fleet."""
    up = PoisonUpstream(error)
    batcher, tasks = await one_batch_with_a_poison_row(up)
    assert all(task.exception() is error for task in tasks)
    assert up.calls == [1, 4]  # the slot, then the batch: nothing resent
    await batcher.close(0)


async def test_a_lone_request_failed_by_the_models_5xx_is_not_resent() -> None:
    up = PoisonUpstream(upstream_error(500, b'{"error":"boom"}'))
    up.release_first.set()
    batcher = Batcher("m", up, BatchPolicy(8, 10.0, 1, 64), clock=FakeClock())
    with pytest.raises(ModelError, match="boom"):
        await batcher.submit(poisoned(0))
    assert up.calls == [1]
    # Nor a batch of one request (sent by the worker, behind a busy slot).
    up2 = PoisonUpstream(upstream_error(500, b'{"error":"boom"}'))
    batcher2 = Batcher("m", up2, BatchPolicy(8, 10.0, 1, 64), clock=FakeClock())
    first = asyncio.create_task(batcher2.submit(rows(1)))
    await asyncio.sleep(0)
    lone = asyncio.create_task(batcher2.submit(poisoned(0)))
    await settle()
    up2.release_first.set()
    await first
    with pytest.raises(ModelError, match="boom"):
        await lone
    assert up2.calls == [1, 1]
    await batcher.close(0)
    await batcher2.close(0)


async def test_each_requests_wait_is_counted_once_however_often_its_batch_is_sent() -> None:
    async def tried_twice(prepare: Prepare, deadline: float | None) -> BatchResult:
        prepare()  # the first instance gave no answer: the router tries another, asking again
        inputs = prepare()
        assert inputs is not None
        return BatchResult("1", [Tensor("y", "FP32", inputs[0].data * 2)])

    batcher = Batcher("m", tried_twice, POLICY, clock=FakeClock())
    await batcher.submit(rows(1))
    assert sum(batcher.waits[:-1]) == 1
    await batcher.close(0)
    # Nor again when a failed batch's requests are resent alone.
    up = PoisonUpstream(upstream_error(500, b'{"error":"boom"}'))
    batcher, _ = await one_batch_with_a_poison_row(up)
    assert up.calls == [1, 4, 1, 1, 1, 1]
    assert sum(batcher.waits[:-1]) == 5  # the request holding the slot, then the batch's four
    await batcher.close(0)


class ResendingUpstream:
    """A batch of several requests fails with Triton's 400, so each is resent alone; the first
    request (holding the only slot) waits for ``release_first``, and each resent one for
    ``release_alone``, then raises ``alone_error`` if set."""

    def __init__(self) -> None:
        self.release_first = asyncio.Event()
        self.release_alone = asyncio.Event()
        self.alone_started = asyncio.Event()
        self.alone_error: Exception | None = None
        self.calls = 0

    async def __call__(self, prepare: Prepare, deadline: float | None) -> BatchResult:
        inputs = prepare()
        if inputs is None:
            raise NothingToSend()
        self.calls += 1
        if self.calls == 1:
            await self.release_first.wait()
        elif inputs[0].data.shape[0] > 1:
            raise UpstreamError("input 'x' is malformed", status=400)
        else:
            self.alone_started.set()
            await self.release_alone.wait()
            if self.alone_error is not None:
                raise self.alone_error
        return BatchResult("1", [Tensor("y", "FP32", inputs[0].data * 2)])


async def three_requests_behind_a_busy_slot(up: ResendingUpstream) -> tuple[Batcher, list[asyncio.Task[BatchResult]]]:
    batcher = Batcher("m", up, BatchPolicy(8, 10.0, 1, 64), clock=FakeClock())
    first = asyncio.create_task(batcher.submit(rows(1)))  # occupies the only slot
    await settle()
    tasks = [asyncio.create_task(batcher.submit(rows(1, start=10 * i))) for i in range(3)]
    await settle()
    up.release_first.set()
    await first
    return batcher, tasks


async def test_a_close_while_requests_are_resent_alone_fails_those_still_waiting() -> None:
    up = ResendingUpstream()
    batcher, tasks = await three_requests_behind_a_busy_slot(up)
    await asyncio.wait_for(up.alone_started.wait(), 1.0)
    await batcher.close(0)  # the grace is over: the batch's task is cancelled mid-resend
    done, waiting = await asyncio.wait(tasks, timeout=1.0)
    assert not waiting
    assert all(isinstance(task.exception(), Unavailable) for task in tasks)
    assert batcher.inflight == 0


async def test_a_bug_while_requests_are_resent_alone_fails_them_with_500() -> None:
    up = ResendingUpstream()
    up.alone_error = RuntimeError("a bug")
    up.release_alone.set()
    batcher, tasks = await three_requests_behind_a_busy_slot(up)
    done, waiting = await asyncio.wait(tasks, timeout=1.0)
    assert not waiting
    for task in tasks:
        error = task.exception()
        assert isinstance(error, UpstreamError) and error.status == 500 and "a bug" in error.message
    assert batcher.inflight == 0
    await batcher.close(0)


async def test_an_idle_batcher_sends_from_the_callers_task_and_then_batches_again() -> None:
    up = FakeUpstream()
    batcher = Batcher("m", up, POLICY, clock=FakeClock())
    first = asyncio.create_task(batcher.submit(rows(1, start=1)))
    await up.wait_batches(1)
    assert batcher.inflight == 1 and batcher.queued_rows == 0
    queued = [asyncio.create_task(batcher.submit(rows(1, start=i))) for i in (2, 3)]
    await settle()
    assert batcher.queued_rows == 2  # the slot is taken: these wait for the worker
    up.release_all()
    await up.wait_batches(2)
    up.release_all()
    results = await asyncio.gather(first, *queued)
    assert [b.shape[0] for b in up.batches] == [1, 2]
    for start, res in zip((1, 2, 3), results):
        np.testing.assert_array_equal(res.outputs[0].data, rows(1, start=start)[0].data * 2)
    await batcher.close(0)


async def test_when_a_batch_returns_the_requests_queued_meanwhile_are_sent_before_its_callers_resume() -> None:
    # The upstream computes the next batch while the gateway answers the callers of this one.
    up = FakeUpstream()
    batcher = Batcher("m", up, POLICY, clock=FakeClock())
    sent_when_answered: dict[int, int] = {}

    async def call(i: int) -> None:
        await batcher.submit(rows(1, start=i))
        sent_when_answered[i] = len(up.batches)

    first = asyncio.create_task(call(0))
    await up.wait_batches(1)
    second = [asyncio.create_task(call(i)) for i in (1, 2)]
    await settle()
    up.release_all()
    await up.wait_batches(2)  # callers 1 and 2, gathered while the slot was busy
    third = asyncio.create_task(call(3))
    await settle()
    assert len(up.batches) == 2 and batcher.queued_rows == 1
    up.release_all()  # batch 2 returns while caller 3 waits in the queue
    await up.wait_batches(3)
    up.release_all()
    await asyncio.gather(first, *second, third)
    assert [b.shape[0] for b in up.batches] == [1, 2, 1]
    assert sent_when_answered[1] == sent_when_answered[2] == 3  # batch 3 was on its way first
    await batcher.close(0)


class SlotWaitingUpstream:
    """Like the router at its per-instance cap: a dispatched batch first waits for a slot (the
    test opens it), and only then asks which requests are still wanted."""

    def __init__(self) -> None:
        self.slot = asyncio.Event()
        self.sent: list[int] = []
        self.dispatched = 0

    async def __call__(self, prepare: Prepare, deadline: float | None) -> BatchResult:
        self.dispatched += 1
        await self.slot.wait()
        inputs = prepare()
        if inputs is None:
            raise NothingToSend()
        self.sent.append(inputs[0].data.shape[0])
        return BatchResult("1", [Tensor("y", "FP32", inputs[0].data * 2)])


async def test_requests_that_expire_or_leave_while_their_batch_waits_for_a_slot_are_not_sent() -> None:
    clock = FakeClock()
    up = SlotWaitingUpstream()
    batcher = Batcher("m", up, BatchPolicy(8, 0.0, 1, 64), clock=clock)
    left = False
    tasks = [
        asyncio.create_task(batcher.submit(rows(1, start=1), deadline=clock.now + 0.1)),
        asyncio.create_task(batcher.submit(rows(1, start=2), gone=lambda: left)),
        asyncio.create_task(batcher.submit(rows(1, start=3))),
    ]
    await settle()
    assert up.dispatched >= 1 and up.sent == []  # batches formed, waiting for a slot
    clock.now += 1.0
    left = True
    up.slot.set()
    expired, gone, kept = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(expired, GatewayTimeout) and isinstance(gone, ClientGone)
    np.testing.assert_array_equal(kept.outputs[0].data, rows(1, start=3)[0].data * 2)
    assert up.sent == [1]  # only the request still wanted went upstream
    await batcher.close(0)


async def test_a_batch_with_nobody_left_sends_nothing() -> None:
    clock = FakeClock()
    up = SlotWaitingUpstream()
    batcher = Batcher("m", up, POLICY, clock=clock)
    task = asyncio.create_task(batcher.submit(rows(2), deadline=clock.now + 0.1))
    await settle()
    clock.now += 1.0
    up.slot.set()
    with pytest.raises(GatewayTimeout):
        await task
    assert up.sent == [] and batcher.inflight == 0
    await batcher.close(0)


async def test_a_batch_whose_task_close_cancels_before_it_starts_fails_its_callers() -> None:
    clock = FakeClock()
    up = FakeUpstream()
    batcher = Batcher("m", up, BatchPolicy(8, 10.0, 1, 64), clock=clock)
    first = asyncio.create_task(batcher.submit(rows(1)))
    await up.wait_batches(1)
    queued = asyncio.create_task(batcher.submit(rows(1, start=5)))
    await settle()
    up.release_all()  # the first batch comes back: its caller's task creates the next batch's task
    await asyncio.sleep(0)  # in the same loop turn as that
    await batcher.close(0)  # cancels the new task before its first step
    await first
    done, _ = await asyncio.wait([queued], timeout=1.0)
    assert done and isinstance(queued.exception(), Unavailable)
    assert batcher.inflight == 0 and len(up.batches) == 1
