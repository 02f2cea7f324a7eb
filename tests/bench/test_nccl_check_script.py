"""``bench/nvidia/nccl_check.py`` on the CPU backend (gloo), under the real torchrun with 2 processes: every
check passes, rank 0 alone reports, and its JSON names the transport and holds every rank's verdicts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hal.testing.dist import torchrun_command, torchrun_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "nvidia" / "nccl_check.py"

pytestmark = pytest.mark.distributed


def test_every_collective_check_passes_on_two_gloo_ranks(tmp_path: Path) -> None:
    try:
        cmd = torchrun_command(str(SCRIPT), "--backend", "cpu", "--json", str(tmp_path / "out.json"))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    env = torchrun_env(HAL_BACKEND="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "11/11 checks passed on 2 rank(s) over gloo" in proc.stdout
    assert proc.stdout.count("ok     ep_dispatch/combine") == 4  # printed once, by rank 0
    summary = json.loads((tmp_path / "out.json").read_text())
    assert (summary["dist_backend"], summary["world_size"]) == ("gloo", 2)
    assert [set(v.values()) for v in summary["verdicts"]] == [{"ok"}, {"ok"}]
