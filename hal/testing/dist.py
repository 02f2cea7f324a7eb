"""Running a test on several processes: spawned ranks with torchrun's environment, results as files.

A collective needs every rank to call it, so a test of one runs a function on ``world`` processes and
looks at what each rank saw. Starting a process group costs seconds, so a test module runs all its
checks in one job (:func:`run_checks`) and asserts each check's verdict separately:

.. code-block:: python

    from hal.testing.dist import run_checks

    def check_sum(rank: int) -> None:           # module level: spawned ranks import it by name
        ...                                     # raise on a mismatch

    @pytest.fixture(scope="module")
    def verdicts():
        return run_checks({"sum": check_sum})   # [{check: None | traceback}, ...] one dict per rank

:func:`run_ranks` is the layer below: any ``target(rank, *args)`` on every rank, with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set as torchrun sets them (so the
target may call :func:`hal.distributed.init`), each rank's JSON-able return value (or the traceback of
what it raised) collected, and a bounded wait: a hang becomes a :class:`TimeoutError`, never a stuck
test. :func:`torchrun_command` and :func:`torchrun_env` launch the real ``torchrun``.

Ports: several jobs may start at once (pytest-xdist, concurrent launches in one test), so no port is
picked free and bound later, which races. :func:`run_ranks` hosts the rendezvous store in the parent
on a port the OS assigns while it is bound (the ranks connect to it, as torchrun's workers connect to
its agent's store), and :func:`torchrun_command` uses ``torchrun --standalone``, whose agent binds
its store on port 0 itself.

Nothing here runs at import.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "TORCHRUN_VARS",
    "assert_passed",
    "checks_in",
    "free_port",
    "run_checks",
    "run_ranks",
    "torchrun_command",
    "torchrun_env",
]

#: The variables torchrun sets for each rank.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: torch.distributed's ``env://`` rendezvous connects to an existing store (a client on every rank) when set.
_AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago. Another process may take it before it is bound
    again: where that matters, let the listener bind port 0 itself (as :func:`run_ranks` and
    :func:`torchrun_command` do)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_env(**extra: str) -> dict[str, str]:
    """This process's environment without torchrun's per-rank variables (a launcher sets its own), plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(extra)
    return env


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    """``torchrun --standalone --nproc-per-node NPROC``, then ``args`` (a script and its arguments, or ``-m
    module ...``), with the ``torchrun`` beside this Python.

    ``--standalone`` makes torchrun's agent host the rendezvous store on a port the OS assigns as it binds
    (``localhost:0``) and its workers use that store, so launches started together never collide on a port.

    :raises FileNotFoundError: no ``torchrun`` next to ``sys.executable``.
    """
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        raise FileNotFoundError(f"no torchrun next to {sys.executable}")
    return [str(torchrun), "--standalone", "--nproc-per-node", str(nproc), *args]


