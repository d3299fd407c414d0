"""The host tier (gateway/cache/host.py): one store in shared memory for a host's worker
processes. Several ``HostStore`` views of one segment stand for the workers; some tests run
real processes against one segment; the last ones put the response cache on top of it."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import multiprocessing
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.batcher import BatchResult
from gateway.cache import Freshness, RawAnswer, ResponseCache, build_cache, host, host_flight
from gateway import host_files
from gateway.cache.host import ENTRY_BYTES, PREFIX, HostStore, create_segment
from gateway.host_files import SWEEP_LOCK
from gateway.config import CacheConfig
from gateway.errors import ClientGone, Unavailable, UpstreamError
from gateway.tensors import Tensor

Open = Callable[[], HostStore]


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[Path]:
    made = create_segment(64 * 1024, str(tmp_path))
    assert made is not None
    yield made.path
    made.remove()


@pytest.fixture
def worker(segment: Path) -> Iterator[Open]:
    """Opens a view of the segment, as a worker process would; all closed at the end."""
    opened: list[HostStore] = []

    def open_one() -> HostStore:
        opened.append(HostStore(segment))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def key(n: int) -> bytes:
    return hashlib.blake2b(b"%d" % n, digest_size=16).digest()


def value(n: int, length: int) -> bytes:
    """Bytes that say which key they belong to, of any length: a reader can tell a wrong answer."""
    pattern = hashlib.sha256(b"%d" % n).digest()
    return (pattern * (length // 32 + 1))[:length]


def put(store: HostStore, n: int, data: bytes, expires: float = 50.0, version: str = "1") -> bool:
    return store.put(key(n), "m", version, store.generation("m", version), data, expires)


def test_what_one_worker_stores_another_reads(worker: Open) -> None:
    one, two = worker(), worker()
    assert put(one, 1, b"answer")
    assert two.get(key(1), "m", "1", now=10.0) == (b"answer", 50.0)
    assert two.get(key(2), "m", "1", now=10.0) is None
    assert put(one, 1, b"newer", expires=60.0)  # the same key again: the newer entry
    assert two.get(key(1), "m", "1", now=10.0) == (b"newer", 60.0)
    assert two.stats()["hits"] == 2 and one.stats()["writes"] == 2 == two.stats()["writes"]


def test_an_entry_expires(worker: Open) -> None:
    store = worker()
    put(store, 1, b"answer")
    assert store.get(key(1), "m", "1", now=49.9) is not None
    assert store.get(key(1), "m", "1", now=50.0) is None


def test_a_bump_hides_the_versions_entries_from_every_worker(worker: Open) -> None:
    one, two = worker(), worker()
    before = one.generation("m", "1")
    put(one, 1, b"old")
    put(one, 2, b"other version", version="2")
    two.bump("m", "1")
    assert one.get(key(1), "m", "1", now=0.0) is None
    assert one.get(key(2), "m", "2", now=0.0) == (b"other version", 50.0)
    # An answer computed before the bump is not written after it: it could never be read.
    assert not one.put(key(3), "m", "1", before, b"computed before the drop", 50.0)
    assert two.get(key(3), "m", "1", now=0.0) is None
    assert put(one, 3, b"computed after")
    assert two.get(key(3), "m", "1", now=0.0) == (b"computed after", 50.0)


def test_the_log_is_bounded_oldest_entries_go_first_and_no_key_reads_anothers_bytes(worker: Open) -> None:
    store = worker()
    for n in range(1000):  # about eight times the log
        assert put(store, n, value(n, 500))
    stats = store.stats()
    assert stats["bytes_written"] > 7 * stats["capacity"]
    found = {n: store.get(key(n), "m", "1", now=0.0) for n in range(1000)}
    for n, got in found.items():
        assert got is None or got[0] == value(n, 500), n
    assert all(found[n] is None for n in range(800))  # overwritten
    assert sum(found[n] is not None for n in range(900, 1000)) >= 80  # the newest, but for full buckets


def cursor_at(segment: Path, cursor: int) -> None:
    fd = os.open(segment, os.O_RDWR)
    os.pwrite(fd, struct.pack("<Q", cursor), 64)
    os.close(fd)


def test_an_entry_reads_until_the_cursor_has_passed_it_by_a_whole_log(segment: Path, worker: Open) -> None:
    """The first entry lies at position 0, ``size`` bytes long: the log has wrapped over it
    once the cursor is past ``capacity`` (whatever the index still says)."""
    store = worker()
    put(store, 1, b"answer")
    cursor_at(segment, store.capacity)  # the next write would start a new lap, at 0
    assert store.get(key(1), "m", "1", now=0.0) == (b"answer", 50.0)
    cursor_at(segment, store.capacity + 1)  # a write has begun over it
    assert store.get(key(1), "m", "1", now=0.0) is None and store.stats()["stale"] == 1


@pytest.mark.parametrize("where", ["value", "length", "generation", "expiry"])
def test_damaged_bytes_read_as_a_miss(segment: Path, worker: Open, where: str) -> None:
    store = worker()
    put(store, 1, b"answer")
    raw = segment.read_bytes()
    entry = raw.find(key(1) + struct.pack("<Q", 0))  # the entry: key, then generation 0
    offset = {"value": ENTRY_BYTES, "length": 32, "generation": 16, "expiry": 24}[where]
    fd = os.open(segment, os.O_RDWR)
    os.pwrite(fd, bytes([raw[entry + offset] ^ 0x01]), entry + offset)
    os.close(fd)
    assert store.get(key(1), "m", "1", now=0.0) is None


def test_an_entry_too_large_for_the_log_is_not_stored(worker: Open) -> None:
    store = worker()
    assert not put(store, 1, bytes(store.capacity // 8))
    assert store.get(key(1), "m", "1", now=0.0) is None and store.stats()["writes"] == 0


def _hold_write_lock(
    path: str, held: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event, byte: int = 0
) -> None:
    """Another worker holding the log's lock (byte 0) or the claims' (byte 1) until released."""
    fd = os.open(path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, byte)
    held.set()
    release.wait(30)
    os.close(fd)


def test_a_write_while_another_worker_writes_is_skipped_not_waited_for(segment: Path, worker: Open) -> None:
    store = worker()
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_write_lock, args=(str(segment), held, release))
    other.start()
    try:
        assert held.wait(30)
        assert not put(store, 1, b"answer")
        assert store.stats()["busy"] == 1
    finally:
        release.set()
        other.join(30)
    assert put(store, 1, b"answer") and store.get(key(1), "m", "1", now=0.0) is not None


def test_a_worker_holding_the_locks_stops_no_other_for_longer_than_the_bound(segment: Path, worker: Open) -> None:
    """A worker stopped while it holds a lock (a debugger, SIGSTOP) holds it for as long as it
    is stopped: a claimed write, a renewal and a claim's end each give up after LOCK_WAIT_S,
    and the claim left behind lapses at its lease's end, for another worker to take over."""
    store, other_worker = worker(), worker()
    assert store.claim(key(1), until=2.0, now=0.0) is None  # this worker computes key 1, leased until 2.0
    ctx = multiprocessing.get_context("spawn")
    holders = []
    for byte in (0, 1):
        held, release = ctx.Event(), ctx.Event()
        holder = ctx.Process(target=_hold_write_lock, args=(str(segment), held, release, byte))
        holder.start()
        holders.append((holder, release))
        assert held.wait(30)
    try:
        started = time.monotonic()
        assert not store.put(key(1), "m", "1", store.generation("m", "1"), b"answer", 50.0, wait=True)
        store.renew({key(1): 30.0})
        store.release(key(1))
        waited = time.monotonic() - started
        assert waited < 3 * 10 * host.LOCK_WAIT_S  # three bounded waits, with room for a busy machine
        assert store.stats()["busy"] == 1 and store.stats()["gave_up"] == 2
    finally:
        for holder, release in holders:
            release.set()
            holder.join(30)
    assert other_worker.look(key(1), now=1.0) is not None  # neither renewed nor released: still leased...
    assert other_worker.claim(key(1), until=30.0, now=2.5) is None  # ...until its lease ends: taken over


