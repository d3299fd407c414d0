"""How busy this host's CPUs are: the share of all cores' time spent busy, read from /proc/stat.

The batcher's hold (``[batching] hold_ms``) trades latency for fewer upstream batches. Fewer
batches save CPU: the gateway's own cost is largely per batch, and so is a model's when its
Triton shares the host. That saving is worth the wait only while the host's cores are short;
with cores to spare, a hold would only add latency. ``HostCpu.busy`` tells which, for
``hold_cpu_busy``.

Read lazily: a caller asks at will, and the file is read again only once ``interval`` has passed
(a read and parse costs some tens of microseconds). The share is over the last full interval;
None until one has passed, or where /proc/stat cannot be read (not Linux).
"""

from __future__ import annotations

import time
from collections.abc import Callable

STAT = "/proc/stat"


def read_jiffies(path: str = STAT) -> tuple[int, int] | None:
    """(busy, total) CPU time over all cores since boot, in clock ticks; None if unreadable."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except OSError:
        return None
    fields = line.split()
    if len(fields) < 5 or fields[0] != b"cpu":
        return None
    try:
        # user nice system idle iowait irq softirq steal (guest time is within user already)
        ticks = [int(v) for v in fields[1:9]]
    except ValueError:
        return None
    total = sum(ticks)
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return total - idle, total


class HostCpu:
    def __init__(
        self,
        interval: float = 0.5,
        read: Callable[[], tuple[int, int] | None] = read_jiffies,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
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
