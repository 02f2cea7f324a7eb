"""``bench/gemm/cpu_row_blocks.py`` at a tiny size: it runs, times both products at every row count asked
for, and reads the thresholds it prints from the CPU gemm itself."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hal_cpu.reference.gemm as ref
from tests.file_modules import loaded_module

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_prints_one_cell_per_row_count(capsys: Any) -> None:
    with loaded_module(ROOT / "bench" / "gemm" / "cpu_row_blocks.py", "hal_cpu_row_blocks_script") as script:
        script.main(["--shapes", "96x64,32x16", "--rows", "1,5", "--repeats", "1"])
    out = capsys.readouterr().out
    assert f"at rows {ref.ROW_BLOCKS_M.start}-{ref.ROW_BLOCKS_M.stop - 1} of x" in out
    lines = [line for line in out.splitlines() if re.match(r"\d+x\d+ \(", line)]
    assert [line.split(" ")[0] for line in lines] == ["96x64", "32x16"]
    for line in lines:
        cells = re.findall(r"M(\d+) ([\d.e-]+)/([\d.e-]+) ([\d.]+)x", line)
        assert [c[0] for c in cells] == ["1", "5"]
        assert all(float(c[1]) > 0 and float(c[2]) > 0 for c in cells)