def test_a_file_that_is_not_a_segment_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other"
    path.write_bytes(bytes(65536))
    with pytest.raises(ValueError, match="not a gateway cache segment"):
        HostStore(path)


def test_segments_no_process_holds_are_removed_and_held_ones_kept(tmp_path: Path) -> None:
    left = tmp_path / f"{PREFIX}1-0000"  # pid 1 is alive: only holding a segment counts
    left.write_bytes(b"x")
    made = create_segment(65536, str(tmp_path))
    assert made is not None and not left.exists()
    opened = HostStore(made.path)  # a worker of it
    again = create_segment(65536, str(tmp_path))  # another server starting in the same folder
    assert again is not None and made.path.exists()
    made.remove()
    assert not made.path.exists()
    opened.close()
    again.remove()
    assert [p.name for p in tmp_path.iterdir()] == [SWEEP_LOCK]


def test_a_segment_a_worker_still_maps_is_kept_after_its_server_died(tmp_path: Path) -> None:
    made = create_segment(65536, str(tmp_path))
    assert made is not None
    opened = HostStore(made.path)
    os.close(made._fd)  # the server's hold gone (killed), its file left behind
    made._fd = -1
    create_segment(65536, str(tmp_path)).remove()  # type: ignore[union-attr]
    assert made.path.exists()  # a worker still maps it
    opened.close()
    create_segment(65536, str(tmp_path)).remove()  # type: ignore[union-attr]
    assert not made.path.exists()


