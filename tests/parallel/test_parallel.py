"""Tensor- and expert-parallel runs on 2 gloo processes against one process, on the tiny config.

Two kinds of launches, started together (one group start each, a few seconds):

- ``torchrun --nproc-per-node 2 worker.py OUT CKPT``: one job that, for every layout of
  :data:`worker.LAYOUTS` (``--tp 2``, ``--ep 2`` with its decode in ``ep_dispatch``'s low-latency mode
  and again with every step in the normal mode, both; FP8 weights under ``--tp 2`` and under ``--ep 2``;
  a one-token batch, fewer tokens than ranks; the expanded MLA decode under ``--tp 2``; and both with
  each rank reading its shard of a checkpoint without q LoRA and with tied embeddings), writes each
  rank's prefill and decode logits and greedy tokens; this test computes the same in one process
  (``worker.run``) and compares: logits within 1e-5 relative (fp32), the same tokens, both ranks alike.
- ``torchrun --nproc-per-node 2 -m hal.cli run --tp/--ep ... --json --backend cpu``: the real command
  prints one JSON document (rank 0 only) with the same greedy tokens as ``hal run --json --backend cpu``
  in one process.
- ``torchrun ... -m hal.cli run --tp 2 --quantize fp8``: refused before the rendezvous with one message
  (rank 0's) saying no ``--tp`` above 1 fits the tiny model's FP8 blocks.

Every launch is ``torchrun --standalone`` (:func:`hal.testing.dist.torchrun_command`): the agent binds
its rendezvous port itself, so the launches started together cannot collide on one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import hal
from hal.cli import main
from hal.testing.dist import torchrun_command, torchrun_env
from tests.file_modules import load_module

pytestmark = pytest.mark.distributed

HERE = Path(__file__).parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
LAUNCH_TIMEOUT_S = 180.0
TOL = 1e-5
# FP8 activations are quantized per 128 values: an input that differs from one process's in its last
# bit (the all-reduce sums in another order) can round to the neighbouring FP8 value, a ~1e-3 change.
FP8_TOL = 1e-2
RUN_ARGS = ["--json", "--batch", "3", "--max-new-tokens", "10", "--no-warmup", "-q", "--backend", "cpu"]
CLI_LAYOUTS = {"tp2": ["--tp", "2"], "ep2": ["--ep", "2"], "tp2-ep2": ["--tp", "2", "--ep", "2"]}


worker = load_module(HERE / "worker.py", "parallel_worker")


def _torchrun(*args: str) -> subprocess.Popen[str]:
    env = torchrun_env(HAL_BACKEND="cpu", HAL_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
    cmd = torchrun_command(*args)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str], deadline: float, *, check: bool = True) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args}: no result within {LAUNCH_TIMEOUT_S:.0f} s (a hang?)\n{out}\n{err}")
    if check:
        assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}\n{out}\n{err}"
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every 2-process launch of this module, run concurrently: the worker's output directory, each
    ``hal run`` layout's stdout, and the refused FP8 run's ``(exit status, stdout, stderr)``."""
    if not TORCHRUN.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    out_dir = tmp_path_factory.mktemp("parallel")
    ckpt = worker.write_checkpoint(out_dir / "ckpt")
    procs = {"worker": _torchrun(str(HERE / "worker.py"), str(out_dir), str(ckpt))}
    for name, flags in CLI_LAYOUTS.items():
        procs[name] = _torchrun("-m", "hal.cli", "run", *flags, *RUN_ARGS)
    procs["fp8-refused"] = _torchrun("-m", "hal.cli", "run", "--tp", "2", "--quantize", "fp8", *RUN_ARGS)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        results: dict[str, Any] = {
            name: _finish(proc, deadline, check=name != "fp8-refused") for name, proc in procs.items()
        }
        for name in ("worker", *CLI_LAYOUTS):
            results[name] = results[name][1]  # stdout
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results["worker"] = out_dir
    results["ckpt"] = ckpt
    yield results


@pytest.fixture(scope="module")
def one_process_run() -> dict[str, Any]:
    """``hal run --json`` in this process (one process, no torchrun)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["run", *RUN_ARGS]) == 0
    data: dict[str, Any] = json.loads(buf.getvalue())
    return data


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("layout", list(worker.LAYOUTS))
def test_logits_and_tokens_match_one_process(layout: str, launches: dict[str, Any]) -> None:
    ranks = [load_file(str(launches["worker"] / f"{layout}-rank{r}.safetensors")) for r in range(2)]
    want = worker.run(worker.build(layout, hal.get_backend("cpu"), None, launches["ckpt"]), layout)
    tol = FP8_TOL if worker.LAYOUTS[layout].quantize == "fp8" else TOL
    for key, ref in want.items():
        if key == "weight_bytes":
            # Each rank holds its share: less than the whole model's linear weights.
            assert all(int(r[key]) < int(ref) for r in ranks), (layout, [int(r[key]) for r in ranks], int(ref))
            continue
        for rank, got in enumerate(ranks):
            assert torch.equal(got[key], ranks[0][key]), f"{layout}: {key}: rank {rank} differs from rank 0"
        if key == "greedy":
            assert ranks[0][key].tolist() == ref.tolist(), layout
        else:
            err = _rel_err(ranks[0][key], ref)
            assert err <= tol, f"{layout}: {key}: relative error {err:.2e} > {tol:g}"


@pytest.mark.parametrize("layout", list(CLI_LAYOUTS))
def test_hal_run_prints_one_document_with_the_same_tokens(
    layout: str, launches: dict[str, Any], one_process_run: dict[str, Any]
) -> None:
    data = json.loads(launches[layout])  # one JSON document: only rank 0 printed
    assert data["backend"] == one_process_run["backend"] == "cpu"
    assert data["tokens"] == one_process_run["tokens"]
    assert data["prompts"] == one_process_run["prompts"]
    assert set(data) == set(one_process_run)
    flags = CLI_LAYOUTS[layout]
    assert one_process_run["tp"] == one_process_run["ep"] == 1
    assert (data["tp"], data["ep"]) == (2 if "--tp" in flags else 1, 2 if "--ep" in flags else 1)


def test_fp8_split_off_the_blocks_is_refused_before_the_rendezvous_once(launches: dict[str, Any]) -> None:
    code, out, err = launches["fp8-refused"]
    assert code != 0 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("hal run: error:")]
    assert len(errors) == 1, err  # rank 0 says it; rank 1 exits without repeating it
    assert errors[0].startswith("hal run: error: rank 0/2: --tp 2 with FP8 weights:"), errors[0]
    assert "no --tp above 1 splits it on block boundaries" in errors[0]
    assert "Run with --tp 1" in errors[0]
