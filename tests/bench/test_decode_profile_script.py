"""``bench/nvidia/decode_profile.py`` on the CPU backend, small config, 2 steps: one line per (dtype, batch,
checked or not) with a positive median step, and the profile's host-time table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.file_modules import loaded_module

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_times_checked_and_unchecked_steps(capsys: Any) -> None:
    with loaded_module(ROOT / "bench" / "nvidia" / "decode_profile.py", "hal_decode_profile_script") as script:
        assert script.main(["--backend", "cpu", "--config", "small", "--dtypes", "float32", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"float32\s+batch (\d+): (checked|unchecked \(HAL_VALIDATE=0\))\s+median step\s+([\d.]+) ms", out)
    assert sorted((b, c.split()[0]) for b, c, _ in rows) == [
        ("1", "checked"), ("1", "unchecked"), ("8", "checked"), ("8", "unchecked")
    ]  # fmt: skip
    assert all(float(ms) > 0 for _, _, ms in rows)
    assert "float32, batch 1, 5 steps, by host time:" in out
