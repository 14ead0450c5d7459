"""A dependency-free progress bar for long CLI work, written to stderr.

On a terminal it redraws one line (at most ten times a second); elsewhere (CI, a pipe) it
prints one line per finished item, so logs stay readable.
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
        self.started = self._drawn = time.monotonic()

    def stage(self, stage: str, done: int, total: int) -> None:
        """Inner progress of the current item (a smoothing StageProgress)."""
        self.detail = f"{stage} {done:,}/{total:,}"
        if self.tty and time.monotonic() - self._drawn > 0.1:
            self._draw()

    def advance(self, note: str = "") -> None:
        """One item finished; `note` is printed with it when not on a terminal."""
        self.done += 1
        self.detail = note
        if self.tty:
            self._draw()
        else:
            print(f"{self.label} {self.done}/{self.total} {note}".strip(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self._draw()
            print(file=self.stream, flush=True)

    def _draw(self) -> None:
        self._drawn = now = time.monotonic()
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        line = f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s eta {eta:5.1f}s {self.detail}"
        self.stream.write(line[: 160].ljust(100))
        self.stream.flush()
