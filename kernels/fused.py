"""Fused small ops in Triton: ``rms_norm``, ``rotary`` (DeepSeek's interleaved layout, or NeoX's), and
``silu_and_mul``. Each is one kernel, loads its inputs once, computes in fp32 and stores x's dtype.

- ``rms_norm``: ``BLOCK_M`` whole rows per program (the row, padded to a power of two, lives in
  registers: fine up to DeepSeek-V3's hidden size 7168).
- ``rotary``: one token and ``BLOCK_H`` heads per program; the token's cos/sin row is read once and
  shared by its heads. x may be a strided view (e.g. the rope slice of q) as long as its last dim is
  unit-stride and its middle dims flatten to one stride.
- ``silu_and_mul``: ``BLOCK_M`` rows x ``BLOCK_N`` columns of the output per program.

Contracts: :func:`hal.ops.catalogue.rms_norm`, :func:`~hal.ops.catalogue.rotary`,
:func:`~hal.ops.catalogue.silu_and_mul`; oracles in ``hal_cpu.reference.small``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from hal_kernels import _common
from hal_kernels._common import CompileSpec

__all__ = ["DEFAULTS", "OPS", "REFERENCE", "compile_specs", "rms_norm", "rotary", "silu_and_mul"]

#: default launch configs per op (a backend's tuning file overrides any subset of the keys).
DEFAULTS: Mapping[str, Mapping[str, int]] = {
    # num_warps 0: chosen from the row length (4 up to 2048 values, 8 up to 4096, then 16), so a
    # 7168-wide row does not spill to local memory.
    "rms_norm": {"BLOCK_M": 1, "num_warps": 0, "num_stages": 1},
    "rotary": {"BLOCK_H": 16, "num_warps": 4, "num_stages": 1},
    "silu_and_mul": {"BLOCK_M": 4, "BLOCK_N": 512, "num_warps": 4, "num_stages": 1},
}


# ===================================================================================================
# Kernels
# ===================================================================================================


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    D,
    stride_x,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    m = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) / D
    normed = x * tl.rsqrt(mean_sq + eps)[:, None]
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = normed * w[None, :]
    tl.store(out_ptr + rows64[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rotary_kernel(
    x_ptr,
    pos_ptr,
    cs_ptr,
    out_ptr,
    n_heads,
    half,
    stride_xt,
    stride_xh,
    stride_cs,
    INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < half
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cos = tl.load(cs_ptr + pos * stride_cs + i, mask=i_ok, other=0.0)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + half + i, mask=i_ok, other=0.0)[None, :]
    if INTERLEAVED:
        first = 2 * i  # pairs (x[2i], x[2i+1])
        second = 2 * i + 1
    else:
        first = i  # pairs (x[i], x[i + D/2])
        second = i + half
    m = (heads < n_heads)[:, None] & i_ok[None, :]
    src = x_ptr + tok * stride_xt + heads.to(tl.int64)[:, None] * stride_xh
    x1 = tl.load(src + first[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + second[None, :], mask=m, other=0.0).to(tl.float32)
    r1 = x1 * cos - x2 * sin
    r2 = x1 * sin + x2 * cos
    dst = out_ptr + (tok * n_heads + heads.to(tl.int64))[:, None] * (2 * half)
    tl.store(dst + first[None, :], r1.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(dst + second[None, :], r2.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    M,
    N,
    stride_x,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < M)[:, None] & (cols < N)[None, :]
    src = x_ptr + rows[:, None] * stride_x + cols[None, :]
    gate = tl.load(src, mask=m, other=0.0).to(tl.float32)
    up = tl.load(src + N, mask=m, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)


# ===================================================================================================
# Launchers
# ===================================================================================================


def _row_warps(block: int, num_warps: int) -> int:
    """``num_warps``, or for 0 enough warps that a row of ``block`` values stays in registers."""
    if num_warps:
        return num_warps
    return 4 if block <= 2048 else 8 if block <= 4096 else 16


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with a unit-stride last dim: a view when one exists, else a copy."""
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _rms_norm_launch(cfg: Mapping[str, int], x_dtype: torch.dtype, w_dtype: torch.dtype, d: int) -> _common.Launch:
    """``rms_norm``'s launch for rows of ``d`` values (the launcher's, and the compile specs')."""
    block_d = triton.next_power_of_2(d)
    x = _common.ptr(x_dtype)
    return _common.Launch(
        _rms_norm_kernel,
        pointers={"x_ptr": x, "w_ptr": _common.ptr(w_dtype), "out_ptr": x},
        constexprs={"BLOCK_M": cfg["BLOCK_M"], "BLOCK_D": block_d},
        num_warps=_row_warps(cfg["BLOCK_M"] * block_d, cfg["num_warps"]),
        num_stages=cfg["num_stages"],
        scalars={"eps": "fp32"},
    )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = 1e-6,
    config: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim (contract: :func:`hal.ops.catalogue.rms_norm`).

    :param x: float32 | bfloat16 | float16 [..., D].
    :param weight: float32 | bfloat16 | float16 [D].
    :param config: ``BLOCK_M`` (rows per program), ``num_warps`` (0: by row length), ``num_stages``.
    :returns: x's dtype and shape, contiguous.
    """
    op = "rms_norm"
    cfg = _common.merge_config(DEFAULTS[op], config, op)
    _common.require_device(op, {"x": x, "weight": weight})
    out = _common.empty(x.shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    x2 = _rows(x)
    m, d = x2.shape
    w = weight.contiguous()
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _rms_norm_launch(cfg, x.dtype, w.dtype, d)(grid, x2, w, out, m, d, x2.stride(0), float(eps))
    return out


def _rotary_launch(
    cfg: Mapping[str, int],
    x_dtype: torch.dtype,
    pos_dtype: torch.dtype,
    cache_dtype: torch.dtype,
    d: int,
    interleaved: bool,
) -> _common.Launch:
    """``rotary``'s launch for a rope dim ``d`` (the launcher's, and the compile specs')."""
    x = _common.ptr(x_dtype)
    return _common.Launch(
        _rotary_kernel,
        pointers={"x_ptr": x, "pos_ptr": _common.ptr(pos_dtype), "cs_ptr": _common.ptr(cache_dtype), "out_ptr": x},
        constexprs={
            "INTERLEAVED": bool(interleaved),
            "BLOCK_H": cfg["BLOCK_H"],
            "BLOCK_HALF": triton.next_power_of_2(d // 2),
        },
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def rotary(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    interleaved: bool = True,
    config: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """Rotary position embedding (contract: :func:`hal.ops.catalogue.rotary`).

    :param x: float32 | bfloat16 | float16 [T, ..., D], D even.
    :param positions: int32 | int64 [T].
    :param cos_sin_cache: float32 [max_position, D], cosines then sines.
    :param interleaved: DeepSeek's pairs ``(x[2i], x[2i+1])`` (True) or NeoX's ``(x[i], x[i + D/2])``.
    :param config: ``BLOCK_H`` (heads per program), ``num_warps``, ``num_stages``.
    :returns: x's dtype and shape, contiguous.
    """
    op = "rotary"
    cfg = _common.merge_config(DEFAULTS[op], config, op)
    _common.require_device(op, {"x": x, "positions": positions, "cos_sin_cache": cos_sin_cache})
    out = _common.empty(x.shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    t, d = x.shape[0], x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    # [T, ..., D] → [T, heads, D]; reshape copies only when the middle dims share no single stride.
    x3 = x.reshape(t, -1, d)
    heads = x3.shape[1]
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    grid = (t, triton.cdiv(heads, cfg["BLOCK_H"]))
    pos = positions.contiguous()
    _rotary_launch(cfg, x.dtype, pos.dtype, cache.dtype, d, interleaved)(
        grid, x3, pos, cache, out, heads, d // 2, x3.stride(0), x3.stride(1), cache.stride(0)
    )
    return out


def _silu_launch(cfg: Mapping[str, int], dtype: torch.dtype) -> _common.Launch:
    """``silu_and_mul``'s launch (the launcher's, and the compile specs')."""
    x = _common.ptr(dtype)
    return _common.Launch(
        _silu_and_mul_kernel,
        pointers={"x_ptr": x, "out_ptr": x},
        constexprs={"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]},
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def silu_and_mul(x: torch.Tensor, *, config: Mapping[str, int] | None = None) -> torch.Tensor:
    """SwiGLU's gate ``silu(x[..., :N]) * x[..., N:]`` (contract: :func:`hal.ops.catalogue.silu_and_mul`).

    :param x: float32 | bfloat16 | float16 [..., 2N].
    :param config: ``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``.
    :returns: x's dtype [..., N], contiguous.
    """
    op = "silu_and_mul"
    cfg = _common.merge_config(DEFAULTS[op], config, op)
    _common.require_device(op, {"x": x})
    n = x.shape[-1] // 2
    out = _common.empty((*x.shape[:-1], n), x.dtype, x.device)
    if out.numel() == 0:
        return out
    x2 = _rows(x)
    m = x2.shape[0]
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _silu_launch(cfg, x.dtype)(grid, x2, out, m, n, x2.stride(0))
    return out


OPS = {"rms_norm": rms_norm, "rotary": rotary, "silu_and_mul": silu_and_mul}

REFERENCE = {
    "rms_norm": "hal_cpu.reference.small:rms_norm",
    "rotary": "hal_cpu.reference.small:rotary",
    "silu_and_mul": "hal_cpu.reference.small:silu_and_mul",
}


# ===================================================================================================
# Compile specs
# ===================================================================================================


def compile_specs(fp8: str, tuning: Mapping[str, Mapping[str, int]]) -> list[CompileSpec]:
    """What ``hal compile-check`` compiles: each kernel at DeepSeek-V3's shapes (hidden 7168, q_lora 1536,
    kv_lora 512, rope dim 64, int64 positions, an fp32 cos/sin cache) for fp32, bf16 and fp16, and rotary
    with int32 positions.

    :param fp8: the target's Triton fp8 pointer type (unused: no fp8 here).
    :param tuning: op name → config; a missing op uses :data:`DEFAULTS`.
    """
    del fp8
    cfg = {op: _common.merge_config(DEFAULTS[op], tuning.get(op), op) for op in DEFAULTS}
    norm, rope, silu = cfg["rms_norm"], cfg["rotary"], cfg["silu_and_mul"]
    specs: list[CompileSpec] = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = _common.ptr(dtype)[1:]
        for d in (7168, 1536, 512):
            specs.append(_rms_norm_launch(norm, dtype, dtype, d).spec(f"rms_norm[{name}, D={d}]"))
        for interleaved in (True, False):
            launch = _rotary_launch(rope, dtype, torch.int64, torch.float32, 64, interleaved)
            specs.append(launch.spec(f"rotary[{name}, {'interleaved' if interleaved else 'neox'}, D=64]"))
        specs.append(_silu_launch(silu, dtype).spec(f"silu_and_mul[{name}]"))
    launch = _rotary_launch(rope, torch.bfloat16, torch.int32, torch.float32, 64, True)
    specs.append(launch.spec("rotary[bf16, interleaved, D=64, i32 positions]"))
    return specs
