"""The Ascend backend's compute ops, through torch_npu's fused operators.

This module imports ``torch_npu`` at import, which loads Huawei's CANN libraries: it is imported only by
:func:`hal_ascend._backend.build`, after the ``ascend`` backend has been selected, never while probing.
It creates no device context itself.

Every function has exactly the signature of its contract in :mod:`hal.ops.catalogue` and is called only
with input that passed the contract's checks. Each calls the documented torch_npu operator named in its
docstring, with the argument names, layouts and dtypes of that operator's document (cited in each
function), and converts between HAL's layouts and the operator's (HAL weights are ``[N, K]``, the
``F.linear`` convention; torch_npu's matmuls take ``[K, N]``, here as a transposed view, which their
documents allow, so no weight is copied).

An operator only covers part of what a HAL contract allows (a dtype, a head count, a block size). A
call outside the documented envelope is served by the reference implementation (plain torch, which runs
on the NPU); the first such call of each kind is logged on the ``hal.ascend`` logger at INFO with the
reason, and each function's docstring states its envelope.

Verified against a CPU emulation of these operators written from the same documents
(``tests/backends/ascend/torch_npu_emulation.py``), not on an NPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch_npu  # CANN; the ops below call torch_npu.<op>

from hal.types import Permutation, RouteResult

__all__ = [
    "COMPUTE_OPS",
    "gemm_int8",
    "grouped_gemm",
    "grouped_gemm_int8",
    "mla_decode",
    "moe_permute",
    "moe_route",
    "moe_unpermute",
    "quantize_int8",
    "rms_norm",
    "rotary",
    "silu_and_mul",
]

log = logging.getLogger("hal.ascend")

# Documents cited below (the Ascend PyTorch operator reference and the op-plugin repository's copy of it).
DOC_DYNAMIC_QUANT = "https://gitcode.com/Ascend/op-plugin/blob/master/docs/context/torch_npu-npu_dynamic_quant.md"
DOC_QUANT_MATMUL = "https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000172.html"
#: The current op-plugin copy of the same document: it adds the int32 output row used for float32 results.
DOC_QUANT_MATMUL_CURRENT = "https://gitcode.com/Ascend/op-plugin/blob/master/docs/context/torch_npu-npu_quant_matmul.md"
DOC_GROUPED_MATMUL = "https://gitcode.com/Ascend/op-plugin/blob/master/docs/context/torch_npu-npu_grouped_matmul.md"
DOC_RMS_NORM = "https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000860.html"
DOC_SWIGLU = "https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000834.html"
DOC_ROTARY_MUL = "https://gitcode.com/Ascend/op-plugin/blob/master/docs/context/torch_npu-npu_rotary_mul.md"
DOC_MOE_GATING = "https://gitcode.com/Ascend/op-plugin/blob/master/docs/context/torch_npu-npu_moe_gating_top_k.md"
DOC_FIA = "https://gitcode.com/Ascend/op-plugin/blob/master/docs/context/torch_npu-npu_fused_infer_attention_score.md"
DOC_MOE_INIT_ROUTING = "https://gitcode.com/Ascend/op-plugin/blob/master/docs/context/torch_npu-npu_moe_init_routing.md"
#: The op-plugin test of npu_moe_init_routing: its golden is a *stable* argsort of the row-major flattened
#: expert_idx, with row_idx = arange(NUM_ROWS * K).reshape(K, NUM_ROWS).T (column-major source rows).
DOC_MOE_INIT_ROUTING_TEST = (
    "https://gitcode.com/Ascend/op-plugin/blob/master/test/test_custom_ops/test_npu_moe_init_routing.py"
)
DOC_MOE_FINALIZE = "https://gitcode.com/Ascend/op-plugin/blob/master/docs/context/torch_npu-npu_moe_finalize_routing.md"
#: The 6.0.RC2 release's copy of the same document, which adds "尾轴H,K中最大值小于8KB".
DOC_MOE_FINALIZE_60RC2 = (
    "https://www.hiascend.com/doc_center/source/zh/Pytorch/60RC2/apiref/apilist/ptaoplist_000801.html"
)

_HALF = (torch.float16, torch.bfloat16)
#: npu_quant_matmul: "x1与x2最后一维的shape大小不能超过65535"; npu_grouped_matmul: inner axis < 65536.
_INNER_LIMIT = 65535
_told: set[tuple[str, str]] = set()


def _reference(op: str, why: str) -> Callable[..., Any]:
    """The reference implementation of ``op``, for a call outside the operator's documented envelope."""
    if (op, why) not in _told:
        _told.add((op, why))
        log.info("ascend: %s: %s; the reference implementation (plain torch on the NPU) serves such calls", op, why)
    from hal_cpu.reference import REFERENCE_OPS  # device-agnostic torch; imported only when needed

    return REFERENCE_OPS[op]


