"""Tests of :mod:`hal.distributed`: start-up from torchrun's environment, and failures that must not hang.

The 2-process tests spawn workers with torchrun's variables set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``: :func:`hal.testing.dist.run_ranks`) that call
:func:`hal.distributed.init` and return what they saw; the test then asserts on each rank's result. One
test runs the real ``torchrun``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import hal
import hal.distributed as hd
from hal.errors import CollectiveError, OpInputError
from hal.testing.dist import run_ranks, torchrun_command, torchrun_env

WORLD = 2
JOIN_TIMEOUT_S = 60.0
FAIL_TIMEOUT_S = 5.0  # the collective timeout of the failure tests
MARGIN_S = 10.0  # what the failure tests allow on top of it


# -- worker bodies: each runs in a spawned process and returns a JSON-able result ----------------------


def _work_init_all_reduce(rank: int) -> dict[str, Any]:
    info = hd.init(hal.get_backend("cpu"), timeout_s=30)
    again = hd.init(hal.get_backend("cpu"), timeout_s=30)
    try:
        hd.init(hal.get_backend("cpu"), timeout_s=31)
        conflict = None
    except CollectiveError as e:
        conflict = str(e)
    t = torch.full((3,), float(rank + 1))
    out = hal.get_backend("cpu").all_reduce(t)
    return {
        "info": [info.rank, info.world_size, info.local_rank, info.backend, info.dist_backend, info.timeout_s],
        "same": again is info,
        "conflict": conflict,
        "sum": out.tolist(),
    }


def _init_connected() -> None:
    """``init``, then a barrier: every connection is up before a rank fails (gloo connects each pair at
    start-up, and a peer that exits while the other still completes its side fails the rendezvous instead
    of the collective these tests are about)."""
    hd.init(hal.get_backend("cpu"), timeout_s=FAIL_TIMEOUT_S)
    hal.get_backend("cpu").barrier()


def _work_killed_peer(rank: int) -> dict[str, Any]:
    _init_connected()
    if rank == 1:
        os._exit(1)  # dies without a word, before the collective
    return _timed_all_reduce()


def _work_stalled_peer(rank: int) -> dict[str, Any]:
    _init_connected()
    if rank == 1:
        time.sleep(FAIL_TIMEOUT_S + MARGIN_S + 5)  # longer than rank 0 may wait; the parent ends it
        os._exit(0)
    return _timed_all_reduce()


def _work_frozen_peer(rank: int) -> dict[str, Any]:
    _init_connected()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen whole, heartbeat included, its connections open
    return _timed_all_reduce()


def _timed_all_reduce() -> dict[str, Any]:
    t = torch.ones(4)
    start = time.monotonic()
    try:
        # No guard here: the backend's own all_reduce (the reference, guarded) must raise CollectiveError.
        hal.get_backend("cpu").all_reduce(t)
        return {"error": None, "elapsed": time.monotonic() - start}
    except Exception as e:  # reported to the test, which checks the type
        return {"error": type(e).__name__, "message": str(e), "elapsed": time.monotonic() - start}


_WORK: dict[str, Callable[[int], dict[str, Any]]] = {
    "init_all_reduce": _work_init_all_reduce,
    "killed_peer": _work_killed_peer,
    "stalled_peer": _work_stalled_peer,
    "frozen_peer": _work_frozen_peer,
}


def _work(rank: int, work: str) -> dict[str, Any]:
    """One rank of ``work``, started by :func:`hal.testing.dist.run_ranks` with torchrun's variables set."""
    os.environ.pop(hd.TIMEOUT_ENV, None)
    try:
        return _WORK[work](rank)
    finally:
        if work == "init_all_reduce":  # the failure works end with os._exit instead (run_ranks' hard_exit)
            hd.shutdown()


def _run(work: str, out_dir: Path, *, wait_for: tuple[int, ...] = (0, 1)) -> list[dict[str, Any] | None]:
    """Spawn the 2 workers, wait (bounded) until the ranks in ``wait_for`` wrote their result, end the rest."""
    try:
        return run_ranks(
            _work,
            (work,),
            out_dir=out_dir,
            world=WORLD,
            timeout_s=JOIN_TIMEOUT_S,
            wait_for=wait_for,
            hard_exit=work != "init_all_reduce",  # a broken group's teardown may wait on the dead peer
        )
    except TimeoutError as e:
        pytest.fail(f"{work}: {e}")


# -- tests ---------------------------------------------------------------------------------------------


def test_missing_environment_names_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in hd.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CollectiveError, match="torchrun") as err:
        hd.init(hal.get_backend("cpu"))
    for name in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert name in str(err.value)
    listed = str(err.value).split("lacks ")[1].split(";")[0].split(", ")
    assert listed == ["WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]  # RANK is set, so not listed
    assert hd.info() is None


def test_timeout_from_argument_environment_or_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hd.TIMEOUT_ENV, raising=False)
    assert hd._resolve_timeout(None) == hd.DEFAULT_TIMEOUT_S == 120.0
    monkeypatch.setenv(hd.TIMEOUT_ENV, "7.5")
    assert hd._resolve_timeout(None) == 7.5
    assert hd._resolve_timeout(3) == 3.0
    monkeypatch.setenv(hd.TIMEOUT_ENV, "soon")
    with pytest.raises(OpInputError, match=hd.TIMEOUT_ENV):
        hd._resolve_timeout(None)
    with pytest.raises(OpInputError, match="timeout_s"):
        hd._resolve_timeout(0)


