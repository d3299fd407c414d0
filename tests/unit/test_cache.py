"""The response cache: keys, the byte-bounded LRU with TTL (a fake clock), single-flight, the
shared-tier entry format, and the facade with a fake shared tier (no network)."""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest

from gateway.batcher import BatchResult
from gateway.cache import Freshness, ResponseCache, cacheable, keys, raw_key, request_key
from gateway.cache.entry import decode_entry, encode_entry
from gateway.cache.flight import SingleFlight
from gateway.cache.store import ENTRY_OVERHEAD, CacheStore, result_size
from gateway.config import CacheConfig
from gateway.errors import ClientGone, NotCached, Unavailable, UpstreamError
from gateway.protocol import msgpack as msgpack_codec
from gateway.protocol import v2
from gateway.tensors import InferRequest, RequestedOutput, Tensor, pack_tensors
from gateway.upstream.client import InstanceUnreachable


def tensor(values: list[float], name: str = "x", shape: tuple[int, ...] | None = None) -> Tensor:
    data = np.asarray(values, np.float32)
    return Tensor(name, "FP32", data.reshape(shape) if shape else data.reshape(1, -1))


def result(nbytes: int = 40, version: str = "1") -> BatchResult:
    return BatchResult(version, [Tensor("y", "FP32", np.zeros(nbytes // 4, np.float32))])


def valued(value: float) -> BatchResult:
    return BatchResult("1", [Tensor("y", "FP32", np.full((1, 2), value, np.float32))])


# -- keys -----------------------------------------------------------------------------------------


def test_the_key_depends_on_everything_that_decides_the_answer() -> None:
    base = request_key("m", "1", [tensor([1, 2, 3, 4])])
    assert base == request_key("m", "1", [tensor([1, 2, 3, 4])]) and len(base) == 16
    others = [
        request_key("n", "1", [tensor([1, 2, 3, 4])]),
        request_key("m", "2", [tensor([1, 2, 3, 4])]),
        request_key("m", "1", [tensor([1, 2, 3, 5])]),
        request_key("m", "1", [tensor([1, 2, 3, 4], shape=(2, 2))]),
        request_key("m", "1", [tensor([1, 2, 3, 4], name="z")]),
        request_key("m", "1", [Tensor("x", "INT32", np.asarray([[1, 2, 3, 4]], np.int32))]),
    ]
    assert len({base, *others}) == 7


def test_the_raw_key_depends_on_every_field_and_on_where_one_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "MAX_RAW_PREFIXES", 4)  # the remembered prefixes start over often
    base = ("m", "1", b"application/octet-stream", b"12", b"body")
    variants = [
        ("n", "1", b"application/octet-stream", b"12", b"body"),
        ("m", "2", b"application/octet-stream", b"12", b"body"),
        ("m", "1", b"application/json", b"12", b"body"),
        ("m", "1", b"application/octet-stream", b"13", b"body"),
        ("m", "1", b"application/octet-stream", None, b"body"),
        ("m", "1", b"application/octet-stream", b"", b"body"),
        ("m", "1", b"application/octet-stream", b"12", b"bodz"),
        ("m1", "", b"application/octet-stream", b"12", b"body"),  # the same bytes split elsewhere
        ("m", "1", b"application/octet-stream", b"1", b"2body"),
    ]
    first, again = [], []
    for args in [base, *variants]:
        first.append(raw_key(*args))
        assert args[:4] in keys._RAW_PREFIXES  # remembered...
        again.append(raw_key(*args))  # ...and used
    assert first == again
    assert len(set(first)) == len(first) and all(len(k) == 16 for k in first)
    assert len(keys._RAW_PREFIXES) <= 4
    long_type = b"application/" + b"x" * 300  # the client's header: computed, not remembered
    assert raw_key("m", "1", long_type, None, b"body") == raw_key("m", "1", long_type, None, b"body")
    assert ("m", "1", long_type, None) not in keys._RAW_PREFIXES


def test_json_binary_and_msgpack_requests_for_the_same_tensors_share_a_key() -> None:
    x = np.random.default_rng(0).random((2, 3)).astype(np.float32)
    as_json = v2.decode_request(
        ('{"inputs":[{"name":"x","datatype":"FP32","shape":[2,3],"data":%s}]}' % x.ravel().tolist()).encode(), None, "m", "1"
    )
    header = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2,3],"parameters":{"binary_data_size":24}}]}'
    as_binary = v2.decode_request(header + x.tobytes(), len(header), "m", "1")
    as_msgpack = msgpack_codec.decode_request(msgpack_codec.encode_request([Tensor("x", "FP32", x)]), "m", "1")
    keys = {request_key("m", "1", r.inputs) for r in (as_json, as_binary, as_msgpack)}
    assert len(keys) == 1