# ---------------------------------------------------------------------------------------------------
# INT8 W8A8
# ---------------------------------------------------------------------------------------------------


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic INT8 quantization through ``torch_npu.npu_dynamic_quant(x)``.

    Document: ``torch_npu.npu_dynamic_quant(x, *, smooth_scales=None, group_index=None, dst_type=None)
    -> (y, scale)``, x float16 | bfloat16 with more than one dim, ``scale = rowMax(|x|) / 127`` float32
    of x's shape without the last dim, ``y = round(x / scale)`` int8 (:data:`DOC_DYNAMIC_QUANT`).

    Envelope: x float16 | bfloat16. The document gives no result for an all-zero row (its scale is 0),
    so such rows get HAL's scale 1 and zeros here. float32 input (which the operator does not take,
    and a cast would change the values) is served by the reference.
    """
    if x.dtype not in _HALF:
        return _reference("quantize_int8", "npu_dynamic_quant takes float16 | bfloat16, x is float32")(x)
    if x.shape[0] == 0:
        return torch.empty(x.shape, dtype=torch.int8, device=x.device), x.new_empty(0, dtype=torch.float32)
    y, scale = torch_npu.npu_dynamic_quant(x)
    zero = scale == 0
    return y.masked_fill(zero.unsqueeze(-1), 0), scale.masked_fill(zero, 1.0)


def _unit_scale(device: torch.device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


def gemm_int8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8 matmul through ``torch_npu.npu_quant_matmul(x1, x2, scale, *, pertoken_scale, output_dtype)``.

    Document: x1 int8 ``[m, k]``, x2 int8 ``[k, n]`` (the weight), scale ``[n]`` (or ``[1]``),
    pertoken_scale float32 ``[m]``; A2/A3 take (scale float32 | bfloat16, pertoken_scale float32) →
    bfloat16 and (scale float32, pertoken_scale float32) → float16 (:data:`DOC_QUANT_MATMUL`), and, in
    the current document, (scale float32 | bfloat16, no pertoken_scale) → int32
    (:data:`DOC_QUANT_MATMUL_CURRENT`); last dims at most 65535. x2 is passed as
    ``wq.t()``, a transposed view of HAL's ``[N, K]`` weight, as the document's own example does
    (``x2.t()``), so the weight is neither copied nor stored twice.

    bfloat16 and float16 results come straight from the operator. The operator has no float32 output:
    for ``out_dtype=float32`` it returns the exact int32 accumulators (with a unit scale, so either
    reading of scale on an int32 output gives them) and the two scales are applied in float32; a
    torch_npu release older than that document may lack the int32 output. Envelope: K, N <= 65535.
    """
    k, n = xq.shape[1], wq.shape[0]
    if k > _INNER_LIMIT or n > _INNER_LIMIT:
        return _reference("gemm_int8", f"npu_quant_matmul takes last dims <= {_INNER_LIMIT}")(
            xq, xs, wq, ws, out_dtype=out_dtype
        )
    x2 = wq.t()  # [K, N]
    if out_dtype in _HALF:
        return torch_npu.npu_quant_matmul(xq, x2, ws, pertoken_scale=xs, output_dtype=out_dtype)
    acc = torch_npu.npu_quant_matmul(xq, x2, _unit_scale(xq.device), output_dtype=torch.int32)
    return acc.float() * xs.unsqueeze(1) * ws.unsqueeze(0)


def _group_list(offsets: torch.Tensor, m: int) -> torch.Tensor:
    """npu_grouped_matmul's cumulative ``group_list`` (int64, one entry per expert) from HAL's offsets.

    The document requires the last entry to equal x's rows; HAL allows padding rows past ``offsets[E]``.
    The last expert's range is stretched over them (no host read of the offsets), and the caller zeroes
    those rows of the result.
    """
    group_list = offsets[1:].to(torch.int64, copy=True)
    group_list[-1] = m
    return group_list


