"""Measure cuBLAS against Triton for each GEMM shape on this GPU and write ``gemm_choice.json``.

Run on an NVIDIA GPU, from the repository root, with the project installed (``make test`` set-up)::

    python bench/nvidia/measure_gemm_choice.py                      # rewrites backends/nvidia/tuning/gemm_choice.json
    python bench/nvidia/measure_gemm_choice.py --quick --out /tmp/gemm_choice.json

For each kind (``bf16``: ``gemm``; ``fp8``: ``gemm_fp8`` with DeepSeek-V3 block scaling), each (N, K)
and each M it times the two implementations with :mod:`hal.bench.timing` (device events, L2 flushed
before each call, medians): cuBLAS (``torch.nn.functional.linear`` for bf16; the block-scaled
``torch._scaled_mm`` for fp8, only where :func:`~hal_nvidia.gemm_choice.scaled_mm_blockwise_support`
says this torch has it) and the Triton kernel (``hal_kernels.gemm``'s ``OPS``). Each output is first
checked against an fp32 reference; an implementation that fails or is wrong there is left out of
that shape. The default implementation (cuBLAS for bf16, Triton for fp8) keeps a shape unless the
other is faster by more than :data:`MARGIN`, so noise does not flip choices. The architecture's
entries are replaced in the table, the others kept, and the architecture's provenance recorded
(device, driver, CUDA, torch, triton, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hal_nvidia.gemm_choice import (
    DEFAULT_IMPL,
    IMPLS,
    KINDS,
    SCHEMA,
    arch_key,
    parse_gemm_choice,
    scaled_mm_blockwise,
    scaled_mm_blockwise_support,
)

#: DeepSeek-V3's dense projections as DeepGEMM benchmarks them: (N, K).
DEFAULT_SHAPES = ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
#: Token counts from decode (1) to large prefill batches.
DEFAULT_MS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
#: The non-default implementation must be this much faster (relative) to win a shape.
MARGIN = 0.05
#: Largest relative error (Frobenius) against the fp32 reference an implementation may show.
TOLERANCE = {"bf16": 1e-2, "fp8": 2e-2}

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "backends" / "nvidia" / "tuning" / "gemm_choice.json"


# ---------------------------------------------------------------------------------------------------
# Pure pieces (tested on the CPU)
# ---------------------------------------------------------------------------------------------------


def winner(kind: str, us: Mapping[str, float | None], margin: float = MARGIN) -> str:
    """The implementation to record: the default unless the other is faster by more than ``margin``;
    one that has no timing (failed, wrong or unavailable) never wins, and the default is kept when
    neither has one."""
    default = DEFAULT_IMPL[kind]
    other = next(impl for impl in IMPLS if impl != default)
    mine, theirs = us.get(default), us.get(other)
    if theirs is None:
        return default
    if mine is None or theirs < mine * (1 - margin):
        return other
    return default


def merge(
    table: Mapping[str, Any] | None,
    arch: str,
    results: Mapping[str, list[dict[str, Any]]],
    provenance: Mapping[str, Any],
) -> dict[str, Any]:
    """``table`` (the decoded file, or ``None``) with ``arch``'s entries replaced by ``results``."""
    archs = {arch_key(a): body for a, body in table.get("archs", {}).items()} if table else {}
    arch = arch_key(arch)
    archs[arch] = {"provenance": dict(provenance), **{kind: results.get(kind, []) for kind in KINDS}}
    measured = sorted(archs)
    out = {
        "schema": SCHEMA,
        "op": "gemm",
        "measured": True,
        "note": (
            f"Measured by bench/nvidia/measure_gemm_choice.py on {', '.join(measured)} (see each arch's "
            f"provenance). The default implementation keeps a shape unless the other is more than "
            f"{MARGIN:.0%} faster; shapes and architectures not listed get the default."
        ),
        "default": dict(table.get("default", DEFAULT_IMPL)) if table else dict(DEFAULT_IMPL),
        "archs": archs,
    }
    parse_gemm_choice(out, "the merged table")  # never write a file the backend would reject
    return out


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"2112x7168,4096x7168"`` → ``[(2112, 7168), (4096, 7168)]`` (N x K)."""
    shapes = []
    for part in text.split(","):
        n, _, k = part.strip().lower().partition("x")
        shapes.append((int(n), int(k)))
    return shapes


# ---------------------------------------------------------------------------------------------------
# Measuring (GPU)
# ---------------------------------------------------------------------------------------------------


def _rel_err(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference).norm() / reference.norm().clamp(min=1e-30))


def _candidates(
    kind: str,
    m: int,
    n: int,
    k: int,
    device: torch.device,
    triton_ops: Mapping[str, Callable[..., Any]],
    fp8_cublas: bool,
) -> tuple[dict[str, Callable[[], Any]], torch.Tensor]:
    """The callables to time, their inputs bound, and the fp32 reference they must match."""
    from hal.quant import dequantize_fp8_blocks, dequantize_fp8_groups, quantize_fp8_blocks

    gen = torch.Generator(device=device).manual_seed(m * 7919 + n * 31 + k)
    x = torch.randn(m, k, device=device, generator=gen)
    w = torch.randn(n, k, device=device, generator=gen) / k**0.5
    if kind == "bf16":
        xb, wb = x.bfloat16(), w.bfloat16()
        fns = {"cublas": lambda: torch.nn.functional.linear(xb, wb)}
        if "gemm" in triton_ops:  # hal_kernels has no bf16 GEMM kernel yet: then cuBLAS has nothing to beat
            fns["triton"] = lambda: triton_ops["gemm"](xb, wb)
        return fns, xb.float() @ wb.float().t()
    kp = -k % 128
    xp = torch.nn.functional.pad(x, (0, kp))
    groups = xp.view(m, -1, 128)
    xs = groups.abs().amax(-1).clamp(min=1e-4) / 448.0
    xq = (groups / xs[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(m, -1)[:, :k].contiguous()
    wq, ws = quantize_fp8_blocks(w, 128)
    reference = dequantize_fp8_groups(xq, xs, 128) @ dequantize_fp8_blocks(wq, ws, 128).t()
    fns = {"triton": lambda: triton_ops["gemm_fp8"](xq, xs, wq, ws)}
    if fp8_cublas:
        fns["cublas"] = lambda: scaled_mm_blockwise(xq, xs, wq, ws)
    return fns, reference


def measure(
    kinds: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    ms: Sequence[int],
    *,
    quick: bool,
    log: Callable[[str], None],
) -> dict[str, list[dict[str, Any]]]:
    """Time every (kind, N, K, M); the table's entries by kind."""
    from hal.bench.timing import make_timer

    try:
        from hal_kernels import gemm as triton_gemm
    except Exception as exc:  # the Triton kernels are required: there is nothing to compare without them
        raise SystemExit(
            f"cannot import the Triton GEMM kernels (hal_kernels.gemm): {type(exc).__name__}: {exc}"
        ) from exc
    triton_ops = triton_gemm.OPS
    device = torch.device("cuda", torch.cuda.current_device())
    timer = make_timer(device, quick=quick)
    support = scaled_mm_blockwise_support(device)
    log(f"torch._scaled_mm block scaling: {support.status} ({support.detail})")
    results: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        entries = []
        for n, k in shapes:
            rows = []
            for m in ms:
                fns, reference = _candidates(kind, m, n, k, device, triton_ops, support.status == "yes")
                usable: dict[str, Callable[[], Any]] = {}
                problems: dict[str, str] = {}
                for impl, fn in fns.items():
                    try:
                        err = _rel_err(fn(), reference)
                    except Exception as exc:  # recorded: this implementation cannot serve the shape
                        problems[impl] = (
                            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                        )
                        continue
                    if err > TOLERANCE[kind]:
                        problems[impl] = f"relative error {err:.2e} > {TOLERANCE[kind]}"
                    else:
                        usable[impl] = fn
                timings = dict(zip(usable, timer.many(list(usable.values())), strict=True))
                us: dict[str, float | None] = {impl: None for impl in IMPLS}
                us.update({impl: round(t.median_s * 1e6, 3) for impl, t in timings.items()})
                row: dict[str, Any] = {
                    "m": m,
                    "impl": winner(kind, us),
                    "us": {i: v for i, v in us.items() if v is not None},
                }
                if problems:
                    row["problems"] = problems
                rows.append(row)
                log(f"{kind} M={m} N={n} K={k}: {row['impl']}  {row['us']}  {problems or ''}")
                del fns, reference, usable
            entries.append({"n": n, "k": k, "m": rows})
        results[kind] = entries
    return results