def test_bytes_tensors_are_keyed_by_their_elements() -> None:
    a = Tensor("s", "BYTES", np.asarray([[b"ab", b"c"]], dtype=object))
    b = Tensor("s", "BYTES", np.asarray([[b"a", b"bc"]], dtype=object))
    assert request_key("m", "1", [a]) != request_key("m", "1", [b])


def test_only_requests_without_answer_changing_parameters_are_cacheable() -> None:
    plain = InferRequest("m", "1", [tensor([1])], [RequestedOutput("y", parameters={"binary_data": True})])
    assert cacheable(plain)
    assert not cacheable(InferRequest("m", "1", [tensor([1])], parameters={"priority": 1}))
    assert not cacheable(InferRequest("m", "1", [tensor([1])], [RequestedOutput("y", parameters={"custom": 2})]))
    assert cacheable(InferRequest("m", "1", [tensor([1])], [RequestedOutput("y", class_count=2)]))


def test_a_classification_is_keyed_by_the_outputs_and_class_counts_asked_for() -> None:
    inputs = [tensor([1])]
    keys = {
        request_key("m", "1", inputs),
        request_key("m", "1", inputs, [RequestedOutput("y", class_count=2)]),
        request_key("m", "1", inputs, [RequestedOutput("y", class_count=3)]),
        request_key("m", "1", inputs, [RequestedOutput("z", class_count=2)]),
        request_key("m", "1", inputs, [RequestedOutput("y", class_count=2), RequestedOutput("z")]),
    }
    assert len(keys) == 5
    # How the answer is presented (binary or JSON) is no part of it.
    assert request_key("m", "1", inputs, [RequestedOutput("y", True, class_count=2)]) == request_key(
        "m", "1", inputs, [RequestedOutput("y", False, class_count=2)]
    )


# -- store ----------------------------------------------------------------------------------------


def test_an_entry_of_strings_counts_their_bytes() -> None:
    strings = np.array([[b"0.999840:7", b"x" * 1000]], dtype=object)
    size = result_size(BatchResult("1", [Tensor("top", "BYTES", strings)]))
    assert size == ENTRY_OVERHEAD + strings.nbytes + 1010


def test_entries_expire_after_their_ttl() -> None:
    store = CacheStore(10_000)
    store.put(b"k", result(), "m", "1", expires=10.0, model_max_bytes=10_000)
    assert store.get(b"k", 9.9) is not None
    assert store.get(b"k", 10.0) is None and store.bytes == 0 and store.model_stats("m").entries == 0


def test_the_byte_bound_evicts_the_least_recently_used() -> None:
    size = 40 + ENTRY_OVERHEAD
    store = CacheStore(3 * size)
    for k in (b"a", b"b", b"c"):
        store.put(k, result(), "m", "1", 100.0, 10**9)
    assert store.get(b"a", 0.0) is not None  # a is now the most recently used
    store.put(b"d", result(), "m", "1", 100.0, 10**9)
    assert store.get(b"b", 0.0) is None and all(store.get(k, 0.0) is not None for k in (b"a", b"c", b"d"))
    stats = store.model_stats("m")
    assert (stats.evictions, stats.entries, stats.bytes, store.bytes) == (1, 3, 3 * size, 3 * size)


def test_a_models_share_bounds_its_own_entries_only() -> None:
    size = 40 + ENTRY_OVERHEAD
    store = CacheStore(10 * size)
    store.put(b"other", result(), "n", "1", 100.0, 10**9)
    for i in range(5):
        store.put(bytes([i]), result(), "m", "1", 100.0, 2 * size)
    assert store.model_stats("m").entries == 2 and store.model_stats("m").evictions == 3
    assert store.get(b"other", 0.0) is not None
    assert not store.put(b"huge", result(10 * size), "m", "1", 100.0, 2 * size)  # never fits


def test_dropping_a_version_removes_only_its_entries() -> None:
    store = CacheStore(10**6)
    store.put(b"1", result(), "m", "1", 100.0, 10**6)
    store.put(b"2", result(version="2"), "m", "2", 100.0, 10**6)
    assert store.drop_version("m", "1") == 1
    assert store.get(b"1", 0.0) is None and store.get(b"2", 0.0) is not None


# -- single flight --------------------------------------------------------------------------------