def _zero_padding(y: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(y.shape[0], device=y.device)
    return y.masked_fill((rows >= offsets[-1]).unsqueeze(1), 0)


def _grouped_outside(w: torch.Tensor) -> str | None:
    e, n, k = w.shape
    if e > 1024:
        return f"npu_grouped_matmul takes at most 1024 groups, got E = {e}"
    if k >= _INNER_LIMIT + 1 or n >= _INNER_LIMIT + 1:
        return f"npu_grouped_matmul takes inner dims < {_INNER_LIMIT + 1}, got K = {k}, N = {n}"
    return None


def grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """MoE expert GEMM (contiguous layout) through ``torch_npu.npu_grouped_matmul``.

    Called as ``npu_grouped_matmul([x], [w.transpose(1, 2)], group_list=..., split_item=2, group_type=0,
    group_list_type=0, output_dtype=...)``: one x ``[M, K]``, one weight ``[E, K, N]`` (a transposed view
    of HAL's ``[E, N, K]``; the document supports a transposed weight), one output, grouping on M with a
    cumulative int64 group_list whose last entry is M. Non-quantized dtypes: float16, bfloat16, float32
    (float32 only with single-tensor x, weight and y, as here); at most 1024 groups; inner dims < 65536
    (:data:`DOC_GROUPED_MATMUL`).

    A float32 result from half inputs is computed in float32 (the operator's output is x's dtype), so it
    keeps fp32 accumulation's precision.
    """
    why = _grouped_outside(w)
    if why is not None:
        return _reference("grouped_gemm", why)(x, w, offsets, out_dtype=out_dtype)
    target = out_dtype or x.dtype
    compute = torch.float32 if target is torch.float32 else x.dtype
    m = x.shape[0]
    if m == 0 or w.shape[0] == 0:
        return x.new_zeros(m, w.shape[1], dtype=target)
    (y,) = torch_npu.npu_grouped_matmul(
        [x.to(compute)],
        [w.to(compute).transpose(1, 2)],
        group_list=_group_list(offsets, m),
        split_item=2,
        group_type=0,
        group_list_type=0,
        output_dtype=compute,
    )
    return _zero_padding(y, offsets).to(target)


def grouped_gemm_int8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8 MoE expert GEMM (contiguous layout) through ``torch_npu.npu_grouped_matmul``, per-token quantized.

    The document's per-token quantization rows (Tensor group_list): x int8, weight int8, scale
    bfloat16 with per_token_scale float32 → bfloat16, scale float32 with per_token_scale float32 →
    float16 (:data:`DOC_GROUPED_MATMUL`). Called with ``[xq]``, ``[wq.transpose(1, 2)]`` (``[E, K, N]``),
    ``scale=[ws]`` (``[E, N]``), ``per_token_scale=[xs]`` (``[M]``), split_item 2, group_type 0.

    For a bfloat16 result the operator takes the weight scales in bfloat16 only, so they are rounded to
    bfloat16 (a relative error of at most 2^-9 per output channel, below bfloat16's own output rounding
    bound of 2^-8). A float32 result has no int8 row in the document: the int8 values are widened to
    float32 (exact) and multiplied through the float32 non-quantized row, then both scales are applied
    in float32; this copies the weight per call and is meant for testing, not serving.
    """
    why = _grouped_outside(wq)
    if why is not None:
        return _reference("grouped_gemm_int8", why)(xq, xs, wq, ws, offsets, out_dtype=out_dtype)
    m = xq.shape[0]
    if m == 0 or wq.shape[0] == 0:
        return xs.new_zeros(m, wq.shape[1], dtype=out_dtype)
    group_list = _group_list(offsets, m)
    if out_dtype in _HALF:
        scale = ws.to(torch.bfloat16) if out_dtype is torch.bfloat16 else ws
        (y,) = torch_npu.npu_grouped_matmul(
            [xq],
            [wq.transpose(1, 2)],
            scale=[scale],
            per_token_scale=[xs],
            group_list=group_list,
            split_item=2,
            group_type=0,
            group_list_type=0,
            output_dtype=out_dtype,
        )
        return _zero_padding(y, offsets)
    (acc,) = torch_npu.npu_grouped_matmul(
        [xq.float()],
        [wq.float().transpose(1, 2)],
        group_list=group_list,
        split_item=2,
        group_type=0,
        group_list_type=0,
        output_dtype=torch.float32,
    )
    # Each row's expert, for its weight scales: rows offsets[e] .. offsets[e + 1] - 1 belong to e.
    rows = torch.arange(m, device=xq.device)
    expert = torch.bucketize(rows, offsets[1:].to(torch.int64), right=True).clamp(max=wq.shape[0] - 1)
    return _zero_padding(acc * xs.unsqueeze(1) * ws.index_select(0, expert), offsets)


# ---------------------------------------------------------------------------------------------------
# Small ops
# ---------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm through ``torch_npu.npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd)``.

    Document: self float16 | bfloat16 | float32 with 2-8 dims, gamma of self's dtype (normally self's
    last dim), y the normalized output and rstd the reciprocal RMS for the backward pass
    (:data:`DOC_RMS_NORM`). x is flattened to ``[rows, D]`` (any rank) and gamma cast to x's dtype.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    d = x.shape[-1]
    y, _rstd = torch_npu.npu_rms_norm(x.reshape(-1, d), weight.to(x.dtype), epsilon=eps)
    return y.reshape(x.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate through ``torch_npu.npu_swiglu(input, dim=-1)``: ``silu(A) * B``, A and B x's halves.

    Document: input float32 | float16 | bfloat16, 1-8 dims, even along dim, contiguous, not empty; the
    output has input's dtype (:data:`DOC_SWIGLU`).
    """
    n = x.shape[-1] // 2
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], n)
    src = x if x.dim() <= 8 else x.reshape(-1, x.shape[-1])
    y = torch_npu.npu_swiglu(src.contiguous(), dim=-1)
    return y.reshape(*x.shape[:-1], n)


