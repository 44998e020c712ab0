"""A small progress line for long work (profiling, solving, training) on stderr.

On a terminal it redraws one line; otherwise (CI logs, pipes) it logs a line at start, at most
every ``every_s`` seconds, and at the end, so logs stay short. ``enabled=False`` silences it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None, every_s: float = 2.0):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label, self.total, self.done = "", 0, 0
        self.t0 = self.last = 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.t0 = self.last = time.perf_counter()
        self._draw("", force=True)

    def advance(self, what: str = "", n: int = 1) -> None:
        self.done += n
        self._draw(what)

    def finish(self, summary: str = "") -> None:
        self.done = self.total
        self._draw(summary, force=True, end=True)

    def _draw(self, what: str, *, force: bool = False, end: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and not self.tty and now - self.last < self.every_s:
            return
        self.last = now
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        line = f"{self.label} [{bar}] {self.done}/{self.total} {now - self.t0:5.1f}s {what}"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120) + ("\n" if end else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
