"""How busy this host's CPUs are: the share of their time spent busy, read from /proc/stat.

The batcher's hold (``[batching] hold_ms``) trades latency for fewer upstream batches. Fewer
batches save CPU: the gateway's own cost is largely per batch, and so is a model's when its
Triton shares the host. That saving is worth the wait only while the host's cores are short;
with cores to spare, a hold would only add latency. ``HostCpu.busy`` tells which, for
``hold_cpu_busy``.

The CPUs counted are those this process may run on (its affinity: a container given a set of
cores, or ``taskset``, counts those), all of the host's otherwise. A CPU quota (a container's
``cpu.max`` or ``cpu.cfs_quota_us``) is not seen: under one, set ``hold_cpu_busy = 0`` for a
hold whatever the load.

Read lazily: a caller asks at will, and the file is read again only once ``interval`` has passed
(a read and parse costs some tens of microseconds). The share is over the last full interval;
None until one has passed, or where /proc/stat cannot be read (not Linux).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

STAT = "/proc/stat"


def read_jiffies(path: str = STAT, cpus: frozenset[int] | None = None) -> tuple[int, int] | None:
    """(busy, total) CPU time since boot, in clock ticks, over ``cpus`` (None: all the host's,
    the file's first line); None if unreadable, or if none of ``cpus`` is listed."""
    try:
        with open(path, "rb") as f:
            lines = [f.readline()] if cpus is None else f.read().splitlines()
    except OSError:
        return None
    busy = total = 0
    counted = False
    for line in lines:
        fields = line.split()
        if len(fields) < 5 or not fields[0].startswith(b"cpu"):
            continue
        name = fields[0][3:]
        if cpus is None:
            if name:
                continue
        elif not name.isdigit() or int(name) not in cpus:
            continue
        try:
            # user nice system idle iowait irq softirq steal (guest time is within user already)
            ticks = [int(v) for v in fields[1:9]]
        except ValueError:
            return None
        all_ticks = sum(ticks)
        total += all_ticks
        busy += all_ticks - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # idle, iowait
        counted = True
    return (busy, total) if counted else None


def allowed_cpus() -> frozenset[int] | None:
    """The CPUs this process may run on, where that is fewer than the host has; else None."""
    try:
        mine = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    return frozenset(mine) if len(mine) < (os.cpu_count() or 0) else None


class HostCpu:
    def __init__(
        self,
        interval: float = 0.5,
        read: Callable[[], tuple[int, int] | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        if read is None:
            cpus = allowed_cpus()
            read = lambda: read_jiffies(STAT, cpus)  # noqa: E731
        self._read = read
        self._clock = clock
        self._last = read()
        self._at = clock()
        self._busy: float | None = None

    def busy(self) -> float | None:
        """The share (0 to 1) of all cores' time spent busy over the last interval."""
        now = self._clock()
        if now - self._at >= self._interval:
            sample = self._read()
            if sample is not None and self._last is not None and sample[1] > self._last[1]:
                self._busy = min(1.0, max(0.0, (sample[0] - self._last[0]) / (sample[1] - self._last[1])))
            elif sample is None:
                self._busy = None
            self._last, self._at = sample, now
        return self._busy
