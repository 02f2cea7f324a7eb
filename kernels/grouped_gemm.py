"""Grouped MoE expert GEMMs in DeepGEMM's two layouts, half precision and block-scaled FP8.

**Contiguous** (``grouped_gemm``, ``grouped_gemm_fp8``): token rows sorted by expert, expert ``e``
owning rows ``offsets[e]:offsets[e + 1]``, rows at and past ``offsets[E]`` padding (written as zeros).
The row range is cut into *segments*, one per expert plus the padding, and each segment into M tiles
that never cross its end, so no tile mixes experts and none computes rows it does not own. The launch
grid is ``(cdiv(M, BLOCK_M) + E, N tiles)``, an upper bound on the tile count that the host knows
without reading ``offsets``; each program finds its segment on the device with one vector load of
``offsets``, a prefix sum of the segments' tile counts and a comparison, and programs past the last
tile do nothing. Nothing is synchronized with the host, so the launch can be captured in a graph.
Offsets are clamped to ``[0, M]`` on the device: bad offsets give wrong rows, never an access outside
``x`` or ``out``.

**Masked** (``grouped_gemm_masked``, ``grouped_gemm_fp8_masked``): ``x [E, max_m, K]`` with
``masked_m[e]`` valid rows; the grid is ``(cdiv(max_m, BLOCK_M), N tiles, E)`` and a tile past
``masked_m[e]`` runs no K step and writes zeros (rows past ``masked_m[e]`` may hold garbage, even NaN:
they are never read into a stored row). ``masked_m[e]`` is clamped to ``[0, max_m]`` on the device, so a
count past the slab never reads the next expert's rows.

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
    check_fp8_operands,
    check_unit_stride,
    dot,
    fp8_block_dot,
)

__all__ = [
    "DEFAULTS",
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
#: op → its default config (what a tuning file's keys are checked against).
DEFAULTS: Mapping[str, Mapping[str, int]] = {
    "grouped_gemm": DEFAULT_CONFIG,
    "grouped_gemm_masked": DEFAULT_CONFIG,
    "grouped_gemm_fp8": DEFAULT_CONFIG_FP8,
    "grouped_gemm_fp8_masked": DEFAULT_CONFIG_FP8,
}


# ---------------------------------------------------------------------------------------------------
# Device-side tile → segment lookup (contiguous layout)
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _find_segment(offsets_ptr, pid_m, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """``(segment, first row, end row)`` of the ``pid_m``-th M tile: segments ``0..E-1`` are experts,
    ``E`` the padding rows ``offsets[E]:M``; past the last tile the segment is ``> E`` and the range empty."""
    seg_ids = tl.arange(0, BLOCK_E)
    # Segment E (padding) ends at M; lanes past it are empty segments at M.
    starts = tl.load(offsets_ptr + seg_ids, mask=seg_ids <= E, other=M)
    ends = tl.load(offsets_ptr + seg_ids + 1, mask=seg_ids < E, other=M)
    # Offsets are trusted no further than the rows there are: clamped to [0, M], each end to at least
    # its start, so that bad offsets can give wrong rows but never a read or write outside x and out.
    starts = tl.minimum(tl.maximum(starts, 0), M).to(tl.int32)
    ends = tl.minimum(tl.maximum(ends, starts), M).to(tl.int32)
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
    # masked_m is trusted no further than the slab: rows past MAX_M belong to the next expert.
    valid = tl.minimum(tl.maximum(tl.load(masked_m_ptr + e), 0), MAX_M).to(tl.int32)
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
    # masked_m is trusted no further than the slab: rows past MAX_M belong to the next expert.
    valid = tl.minimum(tl.maximum(tl.load(masked_m_ptr + e), 0), MAX_M).to(tl.int32)
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


#: The activation dtypes of the half-precision layouts, and the index dtypes of offsets / masked_m.
HALF_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _launch(
    op: str,
    cfg: Mapping[str, int],
    x_dtype: torch.dtype,
    out_dtype: torch.dtype,
    index_dtype: torch.dtype,
    num_experts: int,
) -> _common.Launch:
    """The kernel launch of ``op`` for these dtypes (the launcher's, and the compile specs').

    Half precision: ``UPCAST`` converts the tiles to fp32 after the load under the interpreter (its bf16
    arithmetic is wrong), ``IEEE`` asks for full fp32 products for fp32 inputs (not TF32), and fp32
    inputs step through half as much K (``BLOCK_K // 2``, at least 16): twice the bytes per element in
    the same shared memory as the tuned half-precision tiles (the H100 tuning's 128x256x64 tiles, 4
    stages, would need 288 KiB in fp32; the GPU has 227). The contiguous layouts size their segment
    vector ``BLOCK_E`` for ``num_experts`` plus the padding segment.
    """
    fp8 = "fp8" in op
    masked = op.endswith("_masked")
    kernel = {
        "grouped_gemm": _grouped_kernel,
        "grouped_gemm_masked": _masked_kernel,
        "grouped_gemm_fp8": _grouped_fp8_kernel,
        "grouped_gemm_fp8_masked": _masked_fp8_kernel,
    }[op]
    x = _common.ptr(x_dtype)
    pointers = {"x_ptr": x, "w_ptr": x, "out_ptr": _common.ptr(out_dtype)}
    pointers["masked_m_ptr" if masked else "offsets_ptr"] = _common.ptr(index_dtype)
    constexprs: dict[str, object] = {b: cfg[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    if x_dtype.itemsize == 4:
        constexprs["BLOCK_K"] = max(16, cfg["BLOCK_K"] // 2)
    if fp8:
        pointers |= {"xs_ptr": "*fp32", "ws_ptr": "*fp32"}
        constexprs["SCALE_BLOCK"] = SCALE_BLOCK
    else:
        constexprs |= {"UPCAST": _common.INTERPRETING and x_dtype != torch.float32, "IEEE": x_dtype == torch.float32}
    if not masked:
        constexprs["BLOCK_E"] = triton.next_power_of_2(num_experts + 1)
    return _common.Launch(kernel, pointers, constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


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
    :param offsets: int32 | int64 [E + 1], contiguous, on x's device (never read on the host); values
        outside ``[0, M]`` are clamped to it.
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
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) + e, triton.cdiv(n, cfg["BLOCK_N"]))
    _launch(op, cfg, x.dtype, out.dtype, offsets.dtype, e)(
        grid, x, w, offsets, out, m, n, k, e, x.stride(0), w.stride(0), w.stride(1), out.stride(0)
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
    :param masked_m: int32 | int64 [E], contiguous, on x's device (never read on the host); values
        outside ``[0, max_m]`` are clamped to it.
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
    grid = (triton.cdiv(max_m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), e)
    _launch(op, cfg, x.dtype, out.dtype, masked_m.dtype, e)(
        grid, x, w, masked_m, out, max_m, n, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
    )  # fmt: skip
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
    :param offsets: int32 | int64 [E + 1], contiguous, on xq's device (never read on the host); values
        outside ``[0, M]`` are clamped to it.
    :param out_dtype: bfloat16 (default) | float32 | float16.
    :param config: ``BLOCK_M``, ``BLOCK_N`` and ``BLOCK_K`` (both divide 128), ``num_warps``, ``num_stages``;
        ``None`` means :data:`DEFAULT_CONFIG_FP8`.
    :returns: [M, N], contiguous; rows at and past ``offsets[E]`` are zero.
    :raises OpInputError: (or a subclass) naming the argument: see :func:`hal_kernels.gemm.check_fp8_operands`.
    """
    op = "grouped_gemm_fp8"
    cfg = _common.merge_config(DEFAULT_CONFIG_FP8, config, op)
    check_blocks(op, cfg, fp8=True)
    _common.require_device(op, {"xq": xq, "xs": xs, "wq": wq, "ws": ws, "offsets": offsets})
    check_unit_stride(op, {"xq": xq, "wq": wq})
    check_contiguous(op, {"offsets": offsets})
    check_fp8_operands(op, xq, xs, wq, ws, out_dtype, w_dims="[E, N, K]")
    m, k = xq.shape
    e, n, _ = wq.shape
    out = _common.empty((m, n), out_dtype, xq.device)
    if m == 0 or n == 0:
        return out
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) + e, triton.cdiv(n, cfg["BLOCK_N"]))
    _launch(op, cfg, xq.dtype, out_dtype, offsets.dtype, e)(
        grid, xq, xs, wq, ws, offsets, out, m, n, k, e,
        xq.stride(0), xs.stride(0), xs.stride(1), wq.stride(0), wq.stride(1),
        ws.stride(0), ws.stride(1), ws.stride(2), out.stride(0),
    )  # fmt: skip
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
    :param masked_m: int32 | int64 [E], contiguous, on xq's device (never read on the host); values
        outside ``[0, max_m]`` are clamped to it.
    :param out_dtype: bfloat16 (default) | float32 | float16.
    :param config: as :func:`grouped_gemm_fp8`'s.
    :returns: [E, max_m, N], contiguous; rows at and past ``masked_m[e]`` are zero.
    :raises OpInputError: (or a subclass) naming the argument: see :func:`hal_kernels.gemm.check_fp8_operands`.
    """
    op = "grouped_gemm_fp8_masked"
    cfg = _common.merge_config(DEFAULT_CONFIG_FP8, config, op)
    check_blocks(op, cfg, fp8=True)
    _common.require_device(op, {"xq": xq, "xs": xs, "wq": wq, "ws": ws, "masked_m": masked_m})
    check_unit_stride(op, {"xq": xq, "wq": wq})
    check_contiguous(op, {"masked_m": masked_m})
    check_fp8_operands(op, xq, xs, wq, ws, out_dtype, x_dims="[E, max_m, K]", w_dims="[E, N, K]")
    e, max_m, k = xq.shape
    n = wq.shape[1]
    out = _common.empty((e, max_m, n), out_dtype, xq.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(max_m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), e)
    _launch(op, cfg, xq.dtype, out_dtype, masked_m.dtype, e)(
        grid, xq, xs, wq, ws, masked_m, out, max_m, n, k,
        xq.stride(0), xq.stride(1), xs.stride(0), xs.stride(1), xs.stride(2),
        wq.stride(0), wq.stride(1), ws.stride(0), ws.stride(1), ws.stride(2), out.stride(0), out.stride(1),
    )  # fmt: skip
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


#: Compiled for DeepSeek-V3's 256 routed experts (plus the padding segment in the contiguous layouts).
_SPEC_EXPERTS = 256


def compile_specs(fp8: str, tuning: Mapping[str, Mapping[str, int]]) -> list[_common.CompileSpec]:
    """Each op as the model launches it: int64 offsets / masked_m (``moe_permute``'s offsets, the absorbed
    decode's row counts), bf16 activations (FP8: ``fp8``'s format into bf16); and the variants the
    launchers take besides: int32 indices, fp16 in and out, and fp32 for the half-precision layouts."""
    specs = []
    for op, defaults, index in (
        ("grouped_gemm", DEFAULT_CONFIG, "offsets"),
        ("grouped_gemm_masked", DEFAULT_CONFIG, "masked_m"),
        ("grouped_gemm_fp8", DEFAULT_CONFIG_FP8, "offsets"),
        ("grouped_gemm_fp8_masked", DEFAULT_CONFIG_FP8, "masked_m"),
    ):
        cfg = _common.merge_config(defaults, tuning.get(op), op)
        fp8_op = "fp8" in op
        x16 = _common.fp8_dtype(fp8) if fp8_op else torch.float16
        xbf = _common.fp8_dtype(fp8) if fp8_op else torch.bfloat16
        variants = [  # (x dtype, out dtype, index dtype)
            (xbf, torch.bfloat16, torch.int64),
            (xbf, torch.bfloat16, torch.int32),
            (x16, torch.float16, torch.int64),
        ]
        if not fp8_op:  # fp32 (the CPU oracle's dtype, tiny models): its own BLOCK_K, its own shared memory
            variants.append((torch.float32, torch.float32, torch.int64))
        for x_dtype, out_dtype, index_dtype in variants:
            x_name = "" if fp8_op else f"{_common.ptr(x_dtype)[1:]}, "
            name = f"{op}[{x_name}{_common.ptr(out_dtype)[1:]} out, {_common.ptr(index_dtype)[1:]} {index}]"
            launch = _launch(op, cfg, x_dtype, out_dtype, index_dtype, _SPEC_EXPERTS)
            specs.append(launch.spec(name, DIVISIBLE_BY_16))
    return specs
