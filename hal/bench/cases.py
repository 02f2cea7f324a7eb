"""Benchmark cases: seeded inputs on the backend's device, the op call, its baselines, and its work.

A :class:`BenchCase` is one (op, shape, dtype). :func:`prepare` builds its inputs directly on the
backend's device from a generator seeded by the case's name, binds them into a no-argument call of
the backend's op, and does the same for each baseline, run side by side in the same process:

- ``reference``: the reference backend's own implementation of the op (``Registry.reference_ops()``,
  plain torch, run on the same device). On the ``cpu`` backend it *is* the implementation, so the
  ratio shows only the cost of the op's input validation.
- ``F.linear`` for ``gemm``; ``torch._scaled_mm`` for ``gemm_fp8``, in its 1×128 / 128×128
  block-scaled form where the installed torch supports it on the device (else listed as unavailable,
  with torch's reason); ``torch._grouped_mm`` for ``grouped_gemm`` and ``torch.bmm`` over every
  ``max_m`` row for ``grouped_gemm_masked``; ``torch._int_mm`` with the scales applied after it for
  ``gemm_int8``.
- ``sdpa``: ``F.scaled_dot_product_attention``, per sequence for ``attention_prefill``, and for
  ``mla_decode`` over keys gathered from the pages (the gather is part of its time: an SDPA-based
  decode has to do it), with the ``s_q`` queries of a sequence as SDPA's heads and the ``h`` query heads
  as its rows, so the single latent head is never copied per head.
- ``F.rms_norm`` for ``rms_norm``; eager torch (``F.silu(a) * b``) for ``silu_and_mul``.

Small ops count nominal arithmetic per element, stated at each builder (``rms_norm`` 4, ``rotary``
3, ``silu_and_mul`` 5 per output, ``quantize_fp8`` and ``quantize_int8`` 3, ``moe_route`` 5 per logit,
``moe_unpermute`` 2 per expert output value); ``moe_permute`` moves data only. INT8 GEMMs count
integer multiply-adds as FLOPs (OPs), against the device's INT8 peak.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hal.backend import Backend
from hal.bench.metrics import Work, attention_prefill_work, gemm_work, grouped_gemm_work, mla_decode_work
from hal.bench.shapes import Shape, ShapeSet
from hal.errors import BenchError
from hal.ops.catalogue import BLOCK, CATALOGUE, KV_BLOCK_SIZE
from hal.quant import quantize_fp8_blocks, quantize_int8_rows

__all__ = [
    "BASELINES",
    "BENCH_OPS",
    "COLLECTIVE_OPS",
    "Baseline",
    "BenchCase",
    "Prepared",
    "cases_for",
    "check_ops",
    "prepare",
]

Fn = Callable[[], Any]


@dataclass(frozen=True)
class Baseline:
    """Something to compare an op with, bound to the case's inputs.

    :param name: as shown in the results (``"F.linear"``).
    :param fn: the no-argument call, or ``None`` when it cannot run here.
    :param unavailable: why ``fn`` is ``None``.
    :param compare: check its output against the op's (off where outputs may legitimately differ,
        e.g. the order of equal-scored experts).
    """

    name: str
    fn: Fn | None
    unavailable: str | None = None
    compare: bool = True


@dataclass(frozen=True)
class Prepared:
    """A case ready to time: the op's call, its work, and its baselines."""

    fn: Fn
    work: Work
    baselines: tuple[Baseline, ...]


@dataclass(frozen=True)
class BenchCase:
    """One benchmark: an op at one shape and dtype.

    :param op: catalogue op name.
    :param shape: its :class:`hal.bench.shapes.Shape`.
    :param dtype: the dtype the case computes in (``"float32"``, ``"bfloat16"``, ``"float8_e4m3fn"``).
    :param float_dtype: the float dtype of its float operands (the shape set's).
    """

    op: str
    shape: Shape
    dtype: str
    float_dtype: str = field(default="float32", compare=False)

    @property
    def key(self) -> tuple[str, str, str]:
        """``(op, shape id, dtype)``: what results are matched on."""
        return (self.op, self.shape.id, self.dtype)

    def __str__(self) -> str:
        return f"{self.op}[{self.shape.id}-{self.dtype}]"


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise BenchError(f"unknown dtype {name!r}")
    return dt


