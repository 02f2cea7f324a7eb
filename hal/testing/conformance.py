"""The conformance kit: every op of a backend against the reference, on fresh random inputs.

Each :class:`Case` builds its inputs on the CPU from a generator seeded by the case id and
``HAL_TEST_SEED``, runs the op through the backend's op table on the backend's device, runs the pure
reference implementation (the reference backend's own ops, never a plugin's override) on the CPU, and
compares: same shapes and dtypes, output on the backend's device, values within a relative error set by
the output dtype (fp32 1e-5, fp16 2e-3, bf16 1e-2). FP8 cases compare the backend's result with the
reference's dequantize-then-fp32 computation on the same quantized inputs.

Third-party backends use it through :mod:`hal.testing.plugin` and :mod:`hal.testing.suite`, or call
:func:`check_backend` directly.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hal.backend import Backend
from hal.ops.catalogue import BLOCK, CATALOGUE
from hal.types import MemoryStats

__all__ = [
    "CASES",
    "TOLERANCE",
    "Case",
    "ConformanceFailure",
    "cases_for",
    "check_backend",
    "check_runtime",
    "run_case",
]

#: Relative error allowed, by output dtype: max |out - ref| / max |ref|.
TOLERANCE: Mapping[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

Args = tuple[tuple[Any, ...], dict[str, Any]]


class ConformanceFailure(AssertionError):
    """A backend's op disagrees with the reference (the message says where and by how much)."""


@dataclass(frozen=True)
class Case:
    """One conformance check.

    :param op: catalogue op name.
    :param id: readable id, also the seed (``M37-N96-K200-bfloat16``).
    :param make: builds ``(args, kwargs)`` on the CPU from a seeded generator.
    :param dtype: the float dtype the case computes in (filtered by the backend's ``dtypes``).
    :param fp8: the fp8 dtype the case needs (filtered by the backend's ``fp8_format``), or ``None``.
    :param compare: a custom comparison ``(out, ref, args) -> None`` raising ConformanceFailure.
    :param int8: the case needs INT8 arithmetic (filtered by the backend's ``int8``).
    """

    op: str
    id: str
    make: Callable[[torch.Generator], Args]
    dtype: torch.dtype
    fp8: torch.dtype | None = None
    compare: Callable[[Any, Any, Args], None] | None = field(default=None, compare=False)
    int8: bool = False

    def __str__(self) -> str:
        return f"{self.op}[{self.id}]"


# ---------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().cpu().double(), ref.detach().cpu().double()
    if ref64.numel() == 0:
        return 0.0
    scale = ref64.abs().max().item()
    return (out64 - ref64).abs().max().item() / max(scale, 1e-30)


def assert_close(out: torch.Tensor, ref: torch.Tensor, where: str, tol: float | None = None) -> None:
    """Same shape and dtype, and max relative error within ``tol`` (default: by dtype)."""
    if not isinstance(out, torch.Tensor):
        raise ConformanceFailure(f"{where}: expected a tensor, got {type(out).__name__}")
    if out.shape != ref.shape:
        raise ConformanceFailure(f"{where}: shape {list(out.shape)}, reference {list(ref.shape)}")
    if out.dtype != ref.dtype:
        raise ConformanceFailure(f"{where}: dtype {out.dtype}, reference {ref.dtype}")
    if not out.is_floating_point():
        if not torch.equal(out.cpu(), ref.cpu()):
            bad = (out.cpu() != ref.cpu()).sum().item()
            raise ConformanceFailure(f"{where}: {bad} of {out.numel()} integer values differ from the reference")
        return
    tol = TOLERANCE.get(ref.dtype, 1e-2) if tol is None else tol
    o, r = out.detach().cpu().float(), ref.detach().cpu().float()
    if o.dtype.is_floating_point and not torch.equal(torch.isnan(o), torch.isnan(r)):
        raise ConformanceFailure(f"{where}: NaN where the reference has none (or the reverse)")
    err = _rel_error(o.nan_to_num(), r.nan_to_num())
    if not err <= tol:
        raise ConformanceFailure(f"{where}: relative error {err:.3g} > {tol:g} ({ref.dtype})")