#: npu_rotary_mul (jit_compile=False, A2/A3): B * N < 1000 and D < 896.
_ROTARY_MAX_BN = 999
_ROTARY_MAX_D = 895


def rotary(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    interleaved: bool = True,
) -> torch.Tensor:
    """Rotary embedding through ``torch_npu.npu_rotary_mul(input, r1, r2, rotary_mode)``.

    Document: ``output = r1 * input + r2 * rotate(input)``, where ``rotary_mode='interleave'`` rotates
    pairs ``(x[2i], x[2i+1])`` (output in input's layout, DeepSeek's) and ``'half'`` the halves (NeoX);
    input float16 | bfloat16 | float32, 4-D; for a BSND input r1 and r2 are ``[1, S, 1, D]``; B * N < 1000,
    D < 896 and even; r1 and r2 in [-1, 1] (:data:`DOC_ROTARY_MUL`). x ``[T, ..., D]`` is viewed as
    BSND ``[1, T, N, D]``. npu_interleave_rope is not used: it takes only D = 64 and returns the rotated
    values de-interleaved, while HAL keeps x's layout.

    r1/r2 are each position's cosines/sines repeated per pair. A cache with YaRN's magnitude folded in may
    exceed 1: the values are divided by their largest magnitude per position (1 when they do not exceed
    1, which keeps the common case exact) and the result is multiplied back.
    """
    d = x.shape[-1]
    if d > _ROTARY_MAX_D:
        return _reference("rotary", f"npu_rotary_mul takes D < {_ROTARY_MAX_D + 1}, got {d}")(
            x, positions, cos_sin_cache, interleaved=interleaved
        )
    t, half = x.shape[0], d // 2
    if x.numel() == 0:
        return torch.empty_like(x)
    cs = cos_sin_cache.index_select(0, positions.long())  # [T, D] fp32
    cos, sin = cs[:, :half], cs[:, half:]
    magnitude = torch.hypot(cos, sin).amax(dim=-1, keepdim=True).clamp(min=1.0)  # [T, 1]
    cos, sin = cos / magnitude, sin / magnitude
    if interleaved:
        r1, r2 = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    else:
        r1, r2 = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    r1 = r1.clamp(-1.0, 1.0).to(x.dtype).view(1, t, 1, d)
    r2 = r2.clamp(-1.0, 1.0).to(x.dtype).view(1, t, 1, d)
    mode = "interleave" if interleaved else "half"
    heads = x.reshape(1, t, -1, d)  # BSND with B = 1
    chunks = [
        torch_npu.npu_rotary_mul(heads[:, :, i : i + _ROTARY_MAX_BN].contiguous(), r1, r2, rotary_mode=mode)
        for i in range(0, heads.shape[2], _ROTARY_MAX_BN)
    ]
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
    return (out * magnitude.to(x.dtype).view(1, t, 1, 1)).reshape(x.shape)