class _Inputs:
    """Seeded random tensors made directly on the device (inputs of deepseek-v3 size take seconds to
    draw on a CPU and copy)."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        try:
            self.g = torch.Generator(device=device)
        except RuntimeError:  # devices without their own generator: draw on the host and copy
            self.g = torch.Generator()
        self.g.manual_seed(seed)

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.g, device=self.g.device, dtype=torch.float32)
        if scale != 1.0:
            t.mul_(scale)
        return self._to(t.to(dtype))

    def rand(self, *shape: int) -> torch.Tensor:
        return self._to(torch.rand(*shape, generator=self.g, device=self.g.device))

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return self._to(torch.randint(0, high, shape, generator=self.g, device=self.g.device))

    def randperm(self, n: int) -> torch.Tensor:
        return self._to(torch.randperm(n, generator=self.g, device=self.g.device))


@dataclass
class _Ctx:
    backend: Backend
    reference: Mapping[str, Callable[..., Any]]
    dtype: torch.dtype  # the case's float dtype
    fp8: torch.dtype | None
    inputs: _Inputs

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def op(self, name: str) -> Callable[..., Any]:
        return self.backend.op(name)

    def ref(self, name: str, *args: Any, compare: bool = True, **kwargs: Any) -> Baseline:
        fn = self.reference[name]
        return Baseline("reference", lambda: fn(*args, **kwargs), compare=compare)

    def need_fp8(self) -> torch.dtype:
        if self.fp8 is None:
            raise BenchError(f"backend {self.backend.name!r} has no FP8 format")
        return self.fp8


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _quant_x(cx: _Ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1×128 activation quantization with the reference's plain-torch implementation (never the op under test)."""
    lead = x.shape[:-1]
    xq, xs = cx.reference["quantize_fp8"](x.reshape(-1, x.shape[-1]), fp8_dtype=cx.need_fp8())
    return xq.reshape(*lead, x.shape[-1]), xs.reshape(*lead, xs.shape[-1])


def _unavailable(name: str, why: str) -> Baseline:
    return Baseline(name, None, why)


def _probe(name: str, fn: Fn, what: str) -> Baseline:
    """``fn`` as a baseline if one call succeeds, else unavailable with torch's reason."""
    try:
        fn()
    except Exception as exc:  # torch raises RuntimeError, ValueError or NotImplementedError by backend
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _unavailable(name, f"{what}: {type(exc).__name__}: {first}"[:300])
    return Baseline(name, fn)


# ---------------------------------------------------------------------------------------------------
# Builders, one per op: (context, shape params) -> Prepared
# ---------------------------------------------------------------------------------------------------


