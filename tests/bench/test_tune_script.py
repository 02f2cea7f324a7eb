"""``bench/nvidia/tune.py`` without a GPU: its pure parts, and a whole sweep on the CPU backend under
Triton's interpreter (what the script does on a GPU, at the cpu-small shapes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hal.bench.shapes import Shape, ShapeSet
from tests.file_modules import loaded_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tune() -> Any:
    with loaded_module(ROOT / "bench" / "nvidia" / "tune.py", "hal_tune_script") as module:
        yield module


def test_the_grid_is_laid_over_the_tuned_config_which_comes_first(tune: Any) -> None:
    grid = tune.parse_grid(["BLOCK_N=256,512", "num_warps=4"])
    assert grid == {"BLOCK_N": [256, 512], "num_warps": [4]}
    tuned = {"BLOCK_M": 4, "BLOCK_N": 512, "num_warps": 4, "num_stages": 1}
    assert tune.configs(tuned, grid) == [tuned, {**tuned, "BLOCK_N": 256}]  # the tuned point is not repeated


def test_a_malformed_grid_item_is_refused(tune: Any) -> None:
    with pytest.raises(SystemExit, match="KEY=V1,V2"):
        tune.parse_grid(["BLOCK_N"])


def test_a_sweep_times_good_configs_and_reports_bad_ones(
    tune: Any, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two small cases: the interpreter runs each Triton program in Python, and the timer takes samples.
    tiny = ShapeSet(
        "tiny", "test", "float32", {"silu_and_mul": [Shape(f"T{t}-N256", {"t": t, "d": 256}) for t in (4, 9)]}
    )
    monkeypatch.setattr(tune, "shape_set", lambda name: tiny)
    out = tmp_path / "sweep.json"
    args = ["silu_and_mul", "--grid", "BLOCK_N=256,500", "--backend", "cpu", "--shapes", "tiny"]
    assert tune.main([*args, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["config"]["BLOCK_N"]: r for r in doc["rows"]}
    assert doc["op"] == "silu_and_mul" and doc["cases"] and set(rows) == {doc["tuned"]["BLOCK_N"], 256, 500}
    tuned = rows[doc["tuned"]["BLOCK_N"]]
    assert tuned["geomean_vs_tuned"] == 1.0 and not tuned["problems"]
    assert set(rows[256]["us"]) == set(doc["cases"]) and rows[256]["geomean_vs_tuned"] > 0
    # 500 is no power of two: Triton refuses the block, and the sweep says so instead of timing it.
    assert rows[500]["us"] == {} and rows[500]["geomean_vs_tuned"] is None
    assert all(rows[500]["problems"].values())
    assert "configs failed on some case" in capsys.readouterr().out