async def test_identical_requests_in_flight_share_one_computation() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def compute(abandoned) -> int:  # noqa: ANN001
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    tasks = [asyncio.create_task(flight.do(b"k", compute)) for _ in range(100)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1 and results[0] == (42, False) and all(r == (42, True) for r in results[1:])
    assert len(flight) == 0


async def test_a_cancelled_follower_does_not_disturb_the_leader_or_the_others() -> None:
    flight: SingleFlight[int] = SingleFlight()
    release = asyncio.Event()

    async def compute(abandoned) -> int:  # noqa: ANN001
        await release.wait()
        return 7

    leader = asyncio.create_task(flight.do(b"k", compute))
    follower = asyncio.create_task(flight.do(b"k", compute))
    other = asyncio.create_task(flight.do(b"k", compute))
    await asyncio.sleep(0)
    follower.cancel()
    leader_gone = asyncio.create_task(flight.do(b"k", compute))
    await asyncio.sleep(0)
    leader_gone.cancel()
    await asyncio.sleep(0)
    release.set()
    assert (await leader)[0] == 7 and (await other)[0] == 7
    assert follower.cancelled() and leader_gone.cancelled()


async def test_a_cancelled_leader_hands_the_computation_over_to_the_others() -> None:
    """A leader without a deadline computes in its own task; if it is cancelled all the same
    (the gateway stopping), those still waiting get their answer from the computation started
    again for them."""
    flight: SingleFlight[int] = SingleFlight()
    release = asyncio.Event()
    calls = 0

    async def compute(abandoned) -> int:  # noqa: ANN001
        nonlocal calls
        calls += 1
        await release.wait()
        return 7 * calls

    leader = asyncio.create_task(flight.do(b"k", compute))
    await asyncio.sleep(0)
    followers = [asyncio.create_task(flight.do(b"k", compute)) for _ in range(2)]
    await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    late = asyncio.create_task(flight.do(b"k", compute))  # joins the computation handed over
    await asyncio.sleep(0)
    release.set()
    assert [await f for f in followers] == [(14, True), (14, True)] and await late == (14, True)
    assert leader.cancelled() and calls == 2 and len(flight) == 0


async def test_a_cancelled_leader_alone_ends_its_flight_and_a_handed_over_failure_reaches_the_others() -> None:
    flight: SingleFlight[int] = SingleFlight()
    release = asyncio.Event()
    calls = 0

    async def compute(abandoned) -> int:  # noqa: ANN001
        nonlocal calls
        calls += 1
        await release.wait()
        if calls > 1:
            raise UpstreamError("model failed", status=502)
        return 1

    alone = asyncio.create_task(flight.do(b"k", compute))
    await asyncio.sleep(0)
    alone.cancel()
    await asyncio.sleep(0)
    assert alone.cancelled() and len(flight) == 0 and calls == 1  # nothing computed again
    leader = asyncio.create_task(flight.do(b"k", compute))
    await asyncio.sleep(0)
    follower = asyncio.create_task(flight.do(b"k", compute))
    await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(UpstreamError, match="model failed"):
        await follower
    assert calls == 3 and len(flight) == 0


async def test_a_leader_with_a_deadline_leaves_its_computation_to_the_others() -> None:
    """A leader that may time out (``detach``) starts the computation in a task of its own: its
    timing out cancels neither that computation nor anyone else's wait."""
    flight: SingleFlight[int] = SingleFlight()
    release = asyncio.Event()
    calls = 0

    async def compute(abandoned) -> int:  # noqa: ANN001
        nonlocal calls
        calls += 1
        await release.wait()
        return 5

    leader = asyncio.create_task(flight.do(b"k", compute, detach=True))
    await asyncio.sleep(0)
    follower = asyncio.create_task(flight.do(b"k", compute))
    await asyncio.sleep(0)
    leader.cancel()  # its deadline passed
    await asyncio.sleep(0)
    release.set()
    assert await follower == (5, True) and calls == 1 and leader.cancelled() and len(flight) == 0


async def test_a_detached_computation_stopped_before_it_ran_answers_its_waiters_503() -> None:
    flight: SingleFlight[int] = SingleFlight()

    async def compute(abandoned) -> int:  # noqa: ANN001
        return 9

    leader = asyncio.create_task(flight.do(b"k", compute, detach=True))
    follower = asyncio.create_task(flight.do(b"k", compute))
    await asyncio.sleep(0)  # the leader started the computation's task, the follower joined it
    (task,) = flight._detached
    task.cancel()  # the gateway stopping, before the computation's first step
    for waiter in (leader, follower):
        with pytest.raises(Unavailable, match="shutting down"):
            await waiter
    assert len(flight) == 0
    assert await flight.do(b"k", compute) == (9, False)  # the key is not stuck


async def test_closing_waits_for_a_detached_computation_then_stops_one_that_will_not_end() -> None:
    flight: SingleFlight[int] = SingleFlight()
    release = asyncio.Event()

    async def finishing(abandoned) -> int:  # noqa: ANN001
        await release.wait()
        return 4

    async def endless(abandoned) -> int:  # noqa: ANN001
        await asyncio.Event().wait()
        return 0

    done = asyncio.create_task(flight.do(b"a", finishing, detach=True))
    stuck = asyncio.create_task(flight.do(b"b", endless, detach=True))
    await asyncio.sleep(0)
    asyncio.get_running_loop().call_later(0.05, release.set)
    await flight.close(timeout=0.3)
    assert not flight._detached  # nothing left pending for the loop to destroy
    assert await done == (4, False)  # finished within the wait: its answer delivered
    with pytest.raises(Unavailable, match="shutting down"):
        await stuck
    assert len(flight) == 0


class Uncopyable(UpstreamError):
    def __init__(self, message: str, extra: int) -> None:  # copy.copy cannot rebuild it
        super().__init__(message, status=502)


async def test_errors_reach_every_waiter_even_when_they_cannot_be_copied() -> None:
    for error in (InstanceUnreachable("no route", connect_failed=True), Uncopyable("odd", 1)):
        flight: SingleFlight[int] = SingleFlight()
        release = asyncio.Event()

        async def compute(abandoned) -> int:  # noqa: ANN001
            await release.wait()
            raise error

        tasks = [asyncio.create_task(flight.do(b"k", compute)) for _ in range(3)]
        await asyncio.sleep(0)
        release.set()
        errors = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.0)
        assert all(type(e) is type(error) and e.message == error.message for e in errors)
        if isinstance(error, InstanceUnreachable):
            assert all(e.connect_failed for e in errors) and len({id(e) for e in errors}) == 3


