"""Dynamic batching across clients, one ``Batcher`` per model version.

Policy (``select_batch``, a pure function tested with a fake clock):

* A batch is sent at once while fewer than ``max_inflight`` batches of this model version are
  in flight: at low load nothing waits for a timer. With a ``hold``, a batch that is not full
  waits until its oldest request has waited that long (``max_delay`` at most), for company, but
  only while company comes: while the last few batches carried ``HOLD_AFTER`` requests or more
  on average (``Batcher.company``), and only until the batch has ``HOLD_ROWS`` rows (as Triton's
  preferred batch size ends its queue delay). Then fewer, larger upstream batches (cheaper for a
  model whose cost is per execution, and for the gateway, whose cost is largely per batch) for
  that much latency; a lone client is never held, since nobody would join it, nor a batch that
  is large already. With ``hold_cpu_busy``, only while the host's CPUs are at least that busy
  (``gateway.host_cpu``): the batches saved are worth the wait when cores are short, and with
  cores to spare the hold would only add latency (``Batcher.holding``). A request whose
  deadline would pass meanwhile is sent at once, with its batch.
* Otherwise requests gather. A batch is sent when a slot frees, or as soon as it is full
  (``max_rows``), or when its oldest request has waited ``max_delay`` seconds, so the queue adds
  no more than that delay while the upstream keeps up; such early batches may take in-flight
  batches up to ``OVERFLOW_FACTOR * max_inflight``, a hard cap. At the cap the queue grows, and
  past ``max_queue_rows`` new requests are shed with 503 (a request larger than that bound is
  taken while nothing else is queued: it waits behind nobody, and a retry would meet the same
  bound).
* When a batch comes back, the requests that queued meanwhile are sent before its callers are
  answered: the upstream computes the next batch while the gateway writes this one's answers.
* A batch holds requests of one signature only (input names, dtypes and non-batch shapes), taken
  in arrival order starting from the oldest request, so no signature starves.
* Requests whose deadline has passed are failed with 504 and never sent; requests whose caller
  went away (cancelled future, or a client that disconnected) are dropped unsent.
* When Triton rejects a batch of several requests with a 4xx, or answers it with its own 5xx
  error (``ModelError``: a model that raises on one request's data), each request is sent
  again alone, once, so only the faulty one fails (``resend_alone``). Not when the failure is
  the way there (no answer, a timeout, no instance available, a full queue) nor a model version
  Triton does not hold: resending those one by one would only multiply the load on a failing
  fleet. Nor, for ``RESEND_PAUSE_S``, a 5xx after one where every request failed alone too: a
  model that fails on every input is not made to fail once per request.

Each caller receives exactly its own rows of every output. A failed batch fails every request
in it with the same error, and the worker loop itself never dies of a request's error.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.errors import ClientGone, GatewayError, GatewayTimeout, ModelError, Unavailable, UpstreamError, missing_model
from gateway.metrics import count_latency, latency_row
from gateway.tensors import Tensor

log = logging.getLogger(__name__)


OVERFLOW_FACTOR = 2
# A hold applies while the batches sent carried this many requests or more, on average over the
# last few (an average that weighs each new batch by RECENT_WEIGHT): concurrent clients, whose
# requests a held batch may gather. One client alone, or clients that never overlap, make
# batches of one request, and are sent at once.
HOLD_AFTER = 1.5
RECENT_WEIGHT = 0.5
# A held batch goes as soon as it has this many rows (max_rows where lower): by then its per-batch
# costs are shared widely, and under heavy load batches this large form without a hold.
HOLD_ROWS = 8


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_rows: int
    max_delay: float  # seconds
    max_inflight: int
    max_queue_rows: int
    hold: float = 0.0  # seconds a batch that is not full waits for company while a slot is free
    hold_cpu_busy: float = 0.0  # the hold applies only while the host's CPUs are this busy (0: always)


@dataclass(slots=True)
class BatchResult:
    version: str  # the model version that served the batch
    outputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)  # Triton's response parameters


@dataclass(slots=True, eq=False)
class Pending:
    inputs: list[Tensor]
    rows: int
    signature: Hashable
    future: asyncio.Future[BatchResult]
    enqueued: float
    deadline: float | None = None
    gone: Callable[[], bool] | None = None  # True once the client has disconnected
    queued: bool = False  # in the queue, its rows counted in queued_rows


@dataclass(slots=True)
class Selection:
    batch: list[Pending] = field(default_factory=list)
    wake_at: float | None = None  # when to look again if nothing is sent now (None: on an event)


class NothingToSend(Exception):
    """Every request of a batch was dropped (deadline passed, client gone) before it was sent."""


# A dispatch sends a batch upstream. It receives ``prepare`` rather than the tensors: called
# once an instance is ready to take the batch (after any wait for a slot), it returns the
# inputs of the requests still wanted, or None when none is; then the dispatch must raise
# NothingToSend. A batch waiting for a slot thus never carries requests that expired or whose
# client left meanwhile.
Prepare = Callable[[], "list[Tensor] | None"]
Dispatch = Callable[[Prepare, float | None], Awaitable[BatchResult]]


def signature_of(inputs: Sequence[Tensor]) -> Hashable:
    return tuple((t.name, t.datatype, t.data.shape[1:]) for t in inputs)


def select_batch(
    queue: Sequence[Pending], inflight: int, now: float, policy: BatchPolicy, hold_now: bool = True
) -> Selection:
    """``hold_now``: whether the policy's hold applies now (``Batcher.holding``: requests come
    concurrently, and the host's CPUs are short)."""
    if not queue:
        return Selection()
    head = queue[0]
    batch: list[Pending] = []
    rows = 0
    full = False
    for item in queue:
        if item.signature != head.signature:
            continue
        if batch and rows + item.rows > policy.max_rows:
            full = True  # the next request of this signature no longer fits
            break
        batch.append(item)
        rows += item.rows
    full = full or rows >= policy.max_rows
    waited_out = now - head.enqueued >= policy.max_delay
    if inflight < policy.max_inflight:
        if not policy.hold or full or not hold_now or rows >= HOLD_ROWS:
            return Selection(batch=batch)
        # Held for company, but never past max_delay nor past a request's deadline.
        until = head.enqueued + min(policy.hold, policy.max_delay)
        if now >= until or any(item.deadline is not None and item.deadline <= until for item in batch):
            return Selection(batch=batch)
        return Selection(wake_at=until)
    if inflight >= policy.max_inflight * OVERFLOW_FACTOR:
        # The hard cap: the queue grows instead, and max_queue_rows sheds load with 503.
        return Selection()
    if full or waited_out:
        return Selection(batch=batch)
    return Selection(wake_at=head.enqueued + policy.max_delay)


