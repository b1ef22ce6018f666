"""The driver's progress line: shards done, bytes read and written, throughput, ETA."""

from __future__ import annotations

import sys
import threading
import time


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Thread-safe counters, rendered on stderr: redrawn in place on a terminal, a line every
    ``interval`` seconds otherwise (logs of ``ray job submit``)."""

    def __init__(self, units: int, read_total: int, write_total: int, enabled: bool = True, interval: float = 10.0):
        self.units, self.read_total, self.write_total = units, read_total, write_total
        self.done = self.read = self.written = 0
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.interval = 0.2 if self.tty else interval
        self.started = time.monotonic()
        self.began: float | None = None  # when the first unit was handed to a worker
        self._last = 0.0
        self._lock = threading.Lock()

    def begin(self) -> None:
        """Mark the start of the data movement (after planning, claiming and worker start-up)."""
        if self.began is None:
            self.began = time.monotonic()

    def add(self, read: int = 0, written: int = 0, units: int = 0) -> None:
        with self._lock:
            self.read += read
            self.written += written
            self.done += units
        self.render()

    def line(self) -> str:
        elapsed = max(1e-6, time.monotonic() - (self.began or self.started))
        moved = self.read + self.written
        total = self.read_total + self.write_total
        rate = moved / elapsed
        eta = (total - moved) / rate if rate > 0 and total > moved else 0.0
        return (
            f"nyxray: shards {self.done}/{self.units} | read {human(self.read)}/{human(self.read_total)} "
            f"| written {human(self.written)}/{human(self.write_total)} | {human(rate)}/s | ETA {eta:.0f}s"
        )

    def render(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._last < self.interval:
            return
        self._last = now
        if self.tty:
            sys.stderr.write("\r" + self.line() + ("\n" if final else ""))
        else:
            sys.stderr.write(self.line() + "\n")
        sys.stderr.flush()
