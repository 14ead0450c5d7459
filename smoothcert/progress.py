"""A dependency-free progress bar for long CLI work, written to stderr.

On a terminal it redraws one line (at most ten times a second, and always when an item or a
stage completes), with the elapsed time and an estimate of the time left; elsewhere (CI, a
pipe) it prints one line per finished item with the same times, so logs stay readable. The
estimate counts the current item's stage progress (samples done of its stage), so it means
something from the first item on. A finished run's last line shows total/total.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.done, self.detail = 0, ""
        self.partial = 0.0  # the current item's fraction done, from its stage progress
        self.started = self._drawn = time.monotonic()

    def stage(self, stage: str, done: int, total: int) -> None:
        """Inner progress of the current item (a smoothing StageProgress)."""
        self.detail = f"{stage} {done:,}/{total:,}"
        self.partial = min(done / total, 1.0) if total > 0 else 0.0
        # A completed stage is always drawn: the last thing shown of it is total/total.
        if self.tty and (done >= total or time.monotonic() - self._drawn > 0.1):
            self._draw()

    def advance(self, note: str = "") -> None:
        """One item finished; `note` is printed with it when not on a terminal."""
        self.done += 1
        self.partial = 0.0
        self.detail = note
        if self.tty:
            self._draw()
        else:
            print(f"{self.label} {self.done}/{self.total} {note}".strip() + f" ({self._times()})",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self._draw()
            print(file=self.stream, flush=True)

    def eta(self) -> float | None:
        """Seconds left at the rate so far (items done plus the current item's stage
        fraction), or None before anything is done."""
        fraction = (self.done + self.partial) / max(self.total, 1)
        if fraction <= 0:
            return None
        if fraction >= 1:
            return 0.0
        return (time.monotonic() - self.started) * (1 - fraction) / fraction

    def _times(self) -> str:
        left = self.eta()
        return f"{time.monotonic() - self.started:.1f}s, eta " + ("?" if left is None else f"{left:.1f}s")

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        filled = int(self.width * min((self.done + self.partial) / max(self.total, 1), 1.0))
        bar = "#" * filled + "." * (self.width - filled)
        line = f"\r{self.label} [{bar}] {self.done}/{self.total} {self._times()} {self.detail}"
        self.stream.write(line[: 160].ljust(100))
        self.stream.flush()
