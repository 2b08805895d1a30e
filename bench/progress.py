"""A progress bar on stderr for long benchmark runs (only when stderr is a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, stream=None) -> None:
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.start = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            width = 30
            filled = width * self.done // max(1, self.total)
            elapsed = time.monotonic() - self.start
            self.stream.write(f"\r{self.label:>12s} [{'=' * filled}{' ' * (width - filled)}] "
                              f"{self.done}/{self.total} {elapsed:6.1f} s")  # fmt: skip
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