def test_timeout_above_one_year_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Far above a year the transports overflow (gloo hangs, times out at once, or raises): refused up front.
    assert hd.MAX_TIMEOUT_S == 365 * 24 * 3600
    assert hd._resolve_timeout(hd.MAX_TIMEOUT_S) == hd.MAX_TIMEOUT_S
    for value in (hd.MAX_TIMEOUT_S + 1, 9e9, 1e15, float("inf")):
        with pytest.raises(OpInputError, match=r"^distributed\.init: timeout_s: expected at most 31536000 seconds"):
            hd._resolve_timeout(value)
    monkeypatch.setenv(hd.TIMEOUT_ENV, "1e10")
    with pytest.raises(OpInputError, match=rf"^distributed\.init: {hd.TIMEOUT_ENV}: .*31536000.*got 10000000000\.0"):
        hd.configured_timeout()
    monkeypatch.setenv(hd.TIMEOUT_ENV, "nan")
    with pytest.raises(OpInputError, match="expected a positive number of seconds, got nan"):
        hd.configured_timeout()


def test_guard_names_the_collective_and_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    original = RuntimeError("Connection reset by peer\nmore detail")
    with pytest.raises(CollectiveError, match=r"^all_gather: rank \? of \?: Connection reset by peer; ") as err:
        with hd.collective_guard("all_gather", timeout_s=9):
            raise original
    assert err.value.__cause__ is original
    assert "(timeout 9 s)" in str(err.value)
    inner = CollectiveError("already clear")
    with pytest.raises(CollectiveError) as err2, hd.collective_guard("outer"):
        raise inner
    assert err2.value is inner  # nested guards do not re-wrap

    @hd.collective_guard("broadcast", timeout_s=1)
    def stalls() -> None:
        raise TimeoutError("late")

    with pytest.raises(CollectiveError, match=r"^broadcast: .*late"):
        stalls()
    # Before the group is up (a stalled rendezvous), the rank is torchrun's.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(CollectiveError, match=r"^init_process_group: rank 1 of 4: "):
        with hd.collective_guard("init_process_group", timeout_s=1):
            raise RuntimeError("wait timeout after 1000ms")


@pytest.mark.distributed
def test_init_from_torchrun_environment_and_all_reduce(tmp_path: Path) -> None:
    results = _run("init_all_reduce", tmp_path)
    for rank, res in enumerate(results):
        assert res is not None and "crash" not in res, res
        assert res["info"] == [rank, WORLD, rank, "cpu", "gloo", 30.0]
        assert res["same"] is True
        assert res["conflict"] is not None and "already initialized" in res["conflict"]
        assert res["sum"] == [3.0, 3.0, 3.0]


@pytest.mark.distributed
def test_killed_rank_fails_the_survivor_fast(tmp_path: Path) -> None:
    res = _run("killed_peer", tmp_path, wait_for=(0,))[0]
    assert res is not None and "crash" not in res, res
    assert res["error"] == "CollectiveError", res
    assert res["message"].startswith("all_reduce: rank 0 of 2: "), res
    # At once (no heartbeat watch: torchrun names a peer that exited, and stops the other ranks soon after).
    assert res["message"].endswith("; a peer may have exited or stalled (timeout 5 s)"), res
    assert f"(timeout {FAIL_TIMEOUT_S:g} s)" in res["message"]
    assert res["elapsed"] < FAIL_TIMEOUT_S + MARGIN_S, res


@pytest.mark.distributed
def test_stalled_rank_fails_the_other_within_the_timeout(tmp_path: Path) -> None:
    res = _run("stalled_peer", tmp_path, wait_for=(0,))[0]
    assert res is not None and "crash" not in res, res
    assert res["error"] == "CollectiveError", res
    assert res["message"].startswith("all_reduce: rank 0 of 2: "), res
    # The peer is alive (its heartbeat goes on) but never entered the collective: said so.
    assert "this rank is in all_reduce #2, but rank 1 is after barrier #1" in res["message"], res
    assert FAIL_TIMEOUT_S * 0.5 <= res["elapsed"] < FAIL_TIMEOUT_S + MARGIN_S, res


@pytest.mark.distributed
def test_a_frozen_rank_is_named_after_the_timeout(tmp_path: Path) -> None:
    # A peer that neither exits nor answers (stopped whole, as a hang in C code would be): the collective
    # times out, and the heartbeat watch names the rank whose heartbeat stopped.
    res = _run("frozen_peer", tmp_path, wait_for=(0,))[0]
    assert res is not None and res["error"] == "CollectiveError", res
    assert "; rank(s) 1 stopped (no heartbeat for 2 s: exited, killed or hung) (timeout 5 s)" in res["message"], res
    assert FAIL_TIMEOUT_S * 0.5 <= res["elapsed"] < FAIL_TIMEOUT_S + MARGIN_S, res


_TORCHRUN_SCRIPT = """
import torch
import hal
import hal.distributed

info = hal.distributed.init()
t = torch.tensor([float(info.rank + 1), 10.0])
hal.get_backend().all_reduce(t)
if info.rank == 0:
    print("RESULT", info.world_size, info.dist_backend, t.tolist(), flush=True)
hal.distributed.shutdown()
"""


@pytest.mark.distributed
def test_real_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_TORCHRUN_SCRIPT))
    try:
        cmd = torchrun_command(str(script))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    env = torchrun_env(HAL_BACKEND="cpu", OMP_NUM_THREADS="1", **{hd.TIMEOUT_ENV: "30"})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert lines == ["RESULT 2 gloo [3.0, 20.0]"], proc.stdout + proc.stderr
