"""FP8 block quantization helpers (DeepSeek-V3 scaling), in plain device-agnostic torch.

Two scale layouts, both fp32, both with the "multiply to dequantize" convention of DeepSeek's
checkpoints (``weight_scale_inv``): ``value ≈ fp8.float() * scale``.

- Activation groups: one scale per ``1 × group_size`` run of the last dim, ``x [..., K]`` with
  scales ``[..., ceil(K / group_size)]`` (what ``quantize_fp8`` produces).
- Weight blocks: one scale per ``block × block`` tile of the last two dims, ``w [..., N, K]`` with
  scales ``[..., ceil(N / block), ceil(K / block)]``.

Ragged edges (a last group or block shorter than the others) are allowed everywhere: the edge tile
has its own scale, computed from the values it holds. These helpers are used by the reference ops,
the checkpoint loader and the tests; they run on whatever device their inputs live on. On an
accelerator they read no tensor data on the host; on the CPU the dequantizations read two facts about
their inputs (any NaN code, the largest scale) to choose how to convert fp8 to fp32.
"""

from __future__ import annotations

import functools

import torch

from hal.errors import DTypeError, OpInputError, ShapeError
from hal.ops import _validate as _v

__all__ = [
    "AMAX_FLOOR",
    "INT8_MAX",
    "dequantize_fp8_blocks",
    "dequantize_fp8_groups",
    "dequantize_int8_rows",
    "e4m3fn_to_fnuz",
    "fp8_max",
    "quantize_fp8_blocks",
    "quantize_int8_rows",
]

