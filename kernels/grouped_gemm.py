"""Grouped MoE expert GEMMs in DeepGEMM's two layouts, half precision and block-scaled FP8.

**Contiguous** (``grouped_gemm``, ``grouped_gemm_fp8``): token rows sorted by expert, expert ``e``
owning rows ``offsets[e]:offsets[e + 1]``, rows at and past ``offsets[E]`` padding (written as zeros).
The row range is cut into *segments*, one per expert plus the padding, and each segment into M tiles
that never cross its end, so no tile mixes experts and none computes rows it does not own. The launch
grid is ``(cdiv(M, BLOCK_M) + E, N tiles)``, an upper bound on the tile count that the host knows
without reading ``offsets``; each program finds its segment on the device with one vector load of
``offsets``, a prefix sum of the segments' tile counts and a comparison, and programs past the last
tile do nothing. Nothing is synchronized with the host, so the launch can be captured in a graph.

**Masked** (``grouped_gemm_masked``, ``grouped_gemm_fp8_masked``): ``x [E, max_m, K]`` with
``masked_m[e]`` valid rows; the grid is ``(cdiv(max_m, BLOCK_M), N tiles, E)`` and a tile past
``masked_m[e]`` runs no K step and writes zeros (rows past ``masked_m[e]`` may hold garbage, even NaN:
they are never read into a stored row).

The K loops are :func:`hal_kernels.gemm.dot` and :func:`hal_kernels.gemm.fp8_block_dot`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from hal_kernels import _common
from hal_kernels.gemm import (
    DIVISIBLE_BY_16,
    SCALE_BLOCK,
    check_blocks,
    check_contiguous,
    check_unit_stride,
    dot,
    fp8_block_dot,
)

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_CONFIG_FP8",
    "OPS",
    "REFERENCE",
    "compile_specs",
    "grouped_gemm",
    "grouped_gemm_fp8",
    "grouped_gemm_fp8_masked",
    "grouped_gemm_masked",
]

#: Half-precision layouts on H100: 128×128 tiles, 64-deep K steps, 3 × 32 KiB of bf16 stages.
DEFAULT_CONFIG: dict[str, int] = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
#: FP8 layouts on H100: one 128-deep scale block per K step, 4 × 32 KiB of fp8 stages.
DEFAULT_CONFIG_FP8: dict[str, int] = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4}


# ---------------------------------------------------------------------------------------------------
# Device-side tile → segment lookup (contiguous layout)
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _find_segment(offsets_ptr, pid_m, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """``(segment, first row, end row)`` of the ``pid_m``-th M tile: segments ``0..E-1`` are experts,
    ``E`` the padding rows ``offsets[E]:M``; past the last tile the segment is ``> E`` and the range empty."""
    seg_ids = tl.arange(0, BLOCK_E)
    # Segment E (padding) ends at M; lanes past it are empty segments at M.
    starts = tl.load(offsets_ptr + seg_ids, mask=seg_ids <= E, other=M).to(tl.int32)
    ends = tl.load(offsets_ptr + seg_ids + 1, mask=seg_ids < E, other=M).to(tl.int32)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    ends_in_tiles = tl.cumsum(tiles, 0)
    # Tiles are numbered segment after segment: this tile's segment is the number of segments that
    # end at or before it.
    seg = tl.sum((ends_in_tiles <= pid_m).to(tl.int32), 0)
    here = seg_ids == seg
    first_tile = tl.sum(tl.where(here, ends_in_tiles - tiles, 0), 0)
    start = tl.sum(tl.where(here, starts, 0), 0)
    end = tl.sum(tl.where(here, ends, 0), 0)
    row0 = start + (pid_m - first_tile) * BLOCK_M
    return seg, row0, tl.where(seg <= E, end, row0)


@triton.jit
def _store_tile(out_ptr, acc, rows, row_end, cols, N, stride_om, keep):
    """Store ``acc`` (or zeros where ``keep`` is false) to rows ``< row_end`` and columns ``< N``."""
    acc = tl.where(keep, acc, 0.0)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    mask = (rows < row_end)[:, None] & (cols < N)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_kernel(
    x_ptr,
    w_ptr,
    offsets_ptr,
    out_ptr,
    M,
    N,
    K,
    E,
    stride_xm,
    stride_we,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg, row0, row_end = _find_segment(offsets_ptr, pid_m, M, E, BLOCK_M, BLOCK_E)
    is_expert = seg < E
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = tl.minimum(seg, E - 1).to(tl.int64)
    acc = dot(
        x_ptr,
        w_ptr + expert * stride_we,
        tl.minimum(rows, tl.maximum(row_end - 1, 0)),
        tl.minimum(cols, N - 1),
        K,
        tl.where(is_expert, tl.cdiv(K, BLOCK_K), 0),
        stride_xm,
        stride_wn,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        UPCAST,
        IEEE,
    )
    _store_tile(out_ptr, acc, rows, row_end, cols, N, stride_om, is_expert)


@triton.jit
def _grouped_fp8_kernel(
    x_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    offsets_ptr,
    out_ptr,
    M,
    N,
    K,
    E,
    stride_xm,
    stride_xsm,
    stride_xsk,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg, row0, row_end = _find_segment(offsets_ptr, pid_m, M, E, BLOCK_M, BLOCK_E)
    is_expert = seg < E
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    expert = tl.minimum(seg, E - 1).to(tl.int64)
    acc = fp8_block_dot(
        x_ptr,
        xs_ptr,
        w_ptr + expert * stride_we,
        ws_ptr + expert * stride_wse,
        tl.minimum(rows, tl.maximum(row_end - 1, 0)),
        tl.minimum(cols, N - 1),
        (pid_n * BLOCK_N) // SCALE_BLOCK,
        tl.where(is_expert, tl.cdiv(K, BLOCK_K), 0),
        stride_xm,
        stride_xsm,
        stride_xsk,
        stride_wn,
        stride_wsn,
        stride_wsk,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        SCALE_BLOCK,
    )
    _store_tile(out_ptr, acc, rows, row_end, cols, N, stride_om, is_expert)


@triton.jit
def _masked_kernel(
    x_ptr,
    w_ptr,
    masked_m_ptr,
    out_ptr,
    MAX_M,
    N,
    K,
    stride_xe,
    stride_xm,
    stride_we,
    stride_wn,
    stride_oe,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    valid = tl.load(masked_m_ptr + e).to(tl.int32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = dot(
        x_ptr + e * stride_xe,
        w_ptr + e * stride_we,
        tl.minimum(rows, tl.maximum(valid - 1, 0)),
        tl.minimum(cols, N - 1),
        K,
        tl.where(pid_m * BLOCK_M < valid, tl.cdiv(K, BLOCK_K), 0),
        stride_xm,
        stride_wn,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        UPCAST,
        IEEE,
    )
    # Every row of the tile is stored: the valid ones with their products, the rest as zeros.
    _store_tile(out_ptr + e * stride_oe, acc, rows, MAX_M, cols, N, stride_om, (rows < valid)[:, None])


@triton.jit
def _masked_fp8_kernel(
    x_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    masked_m_ptr,
    out_ptr,
    MAX_M,
    N,
    K,
    stride_xe,
    stride_xm,
    stride_xse,
    stride_xsm,
    stride_xsk,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_oe,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    valid = tl.load(masked_m_ptr + e).to(tl.int32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = fp8_block_dot(
        x_ptr + e * stride_xe,
        xs_ptr + e * stride_xse,
        w_ptr + e * stride_we,
        ws_ptr + e * stride_wse,
        tl.minimum(rows, tl.maximum(valid - 1, 0)),
        tl.minimum(cols, N - 1),
        (pid_n * BLOCK_N) // SCALE_BLOCK,
        tl.where(pid_m * BLOCK_M < valid, tl.cdiv(K, BLOCK_K), 0),
        stride_xm,
        stride_xsm,
        stride_xsk,
        stride_wn,
        stride_wsn,
        stride_wsk,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        SCALE_BLOCK,
    )
    _store_tile(out_ptr + e * stride_oe, acc, rows, MAX_M, cols, N, stride_om, (rows < valid)[:, None])


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _half_flags(x: torch.Tensor) -> dict[str, bool]:
    """``UPCAST``: half-precision tiles go to fp32 after the load under the interpreter (its bf16
    arithmetic is wrong); ``IEEE``: fp32 inputs get full fp32 products, not TF32."""
    return {"UPCAST": _common.INTERPRETING and x.dtype != torch.float32, "IEEE": x.dtype == torch.float32}


def _launch_options(cfg: Mapping[str, int]) -> dict[str, int]:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    config: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """MoE expert GEMM, contiguous layout: the catalogue's ``grouped_gemm``.

    :param x: float32 | bfloat16 | float16 [M, K], rows grouped by expert, stride 1 along K.
    :param w: x's dtype, [E, N, K], stride 1 along K.
    :param offsets: int32 | int64 [E + 1], contiguous, on x's device (never read on the host).
    :param out_dtype: ``None`` means x's dtype.
    :param config: ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``num_warps``, ``num_stages``; ``None`` means
        :data:`DEFAULT_CONFIG`.
    :returns: [M, N], contiguous; rows at and past ``offsets[E]`` are zero.
    """
    op = "grouped_gemm"
    cfg = _common.merge_config(DEFAULT_CONFIG, config, op)
    check_blocks(op, cfg, fp8=False)
    _common.require_device(op, {"x": x, "w": w, "offsets": offsets})
    check_unit_stride(op, {"x": x, "w": w})
    check_contiguous(op, {"offsets": offsets})
    m, k = x.shape
    e, n, _ = w.shape
    out = _common.empty((m, n), out_dtype or x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(m, bm) + e, triton.cdiv(n, bn))
    _grouped_kernel[grid](
        x,
        w,
        offsets,
        out,
        m,
        n,
        k,
        e,
        x.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_E=triton.next_power_of_2(e + 1),
        **_half_flags(x),
        **_launch_options(cfg),
    )
    return out


def grouped_gemm_masked(
    x: torch.Tensor,
    w: torch.Tensor,
    masked_m: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    config: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """MoE expert GEMM, masked layout: the catalogue's ``grouped_gemm_masked``.

    :param x: float32 | bfloat16 | float16 [E, max_m, K], stride 1 along K.
    :param w: x's dtype, [E, N, K], stride 1 along K.
    :param masked_m: int32 | int64 [E], contiguous, on x's device (never read on the host).
    :param out_dtype: ``None`` means x's dtype.
    :param config: as :func:`grouped_gemm`'s.
    :returns: [E, max_m, N], contiguous; rows at and past ``masked_m[e]`` are zero.
    """
    op = "grouped_gemm_masked"
    cfg = _common.merge_config(DEFAULT_CONFIG, config, op)
    check_blocks(op, cfg, fp8=False)
    _common.require_device(op, {"x": x, "w": w, "masked_m": masked_m})
    check_unit_stride(op, {"x": x, "w": w})
    check_contiguous(op, {"masked_m": masked_m})
    e, max_m, k = x.shape
    n = w.shape[1]
    out = _common.empty((e, max_m, n), out_dtype or x.dtype, x.device)
    if out.numel() == 0:
        return out
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(max_m, bm), triton.cdiv(n, bn), e)
    _masked_kernel[grid](
        x,
        w,
        masked_m,
        out,
        max_m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=cfg["BLOCK_K"],
        **_half_flags(x),
        **_launch_options(cfg),
    )
    return out


def grouped_gemm_fp8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """FP8 block-scaled MoE expert GEMM, contiguous layout: the catalogue's ``grouped_gemm_fp8``.

    :param xq: float8_e4m3fn | float8_e4m3fnuz [M, K], rows grouped by expert, K a multiple of 128,
        stride 1 along K.
    :param xs: float32 [M, K / 128], any strides.
    :param wq: xq's fp8 dtype, [E, N, K], stride 1 along K.
    :param ws: float32 [E, ceil(N / 128), K / 128], any strides.
    :param offsets: int32 | int64 [E + 1], contiguous, on xq's device (never read on the host).
    :param out_dtype: bfloat16 (default) | float32 | float16.
    :param config: ``BLOCK_M``, ``BLOCK_N`` and ``BLOCK_K`` (both divide 128), ``num_warps``, ``num_stages``;
        ``None`` means :data:`DEFAULT_CONFIG_FP8`.
    :returns: [M, N], contiguous; rows at and past ``offsets[E]`` are zero.
    """
    op = "grouped_gemm_fp8"
    cfg = _common.merge_config(DEFAULT_CONFIG_FP8, config, op)
    check_blocks(op, cfg, fp8=True)
    _common.require_device(op, {"xq": xq, "xs": xs, "wq": wq, "ws": ws, "offsets": offsets})
    check_unit_stride(op, {"xq": xq, "wq": wq})
    check_contiguous(op, {"offsets": offsets})
    m, k = xq.shape
    e, n, _ = wq.shape
    out = _common.empty((m, n), out_dtype, xq.device)
    if m == 0 or n == 0:
        return out
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(m, bm) + e, triton.cdiv(n, bn))
    _grouped_fp8_kernel[grid](
        xq,
        xs,
        wq,
        ws,
        offsets,
        out,
        m,
        n,
        k,
        e,
        xq.stride(0),
        xs.stride(0),
        xs.stride(1),
        wq.stride(0),
        wq.stride(1),
        ws.stride(0),
        ws.stride(1),
        ws.stride(2),
        out.stride(0),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_E=triton.next_power_of_2(e + 1),
        SCALE_BLOCK=SCALE_BLOCK,
        **_launch_options(cfg),
    )
    return out


def grouped_gemm_fp8_masked(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    masked_m: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """FP8 block-scaled MoE expert GEMM, masked layout: the catalogue's ``grouped_gemm_fp8_masked``.

    :param xq: float8_e4m3fn | float8_e4m3fnuz [E, max_m, K], K a multiple of 128, stride 1 along K.
    :param xs: float32 [E, max_m, K / 128], any strides.
    :param wq: xq's fp8 dtype, [E, N, K], stride 1 along K.
    :param ws: float32 [E, ceil(N / 128), K / 128], any strides.
    :param masked_m: int32 | int64 [E], contiguous, on xq's device (never read on the host).
    :param out_dtype: bfloat16 (default) | float32 | float16.
    :param config: as :func:`grouped_gemm_fp8`'s.
    :returns: [E, max_m, N], contiguous; rows at and past ``masked_m[e]`` are zero.
    """
    op = "grouped_gemm_fp8_masked"
    cfg = _common.merge_config(DEFAULT_CONFIG_FP8, config, op)
    check_blocks(op, cfg, fp8=True)
    _common.require_device(op, {"xq": xq, "xs": xs, "wq": wq, "ws": ws, "masked_m": masked_m})
    check_unit_stride(op, {"xq": xq, "wq": wq})
    check_contiguous(op, {"masked_m": masked_m})
    e, max_m, k = xq.shape
    n = wq.shape[1]
    out = _common.empty((e, max_m, n), out_dtype, xq.device)
    if out.numel() == 0:
        return out
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(max_m, bm), triton.cdiv(n, bn), e)
    _masked_fp8_kernel[grid](
        xq,
        xs,
        wq,
        ws,
        masked_m,
        out,
        max_m,
        n,
        k,
        xq.stride(0),
        xq.stride(1),
        xs.stride(0),
        xs.stride(1),
        xs.stride(2),
        wq.stride(0),
        wq.stride(1),
        ws.stride(0),
        ws.stride(1),
        ws.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=cfg["BLOCK_K"],
        SCALE_BLOCK=SCALE_BLOCK,
        **_launch_options(cfg),
    )
    return out


OPS = {
    "grouped_gemm": grouped_gemm,
    "grouped_gemm_masked": grouped_gemm_masked,
    "grouped_gemm_fp8": grouped_gemm_fp8,
    "grouped_gemm_fp8_masked": grouped_gemm_fp8_masked,
}
REFERENCE = {op: f"hal_cpu.reference.gemm:{op}" for op in OPS}


# ---------------------------------------------------------------------------------------------------
# Compile specs
# ---------------------------------------------------------------------------------------------------


def _signature(kernel: triton.JITFunction, types: Mapping[str, str]) -> dict[str, str]:
    """Every argument of ``kernel``: pointers and constexprs from ``types``, the rest i32 (sizes, strides)."""
    return {name: types.get(name, "i32") for name in kernel.arg_names}


#: Compiled for DeepSeek-V3's 256 routed experts plus the padding segment, rounded up to a power of two.
_SPEC_BLOCK_E = triton.next_power_of_2(256 + 1)


def compile_specs(fp8: str, tuning: Mapping[str, Mapping[str, int]]) -> list[_common.CompileSpec]:
    """Each layout for bf16 activations into bf16 (the model's), and FP8 with int32 offsets into bf16."""
    specs = []
    half_blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    for op, kernel, index in (
        ("grouped_gemm", _grouped_kernel, "offsets_ptr"),
        ("grouped_gemm_masked", _masked_kernel, "masked_m_ptr"),
    ):
        cfg = _common.merge_config(DEFAULT_CONFIG, tuning.get(op), op)
        constexprs: dict[str, object] = {b: cfg[b] for b in half_blocks}
        constexprs.update(UPCAST=False, IEEE=False)
        if kernel is _grouped_kernel:
            constexprs["BLOCK_E"] = _SPEC_BLOCK_E
        types = {"x_ptr": "*bf16", "w_ptr": "*bf16", index: "*i32", "out_ptr": "*bf16"}
        types.update(dict.fromkeys(constexprs, "constexpr"))
        specs.append(
            _common.CompileSpec(
                name=f"{op}[bf16]",
                kernel=kernel,
                signature=_signature(kernel, types),
                constexprs=constexprs,
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
                divisible_by_16=tuple(a for a in DIVISIBLE_BY_16 if a in kernel.arg_names),
            )
        )
    for op, kernel, index in (
        ("grouped_gemm_fp8", _grouped_fp8_kernel, "offsets_ptr"),
        ("grouped_gemm_fp8_masked", _masked_fp8_kernel, "masked_m_ptr"),
    ):
        cfg = _common.merge_config(DEFAULT_CONFIG_FP8, tuning.get(op), op)
        constexprs = {b: cfg[b] for b in half_blocks}
        constexprs["SCALE_BLOCK"] = SCALE_BLOCK
        if kernel is _grouped_fp8_kernel:
            constexprs["BLOCK_E"] = _SPEC_BLOCK_E
        types = {
            "x_ptr": fp8,
            "xs_ptr": "*fp32",
            "w_ptr": fp8,
            "ws_ptr": "*fp32",
            index: "*i32",
            "out_ptr": "*bf16",
        }
        types.update(dict.fromkeys(constexprs, "constexpr"))
        specs.append(
            _common.CompileSpec(
                name=f"{op}[bf16 out]",
                kernel=kernel,
                signature=_signature(kernel, types),
                constexprs=constexprs,
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
                divisible_by_16=tuple(a for a in DIVISIBLE_BY_16 if a in kernel.arg_names),
            )
        )
    return specs