# ---------------------------------------------------------------------------------------------------
# MoE routing
# ---------------------------------------------------------------------------------------------------

_MAX_EXPERTS = 2048


def _route_outside(e: int, n_group: int) -> str | None:
    per_group = e // n_group
    if e > _MAX_EXPERTS:
        return f"npu_moe_gating_top_k takes at most {_MAX_EXPERTS} experts, got {e}"
    if per_group <= 2:
        return f"npu_moe_gating_top_k needs more than 2 experts per group, got E / n_group = {per_group}"
    if -(-per_group // 32) * 32 * n_group > _MAX_EXPERTS:
        return f"npu_moe_gating_top_k needs ceil32(E / group_count) * group_count <= {_MAX_EXPERTS}"
    return None


def moe_route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    scoring_func: str = "sigmoid",
) -> RouteResult:
    """DeepSeek routing through ``torch_npu.npu_moe_gating_top_k`` (:data:`DOC_MOE_GATING`).

    Document: ``npu_moe_gating_top_k(x, k, *, bias=None, k_group=1, group_count=1, group_select_mode=0,
    renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0, eps=1e-20) -> (yOut, expertIdxOut,
    normOut)``: norm_type 1 sigmoid, 0 softmax; experts chosen on ``normOut + bias``; groups scored by
    their maximum (group_select_mode 0) or top-2 sum (1); ``yOut`` is the chosen experts' normOut,
    divided by its sum (+eps) for sigmoid (softmax with renorm 0: not divided), times
    routed_scaling_factor; expertIdxOut int32; normOut float32 when out_flag. x float16 | bfloat16 |
    float32 ``[T, E]``, bias of x's dtype, E <= 2048, E / group_count > 2, renorm only 0. (The 7.0.0
    release's document restricted Atlas A2/A3 further: E = 256, k_group = 4, k <= 32, bias required;
    this follows the current document, so older releases may reject smaller configurations.)

    The logits go in as float32 (HAL's bias is float32 and the operator wants x's dtype for it; it also
    keeps routing decisions those of the fp32 reference). Where the operator's normalization differs from
    ``norm_topk_prob`` (sigmoid without normalization, softmax with it), the weights are gathered from
    normOut (``out_flag=True``) and normalized here.
    """
    e = router_logits.shape[1]
    why = _route_outside(e, n_group)
    if why is not None:
        return _reference("moe_route", why)(
            router_logits,
            correction_bias,
            top_k=top_k,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=norm_topk_prob,
            routed_scaling_factor=routed_scaling_factor,
            scoring_func=scoring_func,
        )
    sigmoid = scoring_func == "sigmoid"
    op_normalizes = sigmoid  # renorm=0: only the sigmoid path divides by the sum
    y, ids, norm_out = torch_npu.npu_moe_gating_top_k(
        router_logits.float(),
        top_k,
        bias=None if correction_bias is None else correction_bias.float(),
        k_group=topk_group,
        group_count=n_group,
        group_select_mode=0 if correction_bias is None else 1,
        renorm=0,
        norm_type=1 if sigmoid else 0,
        out_flag=op_normalizes != norm_topk_prob,
        routed_scaling_factor=routed_scaling_factor,
        eps=1e-20,
    )
    ids = ids.long()
    if op_normalizes == norm_topk_prob:
        return RouteResult(y.float(), ids)
    weights = norm_out.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return RouteResult(weights * routed_scaling_factor, ids)


# ---------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------

#: MLA mode of npu_fused_infer_attention_score: query d 512 (+ query_rope 64), query heads 32/64/128,
#: Q_S 1-16, PageAttention with block_size 16 or 128 (128: also the general page-attention rule).
_MLA_D, _MLA_ROPE, _MLA_HEADS, _MLA_MAX_SQ, _FIA_BLOCK = 512, 64, (32, 64, 128), 16, 128
_CAUSAL_MASK_SIZE = 2048


