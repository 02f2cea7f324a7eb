"""Collectives over the backend's own transport (NCCL, RCCL, HCCL or gloo), on N ranks launched by torchrun:

    torchrun --nproc-per-node N bench/collectives/torchrun_bench.py [--backend nvidia] [--json OUT]

The same measurements as ``test_collectives_bench.py`` (which runs 2 gloo processes under pytest), on any
world size and transport, one device per rank: ``all_reduce`` and ``all_to_all`` against plain
``torch.distributed`` on the same bytes, and HAL's ``ep_dispatch`` (FP8 tokens with scales) and
``ep_combine`` (bf16) in normal (``hal``) and low-latency (``hal-ll``) mode against one plain
``all_to_all_single`` of the routed rows with the op's splits, a rank's own rows included (``over_baseline``)
and left out (``over_remote_rows``: the rows HAL's normal mode sends). Payloads, routings and byte counts are
:mod:`hal.bench.collectives`'s: the shape set's (``--shapes``, default the device's), 256 experts split
evenly between the ranks (ep ops need a world size that divides 256).

Each case runs ``--warmup`` calls, then ``--rounds`` timed calls (default: by payload size, 5 to 50),
each after a barrier and timed from a device synchronization to the next. A round's time is the
slowest rank's (as nccl-tests reports), and the case's the median round. Rank 0 prints a table and, with
``--json``, writes every row: the time, ``bytes`` by the anchors' formulas (BENCHMARKS.md), ``algbw`` and
``busbw`` (nccl-tests' conventions), the bytes really sent, and HAL's time over the baseline's.

On CPUs the ranks share the host's cores: each rank gets ``cores / LOCAL_WORLD_SIZE`` intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

import hal
import hal.distributed as hd
from hal.bench.collectives import (
    HAL_IMPLS,
    IMPLS,
    NUM_EXPERTS,
    REMOTE_ROWS,
    bandwidth,
    call,
    nbytes,
    op_shapes,
    payload,
    threads_per_rank,
    timed_rounds,
)
from hal.bench.shapes import default_shape_set, shape_set

_EP_OPS = ("ep_dispatch", "ep_combine")


def _time(fn: Any, sync: Any, rounds: int, warmup: int) -> list[float]:
    """This rank's seconds for each of ``rounds`` calls of ``fn``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        dist.barrier()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _slowest(times: list[float], world: int) -> list[float]:
    """Per round, the slowest rank's time."""
    every: list[list[float] | None] = [None] * world
    dist.all_gather_object(every, times)
    return [max(rank_times[i] for rank_times in every if rank_times is not None) for i in range(len(times))]


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'op':12s} {'shape':22s} {'impl':36s} {'time us':>10s} {'algbw GB/s':>11s} {'busbw GB/s':>11s} "
          f"{'sent GB/s':>10s} {'HAL/base':>9s} {'HAL/remote':>10s}")  # fmt: skip
    for r in rows:
        sent = f"{r['wire_gbps']:10.2f}" if "wire_gbps" in r else f"{'':10s}"
        ratio = f"{r['over_baseline']:8.2f}x" if "over_baseline" in r else ""
        ratio += f" {r['over_remote_rows']:9.2f}x" if "over_remote_rows" in r else ""
        print(f"{r['op']:12s} {r['shape']:22s} {r['impl']:36s} {r['seconds'] * 1e6:10.1f} {r['algbw_gbps']:11.2f} "
              f"{r['busbw_gbps']:11.2f} {sent} {ratio}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", help="HAL backend (default: HAL_BACKEND, else the best available)")
    parser.add_argument("--shapes", help="shape set (default: the device's: deepseek-v3 on accelerators)")
    parser.add_argument("--ops", default=",".join(IMPLS), help=f"comma-separated ops (default {','.join(IMPLS)})")
    parser.add_argument("--rounds", type=int, help="timed calls per case (default: 5-50 by payload size)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per case first (default 2)")
    parser.add_argument("--json", metavar="OUT", help="also write rank 0's rows and the setup to this JSON file")
    args = parser.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in IMPLS]
    if unknown:
        parser.error(f"--ops: unknown {', '.join(unknown)}; known: {', '.join(IMPLS)}")

    hd.bind_local_device()
    backend = hal.get_backend(args.backend)
    info = hd.init(backend)
    rank, world = info.rank, info.world_size
    if backend.device.type == "cpu":
        torch.set_num_threads(threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    shapes = shape_set(args.shapes) if args.shapes else default_shape_set(backend.device.type)
    dtype = getattr(torch, shapes.dtype)
    sync = backend.op("synchronize")
    if NUM_EXPERTS % world and any(op in _EP_OPS for op in ops):
        if rank == 0:
            print(f"skipping {', '.join(op for op in ops if op in _EP_OPS)}: {world} ranks do not divide "
                  f"{NUM_EXPERTS} experts")  # fmt: skip
        ops = [op for op in ops if op not in _EP_OPS]

    rows: list[dict[str, Any]] = []
    for op in ops:
        for shape in op_shapes(shapes, op):
            timed: dict[str, float] = {}
            for impl in IMPLS[op]:
                t = payload(op, shape, dtype, backend.device, rank=rank, world=world)
                rounds = args.rounds or timed_rounds(nbytes(t))
                seconds = statistics.median(
                    _slowest(_time(call(backend, op, impl, t), sync, rounds, args.warmup), world)
                )
                timed[impl] = seconds
                row = {"op": op, "shape": shape.id, "impl": impl, "rounds": rounds, "seconds": seconds}
                rows.append({**row, **bandwidth(op, t, seconds, impl, world)})
                del t
            base = next(impl for impl in IMPLS[op] if impl not in HAL_IMPLS)
            for row in rows[-len(IMPLS[op]) :]:
                if row["impl"] in HAL_IMPLS:
                    row["over_baseline"] = timed[row["impl"]] / timed[base]
                    if REMOTE_ROWS in timed:  # ep ops: also over the exchange of the rows that change rank
                        row["over_remote_rows"] = timed[row["impl"]] / timed[REMOTE_ROWS]
            if rank == 0:
                print(f"[{op} {shape.id}] " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in timed.items()), flush=True)

    if rank == 0:
        print()
        _print_table(rows)
        if args.json:
            setup = {
                "command": " ".join(["torchrun", "--nproc-per-node", str(world), *sys.argv]),
                "backend": backend.name,
                "dist_backend": info.dist_backend,
                "world_size": world,
                "device": str(backend.device),
                "shapes": shapes.name,
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
                },
                "threads_per_rank": torch.get_num_threads() if backend.device.type == "cpu" else None,
            }
            with open(args.json, "w") as f:
                json.dump({**setup, "rows": rows}, f, indent=1)
    hd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
