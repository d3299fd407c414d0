"""The host tier (gateway/cache/host.py): one store in shared memory for a host's worker
processes. Several ``HostStore`` views of one segment stand for the workers; the last tests run
real processes against one segment and the response cache on top of it."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
from pathlib import Path

import numpy as np
import pytest

from gateway.batcher import BatchResult
from gateway.cache import RawAnswer, ResponseCache, build_cache
from gateway.cache import host
from gateway.cache.host import PREFIX, HostStore, create_segment, remove_segment
from gateway.config import CacheConfig
from gateway.tensors import Tensor


@pytest.fixture
def segment(tmp_path: Path) -> Path:
    path = create_segment(64 * 1024, str(tmp_path))
    assert path is not None
    return path


def key(n: int) -> bytes:
    return hashlib.blake2b(b"%d" % n, digest_size=16).digest()


def value(n: int, length: int) -> bytes:
    """Bytes that say which key they belong to, of any length: a reader can tell a wrong answer."""
    pattern = hashlib.sha256(b"%d" % n).digest()
    return (pattern * (length // 32 + 1))[:length]


def test_what_one_worker_stores_another_reads(segment: Path) -> None:
    one, two = HostStore(segment), HostStore(segment)
    gen = one.generation("m", "1")
    assert one.put(key(1), gen, b"answer", expires=50.0)
    assert two.get(key(1), "m", "1", now=10.0) == (b"answer", 50.0)
    assert two.get(key(2), "m", "1", now=10.0) is None
    assert one.put(key(1), gen, b"newer", expires=60.0)  # the same key again: the newer entry
    assert two.get(key(1), "m", "1", now=10.0) == (b"newer", 60.0)
    assert two.stats()["hits"] == 2 and one.stats()["writes"] == 2 == two.stats()["writes"]


def test_an_entry_expires(segment: Path) -> None:
    store = HostStore(segment)
    store.put(key(1), store.generation("m", "1"), b"answer", expires=50.0)
    assert store.get(key(1), "m", "1", now=49.9) is not None
    assert store.get(key(1), "m", "1", now=50.0) is None


def test_a_bump_hides_the_versions_entries_from_every_worker(segment: Path) -> None:
    one, two = HostStore(segment), HostStore(segment)
    before = one.generation("m", "1")
    one.put(key(1), before, b"old", expires=50.0)
    one.put(key(2), one.generation("m", "2"), b"other version", expires=50.0)
    two.bump("m", "1")
    assert one.get(key(1), "m", "1", now=0.0) is None
    assert one.get(key(2), "m", "2", now=0.0) == (b"other version", 50.0)
    # An answer computed before the bump and stored after it stays hidden.
    one.put(key(3), before, b"computed before the drop", expires=50.0)
    assert two.get(key(3), "m", "1", now=0.0) is None
    one.put(key(3), one.generation("m", "1"), b"computed after", expires=50.0)
    assert two.get(key(3), "m", "1", now=0.0) == (b"computed after", 50.0)


def test_the_log_is_bounded_oldest_entries_go_first_and_no_key_reads_anothers_bytes(segment: Path) -> None:
    store = HostStore(segment)
    gen = store.generation("m", "1")
    for n in range(1000):  # about eight times the log
        assert store.put(key(n), gen, value(n, 500), expires=50.0)
    stats = store.stats()
    assert stats["bytes_written"] > 7 * stats["capacity"]
    found = {n: store.get(key(n), "m", "1", now=0.0) for n in range(1000)}
    for n, got in found.items():
        assert got is None or got[0] == value(n, 500), n
    assert all(found[n] is None for n in range(800))  # overwritten
    assert sum(found[n] is not None for n in range(900, 1000)) >= 80  # the newest, but for full buckets


def test_an_entry_too_large_for_the_log_is_not_stored(segment: Path) -> None:
    store = HostStore(segment)
    assert not store.put(key(1), 0, bytes(store.capacity // 8), expires=50.0)
    assert store.get(key(1), "m", "1", now=0.0) is None and store.stats()["writes"] == 0


def test_damaged_bytes_read_as_a_miss(segment: Path) -> None:
    store = HostStore(segment)
    store.put(key(1), store.generation("m", "1"), b"answer", expires=50.0)
    raw = bytearray(segment.read_bytes())
    at = raw.find(b"answer")
    raw[at] ^= 0xFF
    segment.write_bytes(bytes(raw))
    assert store.get(key(1), "m", "1", now=0.0) is None and store.stats()["stale"] == 1


def test_a_file_that_is_not_a_segment_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other"
    path.write_bytes(bytes(65536))
    with pytest.raises(ValueError, match="not a gateway cache segment"):
        HostStore(path)


def test_segments_left_by_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = multiprocessing.get_context("spawn").Process(target=os.getpid)
    dead.start()
    dead.join()
    stale = tmp_path / f"{PREFIX}{dead.pid}-0000"
    mine = tmp_path / f"{PREFIX}{os.getpid()}-0000"
    stale.write_bytes(b"x")
    mine.write_bytes(b"x")
    made = create_segment(65536, str(tmp_path))
    assert not stale.exists() and mine.exists() and made.name.startswith(f"{PREFIX}{os.getpid()}-")
    remove_segment(made)
    assert not made.exists()


def test_a_segment_shrinks_to_the_room_there_is_and_reserves_its_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "free_bytes", lambda folder: 12 * 1024 * 1024)  # a small /dev/shm
    path = create_segment(256 * 1024 * 1024, str(tmp_path))
    assert path is not None
    store = HostStore(path)
    assert store.capacity == 4 * 1024 * 1024  # halved until the segment takes at most half the room
    assert os.stat(path).st_blocks * 512 >= store.capacity  # reserved, not a sparse file
    monkeypatch.setattr(host, "free_bytes", lambda folder: 2 * 1024 * 1024)
    assert create_segment(256 * 1024 * 1024, str(tmp_path)) is None  # not even the smallest fits
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


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
            writes += store.put(key(n), gen, value(n, rng.randrange(1, 2000)), expires=1e12)
        else:
            got = store.get(key(n), "m", "1", now=0.0)
            if got is not None:
                hits += 1
                wrong += got[0] != value(n, len(got[0]))
    store.close()
    return hits, wrong, writes


def test_workers_reading_and_writing_at_once_never_read_a_wrong_answer(segment: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_hammer, [(str(segment), seed, 30000) for seed in range(3)])
    hits, wrong, writes = (sum(r[i] for r in results) for i in range(3))
    assert wrong == 0
    assert hits > 1000 and writes > 10000
    assert HostStore(segment).stats()["bytes_written"] > 50 * 64 * 1024  # wrapped many times


# -- the response cache on top of it ----------------------------------------------------------


def result() -> BatchResult:
    return BatchResult("1", [Tensor("y", "FP32", np.arange(4, dtype=np.float32).reshape(1, 4))])


def workers(segment: Path, n: int = 2) -> list[ResponseCache]:
    config = CacheConfig(enabled=True, ttl_s=30.0)
    return [ResponseCache(config, host=HostStore(segment)) for _ in range(n)]


async def test_a_result_one_worker_computed_is_a_hit_on_another(segment: Path) -> None:
    one, two = workers(segment)
    calls = 0

    async def compute(abandoned) -> BatchResult:  # noqa: ANN001
        nonlocal calls
        calls += 1
        return result()

    assert (await one.get_or_compute("m", "1", b"k" * 16, compute))[1] == "miss"
    got, source = await two.get_or_compute("m", "1", b"k" * 16, compute)
    assert source == "hit" and calls == 1
    np.testing.assert_array_equal(got.outputs[0].data, result().outputs[0].data)
    assert (await two.get_or_compute("m", "1", b"k" * 16, compute))[1] == "hit"  # now held in the process
    stats = two.snapshot()["models"]["m"]
    assert (stats["hits"], stats["host_hits"], stats["entries"]) == (2, 1, 1)
    assert two.snapshot()["host"]["writes"] == 1


async def test_a_raw_answer_one_worker_kept_answers_anothers_client(segment: Path) -> None:
    one, two = workers(segment)
    answer = RawAnswer(
        ((b"content-type", b"application/json"), (b"x-cache", b"hit"), (b"content-length", b"9")), b'{"a": 1}\n'
    )
    assert one.put_raw("m", "1", b"r" * 16, answer, one.epoch("m", "1"))
    got = two.get_raw("m", "1", b"r" * 16)
    assert got == answer and got.head == answer.head
    stats = two.snapshot()["models"]["m"]
    assert (stats["hits"], stats["raw_hits"], stats["host_hits"]) == (1, 1, 1)
    assert two.get_raw("m", "2", b"q" * 16) is None


async def test_an_answer_computed_across_a_drop_on_another_worker_is_not_shared(segment: Path) -> None:
    one, two = workers(segment)
    answer = RawAnswer(((b"content-length", b"2"),), b"{}")
    epoch = one.epoch("m", "1")
    two.drop_version("m", "1")  # another worker saw version 1 reloaded meanwhile
    one.put_raw("m", "1", b"r" * 16, answer, epoch)
    assert two.get_raw("m", "1", b"r" * 16) is None
    assert one.put_raw("m", "1", b"r" * 16, answer, one.epoch("m", "1"))
    assert two.get_raw("m", "1", b"r" * 16) == answer


def test_the_cache_maps_the_segment_it_is_given(segment: Path) -> None:
    cache = build_cache(CacheConfig(enabled=True), str(segment))
    assert cache is not None and cache.snapshot()["host"]["path"] == str(segment)
    assert "host" not in build_cache(CacheConfig(enabled=True)).snapshot()  # type: ignore[union-attr]