def test_a_segment_shrinks_to_the_room_there_is_and_reserves_its_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(host, "free_bytes", lambda folder: 12 * 1024 * 1024)  # a small /dev/shm
    made = create_segment(256 * 1024 * 1024, str(tmp_path))
    assert made is not None
    assert f"{4 * 1024 * 1024} bytes instead of the {256 * 1024 * 1024} asked for" in caplog.text  # said, as documented
    store = HostStore(made.path)
    assert store.capacity == 4 * 1024 * 1024  # halved until the segment takes at most half the room
    assert os.stat(made.path).st_blocks * 512 >= store.capacity  # reserved, not a sparse file
    store.close()
    monkeypatch.setattr(host, "free_bytes", lambda folder: 2 * 1024 * 1024)
    assert create_segment(256 * 1024 * 1024, str(tmp_path)) is None  # not even the smallest fits
    assert sorted(p.name for p in tmp_path.iterdir()) == [SWEEP_LOCK, made.path.name]
    made.remove()


SWEEPER = """
import sys
from pathlib import Path
from gateway import host_files
from gateway.cache.host import PREFIX
print("ready", flush=True)
host_files.sweep_unheld(Path(sys.argv[1]), PREFIX, lambda path: path, host_files.os.unlink, "a cache segment")
"""


def test_a_segment_is_held_before_another_servers_sweep_can_find_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweepers: list[subprocess.Popen[str]] = []
    real_flock = fcntl.flock

    def flock_once_another_server_sweeps(fd: int, operation: int) -> None:
        if operation == fcntl.LOCK_SH and not sweepers:  # the new segment's hold, about to be taken
            # Another server starting this very moment: its sweep runs before the hold is taken.
            sweeper = subprocess.Popen([sys.executable, "-c", SWEEPER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
            sweepers.append(sweeper)
            assert sweeper.stdout is not None and sweeper.stdout.readline() == "ready\n"
            time.sleep(0.3)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_once_another_server_sweeps)
    made = create_segment(65536, str(tmp_path))
    monkeypatch.undo()
    assert sweepers[0].wait(10) == 0
    sweepers[0].stdout.close()  # type: ignore[union-attr]
    assert made is not None and made.path.exists()  # not removed by the other server
    made.remove()


def _hammer(path: str, seed: int, ops: int) -> tuple[int, int, int]:
    """A worker: random reads and writes of 300 keys with values of varied lengths, so the log
    wraps many times while the others read. Returns (hits, wrong answers, writes)."""
    store = HostStore(path)
    rng = random.Random(seed)
    gen = store.generation("m", "1")
    hits = wrong = writes = 0
    for _ in range(ops):
        n = rng.randrange(300)
        if rng.random() < 0.3:
            writes += store.put(key(n), "m", "1", gen, value(n, rng.randrange(1, 2000)), expires=1e12)
        else:
            got = store.get(key(n), "m", "1", now=0.0)
            if got is not None:
                hits += 1
                wrong += got[0] != value(n, len(got[0]))
    store.close()
    return hits, wrong, writes


def test_workers_reading_and_writing_at_once_never_read_a_wrong_answer(segment: Path) -> None:
    """A smoke test of the whole: races are rare at this scale, so the deterministic tests
    above (cursor, damaged bytes) are what pin each check down."""
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_hammer, [(str(segment), seed, 30000) for seed in range(3)])
    hits, wrong, writes = (sum(r[i] for r in results) for i in range(3))
    assert wrong == 0
    assert hits > 1000 and writes > 5000
    store = HostStore(segment)
    assert store.stats()["bytes_written"] > 25 * 64 * 1024  # wrapped many times
    store.close()


# -- the response cache on top of it ----------------------------------------------------------


def result() -> BatchResult:
    return BatchResult("1", [Tensor("y", "FP32", np.arange(4, dtype=np.float32).reshape(1, 4))])


def workers(worker: Open, n: int = 2) -> list[ResponseCache]:
    config = CacheConfig(enabled=True, ttl_s=30.0)
    return [ResponseCache(config, host=worker()) for _ in range(n)]


async def test_a_result_one_worker_computed_is_a_hit_on_another(worker: Open) -> None:
    one, two = workers(worker)
    calls = 0

    async def compute(abandoned) -> BatchResult:  # noqa: ANN001
        nonlocal calls
        calls += 1
        return result()

    assert (await one.get_or_compute("m", "1", b"k" * 16, compute))[1] == "miss"
    got, source, _ = await two.get_or_compute("m", "1", b"k" * 16, compute)
    assert source == "hit" and calls == 1
    np.testing.assert_array_equal(got.outputs[0].data, result().outputs[0].data)
    assert (await two.get_or_compute("m", "1", b"k" * 16, compute))[1] == "hit"  # now held in the process
    stats = two.snapshot()["models"]["m"]
    assert (stats["hits"], stats["host_hits"], stats["entries"]) == (2, 1, 1)
    assert two.snapshot()["host"]["writes"] == 1


