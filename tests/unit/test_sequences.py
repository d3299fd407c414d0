"""Routing a stateful model's sequences: each request of a sequence reaches its instance and
version (``gateway.sequences``), in the router and the pipeline."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gateway.batcher import BatchResult
from gateway.config import BatchingConfig
from gateway.errors import GatewayTimeout, Unavailable
from gateway.instances import Instance
from gateway.models import ModelInfo
from gateway.pipeline import InferencePipeline
from gateway.rollout import ModelRollout, Rollouts
from gateway.router import Router
from gateway.sequences import Affinity, Pins, rendezvous, sequence_of
from gateway.tensors import InferRequest, Tensor

INPUTS = [Tensor("x", "FP32", np.ones((1, 1), np.float32))]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeClient:
    """Answers from every instance but those in ``failing``, recording where each request went."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.failing: dict[str, Exception] = {}

    async def infer(self, url, model, version, inputs, parameters, timeout, outputs=None):  # noqa: ANN001, ANN201
        self.urls.append(url)
        if url in self.failing:
            raise self.failing[url]
        return BatchResult(version or "1", inputs)


def fleet(n: int, versions: tuple[str, ...] = ("1",)) -> list[Instance]:
    instances = [Instance(f"http://t{i}") for i in range(n)]
    for i in instances:
        i.set_index({"s": frozenset(versions)})
    return instances


# -- the pieces -----------------------------------------------------------------------------------


def test_a_sequence_is_its_id_and_none_is_no_sequence() -> None:
    assert sequence_of({"sequence_id": 7}) == b"7"
    assert sequence_of({"sequence_id": "7"}) != sequence_of({"sequence_id": 7})
    for params in (None, {}, {"priority": 1}, {"sequence_id": 0}, {"sequence_id": ""}):
        assert sequence_of(params) is None


def test_rendezvous_moves_only_the_sequences_of_an_instance_that_leaves() -> None:
    instances = fleet(4)
    keys = [b"%d" % n for n in range(400)]
    before = {k: rendezvous(k, instances) for k in keys}
    assert {i.url for i in before.values()} == {i.url for i in instances}  # all get some
    assert before == {k: rendezvous(k, list(reversed(instances))) for k in keys}  # order does not matter
    after = {k: rendezvous(k, instances[1:]) for k in keys}
    assert all(after[k] is before[k] for k in keys if before[k] is not instances[0])


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


def test_a_later_request_whose_instance_is_gone_names_its_sequence() -> None:
    a, b = fleet(2)
    affinity = Affinity(b"s" + b"order-7", pinned="http://t9", strict=True)
    with pytest.raises(Unavailable, match="sequence 'order-7': the Triton instance holding its state is unavailable"):
        affinity.narrow([a, b])
    start = Affinity(b"5", pinned="http://t9", strict=False)
    assert start.narrow([a, b]) == [rendezvous(b"5", [a, b])]


# -- the router -----------------------------------------------------------------------------------


async def test_the_router_sends_a_sequence_to_one_instance_and_never_retries_a_later_request_elsewhere() -> None:
    instances = fleet(3)
    client = FakeClient()
    router = Router(instances, client, clock=Clock(), rng=random.Random(0))  # type: ignore[arg-type]
    for n in range(10):
        affinity = Affinity(b"%d" % n, None, strict=n % 2 == 1)
        await router.infer("s", "1", INPUTS, {"sequence_id": n}, None, None, affinity)
        assert client.urls[-1] == affinity.served == rendezvous(b"%d" % n, instances).url
    home = rendezvous(b"3", instances)
    client.failing[home.url] = GatewayTimeout("no answer")
    client.urls.clear()
    with pytest.raises(GatewayTimeout):
        await router.infer("s", "1", INPUTS, {"sequence_id": 3}, None, None, Affinity(b"3", None, strict=True))
    assert client.urls == [home.url]  # not retried: the state is there only
    start = Affinity(b"3", None, strict=False)
    await router.infer("s", "1", INPUTS, {"sequence_id": 3, "sequence_start": True}, None, None, start)
    assert client.urls[1] == home.url and start.served not in (None, home.url)  # a start moves on


# -- the pipeline ---------------------------------------------------------------------------------


class FakeMetadata:
    def __init__(self, stateful: bool) -> None:
        self.info = ModelInfo.from_triton(
            {"name": "s", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
             "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}]},
            {"max_batch_size": 8, **({"sequence_batching": {"max_sequence_idle_microseconds": 1000000}} if stateful else {})},
            b"{}", b"{}",
        )  # fmt: skip

    def fresh(self, model: str, version: str) -> ModelInfo:
        return self.info

    async def get(self, model: str, version: str) -> ModelInfo:
        return self.info


def step(sequence: int, start: bool = False, end: bool = False) -> InferRequest:
    params: dict = {"sequence_id": sequence}
    if start:
        params["sequence_start"] = True
    if end:
        params["sequence_end"] = True
    return InferRequest("s", "", [Tensor("x", "FP32", np.ones((1, 1), np.float32))], parameters=params)


async def test_a_sequence_keeps_its_instance_and_version_while_the_fleet_changes() -> None:
    instances = fleet(2, versions=("1",))
    client = FakeClient()
    router = Router(instances, client, clock=Clock(), rng=random.Random(0))  # type: ignore[arg-type]
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(stateful=True))  # type: ignore[arg-type]
    first = await pipeline.infer(step(11, start=True))
    home = client.urls[-1]
    # Version 2 arrives everywhere and an instance joins: the sequence stays on version 1, there.
    for i in instances:
        i.set_index({"s": frozenset({"1", "2"})})
    newcomer = Instance("http://t-new")
    newcomer.set_index({"s": frozenset({"1", "2"})})
    router.set_instances([*instances, newcomer])
    later = [await pipeline.infer(step(11)) for _ in range(5)]
    assert first.version == "1" and all(r.version == "1" for r in later)
    assert client.urls[-5:] == [home] * 5
    await pipeline.infer(step(11, end=True))
    assert client.urls[-1] == home
    # Ended: a new sequence with the same id starts on the newest version.
    assert (await pipeline.infer(step(11, start=True))).version == "2"
    await pipeline.close(0)


async def test_a_canary_share_splits_sequences_not_their_requests() -> None:
    instances = fleet(2, versions=("1", "2"))
    router = Router(instances, FakeClient(), clock=Clock(), rng=random.Random(0))  # type: ignore[arg-type]
    rollouts = Rollouts(seed=1)
    rollouts.set_models({"s": ModelRollout("1", "2", 0.5)})
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(stateful=True), rollouts=rollouts)  # type: ignore[arg-type]
    versions: dict[int, set[str]] = {}
    for n in range(1, 41):
        versions[n] = {(await pipeline.infer(step(n, start=True))).version}
    for _ in range(3):
        for n in range(1, 41):
            versions[n].add((await pipeline.infer(step(n))).version)
    assert all(len(v) == 1 for v in versions.values())
    assert 8 <= sum(v == {"2"} for v in versions.values()) <= 32  # about half the sequences
    await pipeline.close(0)


async def test_a_model_without_sequence_batching_balances_its_requests_as_usual() -> None:
    instances = fleet(2)
    client = FakeClient()
    router = Router(instances, client, clock=Clock(), rng=random.Random(0))  # type: ignore[arg-type]
    pipeline = InferencePipeline(BatchingConfig(), router, FakeMetadata(stateful=False))  # type: ignore[arg-type]
    for _ in range(20):
        await pipeline.infer(step(5))
    assert len(set(client.urls)) == 2
    await pipeline.close(0)
