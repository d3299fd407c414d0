"""The balancing policy: power of two choices for equal weights, a load-aware weighted schedule
otherwise (no network, a seeded random generator)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from gateway.balancer import choose, effective_weight
from gateway.instances import Instance


def test_equal_weights_pick_the_less_loaded_of_two() -> None:
    a, b = Instance("a"), Instance("b")
    a.outstanding, b.outstanding = 3, 1
    rng = random.Random(1)
    assert all(choose([a, b], rng, 0.0) is b for _ in range(50))


def test_equal_weights_idle_split_evenly() -> None:
    insts = [Instance(str(i)) for i in range(4)]
    rng = random.Random(7)
    counts = Counter(choose(insts, rng, 0.0).url for _ in range(4000))
    assert all(900 < counts[i.url] < 1100 for i in insts), counts


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    a, b, c = Instance("a"), Instance("b"), Instance("c")
    a.outstanding, b.outstanding, c.outstanding = 0, 1, 5
    rng = random.Random(3)
    picks = Counter(choose([a, b, c], rng, 0.0).url for _ in range(600))
    assert picks["c"] == 0 and picks["a"] > picks["b"] > 0


def test_weights_three_to_one_split_exactly_when_idle() -> None:
    a, b = Instance("a", weight=3), Instance("b", weight=1)
    rng = random.Random(0)
    picks = [choose([a, b], rng, 0.0).url for _ in range(400)]
    assert Counter(picks) == {"a": 300, "b": 100}
    # Smooth: b's turns are spread out, never two in a row.
    assert "bb" not in "".join(picks)


def test_weights_hold_under_load_when_requests_in_flight_follow_the_weights() -> None:
    a, b = Instance("a", weight=3), Instance("b", weight=1)
    a.load, b.load = 6.0, 2.0  # equally fast instances, in steady state
    rng = random.Random(0)
    counts = Counter(choose([a, b], rng, 0.0).url for _ in range(400))
    assert counts == {"a": 300, "b": 100}


def test_a_slow_weighted_instance_gets_less() -> None:
    a, b = Instance("a", weight=3), Instance("b", weight=1)
    a.load, b.load = 12.0, 0.0  # a is backed up
    rng = random.Random(0)
    counts = Counter(choose([a, b], rng, 0.0).url for _ in range(400))
    assert counts["a"] < 200


def test_effective_weight_normalises_weights() -> None:
    # Weights 30 and 10 behave as 1.5 and 0.5: only their ratio matters.
    a, b = Instance("a", weight=30), Instance("b", weight=10)
    assert effective_weight(a, 20) == pytest.approx(1.5)
    a.load = 3.0
    assert effective_weight(a, 20) == pytest.approx(1.5 / 3)
    assert effective_weight(b, 20) == pytest.approx(0.5)


def test_a_single_candidate_is_chosen() -> None:
    a = Instance("a", weight=5)
    assert choose([a], random.Random(0), 0.0) is a


def test_load_is_the_time_averaged_count_in_flight() -> None:
    a = Instance("a")
    a.begin(0.0)
    a.settle(1.0)  # one request in flight for one time constant
    assert a.load == pytest.approx(1 - math.exp(-1))
    a.end(1.0)
    a.settle(11.0)  # idle for a long time
    assert a.load == pytest.approx(0.0, abs=1e-4) and a.outstanding == 0 and a.requests == 1


async def test_weights_hold_with_one_batch_in_flight_per_instance() -> None:
    """Two equally fast instances, weights 3:1, two batches in flight at all times (the gateway's
    default of one batch slot per instance): the split of picks stays 75/25."""
    a, b = Instance("a", weight=3), Instance("b", weight=1)
    rng, now = random.Random(0), 0.0
    inflight: list[tuple[float, Instance]] = []
    counts: Counter[str] = Counter()
    for _ in range(4000):
        while len(inflight) < 2:
            chosen = choose([a, b], rng, now)
            chosen.begin(now)
            counts[chosen.url] += 1
            inflight.append((now + 0.005, chosen))
        inflight.sort(key=lambda x: x[0])
        now, done = inflight.pop(0)
        done.end(now)
    share = counts["a"] / sum(counts.values())
    assert 0.72 < share < 0.78, share


def test_bias_zero_keeps_strict_weights_whatever_the_load() -> None:
    a, b = Instance("a", weight=3), Instance("b", weight=1)
    a.load, b.load = 12.0, 0.0  # a is backed up, but the operator asked for strict weights
    rng = random.Random(0)
    counts = Counter(choose([a, b], rng, 0.0, bias=0.0).url for _ in range(400))
    assert counts == {"a": 300, "b": 100}
