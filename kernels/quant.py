"""Per-token-group FP8 quantization (DeepSeek-V3's 1×128 activation scaling) as a Triton kernel.

One program quantizes a ``[BLOCK_M, group_size]`` tile: it loads the rows' group, takes each row's
amax in fp32, and writes the scale ``max(amax, 1e-4) / fp8_max`` and the values ``x / scale``
(clamped to ``±fp8_max``) cast to fp8, exactly as the reference (:func:`hal_cpu.reference.gemm.quantize_fp8`)
does: both divisions are correctly rounded (``div_rn``; a plain ``/`` is an approximate division on
NVIDIA), so a GPU run matches the reference bit for bit.

Under ``TRITON_INTERPRET=1`` the fp32 → fp8 cast rounds wrongly: when rounding carries into the
exponent (the value comes out halved: triton issue 8322), on exact ties (away from zero, not to even)
and in the subnormal range (up to one subnormal step off); the tests admit exactly these.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from hal.errors import OpInputError
from hal.quant import AMAX_FLOOR, fp8_max
from hal_kernels import _common

__all__ = ["DEFAULTS", "DEFAULT_CONFIG", "OPS", "REFERENCE", "compile_specs", "quantize_fp8"]

#: ``num_warps`` and ``num_stages`` are launch options; ``BLOCK_M`` rows share one program.
DEFAULT_CONFIG: dict[str, int] = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1}
#: op → its default config (what a tuning file's keys are checked against).
DEFAULTS: Mapping[str, Mapping[str, int]] = {"quantize_fp8": DEFAULT_CONFIG}


@triton.jit
def _quantize_fp8_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    stride_sg,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FP8_MAX: tl.constexpr,
    AMAX_FLOOR: tl.constexpr,
    FNUZ: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_group = tl.arange(0, BLOCK_G)
    cols = g * GROUP + in_group
    row_ok = rows < M
    mask = row_ok[:, None] & ((in_group < GROUP) & (cols < K))[None, :]
    rows64 = rows.to(tl.int64)
    # Upcast right after the load: half-precision arithmetic is never needed (and bf16 arithmetic is
    # wrong under the interpreter). Masked lanes load 0, which never raises a group's amax.
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), FP8_MAX)
    q = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], (BLOCK_M, BLOCK_G)))
    # Saturate before the cast, as the reference does: past the top of the range e4m3fnuz gives NaN.
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    if FNUZ:
        # e4m3fnuz has no -0: its bit pattern is the format's NaN. Below the smallest subnormal (2^-10)
        # round here, to nearest with ties to even as the cast would: up to half of it (2^-11) to +0,
        # the rest to +-2^-10, so no conversion (not even one that truncates, as the interpreter's
        # does) is ever asked for a value that could come out as -0.
        small = tl.abs(q) < 0.0009765625
        nearest = tl.where(tl.abs(q) > 0.00048828125, tl.where(q > 0, 0.0009765625, -0.0009765625), 0.0)
        q = tl.where(small, nearest, q)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows64 * stride_sm + g * stride_sg, scale, mask=row_ok)


def _launch(cfg: Mapping[str, int], x_dtype: torch.dtype, fp8_dtype: torch.dtype, group_size: int) -> _common.Launch:
    """The kernel launch for these dtypes and group size (the launcher's, and the compile specs')."""
    return _common.Launch(
        _quantize_fp8_kernel,
        pointers={"x_ptr": _common.ptr(x_dtype), "q_ptr": _common.ptr(fp8_dtype), "s_ptr": "*fp32"},
        constexprs={
            "GROUP": group_size,
            "BLOCK_G": triton.next_power_of_2(group_size),
            "BLOCK_M": cfg["BLOCK_M"],
            "FP8_MAX": fp8_max(fp8_dtype),
            "AMAX_FLOOR": AMAX_FLOOR,
            "FNUZ": fp8_dtype == torch.float8_e4m3fnuz,
        },
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def quantize_fp8(
    x: torch.Tensor,
    *,
    group_size: int = 128,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    config: Mapping[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantization: the catalogue's ``quantize_fp8``.

    :param x: float32 | bfloat16 | float16 [M, K], stride 1 along K (any row stride).
    :param group_size: values per scale group (128 for DeepSeek-V3); the last group may be shorter.
    :param fp8_dtype: float8_e4m3fn (max 448) or float8_e4m3fnuz (max 240).
    :param config: ``BLOCK_M``, ``num_warps``, ``num_stages``; ``None`` means :data:`DEFAULT_CONFIG`.
    :returns: ``(xq, scales)``: xq ``fp8_dtype [M, K]``, scales ``float32 [M, ceil(K / group_size)]``,
        both contiguous.
    """
    op = "quantize_fp8"
    cfg = _common.merge_config(DEFAULT_CONFIG, config, op)
    _common.require_device(op, {"x": x})
    if x.dim() == 2 and x.shape[1] > 1 and x.stride(1) != 1:
        raise OpInputError(op, "x", f"must have stride 1 along K, got strides {x.stride()}; pass x.contiguous()")
    block_m = cfg["BLOCK_M"]
    if block_m < 1 or block_m & (block_m - 1):
        raise OpInputError(op, "config", f"BLOCK_M must be a power of two, got {block_m}")
    m, k = x.shape
    groups = -(-k // group_size)
    xq = _common.empty((m, k), fp8_dtype, x.device)
    scales = _common.empty((m, groups), torch.float32, x.device)
    if m == 0 or k == 0:
        return xq, scales
    grid = (triton.cdiv(m, block_m), groups)
    _launch(cfg, x.dtype, fp8_dtype, group_size)(
        grid, x, xq, scales, m, k, x.stride(0), xq.stride(0), scales.stride(0), scales.stride(1)
    )
    return xq, scales


OPS = {"quantize_fp8": quantize_fp8}
REFERENCE = {"quantize_fp8": "hal_cpu.reference.gemm:quantize_fp8"}


#: Pointers, and the row strides and K of real shapes (the scales' row stride, K / 128, usually is not).
_DIVISIBLE = ("x_ptr", "q_ptr", "s_ptr", "K", "stride_xm", "stride_qm")


def compile_specs(fp8: str, tuning: Mapping[str, Mapping[str, int]]) -> list[_common.CompileSpec]:
    """The quantization kernel for bf16, fp16 and fp32 activations, 1×128 groups, into ``fp8``'s format."""
    cfg = _common.merge_config(DEFAULT_CONFIG, tuning.get("quantize_fp8"), "quantize_fp8")
    return [
        _launch(cfg, x_dtype, _common.fp8_dtype(fp8), 128).spec(
            f"quantize_fp8[{_common.ptr(x_dtype)[1:]} in]", _DIVISIBLE
        )
        for x_dtype in (torch.bfloat16, torch.float16, torch.float32)
    ]