class Redis:
    """The shared tier, as tests/unit/test_cache.py fakes it."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    async def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    async def set(self, key: bytes, value: bytes, ttl_s: float) -> None:
        self.data[key] = value

    async def close(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {}


async def test_a_version_one_worker_dropped_is_not_taken_from_the_shared_tier_by_another(worker: Open) -> None:
    """A worker that has not noticed the drop yet, or that started after it, must not serve the
    shared tier's answer of the version's files before (nor pass it to the other workers)."""
    redis = Redis()
    config = CacheConfig(enabled=True, ttl_s=30.0)
    one, two = (ResponseCache(config, redis, host=worker()) for _ in range(2))
    values = iter([1.0, 2.0, 3.0])

    async def compute(abandoned) -> BatchResult:  # noqa: ANN001
        return BatchResult("1", [Tensor("y", "FP32", np.full((1, 4), next(values), np.float32))])

    assert (await one.get_or_compute("m", "1", b"k" * 16, compute))[1] == "miss"  # the files before
    await asyncio.sleep(0)  # written to Redis
    time.sleep(0.002)
    one.drop_version("m", "1")  # reloaded in place; worker two has not seen it (yet)
    later = ResponseCache(config, redis, host=worker())  # a worker started since
    got, source, _ = await two.get_or_compute("m", "1", b"k" * 16, compute)
    assert source == "miss" and got.outputs[0].data[0, 0] == 2.0  # computed anew, not Redis's
    got, source, _ = await later.get_or_compute("m", "1", b"k" * 16, compute)
    assert source == "hit" and got.outputs[0].data[0, 0] == 2.0  # the new answer, from the host tier
    assert two.snapshot()["models"]["m"]["shared_hits"] == later.snapshot()["models"]["m"]["shared_hits"] == 0
    later._host.bump("m", "1")  # dropped again (by a third worker): Redis now holds the answer before
    time.sleep(0.002)
    later.store.drop_version("m", "1")
    assert (await later.get_or_compute("m", "1", b"k" * 16, compute))[1] == "miss"


ANSWER = RawAnswer(((b"content-type", b"application/json"), (b"x-cache", b"hit"), (b"content-length", b"9")), b'{"a": 1}\n')


async def test_an_answer_from_another_worker_keeps_its_age_and_the_rest_of_its_ttl(worker: Open) -> None:
    now = [500.0]  # the workers of a host share its monotonic clock
    config = CacheConfig(enabled=True, ttl_s=30.0)
    one, two = (ResponseCache(config, host=worker(), clock=lambda: now[0]) for _ in range(2))

    async def compute(abandoned) -> BatchResult:  # noqa: ANN001
        return result()

    await one.get_or_compute("m", "1", b"k" * 16, compute)
    assert one.put_raw("m", "1", b"r" * 16, ANSWER, one.epoch("m", "1"))
    now[0] += 12.0
    assert (await two.get_or_compute("m", "1", b"k" * 16, compute))[1:] == ("hit", 12.0)
    assert two.get_raw("m", "1", b"r" * 16) == (ANSWER, 12.0)
    now[0] += 17.9
    assert (await two.get_or_compute("m", "1", b"k" * 16, compute))[1:] == ("hit", pytest.approx(29.9))
    now[0] += 0.1  # the TTL from its computation, in every worker
    assert two.get_raw("m", "1", b"r" * 16) is None
    assert (await two.get_or_compute("m", "1", b"k" * 16, compute))[1] == "miss"


async def computed_by_one_of_two(worker: Open) -> tuple[list[float], ResponseCache, ResponseCache, Upstream]:
    """Two workers on one clock (``now[0]``; a 60 s TTL), the first of which computed ``KEY``
    at 500 s; the upstream answers at once."""
    now = [500.0]
    config = CacheConfig(enabled=True, ttl_s=60.0)
    one, two = (ResponseCache(config, host=worker(), clock=lambda: now[0]) for _ in range(2))
    upstream = Upstream()
    upstream.go.set()
    await one.get_or_compute("m", "1", KEY, upstream)
    return now, one, two, upstream


async def test_an_answer_from_another_worker_too_old_for_a_request_is_passed_over_and_not_counted(worker: Open) -> None:
    now, one, two, upstream = await computed_by_one_of_two(worker)
    assert one.put_raw("m", "1", b"r" * 16, ANSWER, one.epoch("m", "1"))
    now[0] += 20.0
    young = Freshness(max_age=10.0)
    assert two.get_raw("m", "1", b"r" * 16, young) is None
    assert (await two.get_or_compute("m", "1", KEY, upstream, freshness=young))[1] == "miss"
    stats = two.snapshot()["models"]["m"]
    assert (stats["hits"], stats["host_hits"], stats["misses"], upstream.calls) == (0, 0, 1, 2)
    assert (two.snapshot()["host"]["hits"], two.snapshot()["host"]["stale"]) == (0, 0)


async def test_a_request_passing_over_its_own_old_copy_takes_a_younger_one_from_another_worker(worker: Open) -> None:
    now, one, two, upstream = await computed_by_one_of_two(worker)
    now[0] += 5.0
    assert (await two.get_or_compute("m", "1", KEY, upstream))[1:] == ("hit", 5.0)  # two keeps a copy
    now[0] += 15.0
    young = Freshness(max_age=10.0)
    assert (await one.get_or_compute("m", "1", KEY, upstream, freshness=young))[1] == "miss"  # replaced, in the host tier too
    now[0] += 5.0
    assert (await two.get_or_compute("m", "1", KEY, upstream, freshness=young))[1:] == ("hit", 5.0)  # not its own, 25 s old
    assert upstream.calls == 2 and two.snapshot()["models"]["m"]["host_hits"] == 2


async def test_a_raw_answer_one_worker_kept_answers_anothers_client(worker: Open) -> None:
    one, two = workers(worker)
    assert one.put_raw("m", "1", b"r" * 16, ANSWER, one.epoch("m", "1"))
    got, age = two.get_raw("m", "1", b"r" * 16)
    assert got == ANSWER and got.head == ANSWER.head and 0 <= age < 1
    stats = two.snapshot()["models"]["m"]
    assert (stats["hits"], stats["raw_hits"], stats["host_hits"]) == (1, 1, 1)
    assert two.get_raw("m", "2", b"q" * 16) is None


async def test_only_answers_a_request_computed_itself_go_to_the_host_tier(worker: Open) -> None:
    """A hit from a worker's own store may predate a drop another worker saw first: kept in
    that worker, not shared."""
    one, two = workers(worker)
    assert one.put_raw("m", "1", b"r" * 16, ANSWER, one.epoch("m", "1"), computed=False)
    assert one.get_raw("m", "1", b"r" * 16)[0] == ANSWER and two.get_raw("m", "1", b"r" * 16) is None


async def test_an_answer_computed_across_a_drop_on_another_worker_is_not_shared(worker: Open) -> None:
    one, two = workers(worker)
    epoch = one.epoch("m", "1")
    two.drop_version("m", "1")  # another worker saw version 1 reloaded meanwhile
    one.put_raw("m", "1", b"r" * 16, ANSWER, epoch)
    assert two.get_raw("m", "1", b"r" * 16) is None
    assert one.put_raw("m", "1", b"r" * 16, ANSWER, one.epoch("m", "1"))
    assert two.get_raw("m", "1", b"r" * 16)[0] == ANSWER


def test_the_cache_maps_the_segment_it_is_given_and_serves_without_one_it_cannot(segment: Path, tmp_path: Path) -> None:
    cache = build_cache(CacheConfig(enabled=True), str(segment))
    assert cache is not None and cache.snapshot()["host"]["path"] == str(segment)
    assert "host" not in build_cache(CacheConfig(enabled=True)).snapshot()  # type: ignore[union-attr]
    gone = build_cache(CacheConfig(enabled=True), str(tmp_path / "removed"))  # a worker restarted after a cleanup
    assert gone is not None and "host" not in gone.snapshot()


# -- claims: single flight across workers -----------------------------------------------------


def same_bucket_keys(n: int) -> list[bytes]:
    """``n`` keys whose claims fall in one bucket (the bucket comes from bytes 8-12)."""
    return [bytes([i]) * 8 + b"\0\0\0\0" + bytes([i]) * 4 for i in range(1, n + 1)]


def test_a_claim_is_seen_by_other_workers_until_released(worker: Open) -> None:
    one, two = worker(), worker()
    assert one.claim(key(1), until=30.0, now=0.0) is None  # one computes it
    held = two.claim(key(1), until=30.0, now=0.0)
    assert held is not None and held.state == host.COMPUTING and held.pid == os.getpid()
    assert two.look(key(1), now=1.0) == held
    assert two.look(key(2), now=1.0) is None
    assert one.claim(key(1), until=30.0, now=0.0) is None  # its own claim: taken again
    one.release(key(1))
    assert two.look(key(1), now=1.0) is None
    assert two.claim(key(1), until=30.0, now=1.0) is None  # free: two claims it
    assert one.look(key(1), now=1.0) is not None
    two.release(key(1))
    assert one.stats()["claims"] == 2 and two.stats()["claims"] == 1


def test_a_claim_past_its_time_is_taken_over(worker: Open) -> None:
    one, two = worker(), worker()
    assert one.claim(key(1), until=30.0, now=0.0) is None
    assert two.look(key(1), now=30.0) is None
    assert two.claim(key(1), until=60.0, now=30.0) is None
    one.release(key(1))  # no longer its claim: left alone
    assert one.look(key(1), now=31.0) is not None


def _claim_and_die(path: str, claimed: multiprocessing.synchronize.Event) -> None:
    store = HostStore(path)
    store.claim(key(1), until=1e12, now=0.0)
    claimed.set()
    os._exit(0)  # no release: a worker killed mid-computation


def test_a_claim_of_a_dead_worker_is_taken_over(segment: Path, worker: Open) -> None:
    ctx = multiprocessing.get_context("spawn")
    claimed = ctx.Event()
    other = ctx.Process(target=_claim_and_die, args=(str(segment), claimed))
    other.start()
    assert claimed.wait(30)
    other.join(30)
    store = worker()
    assert store.look(key(1), now=0.0) is None
    assert store.claim(key(1), until=30.0, now=0.0) is None


def test_a_failure_is_read_by_the_followers_then_a_new_request_computes_afresh(worker: Open) -> None:
    one, two = worker(), worker()
    one.claim(key(1), until=30.0, now=0.0)
    one.fail(key(1), until=2.0, status=400, kind="UpstreamError", message="bad input: " + "é" * 200)
    failed = two.look(key(1), now=1.0)
    assert failed is not None and failed.state == host.FAILED
    assert (failed.status, failed.kind) == (400, "UpstreamError")
    assert failed.message.startswith("bad input: é") and len(failed.message.encode()) <= host.MESSAGE_BYTES
    assert two.look(key(1), now=2.0) is None  # past its time
    assert two.claim(key(1), until=30.0, now=1.0) is None  # errors are not cached: computed anew
    assert one.look(key(1), now=1.0).state == host.COMPUTING  # type: ignore[union-attr]
    two.end(key(1), until=3.0)  # ended without an answer in the log
    assert one.look(key(1), now=2.0).state == host.ENDED  # type: ignore[union-attr]
    assert one.claim(key(1), until=30.0, now=2.0) is None  # a new request claims it anew


def test_with_a_full_bucket_a_key_is_computed_without_a_claim(worker: Open) -> None:
    one, two = worker(), worker()
    keys = same_bucket_keys(host.CLAIM_WAYS + 1)
    for k in keys[:-1]:
        assert one.claim(k, until=30.0, now=0.0) is None
    assert two.claim(keys[-1], until=30.0, now=0.0) is host.UNCLAIMED and two.stats()["unclaimed"] == 1
    assert one.look(keys[-1], now=0.0) is None  # nobody claims it: each worker computes it
    one.release(keys[0])
    assert two.claim(keys[-1], until=30.0, now=0.0) is None and two.stats()["claims"] == 1


@pytest.mark.parametrize("why", ["bucket full", "claims busy"])
async def test_a_key_no_claim_could_be_taken_for_is_computed_without_one(
    worker: Open, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    one, two = worker(), worker()
    if why == "bucket full":
        keys = same_bucket_keys(host.CLAIM_WAYS + 1)
        for k in keys[:-1]:
            assert one.claim(k, until=30.0, now=0.0) is None
        wanted = keys[-1]
    else:
        wanted = key(1)

        def busy(*args: Any) -> None:
            raise BlockingIOError("another worker is changing the claims")

        monkeypatch.setattr(two, "claim", busy)
    flight = host_flight.HostFlight(two, lambda: 0.0, 30.0)
    asked: list[bool] = []

    async def compute(claimed: bool) -> tuple[str, bool]:
        asked.append(claimed)
        return "answer", False

    assert await flight.do(wanted, lambda: None, compute, lambda: False) == ("answer", host_flight.COMPUTED)
    assert asked == [False]  # its entry is not written as a claim holder's, which waits for the log's lock
    assert two.stats()["unclaimed"] == 1 and not flight._held  # nothing renewed for a claim it never had


class Upstream:
    """A computation the test releases: counts its calls, answers ``answer`` (``result()`` by
    default); the first call released after ``error`` is set fails with it."""

    def __init__(self, answer: BatchResult | None = None) -> None:
        self.calls = 0
        self.go = asyncio.Event()
        self.error: BaseException | None = None
        self.answer = answer or result()

    async def __call__(self, abandoned) -> BatchResult:  # noqa: ANN001
        self.calls += 1
        await self.go.wait()
        error, self.error = self.error, None
        if error is not None:
            raise error
        return self.answer


KEY = b"k" * 16


def asking(cache: ResponseCache, upstream: Upstream, **options: Any) -> asyncio.Future[tuple[BatchResult, str]]:
    """A request for ``KEY`` to ``cache``, running."""
    return asyncio.ensure_future(cache.get_or_compute("m", "1", KEY, upstream, **options))


async def leading(cache: ResponseCache, upstream: Upstream) -> asyncio.Future[tuple[BatchResult, str]]:
    """A request for ``KEY`` to ``cache``, running, once its worker has claimed the key."""
    first = asking(cache, upstream)
    for _ in range(500):
        if cache.snapshot()["host"]["claims"]:
            return first
        await asyncio.sleep(0.001)
    first.cancel()
    raise AssertionError("the key was never claimed")


async def test_identical_requests_on_two_workers_are_computed_once(worker: Open) -> None:
    one, two = workers(worker)
    upstream = Upstream()
    first = await leading(one, upstream)
    second = asking(two, upstream)
    third = asking(two, upstream)  # two's own follower
    await asyncio.sleep(0.02)  # two polls meanwhile
    upstream.go.set()
    (a, source_a, _), (b, source_b, _), (c, source_c, _) = await asyncio.gather(first, second, third)
    assert upstream.calls == 1 and (source_a, source_b, source_c) == ("miss", "coalesced", "coalesced")
    np.testing.assert_array_equal(b.outputs[0].data, a.outputs[0].data)
    stats = two.snapshot()["models"]["m"]
    assert (stats["misses"], stats["coalesced"], stats["host_coalesced"], stats["host_hits"]) == (0, 2, 1, 0)
    assert (await asking(two, upstream))[1] == "hit"  # kept in two's store


async def test_a_leaders_failure_reaches_the_other_workers_as_the_same_error(worker: Open) -> None:
    one, two = workers(worker)
    upstream = Upstream()
    upstream.error = UpstreamError("[400] unexpected shape for input 'x'", status=400)
    first = await leading(one, upstream)
    second = asking(two, upstream)
    await asyncio.sleep(0.02)
    upstream.go.set()
    errors = await asyncio.gather(first, second, return_exceptions=True)
    assert upstream.calls == 1
    for error in errors:
        assert isinstance(error, UpstreamError) and error.status == 400
        assert str(error) == "[400] unexpected shape for input 'x'"
    # The other worker's copy is marked shared: a rollout counts the failure once, where computed.
    assert [error.shared for error in errors] == [False, True]
    # Errors are not cached: the next request computes.
    assert (await asking(two, upstream))[1] == "miss" and upstream.calls == 2


LEADERS_OWN_ERRORS = {
    "its queue full": Unavailable("model 'm' is overloaded: its queue is full, try again later"),
    "its view of the fleet": UpstreamError("[400] Request for unknown model: 'm' version 1 is not found", status=400),
    "its own fault": UpstreamError("internal error while serving 'm': boom", status=500),
}


@pytest.mark.parametrize("ending", [*LEADERS_OWN_ERRORS, "cancelled"])
async def test_a_leader_that_ends_without_an_answer_lets_another_worker_compute_at_once(worker: Open, ending: str) -> None:
    """An error of the leader worker's own state is not handed to the other workers' clients:
    they compute the key themselves, without waiting for another claim."""
    one, two = workers(worker)
    upstream = Upstream()
    first = await leading(one, upstream)
    second = asking(two, upstream)
    await asyncio.sleep(0.02)
    assert upstream.calls == 1
    if ending == "cancelled":
        first.cancel()
    else:
        upstream.error = LEADERS_OWN_ERRORS[ending]
        upstream.go.set()
    with pytest.raises((asyncio.CancelledError, Unavailable, UpstreamError)):
        await first
    for _ in range(500):
        if upstream.calls == 2:
            break
        await asyncio.sleep(0.001)
    assert upstream.calls == 2 and two.snapshot()["host"]["claims"] == 0  # computing, unclaimed
    upstream.go.set()
    got, source, _ = await asyncio.wait_for(second, 5)
    assert source == "miss"
    np.testing.assert_array_equal(got.outputs[0].data, result().outputs[0].data)


async def test_answers_too_large_for_the_log_are_computed_by_each_worker_at_once(worker: Open) -> None:
    """A follower learns at the leader's end that its answer could not be shared, and computes
    (not in turn after each other); the next misses of that model take no claim."""
    one, two, three = workers(worker, 3)
    big = BatchResult("1", [Tensor("y", "FP32", np.ones((1, 4096), np.float32))])  # 16 KiB: over an eighth of the log
    upstream = Upstream(big)
    first = await leading(one, upstream)
    followers = [asking(c, upstream) for c in (two, three)]
    await asyncio.sleep(0.02)
    assert upstream.calls == 1
    upstream.go.set()
    assert (await first)[1] == "miss"
    upstream.go.clear()
    for _ in range(500):
        if upstream.calls == 3:
            break
        await asyncio.sleep(0.001)
    assert upstream.calls == 3  # both followers computing at once
    upstream.go.set()
    assert [(await f)[1] for f in followers] == ["miss", "miss"]
    claims = one.snapshot()["host"]["claims"]
    assert (await one.get_or_compute("m", "1", b"j" * 16, upstream))[1] == "miss"
    assert one.snapshot()["host"]["claims"] == claims  # no claim for a model whose answers do not fit


async def test_a_cache_closed_while_its_leader_computes_still_answers(worker: Open) -> None:
    one, two = workers(worker)
    upstream = Upstream()
    first = await leading(one, upstream)
    await one.close()  # shutting down: the segment unmapped under the computation
    upstream.go.set()
    got, source, _ = await first
    assert source == "miss"
    np.testing.assert_array_equal(got.outputs[0].data, result().outputs[0].data)
    assert (await one.get_or_compute("m", "1", b"q" * 16, upstream))[1] == "miss"  # no host tier left


def claim_key(n: int) -> bytes:
    """Key ``n`` of ``host.CLAIM_SLOTS``, spread so that each bucket of claims gets exactly its
    ways' worth."""
    buckets = host.CLAIM_SLOTS // host.CLAIM_WAYS
    return key(n)[:8] + (n % buckets).to_bytes(4, "little") + key(n)[12:]


