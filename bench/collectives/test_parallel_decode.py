"""Decode tokens/s of the tiny model on 2 gloo processes (``--tp 2``, ``--ep 2``, both) against one process.

Each layout is the real command, ``torchrun --nproc-per-node 2 -m hal.cli run --tp/--ep ... --json``
(rank 0's ``decode_tokens_per_s``: the decode loop timed from inside, collectives included; one
intra-op thread per rank), and the baselines are ``hal run --json`` in one process with one thread and
with the host's threads. Layouts run in turn, ``REPEATS`` times alternating, and the median is printed
with the greedy tokens' agreement; ratios are to one process with one thread (a core per process, as
each rank has).

What it shows on a CPU: the tiny model's decode step is a few milliseconds of small GEMMs; 2 ranks split
the weights each step reads, and every layer adds gloo round trips on loopback TCP (an ``all_reduce``
after attention and after the MLP under ``--tp``; ``ep_dispatch``, ``ep_combine`` and an
``all_reduce`` under ``--ep``), tens to hundreds of microseconds each. On a shared 2-core machine the
runs scatter widely (another process on a core stalls a 2-thread process or a rank): read the runs,
not only the medians.

Run: ``.venv/bin/python -m pytest bench/collectives/test_parallel_decode.py -q -s``;
``HAL_BENCH_JSON=PATH`` also writes the rows there.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hal.testing.dist import torchrun_command, torchrun_env

pytestmark = pytest.mark.distributed

TORCHRUN = Path(sys.executable).parent / "torchrun"
ARGS = ["--json", "-q", "--batch", "4", "--max-new-tokens", "32"]
LAYOUTS: dict[str, list[str]] = {
    "1 process": [],
    "1 process, 1 thread": [],
    "tp2": ["--tp", "2"],
    "ep2": ["--ep", "2"],
    "tp2-ep2": ["--tp", "2", "--ep", "2"],
}
REPEATS = 1 if os.environ.get("HAL_BENCH_QUICK", "") not in ("", "0") else 3


def _run(flags: list[str], threads: int | None = None) -> dict[str, Any]:
    env = torchrun_env(HAL_BACKEND="cpu")
    if flags:
        cmd = torchrun_command("-m", "hal.cli", "run", *flags, *ARGS)
        env["OMP_NUM_THREADS"] = "1"  # two ranks on the host's cores
    else:
        cmd = [sys.executable, "-m", "hal.cli", "run", *ARGS]
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def test_parallel_decode_tokens_per_s() -> None:
    if not TORCHRUN.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    rates: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(REPEATS):
        for name, flags in LAYOUTS.items():
            data = _run(flags, 1 if name.endswith("1 thread") else None)
            rates[name].append(float(data["decode_tokens_per_s"]))
            tokens[name] = data["tokens"]
    base = statistics.median(rates["1 process, 1 thread"])  # one core per process, as each rank has
    rows = []
    for name, rs in rates.items():
        med = statistics.median(rs)
        rows.append(
            {
                "layout": name,
                "decode_tokens_per_s": round(med, 1),
                "runs": [round(r, 1) for r in rs],
                "vs_1_process_1_thread": round(med / base, 3),
                "same_tokens": tokens[name] == tokens["1 process"],
            }
        )
    print(f"\ntiny model, batch 4, 32 new tokens, greedy, cpu/gloo, {os.cpu_count()} cores, median of {REPEATS}:")
    for r in rows:
        print(
            f"  {r['layout']:20s} {r['decode_tokens_per_s']:8.1f} decode tok/s"
            f"  ({r['vs_1_process_1_thread']:.2f}x of 1 process, 1 thread)  runs {r['runs']}"
            f"  same tokens: {r['same_tokens']}"
        )
    out = os.environ.get("HAL_BENCH_JSON")
    if out:
        Path(out).write_text(json.dumps({"parallel_decode": rows}, indent=2) + "\n")
    assert all(r["same_tokens"] for r in rows)
