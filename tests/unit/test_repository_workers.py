"""Sharing the driving of the model repository between worker processes
(gateway/upstream/repository_workers.py): two ``WorkerRepository`` objects on one folder stand for
two workers (each with its own locks, as two processes would have), each with its own instances;
the driver's ``RepositorySync`` is a stand-in that only starts, runs and describes itself."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config import RepositoryConfig
from gateway.host_files import claim
from gateway.instances import Instance
from gateway.upstream.repository_workers import WorkerRepository

URL = "http://triton-0:8000"


class FakeSync:
    """What the driver runs: ``start`` waits for ``gate`` (the first round: loading)."""

    def __init__(self, name: str, gate: asyncio.Event | None = None, first_round: Any = None) -> None:
        self.name = name
        self.gate = gate
        self.first_round = first_round  # called when the first round begins
        self.closed = False
        self.seeded: dict[str, Any] | None = None  # what the driver before placed

    def placements(self) -> dict[str, dict[str, str]]:
        return {URL: {"m": f"placed by {self.name}"}}

    def seed(self, placements: dict[str, Any]) -> None:
        self.seeded = placements

    async def start(self) -> None:
        if self.first_round is not None:
            self.first_round()
        if self.gate is not None:
            await self.gate.wait()

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        self.closed = True

    def snapshot(self) -> dict[str, Any]:
        return {"path": "repo", "scan_error": None, "models": {"m": {"serving": ["1", "2"], "driven_by": self.name}}, "events": []}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def worker(
    folder: Path, pid: int, gate: asyncio.Event | None = None, clock: Clock | None = None, first_round: Any = None
) -> WorkerRepository:
    instance = Instance(URL)
    instance.set_index({"m": frozenset({"1", "2"})})
    router: Any = SimpleNamespace(instances=[instance])
    config = RepositoryConfig(path="repo", scan_interval_s=1.0)

    def make_sync(peers: WorkerRepository) -> Any:
        return FakeSync(f"sync of {pid}", gate, first_round)

    return WorkerRepository(folder, config, router, make_sync, clock=clock or Clock(), pid=pid)


def instance_of(w: WorkerRepository) -> Instance:
    return w._router.instances[0]


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    gate = asyncio.Event()
    a, b = worker(tmp_path, 101, gate), worker(tmp_path, 102, gate)
    yield a, b, gate
    await a.close()
    await b.close()


@pytest.fixture
async def started(pair: Any) -> tuple[WorkerRepository, WorkerRepository]:
    """A driver (101) and a follower (102), both past their start."""
    a, b, gate = pair
    gate.set()
    await a.start()
    await b.start()
    return a, b


async def drain_begun(driver: WorkerRepository, follower: WorkerRepository, versions: list[str], requests: bool = True) -> asyncio.Task[int]:
    """The driver's drain of ``versions`` of m there under way, and the follower past applying
    it (its acknowledgement written)."""
    drain = asyncio.create_task(driver.drained(URL, "m", versions, deadline=1e9, requests=requests))
    await asyncio.sleep(0.1)
    follower._follow()
    follower._acknowledge()
    return drain


async def test_one_worker_drives_and_the_other_takes_traffic_only_once_it_has_loaded(pair: Any) -> None:
    a, b, gate = pair
    driving = asyncio.create_task(a.start())
    await asyncio.sleep(0.01)
    following = asyncio.create_task(b.start())
    await asyncio.sleep(0.3)
    assert a.driving and not b.driving
    assert not driving.done() and not following.done(), "neither takes traffic before the first round is over"
    gate.set()
    await asyncio.wait_for(asyncio.gather(driving, following), 2)
    assert not b.driving
    assert a.snapshot()["driver_pid"] == b.snapshot()["driver_pid"] == 101
    assert b.snapshot()["models"]["m"]["driven_by"] == "sync of 101"  # the driver's view, from either worker


async def test_a_follower_routes_exactly_what_the_driver_routes(started: Any) -> None:
    a, b = started
    mine, theirs = instance_of(b), instance_of(a)
    assert mine.models == {"m": frozenset({"1", "2"})}
    # The driver warms a new version up and drains an old one: the follower does not route either.
    theirs.set_index({"m": frozenset({"1", "2", "3"})})
    theirs.withhold("m", "3", "warming up")
    theirs.withhold("m", "1", "draining")
    a.publish()
    b._follow()
    assert mine.models == {"m": frozenset({"2"})}
    assert mine.withholds("m", "1") == "draining" and mine.withholds("m", "3") == "warming up"
    # Version 3 admitted: routed by the follower too, although its own index has not seen it yet.
    theirs.admit("m", "3")
    a.publish()
    b._follow()
    assert mine.loaded == {"m": frozenset({"1", "2"})}
    assert mine.models == {"m": frozenset({"2", "3"})}
    # The follower's own index changing does not override the driver.
    mine.set_index({"m": frozenset({"1", "2", "3"})})
    assert mine.models == {"m": frozenset({"2", "3"})}


async def test_a_version_a_follower_was_told_is_missing_comes_back_when_the_driver_is_read_again(started: Any) -> None:
    a, b = started
    mine = instance_of(b)
    mine.forget("m", "2")  # the instance answered that it does not hold it
    assert mine.models == {"m": frozenset({"1"})}
    b._follow()  # unchanged file: nothing new
    assert mine.models == {"m": frozenset({"1"})}
    b._seen = None  # what the follower's loop does every scan interval
    b._follow()
    assert mine.models == {"m": frozenset({"1", "2"})}


async def test_a_drain_waits_for_the_followers_requests_in_flight(started: Any) -> None:
    a, b = started
    mine, theirs = instance_of(b), instance_of(a)
    mine.started("m", "2")  # a request of the follower's, in flight to version 2
    theirs.withhold("m", "2", "draining")
    drain = asyncio.create_task(a.drained(URL, "m", ["2"], deadline=1e9))
    await asyncio.sleep(0.2)
    assert not drain.done(), "the follower has not even seen the withhold"
    b._follow()
    b._acknowledge()
    assert mine.models == {"m": frozenset({"1"})}  # no new request goes to version 2...
    await asyncio.sleep(0.2)
    assert not drain.done(), "...but one is still in flight"
    mine.finished("m", "2")
    b._acknowledge()
    assert await asyncio.wait_for(drain, 1) == 0


async def test_a_drain_waits_for_the_followers_sequences_under_way(started: Any) -> None:
    a, b = started
    mine, theirs = instance_of(b), instance_of(a)
    mine.sequence_answered("m", "2", b"7", False, b._clock(), idle_s=60.0)  # a sequence of the follower's
    theirs.withhold("m", "2", "draining")
    drain = await drain_begun(a, b, ["2"])
    await asyncio.sleep(0.2)
    assert not drain.done(), "the follower's sequence has more requests to come"
    mine.sequence_answered("m", "2", b"7", True, b._clock(), idle_s=60.0)  # its last one
    b._acknowledge()
    assert await asyncio.wait_for(drain, 1) == 0


async def test_a_sequence_started_in_one_worker_and_ended_in_the_other_holds_no_drain(started: Any) -> None:
    """With several workers, a sequence's requests reach whichever reads them: the worker that
    answered a start learns of the end another answered, instead of counting the sequence
    under way until its idle time runs out (60 s here). Both ways: started at the follower and
    ended at the driver, and the reverse."""
    a, b = started
    mine, theirs = instance_of(b), instance_of(a)
    now = b._clock()
    mine.sequence_answered("m", "2", b"7", False, now, idle_s=60.0)  # started at the follower...
    theirs.sequence_answered("m", "2", b"7", True, now, idle_s=60.0)  # ...ended at the driver
    theirs.sequence_answered("m", "2", b"8", False, now, idle_s=60.0)  # started at the driver...
    mine.sequence_answered("m", "2", b"8", True, now, idle_s=60.0)  # ...ended at the follower
    assert mine.open_sequences("m", "2", now) == theirs.open_sequences("m", "2", now) == 1
    theirs.withhold("m", "2", "draining")
    a.publish()
    b._follow()
    b._acknowledge()  # the follower's end of 8 reaches the driver at its next publication...
    (b._dir / "103.json").write_bytes(b"{half")  # (a third worker's, unreadable: passed over)
    claim_103 = claim(b._dir / "103.lock")
    a.publish()  # ...which also carries the driver's end of 7 to the follower
    assert theirs.open_sequences("m", "2", now) == 0
    os.close(claim_103)
    (b._dir / "103.json").unlink()
    b._follow()
    b._acknowledge()
    assert mine.open_sequences("m", "2", now) == 0
    assert await asyncio.wait_for(await drain_begun(a, b, ["2"]), 1) == 0


async def test_an_end_answered_elsewhere_does_not_end_the_sequence_started_again_since(started: Any) -> None:
    a, b = started
    mine, theirs = instance_of(b), instance_of(a)
    clock = b._clock
    theirs.sequence_answered("m", "2", b"7", True, clock(), idle_s=60.0)  # an end at the driver...
    clock.now += 1.0
    mine.sequence_answered("m", "2", b"7", False, clock(), idle_s=60.0)  # ...then a new start of 7
    theirs.withhold("m", "2", "draining")
    a.publish()
    b._follow()
    b._acknowledge()
    assert mine.open_sequences("m", "2", clock()) == 1
    drain = await drain_begun(a, b, ["2"])
    await asyncio.sleep(0.2)
    assert not drain.done(), "the sequence started again has more requests to come"
    mine.sequence_answered("m", "2", b"7", True, clock(), idle_s=60.0)
    b._acknowledge()
    assert await asyncio.wait_for(drain, 1) == 0


async def test_a_follower_starts_no_sequence_where_the_driver_quiesces_a_model_and_reports_those_under_way(started: Any) -> None:
    a, b = started
    mine, theirs = instance_of(b), instance_of(a)
    mine.sequence_answered("m", "1", b"7", False, b._clock(), idle_s=60.0)  # the follower's sequence
    mine.started("m", "1")  # and a request in flight: a reload does not wait for those
    theirs.quiescing = frozenset({"m"})  # the driver is about to reload the model there
    quiesced = await drain_begun(a, b, ["1", "2"], requests=False)
    assert mine.quiescing == {"m"} and mine.reloading == frozenset()
    theirs.reloading = frozenset({"m"})
    a.publish()
    b._follow()
    assert mine.reloading == {"m"}  # no sequence starts there while the load call runs
    theirs.reloading = frozenset()
    a.publish()
    b._follow()
    await asyncio.sleep(0.2)
    assert not quiesced.done(), "the follower's sequence has more requests to come"
    mine.sequence_answered("m", "1", b"7", True, b._clock(), idle_s=60.0)
    b._acknowledge()
    assert await asyncio.wait_for(quiesced, 1) == 0
    mine.finished("m", "1")


async def test_a_drain_does_not_wait_for_a_follower_that_exited(started: Any) -> None:
    a, b = started
    instance_of(b).started("m", "2")
    b._acknowledge()
    await b.close()  # its process is gone, and its requests with it
    instance_of(a).withhold("m", "2", "draining")
    assert await asyncio.wait_for(a.drained(URL, "m", ["2"], deadline=1e9), 1) == 0


async def test_a_drain_gives_up_at_its_deadline_and_says_how_many_were_left(tmp_path: Path) -> None:
    gate = asyncio.Event()
    gate.set()
    clock = Clock()
    a, b = worker(tmp_path, 101, gate, clock), worker(tmp_path, 102, gate)
    try:
        await a.start()
        await b.start()
        for _ in range(3):
            instance_of(b).started("m", "2")
        instance_of(a).withhold("m", "2", "draining")
        drain = asyncio.create_task(a.drained(URL, "m", ["2"], deadline=10.0))
        await asyncio.sleep(0.05)  # the drain publishes the withhold first
        b._follow()
        b._acknowledge()
        await asyncio.sleep(0.2)
        assert not drain.done()
        clock.now = 10.0
        assert await asyncio.wait_for(drain, 1) == 3
    finally:
        await a.close()
        await b.close()


async def test_when_the_driver_exits_a_follower_takes_over(tmp_path: Path) -> None:
    gate = asyncio.Event()
    gate.set()
    clock = Clock()
    a, b = worker(tmp_path, 101, gate), worker(tmp_path, 102, gate, clock)
    await a.start()
    await b.start()
    running = asyncio.create_task(b.run())
    try:
        await asyncio.sleep(0.2)
        assert not b.driving
        await a.close()
        await asyncio.sleep(0.2)
        assert not b.driving, "it tries once per scan interval"
        clock.now = 5.0
        await asyncio.sleep(0.3)
        assert b.driving
        assert b.snapshot()["driver_pid"] == 102
        driver = a.sync
        assert isinstance(b.sync, FakeSync) and isinstance(driver, FakeSync)
        assert b.sync.seeded == driver.placements()  # what the driver before placed is not loaded again
        c = worker(tmp_path, 103, gate)
        try:
            await asyncio.wait_for(c.start(), 2)
            assert not c.driving and c.snapshot()["driver_pid"] == 102
        finally:
            await c.close()
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await b.close()


async def test_a_worker_that_took_over_the_driving_does_not_wait_for_its_own_acknowledgement(tmp_path: Path) -> None:
    """It wrote ``<pid>.json`` while it followed, and its ``<pid>.lock`` is held as long as it
    runs: a drain must not count it as a follower that never applied the change."""
    gate = asyncio.Event()
    gate.set()
    clock = Clock()
    a, b = worker(tmp_path, 101, gate), worker(tmp_path, 102, gate, clock)
    await a.start()
    await b.start()
    running = asyncio.create_task(b.run())
    try:
        await asyncio.sleep(0.2)
        assert (b._dir / "102.json").exists()
        await a.close()
        clock.now = 5.0
        await asyncio.sleep(0.3)
        assert b.driving and not (b._dir / "102.json").exists()
        instance_of(b).withhold("m", "2", "draining")
        assert await asyncio.wait_for(b.drained(URL, "m", ["2"], deadline=1e9), 1) == 0
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await b.close()


async def test_a_worker_driving_from_its_start_seeds_its_sync_with_what_the_last_driver_placed(tmp_path: Path) -> None:
    gate = asyncio.Event()
    gate.set()
    a = worker(tmp_path, 101, gate)
    await a.start()
    driver = a.sync
    await a.close()  # the workers restart together: the next one never followed it
    b = worker(tmp_path, 102, gate)
    try:
        await b.start()
        assert b.driving and isinstance(b.sync, FakeSync) and isinstance(driver, FakeSync)
        assert b.sync.seeded == driver.placements()
    finally:
        await b.close()


async def test_a_worker_taking_over_publishes_what_it_withholds_while_its_first_round_runs(tmp_path: Path) -> None:
    ready, loading = asyncio.Event(), asyncio.Event()
    ready.set()
    clock = Clock()
    a = worker(tmp_path, 101, ready)
    b = worker(tmp_path, 102, loading, clock, first_round=lambda: instance_of(b).withhold("m", "2", "loading"))
    c = worker(tmp_path, 103, ready)
    await a.start()
    await b.start()
    await c.start()
    running = asyncio.create_task(b.run())
    try:
        await a.close()
        clock.now = 5.0
        await asyncio.sleep(0.3)
        assert b.driving, "it took over, and its first round is still loading"
        c._follow()
        assert instance_of(c).models == {"m": frozenset({"1"})}
        assert instance_of(c).withholds("m", "2") == "loading"
        loading.set()
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        for w in (b, c):
            await w.close()
