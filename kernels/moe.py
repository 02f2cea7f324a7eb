"""MoE token handling in Triton: fused DeepSeek routing, and the permute / unpermute around ``grouped_gemm``.

- ``moe_route``: one program per ``BLOCK_T`` tokens holds each token's ``E`` logits as a
  ``[BLOCK_T, n_group, E / n_group]`` tile (both trailing dims padded to powers of two, so group sizes
  such as DeepSeek-V2's 20 work), scores them (sigmoid or softmax, fp32), adds the correction bias,
  keeps the best ``topk_group`` groups and picks the ``top_k`` experts by repeated arg-max. Ties go to
  the lowest group / expert index (the contract leaves them open; ``torch.topk`` on the CPU breaks them
  in no documented order). A NaN score counts as -inf, so every id is a valid expert whatever the logits.
- ``moe_permute``: a counting sort, stable by construction. One program per expert scans the flat ids
  ``t * top_k + j`` in order and records each copy's rank among its expert's copies and the expert's
  count; a device-side cumsum of the counts gives the offsets; a second kernel writes each copy's row
  and flat index to ``offsets[expert] + rank``. No host synchronization. An id outside ``[0, E)`` never
  indexes anything: one more program counts those copies, and they go after the experts' rows.
- ``moe_unpermute``: the inverse of ``order`` is built by a scatter kernel, then one program per block
  of tokens and columns gathers each token's ``top_k`` rows in ``j`` order and accumulates their
  weighted sum in fp32 (deterministic; no atomics).

Contracts: :func:`hal.ops.catalogue.moe_route`, :func:`~hal.ops.catalogue.moe_permute`,
:func:`~hal.ops.catalogue.moe_unpermute`; oracles in ``hal_cpu.reference.moe``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from hal.errors import OpInputError
from hal.types import Permutation, RouteResult
from hal_kernels import _common
from hal_kernels._common import CompileSpec

__all__ = ["DEFAULTS", "OPS", "REFERENCE", "compile_specs", "moe_permute", "moe_route", "moe_unpermute"]

#: default launch configs per op (a backend's tuning file overrides any subset of the keys).
DEFAULTS: Mapping[str, Mapping[str, int]] = {
    # BLOCK_T tokens per program; each token's E scores live in registers.
    "moe_route": {"BLOCK_T": 2, "num_warps": 4, "num_stages": 1},
    # BLOCK_N flat ids per scan step (count kernel); BLOCK_R rows x BLOCK_H columns per scatter program.
    "moe_permute": {"BLOCK_N": 1024, "BLOCK_R": 16, "BLOCK_H": 256, "num_warps": 4, "num_stages": 1},
    # BLOCK_T tokens x BLOCK_N columns per program.
    "moe_unpermute": {"BLOCK_T": 16, "BLOCK_N": 256, "num_warps": 8, "num_stages": 1},
}


# ===================================================================================================
# Kernels
# ===================================================================================================


@triton.jit
def _moe_route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    T,
    stride_t,
    group_size,
    n_group,
    topk_group,
    top_k,
    scaling,
    HAS_BIAS: tl.constexpr,
    SOFTMAX: tl.constexpr,
    GROUPED: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    grp = tl.arange(0, BLOCK_G)  # [BG]
    sub = tl.arange(0, BLOCK_S)  # [BS]
    expert = grp[:, None] * group_size + sub[None, :]  # [BG, BS]
    valid = (grp[:, None] < n_group) & (sub[None, :] < group_size)  # [BG, BS]
    tok_ok = tok < T
    mask = tok_ok[:, None, None] & valid[None, :, :]  # [BT, BG, BS]

    ptrs = logits_ptr + tok.to(tl.int64)[:, None, None] * stride_t + expert[None, :, :]
    # Upcast right after the load: scores, bias and top-k all run in fp32 (as the reference does).
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    neg_inf = float("-inf")
    if SOFTMAX:
        x = tl.where(valid[None, :, :], x, neg_inf)
        row_max = tl.max(tl.max(x, axis=2), axis=1)  # [BT]
        ex = tl.exp(x - row_max[:, None, None])
        ex = tl.where(valid[None, :, :], ex, 0.0)
        denom = tl.sum(tl.sum(ex, axis=2), axis=1)
        scores = ex / denom[:, None, None]
    else:
        # Padding lanes zeroed: a lane past a group's size has the id of an expert of the next group, so
        # sigmoid(0) = 0.5 there would be added to that expert's weight.
        scores = tl.where(valid[None, :, :], tl.sigmoid(x), 0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert, mask=valid, other=0.0)
        choice = scores + bias[None, :, :]
    else:
        choice = scores
    # A NaN score (a NaN logit, or a softmax over an infinite one) is never chosen over a number: it
    # counts as -inf, so a row of NaN still gets top_k distinct experts (and NaN weights).
    choice = tl.where(valid[None, :, :] & (choice == choice), choice, neg_inf)
    avail = valid[None, :, :] & (tok >= 0)[:, None, None]  # [BT, BG, BS] experts still choosable

    if GROUPED:
        if HAS_BIAS:
            # DeepSeek-V3: a group scores the sum of its top-2 choice scores.
            top1 = tl.max(choice, axis=2)  # [BT, BG]
            first = tl.min(tl.where(choice == top1[:, :, None], sub[None, None, :], BLOCK_S), axis=2)
            rest = tl.where(sub[None, None, :] == first[:, :, None], neg_inf, choice)
            gscore = top1 + tl.max(rest, axis=2)
        else:
            # DeepSeek-V2: a group scores its best expert.
            gscore = tl.max(choice, axis=2)
        g_open = (grp < n_group)[None, :] & (tok >= 0)[:, None]  # [BT, BG] groups not yet kept
        kept = (grp < 0)[None, :] & (tok >= 0)[:, None]
        for _ in range(topk_group):
            best = tl.max(tl.where(g_open, gscore, neg_inf), axis=1)  # [BT]
            hit = g_open & (gscore == best[:, None])
            gi = tl.min(tl.where(hit, grp[None, :], BLOCK_G), axis=1)
            sel = grp[None, :] == gi[:, None]
            kept = kept | sel
            g_open = g_open & ~sel
        avail = avail & kept[:, :, None]

    kk = tl.arange(0, BLOCK_K)
    w_acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    id_acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in range(top_k):
        best = tl.max(tl.max(tl.where(avail, choice, neg_inf), axis=2), axis=1)  # [BT]
        hit = avail & (choice == best[:, None, None])
        ei = tl.min(tl.min(tl.where(hit, expert[None, :, :], 1 << 30), axis=2), axis=1)  # [BT]
        # Nothing left to choose (top_k > topk_group * group_size) must still give an id < E.
        ei = tl.minimum(ei, n_group * group_size - 1)
        sel = (expert[None, :, :] == ei[:, None, None]) & valid[None, :, :]  # not a padding lane's alias
        w = tl.sum(tl.sum(tl.where(sel, scores, 0.0), axis=2), axis=1)  # the unbiased score
        avail = avail & ~sel
        w_acc = tl.where(kk[None, :] == j, w[:, None], w_acc)
        id_acc = tl.where(kk[None, :] == j, ei[:, None], id_acc)
    if NORM:
        w_acc = w_acc / (tl.sum(w_acc, axis=1)[:, None] + 1e-20)
    w_acc = w_acc * scaling

    out_off = tok.to(tl.int64)[:, None] * top_k + kk[None, :]
    out_mask = tok_ok[:, None] & (kk[None, :] < top_k)
    tl.store(weights_ptr + out_off, w_acc, mask=out_mask)
    tl.store(ids_ptr + out_off, id_acc.to(tl.int64), mask=out_mask)


@triton.jit
def _moe_count_kernel(
    ids_ptr,
    rank_ptr,
    counts_ptr,
    N,
    E,
    BLOCK_N: tl.constexpr,
):
    # Program e < E scans every flat id in order: a copy's rank among expert e's copies is the number
    # of earlier copies of e, which makes the resulting sort stable. Program E does the same for the
    # copies whose id is not in [0, E): they are placed after every expert's rows (the padding).
    e = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    seen = tl.zeros((), dtype=tl.int32)
    for start in range(0, N, BLOCK_N):
        idx = start + offs
        ok = idx < N
        ids = tl.load(ids_ptr + idx, mask=ok, other=-1)
        hit = tl.where(e == E, (ids < 0) | (ids >= E), ids == e) & ok
        hit_i = hit.to(tl.int32)
        before = tl.cumsum(hit_i, axis=0) - hit_i  # exclusive prefix within the block
        tl.store(rank_ptr + idx, seen + before, mask=hit)
        seen += tl.sum(hit_i, axis=0)
    tl.store(counts_ptr + e, seen.to(tl.int64))


@triton.jit
def _moe_scatter_kernel(
    x_ptr,
    ids_ptr,
    rank_ptr,
    offsets_ptr,
    out_ptr,
    order_ptr,
    N,
    H,
    E,
    top_k,
    stride_x,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    flat = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] flat index t * top_k + j
    ok = flat < N
    ids = tl.load(ids_ptr + flat, mask=ok, other=0)
    rank = tl.load(rank_ptr + flat, mask=ok, other=0)
    # An id outside [0, E) never indexes offsets: its copy goes to the padding, from offsets[E] on,
    # ranked by the count kernel's program E.
    segment = tl.where((ids >= 0) & (ids < E), ids, E)
    dst = tl.load(offsets_ptr + segment, mask=ok, other=0) + rank  # [BR] int64
    if pid_h == 0:
        tl.store(order_ptr + dst, flat.to(tl.int64), mask=ok)
    tok = (flat // top_k).to(tl.int64)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m = ok[:, None] & (cols[None, :] < H)
    row = tl.load(x_ptr + tok[:, None] * stride_x + cols[None, :], mask=m)
    tl.store(out_ptr + dst[:, None] * H + cols[None, :], row, mask=m)


@triton.jit
def _invert_kernel(order_ptr, inv_ptr, N, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < N
    f = tl.load(order_ptr + r, mask=ok, other=0)
    tl.store(inv_ptr + f, r, mask=ok)


@triton.jit
def _moe_unpermute_kernel(
    y_ptr,
    inv_ptr,
    w_ptr,
    out_ptr,
    T,
    N,
    top_k,
    stride_y,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_ok = tok < T
    m = tok_ok[:, None] & (cols[None, :] < N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(top_k):
        flat = tok.to(tl.int64) * top_k + j
        row = tl.load(inv_ptr + flat, mask=tok_ok, other=0).to(tl.int64)
        w = tl.load(w_ptr + flat, mask=tok_ok, other=0.0)
        y = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += y * w[:, None]
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * N + cols[None, :], out, mask=m)


# ===================================================================================================
# Launchers
# ===================================================================================================


def _row_major(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        raise OpInputError(op, name, f"needs unit stride in its last dim, got strides {list(t.stride())}")


def _route_launch(
    cfg: Mapping[str, int],
    logits_dtype: torch.dtype,
    bias_dtype: torch.dtype | None,
    *,
    scoring_func: str,
    n_group: int,
    group_size: int,
    top_k: int,
    norm: bool,
) -> _common.Launch:
    """The routing kernel's launch (the launcher's, and the compile specs'); without a bias the
    (unread) bias pointer is the fp32 weights output."""
    return _common.Launch(
        _moe_route_kernel,
        pointers={
            "logits_ptr": _common.ptr(logits_dtype),
            "bias_ptr": _common.ptr(bias_dtype or torch.float32),
            "weights_ptr": "*fp32",
            "ids_ptr": "*i64",
        },
        constexprs={
            "HAS_BIAS": bias_dtype is not None,
            "SOFTMAX": scoring_func == "softmax",
            "GROUPED": n_group > 1,
            "NORM": bool(norm),
            "BLOCK_T": cfg["BLOCK_T"],
            "BLOCK_G": triton.next_power_of_2(n_group),
            "BLOCK_S": triton.next_power_of_2(group_size),
            "BLOCK_K": triton.next_power_of_2(top_k),
        },
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        scalars={"scaling": "fp32"},
    )


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
    config: Mapping[str, int] | None = None,
) -> RouteResult:
    """Fused DeepSeek routing (contract: :func:`hal.ops.catalogue.moe_route`).

    :param router_logits: float32 | bfloat16 | float16 [T, E], unit stride in E.
    :param correction_bias: float32 [E] contiguous, or ``None``.
    :param config: ``BLOCK_T``, ``num_warps``, ``num_stages`` (see :data:`DEFAULTS`).
    :returns: ``RouteResult(weights float32 [T, top_k], ids int64 [T, top_k])``; ids in descending
        order of their choice score, ties to the lowest expert index.
    """
    op = "moe_route"
    cfg = _common.merge_config(DEFAULTS[op], config, op)
    tensors = {"router_logits": router_logits}
    if correction_bias is not None:
        tensors["correction_bias"] = correction_bias
    _common.require_device(op, tensors)
    _row_major(op, "router_logits", router_logits)
    if correction_bias is not None and not correction_bias.is_contiguous():
        raise OpInputError(op, "correction_bias", "must be contiguous")
    t, e = router_logits.shape
    device = router_logits.device
    weights = _common.empty((t, top_k), torch.float32, device)
    ids = _common.empty((t, top_k), torch.int64, device)
    if t == 0:
        return RouteResult(weights, ids)
    group_size = e // n_group
    launch = _route_launch(
        cfg,
        router_logits.dtype,
        None if correction_bias is None else correction_bias.dtype,
        scoring_func=scoring_func,
        n_group=n_group,
        group_size=group_size,
        top_k=top_k,
        norm=norm_topk_prob,
    )
    launch(
        (triton.cdiv(t, cfg["BLOCK_T"]),),
        router_logits,
        correction_bias if correction_bias is not None else weights,  # unread without a bias
        weights,
        ids,
        t,
        router_logits.stride(0),
        group_size,
        n_group,
        topk_group,
        top_k,
        float(routed_scaling_factor),
    )
    return RouteResult(weights, ids)


#: Row dtypes the scatter kernel copies as they are; rows of any other dtype are copied as bytes.
_NATIVE_ROWS = (torch.float32, torch.bfloat16, torch.float16)


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x [T, H]`` as the scatter kernel copies it: itself for fp32 / bf16 / fp16, else its bytes
    ``[T, H * itemsize]`` (fp8 of either flavour, and any other dtype the contract allows: every target
    loads and stores u8)."""
    if x.dtype in _NATIVE_ROWS:
        return x
    try:
        return x.view(torch.uint8)
    except RuntimeError:  # a one-column x with a non-unit column stride, which the kernel takes as it is
        return x.contiguous().view(torch.uint8)