def provenance(command: str) -> dict[str, Any]:
    """What was measured, on what, with what."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info: dict[str, Any] = {
        "device": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # recorded, not fatal: the Triton import error shows up in measure() anyway
        info["triton"] = f"unavailable ({type(exc).__name__})"
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # the driver version is nice to have
        info["driver"] = f"unknown ({type(exc).__name__})"
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"table to update (default {DEFAULT_OUT})")
    parser.add_argument("--kinds", default=",".join(KINDS), help="bf16,fp8 (default both)")
    parser.add_argument(
        "--shapes", default=",".join(f"{n}x{k}" for n, k in DEFAULT_SHAPES), help="N x K pairs, comma-separated"
    )
    parser.add_argument("--m", default=",".join(map(str, DEFAULT_MS)), help="M values, comma-separated")
    parser.add_argument("--quick", action="store_true", help="shorter warm-up and measurement")
    args = parser.parse_args(argv)

    if torch.version.cuda is None or not torch.cuda.is_available():
        print(
            f"measure_gemm_choice needs an NVIDIA GPU and a CUDA build of torch (torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}); nothing written",
            file=sys.stderr,
        )
        return 2
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    bad = [kind for kind in kinds if kind not in KINDS]
    if bad:
        parser.error(f"--kinds: unknown {bad}; expected among {', '.join(KINDS)}")
    ms = sorted({int(m) for m in args.m.split(",")})
    shapes = parse_shapes(args.shapes)

    from hal_nvidia.probe import arch_of

    arch = arch_key(arch_of(torch.cuda.get_device_capability()))
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    results = measure(kinds, shapes, ms, quick=args.quick, log=lambda line: print(line, flush=True))
    existing = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else None
    table = merge(existing, arch, results, provenance(command))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({arch})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
