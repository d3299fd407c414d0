"""Routing a stateful model's sequences: each request of a sequence reaches its instance and
version (``gateway.sequences``), in the router and the pipeline. Two pipelines over one fleet
stand for two worker processes (or replicas): they share nothing but the fleet."""

from __future__ import annotations

import random

import numpy as np
import pytest
from test_router import Clock

from gateway.batcher import BatchResult
from gateway.config import BatchingConfig
from gateway.errors import GatewayTimeout, Unavailable, UpstreamError
from gateway.instances import Instance
from gateway.models import ModelInfo
from gateway.pipeline import InferencePipeline
from gateway.rollout import ModelRollout, Rollouts
from gateway.router import Router
from gateway.sequences import Pins, ranked, sequence_of
from gateway.tensors import InferRequest, Tensor
from gateway.upstream.client import InstanceUnreachable


class StatefulTriton:
    """Instances that hold sequences as Triton does: a start opens one where it lands, a later
    request where none is open gets Triton's 400, an end closes it. ``failing``: an instance's
    error for the next request sent there."""

    def __init__(self) -> None:
        self.open: set[tuple[str, str, object]] = set()  # (url, version, sequence id)
        self.sent: list[str] = []
        self.failing: dict[str, Exception] = {}

    async def infer(self, url, model, version, inputs, parameters, timeout, outputs=None):  # noqa: ANN001, ANN201
        self.sent.append(url)
        if url in self.failing:
            raise self.failing.pop(url)
        sid = (parameters or {}).get("sequence_id")
        key = (url, version, sid)
        if sid and parameters.get("sequence_start"):
            self.open.add(key)
        elif sid and key not in self.open:
            raise UpstreamError(
                f"inference request for sequence {sid} to model '{model}' must specify the START flag on the first "
                "request of the sequence", status=400,
            )  # fmt: skip
        if sid and parameters.get("sequence_end"):
            self.open.discard(key)
        return BatchResult(version or "1", inputs)


def fleet(n: int, versions: tuple[str, ...] = ("1",)) -> list[Instance]:
    instances = [Instance(f"http://t{i}") for i in range(n)]
    for i in instances:
        i.set_index({"s": frozenset(versions)})
    return instances


