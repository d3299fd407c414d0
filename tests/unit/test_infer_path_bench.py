"""perf/infer_path.py, the in-process diagnostic of the infer path, runs and measures what it names."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))
import infer_path  # noqa: E402


def test_a_short_run_measures_each_path_and_the_hits_are_answered_from_the_cache(capsys: pytest.CaptureFixture[str]) -> None:
    assert infer_path.main(["--rounds", "4", "--repeats", "2"]) == 0  # hit_cost raises unless answered "x-cache: hit"
    out = capsys.readouterr().out
    costs = [float(m) for m in re.findall(r":\s+([0-9.]+)$", out, re.M)]
    assert len(costs) == 3 and all(c > 0 for c in costs), out
    assert "a cache hit through its HTTP protocol" in out