def _default_compare(out: Any, ref: Any, where: str) -> None:
    if isinstance(ref, torch.Tensor):
        assert_close(out, ref, where)
    elif isinstance(ref, tuple):
        if not isinstance(out, tuple) or len(out) != len(ref):
            raise ConformanceFailure(f"{where}: expected a tuple of {len(ref)}, got {type(out).__name__}")
        for i, (o, r) in enumerate(zip(out, ref, strict=True)):
            _default_compare(o, r, f"{where}[{i}]")
    elif ref is None:
        if out is not None:
            raise ConformanceFailure(f"{where}: expected None, got {type(out).__name__}")
    else:
        raise ConformanceFailure(f"{where}: cannot compare {type(ref).__name__}")


def _devices(out: Any, device: torch.device, where: str) -> None:
    if isinstance(out, torch.Tensor):
        if out.device.type != device.type:
            raise ConformanceFailure(f"{where}: result on {out.device}, expected the backend's device {device}")
    elif isinstance(out, tuple):
        for i, o in enumerate(out):
            _devices(o, device, f"{where}[{i}]")


# ---------------------------------------------------------------------------------------------------
# Input builders (CPU, seeded)
# ---------------------------------------------------------------------------------------------------


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _quant_groups(x: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """1×128 activation quantization in plain torch (so cases do not depend on the op under test)."""
    *lead, k = x.shape
    groups = x.float().reshape(*lead, k // BLOCK, BLOCK)
    scale = groups.abs().amax(-1).clamp(min=1e-4) / torch.finfo(fp8).max
    q = (groups / scale.unsqueeze(-1)).to(fp8).reshape(*lead, k)
    return q, scale


def _quant_blocks(w: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """128×128 weight quantization in plain torch; ``w`` [..., N, K] with K a multiple of 128."""
    *lead, n, k = w.shape
    nb = -(-n // BLOCK)
    padded = torch.zeros(*lead, nb * BLOCK, k)
    padded[..., :n, :] = w.float()
    blocks = padded.reshape(*lead, nb, BLOCK, k // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-4) / torch.finfo(fp8).max
    q = (blocks / scale[..., :, None, :, None]).to(fp8).reshape(*lead, nb * BLOCK, k)[..., :n, :]
    return q.contiguous(), scale


def _offsets(counts: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
FP8S = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _gemm_cases() -> Iterable[Case]:
    for m, n, k in [(1, 64, 128), (37, 96, 200), (128, 256, 512)]:
        for dt in FLOATS:

            def make(g: torch.Generator, m: int = m, n: int = n, k: int = k, dt: torch.dtype = dt) -> Args:
                return (_randn(g, m, k, dtype=dt), _randn(g, n, k, dtype=dt)), {}

            yield Case("gemm", f"M{m}-N{n}-K{k}-{_dt(dt)}", make, dt)

    def make_out(g: torch.Generator) -> Args:
        return (_randn(g, 9, 128, dtype=torch.bfloat16), _randn(g, 40, 128, dtype=torch.bfloat16)), {
            "out_dtype": torch.float32
        }

    yield Case("gemm", "M9-N40-K128-bfloat16-out_float32", make_out, torch.bfloat16)


def _compare_quantize(out: Any, ref: Any, args: Args) -> None:
    (xq, xs), (rq, rs) = out, ref
    x = args[0][0].float()
    gs = args[1].get("group_size", BLOCK)
    assert_close(xs, rs, "quantize_fp8 scales", tol=1e-6)
    if xq.dtype != rq.dtype or xq.shape != rq.shape:
        raise ConformanceFailure(
            f"quantize_fp8: xq is {xq.dtype} {list(xq.shape)}, expected {rq.dtype} {list(rq.shape)}"
        )
    scale = rs.repeat_interleave(gs, dim=1)[:, : x.shape[1]]
    deq = xq.cpu().float() * scale
    # e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 2^-4 of itself; below the
    # smallest normal the step is fixed (2^-3 of it).
    bound = x.abs() * 2.0**-4 + torch.finfo(rq.dtype).smallest_normal * 2.0**-3 * scale + 1e-12
    # A NaN compares False with everything: count it as wrong explicitly (x itself is finite).
    bad = ((deq - x).abs() > bound) | deq.isnan()
    if bad.any():
        raise ConformanceFailure(f"quantize_fp8: {int(bad.sum())} of {x.numel()} values off by more than fp8 rounding")


def _quantize_cases() -> Iterable[Case]:
    for m, k in [(4, 128), (33, 300), (16, 1024)]:
        for dt in (torch.float32, torch.bfloat16):
            for f8 in FP8S:

                def make(
                    g: torch.Generator, m: int = m, k: int = k, dt: torch.dtype = dt, f8: torch.dtype = f8
                ) -> Args:
                    x = _randn(g, m, k, dtype=dt, scale=3.0)
                    x[0, :BLOCK] = 0  # an all-zero group: scale clamps, values stay zero
                    return (x,), {"fp8_dtype": f8}

                yield Case("quantize_fp8", f"M{m}-K{k}-{_dt(dt)}-{_dt(f8)}", make, dt, f8, _compare_quantize)


def _gemm_fp8_cases() -> Iterable[Case]:
    for m, n, k in [(1, 128, 128), (45, 200, 384), (128, 256, 256)]:
        for f8 in FP8S:

            def make(g: torch.Generator, m: int = m, n: int = n, k: int = k, f8: torch.dtype = f8) -> Args:
                xq, xs = _quant_groups(_randn(g, m, k), f8)
                wq, ws = _quant_blocks(_randn(g, n, k, scale=0.05), f8)
                return (xq, xs, wq, ws), {}

            yield Case("gemm_fp8", f"M{m}-N{n}-K{k}-{_dt(f8)}", make, torch.bfloat16, f8)


def _grouped_cases() -> Iterable[Case]:
    counts = [5, 0, 17, 3]
    e, n, k = len(counts), 64, 128
    for dt in FLOATS:

        def make(g: torch.Generator, dt: torch.dtype = dt) -> Args:
            m = sum(counts) + 3  # three padding rows past offsets[E]
            return (_randn(g, m, k, dtype=dt), _randn(g, e, n, k, dtype=dt, scale=0.1), _offsets(counts)), {}

        yield Case("grouped_gemm", f"E{e}-M{sum(counts)}+3-N{n}-K{k}-{_dt(dt)}", make, dt)

        def make_masked(g: torch.Generator, dt: torch.dtype = dt) -> Args:
            masked = torch.tensor([16, 0, 7], dtype=torch.int32)
            return (_randn(g, 3, 16, k, dtype=dt), _randn(g, 3, n, k, dtype=dt, scale=0.1), masked), {}

        yield Case("grouped_gemm_masked", f"E3-MAXM16-N{n}-K{k}-{_dt(dt)}", make_masked, dt)
    for f8 in FP8S:

        def make_fp8(g: torch.Generator, f8: torch.dtype = f8) -> Args:
            m = sum(counts) + 2
            xq, xs = _quant_groups(_randn(g, m, 256), f8)
            wq, ws = _quant_blocks(_randn(g, e, 200, 256, scale=0.05), f8)
            return (xq, xs, wq, ws, _offsets(counts)), {}

        yield Case("grouped_gemm_fp8", f"E{e}-M{sum(counts)}+2-N200-K256-{_dt(f8)}", make_fp8, torch.bfloat16, f8)

        def make_fp8_masked(g: torch.Generator, f8: torch.dtype = f8) -> Args:
            xq, xs = _quant_groups(_randn(g, 3, 8, 256), f8)
            wq, ws = _quant_blocks(_randn(g, 3, 200, 256, scale=0.05), f8)
            return (xq, xs, wq, ws, torch.tensor([8, 0, 3], dtype=torch.int64)), {}

        yield Case("grouped_gemm_fp8_masked", f"E3-MAXM8-N200-K256-{_dt(f8)}", make_fp8_masked, torch.bfloat16, f8)


def _compare_quantize_int8(out: Any, ref: Any, args: Args) -> None:
    (xq, xs), (rq, rs) = out, ref
    x = args[0][0].float()
    assert_close(xs, rs, "quantize_int8 scales", tol=1e-6)
    if xq.dtype != torch.int8 or xq.shape != rq.shape:
        raise ConformanceFailure(f"quantize_int8: xq is {xq.dtype} {list(xq.shape)}, expected int8 {list(rq.shape)}")
    # Rounding may break a tie the other way: every code within one step of the reference's, and the
    # dequantized value within half a step (plus that tie) of x.
    codes = (xq.cpu().int() - rq.int()).abs()
    if int(codes.max()) > 1:
        raise ConformanceFailure(f"quantize_int8: codes differ from the reference by up to {int(codes.max())}")
    err = (xq.cpu().float() * rs.unsqueeze(1) - x).abs()
    if bool((err > rs.unsqueeze(1) * 0.5001 + 1e-12).any()):
        raise ConformanceFailure("quantize_int8: a value is off by more than half a quantization step")


def _int8_cases() -> Iterable[Case]:
    for m, k in [(4, 64), (33, 300)]:
        for dt in (torch.float32, torch.bfloat16):

            def make_q(g: torch.Generator, m: int = m, k: int = k, dt: torch.dtype = dt) -> Args:
                x = _randn(g, m, k, dtype=dt, scale=3.0)
                x[0] = 0  # an all-zero token: scale 1, codes 0
                return (x,), {}

            yield Case("quantize_int8", f"M{m}-K{k}-{_dt(dt)}", make_q, dt, None, _compare_quantize_int8, int8=True)

    def codes(g: torch.Generator, *shape: int) -> torch.Tensor:
        return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)

    for m, n, k in [(1, 64, 128), (37, 96, 200)]:

        def make_g(g: torch.Generator, m: int = m, n: int = n, k: int = k) -> Args:
            return (
                codes(g, m, k),
                torch.rand(m, generator=g) * 0.02,
                codes(g, n, k),
                torch.rand(n, generator=g) * 0.01,
            ), {}

        yield Case("gemm_int8", f"M{m}-N{n}-K{k}", make_g, torch.bfloat16, int8=True)
    counts = [5, 0, 9, 3]

    def make_grouped(g: torch.Generator) -> Args:
        m = sum(counts) + 2
        return (
            codes(g, m, 96),
            torch.rand(m, generator=g) * 0.02,
            codes(g, 4, 40, 96),
            torch.rand(4, 40, generator=g) * 0.01,
            _offsets(counts),
        ), {"out_dtype": torch.float32}

    yield Case("grouped_gemm_int8", f"E4-M{sum(counts)}+2-N40-K96-float32", make_grouped, torch.float32, int8=True)


def _paged(
    g: torch.Generator, lens: Sequence[int], d: int, dt: torch.dtype, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """A paged cache holding random entries for sequences of ``lens``, blocks assigned out of order."""
    per_seq = [max(1, -(-n // block)) for n in lens]
    total = sum(per_seq) + 2  # spare blocks nobody owns
    perm = torch.randperm(total, generator=g)
    table = torch.zeros(len(lens), max(per_seq), dtype=torch.int32)
    i = 0
    for s, nb in enumerate(per_seq):
        table[s, :nb] = perm[i : i + nb].to(torch.int32)
        i += nb
    cache = _randn(g, total, block, 1, d, dtype=dt)
    return cache, table


def _compare_lse(out: Any, ref: Any, args: Args) -> None:
    (o, lse), (r, rlse) = out, ref
    assert_close(o, r, "mla_decode out")
    lse, rlse = lse.cpu(), rlse.cpu()
    if not torch.equal(torch.isinf(lse), torch.isinf(rlse)):
        raise ConformanceFailure("mla_decode lse: -inf (no key seen) where the reference has a value, or the reverse")
    finite = torch.isfinite(rlse)
    tol = 1e-5 if o.dtype == torch.float32 else 2e-3
    err = (lse[finite] - rlse[finite]).abs().max().item() if finite.any() else 0.0
    if err > tol * max(1.0, rlse[finite].abs().max().item() if finite.any() else 1.0):
        raise ConformanceFailure(f"mla_decode lse: abs error {err:.3g} > {tol:g}")


def _attention_cases() -> Iterable[Case]:
    configs = [
        # b, s_q, h, d, dv, lens, causal, dtype
        (2, 1, 16, 576, 512, [1, 130], False, torch.bfloat16),
        (3, 2, 4, 96, 64, [2, 64, 65], True, torch.float32),
        (2, 1, 8, 96, 64, [0, 5], False, torch.float32),
        (2, 2, 4, 96, 64, [1, 70], True, torch.float16),
    ]
    for b, s_q, h, d, dv, lens, causal, dt in configs:

        def make(
            g: torch.Generator,
            b: int = b,
            s_q: int = s_q,
            h: int = h,
            d: int = d,
            dv: int = dv,
            lens: Sequence[int] = lens,
            causal: bool = causal,
            dt: torch.dtype = dt,
        ) -> Args:
            cache, table = _paged(g, lens, d, dt)
            q = _randn(g, b, s_q, h, d, dtype=dt)
            return (q, cache, table, torch.tensor(lens, dtype=torch.int32)), {"head_dim_v": dv, "causal": causal}

        yield Case(
            "mla_decode",
            f"B{b}-SQ{s_q}-H{h}-D{d}-DV{dv}-L{'_'.join(map(str, lens))}{'-causal' if causal else ''}-{_dt(dt)}",
            make,
            dt,
            None,
            _compare_lse,
        )
    prefill = [
        # lens_q, lens_k, h, h_kv, d_qk, d_v, causal, dtype
        ([5, 1, 16], [5, 9, 16], 4, 4, 48, 32, True, torch.float32),
        ([7, 0, 3], [7, 4, 10], 8, 2, 64, 64, True, torch.bfloat16),
        ([6, 2], [3, 5], 4, 1, 32, 16, False, torch.float32),
        ([12], [12], 2, 2, 192, 128, True, torch.float16),
    ]
    for lq, lk, h, hkv, dqk, dv, causal, dt in prefill:

        def make_p(
            g: torch.Generator,
            lq: Sequence[int] = lq,
            lk: Sequence[int] = lk,
            h: int = h,
            hkv: int = hkv,
            dqk: int = dqk,
            dv: int = dv,
            causal: bool = causal,
            dt: torch.dtype = dt,
        ) -> Args:
            cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
            cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
            q = _randn(g, sum(lq), h, dqk, dtype=dt)
            k = _randn(g, sum(lk), hkv, dqk, dtype=dt)
            v = _randn(g, sum(lk), hkv, dv, dtype=dt)
            return (q, k, v, cu_q, cu_k), {"causal": causal}

        yield Case(
            "attention_prefill",
            f"LQ{'_'.join(map(str, lq))}-LK{'_'.join(map(str, lk))}-H{h}-HKV{hkv}-"
            f"D{dqk}-DV{dv}{'-causal' if causal else ''}-{_dt(dt)}",
            make_p,
            dt,
        )


def _compare_route(out: Any, ref: Any, args: Args) -> None:
    (w, ids), (rw, rids) = out, ref
    if ids.dtype != rids.dtype or ids.shape != rids.shape:
        raise ConformanceFailure(
            f"moe_route ids: {ids.dtype} {list(ids.shape)}, expected {rids.dtype} {list(rids.shape)}"
        )
    ids, w = ids.cpu(), w.cpu()
    sid, order = ids.sort(dim=1)
    rsid, rorder = rids.sort(dim=1)
    if not torch.equal(sid, rsid):
        bad = (sid != rsid).any(dim=1).sum().item()
        raise ConformanceFailure(f"moe_route: {bad} tokens chose other experts than the reference")
    assert_close(w.gather(1, order), rw.gather(1, rorder), "moe_route weights")


def _moe_cases() -> Iterable[Case]:
    route = [
        # T, E, top_k, n_group, topk_group, bias, norm, scaling, scoring, dtype
        (7, 64, 6, 8, 3, True, True, 2.5, "sigmoid", torch.float32),
        (5, 16, 2, 1, 1, False, False, 1.0, "softmax", torch.float32),
        (9, 32, 4, 4, 2, True, True, 1.0, "sigmoid", torch.bfloat16),
    ]
    for t, e, top_k, ng, tg, bias, norm, scaling, scoring, dt in route:

        def make(
            g: torch.Generator,
            t: int = t,
            e: int = e,
            top_k: int = top_k,
            ng: int = ng,
            tg: int = tg,
            bias: bool = bias,
            norm: bool = norm,
            scaling: float = scaling,
            scoring: str = scoring,
            dt: torch.dtype = dt,
        ) -> Args:
            logits = _randn(g, t, e, dtype=dt, scale=2.0)
            b = _randn(g, e, scale=0.1) if bias else None
            return (logits, b), {
                "top_k": top_k,
                "n_group": ng,
                "topk_group": tg,
                "norm_topk_prob": norm,
                "routed_scaling_factor": scaling,
                "scoring_func": scoring,
            }

        yield Case(
            "moe_route",
            f"T{t}-E{e}-K{top_k}-G{ng}-TG{tg}-{scoring}{'-bias' if bias else ''}-{_dt(dt)}",
            make,
            dt,
            None,
            _compare_route,
        )
    for dt in (torch.float32, torch.bfloat16):

        def make_perm(g: torch.Generator, dt: torch.dtype = dt) -> Args:
            ids = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(9)])
            return (_randn(g, 9, 32, dtype=dt), ids, 5), {}

        yield Case("moe_permute", f"T9-H32-E5-K2-{_dt(dt)}", make_perm, dt)

        def make_unperm(g: torch.Generator, dt: torch.dtype = dt) -> Args:
            order = torch.randperm(27, generator=g)
            w = torch.rand(9, 3, generator=g)
            return (_randn(g, 27, 16, dtype=dt), order, w), {}

        yield Case("moe_unpermute", f"T9-K3-N16-{_dt(dt)}", make_unperm, dt)


def _small_cases() -> Iterable[Case]:
    for dt in FLOATS:

        def make_norm(g: torch.Generator, dt: torch.dtype = dt) -> Args:
            return (_randn(g, 7, 3, 96, dtype=dt), _randn(g, 96, dtype=dt)), {"eps": 1e-6}

        yield Case("rms_norm", f"T7-H3-D96-{_dt(dt)}", make_norm, dt)

        def make_silu(g: torch.Generator, dt: torch.dtype = dt) -> Args:
            return (_randn(g, 5, 3, 96, dtype=dt),), {}

        yield Case("silu_and_mul", f"T5-H3-N48-{_dt(dt)}", make_silu, dt)
        for interleaved in (True, False):

            def make_rope(g: torch.Generator, dt: torch.dtype = dt, interleaved: bool = interleaved) -> Args:
                pos = torch.randint(0, 100, (6,), generator=g)
                inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
                ang = torch.arange(100).float()[:, None] * inv[None, :]
                cache = torch.cat([ang.cos(), ang.sin()], dim=-1)
                return (_randn(g, 6, 4, 64, dtype=dt), pos, cache), {"interleaved": interleaved}

            yield Case("rotary", f"T6-H4-D64-{'interleaved' if interleaved else 'neox'}-{_dt(dt)}", make_rope, dt)


#: Every conformance case, in catalogue order.
CASES: tuple[Case, ...] = tuple(
    sorted(
        [
            *_gemm_cases(),
            *_quantize_cases(),
            *_gemm_fp8_cases(),
            *_grouped_cases(),
            *_int8_cases(),
            *_attention_cases(),
            *_moe_cases(),
            *_small_cases(),
        ],
        key=lambda c: list(CATALOGUE).index(c.op),
    )
)


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------


def cases_for(backend: Backend, ops: Iterable[str] | None = None) -> list[tuple[Case, str | None]]:
    """Every case with ``None``, or with why it does not apply to this backend (dtype or fp8 format)."""
    wanted = set(ops) if ops is not None else None
    caps = backend.capabilities
    result = []
    for case in CASES:
        if wanted is not None and case.op not in wanted:
            continue
        why = None
        if case.dtype not in caps.dtypes:
            why = f"{backend.name} does not compute in {_dt(case.dtype)}"
        elif case.fp8 is not None and case.fp8 != caps.fp8_dtype:
            why = f"{backend.name}'s fp8 format is {caps.fp8_format or 'none'}, the case needs {_dt(case.fp8)}"
        elif case.int8 and not caps.int8:
            why = f"{backend.name} has no int8 arithmetic"
        result.append((case, why))
    return result


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _seed(case: Case) -> int:
    return zlib.crc32(f"{case}:{os.environ.get('HAL_TEST_SEED', '0')}".encode())


def run_case(backend: Backend, case: Case, reference: Mapping[str, Callable[..., Any]]) -> None:
    """Run one case on ``backend`` and compare with ``reference[case.op]`` (raises ConformanceFailure).

    :param reference: the reference backend's own ops (``Registry.reference_ops()``), run on the CPU.
    """
    g = torch.Generator().manual_seed(_seed(case))
    args, kwargs = case.make(g)
    ref = reference[case.op](*args, **kwargs)
    dev_args = tuple(_to(a, backend.device) for a in args)
    dev_kwargs = {k: _to(v, backend.device) for k, v in kwargs.items()}
    out = backend.op(case.op)(*dev_args, **dev_kwargs)
    backend.synchronize()
    where = f"{backend.name}.{case}"
    _devices(out, backend.device, where)
    if case.compare is not None:
        case.compare(_to(out, torch.device("cpu")), ref, (args, kwargs))
    else:
        _default_compare(_to(out, torch.device("cpu")), ref, where)


def check_runtime(backend: Backend) -> None:
    """The runtime ops keep their contracts (counts, memory figures, pinned buffers)."""
    n = backend.device_count()
    if not isinstance(n, int) or n < 1:
        raise ConformanceFailure(f"{backend.name}.device_count(): expected an int >= 1, got {n!r}")
    if backend.op("synchronize")() is not None:  # a plugin's implementation may break the contract
        raise ConformanceFailure(f"{backend.name}.synchronize() must return None")
    stats = backend.memory_stats()
    if not isinstance(stats, MemoryStats):
        raise ConformanceFailure(f"{backend.name}.memory_stats(): expected hal.MemoryStats, got {type(stats).__name__}")
    for name, value in stats._asdict().items():
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ConformanceFailure(
                f"{backend.name}.memory_stats().{name}: expected bytes >= 0 or None, got {value!r}"
            )
    if stats.total is not None and stats.total <= 0:
        raise ConformanceFailure(f"{backend.name}.memory_stats().total: expected > 0, got {stats.total}")
    buf = backend.pinned_empty([3, 5], torch.float32)
    if buf.shape != (3, 5) or buf.dtype != torch.float32 or buf.device.type != "cpu":
        raise ConformanceFailure(f"{backend.name}.pinned_empty: got {buf.dtype} {list(buf.shape)} on {buf.device}")
    backend.empty_cache()


@dataclass(frozen=True)
class Result:
    """One case's outcome in :func:`check_backend`: ``status`` is ``pass``, ``fail`` or ``skip``."""

    case: str
    status: str
    detail: str = ""


def check_backend(
    backend: Backend, reference: Mapping[str, Callable[..., Any]], ops: Iterable[str] | None = None
) -> list[Result]:
    """Run every applicable case; never raises for a failing case (see each :class:`Result`)."""
    results = []
    try:
        check_runtime(backend)
        results.append(Result("runtime", "pass"))
    except ConformanceFailure as exc:
        results.append(Result("runtime", "fail", str(exc)))
    for case, why in cases_for(backend, ops):
        if why is not None:
            results.append(Result(str(case), "skip", why))
            continue
        try:
            run_case(backend, case, reference)
            results.append(Result(str(case), "pass"))
        except ConformanceFailure as exc:
            results.append(Result(str(case), "fail", str(exc)))
    return results
