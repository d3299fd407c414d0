"""The cache benchmark's verdict (perf/cache_bench.py): the median of its rounds' ratios."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))
import cache_bench  # noqa: E402
from compare import Measurement  # noqa: E402


def run(target: str, concurrency: int, throughput: float, round_: int) -> cache_bench.Run:
    m = Measurement(target, "-", concurrency)
    m.throughput = throughput
    return cache_bench.Run(m, round=round_)


def rounds(*pairs: tuple[float, float], concurrency: int = 16) -> list[cache_bench.Run]:
    """(direct, gateway) throughputs, one pair per round."""
    return [
        r
        for n, (direct, gateway) in enumerate(pairs, 1)
        for r in (run(cache_bench.DIRECT, concurrency, direct, n), run(cache_bench.GATEWAY, concurrency, gateway, n))
    ]


@pytest.mark.parametrize(
    ("pairs", "passes"),
    [
        (((100, 110), (100, 90), (100, 105)), True),  # one round behind, the median ahead
        (((100, 95), (100, 130), (100, 99)), False),  # one round far ahead, the median behind
    ],
)
def test_the_target_is_judged_on_the_median_of_the_rounds_ratios(pairs: tuple, passes: bool) -> None:
    lines, ok = cache_bench.verdict_lines(rounds(*pairs), [16])
    assert ok is passes
    assert lines[0].startswith("c=16: gateway / direct throughput: round 1 ")
    assert f"median {sorted(g / d for d, g in pairs)[1]:.2f}" in lines[0]
    assert lines[0].endswith("PASS" if passes else "FAIL")


def test_a_round_without_its_pair_fails_the_target() -> None:
    runs = rounds((100, 120), (100, 120), (100, 120))[:-1]  # round 3's gateway run failed
    lines, ok = cache_bench.verdict_lines(runs, [16])
    assert not ok
    assert lines == ["c=16: gateway / direct throughput: N/A (missing measurement in round 3): FAIL"]


def test_a_single_pair_reads_as_before_rounds() -> None:
    runs = [run(cache_bench.DIRECT, 16, 100.0, 0), run(cache_bench.GATEWAY, 16, 120.0, 0)]
    lines, ok = cache_bench.verdict_lines(runs, [16, 32])
    assert lines == [
        "c=16: gateway / direct throughput = 120.0 / 100.0 = 1.20 (target > 1.0, the gateway ahead): PASS",
        "c=32: gateway / direct throughput: N/A (missing measurement): FAIL",
    ]
    assert not ok


def test_rounds_are_labelled_in_the_tables() -> None:
    assert run(cache_bench.DIRECT, 16, 1.0, 2).label == "direct (Triton cache), round 2"
    assert run(cache_bench.DIRECT, 16, 1.0, 0).label == "direct (Triton cache)"
