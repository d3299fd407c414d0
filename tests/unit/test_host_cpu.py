"""The host's CPU load, as the batcher's hold reads it: /proc/stat parsed, shares over intervals."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.host_cpu import HostCpu, read_jiffies


def test_read_jiffies_counts_idle_and_iowait_as_not_busy(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 5 50 800 40 3 2 0 7 0\ncpu0 50 2 25 400 20 1 1 0 3 0\nintr 1 2 3\n")
    assert read_jiffies(str(stat)) == (160, 1000)


def test_read_jiffies_counts_only_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  300 0 0 700 0 0 0 0 0 0\n"
        "cpu0 10 0 0 90 0 0 0 0 0 0\n"
        "cpu1 90 0 0 10 0 0 0 0 0 0\n"
        "cpu2 200 0 0 600 0 0 0 0 0 0\n"
        "cpu3 1 2 3 4\n"  # an older kernel's four fields
        "intr 1 2 3\n"
    )
    assert read_jiffies(str(stat), frozenset({1})) == (90, 100)
    assert read_jiffies(str(stat), frozenset({0, 1})) == (100, 200)
    assert read_jiffies(str(stat), frozenset({3})) == (6, 10)
    assert read_jiffies(str(stat), frozenset({7})) is None  # none of them listed


@pytest.mark.parametrize("text", ["", "intr 1 2 3\n", "cpu  1 2 x 4 5\n", "cpu 1 2\n"])
def test_read_jiffies_is_none_for_what_it_cannot_read(tmp_path: Path, text: str) -> None:
    stat = tmp_path / "stat"
    stat.write_text(text)
    assert read_jiffies(str(stat)) is None
    assert read_jiffies(str(tmp_path / "missing")) is None


def test_read_jiffies_reads_this_hosts_stat() -> None:
    busy, total = read_jiffies() or (None, None)
    assert busy is not None and total is not None and 0 <= busy <= total


def test_busy_is_the_share_over_the_last_full_interval() -> None:
    now = [0.0]
    samples = iter([(100, 1000), (150, 1100), (150, 1200), (250, 1300)])
    cpu = HostCpu(interval=0.5, read=lambda: next(samples), clock=lambda: now[0])
    assert cpu.busy() is None  # no interval has passed yet
    now[0] = 0.4
    assert cpu.busy() is None  # nor read again before one has
    now[0] = 0.5
    assert cpu.busy() == pytest.approx(0.5)  # 50 of 100 ticks busy
    now[0] = 0.9
    assert cpu.busy() == pytest.approx(0.5)  # the same until the next interval
    now[0] = 1.0
    assert cpu.busy() == 0.0
    now[0] = 1.5
    assert cpu.busy() == pytest.approx(1.0)


def test_busy_is_unknown_once_the_file_cannot_be_read() -> None:
    now = [0.0]
    samples = iter([(100, 1000), (150, 1100), None, (300, 1300), (400, 1400)])
    cpu = HostCpu(interval=0.5, read=lambda: next(samples), clock=lambda: now[0])
    now[0] = 0.5
    assert cpu.busy() == pytest.approx(0.5)
    now[0] = 1.0
    assert cpu.busy() is None
    now[0] = 1.5
    assert cpu.busy() is None  # no sample to compare with yet
    now[0] = 2.0
    assert cpu.busy() == pytest.approx(1.0)
