"""Sweep a Triton kernel's launch configs on this GPU, at the benchmark's shapes, against the tuning file.

Run on a GPU from the repository root, with HAL installed::

    python bench/nvidia/tune.py mla_decode --grid BLOCK_H=16,32,64 BLOCK_N=32,64 num_warps=4,8 num_stages=1,2
    python bench/nvidia/tune.py gemm_fp8 --grid BLOCK_M=64,128 BLOCK_N=64,128 --json sweep.json

For each case of the op in the shape set (``hal bench``'s cases, ``deepseek-v3`` by default) and each
config of the grid (the product of the given values laid over the backend's tuned config, so a key not
named keeps its tuned value), it runs the kernel launcher (``hal_kernels.<module>.OPS[op]``) with that
config through the case builder ``hal bench`` uses, checks the output against the reference backend's
(``hal bench``'s own check), and times it with :mod:`hal.bench.timing` at ``hal bench --quick``'s
budget (device events, L2 flushed, medians; confirm a winner with a full ``hal bench`` run). A config
that fails to compile, launch or agree is listed with why, never timed. The table ranks configs by
the geometric mean of their time over the tuned config's, across cases (< 1: faster). It writes no
tuning file: a person reads the table and edits the file, recording how in its ``$comment``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

import hal
from hal.bench.cases import cases_for, prepare
from hal.bench.runner import disagreement
from hal.bench.shapes import default_shape_set, shape_set
from hal.bench.timing import make_timer


class _Override:
    """A backend whose op ``name`` is ``fn``; everything else is the backend's."""

    def __init__(self, backend: hal.Backend, name: str, fn: Callable[..., Any]) -> None:
        self._backend, self._name, self._fn = backend, name, fn

    def op(self, name: str) -> Callable[..., Any]:
        return self._fn if name == self._name else self._backend.op(name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._backend, attr)


def parse_grid(items: Sequence[str]) -> dict[str, list[int]]:
    """``["BLOCK_H=16,32", "num_warps=4"]`` → ``{"BLOCK_H": [16, 32], "num_warps": [4]}``."""
    grid: dict[str, list[int]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid: expected KEY=V1,V2,..., got {item!r}")
        grid[key.strip()] = [int(v) for v in values.split(",")]
    return grid


def configs(base: Mapping[str, int], grid: Mapping[str, Sequence[int]]) -> list[dict[str, int]]:
    """The tuned config first, then every grid point laid over it (duplicates of it dropped)."""
    out = [dict(base)]
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        cfg = {**base, **dict(zip(keys, values, strict=True))}
        if cfg not in out:
            out.append(cfg)
    return out


def _launcher(op: str) -> tuple[Callable[..., Any], dict[str, int]]:
    from hal_kernels import MODULES
    from hal_kernels._tuning import load_tuning
    from hal_nvidia._backend import TUNING_DIR
    from hal_nvidia.probe import arch_of

    arch = arch_of(torch.cuda.get_device_capability()) if torch.cuda.is_available() else "sm_90"
    for name in MODULES:
        module = __import__(f"hal_kernels.{name}", fromlist=["OPS"])
        if op in module.OPS:
            tuned = {**module.DEFAULTS[op], **load_tuning(TUNING_DIR, arch).get(op, {})}
            return module.OPS[op], tuned
    raise SystemExit(f"no Triton kernel serves {op!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", help="a kernel op (mla_decode, gemm_fp8, grouped_gemm, ...)")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="config values to try")
    parser.add_argument("--shapes", help="shape set (default: deepseek-v3)")
    parser.add_argument("--quick", action="store_true", help="only the shape set's quick shapes")
    parser.add_argument("--json", metavar="FILE", help="also write every timing as JSON")
    parser.add_argument(
        "--backend",
        default="nvidia",
        help="the backend whose device runs the kernels (default nvidia; `--backend cpu` with TRITON_INTERPRET=1 "
        "and --shapes cpu-small is a dry run of this script without a GPU)",
    )
    args = parser.parse_args(argv)

    registry = hal.Registry()
    backend = registry.get_backend(args.backend)
    reference = registry.reference_ops()
    launcher, tuned = _launcher(args.op)
    grid = configs(tuned, parse_grid(args.grid))
    shapes = shape_set(args.shapes) if args.shapes else default_shape_set(backend.device.type)
    cases = [c for c, why in cases_for(shapes, backend, [args.op], quick=args.quick) if why is None]
    timer = make_timer(backend.device, quick=True)  # a sweep times many configs: hal bench --quick's budget
    device = torch.cuda.get_device_name() if backend.device.type == "cuda" else str(backend.device)
    print(f"{args.op}: {len(grid)} configs x {len(cases)} cases on {device}; tuned {tuned}")

    rows: list[dict[str, Any]] = []
    for cfg in grid:
        row: dict[str, Any] = {"config": cfg, "us": {}, "problems": {}}
        fn = _bind(launcher, cfg)
        for case in cases:
            label = case.shape.id
            try:
                prepared = prepare(case, _Override(backend, args.op, fn), reference)  # type: ignore[arg-type]
                out = prepared.fn()
                ref = next(b for b in prepared.baselines if b.name == "reference")
                why = disagreement(ref.fn(), out) if ref.fn is not None else None
            except Exception as exc:  # a config that cannot serve the case is reported, not timed
                why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:160]
            if why is not None:
                row["problems"][label] = why
                continue
            row["us"][label] = round(timer.many([prepared.fn])[0].median_s * 1e6, 2)
            del prepared, out
        rows.append(row)
        print(f"  {_short(cfg, tuned)}: " + ", ".join(f"{v:.1f}" for v in row["us"].values()), flush=True)

    base = rows[0]["us"]
    for row in rows:
        ratios = [row["us"][k] / base[k] for k in base if k in row["us"]]
        full = len(ratios) == len(base) and not row["problems"]
        row["geomean_vs_tuned"] = round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 3) if full else None
    ranked = sorted((r for r in rows if r["geomean_vs_tuned"] is not None), key=lambda r: r["geomean_vs_tuned"])
    labels = list(base)
    print(f"\n{'config (changes from tuned)':<44}{'geomean':>8}  " + "  ".join(f"{lbl:>14.14}" for lbl in labels))
    for row in ranked[:12]:
        cells = "  ".join(f"{row['us'][lbl]:>14.1f}" for lbl in labels)
        print(f"{_short(row['config'], tuned):<44.44}{row['geomean_vs_tuned']:>7.3f}x  {cells}")
    failed = [r for r in rows if r["problems"]]
    if failed:
        print(
            f"\n{len(failed)} configs failed on some case, e.g. {_short(failed[0]['config'], tuned)}: "
            f"{next(iter(failed[0]['problems'].values()))}"
        )
    if args.json:
        doc = {
            "op": args.op,
            "device": device,
            "versions": {
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "triton": _triton_version(),
                "python": platform.python_version(),
            },
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "tuned": tuned,
            "cases": labels,
            "rows": rows,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _bind(launcher: Callable[..., Any], cfg: Mapping[str, int]) -> Callable[..., Any]:
    def fn(*a: Any, **kw: Any) -> Any:
        return launcher(*a, config=dict(cfg), **kw)

    return fn


def _short(cfg: Mapping[str, int], tuned: Mapping[str, int]) -> str:
    diff = {k: v for k, v in cfg.items() if tuned.get(k) != v}
    return "tuned" if not diff else " ".join(f"{k}={v}" for k, v in diff.items())


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "-"


if __name__ == "__main__":
    raise SystemExit(main())
