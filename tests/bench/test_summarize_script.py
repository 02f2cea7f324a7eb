"""``bench/collectives/summarize.py``: per-run medians and ratios of HAL over each baseline, from
pytest-benchmark files made up here (two runs of one set, one of another)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hal.bench.collectives import REMOTE_ROWS
from tests.file_modules import loaded_module

ROOT = Path(__file__).resolve().parents[2]
IMPLS = ("hal", "hal-ll", "torch.distributed.all_to_all_single", REMOTE_ROWS)


def _run(shape: str, seconds: dict[str, float]) -> dict[str, Any]:
    benches = [
        {
            "stats": {"median": t},
            "extra_info": {"op": "ep_dispatch", "shape": shape, "impl": impl, "bytes": 1000.0, "wire_bytes": 10.0},
        }
        for impl, t in seconds.items()
    ]
    machine = {"node": "host", "cpu": {"brand_raw": "test cpu", "count": 2}, "python_version": "3.11"}
    return {"machine_info": machine, "datetime": f"2026-11-23T09:{len(shape):02d}:30+00:00", "benchmarks": benches}


def test_ratios_are_per_run_and_their_median_is_recorded(tmp_path: Path) -> None:
    runs = [
        _run("small", dict(zip(IMPLS, (4e-3, 2e-3, 2e-3, 1e-3), strict=True))),
        _run("small", dict(zip(IMPLS, (6e-3, 2e-3, 2e-3, 2e-3), strict=True))),
        _run("large", dict(zip(IMPLS, (1.0, 1.0, 1.0, 0.5), strict=True))),
    ]
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "summary.json"
    with loaded_module(ROOT / "bench" / "collectives" / "summarize.py", "hal_summarize_script") as script:
        assert script.main([*map(str, paths), "--out", str(out), "--command", "made up", "--note", "n"]) == 0
    summary = json.loads(out.read_text())
    assert summary["command"] == "made up" and summary["notes"] == ["n"]
    # The runs' own dates (the "large" run is the latest) and machine, not the summarizing moment's.
    assert summary["date"] == "2026-11-23T09:05Z" and summary["first_run"] == "2026-11-23T09:05Z"
    assert summary["machine"]["cores"] == 2
    small, large = summary["rows"]["ep_dispatch small"], summary["rows"]["ep_dispatch large"]
    assert small["hal_us"] == [4000, 6000] and small["baseline_remote_us"] == [1000, 2000]
    assert small["hal_over_baseline"] == [2.0, 3.0] and small["median_hal_over_baseline"] == 2.5
    assert small["hal_over_baseline_remote"] == [4.0, 3.0] and small["median_hal_over_baseline_remote"] == 3.5
    assert small["hal_ll_over_baseline_remote"] == [2.0, 1.0]
    assert large["hal_us"] == [1_000_000] and large["median_hal_over_baseline_remote"] == 2.0
    assert small["formula_bytes"] == 1000 and small["baseline_remote_wire_bytes"] == 10