# After a batch failed with the model's 5xx and every one of its requests failed alone too: how
# long later 5xx batches fail as a whole, not resent one request at a time.
RESEND_PAUSE_S = 1.0


def resend_alone(error: UpstreamError) -> bool:
    """Whether a batch of several requests that failed with ``error`` is sent again one request
    at a time: an error that may be one request's (Triton's 4xx, a model that raised on one
    request's data), not the way there's. Only Triton's own answer qualifies: a 4xx but for a
    model version it does not hold, or its own 5xx error (``ModelError``) but for its 503
    (unavailable: not ready, its queue full). Never the gateway's 503 and 504, an instance that
    did not answer (neither is an ``UpstreamError``), nor an answer that is not Triton's own (a
    proxy's 5xx page: plain ``UpstreamError`` 502) or that the gateway cannot decode (a
    ``ModelError`` of Triton's 200)."""
    if missing_model(error):
        return False
    if 400 <= error.status < 500:
        return True
    return isinstance(error, ModelError) and error.triton_status >= 500 and error.triton_status != 503


def concat_inputs(batch: Sequence[Pending]) -> list[Tensor]:
    if len(batch) == 1:
        return batch[0].inputs
    first = batch[0].inputs
    return [
        Tensor(t.name, t.datatype, np.concatenate([item.inputs[i].data for item in batch], axis=0))
        for i, t in enumerate(first)
    ]


