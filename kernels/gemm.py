"""Block-scaled FP8 GEMM with DeepSeek-V3 scaling (1×128 activation groups, 128×128 weight blocks).

``out = (xq·xs) @ (wq·ws).T``: each program computes one ``[BLOCK_M, BLOCK_N]`` output tile. Its K
loop takes ``BLOCK_K`` (a divisor of 128) columns at a time, multiplies the fp8 tiles on the tensor
cores into a fresh fp32 partial, and adds the partial times the row's activation scale and the
column's weight-block scale into an fp32 accumulator (DeepGEMM's promotion per 128-deep scale block),
so the scales never pass through fp8. Programs are ordered in ``GROUP_M`` bands of M tiles so that
neighbours share weight tiles in L2.

The K loop (:func:`fp8_block_dot`) and the half-precision one (:func:`dot`) are shared with the
grouped MoE GEMMs (:mod:`hal_kernels.grouped_gemm`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from hal.errors import DTypeError, LayoutError, OpInputError, ShapeError
from hal_kernels import _common

__all__ = [
    "DEFAULTS",
    "DEFAULT_CONFIG",
    "DIVISIBLE_BY_16",
    "OPS",
    "REFERENCE",
    "SCALE_BLOCK",
    "check_blocks",
    "check_contiguous",
    "check_fp8_operands",
    "check_unit_stride",
    "compile_specs",
    "dot",
    "fp8_block_dot",
    "gemm_fp8",
]

#: Sensible on H100 (sm_90: two warpgroups of wgmma over a 128×128 tile, 4 × 32 KiB of fp8 stages).
DEFAULT_CONFIG: dict[str, int] = {
    "BLOCK_M": 128,
    "BLOCK_N": 128,
    "BLOCK_K": 128,
    "GROUP_M": 8,
    "num_warps": 8,
    "num_stages": 4,
}

#: op → its default config (what a tuning file's keys are checked against).
DEFAULTS: Mapping[str, Mapping[str, int]] = {"gemm_fp8": DEFAULT_CONFIG}

#: The scale block edge of DeepSeek-V3 (``hal.ops.catalogue.BLOCK``).
SCALE_BLOCK = 128

#: What Triton's JIT sees as multiples of 16 at a real launch, for the compile specs: pointers, and K,
#: the operands' and output's row strides (K and N of real shapes); not M, N or the scales' strides
#: (K / 128 is rarely a multiple of 16, and a row-major scale tensor's inner stride is 1).
DIVISIBLE_BY_16 = (
    "x_ptr",
    "xs_ptr",
    "w_ptr",
    "ws_ptr",
    "out_ptr",
    "offsets_ptr",
    "masked_m_ptr",
    "K",
    "stride_xe",
    "stride_xm",
    "stride_we",
    "stride_wn",
    "stride_oe",
    "stride_om",
)

#: The output dtypes the FP8 GEMMs write.
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: The fp8 formats they read.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


# ---------------------------------------------------------------------------------------------------
# Shared K loops
# ---------------------------------------------------------------------------------------------------


@triton.jit
def fp8_block_dot(
    x_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    rows,
    cols,
    n_block,
    num_k,
    stride_xm,
    stride_xsm,
    stride_xsk,
    stride_wn,
    stride_wsn,
    stride_wsk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
):
    """fp32 ``[BLOCK_M, BLOCK_N]`` of ``(x·xs)[rows] @ (w·ws)[cols].T`` over ``num_k`` K steps.

    ``rows`` and ``cols`` must be in bounds (callers clamp them and mask the store instead: an output
    row depends on its own input row only, so a clamped duplicate is computed and never stored).
    ``x`` and ``w`` have stride 1 along K; ``xs[m, k // 128]`` and ``ws[n_block, k // 128]`` are
    addressed through their strides: ``BLOCK_N`` divides 128, so the tile's columns share one weight
    block row ``n_block`` and its weight scale is one scalar per K step.
    """
    offs_k = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    a_ptrs = x_ptr + rows64[:, None] * stride_xm + offs_k[None, :]
    b_ptrs = w_ptr + cols64[None, :] * stride_wn + offs_k[:, None]
    xs_ptrs = xs_ptr + rows64 * stride_xsm
    ws_ptrs = ws_ptr + n_block.to(tl.int64) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, num_k):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        kb = (k * BLOCK_K) // SCALE_BLOCK
        a_s = tl.load(xs_ptrs + kb * stride_xsk)
        b_s = tl.load(ws_ptrs + kb * stride_wsk)
        acc += tl.dot(a, b) * (a_s[:, None] * b_s)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def dot(
    x_ptr,
    w_ptr,
    rows,
    cols,
    K,
    num_k,
    stride_xm,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """fp32 ``[BLOCK_M, BLOCK_N]`` of ``x[rows] @ w[cols].T`` over ``num_k`` K steps, K masked.

    ``rows`` and ``cols`` as in :func:`fp8_block_dot`. ``UPCAST`` converts half-precision tiles to
    fp32 after the load (the interpreter's bf16 arithmetic is wrong); ``IEEE`` asks for full fp32
    products for fp32 inputs (the default would be TF32 on NVIDIA).
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    b_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, num_k):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


# ---------------------------------------------------------------------------------------------------
# gemm_fp8
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _gemm_fp8_kernel(
    x_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xsm,
    stride_xsk,
    stride_wn,
    stride_wsn,
    stride_wsk,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Bands of GROUP_M tile rows, walked column by column: programs running together share w tiles.
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    band_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_m
    pid_n = (pid % band) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = fp8_block_dot(
        x_ptr,
        xs_ptr,
        w_ptr,
        ws_ptr,
        tl.minimum(offs_m, M - 1),
        tl.minimum(offs_n, N - 1),
        (pid_n * BLOCK_N) // SCALE_BLOCK,
        tl.cdiv(K, BLOCK_K),
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
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launcher checks, shared with grouped_gemm
# ---------------------------------------------------------------------------------------------------


def check_unit_stride(op: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """The kernels step along the last dim by pointer increments: it must have stride 1."""
    for name, t in tensors.items():
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise OpInputError(
                op, name, f"must have stride 1 in its last dim, got strides {t.stride()}; pass {name}.contiguous()"
            )


def check_contiguous(op: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Index tensors (offsets, masked_m) are read as plain arrays."""
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise OpInputError(op, name, f"must be contiguous, got strides {t.stride()}; pass {name}.contiguous()")


def check_blocks(op: str, cfg: Mapping[str, int], fp8: bool) -> None:
    """Block sizes are powers of two, at least 16 (``tl.dot``'s minimum); FP8 N and K blocks divide 128."""
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        b = cfg[key]
        if b < 16 or b & (b - 1):
            raise OpInputError(op, "config", f"{key} must be a power of two >= 16, got {b}")
    for key in ("BLOCK_N", "BLOCK_K") if fp8 else ():
        if SCALE_BLOCK % cfg[key]:
            raise OpInputError(op, "config", f"{key} must divide the scale block {SCALE_BLOCK} for FP8, got {cfg[key]}")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_fp8_operands(
    op: str,
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    x_dims: str = "[M, K]",
    w_dims: str = "[N, K]",
) -> None:
    """What the FP8 kernels assume of their operands, checked from attributes only (no device read).

    ``xq`` (laid out as ``x_dims``) and ``wq`` (``w_dims``: ``[N, K]``, or ``[E, N, K]`` for the expert
    GEMMs) of one fp8 format, K a multiple of :data:`SCALE_BLOCK`; float32 scales ``xs [..., K / 128]``
    matching xq's leading dims and ``ws [..., ceil(N / 128), K / 128]`` matching wq's. A K that is not
    a multiple of 128 makes the K loop read past the rows and the scales, and a scale tensor of another
    shape is read out of bounds: both are errors here, naming the argument.

    :raises DTypeError, ShapeError, LayoutError: (all :class:`~hal.errors.OpInputError`) naming the argument.
    """
    for name, t, dims in (("xq", xq, x_dims), ("wq", wq, w_dims)):
        if t.dim() != dims.count(",") + 1:
            raise ShapeError(op, name, f"expected {dims}, got shape {_shape(t)}")
    if xq.dtype not in FP8_DTYPES:
        raise DTypeError(op, "xq", f"expected float8_e4m3fn | float8_e4m3fnuz, got {xq.dtype}")
    if wq.dtype != xq.dtype:
        raise DTypeError(op, "wq", f"expected xq's fp8 dtype {xq.dtype}, got {wq.dtype}")
    for name, t in (("xs", xs), ("ws", ws)):
        if t.dtype != torch.float32:
            raise DTypeError(op, name, f"expected float32 scales, got {t.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise DTypeError(op, "out_dtype", f"expected bfloat16 | float16 | float32, got {out_dtype}")
    k = xq.shape[-1]
    if k % SCALE_BLOCK:
        raise LayoutError(op, "xq", f"K = {k} must be a multiple of {SCALE_BLOCK} (the scale block)")
    if wq.shape[-1] != k:
        raise ShapeError(op, "wq", f"K = {wq.shape[-1]} differs from xq's K = {k}")
    groups = k // SCALE_BLOCK
    want_xs = [*xq.shape[:-1], groups]
    if _shape(xs) != want_xs:
        raise ShapeError(op, "xs", f"expected {want_xs} (xq's rows x K / {SCALE_BLOCK}), got {_shape(xs)}")
    n = wq.shape[-2]
    want_ws = [*wq.shape[:-2], -(-n // SCALE_BLOCK), groups]
    if _shape(ws) != want_ws:
        raise ShapeError(
            op, "ws", f"expected {want_ws} (ceil(N / {SCALE_BLOCK}) x K / {SCALE_BLOCK} per weight), got {_shape(ws)}"
        )


def _launch(cfg: Mapping[str, int], fp8_dtype: torch.dtype, out_dtype: torch.dtype) -> _common.Launch:
    """The kernel launch for these dtypes (the launcher's, and the compile specs')."""
    fp8 = _common.ptr(fp8_dtype)
    return _common.Launch(
        _gemm_fp8_kernel,
        pointers={"x_ptr": fp8, "xs_ptr": "*fp32", "w_ptr": fp8, "ws_ptr": "*fp32", "out_ptr": _common.ptr(out_dtype)},
        constexprs={
            "BLOCK_M": cfg["BLOCK_M"],
            "BLOCK_N": cfg["BLOCK_N"],
            "BLOCK_K": cfg["BLOCK_K"],
            "GROUP_M": cfg["GROUP_M"],
            "SCALE_BLOCK": SCALE_BLOCK,
        },
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def gemm_fp8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """Block-scaled FP8 matmul: the catalogue's ``gemm_fp8``.

    :param xq: float8_e4m3fn | float8_e4m3fnuz [M, K], K a multiple of 128, stride 1 along K.
    :param xs: float32 [M, K / 128], any strides (row-major or DeepGEMM's column-major).
    :param wq: xq's fp8 dtype, [N, K], stride 1 along K; N need not be a multiple of 128.
    :param ws: float32 [ceil(N / 128), K / 128], any strides.
    :param out_dtype: bfloat16 (default) | float32 | float16.
    :param config: ``BLOCK_M``, ``BLOCK_N`` and ``BLOCK_K`` (both divide 128), ``GROUP_M``, ``num_warps``,
        ``num_stages``; ``None`` means :data:`DEFAULT_CONFIG`.
    :returns: [M, N] of ``out_dtype``, contiguous.
    """
    op = "gemm_fp8"
    cfg = _common.merge_config(DEFAULT_CONFIG, config, op)
    check_blocks(op, cfg, fp8=True)
    _common.require_device(op, {"xq": xq, "xs": xs, "wq": wq, "ws": ws})
    check_unit_stride(op, {"xq": xq, "wq": wq})
    check_fp8_operands(op, xq, xs, wq, ws, out_dtype)
    m, k = xq.shape
    n = wq.shape[0]
    out = _common.empty((m, n), out_dtype, xq.device)
    if m == 0 or n == 0:
        return out
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _launch(cfg, xq.dtype, out_dtype)(
        grid,
        xq,
        xs,
        wq,
        ws,
        out,
        m,
        n,
        k,
        xq.stride(0),
        xs.stride(0),
        xs.stride(1),
        wq.stride(0),
        ws.stride(0),
        ws.stride(1),
        out.stride(0),
    )
    return out


OPS = {"gemm_fp8": gemm_fp8}
REFERENCE = {"gemm_fp8": "hal_cpu.reference.gemm:gemm_fp8"}


def compile_specs(fp8: str, tuning: Mapping[str, Mapping[str, int]]) -> list[_common.CompileSpec]:
    """``gemm_fp8`` from ``fp8``'s format into each output dtype (bf16 is the model's)."""
    cfg = _common.merge_config(DEFAULT_CONFIG, tuning.get("gemm_fp8"), "gemm_fp8")
    return [
        _launch(cfg, _common.fp8_dtype(fp8), out_dtype).spec(
            f"gemm_fp8[{_common.ptr(out_dtype)[1:]} out]", DIVISIBLE_BY_16
        )
        for out_dtype in OUT_DTYPES
    ]