def _mla_outside(q: torch.Tensor, kv_cache: torch.Tensor, head_dim_v: int, causal: bool) -> str | None:
    _, s_q, h, d = q.shape
    if q.dtype not in _HALF:
        return f"npu_fused_infer_attention_score takes float16 | bfloat16, q is {q.dtype}"
    if d != _MLA_D + _MLA_ROPE or head_dim_v != _MLA_D:
        return f"its MLA mode takes d = {_MLA_D} + {_MLA_ROPE} and head_dim_v = {_MLA_D}, got d = {d}, {head_dim_v}"
    if h not in _MLA_HEADS:
        return f"its MLA mode takes {'/'.join(map(str, _MLA_HEADS))} query heads, got {h}"
    if not 1 <= s_q <= _MLA_MAX_SQ:
        return f"its MLA mode takes 1-{_MLA_MAX_SQ} queries per sequence, got s_q = {s_q}"
    if s_q > 1 and not causal:
        return "its MLA mode takes s_q > 1 only with the causal (sparse_mode 3) mask"
    if _FIA_BLOCK % kv_cache.shape[1]:
        return f"cache pages of {kv_cache.shape[1]} tokens do not tile its {_FIA_BLOCK}-token blocks"
    return None


def _causal_mask(device: torch.device) -> torch.Tensor:
    """sparse_mode 3's optimized mask: 2048 x 2048, True above the diagonal (masked)."""
    ones = torch.ones(_CAUSAL_MASK_SIZE, _CAUSAL_MASK_SIZE, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    head_dim_v: int,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode through ``torch_npu.npu_fused_infer_attention_score`` in its MLA mode.

    Document (:data:`DOC_FIA`): query ``[B, S, N, 512]`` and query_rope ``[B, S, N, 64]``
    (input_layout "BSND", N = num_heads in 32/64/128, S 1-16); key = value ``[blocknum, block_size,
    512]`` and key_rope ``[blocknum, block_size, 64]`` (one latent head: num_key_value_heads 1),
    contiguous; PageAttention is required (block_table int32 ``[B, blocks]``, block_size 16 or 128,
    actual_seq_lengths_kv a host int list); sparse_mode 0 without a mask for S = 1, 3 with the
    2048 x 2048 causal mask for S > 1; softmax_lse_flag is not supported in this mode.

    HAL's cache holds 576 values per token in 64-token pages. The key/rope split must be contiguous, so
    the pages each sequence uses are gathered (in table order, whole 128-token blocks) and split; the
    lengths go to the host (the operator takes them as a list). The operator gives no LSE in MLA mode, so
    ``lse`` is computed here in float32 from the gathered keys; a query that sees no key gets zeros and
    ``-inf``. Envelope: float16 | bfloat16, d = 576 with head_dim_v = 512, 32/64/128 heads, s_q <= 16
    (causal when s_q > 1), pages dividing 128 tokens; other calls are served by the reference.
    """
    why = _mla_outside(q, kv_cache, head_dim_v, causal)
    if why is not None:
        return _reference("mla_decode", why)(
            q, kv_cache, block_table, cache_seqlens, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal
        )
    b, s_q, h, d = q.shape
    dev = q.device
    page = kv_cache.shape[1]
    per_block = _FIA_BLOCK // page
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    lens = [int(n) for n in cache_seqlens.tolist()]
    pages_used = [-(-n // page) for n in lens]
    blocks = max(1, -(-max(pages_used, default=0) // per_block))
    pages = blocks * per_block
    table = block_table[:, :pages].long()
    if table.shape[1] < pages:
        table = torch.nn.functional.pad(table, (0, pages - table.shape[1]))
    used = torch.arange(pages, device=dev).unsqueeze(0) < torch.tensor(pages_used, device=dev).unsqueeze(1)
    table = torch.where(used, table, 0)  # entries past a sequence's length may hold anything
    tokens = kv_cache[:, :, 0].index_select(0, table.reshape(-1)).reshape(b * blocks, _FIA_BLOCK, d)
    key = tokens[..., :_MLA_D].contiguous()
    key_rope = tokens[..., _MLA_D:].contiguous()
    sparse: dict[str, Any] = {"sparse_mode": 0} if s_q == 1 else {"sparse_mode": 3, "atten_mask": _causal_mask(dev)}
    out, _ = torch_npu.npu_fused_infer_attention_score(
        q[..., :_MLA_D].contiguous(),
        key,
        key,
        query_rope=q[..., _MLA_D:].contiguous(),
        key_rope=key_rope,
        num_heads=h,
        num_key_value_heads=1,
        input_layout="BSND",
        scale=scale,
        block_table=torch.arange(b * blocks, dtype=torch.int32, device=dev).view(b, blocks),
        block_size=_FIA_BLOCK,
        actual_seq_lengths_kv=lens,
        **sparse,
    )
    # The LSE the operator cannot return in this mode: scores over the same gathered keys, in fp32.
    keys = tokens.reshape(b, blocks * _FIA_BLOCK, d).float()
    scores = torch.einsum("bqhd,bld->bhql", q.float(), keys) * scale
    pos = torch.arange(blocks * _FIA_BLOCK, device=dev)
    seqlens = torch.tensor(lens, device=dev).view(b, 1)
    limit = seqlens - (s_q - 1 - torch.arange(s_q, device=dev)) * int(causal)  # [b, s_q]
    visible = pos.view(1, 1, -1) < limit.unsqueeze(-1)  # [b, s_q, L]
    lse = torch.logsumexp(scores.masked_fill(~visible.unsqueeze(1), float("-inf")), dim=-1)  # [b, h, s_q]
    unseen = torch.isinf(lse).transpose(1, 2).unsqueeze(-1)  # [b, s_q, h, 1]
    return out.masked_fill(unseen, 0), lse


# ---------------------------------------------------------------------------------------------------
# MoE token permutation
# ---------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
#: npu_moe_init_routing: x's "shape大小需要小于2^24" (its element count).
_INIT_ROUTING_NUMEL_LIMIT = 2**24
#: npu_moe_finalize_routing (6.0.RC2 document): "尾轴H,K中最大值小于8KB", read as a row of H float32 values.
_FINALIZE_ROW_BYTES_LIMIT = 8 * 1024


def moe_permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> Permutation:
    """Token copies sorted by expert through ``torch_npu.npu_moe_init_routing`` (:data:`DOC_MOE_INIT_ROUTING`).

    Document: ``npu_moe_init_routing(x, row_idx, expert_idx, active_num) -> (expanded_x, expanded_row_idx,
    expanded_expert_idx)``, x float16 | bfloat16 | float32 ``[NUM_ROWS, H]`` with fewer than 2^24
    elements, row_idx and expert_idx int32 ``[NUM_ROWS, K]``; ``expanded_expert_idx, sorted_row_idx =
    keyValueSort(expert_idx, row_idx)``, ``expanded_row_idx[sorted_row_idx[i]] = i``, ``expanded_x[i] =
    x[sorted_row_idx[i] % NUM_ROWS]`` (``min(NUM_ROWS, active_num) * K`` rows). So row_idx must hold the
    column-major source index ``j * T + t`` (the document's example and op-plugin's test pass
    ``arange(T * K).reshape(K, T).T``), and expanded_row_idx maps that source index to its destination
    row. The sort is stable over the row-major flattened expert_idx (op-plugin's test compares the
    operator with a stable argsort, :data:`DOC_MOE_INIT_ROUTING_TEST`), which is HAL's order: by expert,
    then by ``t * top_k + j``.

    HAL's ``order`` (destination row → ``t * top_k + j``) is expanded_row_idx inverted and re-indexed
    row-major; the offsets are found in expanded_expert_idx (sorted) with ``searchsorted``.

    Envelope: x float32 | float16 | bfloat16 with fewer than 2^24 elements, T and top_k non-zero; fp8
    or integer x goes to the reference.
    """
    t, k = topk_ids.shape
    why = None
    if x.dtype not in _FLOATS:
        why = f"npu_moe_init_routing takes float16 | bfloat16 | float32 x, got {x.dtype}"
    elif x.numel() >= _INIT_ROUTING_NUMEL_LIMIT:
        why = "npu_moe_init_routing needs x with fewer than 2^24 elements"
    elif t == 0 or k == 0:
        why = "empty routing (no token or no expert per token)"
    if why is not None:
        return _reference("moe_permute", why)(x, topk_ids, num_experts)
    dev = x.device
    # row_idx[t, j] = j * T + t: the column-major source index the operator's formula expects.
    row_idx = torch.arange(t * k, dtype=torch.int32, device=dev).view(k, t).t().contiguous()
    expanded_x, expanded_row_idx, expanded_expert_idx = torch_npu.npu_moe_init_routing(
        x.contiguous(), row_idx, topk_ids.to(torch.int32).contiguous(), t
    )
    src = torch.arange(t * k, dtype=torch.int64, device=dev)  # column-major source index j * T + t
    order = torch.empty(t * k, dtype=torch.int64, device=dev)
    order[expanded_row_idx.long()] = (src % t) * k + src // t  # destination row -> t * top_k + j
    bounds = torch.arange(num_experts + 1, dtype=expanded_expert_idx.dtype, device=dev)
    offsets = torch.searchsorted(expanded_expert_idx.contiguous(), bounds).to(torch.int64)
    return Permutation(expanded_x, offsets, order)


def moe_unpermute(y: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum back in token order through ``torch_npu.npu_moe_finalize_routing`` (:data:`DOC_MOE_FINALIZE`).

    Document: ``npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales,
    expanded_src_to_dst_row, export_for_source_row, drop_pad_mode=0) -> out``, ``out(i, j) = skip1 +
    skip2 + sum_k scales[i, k] * (expanded_permuted_rows[expanded_src_to_dst_row[i + k * NUM_ROWS], j] +
    bias[export_for_source_row[i, k], j])``; skip1, skip2, bias, scales and export_for_source_row may be
    None (skip2 only with skip1); rows float16 | bfloat16 | float32 ``[NUM_ROWS * K, H]``, scales of the
    rows' dtype ``[NUM_ROWS, K]``, expanded_src_to_dst_row int32 ``[NUM_ROWS * K]`` in ``[0, NUM_ROWS * K
    - 1]``, column-major with drop_pad_mode 0 (the only mode every release documents).

    HAL's ``order`` maps a destination row to ``t * top_k + j``; its inverse, re-indexed column-major,
    is expanded_src_to_dst_row. HAL's weights are float32 and the sum is fp32, so the rows go in as
    float32 (scales must have the rows' dtype) and the result is cast back to y's dtype.

    Envelope: T and top_k non-zero; a float32 row of N values under 8 KB (N < 2048), the limit the
    6.0.RC2 document states (:data:`DOC_MOE_FINALIZE_60RC2`); wider rows go to the reference.
    """
    t, k = topk_weights.shape
    n = y.shape[1]
    why = None
    if t == 0 or k == 0:
        why = "empty routing (no token or no expert per token)"
    elif n * 4 >= _FINALIZE_ROW_BYTES_LIMIT:
        why = f"npu_moe_finalize_routing's rows must be under 8 KB (float32 N < 2048), got N = {n}"
    if why is not None:
        return _reference("moe_unpermute", why)(y, order, topk_weights)
    dev = y.device
    dst_of_src = torch.empty(t * k, dtype=torch.int64, device=dev)
    dst_of_src[order.long()] = torch.arange(t * k, dtype=torch.int64, device=dev)  # t * top_k + j -> row
    src_to_dst = dst_of_src.view(t, k).t().reshape(-1).to(torch.int32)  # column-major: j * T + t
    out = torch_npu.npu_moe_finalize_routing(
        y.float().contiguous(),
        None,
        None,
        None,
        topk_weights.float().contiguous(),
        src_to_dst,
        None,
        drop_pad_mode=0,
    )
    return out.to(y.dtype)


#: op name → implementation, for the compute ops this backend serves through torch_npu.
COMPUTE_OPS: dict[str, Callable[..., Any]] = {
    "quantize_int8": quantize_int8,
    "gemm_int8": gemm_int8,
    "grouped_gemm": grouped_gemm,
    "grouped_gemm_int8": grouped_gemm_int8,
    "rms_norm": rms_norm,
    "silu_and_mul": silu_and_mul,
    "rotary": rotary,
    "moe_route": moe_route,
    "moe_permute": moe_permute,
    "moe_unpermute": moe_unpermute,
    "mla_decode": mla_decode,
}