def _race_claims(path: str, start: multiprocessing.synchronize.Event) -> list[int]:
    """A worker racing the others, key by key in the same order, to claim every slot's worth of
    keys; the keys it won."""
    store = HostStore(path)
    start.wait(30)
    won = []
    for n in range(host.CLAIM_SLOTS):
        while True:
            try:
                if store.claim(claim_key(n), until=1e12, now=0.0) is None:
                    won.append(n)
                break
            except BlockingIOError:
                continue
    store.close()
    return won


def test_a_claim_while_another_worker_changes_the_claims_is_not_waited_for(segment: Path, worker: Open) -> None:
    """Claims change under the lock of the segment's second byte: while another process holds
    it, a claim says so at once (the caller tries again after an event-loop turn); the log's
    lock is another one."""
    store = worker()
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_write_lock, args=(str(segment), held, release, 1))
    other.start()
    try:
        assert held.wait(30)
        with pytest.raises(BlockingIOError):
            store.claim(key(1), until=30.0, now=0.0)
        assert put(store, 1, b"answer")  # the log's lock is free
    finally:
        release.set()
        other.join(30)
    assert store.claim(key(1), until=30.0, now=0.0) is None and store.stats()["claims"] == 1


def test_racing_workers_claim_each_key_once(segment: Path) -> None:
    """A smoke test of the whole, like the one of reads and writes above: the test before pins
    the lock down."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Event()
        with ctx.Pool(4) as pool:
            pending = pool.starmap_async(_race_claims, [(str(segment), start) for _ in range(4)])
            start.set()
            won = pending.get(60)
    winners = sorted(n for w in won for n in w)
    assert winners == list(range(host.CLAIM_SLOTS))  # every key claimed, by exactly one worker


async def test_a_follower_whose_clients_left_stops_waiting_and_the_leader_goes_on(worker: Open) -> None:
    one, two = workers(worker)
    upstream = Upstream()
    first = await leading(one, upstream)
    left = False
    second = asking(two, upstream, gone=lambda: left)
    await asyncio.sleep(0.02)
    left = True
    with pytest.raises(ClientGone):
        await asyncio.wait_for(second, 5)
    upstream.go.set()
    assert (await first)[1] == "miss" and upstream.calls == 1


async def test_an_answer_computed_across_a_version_drop_is_not_handed_to_the_other_workers(worker: Open) -> None:
    one, two = workers(worker)
    upstream = Upstream()
    first = await leading(one, upstream)
    second = asking(two, upstream)
    await asyncio.sleep(0.02)
    two.drop_version("m", "1")  # version 1 reloaded meanwhile: one's answer may be the old one's
    upstream.go.set()
    await first
    assert (await asyncio.wait_for(second, 5))[1] == "miss" and upstream.calls == 2


async def test_a_leader_computing_longer_than_its_lease_keeps_its_claim(worker: Open, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_flight, "LEASE_S", 0.1)
    monkeypatch.setattr(host_flight, "RENEW_S", 0.02)
    one, two = workers(worker)
    upstream = Upstream()
    first = await leading(one, upstream)
    second = asking(two, upstream)
    await asyncio.sleep(0.5)  # five leases: renewed all along
    assert upstream.calls == 1 and not second.done()
    upstream.go.set()
    assert [(await f)[1] for f in (first, second)] == ["miss", "coalesced"] and upstream.calls == 1


# A worker that claims KEY and computes it forever, renewing its claim as its event loop runs.
STUCK_LEADER = """
import asyncio, sys
from gateway.cache import ResponseCache, host_flight
from gateway.cache.host import HostStore
from gateway.config import CacheConfig

