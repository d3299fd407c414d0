"""A small progress bar and the summary tables printed at the end of each command.

On a terminal the bar redraws in place (`epoch 3/40 |██████░░░░| 12/19 312 samples/s loss 0.31
acc 0.91`); when output goes to a file or a pipe it prints one line per bar when the bar closes,
so logs stay readable. No dependency: tqdm is not part of the environment.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import IO, Any

BAR_WIDTH = 24


class Progress:
    def __init__(self, total: int, desc: str, *, unit: str = "samples", enabled: bool = True, stream: IO[str] | None = None):
        self.total = max(1, total)
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and self.stream.isatty()
        self.steps = 0
        self.units = 0
        self.postfix: dict[str, Any] = {}
        self.started = time.perf_counter()
        self._last_draw = 0.0

    def update(self, steps: int = 1, units: int = 0, **postfix: Any) -> None:
        self.steps += steps
        self.units += units
        self.postfix.update(postfix)
        if self.tty:
            now = time.perf_counter()
            if now - self._last_draw > 0.05 or self.steps >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self.line())
                self.stream.flush()

    def set(self, **postfix: Any) -> None:
        self.postfix.update(postfix)

    def line(self) -> str:
        done = min(self.steps, self.total)
        filled = int(BAR_WIDTH * done / self.total)
        bar = "█" * filled + "░" * (BAR_WIDTH - filled)
        elapsed = time.perf_counter() - self.started
        rate = f" {self.units / elapsed:,.0f} {self.unit}/s" if self.units and elapsed > 0 else ""
        extra = "".join(f" {k} {_fmt(v)}" for k, v in self.postfix.items())
        return f"{self.desc} |{bar}| {done}/{self.total} {elapsed:5.1f}s{rate}{extra}"

    def close(self) -> None:
        if not self.enabled:
            return
        self.stream.write(("\r" if self.tty else "") + self.line() + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with aligned columns: readable in a terminal and pasteable into docs."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def render(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    lines = [render(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [render(r) for r in cells[1:]])


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