async def test_a_failure_reaches_every_waiter_as_the_same_error() -> None:
    flight: SingleFlight[int] = SingleFlight()
    release = asyncio.Event()

    async def compute(abandoned) -> int:  # noqa: ANN001
        await release.wait()
        raise UpstreamError("model failed", status=502)

    tasks = [asyncio.create_task(flight.do(b"k", compute)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    errors = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(e, UpstreamError) and e.message == "model failed" and e.status == 502 for e in errors)
    assert len({id(e) for e in errors}) == 3  # each its own copy, each its own traceback


async def test_the_computation_is_told_when_every_waiter_has_gone() -> None:
    flight: SingleFlight[int] = SingleFlight()
    seen: list[bool] = []
    release = asyncio.Event()
    client_left = False

    async def compute(abandoned) -> int:  # noqa: ANN001
        await release.wait()
        seen.append(abandoned())
        return 1

    cancelled = asyncio.create_task(flight.do(b"k", compute))
    disconnected = asyncio.create_task(flight.do(b"k", compute, gone=lambda: client_left))
    await asyncio.sleep(0)
    cancelled.cancel()
    client_left = True
    await asyncio.sleep(0)
    release.set()
    await disconnected
    assert seen == [True]


@pytest.mark.parametrize("probe", [True, False], ids=["disconnect-probe", "no-probe"])
@pytest.mark.parametrize("detach", [False, True])
async def test_a_request_joining_a_computation_dropped_for_want_of_waiters_gets_a_fresh_one(detach: bool, probe: bool) -> None:
    """The leader's client left, so the computation was dropped unsent; a request that joined
    before the drop reached the leader must not be told its own client left (also where the
    server cannot tell whether a client is there: ``gone`` None)."""
    flight: SingleFlight[int] = SingleFlight()
    runs: list[bool] = []
    checked = asyncio.Event()
    joined = asyncio.Event()

    async def compute(abandoned) -> int:  # noqa: ANN001
        runs.append(abandoned())
        if runs[-1]:  # as the batcher does: nobody waits, so the request is not sent
            checked.set()
            await joined.wait()  # the drop takes a turn or two to reach the leader
            raise ClientGone("the client disconnected")
        return 7

    leader = asyncio.create_task(flight.do(b"k", compute, gone=lambda: True, detach=detach))
    await checked.wait()
    follower = asyncio.create_task(flight.do(b"k", compute, gone=(lambda: False) if probe else None))
    await asyncio.sleep(0)
    joined.set()
    assert await asyncio.wait_for(follower, 1) == (7, True)
    if detach:  # the leader waits on the computation like the others (its answer is not sent)
        assert await leader == (7, False)
    else:
        with pytest.raises(ClientGone):
            await leader
    assert runs == [True, False]
    assert len(flight) == 0


# -- entries for the shared tier ------------------------------------------------------------------


def test_entries_round_trip_through_bytes() -> None:
    original = BatchResult(
        "3",
        [Tensor("y", "FP32", np.arange(6, dtype=np.float32).reshape(2, 3)), Tensor("s", "BYTES", np.asarray([b"a", b"bc"], dtype=object))],
        {"note": 1},
    )  # fmt: skip
    copy, born = decode_entry(encode_entry(original, 1700000000.5, b"k" * 16), b"k" * 16)
    assert copy.version == "3" and copy.parameters == {"note": 1} and born == 1700000000.5
    np.testing.assert_array_equal(copy.outputs[0].data, original.outputs[0].data)
    assert list(copy.outputs[1].data) == [b"a", b"bc"]
    with pytest.raises(ValueError):
        decode_entry(b"\x00garbage")
    for never in (float("nan"), float("inf"), float("-inf")):  # a spoilt entry: it would pass for brand new
        with pytest.raises(ValueError, match="computed at"):
            decode_entry(encode_entry(original, never, b"k" * 16))


def test_an_entry_read_for_a_key_is_that_keys_answer() -> None:
    """An entry found under another key (copied there, or written there by anything but a
    gateway) is not that request's answer: refused, a miss."""
    entry = encode_entry(BatchResult("1", [Tensor("y", "FP32", np.ones(2, np.float32))]), 1700000000.5, b"a" * 16)
    assert decode_entry(entry)[0].version == "1"  # read where the key is checked apart (the host tier)
    with pytest.raises(ValueError, match="another key"):
        decode_entry(entry, b"b" * 16)


def test_an_entry_of_the_format_before_reads_as_computed_at_an_unknown_time() -> None:
    """Gateways of releases before write entries without their time (format 1) or their key
    (format 2), to the same Redis during a rolling upgrade: read as the entries of the key they
    are found under."""
    old = msgpack.packb([1, "3", pack_tensors([Tensor("y", "FP32", np.ones(2, np.float32))]), {}], use_bin_type=True)
    result, born = decode_entry(old)
    assert result.version == "3" and born is None
    assert decode_entry(old, b"k" * 16)[0].version == "3"  # the entry of the key it is found under
    older = msgpack.packb([2, "3", pack_tensors([Tensor("y", "FP32", np.ones(2, np.float32))]), {}, 5.0], use_bin_type=True)
    assert decode_entry(older, b"k" * 16)[1] == 5.0
    for wrong in ([1, "3", [], {}, 5.0], [2, "3", [], {}], [3, "3", [], {}, 5.0], [4, "3", [], {}, 5.0, b"k"]):
        with pytest.raises(ValueError):
            decode_entry(msgpack.packb(wrong))


# -- the facade -----------------------------------------------------------------------------------


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeShared:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.sets: list[tuple[bytes, float]] = []

    async def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    async def set(self, key: bytes, value: bytes, ttl_s: float) -> None:
        self.data[key] = value
        self.sets.append((key, ttl_s))

    async def close(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"hits": 0}


async def test_miss_then_hit_then_expiry_and_errors_are_never_cached() -> None:
    clock = Clock()
    cache = ResponseCache(CacheConfig(enabled=True, ttl_s=5.0), clock=clock)
    calls = 0

    async def compute(abandoned) -> BatchResult:  # noqa: ANN001
        nonlocal calls
        calls += 1
        if calls == 3:
            raise UpstreamError("boom", status=502)
        return result()

    assert (await cache.get_or_compute("m", "1", b"k", compute))[1] == "miss"
    assert (await cache.get_or_compute("m", "1", b"k", compute))[1] == "hit"
    clock.now = 6.0
    assert (await cache.get_or_compute("m", "1", b"k", compute))[1] == "miss"
    clock.now = 12.0
    with pytest.raises(UpstreamError):
        await cache.get_or_compute("m", "1", b"k", compute)
    assert (await cache.get_or_compute("m", "1", b"k", compute))[1] == "miss"  # the error was not kept
    stats = cache.snapshot()["models"]["m"]
    assert (stats["hits"], stats["misses"], calls) == (1, 3, 4)
    clock.now = 100.0  # no request since: the next look at the statistics sweeps it
    stats = cache.snapshot()["models"]["m"]
    assert (stats["entries"], stats["bytes"], stats["expired"]) == (0, 0, 3)  # the two met again, and this one


async def test_a_computation_whose_callers_all_timed_out_is_counted_and_kept() -> None:
    cache = ResponseCache(CacheConfig(enabled=True, ttl_s=5.0), clock=Clock())
    release = asyncio.Event()
    calls = 0

    async def compute(abandoned) -> BatchResult:  # noqa: ANN001
        nonlocal calls
        calls += 1
        await release.wait()
        return result()

    callers = [asyncio.create_task(cache.get_or_compute("m", "1", b"k", compute, detach=True)) for _ in range(3)]
    await asyncio.sleep(0)
    for caller in callers:
        caller.cancel()  # every caller's deadline passed; the computation goes on
    await asyncio.sleep(0)
    release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    stats = cache.snapshot()["models"]["m"]
    assert (stats["misses"], stats["coalesced"], stats["entries"]) == (1, 0, 1)  # Triton did compute it
    assert (await cache.get_or_compute("m", "1", b"k", compute))[1] == "hit" and calls == 1


def test_the_view_names_the_models_cached_by_a_table_of_their_own() -> None:
    config = CacheConfig(enabled=False, models={"digits": CacheConfig(enabled=True, ttl_s=30.0, max_share=0.5)})
    cache = ResponseCache(config, clock=Clock())
    assert cache.enabled_for("digits") and not cache.enabled_for("other")
    view = cache.snapshot()
    assert view["enabled"] is True  # the cache serves some model...
    assert view["default"] == {"enabled": False, "ttl_s": 60.0, "max_share": 1.0}  # ...not those without a table
    assert view["per_model"] == {"digits": {"enabled": True, "ttl_s": 30.0, "max_share": 0.5}}


async def test_the_shared_tier_serves_what_another_gateway_computed() -> None:
    shared = FakeShared()
    one = ResponseCache(CacheConfig(enabled=True, ttl_s=30.0), shared, wall_clock=lambda: 1000.0)
    clock = Clock()
    two = ResponseCache(CacheConfig(enabled=True, ttl_s=30.0), shared, clock=clock, wall_clock=lambda: 1007.0)

    async def compute(abandoned) -> BatchResult:  # noqa: ANN001
        return result()

    async def never(abandoned) -> BatchResult:  # noqa: ANN001
        raise AssertionError("should come from the shared tier")

    assert (await one.get_or_compute("m", "1", b"k", compute))[1] == "miss"
    await asyncio.sleep(0)  # the write to the shared tier does not hold up the response
    assert shared.sets == [(b"k", 30.0)]
    got, source, age = await two.get_or_compute("m", "1", b"k", never)
    assert source == "hit" and two.snapshot()["models"]["m"]["shared_hits"] == 1
    assert age == 7.0  # computed by the other gateway 7 s before (the time written with it)
    assert (await two.get_or_compute("m", "1", b"k", never))[1] == "hit"  # now held locally too
    clock.now = 22.9
    assert two.store.get(b"k", clock.now) is not None
    clock.now = 23.0  # kept for the rest of its TTL only
    assert two.store.get(b"k", clock.now) is None
    shared.data[b"bad"] = b"not an entry"
    assert (await two.get_or_compute("m", "1", b"bad", compute))[1] == "miss"
    shared.data[b"moved"] = shared.data[b"k"]  # another request's answer, under this key
    assert (await two.get_or_compute("m", "1", b"moved", compute))[1] == "miss"


async def test_a_version_dropped_here_is_not_served_from_the_shared_tier_as_computed_before_the_drop() -> None:
    shared = FakeShared()
    wall = [1000.0]
    one = ResponseCache(CacheConfig(enabled=True, ttl_s=60.0), shared, wall_clock=lambda: wall[0])
    two = ResponseCache(CacheConfig(enabled=True, ttl_s=60.0), shared, wall_clock=lambda: wall[0])

    def answering(value: float):  # noqa: ANN202
        async def compute(abandoned) -> BatchResult:  # noqa: ANN001
            wall[0] += 0.001  # an inference takes time
            return valued(value)

        return compute

    assert (await one.get_or_compute("m", "1", b"k", answering(1.0)))[1] == "miss"  # the files before
    await asyncio.sleep(0)
    wall[0] += 1.0
    one.drop_version("m", "1")  # Triton reloaded version 1 in place
    two.drop_version("m", "1")
    got, source, _ = await two.get_or_compute("m", "1", b"k", answering(2.0))
    assert source == "miss" and got.outputs[0].data[0, 0] == 2.0  # not the answer Redis holds
    assert two.snapshot()["models"]["m"]["shared_hits"] == 0
    await asyncio.sleep(0)  # the new answer replaced it there: served to a replica that dropped too
    assert (await one.get_or_compute("m", "1", b"k", answering(3.0)))[0].outputs[0].data[0, 0] == 2.0
    assert one.snapshot()["models"]["m"]["shared_hits"] == 1


async def test_an_answer_computed_across_a_drop_of_its_version_is_not_written_to_the_shared_tier() -> None:
    shared = FakeShared()
    cache = ResponseCache(CacheConfig(enabled=True, ttl_s=60.0), shared)
    release = asyncio.Event()

    async def slow(abandoned) -> BatchResult:  # noqa: ANN001
        await release.wait()
        return result()

    task = asyncio.ensure_future(cache.get_or_compute("m", "1", b"j", slow))
    await asyncio.sleep(0)
    cache.drop_version("m", "1")  # while it computes: its answer may be the files' before
    release.set()
    assert (await task)[1] == "miss"  # the caller gets it...
    await asyncio.sleep(0)
    assert shared.sets == [] and cache.store.get(b"j", 0.0) is None  # ...nobody else does


async def test_a_request_with_a_max_age_takes_from_the_shared_tier_only_an_answer_young_enough() -> None:
    shared = FakeShared()
    one = ResponseCache(CacheConfig(enabled=True, ttl_s=60.0), shared, wall_clock=lambda: 1000.0)
    two = ResponseCache(CacheConfig(enabled=True, ttl_s=60.0), shared, clock=Clock(), wall_clock=lambda: 1020.0)
    calls = 0

    async def compute(abandoned) -> BatchResult:  # noqa: ANN001
        nonlocal calls
        calls += 1
        return result()

    await one.get_or_compute("m", "1", b"k", compute)
    await asyncio.sleep(0)  # written to the shared tier
    assert (await two.get_or_compute("m", "1", b"k", compute, freshness=Freshness(max_age=30.0)))[1:] == ("hit", 20.0)
    assert calls == 1
    other = ResponseCache(CacheConfig(enabled=True, ttl_s=60.0), shared, clock=Clock(), wall_clock=lambda: 1020.0)
    assert (await other.get_or_compute("m", "1", b"k", compute, freshness=Freshness(max_age=10.0)))[1:] == ("miss", None)
    assert calls == 2
    with pytest.raises(NotCached, match="only-if-cached"):
        await other.get_or_compute("m", "1", b"j", compute, freshness=Freshness(only_if_cached=True))
    assert calls == 2


class Counted:
    """A computation that counts its calls and answers once released."""

    def __init__(self) -> None:
        self.calls = 0
        self.go = asyncio.Event()

    async def __call__(self, abandoned) -> BatchResult:  # noqa: ANN001
        self.calls += 1
        await self.go.wait()
        return result()


async def test_identical_requests_with_a_max_age_for_a_key_none_holds_share_one_computation() -> None:
    cache = ResponseCache(CacheConfig(enabled=True, ttl_s=60.0), clock=Clock())
    compute = Counted()
    asks = [asyncio.ensure_future(cache.get_or_compute("m", "1", b"k", compute, freshness=Freshness(max_age=10.0))) for _ in range(100)]
    await asyncio.sleep(0.01)
    compute.go.set()
    sources = [source for _, source, _ in await asyncio.gather(*asks)]
    assert compute.calls == 1 and sources.count("miss") == 1 and sources.count("coalesced") == 99


async def test_requests_passing_over_an_old_answer_share_the_one_computation_that_replaces_it() -> None:
    clock = Clock()
    cache = ResponseCache(CacheConfig(enabled=True, ttl_s=60.0), clock=clock)
    compute = Counted()
    compute.go.set()
    await cache.get_or_compute("m", "1", b"k", compute)
    clock.now = 20.0
    compute.go.clear()
    asks = [asyncio.ensure_future(cache.get_or_compute("m", "1", b"k", compute, freshness=Freshness(max_age=10.0))) for _ in range(10)]
    await asyncio.sleep(0.01)
    compute.go.set()
    sources = [source for _, source, _ in await asyncio.gather(*asks)]
    assert compute.calls == 2 and sources.count("miss") == 1 and sources.count("coalesced") == 9
    assert (await cache.get_or_compute("m", "1", b"k", compute))[1:] == ("hit", 0.0)  # the new answer replaced it


class SlowShared(FakeShared):
    """A shared tier whose reads wait until released."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def get(self, key: bytes) -> bytes | None:
        await self.go.wait()
        return await super().get(key)


async def test_a_request_sharing_a_flight_that_took_an_answer_too_old_for_it_computes_afresh() -> None:
    """A request without limits leads the flight and takes a 20 s old answer from the shared
    tier: the requests that joined it and allow 30 s take it too, and say its age; those that
    allow 10 s share one computation of their own, which one more such request joins."""
    shared = SlowShared()
    shared.go.set()
    one = ResponseCache(CacheConfig(enabled=True, ttl_s=60.0), shared, wall_clock=lambda: 1000.0)
    two = ResponseCache(CacheConfig(enabled=True, ttl_s=60.0), shared, clock=Clock(), wall_clock=lambda: 1020.0)
    compute = Counted()
    compute.go.set()
    await one.get_or_compute("m", "1", b"k", compute)
    await asyncio.sleep(0)  # written to the shared tier
    shared.go.clear()
    compute.go.clear()
    leader = asyncio.ensure_future(two.get_or_compute("m", "1", b"k", compute))
    await asyncio.sleep(0)
    lenient = [asyncio.ensure_future(two.get_or_compute("m", "1", b"k", compute, freshness=Freshness(max_age=30.0))) for _ in range(3)]
    follows: list[list[bool]] = [[] for _ in range(3)]  # what each strict request was told
    strict = [
        asyncio.ensure_future(two.get_or_compute("m", "1", b"k", compute, on_follow=told.append, freshness=Freshness(max_age=10.0)))
        for told in follows
    ]
    await asyncio.sleep(0)
    shared.go.set()
    assert (await leader)[1:] == ("hit", 20.0)
    assert [answer[1:] for answer in await asyncio.gather(*lenient)] == [("coalesced", 20.0)] * 3
    await asyncio.sleep(0.01)
    strict.append(asyncio.ensure_future(two.get_or_compute("m", "1", b"k", compute, freshness=Freshness(min_fresh=55.0))))
    await asyncio.sleep(0.01)
    compute.go.set()
    assert sorted(answer[1:] for answer in await asyncio.gather(*strict)) == [("coalesced", None)] * 3 + [("miss", None)]
    assert compute.calls == 2
    # Each followed the first flight; the one leading the computation afresh follows no more
    # (its deadline is then its own computation's).
    assert sorted(follows) == [[True, False], [True, True], [True, True]]
    stats = two.snapshot()["models"]["m"]
    assert (stats["hits"], stats["shared_hits"], stats["coalesced"], stats["misses"]) == (1, 1, 6, 1)


async def test_cached_outputs_are_copies_not_views_of_a_whole_batch() -> None:
    cache = ResponseCache(CacheConfig(enabled=True))
    batch = np.arange(64, dtype=np.float32).reshape(16, 4)

    async def compute(abandoned) -> BatchResult:  # noqa: ANN001
        return BatchResult("1", [Tensor("y", "FP32", batch[2:3])])

    await cache.get_or_compute("m", "1", b"k", compute)
    held, _, _ = await cache.get_or_compute("m", "1", b"k", compute)
    assert held.outputs[0].data.base is None and cache.store.bytes == ENTRY_OVERHEAD + 16


def test_entries_past_their_ttl_are_swept_and_counted_apart_from_evictions() -> None:
    size = result_size(result())
    store = CacheStore(100 * size)
    for i in range(10):
        store.put(bytes([i]), result(), "m", "1", expires=100.0 + i, model_max_bytes=10**9, now=0.0)
    store.put(b"late", result(), "n", "1", expires=500.0, model_max_bytes=10**9, now=0.0)
    store.put(b"\x00", result(), "m", "1", expires=300.0, model_max_bytes=10**9, now=0.0)  # stored again: lives on
    assert store.expire(104.5) == 4  # 1..4 (0 was replaced), without anyone asking for them
    assert store.stats["m"].as_dict()["expired"] == 4 and store.stats["m"].evictions == 0
    assert store.bytes == 7 * size and store.stats["m"].entries == 6
    store.put(b"new", result(), "n", "1", expires=900.0, model_max_bytes=10**9, now=400.0)  # a store sweeps first
    assert sorted(store._entries) == [b"late", b"new"] and store.bytes == 2 * size
    assert store.stats["m"].expired == 10 and store.stats["m"].bytes == 0
    for i in range(200):  # the heap does not grow with entries replaced over and over
        store.put(b"late", result(), "n", "1", expires=500.0 + i, model_max_bytes=10**9, now=400.0)
    assert len(store._expiries) <= 2 * len(store._entries) + 64