host_flight.LEASE_S, host_flight.RENEW_S = float(sys.argv[2]), float(sys.argv[3])

async def compute(abandoned):
    print("computing", flush=True)
    await asyncio.Event().wait()

async def main():
    cache = ResponseCache(CacheConfig(enabled=True, ttl_s=30.0), host=HostStore(sys.argv[1]))
    await cache.get_or_compute("m", "1", %r, compute)

asyncio.run(main())
""" % KEY


async def test_a_leader_whose_event_loop_stops_is_taken_over_within_its_lease(segment: Path, worker: Open) -> None:
    """A live process that no longer runs (stopped, its event loop stuck) keeps its claim only
    until its lease lapses, not for the whole ``lifetime``."""
    lease, renew = 0.3, 0.05
    leader = subprocess.Popen(
        [sys.executable, "-c", STUCK_LEADER, str(segment), str(lease), str(renew)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == "computing"
        view = worker()
        claim = view.look(KEY, time.monotonic())
        assert claim is not None and claim.pid == leader.pid
        (two,) = workers(worker, 1)
        upstream = Upstream()
        upstream.go.set()
        follower = asking(two, upstream)
        await asyncio.sleep(4 * lease)
        assert upstream.calls == 0 and not follower.done()  # the leader renews its claim
        # Stop the leader between two renewals (not inside one, which holds the claims' lock).
        until = view.look(KEY, time.monotonic()).until
        while (seen := view.look(KEY, time.monotonic())) is not None and seen.until == until:
            await asyncio.sleep(0.001)
        await asyncio.sleep(renew / 2)
        leader.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        got, source, _ = await asyncio.wait_for(follower, 5)
        waited = time.monotonic() - stopped
        assert source == "miss" and upstream.calls == 1 and waited < lease + 0.5
        np.testing.assert_array_equal(got.outputs[0].data, result().outputs[0].data)
    finally:
        leader.kill()
        leader.wait(10)
        leader.stdout.close()