def _count_launch(cfg: Mapping[str, int], ids_dtype: torch.dtype) -> _common.Launch:
    """``moe_permute``'s count kernel (the launcher's, and the compile specs')."""
    return _common.Launch(
        _moe_count_kernel,
        pointers={"ids_ptr": _common.ptr(ids_dtype), "rank_ptr": "*i32", "counts_ptr": "*i64"},
        constexprs={"BLOCK_N": cfg["BLOCK_N"]},
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _scatter_launch(cfg: Mapping[str, int], row_dtype: torch.dtype, ids_dtype: torch.dtype) -> _common.Launch:
    """``moe_permute``'s scatter kernel for rows of ``row_dtype`` (fp8 rows come as bytes)."""
    row = _common.ptr(row_dtype)
    return _common.Launch(
        _moe_scatter_kernel,
        pointers={
            "x_ptr": row,
            "ids_ptr": _common.ptr(ids_dtype),
            "rank_ptr": "*i32",
            "offsets_ptr": "*i64",
            "out_ptr": row,
            "order_ptr": "*i64",
        },
        constexprs={"BLOCK_R": cfg["BLOCK_R"], "BLOCK_H": cfg["BLOCK_H"]},
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def moe_permute(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    config: Mapping[str, int] | None = None,
) -> Permutation:
    """Stable counting sort of token copies by expert (contract: :func:`hal.ops.catalogue.moe_permute`).

    :param x: any dtype [T, H], unit stride in H (rows other than fp32 / bf16 / fp16 are copied as bytes).
    :param topk_ids: int32 | int64 [T, top_k], values in ``[0, E)``; a copy with an id outside it is not
        any expert's: it goes after every expert's rows (rows ``offsets[E]:``, the padding
        ``grouped_gemm`` writes as zeros), in flat-index order, so ``order`` stays a permutation.
    :param num_experts: E.
    :param config: ``BLOCK_N``, ``BLOCK_R``, ``BLOCK_H``, ``num_warps``, ``num_stages``.
    :returns: ``Permutation(x [T * top_k, H], offsets int64 [E + 1], order int64 [T * top_k])``.
    """
    op = "moe_permute"
    cfg = _common.merge_config(DEFAULTS[op], config, op)
    _common.require_device(op, {"x": x, "topk_ids": topk_ids})
    _row_major(op, "x", x)
    t, h = x.shape
    top_k = topk_ids.shape[1]
    n = t * top_k
    device = x.device
    ids = topk_ids.contiguous()
    x_sorted = _common.empty((n, h), x.dtype, device)
    offsets = _common.empty((num_experts + 1,), torch.int64, device)
    order = _common.empty((n,), torch.int64, device)
    rank = torch.empty((n,), dtype=torch.int32, device=device)
    counts = torch.empty((num_experts + 1,), dtype=torch.int64, device=device)  # the last: ids out of range
    _count_launch(cfg, ids.dtype)((num_experts + 1,), ids, rank, counts, n, num_experts)
    # The prefix sum over E counts is tiny: torch's cumsum, on the device, no host synchronization.
    offsets[:1].zero_()
    torch.cumsum(counts[:num_experts], 0, out=offsets[1:])
    if n:
        rows, rows_sorted = _rows_view(x), _rows_view(x_sorted)
        width = rows.shape[1]  # H, or H * itemsize for byte rows
        grid = (triton.cdiv(n, cfg["BLOCK_R"]), max(1, triton.cdiv(width, cfg["BLOCK_H"])))
        _scatter_launch(cfg, rows.dtype, ids.dtype)(
            grid, rows, ids, rank, offsets, rows_sorted, order, n, width, num_experts, top_k, rows.stride(0)
        )
    return Permutation(x_sorted, offsets, order)


#: rows of ``order`` per program of the invert kernel.
_INVERT_BLOCK = 1024


def _invert_launch(cfg: Mapping[str, int], order_dtype: torch.dtype) -> _common.Launch:
    """``moe_unpermute``'s inverse-permutation kernel (``inv`` has ``order``'s dtype)."""
    index = _common.ptr(order_dtype)
    return _common.Launch(
        _invert_kernel,
        pointers={"order_ptr": index, "inv_ptr": index},
        constexprs={"BLOCK": _INVERT_BLOCK},
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _unpermute_launch(cfg: Mapping[str, int], y_dtype: torch.dtype, inv_dtype: torch.dtype) -> _common.Launch:
    """``moe_unpermute``'s gather kernel (the launcher's, and the compile specs')."""
    y = _common.ptr(y_dtype)
    return _common.Launch(
        _moe_unpermute_kernel,
        pointers={"y_ptr": y, "inv_ptr": _common.ptr(inv_dtype), "w_ptr": "*fp32", "out_ptr": y},
        constexprs={"BLOCK_T": cfg["BLOCK_T"], "BLOCK_N": cfg["BLOCK_N"]},
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def moe_unpermute(
    y: torch.Tensor,
    order: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    config: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """Weighted gather back to token order (contract: :func:`hal.ops.catalogue.moe_unpermute`).

    :param y: float32 | bfloat16 | float16 [T * top_k, N], unit stride in N.
    :param order: int64 | int32 [T * top_k], a permutation of ``range(T * top_k)``.
    :param topk_weights: float32 [T, top_k].
    :param config: ``BLOCK_T``, ``BLOCK_N``, ``num_warps``, ``num_stages``.
    :returns: y's dtype [T, N]; each token's sum taken over ``j`` in order, in fp32.
    """
    op = "moe_unpermute"
    cfg = _common.merge_config(DEFAULTS[op], config, op)
    _common.require_device(op, {"y": y, "order": order, "topk_weights": topk_weights})
    _row_major(op, "y", y)
    t, top_k = topk_weights.shape
    ncols = y.shape[1]
    device = y.device
    out = _common.empty((t, ncols), y.dtype, device)
    if t == 0 or ncols == 0:
        return out
    if top_k == 0:
        return out.zero_()
    rows = t * top_k
    order = order.contiguous()
    weights = topk_weights.contiguous()
    inv = torch.empty((rows,), dtype=order.dtype, device=device)
    _invert_launch(cfg, order.dtype)((triton.cdiv(rows, _INVERT_BLOCK),), order, inv, rows)
    grid = (triton.cdiv(t, cfg["BLOCK_T"]), triton.cdiv(ncols, cfg["BLOCK_N"]))
    _unpermute_launch(cfg, y.dtype, inv.dtype)(grid, y, inv, weights, out, t, ncols, top_k, y.stride(0))
    return out


OPS = {"moe_route": moe_route, "moe_permute": moe_permute, "moe_unpermute": moe_unpermute}

REFERENCE = {
    "moe_route": "hal_cpu.reference.moe:moe_route",
    "moe_permute": "hal_cpu.reference.moe:moe_permute",
    "moe_unpermute": "hal_cpu.reference.moe:moe_unpermute",
}


# ===================================================================================================
# Compile specs
# ===================================================================================================

#: DeepSeek routers compiled: (name, E, n_group, top_k, scoring, bias, norm).
_ROUTERS = (
    ("sigmoid, bias, 8 groups", 256, 8, 8, "sigmoid", True, True),  # V3
    ("softmax, 8 groups of 20", 160, 8, 6, "softmax", False, False),  # V2
    ("softmax, no groups", 64, 1, 6, "softmax", False, False),  # V2-Lite (greedy)
)


def compile_specs(fp8: str, tuning: Mapping[str, Mapping[str, int]]) -> list[CompileSpec]:
    """What ``hal compile-check`` compiles: every kernel as the model launches it (fp32 router logits,
    int64 ids and order, bf16 rows; DeepSeek-V3's, V2's and V2-Lite's routers), and the dtypes the
    launchers take besides (bf16 and fp16 logits and rows, int32 ids and order). fp8 rows are permuted
    as bytes, so ``fp8`` is not needed.

    :param fp8: the target's Triton fp8 pointer type (unused).
    :param tuning: op name → config; a missing op uses :data:`DEFAULTS`.
    """
    del fp8
    route = _common.merge_config(DEFAULTS["moe_route"], tuning.get("moe_route"), "moe_route")
    perm = _common.merge_config(DEFAULTS["moe_permute"], tuning.get("moe_permute"), "moe_permute")
    unperm = _common.merge_config(DEFAULTS["moe_unpermute"], tuning.get("moe_unpermute"), "moe_unpermute")
    f32, bf16, f16, i32, i64 = torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64

    def name(dtype: torch.dtype) -> str:
        return _common.ptr(dtype)[1:]

    specs: list[CompileSpec] = []
    for logits in (f32, bf16, f16):
        for label, e, n_group, top_k, scoring, bias, norm in _ROUTERS if logits == f32 else _ROUTERS[:1]:
            launch = _route_launch(
                route, logits, f32 if bias else None,
                scoring_func=scoring, n_group=n_group, group_size=e // n_group, top_k=top_k, norm=norm,
            )  # fmt: skip
            specs.append(launch.spec(f"moe_route[{name(logits)} logits, {label}]"))
    for ids in (i64, i32):
        specs.append(_count_launch(perm, ids).spec(f"moe_permute.count[{name(ids)} ids]"))
    for rows, ids in ((f32, i64), (bf16, i64), (f16, i64), (torch.uint8, i64), (bf16, i32)):
        label = "fp8 (as u8)" if rows == torch.uint8 else name(rows)
        specs.append(_scatter_launch(perm, rows, ids).spec(f"moe_permute.scatter[{label} rows, {name(ids)} ids]"))
    for order in (i64, i32):
        specs.append(_invert_launch(unperm, order).spec(f"moe_unpermute.invert[{name(order)} order]"))
    for y, order in ((f32, i64), (bf16, i64), (f16, i64), (bf16, i32)):
        specs.append(_unpermute_launch(unperm, y, order).spec(f"moe_unpermute[{name(y)}, {name(order)} order]"))
    return specs
