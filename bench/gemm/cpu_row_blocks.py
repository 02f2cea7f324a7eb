"""Why the CPU reference ``gemm`` multiplies a large fp32 weight by blocks of rows at 4-15 rows of ``x``.

torch's fp32 matmul on x86 CPUs is MKL's; at a few rows of ``x`` and a large weight its time depends on
the row count in steps: on the 2-core development machine the 32000x1024 LM head of the decode
benchmark takes 4.5 ms at 1-3 rows, 9 ms at 4-6 rows, 14-23 ms at 8-15 rows, then 14 ms at 16.
Multiplying the weight one ~1 MiB block of rows at a time (``hal_cpu.reference.gemm``'s
``ROW_BLOCK_BYTES``) brings 4-15 rows down to 6.4-9.6 ms. This prints, for the weights of the ~452M
decode benchmark config (LM head, dense MLP, a square 2048x2048, a 1024x1024 attention output) and the row
counts ``--rows``, the median time of ``F.linear(x, w)`` and of the row-block product, and their ratio.
Each call takes the next of enough copies of ``w`` (256 MiB) that none finds its weight in cache.
The rows where the ratio exceeds 1 should be exactly ``ROW_BLOCKS_M`` for weights of at least
``ROW_BLOCKS_MIN_BYTES``; a machine where they are not would want other constants.

``--dtype bfloat16`` (or ``float16``) times half-precision weights instead, which the CPU ``gemm`` takes
by blocks at ``ROW_BLOCKS_M_HALF`` rows when their fp32 size reaches ``ROW_BLOCKS_MIN_BYTES``:
``F.linear(x, w.float())`` (the whole weight upcast at each call) against the blocks, each upcast into
one reused buffer.

    .venv/bin/python bench/gemm/cpu_row_blocks.py
    .venv/bin/python bench/gemm/cpu_row_blocks.py --rows 1,8 --shapes 32000x1024
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import hal_cpu.reference.gemm as ref

SHAPES = "32000x1024,5632x1024,1024x2816,2048x2048,1024x1024"
ROWS = "1,2,3,4,6,8,12,15,16,24,32"


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _cycling(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor]
) -> Callable[[], torch.Tensor]:
    """``fn(x, w)`` on the next of ``weights`` at each call."""
    turn = itertools.cycle(weights)
    return lambda: fn(x, next(turn))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help=f"weights N x K, comma-separated (default {SHAPES})")
    parser.add_argument("--rows", default=ROWS, help=f"rows of x, comma-separated (default {ROWS})")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per point (default 15)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weight dtype (default float32)"
    )
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    whole = "F.linear" if dtype is torch.float32 else f"F.linear of the upcast {args.dtype} weight"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call, {whole} / row blocks")
    taken = ref.ROW_BLOCKS_M if dtype is torch.float32 else ref.ROW_BLOCKS_M_HALF
    print(
        f"the CPU gemm takes row blocks at rows {taken.start}-{taken.stop - 1} of x for weights of >= "
        f"{ref.ROW_BLOCKS_MIN_BYTES >> 20} MiB in fp32, blocks of {ref.ROW_BLOCK_BYTES >> 20} MiB in fp32"
    )
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        copies = max(2, (256 << 20) // (n * k * dtype.itemsize))
        weights = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(copies)]
        cells = []
        for m in (int(v) for v in args.rows.split(",")):
            x = torch.randn(m, k, generator=gen)
            a = _median_ms(_cycling(lambda x, w: F.linear(x, w.float()), x, weights), args.repeats)
            b = _median_ms(_cycling(ref._linear_row_blocks, x, weights), args.repeats)
            cells.append(f"M{m} {a:.3g}/{b:.3g} {a / b:.2f}x")
        print(f"{n}x{k} ({n * k * dtype.itemsize / 2**20:.3g} MiB): " + "  ".join(cells))


if __name__ == "__main__":
    main()