class Metadata:
    def __init__(self, stateful: bool = True) -> None:
        config: dict = {"max_batch_size": 8}
        if stateful:
            config["sequence_batching"] = {"max_sequence_idle_microseconds": 1000000}
        self.info = ModelInfo.from_triton(
            {"name": "s", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
             "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}]},
            config, b"{}", b"{}",
        )  # fmt: skip

    def fresh(self, model: str, version: str) -> ModelInfo:
        return self.info

    async def get(self, model: str, version: str) -> ModelInfo:
        return self.info


def step(sequence: int | str, start: bool = False, end: bool = False, version: str = "") -> InferRequest:
    params: dict = {"sequence_id": sequence}
    if start:
        params["sequence_start"] = True
    if end:
        params["sequence_end"] = True
    return InferRequest("s", version, [Tensor("x", "FP32", np.ones((1, 1), np.float32))], parameters=params)


def worker(
    instances: list[Instance], triton: StatefulTriton, rollouts: Rollouts | None = None, stateful: bool = True, clock: Clock | None = None
) -> InferencePipeline:
    """One gateway process: its own router state and pins over the shared fleet."""
    router = Router(instances, triton, clock=clock or Clock(), rng=random.Random(0))  # type: ignore[arg-type]
    return InferencePipeline(BatchingConfig(), router, Metadata(stateful), rollouts=rollouts)  # type: ignore[arg-type]


def key_led_by(url: str, instances: list[Instance]) -> int:
    """A sequence id whose ranking puts ``url`` first among ``instances``."""
    return next(n for n in range(1, 1000) if ranked(b"%d" % n, instances)[0].url == url)


# -- the pieces -----------------------------------------------------------------------------------


def test_a_sequence_is_its_id_and_none_is_no_sequence() -> None:
    assert sequence_of({"sequence_id": 7}) == b"7"
    assert sequence_of({"sequence_id": "7"}) != sequence_of({"sequence_id": 7})
    long_ids = [sequence_of({"sequence_id": "x" * 1000 + c}) for c in "ab"]
    assert long_ids[0] != long_ids[1] and all(len(k) <= 65 for k in long_ids)  # type: ignore[arg-type]
    for params in (None, {}, {"priority": 1}, {"sequence_id": 0}, {"sequence_id": ""}):
        assert sequence_of(params) is None


def test_the_ranking_is_the_same_everywhere_and_moves_only_the_sequences_of_an_instance_that_leaves() -> None:
    instances = fleet(4)
    keys = [b"%d" % n for n in range(400)]
    first = {k: ranked(k, instances)[0] for k in keys}
    assert {i.url for i in first.values()} == {i.url for i in instances}  # each leads some
    assert first == {k: ranked(k, list(reversed(instances)))[0] for k in keys}  # order does not matter
    after = {k: ranked(k, instances[1:])[0] for k in keys}
    assert all(after[k] is first[k] for k in keys if first[k] is not instances[0])


def test_pins_expire_when_idle_and_the_least_recently_used_go_first() -> None:
    clock = Clock()
    pins: Pins[str] = Pins(clock, idle_s=10, max_pins=2)
    pins.pin("m", "1", b"a", "x")
    pins.pin("m", "1", b"b", "y")
    assert pins.get("m", "1", b"a") == "x" and pins.get("m", "2", b"a") is None
    pins.pin("m", "1", b"a", "x")  # used again: b is now the oldest
    pins.pin("m", "1", b"c", "z")
    assert pins.get("m", "1", b"b") is None and len(pins) == 2
    clock.now += 11
    assert pins.get("m", "1", b"a") is None and len(pins) == 0


# -- instances ------------------------------------------------------------------------------------


async def test_every_process_sends_a_sequence_to_the_instance_that_holds_it() -> None:
    instances = fleet(3)
    triton = StatefulTriton()
    a, b = worker(instances, triton), worker(instances, triton)
    for n in range(1, 31):
        await a.infer(step(n, start=True))
    for n in range(1, 31):  # the other process, which pinned nothing
        await b.infer(step(n))
        await a.infer(step(n))
    assert len(set(triton.sent)) == 3 and len(triton.sent) == 90  # spread, and nothing refused
    await a.infer(step(5, end=True))
    with pytest.raises(UpstreamError, match="must specify the START flag"):  # ended: Triton's answer
        await b.infer(step(5))
    await a.close(0)
    await b.close(0)


async def test_a_start_moves_on_only_when_nothing_was_sent() -> None:
    instances = fleet(3)
    triton = StatefulTriton()
    a, b = worker(instances, triton), worker(instances, triton)
    n = key_led_by("http://t0", instances)
    triton.failing["http://t0"] = InstanceUnreachable("refused", connect_failed=True)
    await a.infer(step(n, start=True))  # t0 down: the next in the sequence's ranking
    second = ranked(b"%d" % n, instances)[1].url
    assert triton.sent == ["http://t0", second]
    await b.infer(step(n))  # b knows t0 is down too, here after a probe
    assert triton.sent[-1] == second
    # A start whose instance may have seen it (no answer in time) is not sent twice.
    m = key_led_by("http://t1", instances)
    triton.failing["http://t1"] = GatewayTimeout("no answer within 1 s")
    triton.sent.clear()
    with pytest.raises(GatewayTimeout):
        await a.infer(step(m, start=True))
    assert triton.sent == ["http://t1"]
    await a.close(0)
    await b.close(0)


async def test_a_sequence_started_before_an_instance_joined_is_found_where_it_is() -> None:
    instances = fleet(2)
    triton = StatefulTriton()
    newcomer = Instance("http://t-new")
    newcomer.set_index({"s": frozenset({"1"})})
    n = key_led_by("http://t-new", [*instances, newcomer])
    a = worker(instances, triton)
    await a.infer(step(n, start=True))
    home = triton.sent[-1]
    b = worker([*instances, newcomer], triton)  # a process that sees the newcomer, and no pin
    a._router.set_instances([*instances, newcomer])
    await b.infer(step(n))
    assert triton.sent[-2:] == ["http://t-new", home]  # refused where it is not: on to the next
    await a.infer(step(n))
    assert triton.sent[-1] == home  # the pin, straight there
    await a.close(0)
    await b.close(0)


async def test_a_later_request_whose_instance_is_down_is_503_naming_the_sequence() -> None:
    instances = fleet(2)
    triton = StatefulTriton()
    a, b = worker(instances, triton), worker(instances, triton)
    await a.infer(step("order-7", start=True))
    home = next(i for i in instances if i.url == triton.sent[-1])
    home.mark_down("refused", 0.0)
    sent = len(triton.sent)
    gone = 'sequence "order-7": the Triton instance holding its state is unavailable'
    with pytest.raises(Unavailable, match=gone):  # pinned here: nothing sent elsewhere
        await a.infer(step("order-7"))
    assert len(triton.sent) == sent
    with pytest.raises(Unavailable, match=gone):  # there, it may have started where it is refused
        await b.infer(step("order-7"))
    assert len(triton.sent) == sent + 1 and triton.sent[-1] != home.url
    await a.close(0)
    await b.close(0)


async def test_new_sequences_start_elsewhere_than_where_the_model_is_about_to_be_reloaded() -> None:
    instances = fleet(2)
    triton = StatefulTriton()
    a = worker(instances, triton)
    led_by_first = [n for n in range(1, 1000) if ranked(b"%d" % n, instances)[0] is instances[0]][:2]
    instances[0].quiescing = frozenset({"s"})  # its sequences under way there are awaited, then it reloads
    await a.infer(step(led_by_first[0], start=True))
    await a.infer(step(led_by_first[0]))
    assert triton.sent[-2:] == [instances[1].url] * 2
    instances[1].quiescing = frozenset({"s"})  # every instance about to reload: a start still goes
    await a.infer(step(led_by_first[1], start=True))
    assert triton.sent[-1] == instances[0].url
    await a.close(0)


async def test_no_sequence_starts_where_the_model_is_being_reloaded_and_where_every_instance_is_it_is_503() -> None:
    """During the load call itself, a sequence started there would be dropped by the reload
    unnoticed (Triton answers its next request "must specify the START flag")."""
    instances = fleet(2)
    triton = StatefulTriton()
    a = worker(instances, triton)
    led_by_first = [n for n in range(1, 1000) if ranked(b"%d" % n, instances)[0] is instances[0]][:2]
    for instance in instances:
        instance.quiescing = frozenset({"s"})  # both about to reload (one instance each, in practice)...
    instances[0].reloading = frozenset({"s"})  # ...and the first reloading now
    await a.infer(step(led_by_first[0], start=True))
    assert triton.sent[-1] == instances[1].url
    instances[1].reloading = frozenset({"s"})
    sent = len(triton.sent)
    with pytest.raises(Unavailable, match="is being reloaded on every instance that could start it; start the sequence again"):
        await a.infer(step(led_by_first[1], start=True))
    assert len(triton.sent) == sent
    await a.infer(step(led_by_first[0]))  # a later request goes where its sequence is, as before
    assert triton.sent[-1] == instances[1].url
    await a.close(0)


async def test_a_later_request_on_a_draining_version_moves_down_the_ranking_to_its_sequence() -> None:
    """A sequence started off its ranking's first instance (that one was being reloaded then),
    its version now drained on both: a worker that did not answer its start tries the first
    instance, which refuses it, then the other, which holds it."""
    instances = fleet(2)
    triton = StatefulTriton()
    a, b = worker(instances, triton), worker(instances, triton)
    sequence = next(n for n in range(1, 1000) if ranked(b"%d" % n, instances)[0] is instances[0])
    instances[0].quiescing = frozenset({"s"})
    await a.infer(step(sequence, start=True, version="1"))
    assert triton.sent[-1] == instances[1].url  # started on the second of its ranking
    instances[0].quiescing = frozenset()
    for instance in instances:
        instance.withhold("s", "1", "draining")  # the version leaves: still there for its sequences
    await b.infer(step(sequence, version="1"))
    assert triton.sent[-2:] == [instances[0].url, instances[1].url]
    await b.infer(step(sequence, end=True, version="1"))  # pinned there now
    assert triton.sent[-1] == instances[1].url
    await a.close(0)
    await b.close(0)


async def test_a_model_without_sequence_batching_balances_its_requests_as_usual() -> None:
    instances = fleet(2)
    triton = StatefulTriton()
    pipeline = worker(instances, triton, stateful=False)
    for _ in range(20):
        await pipeline.infer(step(5, start=True))
    assert len(set(triton.sent)) == 2
    await pipeline.close(0)


# -- versions -------------------------------------------------------------------------------------


async def test_a_sequence_keeps_its_version_when_a_newer_one_arrives_and_fails_clearly_once_it_is_gone() -> None:
    instances = fleet(2, versions=("1",))
    triton = StatefulTriton()
    a = worker(instances, triton)
    assert (await a.infer(step(11, start=True))).version == "1"
    for i in instances:
        i.set_index({"s": frozenset({"1", "2"})})
    assert [(await a.infer(step(11))).version for _ in range(3)] == ["1", "1", "1"]
    assert (await a.infer(step(12, start=True))).version == "2"  # a new sequence: the newest
    for i in instances:  # version 1 drained and unloaded
        i.set_index({"s": frozenset({"2"})})
    with pytest.raises(Unavailable, match="sequence 11: version 1, which it started on, is no longer served"):
        await a.infer(step(11))
    await a.infer(step(11, start=True))  # started again: on version 2
    await a.infer(step(11, end=True))
    assert (await a.infer(step(11, start=True))).version == "2"
    await a.close(0)


async def test_a_draining_version_takes_the_later_requests_of_its_sequences_in_every_process() -> None:
    instances = fleet(2, versions=("1",))
    triton = StatefulTriton()
    clock = Clock()
    a, b = worker(instances, triton, clock=clock), worker(instances, triton, clock=clock)
    for sequence in (11, 12, 13):
        assert (await a.infer(step(sequence, start=True))).version == "1"
    homes = {sid: url for (url, _, sid) in triton.open}
    for i in instances:  # version 2 arrives, version 1 leaves: drained before it is unloaded
        i.set_index({"s": frozenset({"1", "2"})})
        i.withhold("s", "1", "draining")
    assert sum(i.open_sequences("s", "1", clock.now) for i in instances) == 3  # what the drain waits for
    for _ in range(2):
        assert (await a.infer(step(11))).version == "1" and triton.sent[-1] == homes[11]
        assert (await a.infer(step(12, version="1"))).version == "1" and triton.sent[-1] == homes[12]  # naming it
        assert (await b.infer(step(13, version="1"))).version == "1" and triton.sent[-1] == homes[13]  # another process
    assert (await a.infer(step(14, start=True))).version == "2"  # a new sequence: not on the leaving version
    with pytest.raises(Unavailable, match="version 1 is available \\(draining\\)"):
        await a.infer(step(15, start=True, version="1"))
    assert (await a.infer(step(11, end=True))).version == "1"
    with pytest.raises(UpstreamError, match="must specify the START flag"):  # ended: Triton says so
        await a.infer(step(11, version="1"))
    clock.now += 0.6
    assert (await a.infer(step(12))).version == "1"  # used: stays under way
    clock.now += 0.6  # 13 idle beyond the model's 1 s in this process (Triton forgets it too)
    assert [i.open_sequences("s", "1", clock.now) for i in instances] == [1 if i.url == homes[12] else 0 for i in instances]
    assert (await a.infer(step(12, end=True))).version == "1"
    assert sum(i.open_sequences("s", "1", clock.now) for i in instances) == 0
    for i in instances:  # drained, then unloaded
        i.release("s", "1")
        i.set_index({"s": frozenset({"2"})})
    with pytest.raises(Unavailable, match="sequence 13: version 1, which it started on, is no longer served"):
        await a.infer(step(13))
    await a.close(0)
    await b.close(0)


async def test_a_canary_split_moves_whole_sequences_in_every_process() -> None:
    instances = fleet(2, versions=("1", "2"))
    triton = StatefulTriton()

    def rollouts(seed: int) -> Rollouts:
        r = Rollouts(seed=seed)
        r.set_models({"s": ModelRollout("1", "2", 0.5)})
        return r

    a, b = worker(instances, triton, rollouts(1)), worker(instances, triton, rollouts(2))
    versions: dict[int, set[str]] = {}
    for n in range(1, 41):
        versions[n] = {(await a.infer(step(n, start=True))).version}
    for w in (b, a, b):
        for n in range(1, 41):
            versions[n].add((await w.infer(step(n))).version)
    assert all(len(v) == 1 for v in versions.values())
    assert 8 <= sum(v == {"2"} for v in versions.values()) <= 32  # about half the sequences
    await a.close(0)
    await b.close(0)


async def test_triton_refusing_a_sequence_does_not_count_against_the_canary_nor_is_it_mirrored() -> None:
    instances = fleet(2, versions=("1", "2", "3"))
    triton = StatefulTriton()
    rollouts = Rollouts(seed=0)
    rollouts.set_models({"s": ModelRollout("1", "2", 1.0, shadow="3", shadow_share=1.0)})
    a = worker(instances, triton, rollouts)
    await a.infer(step(1, start=True))
    with pytest.raises(UpstreamError, match="START flag"):
        await a.infer(step(99))  # never started
    await a.close(1.0)
    assert [ok for ok, _ in rollouts.states["s"].window("2").items] == [True]
    assert rollouts.snapshot()["models"]["s"]["shadow"]["sent"] == 0