#: Lower bound on a group's or block's amax before it becomes a scale: an all-zero tile gets the
#: scale ``AMAX_FLOOR / fp8_max`` instead of 0, so dequantization never divides by zero (DeepGEMM's
#: ``clamp(1e-4)``).
AMAX_FLOOR = 1e-4


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 format.

    :param dtype: float8_e4m3fn (448.0) or float8_e4m3fnuz (240.0).
    :returns: ``torch.finfo(dtype).max`` as a Python float.
    """
    if dtype not in _v.FP8S:
        raise DTypeError("fp8_max", "dtype", f"expected float8_e4m3fn | float8_e4m3fnuz, got {dtype}")
    return float(torch.finfo(dtype).max)


def _check_fp8(op: str, name: str, t: object, min_rank: int, layout: str) -> torch.Tensor:
    t = _v.tensor(op, name, t)
    if t.dim() < min_rank:
        raise ShapeError(op, name, f"expected {layout} (rank >= {min_rank}), got shape {list(t.shape)}")
    _v.dtype(op, name, t, _v.FP8S)
    return t


def _check_scales(op: str, name: str, t: object, expected: list[int], layout: str) -> torch.Tensor:
    t = _v.tensor(op, name, t)
    _v.dtype(op, name, t, (torch.float32,))
    _v.shape(op, name, t, expected, layout)
    return t


@functools.lru_cache(maxsize=16)
def _fp8_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """float32 [256]: the value of each byte of fp8 format ``dtype`` (torch's own conversion of each)."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(dtype).float()


def _fp8_to_float32(t: torch.Tensor) -> torch.Tensor:
    """``t.float()`` (contiguous), by looking each byte up in the table of the format's 256 values: the
    same numbers, about 3x faster on CPUs, where torch converts float8_e4m3fn one value at a time."""
    codes = t.contiguous().view(torch.uint8).reshape(-1).int()
    return _fp8_values(t.dtype, t.device).index_select(0, codes).view(t.shape)


#: Per e4m3 format, the power of two between a byte's value and the float16 whose exponent and mantissa
#: fields are the byte's (float16's exponent bias is 15; e4m3fn's 7, e4m3fnuz's 8).
_E4M3_IN_HALF = {torch.float8_e4m3fn: 2.0**8, torch.float8_e4m3fnuz: 2.0**7}
#: int16 with every bit but bit 14 set (float16's top exponent bit, which the sign extension fills).
_CLEAR_BIT_14 = ~(1 << 14)
#: Scales below this magnitude take the power of two of :data:`_E4M3_IN_HALF` without overflowing.
_FOLD_BELOW = 2.0**100


def _fp8_as_half(t: torch.Tensor) -> torch.Tensor | None:
    """float16 ``h`` with ``h.float() * _E4M3_IN_HALF[t.dtype] == t.float()`` exactly, made by moving
    each byte's bits into float16's fields (three vectorized integer passes: 4-5x faster than the table
    of :func:`_fp8_to_float32` on CPUs); ``None`` when ``t`` holds a NaN code, which has no float16
    counterpart this way, or is empty.

    An e4m3 byte ``s eeee mmm`` sign-extended to int16 and shifted left by 7 is ``s s eeee mmm 0000000``;
    clearing bit 14 leaves float16 ``s 0eeee mmm0000000``: the same sign, exponent field and mantissa,
    so the same number up to the power of two between the biases, subnormals included (float16's
    subnormals are e4m3's, and converting float16 to float32 is exact).
    """
    if t.numel() == 0:
        return None
    i8 = t.contiguous().view(torch.int8)
    if t.dtype == torch.float8_e4m3fn:  # NaN: 0x7F and 0xFF (int8 127 and uint8 255)
        has_nan = bool(i8.max() == 127) or bool(i8.view(torch.uint8).max() == 255)
    else:  # e4m3fnuz's one NaN: 0x80 (int8 -128)
        has_nan = bool(i8.min() == -128)
    if has_nan:
        return None
    h = i8.to(torch.int16)
    h.bitwise_left_shift_(7)
    h.bitwise_and_(_CLEAR_BIT_14)
    return h.view(torch.float16)


def _fp8_float_and_scales(t: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, s)``: a fresh float32 ``f`` and scales ``s`` with ``f * s == t.float() * scales`` bitwise, for
    every value and its scale.

    On the CPU ``f`` comes from :func:`_fp8_as_half`, and the power of two it leaves out goes into the
    scales (exact: a power of two times a float is exact unless it overflows, which scales below
    :data:`_FOLD_BELOW` cannot; the product rounds once either way), so no pass is added. Elsewhere, or
    with NaN codes or large scales, ``f`` is :func:`_fp8_to_float32`'s and ``s`` is ``scales``.
    """
    half = _fp8_as_half(t) if t.is_cpu else None
    if half is None:
        return _fp8_to_float32(t), scales
    f = half.float()
    factor = _E4M3_IN_HALF[t.dtype]
    if scales.numel() and bool(scales.abs().amax() < _FOLD_BELOW):
        return f, scales * factor
    return f.mul_(factor), scales


def dequantize_fp8_groups(xq: torch.Tensor, scales: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Dequantize per-group scaled fp8 activations: ``xq.float() * scale`` of each value's group.

    :param xq: float8_e4m3fn | float8_e4m3fnuz [..., K].
    :param scales: float32 [..., ceil(K / group_size)]; ``scales[..., g]`` scales values
        ``g * group_size : (g + 1) * group_size`` of the last dim (the last group may be shorter).
    :param group_size: values per group (128 for DeepSeek-V3).
    :returns: float32 [..., K], on xq's device.
    """
    op = "dequantize_fp8_groups"
    _check_fp8(op, "xq", xq, 1, "[..., K]")
    _v.positive_int(op, "group_size", group_size)
    k = xq.shape[-1]
    _check_scales(op, "scales", scales, [*xq.shape[:-1], _v.cdiv(k, group_size)], "[..., ceil(K / group_size)]")
    _v.same_device(op, (("xq", xq), ("scales", scales)))
    # One scale per value, then drop the ragged tail of the last group.
    x, scales = _fp8_float_and_scales(xq, scales)
    per_value = scales.repeat_interleave(group_size, dim=-1)[..., :k]
    return x.mul_(per_value)


def quantize_fp8_blocks(
    w: torch.Tensor, block: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize weights to fp8 with one fp32 scale per ``block × block`` tile of the last two dims.

    A tile's scale is ``max(amax, 1e-4) / fp8_max`` and its values ``w / scale`` (clamped to
    ``±fp8_max``) rounded to ``fp8_dtype``, so ``w ≈ wq.float() * ws`` (DeepSeek's
    ``weight_scale_inv`` convention). Edge tiles of a ragged N or K are scaled by their own values.

    :param w: a floating dtype (float32 | bfloat16 | float16 | float64) [..., N, K].
    :param block: tile edge (128 for DeepSeek-V3).
    :param fp8_dtype: float8_e4m3fn (max 448) or float8_e4m3fnuz (max 240).
    :returns: ``(wq, ws)``: wq ``fp8_dtype [..., N, K]``, ws ``float32 [..., ceil(N / block),
        ceil(K / block)]``, both on w's device.
    """
    op = "quantize_fp8_blocks"
    w = _v.tensor(op, "w", w)
    if w.dim() < 2:
        raise ShapeError(op, "w", f"expected [..., N, K] (rank >= 2), got shape {list(w.shape)}")
    if not w.is_floating_point() or w.dtype in _v.FP8S:
        raise DTypeError(op, "w", f"expected a float dtype (float32 | bfloat16 | float16 | float64), got {w.dtype}")
    _v.positive_int(op, "block", block)
    if fp8_dtype not in _v.FP8S:
        raise OpInputError(op, "fp8_dtype", f"expected float8_e4m3fn | float8_e4m3fnuz, got {fp8_dtype}")
    qmax = fp8_max(fp8_dtype)
    *batch, n, k = w.shape
    nb, kb = _v.cdiv(n, block), _v.cdiv(k, block)
    # Zero padding to whole tiles leaves every tile's amax unchanged (|0| never exceeds it).
    padded = torch.nn.functional.pad(w.float(), (0, kb * block - k, 0, nb * block - n))
    tiles = padded.reshape(*batch, nb, block, kb, block)
    amax = tiles.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=AMAX_FLOOR)
    scales = amax / qmax
    # w / scale can land an fp32 rounding step above fp8_max; clamping makes saturation explicit
    # rather than leaving it to the cast, which gives NaN past the top of the range for e4m3fnuz
    # (and differs between devices).
    q = (tiles / scales).clamp(-qmax, qmax).to(fp8_dtype)
    wq = q.reshape(*batch, nb * block, kb * block)[..., :n, :k].contiguous()
    ws = scales.reshape(*batch, nb, kb).contiguous()
    return wq, ws


def dequantize_fp8_blocks(wq: torch.Tensor, ws: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Dequantize block-scaled fp8 weights: ``wq.float() * ws`` of each value's tile.

    :param wq: float8_e4m3fn | float8_e4m3fnuz [..., N, K].
    :param ws: float32 [..., ceil(N / block), ceil(K / block)]; ``ws[..., i, j]`` scales rows
        ``i * block : (i + 1) * block`` and columns ``j * block : (j + 1) * block`` (a checkpoint's
        ``weight_scale_inv``).
    :param block: tile edge (128 for DeepSeek-V3).
    :returns: float32 [..., N, K], on wq's device.
    """
    op = "dequantize_fp8_blocks"
    _check_fp8(op, "wq", wq, 2, "[..., N, K]")
    _v.positive_int(op, "block", block)
    *batch, n, k = wq.shape
    _check_scales(
        op, "ws", ws, [*batch, _v.cdiv(n, block), _v.cdiv(k, block)], "[..., ceil(N / block), ceil(K / block)]"
    )
    _v.same_device(op, (("wq", wq), ("ws", ws)))
    w, ws = _fp8_float_and_scales(wq, ws)
    if n % block == 0 and k % block == 0:  # whole tiles: scale them in place, no per-value scale tensor
        tiles = w.view(*batch, n // block, block, k // block, block)
        tiles.mul_(ws.reshape(*batch, n // block, 1, k // block, 1))
        return w
    per_value = ws.repeat_interleave(block, dim=-2)[..., :n, :].repeat_interleave(block, dim=-1)[..., :k]
    return w.mul_(per_value)


# ---------------------------------------------------------------------------------------------------
# E4M3 formats: OCP e4m3fn (NVIDIA, MI350, DeepSeek's checkpoints) and e4m3fnuz (MI300)
# ---------------------------------------------------------------------------------------------------

#: e4m3fn's bit patterns whose meaning changes in e4m3fnuz: -0 (FNUZ's only NaN) and e4m3fn's two
#: NaNs (``S.1111.111``, which FNUZ reads as ±240).
_FN_NEG_ZERO = 0x80
_FN_NAN_MAGNITUDE = 0x7F
_FNUZ_NAN = 0x80


def e4m3fn_to_fnuz(wq: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scaled values with the data in ``float8_e4m3fnuz``: bits kept, scale doubled. Exact.

    e4m3fnuz's exponent bias is 8 where e4m3fn's is 7, so every finite e4m3fn bit pattern read as
    e4m3fnuz is worth exactly half as much, subnormals included: keeping the bits and doubling the
    scale keeps ``wq.float() * scale`` bit-for-bit. Three patterns differ in meaning and are rewritten:
    e4m3fn's -0 (0x80) is FNUZ's NaN, so it becomes +0 (0x00); e4m3fn's NaNs (0x7F, 0xFF) would read
    as ±240, so they become FNUZ's NaN (0x80). e4m3fn's largest value, 448 (0x7E), reads as 224 and
    comes back as 448 through the doubled scale: nothing saturates.

    :param wq: float8_e4m3fn, any shape (a checkpoint's ``weight``).
    :param scale: a floating tensor, any shape, multiply-to-dequantize (a checkpoint's
        ``weight_scale_inv``); it is only doubled, so its layout does not matter.
    :returns: ``(wq_fnuz, scale_fnuz)``: float8_e4m3fnuz of wq's shape (a new tensor) and
        ``scale * 2`` in scale's dtype, both on their inputs' devices.
    """
    op = "e4m3fn_to_fnuz"
    wq = _v.tensor(op, "wq", wq)
    _v.dtype(op, "wq", wq, (torch.float8_e4m3fn,))
    scale = _v.tensor(op, "scale", scale)
    if not scale.is_floating_point() or scale.dtype in _v.FP8S:
        raise DTypeError(
            op, "scale", f"expected a float dtype (float32 | bfloat16 | float16 | float64), got {scale.dtype}"
        )
    bits = wq.view(torch.uint8)
    out = bits.masked_fill(bits == _FN_NEG_ZERO, 0)
    out.masked_fill_((bits & _FN_NAN_MAGNITUDE) == _FN_NAN_MAGNITUDE, _FNUZ_NAN)
    return out.view(torch.float8_e4m3fnuz), scale * 2


# ---------------------------------------------------------------------------------------------------
# INT8, symmetric, one scale per row (W8A8: per-token activations, per-output-channel weights)
# ---------------------------------------------------------------------------------------------------

#: The largest code used: symmetric INT8 uses [-127, 127] so that negation is exact.
INT8_MAX = 127


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 with one scale per row of the last dim: ``x ≈ q.float() * scale[..., None]``.

    Used for weights ``[..., N, K]`` (a scale per output channel) and, by the reference, for
    activations ``[M, K]`` (a scale per token). ``scale = max(|row|) / 127``, 1 for an all-zero row;
    ``q = round(x / scale)`` (half to even), in [-127, 127]. A row holding NaN or inf gets a NaN or inf
    scale, so what is computed from it is not finite either, as in float (NaN weights would otherwise
    quantize to zeros, and a broken checkpoint run with zeroed rows instead of being caught).

    :param x: a floating tensor ``[..., K]``.
    :returns: ``(q int8 [..., K], scale float32 [...])``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise OpInputError("quantize_int8_rows", "x", f"expected a floating tensor [..., K], got {_describe(x)}")
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / INT8_MAX)  # NaN stays NaN
    # A non-finite row's codes do not matter (its scale carries the NaN / inf): 0, not a NaN cast to int8.
    q = torch.round(xf / scale.unsqueeze(-1)).nan_to_num_(0.0).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 value of :func:`quantize_int8_rows`'s output: ``q [..., K] * scale [...]``."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise OpInputError("dequantize_int8_rows", "q", f"expected an int8 tensor, got {_describe(q)}")
    if not isinstance(scale, torch.Tensor) or list(scale.shape) != list(q.shape[:-1]):
        raise OpInputError(
            "dequantize_int8_rows", "scale", f"expected float32 {list(q.shape[:-1])}, got {_describe(scale)}"
        )
    return q.float() * scale.float().unsqueeze(-1)


def _describe(t: object) -> str:
    return f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