def _gemm(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    m, n, k = p["m"], p["n"], p["k"]
    x, w = cx.inputs.randn(m, k, dtype=cx.dtype), cx.inputs.randn(n, k, dtype=cx.dtype, scale=k**-0.5)
    op = cx.op("gemm")
    el = _elem(cx.dtype)
    return Prepared(
        lambda: op(x, w),
        gemm_work(m, n, k, el, el, _dt(cx.dtype)),
        (cx.ref("gemm", x, w), Baseline("F.linear", lambda: F.linear(x, w))),
    )


def _quantize(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    # 3 FLOPs per value: |x|, the group max, the division by the scale.
    m, k = p["m"], p["k"]
    f8 = cx.need_fp8()
    x = cx.inputs.randn(m, k, dtype=cx.dtype, scale=3.0)
    op = cx.op("quantize_fp8")
    moved = m * k * _elem(cx.dtype) + m * k + m * -(-k // BLOCK) * 4
    return Prepared(
        lambda: op(x, fp8_dtype=f8),
        Work(3.0 * m * k, float(moved), _dt(cx.dtype)),
        # Rounding of values on a group's edge may differ by one fp8 step between implementations.
        (cx.ref("quantize_fp8", x, fp8_dtype=f8, compare=False),),
    )


def _scaled_mm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> Baseline:
    name = "torch._scaled_mm"
    what = f"no 1x128/128x128 block-scaled torch._scaled_mm on {xq.device.type} in torch {torch.__version__}"
    if not hasattr(torch, "_scaled_mm"):
        return _unavailable(name, what)
    # torch's block-scaled layout: a's 1x128 scales M-major ([M, K/128] with stride (1, M)); b = wq.T is
    # column-major, and its 128x128 scales are ws.T ([K/128, N/128], column-major as well).
    sa = xs.t().contiguous().t()
    b, sb = wq.t(), ws.t()
    return _probe(name, lambda: torch._scaled_mm(xq, b, sa, sb, out_dtype=torch.bfloat16), what)


def _gemm_fp8(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    m, n, k = p["m"], p["n"], p["k"]
    f8 = cx.need_fp8()
    xq, xs = _quant_x(cx, cx.inputs.randn(m, k))
    wq, ws = quantize_fp8_blocks(cx.inputs.randn(n, k, scale=k**-0.5), fp8_dtype=f8)
    op = cx.op("gemm_fp8")
    return Prepared(
        lambda: op(xq, xs, wq, ws),
        gemm_work(m, n, k, 1, 2, "float8"),
        (cx.ref("gemm_fp8", xq, xs, wq, ws), _scaled_mm(xq, xs, wq, ws)),
    )


def _offsets(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(list(rows)).cumsum(0).tolist()], dtype=torch.int64, device=device)


def _grouped(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    rows, n, k = p["groups"], p["n"], p["k"]
    e, m = len(rows), sum(rows)
    x = cx.inputs.randn(m, k, dtype=cx.dtype)
    w = cx.inputs.randn(e, n, k, dtype=cx.dtype, scale=k**-0.5)
    offsets = _offsets(rows, cx.device)
    op = cx.op("grouped_gemm")
    el = _elem(cx.dtype)
    grouped = _unavailable("torch._grouped_mm", f"torch {torch.__version__} has no torch._grouped_mm")
    if hasattr(torch, "_grouped_mm"):
        ends = offsets[1:].to(torch.int32)
        wt = w.transpose(-2, -1)
        grouped = _probe(
            "torch._grouped_mm",
            lambda: torch._grouped_mm(x, wt, offs=ends),
            f"torch._grouped_mm cannot run {_dt(cx.dtype)} on {cx.device.type}",
        )
    return Prepared(
        lambda: op(x, w, offsets),
        grouped_gemm_work(rows, n, k, el, el, _dt(cx.dtype)),
        (cx.ref("grouped_gemm", x, w, offsets), grouped),
    )


def _grouped_masked(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    e, max_m, rows, n, k = p["experts"], p["max_m"], p["masked_m"], p["n"], p["k"]
    x = cx.inputs.randn(e, max_m, k, dtype=cx.dtype)
    w = cx.inputs.randn(e, n, k, dtype=cx.dtype, scale=k**-0.5)
    masked = torch.tensor(rows, dtype=torch.int32, device=cx.device)
    op = cx.op("grouped_gemm_masked")
    wt = w.transpose(1, 2)
    el = _elem(cx.dtype)
    # bmm computes every max_m row: with every row valid (DeepGEMM's masked benchmark) it is the same work.
    return Prepared(
        lambda: op(x, w, masked),
        grouped_gemm_work(rows, n, k, el, el, _dt(cx.dtype)),
        (cx.ref("grouped_gemm_masked", x, w, masked), Baseline("torch.bmm", lambda: torch.bmm(x, wt))),
    )


def _grouped_fp8(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    rows, n, k = p["groups"], p["n"], p["k"]
    e, m = len(rows), sum(rows)
    xq, xs = _quant_x(cx, cx.inputs.randn(m, k))
    wq, ws = quantize_fp8_blocks(cx.inputs.randn(e, n, k, scale=k**-0.5), fp8_dtype=cx.need_fp8())
    offsets = _offsets(rows, cx.device)
    op = cx.op("grouped_gemm_fp8")
    return Prepared(
        lambda: op(xq, xs, wq, ws, offsets),
        grouped_gemm_work(rows, n, k, 1, 2, "float8"),
        (cx.ref("grouped_gemm_fp8", xq, xs, wq, ws, offsets),),
    )


def _grouped_fp8_masked(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    e, max_m, rows, n, k = p["experts"], p["max_m"], p["masked_m"], p["n"], p["k"]
    xq, xs = _quant_x(cx, cx.inputs.randn(e, max_m, k))
    wq, ws = quantize_fp8_blocks(cx.inputs.randn(e, n, k, scale=k**-0.5), fp8_dtype=cx.need_fp8())
    masked = torch.tensor(rows, dtype=torch.int32, device=cx.device)
    op = cx.op("grouped_gemm_fp8_masked")
    return Prepared(
        lambda: op(xq, xs, wq, ws, masked),
        grouped_gemm_work(rows, n, k, 1, 2, "float8"),
        (cx.ref("grouped_gemm_fp8_masked", xq, xs, wq, ws, masked),),
    )


def _quantize_int8(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    # 3 FLOPs per value, as quantize_fp8: |x|, the row max, the division by the scale (and the rounding).
    m, k = p["m"], p["k"]
    x = cx.inputs.randn(m, k, dtype=cx.dtype, scale=3.0)
    op = cx.op("quantize_int8")
    return Prepared(
        lambda: op(x),
        Work(3.0 * m * k, float(m * k * _elem(cx.dtype) + m * k + m * 4), _dt(cx.dtype)),
        # values on a rounding edge may land one step apart between implementations
        (cx.ref("quantize_int8", x, compare=False),),
    )


def _int_mm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> Baseline:
    """``torch._int_mm`` (int8 x int8 → int32) with the scales applied after, where torch has it here."""
    name = "torch._int_mm"
    what = f"torch._int_mm cannot run M={xq.shape[0]}, N={wq.shape[0]}, K={xq.shape[1]} on {xq.device.type}"
    if not hasattr(torch, "_int_mm"):
        return _unavailable(name, f"torch {torch.__version__} has no torch._int_mm")
    wt, scale = wq.t(), ws[None, :]
    return _probe(
        name, lambda: (torch._int_mm(xq, wt).float() * xs[:, None] * scale).to(torch.bfloat16), what
    )


def _gemm_int8(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    m, n, k = p["m"], p["n"], p["k"]
    xq, xs = cx.reference["quantize_int8"](cx.inputs.randn(m, k))
    wq, ws = quantize_int8_rows(cx.inputs.randn(n, k, scale=k**-0.5))
    op = cx.op("gemm_int8")
    return Prepared(
        lambda: op(xq, xs, wq, ws),
        gemm_work(m, n, k, 1, 2, "int8"),
        (cx.ref("gemm_int8", xq, xs, wq, ws), _int_mm(xq, xs, wq, ws)),
    )


def _grouped_int8(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    rows, n, k = p["groups"], p["n"], p["k"]
    e, m = len(rows), sum(rows)
    xq, xs = cx.reference["quantize_int8"](cx.inputs.randn(m, k))
    wq, ws = quantize_int8_rows(cx.inputs.randn(e, n, k, scale=k**-0.5))
    offsets = _offsets(rows, cx.device)
    op = cx.op("grouped_gemm_int8")
    return Prepared(
        lambda: op(xq, xs, wq, ws, offsets),
        grouped_gemm_work(rows, n, k, 1, 2, "int8"),
        (cx.ref("grouped_gemm_int8", xq, xs, wq, ws, offsets),),
    )


def _decode_lengths(b: int, mean: int, s_q: int) -> list[int]:
    """``b`` cache lengths spread evenly over [mean/2, 3·mean/2] (FlashMLA benchmarks variable lengths)."""
    if b == 1:
        return [max(mean, s_q)]
    return [max(s_q, round(mean * (0.5 + i / (b - 1)))) for i in range(b)]


def _mla(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    b, s_q, h, d, dv, causal = p["b"], p["s_q"], p["h"], p["d"], p["dv"], p["causal"]
    lens = _decode_lengths(b, p["mean_sk"], s_q)
    per_seq = [-(-n // KV_BLOCK_SIZE) for n in lens]
    total, max_blocks = sum(per_seq), max(per_seq)
    # Pages handed out in a random order, as a paged cache that has been in use would have them.
    perm = cx.inputs.randperm(total).to(torch.int32)
    table = torch.zeros(b, max_blocks, dtype=torch.int32, device=cx.device)
    start = 0
    for s, nb in enumerate(per_seq):
        table[s, :nb] = perm[start : start + nb]
        start += nb
    cache = cx.inputs.randn(total, KV_BLOCK_SIZE, 1, d, dtype=cx.dtype)
    q = cx.inputs.randn(b, s_q, h, d, dtype=cx.dtype)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=cx.device)
    op = cx.op("mla_decode")
    scale = d**-0.5

    # SDPA over gathered keys: q [b, s_q, h, d] read as [batch, heads = s_q, rows = h, d], so each
    # sequence's single latent head serves its h query heads as rows, without a per-head copy.
    bt = table.long()
    cols = torch.arange(max_blocks * KV_BLOCK_SIZE, device=cx.device)
    limit = seqlens.long()[:, None] - (s_q - 1 - torch.arange(s_q, device=cx.device))[None, :] if causal else None
    if limit is None:
        mask = (cols[None, :] < seqlens.long()[:, None])[:, None, None, :]  # [b, 1, 1, L]
    else:
        mask = (cols[None, None, :] < limit[:, :, None])[:, :, None, :]  # [b, s_q, 1, L]

    def sdpa() -> torch.Tensor:
        keys = cache[bt].reshape(b, 1, max_blocks * KV_BLOCK_SIZE, d)
        k = keys.expand(b, s_q, -1, d)
        return F.scaled_dot_product_attention(q, k, k[..., :dv], attn_mask=mask, scale=scale)

    return Prepared(
        lambda: op(q, cache, table, seqlens, head_dim_v=dv, causal=causal),
        mla_decode_work(b, s_q, h, sum(lens), d, dv, _elem(cx.dtype), _dt(cx.dtype)),
        (
            cx.ref("mla_decode", q, cache, table, seqlens, head_dim_v=dv, causal=causal),
            _probe("sdpa", sdpa, f"F.scaled_dot_product_attention failed on {cx.device.type}"),
        ),
    )


def _cu(lens: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(list(lens)).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _prefill(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    lq, lk, h, hkv, dqk, dv, causal = (p[k] for k in ("lens_q", "lens_k", "h", "h_kv", "d_qk", "d_v", "causal"))
    q = cx.inputs.randn(sum(lq), h, dqk, dtype=cx.dtype)
    k = cx.inputs.randn(sum(lk), hkv, dqk, dtype=cx.dtype)
    v = cx.inputs.randn(sum(lk), hkv, dv, dtype=cx.dtype)
    cu_q, cu_k = _cu(lq, cx.device), _cu(lk, cx.device)
    op = cx.op("attention_prefill")
    sq, sk = cu_q.tolist(), cu_k.tolist()
    bounds = list(zip(sq[:-1], sq[1:], sk[:-1], sk[1:], strict=True))
    masks: list[torch.Tensor | None] = []
    for q0, q1, k0, k1 in bounds:
        n_q, n_k = q1 - q0, k1 - k0
        if causal and n_q != n_k:  # SDPA's is_causal is top-left aligned; the contract's is bottom-right
            rows = torch.arange(n_q, device=cx.device)[:, None]
            masks.append(torch.arange(n_k, device=cx.device)[None, :] <= rows + (n_k - n_q))
        else:
            masks.append(None)
    gqa = h != hkv

    def sdpa() -> torch.Tensor:
        out = torch.empty(q.shape[0], h, dv, dtype=q.dtype, device=q.device)
        for (q0, q1, k0, k1), mask in zip(bounds, masks, strict=True):
            o = F.scaled_dot_product_attention(
                q[q0:q1].transpose(0, 1),
                k[k0:k1].transpose(0, 1),
                v[k0:k1].transpose(0, 1),
                attn_mask=mask,
                is_causal=causal and mask is None,
                enable_gqa=gqa,
            )
            out[q0:q1] = o.transpose(0, 1)
        return out

    return Prepared(
        lambda: op(q, k, v, cu_q, cu_k, causal=causal),
        attention_prefill_work(lq, lk, h, hkv, dqk, dv, causal, _elem(cx.dtype), _dt(cx.dtype)),
        (
            cx.ref("attention_prefill", q, k, v, cu_q, cu_k, causal=causal),
            _probe("sdpa", sdpa, f"F.scaled_dot_product_attention failed on {cx.device.type}"),
        ),
    )


def _route(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    # 5 FLOPs per logit (the sigmoid, about 4, and the bias); the top-k selections are comparisons.
    t, e, top_k = p["t"], p["e"], p["top_k"]
    logits = cx.inputs.randn(t, e, dtype=cx.dtype, scale=2.0)
    bias = cx.inputs.randn(e, scale=0.1)
    kw = {"top_k": top_k, "n_group": p["n_group"], "topk_group": p["topk_group"], "routed_scaling_factor": p["scaling"]}
    op = cx.op("moe_route")
    moved = t * e * _elem(cx.dtype) + e * 4 + t * top_k * (4 + 8)
    return Prepared(
        lambda: op(logits, bias, **kw),
        Work(5.0 * t * e, float(moved), _dt(cx.dtype)),
        # experts come back in no particular order: outputs are not compared
        (cx.ref("moe_route", logits, bias, compare=False, **kw),),
    )


def _topk_ids(cx: _Ctx, t: int, e: int, top_k: int) -> torch.Tensor:
    return cx.inputs.rand(t, e).topk(top_k, dim=1).indices


def _permute(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    # Data movement only: every token row read once and written top_k times, ids in, order out.
    t, hid, e, top_k = p["t"], p["h"], p["e"], p["top_k"]
    x = cx.inputs.randn(t, hid, dtype=cx.dtype)
    ids = _topk_ids(cx, t, e, top_k)
    op = cx.op("moe_permute")
    el = _elem(cx.dtype)
    moved = t * hid * el + t * top_k * hid * el + 2 * t * top_k * 8 + (e + 1) * 8
    return Prepared(
        lambda: op(x, ids, e), Work(0.0, float(moved), _dt(cx.dtype)), (cx.ref("moe_permute", x, ids, e),)
    )


def _unpermute(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    # 2 FLOPs (multiply, add) per expert output value.
    t, hid, top_k = p["t"], p["h"], p["top_k"]
    y = cx.inputs.randn(t * top_k, hid, dtype=cx.dtype)
    order = cx.inputs.randperm(t * top_k)
    weights = cx.inputs.rand(t, top_k)
    op = cx.op("moe_unpermute")
    el = _elem(cx.dtype)
    moved = t * top_k * hid * el + t * top_k * (4 + 8) + t * hid * el
    return Prepared(
        lambda: op(y, order, weights),
        Work(2.0 * t * top_k * hid, float(moved), _dt(cx.dtype)),
        (cx.ref("moe_unpermute", y, order, weights),),
    )


def _rms_norm(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    # 4 FLOPs per value: square, accumulate, scale by the rsqrt, multiply by the weight.
    t, d = p["t"], p["d"]
    x, w = cx.inputs.randn(t, d, dtype=cx.dtype), cx.inputs.randn(d, dtype=cx.dtype)
    op = cx.op("rms_norm")
    el = _elem(cx.dtype)
    baselines = [cx.ref("rms_norm", x, w, eps=1e-6)]
    if hasattr(F, "rms_norm"):
        baselines.append(Baseline("F.rms_norm", lambda: F.rms_norm(x, (d,), w, eps=1e-6)))
    return Prepared(
        lambda: op(x, w, eps=1e-6), Work(4.0 * t * d, float((2 * t * d + d) * el), _dt(cx.dtype)), tuple(baselines)
    )


def _rotary(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    # 3 FLOPs per value: each rotated pair takes 4 multiplies and 2 adds.
    t, h, d, interleaved = p["t"], p["h"], p["d"], p["interleaved"]
    max_pos = max(4096, t)
    x = cx.inputs.randn(t, h, d, dtype=cx.dtype)
    positions = cx.inputs.randint(max_pos, t)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=cx.device).float() / d))
    ang = torch.arange(max_pos, device=cx.device).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1)
    op = cx.op("rotary")
    el = _elem(cx.dtype)
    moved = 2 * t * h * d * el + t * d * 4 + t * 8
    return Prepared(
        lambda: op(x, positions, cos_sin, interleaved=interleaved),
        Work(3.0 * t * h * d, float(moved), _dt(cx.dtype)),
        (cx.ref("rotary", x, positions, cos_sin, interleaved=interleaved),),
    )


def _silu(cx: _Ctx, p: Mapping[str, Any]) -> Prepared:
    # 5 FLOPs per output value: silu(a) = a / (1 + exp(-a)) is about 4, times b is 1.
    t, n = p["t"], p["d"]
    x = cx.inputs.randn(t, 2 * n, dtype=cx.dtype)
    op = cx.op("silu_and_mul")
    el = _elem(cx.dtype)
    return Prepared(
        lambda: op(x),
        Work(5.0 * t * n, float(3 * t * n * el), _dt(cx.dtype)),
        (cx.ref("silu_and_mul", x), Baseline("torch eager", lambda: F.silu(x[..., :n]) * x[..., n:])),
    )


_BUILDERS: dict[str, Callable[[_Ctx, Mapping[str, Any]], Prepared]] = {
    "gemm": _gemm,
    "quantize_fp8": _quantize,
    "gemm_fp8": _gemm_fp8,
    "grouped_gemm": _grouped,
    "grouped_gemm_masked": _grouped_masked,
    "grouped_gemm_fp8": _grouped_fp8,
    "grouped_gemm_fp8_masked": _grouped_fp8_masked,
    "quantize_int8": _quantize_int8,
    "gemm_int8": _gemm_int8,
    "grouped_gemm_int8": _grouped_int8,
    "mla_decode": _mla,
    "attention_prefill": _prefill,
    "moe_route": _route,
    "moe_permute": _permute,
    "moe_unpermute": _unpermute,
    "rms_norm": _rms_norm,
    "rotary": _rotary,
    "silu_and_mul": _silu,
}

#: The compute ops ``hal bench`` measures, in catalogue order.
BENCH_OPS: tuple[str, ...] = tuple(op for op in CATALOGUE if op in _BUILDERS)
#: Collectives: benchmarked by ``bench/collectives`` (2-process gloo), never by ``hal bench``.
COLLECTIVE_OPS: tuple[str, ...] = ("all_reduce", "all_to_all")
_FP8_OPS = frozenset({"quantize_fp8", "gemm_fp8", "grouped_gemm_fp8", "grouped_gemm_fp8_masked"})
_INT8_OPS = frozenset({"quantize_int8", "gemm_int8", "grouped_gemm_int8"})

#: The baselines each op is compared with (some may turn out unavailable on a device).
BASELINES: Mapping[str, tuple[str, ...]] = {
    "gemm": ("reference", "F.linear"),
    "quantize_fp8": ("reference",),
    "gemm_fp8": ("reference", "torch._scaled_mm"),
    "grouped_gemm": ("reference", "torch._grouped_mm"),
    "grouped_gemm_masked": ("reference", "torch.bmm"),
    "grouped_gemm_fp8": ("reference",),
    "grouped_gemm_fp8_masked": ("reference",),
    "quantize_int8": ("reference",),
    "gemm_int8": ("reference", "torch._int_mm"),
    "grouped_gemm_int8": ("reference",),
    "mla_decode": ("reference", "sdpa"),
    "attention_prefill": ("reference", "sdpa"),
    "moe_route": ("reference",),
    "moe_permute": ("reference",),
    "moe_unpermute": ("reference",),
    "rms_norm": ("reference", "F.rms_norm"),
    "rotary": ("reference",),
    "silu_and_mul": ("reference", "torch eager"),
}


def check_ops(ops: Iterable[str]) -> list[str]:
    """Validate op names for ``--ops``; returns them in catalogue order.

    :raises hal.errors.BenchError: an unknown op, or a collective (benchmarked under ``bench/collectives``).
    """
    wanted = list(dict.fromkeys(o.strip() for o in ops if o.strip()))
    for op in wanted:
        if op in COLLECTIVE_OPS or (op in CATALOGUE and CATALOGUE[op].kind == "collective"):
            raise BenchError(
                f"--ops: {op!r} is a collective; collectives need several processes and are benchmarked by "
                "`pytest bench/collectives` (2-process gloo), not by hal bench"
            )
        if op not in _BUILDERS:
            raise BenchError(f"--ops: {op!r} is not a benchmarked op; choose from: {', '.join(BENCH_OPS)}")
    return [op for op in BENCH_OPS if op in wanted]


def cases_for(
    shapes: ShapeSet,
    backend: Backend,
    ops: Iterable[str] | None = None,
    *,
    quick: bool = False,
) -> list[tuple[BenchCase, str | None]]:
    """Every case of ``shapes`` for ``backend``, each with ``None`` or why it cannot run there.

    :param ops: only these ops (``None``: every op of :data:`BENCH_OPS`).
    :param quick: only the shapes marked quick.
    """
    selected = BENCH_OPS if ops is None else check_ops(ops)
    caps = backend.capabilities
    fp8 = caps.fp8_dtype
    float_dtype = _torch_dtype(shapes.dtype)
    out: list[tuple[BenchCase, str | None]] = []
    for op in selected:
        is_fp8, is_int8 = op in _FP8_OPS, op in _INT8_OPS
        if is_fp8:
            dtype = _dt(fp8) if fp8 is not None else "float8"
        else:
            dtype = "int8" if is_int8 else shapes.dtype
        for shape in shapes.for_op(op, quick):
            case = BenchCase(op, shape, dtype, shapes.dtype)
            why = None
            if is_fp8 and fp8 is None:
                why = f"backend {backend.name!r} ({caps.arch}) has no FP8 format"
            elif is_int8 and not caps.int8:
                why = f"backend {backend.name!r} ({caps.arch}) has no INT8 matmul"
            elif float_dtype not in caps.dtypes:
                why = f"backend {backend.name!r} does not compute in {shapes.dtype}"
            out.append((case, why))
    return out


def seed_of(case: BenchCase) -> int:
    """The case's input seed: a function of its name only, so every run and device draws alike."""
    return zlib.crc32(str(case).encode())


def prepare(case: BenchCase, backend: Backend, reference: Mapping[str, Callable[..., Any]]) -> Prepared:
    """Build ``case``'s inputs on ``backend``'s device and bind the op and its baselines to them.

    :param reference: the reference backend's own ops (``Registry.reference_ops()``).
    """
    cx = _Ctx(
        backend,
        reference,
        _torch_dtype(case.float_dtype),
        backend.capabilities.fp8_dtype,
        _Inputs(backend.device, seed_of(case)),
    )
    return _BUILDERS[case.op](cx, case.shape.params)
