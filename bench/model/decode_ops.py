"""Where a decode step's time goes: every backend op timed inside HAL's decode of a benchmark config.

Builds the model of ``test_decode.py``'s config (``large`` by default: the issue's ~452M-parameter
config) with seeded random weights (:func:`hal.model.weights.random_state_dict`; transformers is not
run, though importing ``test_decode.py`` for its configs needs it installed, as ``make test`` does),
prefills ``--batch`` seeded random 32-token prompts, runs 3 greedy decode steps to warm up, then
``--steps`` more with every op of the backend wrapped in a timer. Prints the median step time and, per
op, the time per step, calls per step and time per call; the rest of the step is the model's own
Python and torch glue (embedding, residual adds, slicing, the cache's bookkeeping, sampling).
``--dtype bfloat16`` (or ``float16``) builds the model in that dtype, and ``--quantize fp8`` (or
``int8``) quantizes its linear weights as ``hal run --quantize`` does.

``--gemm-shapes`` instead times the fp32 GEMMs alone, one per kind of weight the built model holds (gate
and up fused, one expert of the stack): ``F.linear(x, W)`` and ``(W @ xᵀ)ᵀ`` for ``x`` of 1 and of
``--batch`` rows, each over enough copies of ``W`` (256 MiB) that no call finds its weight in cache,
and prints the read rate of each.

This is a profile, not the benchmark (``test_decode.py`` is): the timers add about a microsecond per
call. Run ``HAL_VALIDATE=0`` to leave the ops' input checks out, as the decode numbers in the README
were taken::

    HAL_VALIDATE=0 .venv/bin/python bench/model/decode_ops.py --batch 8
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import hal
from hal.model.config import ModelConfig
from hal.model.deepseek import DeepseekModel
from hal.model.loader import quantize_linear
from hal.model.weights import Weight, is_linear, random_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_decode import CONFIGS, PROMPT_LEN  # the benchmark's configs, beside this file


def _timed(fn: Callable[..., Any], name: str, spent: collections.Counter[str], calls: collections.Counter[str]):
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t0
            calls[name] += 1

    return wrapper


def _weight_shapes(model: DeepseekModel) -> dict[str, tuple[int, ...]]:
    """The 2-D weight of every kind of GEMM a decode step runs, as the model holds it (gate and up fused,
    experts stacked)."""
    attn = model.layers[0].attn
    shapes = {"lm_head": tuple(model.lm_head.shape)}
    projections = {name: getattr(attn, name) for name in ("q", "q_a", "q_b", "kv_a", "o")}
    shapes |= {name: tuple(w.shape) for name, w in projections.items() if w is not None}  # q, or q_a and q_b
    for layer in model.layers:
        mlp = layer.mlp
        if not hasattr(mlp, "gate"):  # a dense layer
            shapes |= {"dense gate_up": tuple(mlp.gate_up.shape), "dense down": tuple(mlp.down.shape)}
            continue
        shapes |= {"router": tuple(mlp.gate.shape)}
        shapes |= {"expert gate_up": tuple(mlp.gate_up.shape[1:]), "expert down": tuple(mlp.down.shape[1:])}
        if mlp.shared is not None:
            shapes |= {"shared gate_up": tuple(mlp.shared.gate_up.shape), "shared down": tuple(mlp.shared.down.shape)}
    return shapes


def _gemm_shapes(model: DeepseekModel, batch: int) -> None:
    """Median time of one GEMM per weight shape, rows 1 and ``batch``, and the weight read rate."""
    print(f"{'weight':16s} {'shape':>12s} {'rows':>4s} {'linear us':>10s} {'GB/s':>6s} {'W@xT us':>9s} {'GB/s':>6s}")
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in _weight_shapes(model).items():
        weights = [torch.randn(n, k, generator=g) for _ in range(max(1, (256 << 20) // (n * k * 4)))]
        for rows in sorted({1, batch}):
            x = torch.randn(rows, k, generator=g)
            linear = _median_us(weights, lambda w, x=x: torch.nn.functional.linear(x, w))
            transposed = _median_us(weights, lambda w, x=x: torch.mm(w, x.t()).t())
            gbps = [n * k * 4 / us / 1e3 for us in (linear, transposed)]
            shape = f"{n}x{k}"
            print(f"{name:16s} {shape:>12s} {rows:4d} {linear:10.1f} {gbps[0]:6.1f} {transposed:9.1f} {gbps[1]:6.1f}")


def _median_us(weights: list[torch.Tensor], fn: Callable[[torch.Tensor], Any], n: int = 30) -> float:
    """Median microseconds of ``fn(w)``, cycling through ``weights`` so that each call reads from memory."""
    for i in range(3):
        fn(weights[i % len(weights)])
    times = []
    for i in range(n):
        w = weights[i % len(weights)]
        t0 = time.perf_counter()
        fn(w)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="large", help="benchmark config (default large)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps (default 20)")
    parser.add_argument("--backend", default="cpu", help="HAL backend (default cpu)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype (default float32)"
    )
    parser.add_argument("--quantize", choices=["fp8", "int8"], help="quantize the linear weights, as hal run does")
    parser.add_argument("--gemm-shapes", action="store_true", help="time the weight shapes' GEMMs alone (CPU)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        parser.error("--batch and --steps must be at least 1")

    cfg = ModelConfig.from_dict(CONFIGS[args.config])
    backend = hal.get_backend(args.backend)
    spent: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for name in backend.table:
        setattr(backend, name, _timed(getattr(backend, name), name, spent, calls))
    dtype = getattr(torch, args.dtype)
    what = args.dtype + (f", {args.quantize} weights" if args.quantize else "")
    print(f"building the {args.config} config ({args.backend}, {what}, seeded random weights)…", file=sys.stderr)
    weights: dict[str, Weight] = dict(random_state_dict(cfg, dtype=dtype))
    if args.quantize is not None:
        fp8 = backend.capabilities.fp8_dtype or torch.float8_e4m3fn
        for name, w in list(weights.items()):
            q = quantize_linear(w, args.quantize, fp8) if is_linear(name) and isinstance(w, torch.Tensor) else None
            weights[name] = w if q is None else q
    model = DeepseekModel(cfg, backend, weights, dtype=dtype)
    if args.gemm_shapes:
        _gemm_shapes(model, args.batch)
        return 0
    cache = model.new_cache(args.batch * (-(-(PROMPT_LEN + args.steps + 4) // 64)))
    seqs = list(range(args.batch))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (PROMPT_LEN,), generator=g).tolist() for _ in seqs]
    tokens = model.prefill(cache, seqs, prompts).argmax(-1).tolist()
    for _ in range(3):
        tokens = model.decode(cache, seqs, tokens).argmax(-1).tolist()
    spent.clear()
    calls.clear()
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        tokens = model.decode(cache, seqs, tokens).argmax(-1).tolist()
        steps.append(time.perf_counter() - t0)
    n = args.steps
    in_ops = sum(spent.values()) / n
    print(
        f"{args.config} config, {what}, batch {args.batch}: median step {statistics.median(steps) * 1e3:.2f} ms, "
        f"mean {statistics.mean(steps) * 1e3:.2f} ms, of which backend ops {in_ops * 1e3:.2f} ms"
    )
    print(f"{'op':24s} {'ms/step':>8s} {'calls/step':>10s} {'us/call':>8s}")
    for name, seconds in spent.most_common():
        print(f"{name:24s} {seconds / n * 1e3:8.3f} {calls[name] / n:10.0f} {seconds / calls[name] * 1e6:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
