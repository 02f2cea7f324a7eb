"""A small, dependency-free progress display on stderr (used while loading checkpoints).

On a terminal the line ``desc: 37/120 tensors [00:02]`` is redrawn in place with ``\\r`` (at most ten
times a second, so a checkpoint of 90 000 tensors does not spend its time drawing); anywhere else (a log
file, CI, a pipe) only one final line is written, so logs hold no carriage-return noise.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Count work done towards ``total`` and show it on stderr.

    Use as a context manager; the display is finished (final count, newline) on exit, also when the
    block raises, so the count reached is visible above the traceback.

    :param total: units of work expected.
    :param desc: what is being done (``"loading weights"``).
    :param unit: what a unit is called in the display.
    :param stream: where to write; ``None`` means ``sys.stderr`` as it is when the object is made.
    :param enabled: ``False`` writes nothing at all.
    :param min_interval: least seconds between two redraws on a terminal.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "tensors",
        stream: TextIO | None = None,
        enabled: bool = True,
        min_interval: float = 0.1,
    ) -> None:
        if total < 0:
            raise ValueError(f"Progress: total must be >= 0, got {total}")
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._tty = enabled and _isatty(self._stream)
        self._min_interval = min_interval
        self._start = time.monotonic()
        self._last_draw = float("-inf")
        self._closed = False

    def __enter__(self) -> Progress:
        self._start = time.monotonic()
        if self._tty:
            self._draw(end="")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done (redraws on a terminal when enough time has passed)."""
        self.n += n
        if self._tty and not self._closed:
            now = time.monotonic()
            if now - self._last_draw >= self._min_interval:
                self._draw(end="", now=now)

    def close(self) -> None:
        """Write the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(end="\n")

    def line(self, now: float | None = None) -> str:
        """The text shown: ``desc: n/total unit [mm:ss]``."""
        elapsed = (time.monotonic() if now is None else now) - self._start
        return f"{self.desc}: {self.n}/{self.total} {self.unit} [{_clock(elapsed)}]"

    def _draw(self, *, end: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last_draw = now
        # "\r" and the clearing escape only make sense on a terminal.
        prefix = "\r\x1b[K" if self._tty else ""
        self._stream.write(prefix + self.line(now) + end)
        self._stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed stream, or a stand-in without isatty
        return False


def _clock(seconds: float) -> str:
    s = round(seconds)  # not int(): (start + 5.0) - start can come out as 4.999...
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
