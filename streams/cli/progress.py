"""Progress of long runs (replay, archive), drawn by tqdm.

On a terminal the bar is redrawn in place a few times a second. Anywhere else (a log file,
CI, `kubectl logs`) it is one plain line every `LOG_INTERVAL_S` seconds, and a last line at
the end: tqdm's carriage-return redraws would otherwise pile up on one endless line.
"""
from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm

#: Seconds between lines when the output is not a terminal.
LOG_INTERVAL_S = 5.0
BAR_FORMAT = "{desc} [{bar:30}] {percentage:5.1f}% {n:,}/{total:,} events {rate_fmt} ETA {remaining}"


class _Lines:
    """A file for tqdm that turns each redraw into a line of its own."""

    def __init__(self, out: IO[str]):
        self.out = out

    def write(self, text: str) -> None:
        for part in text.split("\r"):
            line = part.rstrip()
            if line:
                self.out.write(line + "\n")

    def flush(self) -> None:
        self.out.flush()


class Progress:
    """done/total events, events/s and the time left, for a run of `total` events."""

    def __init__(self, total: int, label: str, out: IO[str] = sys.stderr):
        tty = out.isatty()
        self.started = time.monotonic()
        self.bar = tqdm(total=max(total, 1), desc=label, file=out if tty else _Lines(out),
                        mininterval=0.25 if tty else LOG_INTERVAL_S, miniters=1,
                        ascii=None if tty else " #", bar_format=BAR_FORMAT, unit="ev")

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def finish(self) -> float:
        """Draw the final line; returns the elapsed seconds."""
        self.bar.close()
        return time.monotonic() - self.started