def _entry(rank: int, target: Callable[..., Any], args: tuple[Any, ...], world: int, port: int, out_dir: str,
           hard_exit: bool) -> None:  # fmt: skip
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    # The store is the parent's (run_ranks): every rank connects to it as a client, as torchrun's workers
    # connect to their agent's store; no rank binds a port.
    os.environ[_AGENT_STORE_ENV] = "True"
    try:
        result = target(rank, *args)
    except BaseException:  # reported to the test, which decides what it means
        result = {"crash": traceback.format_exc()}
    path = Path(out_dir, f"rank{rank}.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)  # the parent never reads a half-written file
    if hard_exit:
        os._exit(0)  # a broken group's teardown may wait on a dead peer; nothing is left to clean up


def run_ranks(
    target: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    out_dir: str | Path,
    world: int = 2,
    timeout_s: float = 120.0,
    wait_for: Sequence[int] | None = None,
    hard_exit: bool = False,
) -> list[Any]:
    """Run ``target(rank, *args)`` on ``world`` spawned processes with torchrun's environment.

    :param target: a module-level function (spawned processes import it by name); its return value must
        be JSON-able. What it raises is returned as ``{"crash": traceback}``.
    :param out_dir: an empty directory for the per-rank result files.
    :param timeout_s: the longest wait for the results.
    :param wait_for: the ranks whose results are awaited (``None``: all); the others are ended once
        these are in (a test of a rank that dies or stalls waits for the survivor only).
    :param hard_exit: end each rank with ``os._exit`` right after its result is written.
    :returns: each rank's result, ``None`` for a rank that wrote none.
    :raises TimeoutError: the awaited results are not all in within ``timeout_s``.
    """
    import datetime

    import torch.distributed as dist
    import torch.multiprocessing as mp

    out = Path(out_dir)
    ranks = list(range(world)) if wait_for is None else list(wait_for)
    files = [out / f"rank{r}.json" for r in range(world)]
    # The rendezvous store, bound here on a port the OS picks (no window for another job to take it);
    # it lives until the ranks are done.
    store = dist.TCPStore(
        "127.0.0.1", 0, world_size=world, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip
    ctx = mp.start_processes(
        _entry,
        args=(target, tuple(args), world, store.port, str(out), hard_exit),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not all(files[r].exists() for r in ranks):
            if all(not p.is_alive() for p in ctx.processes):
                break  # every rank has exited: whatever is missing will not come
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{getattr(target, '__name__', target)}: no result within {timeout_s:g} s (a hang?)")
            time.sleep(0.02)
    finally:
        for p in ctx.processes:
            p.join(2)
            if p.is_alive():
                p.kill()  # SIGKILL: a rank stopped (SIGSTOP) or hung in C code ends too
                p.join(5)
        del store  # the ranks are gone: close the server
    return [json.loads(f.read_text()) if f.exists() else None for f in files]


def _check_all(rank: int, checks: Mapping[str, Callable[[int], None]], backend: str) -> dict[str, str | None]:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method="env://")
    verdicts: dict[str, str | None] = {}
    try:
        for name, check in checks.items():
            try:
                check(rank)
                verdicts[name] = None
            except Exception:  # recorded, and reported by that check's test
                verdicts[name] = traceback.format_exc()
    finally:
        dist.destroy_process_group()
    return verdicts


def run_checks(
    checks: Mapping[str, Callable[[int], None]],
    *,
    out_dir: str | Path | None = None,
    world: int = 2,
    backend: str = "gloo",
    timeout_s: float = 120.0,
) -> list[dict[str, str | None]]:
    """Run every ``check(rank)`` on each of ``world`` ranks of one process group, in one job.

    :param checks: name → module-level function that raises on a mismatch.
    :param out_dir: where the result files go (``None``: a temporary directory).
    :param backend: the torch.distributed backend of the group.
    :returns: one dict per rank: check name → ``None`` (passed) or the traceback.
    :raises RuntimeError: a rank failed outside the checks (its traceback in the message).
    :raises TimeoutError: the job did not finish within ``timeout_s``.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = run_ranks(
            _check_all, (dict(checks), backend), out_dir=out_dir or tmp, world=world, timeout_s=timeout_s
        )
    verdicts: list[dict[str, str | None]] = []
    for rank, res in enumerate(results):
        if res is None or (set(res) == {"crash"} and "crash" not in checks):  # failed outside the checks
            raise RuntimeError(f"rank {rank} of the checks job failed:\n{res['crash'] if res else 'no result'}")
        verdicts.append(res)
    return verdicts


def checks_in(namespace: Mapping[str, Any], prefix: str = "check_") -> dict[str, Callable[[int], None]]:
    """A test module's checks for :func:`run_checks`: every function named ``check_<name>`` in
    ``namespace`` (pass ``globals()``), keyed by ``<name>``."""
    return {name.removeprefix(prefix): fn for name, fn in namespace.items() if name.startswith(prefix)}


def assert_passed(verdicts: Sequence[Mapping[str, str | None]], check: str) -> None:
    """Raise ``AssertionError`` with every failing rank's traceback when ``check`` failed on any rank
    (``verdicts`` as :func:`run_checks` returns them)."""
    failures = [f"rank {r}:\n{v[check]}" for r, v in enumerate(verdicts) if v[check] is not None]
    assert not failures, "\n".join(failures)