def split_outputs(result: BatchResult, batch: Sequence[Pending]) -> list[BatchResult]:
    total = sum(item.rows for item in batch)
    for t in result.outputs:
        if not t.data.shape or t.data.shape[0] != total:
            raise UpstreamError(
                f"upstream returned output '{t.name}' with shape {list(t.data.shape)} for a batch of {total} rows",
                status=502,
            )
    if len(batch) == 1:
        return [result]
    parts = []
    offset = 0
    for item in batch:
        end = offset + item.rows
        parts.append(BatchResult(result.version, [Tensor(t.name, t.datatype, t.data[offset:end]) for t in result.outputs]))
        offset = end
    return parts


class Batcher:
    def __init__(
        self,
        name: str,
        dispatch: Dispatch,
        policy: BatchPolicy,
        clock: Callable[[], float] = time.monotonic,
        cpu_busy: Callable[[], float | None] | None = None,
    ) -> None:
        self.name = name
        self._cpu_busy = cpu_busy  # the host's CPUs' busy share (HostCpu.busy); None: unknown
        self._dispatch = dispatch
        self._clock = clock
        self._resend_paused_until = 0.0  # no 5xx batch is resent one request at a time before then
        self._queue: deque[Pending] = deque()
        self._queued_rows = 0
        self.inflight = 0
        self._wakeup = asyncio.Event()
        self.policy = policy
        self._tasks: dict[asyncio.Task[None], list[Pending]] = {}  # the batches sent by the worker's tasks
        self._worker: asyncio.Task[None] | None = None
        # The loop serving this batcher, looked up once: asyncio.get_running_loop() costs a
        # getpid() syscall on every call (its fork check), and the request path needs it often.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches_sent = 0
        self.rows_sent = 0
        # Requests per batch sent, averaged over the last few batches (see HOLD_AFTER).
        self.recent_requests = 1.0
        # How long the requests sent waited here (metrics.latency_row): the hold's cost, seen.
        self.waits = latency_row()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def company(self) -> bool:
        """Whether requests have been coming concurrently: the last few batches carried several."""
        return self.recent_requests >= HOLD_AFTER

    @property
    def holding(self) -> bool:
        """Whether a batch with a free slot waits for company now: the policy has a hold,
        requests come concurrently, and the host's CPUs are at least ``hold_cpu_busy`` busy
        (or their load is unknown: the hold applies as configured)."""
        policy = self.policy
        if not policy.hold or not self.company:
            return False
        if policy.hold_cpu_busy <= 0 or self._cpu_busy is None:
            return True
        busy = self._cpu_busy()
        return busy is None or busy >= policy.hold_cpu_busy

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: BatchPolicy) -> None:
        """A new policy (the fleet changed size, or the model's max_batch_size): the worker
        looks at the queue again at once, which requests would not make it do (``submit``)."""
        self._policy = policy
        self._wakeup.set()

    def start(self) -> None:
        if self._worker is None:
            self._worker = self.loop.create_task(self._run(), name=f"batcher:{self.name}")
            self._worker.add_done_callback(self._worker_done)

    async def submit(
        self, inputs: list[Tensor], deadline: float | None = None, gone: Callable[[], bool] | None = None
    ) -> BatchResult:
        rows = inputs[0].data.shape[0] if inputs and inputs[0].data.ndim else 1
        if self._queued_rows + rows > self.policy.max_queue_rows and self._queued_rows:
            raise Unavailable(f"model '{self.name}' is overloaded: its queue is full, try again later")
        future: asyncio.Future[BatchResult] = self.loop.create_future()
        item = Pending(inputs, rows, signature_of(inputs), future, self._clock(), deadline, gone)
        if not self._queue and self.inflight == 0 and not self.holding:
            # Idle: the policy would send this request alone at once. Send it from the caller's
            # own task, sparing two event-loop hops through the worker (latency at low load).
            # Only when nothing is in flight: under load, the worker's hop is what lets requests
            # arriving in the same loop turn gather into one batch.
            if deadline is not None and deadline <= item.enqueued:
                raise GatewayTimeout(f"deadline passed before the request reached model '{self.name}'")
            self.inflight += 1
            try:
                await self._send([item])
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    future.exception()  # the caller is gone: nobody will read the error
                raise
            return future.result()
        self.start()
        # The worker is woken only when this request may change what the policy decides: a new
        # head of the queue (its max_delay timer), a free slot (send it, or hold it), or rows
        # enough for a full batch. Under load, waking it for every request while a batch is in
        # flight would cost a task step, a queue scan and a timer each, for nothing; a batch
        # coming back wakes it anyway.
        woken = not self._queue or self.inflight < self.policy.max_inflight
        self._queue.append(item)
        item.queued = True
        self._queued_rows += rows
        if woken or self._queued_rows >= self.policy.max_rows:
            self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            if item.queued:
                # Its rows stop counting against max_queue_rows now, not when the worker next
                # looks at the queue (at the hard cap, only once a batch comes back); the
                # worker drops the request unsent (``_unwanted``).
                item.queued = False
                self._queued_rows -= rows
            raise

    async def close(self, grace: float) -> None:
        """Let queued and in-flight batches finish for up to ``grace`` seconds, then cancel."""
        deadline = self._clock() + grace
        while (self._queue or self.inflight) and self._clock() < deadline:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
        sends = list(self._tasks.items())
        for task, batch in sends:
            if inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_CREATED:
                # Cancelled before its first step, ``_send`` never runs, nor its handlers: its
                # batch is failed, and its slot given back, here.
                self.inflight -= 1
                for item in batch:
                    self._fail(item, Unavailable("the gateway is shutting down"))
            task.cancel()
        await asyncio.gather(*(task for task, _ in sends), *([self._worker] if self._worker else []), return_exceptions=True)
        while self._queue:
            self._fail(self._queue.popleft(), Unavailable("the gateway is shutting down"))

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("batcher %s stopped: %r", self.name, task.exception())
        self._worker = None

    def _fail(self, item: Pending, error: BaseException) -> None:
        if not item.future.done():
            item.future.set_exception(error)

    def _remove(self, batch: Sequence[Pending]) -> None:
        for item in batch:
            if item.queued:  # not when its caller was cancelled: ``submit`` subtracted its rows then
                item.queued = False
                self._queued_rows -= item.rows
        if all(a is b for a, b in zip(batch, self._queue)):
            for _ in batch:  # the common case: the batch is the head of the queue
                self._queue.popleft()
            return
        ids = {id(i) for i in batch}
        self._queue = deque(i for i in self._queue if id(i) not in ids)

    def _unwanted(self, item: Pending, now: float) -> bool:
        """Fail a request nobody waits for any more (deadline passed, client gone); True if so."""
        if item.future.done():
            return True  # its caller was cancelled
        if item.deadline is not None and item.deadline <= now:
            self._fail(item, GatewayTimeout(f"deadline passed while queued for model '{self.name}'"))
            return True
        if item.gone is not None and item.gone():
            self._fail(item, ClientGone("the client disconnected"))
            return True
        return False

    def _prune(self, now: float) -> None:
        dropped = [i for i in self._queue if self._unwanted(i, now)]
        if dropped:
            self._remove(dropped)

    def _pump(self) -> float | None:
        """Send every batch the policy allows now; return when to look again (None: on an event)."""
        while True:
            now = self._clock()
            self._prune(now)
            selection = select_batch(self._queue, self.inflight, now, self.policy, self.holding)
            if not selection.batch:
                return selection.wake_at
            self._remove(selection.batch)
            self.inflight += 1
            task = self.loop.create_task(self._send(selection.batch))
            # Keep a hard reference so the task is not garbage collected mid-flight; its batch,
            # for ``close`` to fail should the task be cancelled before it starts.
            self._tasks[task] = selection.batch
            task.add_done_callback(self._tasks.pop)

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            wake_at = self._pump()
            timer = None
            if wake_at is not None:
                # A plain timer that sets the event: far cheaper than wait_for() on every pass.
                # Rounded up to whole milliseconds: uvloop's timers have that resolution, and
                # one that fires early would only re-arm itself at once, round after round.
                delay = math.ceil(max(0.0, wake_at - self._clock()) * 1000) / 1000
                timer = self.loop.call_later(delay, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    async def _dispatch_wanted(
        self, batch: list[Pending], count_waits: bool = True
    ) -> tuple[list[Pending], BatchResult | None]:
        """Dispatch the requests of ``batch`` still wanted when an instance takes it; return
        those requests and the result (None if none was left to send). ``count_waits``: count
        how long each waited here (not for a request counted already, resent alone)."""
        outgoing = batch

        def prepare() -> list[Tensor] | None:
            # Called once per attempt (the router tries another instance after a failure): each
            # request's wait is counted at the first only.
            nonlocal outgoing, count_waits
            now = self._clock()
            outgoing = [i for i in outgoing if not self._unwanted(i, now)]
            if count_waits:
                count_waits = False
                for item in outgoing:
                    count_latency(self.waits, now - item.enqueued)
            return concat_inputs(outgoing) if outgoing else None

        deadlines = [i.deadline for i in batch if i.deadline is not None]
        try:
            result = await self._dispatch(prepare, max(deadlines) if len(deadlines) == len(batch) else None)
        except NothingToSend:
            return [], None
        except BaseException:
            batch[:] = outgoing  # the requests the error concerns
            raise
        return outgoing, result

    async def _send_alone(self, item: Pending) -> bool:
        """Whether it did not fail (answered, or not sent: its caller gone)."""
        try:
            sent, result = await self._dispatch_wanted([item], count_waits=False)
            if result is None:
                return True
            part = split_outputs(result, sent)[0]
        except GatewayError as exc:
            self._fail(item, exc)
            return False
        except Exception as exc:  # a bug fails this request, not the others resent beside it
            log.exception("request for %s failed", self.name)
            self._fail(item, UpstreamError(f"internal error while serving '{self.name}': {exc}", status=500))
            return False
        self.batches_sent += 1  # a batch of one, answered
        self.rows_sent += item.rows
        if not item.future.done():
            item.future.set_result(part)
        return True

    async def _send(self, batch: list[Pending]) -> None:
        batch = list(batch)  # narrowed to the requests actually sent, if some were dropped
        released = False
        try:
            try:
                sent, result = await self._dispatch_wanted(batch)
                if result is None:
                    return
                parts = split_outputs(result, sent)
                self.batches_sent += 1
                self.rows_sent += sum(i.rows for i in sent)
                self.recent_requests += RECENT_WEIGHT * (len(sent) - self.recent_requests)
                # The slot is free: send the requests that queued meanwhile before answering these
                # callers, so the upstream computes the next batch while the gateway sends the
                # answers of this one (a task created now runs before the callers' tasks resume).
                self.inflight -= 1
                released = True
                self._pump()
                for item, part in zip(sent, parts):
                    if not item.future.done():
                        item.future.set_result(part)
            except UpstreamError as exc:
                model_failed = exc.status >= 500
                if len(batch) == 1 or not resend_alone(exc) or (model_failed and self._clock() < self._resend_paused_until):
                    raise
                # Once: a request that fails alone gets its own error (``_send_alone``). Within
                # the outer handlers: a cancellation meanwhile (or a bug) fails the requests
                # that were not answered alone yet.
                answered = await asyncio.gather(*(self._send_alone(item) for item in batch))
                if model_failed and not any(answered):  # the model fails whatever the input
                    self._resend_paused_until = self._clock() + RESEND_PAUSE_S
        except asyncio.CancelledError:
            for item in batch:
                self._fail(item, Unavailable("the gateway is shutting down"))
            raise
        except GatewayError as exc:
            for item in batch:
                self._fail(item, exc)
        except Exception as exc:  # a bug must fail the batch, never the worker loop
            log.exception("batch for %s failed", self.name)
            for item in batch:
                self._fail(item, UpstreamError(f"internal error while serving '{self.name}': {exc}", status=500))
        finally:
            if not released:
                self.inflight -= 1
            self._wakeup.set()
