"""Progress as plain log lines (no redraws, so log files stay readable): done of total, rate and ETA.

Each line is written at most every `every_s` seconds, and once when the total is reached. Counters shared
by a process's worker threads (the local runner's default) are thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def amount(n: float, unit: str) -> str:
    if unit == "bytes":
        return f"{n / 2**20:,.1f} MB"
    return f"{int(n):,} {unit}"


class Progress:
    """`add(n)` / `set(done)` a count; logs "WHAT: done of total (P%), rate, ETA" now and then."""

    def __init__(self, log: logging.Logger, what: str, total: int | None = None, unit: str = "records",
                 every_s: float = 15.0):
        self.log, self.what, self.total, self.unit, self.every_s = log, what, total, unit, every_s
        self.done, self.start, self.last, self.final = 0, time.monotonic(), time.monotonic(), False
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            self._maybe_log()

    def set(self, done: int, total: int | None = None) -> None:
        with self._lock:
            self.done = done
            self.total = total if total is not None else self.total
            self._maybe_log()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if self.total is not None and self.done >= self.total:
            if not self.final:
                self.final = True
                self.log.info("%s", self.line(now))
        elif now - self.last >= self.every_s:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.what}: {amount(self.done, self.unit)}"
        if self.total:
            text += f" of {amount(self.total, self.unit)} ({100 * self.done / self.total:.0f}%)"
        text += f", {amount(rate, self.unit)}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        return text + f", {duration(elapsed)} elapsed"


_SHARED: dict[tuple, Progress] = {}
_SHARED_LOCK = threading.Lock()


def shared(key: tuple, log: logging.Logger, what: str, total: int | None, unit: str = "records") -> Progress:
    """One Progress per `key` in this process (its worker threads share it); a new key (the next run's)
    replaces the old ones."""
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED.clear()
            _SHARED[key] = Progress(log, what, total, unit)
        return _SHARED[key]
