"""``bench/collectives/torchrun_bench.py`` under the real torchrun, 2 gloo processes, the small shape set and 2
rounds a case: every (op, shape, implementation) gets a row from rank 0 alone, with a positive time, the
byte counts of :mod:`hal.bench.collectives`, and HAL's time over the baseline's for HAL's rows."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hal.bench.collectives import HAL_IMPLS, IMPLS, op_shapes
from hal.bench.shapes import shape_set
from hal.testing.dist import torchrun_command, torchrun_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "collectives" / "torchrun_bench.py"

pytestmark = pytest.mark.distributed


def test_every_case_gets_a_row_on_two_gloo_ranks(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    args = [str(SCRIPT), "--backend", "cpu", "--shapes", "cpu-small", "--rounds", "2", "--json", str(out)]
    try:
        cmd = torchrun_command(*args)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    proc = subprocess.run(cmd, env=torchrun_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    result = json.loads(out.read_text())
    assert (result["dist_backend"], result["world_size"], result["shapes"]) == ("gloo", 2, "cpu-small")
    shapes = shape_set("cpu-small")
    want = [(op, s.id, impl) for op in IMPLS for s in op_shapes(shapes, op) for impl in IMPLS[op]]
    rows = result["rows"]
    assert [(r["op"], r["shape"], r["impl"]) for r in rows] == want
    for r in rows:
        assert r["seconds"] > 0 and r["rounds"] == 2 and r["bytes"] > 0
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)
        assert ("over_baseline" in r) == (r["impl"] in HAL_IMPLS)
        assert ("over_remote_rows" in r) == (r["impl"] in HAL_IMPLS and r["op"].startswith("ep_"))
        assert ("wire_bytes" in r) == r["op"].startswith("ep_")
    # One table, printed by rank 0 only: a line per row.
    assert sum(line.startswith(("all_reduce ", "all_to_all ", "ep_dispatch ", "ep_combine ")) for line in
               proc.stdout.splitlines()) == len(rows)  # fmt: skip
