"""A progress bar on stderr for long work (format, check, delete sweeps).

Rules: it never writes to stdout (which carries results and --json), it is
silent when stderr is not a terminal (logs and CI stay clean), and it only
appears once the work has lasted `delay` seconds, so quick runs print
nothing extra.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]

_WIDTH = 30  # characters of bar between the brackets


class Progress:
    """Context manager that shows `label [####    ] 42% done/total rate/s`."""

    def __init__(
        self,
        total: int,
        label: str,
        *,
        stream: TextIO | None = None,
        delay: float = 0.5,
        enabled: bool | None = None,
    ) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.delay = delay
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = 0
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._drawn:
            if exc_type is None:
                self.done = self.total
                self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def advance(self, amount: int = 1) -> None:
        """Record `amount` more units of work done."""
        self.done += amount
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._start < self.delay or now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self._draw()

    @property
    def rate(self) -> float:
        """Units of work done per second so far."""
        elapsed = time.monotonic() - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _draw(self) -> None:
        fraction = min(self.done / self.total, 1.0)
        filled = int(fraction * _WIDTH)
        bar = "#" * filled + " " * (_WIDTH - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {fraction:4.0%} {self.done}/{self.total}"
            f" {_per_second(self.rate)}"
        )
        self.stream.flush()
        self._drawn = True


def _per_second(rate: float) -> str:
    """A rate as "12/s", "3.4k/s", "5.6M/s"."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if rate >= scale:
            return f"{rate / scale:.1f}{suffix}/s"
    return f"{rate:.0f}/s"
