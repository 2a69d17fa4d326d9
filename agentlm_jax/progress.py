"""Progress that suits where it goes: a tqdm bar on a terminal, plain log lines with an ETA in a log file.

    with Progress(total=steps, initial=start, desc="train", unit="step", enabled=show) as bar:
        bar.update(1)
        bar.set_postfix(loss="1.93")

Off a terminal (stderr piped to a file, as under nohup or `tpu/run.sh`), a redrawn bar leaves carriage returns
and cursor codes in the log; there it logs one line every `every_s` seconds and one at the end instead:
`train: 120/2000 step (6%), 0.82 step/s, ETA 38m11s, loss=1.93`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Iterator, TextIO

log = logging.getLogger(__name__)


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """tqdm on a terminal; otherwise a log line every `every_s` seconds and at close; nothing when disabled."""

    def __init__(self, total: int | None, *, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 every_s: float = 30.0, terminal: bool | None = None, logger: logging.Logger | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.enabled, self.every_s = enabled, every_s
        self.logger = logger or log
        self.postfix: dict[str, Any] = {}
        self._start_n, self._start = initial, time.monotonic()
        self._last_line = self._start
        self._closed = False
        self._bar = None
        if enabled and (is_terminal() if terminal is None else terminal):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    @property
    def is_bar(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last_line >= self.every_s:
            self._log_line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(refresh=False, **values)

    def line(self) -> str:
        """The plain progress line for the current count."""
        elapsed = time.monotonic() - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({self.n / self.total:.0%})"
        else:
            text += f" {self.unit}"
        text += f", {rate:.3g} {self.unit}/s"
        if self.total and rate > 0 and self.n < self.total:
            text += f", ETA {format_duration((self.total - self.n) / rate)}"
        elif self.total and self.n >= self.total:
            text += f", took {format_duration(elapsed)}"
        if self.postfix:
            text += ", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def _log_line(self) -> None:
        self._last_line = time.monotonic()
        self.logger.info("%s", self.line())

    @contextlib.contextmanager
    def logging_redirected(self) -> Iterator[None]:
        """Log records printed above the bar (not through it) while a bar is shown."""
        if self._bar is None:
            yield
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            yield

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n > self._start_n:
            self._log_line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
