"""Tests of :mod:`hal.progress`: redrawn in place on a terminal, one final line anywhere else."""

from __future__ import annotations

import io

import pytest

from hal.progress import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_tty_writes_one_final_line() -> None:
    out = io.StringIO()
    with Progress(120, "loading", stream=out) as bar:
        for _ in range(37):
            bar.update()
        assert out.getvalue() == ""
    assert out.getvalue() == "loading: 37/120 tensors [00:00]\n"


def test_tty_redraws_in_place() -> None:
    out = _Tty()
    with Progress(3, "loading", stream=out, min_interval=0.0) as bar:
        bar.update()
        bar.update(2)
    text = out.getvalue()
    assert text.count("\r") == 4  # on entry, two updates, and the final line
    assert text.endswith("\rloading: 3/3 tensors [00:00]\n".replace("\r", "\r\x1b[K"))


def test_tty_throttles_redraws() -> None:
    out = _Tty()
    with Progress(1000, "x", stream=out, min_interval=3600.0) as bar:
        for _ in range(1000):
            bar.update()
    assert out.getvalue().count("\r") == 2  # the first draw and the last


def test_disabled_writes_nothing() -> None:
    out = _Tty()
    with Progress(5, "x", stream=out, enabled=False) as bar:
        bar.update(5)
    assert out.getvalue() == ""


def test_final_line_also_on_error() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), Progress(5, "x", stream=out) as bar:
        bar.update(2)
        raise RuntimeError("boom")
    assert out.getvalue() == "x: 2/5 tensors [00:00]\n"


def test_clock_format() -> None:
    bar = Progress(1, "x", unit="files", stream=io.StringIO())
    assert bar.line(now=bar._start + 3725) == "x: 0/1 files [1:02:05]"
