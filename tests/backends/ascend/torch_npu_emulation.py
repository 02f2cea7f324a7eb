"""A CPU stand-in for ``torch_npu``: exactly the operators HAL's Ascend backend calls, and ``torch.npu``.

Written from Huawei's documentation of each operator (the URLs are in ``hal_ascend.ops``), not from the
implementation: the signatures (positional and keyword-only parameters, names, defaults), the accepted
dtypes, layouts and shape rules, and the documented formula computed in plain torch on the CPU. A call
the document rules out raises :class:`EmulationError` (a ``RuntimeError``, as torch_npu's own checks
raise) naming the operator and the rule; a documented feature the backend does not use and this module
does not model raises :class:`NotEmulatedError`. So the backend's calls are checked, not merely run.

This module is for tests only: the ``torch_npu_emulation`` fixture (``conftest.py``) puts it in
``sys.modules["torch_npu"]`` and its :data:`npu` in ``torch.npu``, and removes both afterwards. It is
never shipped as a fallback.
"""

from __future__ import annotations

import itertools
import math
import types
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "DEVICE_NAME",
    "TOTAL_MEMORY",
    "EmulationError",
    "NotEmulatedError",
    "calls",
    "npu",
    "npu_dynamic_quant",
    "npu_fused_infer_attention_score",
    "npu_grouped_matmul",
    "npu_moe_finalize_routing",
    "npu_moe_gating_top_k",
    "npu_moe_init_routing",
    "npu_quant_matmul",
    "npu_rms_norm",
    "npu_rotary_mul",
    "npu_swiglu",
]

#: The device the emulated ``torch.npu`` reports.
DEVICE_NAME = "Ascend910B3"
TOTAL_MEMORY = 65_452_113_920

#: Names of the operators called, in order (tests clear it and read it).
calls: list[str] = []


class EmulationError(RuntimeError):
    """A call the operator's document rules out (wrong dtype, layout, shape or argument value)."""


class NotEmulatedError(NotImplementedError):
    """A documented feature this emulation does not model (the backend does not use it)."""


def _fail(op: str, message: str) -> EmulationError:
    return EmulationError(f"torch_npu.{op}: {message}")


def _not_emulated(op: str, what: str) -> NotEmulatedError:
    return NotEmulatedError(f"torch_npu.{op}: {what} is documented but not emulated (HAL's backend does not use it)")


def _tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise _fail(op, f"{name} must be a Tensor, got {type(t).__name__}")
    return t


def _dtype(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise _fail(op, f"{name} dtype must be one of {names}, got {t.dtype}")


def _contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise _fail(op, f"{name} must be contiguous (the document does not support non-contiguous tensors)")


def _none(op: str, **values: object) -> None:
    for name, value in values.items():
        if value is not None:
            raise _not_emulated(op, f"{name}")


# ---------------------------------------------------------------------------------------------------
# torch.npu: what the backend's build and runtime ops read
# ---------------------------------------------------------------------------------------------------

npu = types.ModuleType("torch.npu", "Emulated torch.npu: one Ascend910B3 with fixed memory figures.")


def _device_count() -> int:
    return 1


def _current_device() -> int:
    return 0


def _get_device_name(device: object = None) -> str:
    return DEVICE_NAME


def _get_device_properties(device: object = None) -> types.SimpleNamespace:
    return types.SimpleNamespace(name=DEVICE_NAME, total_memory=TOTAL_MEMORY)


def _mem_get_info(device: object = None) -> tuple[int, int]:
    return TOTAL_MEMORY, TOTAL_MEMORY


def _zero(device: object = None) -> int:
    return 0


def _synchronize(device: object = None) -> None:
    calls.append("torch.npu.synchronize")


def _empty_cache() -> None:
    calls.append("torch.npu.empty_cache")


npu.device_count = _device_count  # type: ignore[attr-defined]
npu.current_device = _current_device  # type: ignore[attr-defined]
npu.get_device_name = _get_device_name  # type: ignore[attr-defined]
npu.get_device_properties = _get_device_properties  # type: ignore[attr-defined]
npu.mem_get_info = _mem_get_info  # type: ignore[attr-defined]
npu.memory_allocated = _zero  # type: ignore[attr-defined]
npu.memory_reserved = _zero  # type: ignore[attr-defined]
npu.max_memory_allocated = _zero  # type: ignore[attr-defined]
npu.synchronize = _synchronize  # type: ignore[attr-defined]
npu.empty_cache = _empty_cache  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------
# Quantization and quantized matmuls
# ---------------------------------------------------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def npu_dynamic_quant(
    x: torch.Tensor,
    *,
    smooth_scales: torch.Tensor | None = None,
    group_index: torch.Tensor | None = None,
    dst_type: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric dynamic quantization: ``scale = rowMax(|x|) / 127``, ``y = round(x / scale)``.

    x float16 | bfloat16 with more than one dim; dst_type None or int8 (quint4x2 not emulated);
    returns ``(y int8 of x's shape, scale float32 of x's shape without the last dim)``.
    """
    op = "npu_dynamic_quant"
    calls.append(op)
    _tensor(op, "x", x)
    _dtype(op, "x", x, _HALF)
    if x.dim() <= 1:
        raise _fail(op, f"x must have more than one dim, got shape {list(x.shape)}")
    _none(op, smooth_scales=smooth_scales, group_index=group_index)
    if dst_type == torch.quint4x2:
        raise _not_emulated(op, "dst_type=torch.quint4x2 (int4)")
    if dst_type not in (None, torch.int8):
        raise _fail(op, f"dst_type must be None, torch.int8 or torch.quint4x2, got {dst_type}")
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    # The document does not say what an all-zero row gives (0 / 0); zeros keep later checks meaningful.
    q = torch.where(scale.unsqueeze(-1) > 0, torch.round(xf / scale.unsqueeze(-1)), 0.0)
    return q.clamp(-128, 127).to(torch.int8), scale


def _check_x2_layout(op: str, x2: torch.Tensor, k: int) -> None:
    if x2.shape[0] != k:
        raise _fail(
            op,
            f"x2 must be the weight in (k, n) layout with k = {k} (x1's last dim), got shape {list(x2.shape)}; "
            "an [n, k] weight is passed as its transpose",
        )
    n = x2.shape[1]
    transposed_contiguous = x2.stride() == (1, k) or n == 1
    if not (x2.is_contiguous() or transposed_contiguous):
        raise _fail(op, f"x2 must be contiguous (k, n) or the transpose of a contiguous (n, k), strides {x2.stride()}")


def npu_quant_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    scale: torch.Tensor,
    *,
    offset: torch.Tensor | None = None,
    pertoken_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
    group_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Quantized matmul ``x1 @ x2 * scale (* pertoken_scale) + offset`` (2-D int8 emulated).

    Atlas A2/A3 dtype rows: (scale int64 | float32, no pertoken) → float16 or int8; (scale float32 |
    bfloat16, pertoken float32 | None) → bfloat16; (scale float32, pertoken float32) → float16;
    (scale float32 | bfloat16, no pertoken) → int32. int64 scales need npu_trans_quant_param (not
    emulated); an int32 output holds the accumulators.
    """
    op = "npu_quant_matmul"
    calls.append(op)
    for name, t in (("x1", x1), ("x2", x2), ("scale", scale)):
        _tensor(op, name, t)
    if x1.dtype == torch.int32 or x2.dtype == torch.int32:
        raise _not_emulated(op, "int32 (packed int4) x1/x2")
    _dtype(op, "x1", x1, (torch.int8,))
    _dtype(op, "x2", x2, (torch.int8,))
    if not (2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6):
        raise _fail(op, f"x1 and x2 must have 2-6 dims, got {list(x1.shape)} and {list(x2.shape)}")
    if x1.dim() != 2 or x2.dim() != 2:
        raise _not_emulated(op, "batched (3-6 dim) x1/x2")
    m, k = x1.shape
    _check_x2_layout(op, x2, k)
    n = x2.shape[1]
    if k > 65535 or n > 65535:
        raise _fail(op, f"the last dims of x1 and x2 must not exceed 65535, got {k} and {n}")
    _none(op, bias=bias, group_sizes=group_sizes)
    if scale.dim() != 1 or scale.shape[0] not in (1, n):
        raise _fail(op, f"scale must be 1-D (1,) or (n,) = ({n},), got shape {list(scale.shape)}")
    if scale.dtype == torch.int64:
        raise _not_emulated(op, "an int64 scale from npu_trans_quant_param")
    _dtype(op, "scale", scale, (torch.float32, torch.bfloat16))
    if offset is not None:
        _dtype(op, "offset", _tensor(op, "offset", offset), (torch.float32,))
        if offset.dim() != 1 or offset.shape[0] not in (1, n):
            raise _fail(op, f"offset must be 1-D (1,) or (n,) = ({n},), got shape {list(offset.shape)}")
    if pertoken_scale is not None:
        _dtype(op, "pertoken_scale", _tensor(op, "pertoken_scale", pertoken_scale), (torch.float32,))
        if pertoken_scale.dim() != 1 or pertoken_scale.shape[0] != m:
            raise _fail(op, f"pertoken_scale must be 1-D (m,) = ({m},), got shape {list(pertoken_scale.shape)}")
    out = torch.int8 if output_dtype is None else output_dtype
    if out not in (torch.int8, torch.float16, torch.bfloat16, torch.int32):
        raise _fail(op, f"output_dtype must be torch.int8, torch.float16, torch.bfloat16 or torch.int32, got {out}")
    fp32_scale = scale.dtype == torch.float32
    allowed = {
        torch.float16: fp32_scale and offset is None,  # without pertoken (int64/float32) or with (float32)
        torch.int8: fp32_scale and pertoken_scale is None,
        torch.bfloat16: offset is None,
        torch.int32: offset is None and pertoken_scale is None,
    }[out]
    if not allowed:
        raise _fail(
            op,
            f"no supported combination: scale {scale.dtype}, offset {'set' if offset is not None else 'None'}, "
            f"pertoken_scale {'set' if pertoken_scale is not None else 'None'}, output_dtype {out}",
        )
    acc = x1.long() @ x2.long()  # exact int accumulation
    if out == torch.int32:
        return acc.to(torch.int32)
    r = acc.float() * scale.float()
    if pertoken_scale is not None:
        r = r * pertoken_scale.unsqueeze(1)
    if offset is not None:
        r = r + offset
    return torch.round(r).clamp(-128, 127).to(torch.int8) if out == torch.int8 else r.to(out)


def _grouped_scenario_checks(op: str, x: Any, weight: Any, split_item: int, group_type: int | None) -> None:
    for name, value in (("x", x), ("weight", weight)):
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in value):
            raise _fail(op, f"{name} must be a list of Tensors, got {type(value).__name__}")
        if not 1 <= len(value) <= 128:
            raise _fail(op, f"{name} must hold 1-128 tensors, got {len(value)}")
    if split_item not in (0, 1, 2, 3):
        raise _fail(op, f"split_item must be 0, 1, 2 or 3, got {split_item!r}")
    if group_type not in (None, -1, 0):
        raise _fail(op, f"group_type must be -1 (no grouping) or 0 (m axis) on Atlas A2/A3, got {group_type!r}")
    if group_type != 0 or len(x) != 1 or len(weight) != 1:
        raise _not_emulated(op, "a scenario other than single x, single weight, single y grouped on m")
    if split_item not in (2, 3):
        raise _fail(op, f"single x, weight and y (grouped on m) need split_item 2 or 3, got {split_item}")


def npu_grouped_matmul(
    x: list[torch.Tensor],
    weight: list[torch.Tensor],
    *,
    bias: list[torch.Tensor] | None = None,
    scale: list[torch.Tensor] | None = None,
    offset: list[torch.Tensor] | None = None,
    antiquant_scale: list[torch.Tensor] | None = None,
    antiquant_offset: list[torch.Tensor] | None = None,
    per_token_scale: list[torch.Tensor] | None = None,
    group_list: torch.Tensor | list[int] | None = None,
    activation_input: list[torch.Tensor] | None = None,
    activation_quant_scale: list[torch.Tensor] | None = None,
    activation_quant_offset: list[torch.Tensor] | None = None,
    split_item: int = 0,
    group_type: int | None = None,
    group_list_type: int = 0,
    act_type: int = 0,
    output_dtype: torch.dtype | None = None,
    tuning_config: list[int] | None = None,
) -> list[torch.Tensor]:
    """Grouped matmul, emulated for the single-x, single-weight, single-y scenario grouped on m.

    x ``[M, K]`` (not transposed), weight ``[E, K, N]`` (contiguous, or the transpose of a contiguous
    ``[E, N, K]``), group_list an int64 Tensor of E entries (group_list_type 0: cumulative, last = M;
    1: counts, sum = M), at most 1024 groups, inner dims < 65536. Dtype rows (Tensor group_list):
    float16/bfloat16/float32 unquantized (output None or x's dtype); int8 x and weight with scale
    ``[E, N]`` bfloat16 → bfloat16 or float32 → float16, per_token_scale float32 ``[M]`` optional.
    """
    op = "npu_grouped_matmul"
    calls.append(op)
    _grouped_scenario_checks(op, x, weight, split_item, group_type)
    _none(
        op,
        bias=bias,
        offset=offset,
        antiquant_scale=antiquant_scale,
        antiquant_offset=antiquant_offset,
        activation_input=activation_input,
        activation_quant_scale=activation_quant_scale,
        activation_quant_offset=activation_quant_offset,
        tuning_config=tuning_config,
    )
    if act_type not in range(6):
        raise _fail(op, f"act_type must be 0-5, got {act_type!r}")
    if act_type != 0:
        raise _not_emulated(op, f"act_type={act_type} (fused activation)")
    a, w = x[0], weight[0]
    if a.dim() != 2 or w.dim() != 3:
        raise _fail(op, f"x must be 2-D [M, K] and weight 3-D [E, K, N], got {list(a.shape)} and {list(w.shape)}")
    if not a.is_contiguous():
        raise _fail(op, "x must not be transposed (non-contiguous)")
    m, k = a.shape
    e, wk, n = w.shape
    if wk != k:
        raise _fail(
            op, f"weight must be [E, K, N] with K = {k} (x's last dim), got {list(w.shape)}; pass [E, N, K] transposed"
        )
    if not (w.is_contiguous() or w.stride() == (n * k, 1, k)):
        raise _fail(
            op, f"weight must be contiguous [E, K, N] or the transpose of a contiguous [E, N, K], strides {w.stride()}"
        )
    if k >= 65536 or n >= 65536:
        raise _fail(op, f"inner dims must be < 65536, got K = {k}, N = {n}")
    if not isinstance(group_list, torch.Tensor):
        raise _fail(
            op, "group_list must be a Tensor when grouping on m (group_type 0); a list[int] takes group_type None"
        )
    _dtype(op, "group_list", group_list, (torch.int64,))
    if group_list.dim() != 1 or group_list.shape[0] != e:
        raise _fail(op, f"group_list must be 1-D with one entry per weight group ({e}), got {list(group_list.shape)}")
    if e > 1024:
        raise _fail(op, f"at most 1024 groups, got {e}")
    gl = group_list.tolist()
    if group_list_type == 0:
        if any(v < 0 for v in gl) or any(b < a_ for a_, b in itertools.pairwise(gl)):
            raise _fail(op, f"group_list (group_list_type 0) must be non-negative and non-decreasing, got {gl}")
        if gl[-1] != m:
            raise _fail(op, f"group_list's last value must equal x's rows ({m}), got {gl[-1]}")
        ends = gl
    elif group_list_type == 1:
        if any(v < 0 for v in gl) or sum(gl) != m:
            raise _fail(op, f"group_list (group_list_type 1) must be non-negative counts summing to {m}, got {gl}")
        ends = list(itertools.accumulate(gl))
    elif group_list_type == 2:
        raise _not_emulated(op, "group_list_type=2 ([E, 2] index/size pairs)")
    else:
        raise _fail(op, f"group_list_type must be 0, 1 or 2, got {group_list_type!r}")

    quantized = a.dtype == torch.int8
    if not quantized:
        _dtype(op, "x", a, _FLOATS)
        if w.dtype != a.dtype:
            raise _fail(op, f"unquantized weight must have x's dtype {a.dtype}, got {w.dtype}")
        _none(op, scale=scale, per_token_scale=per_token_scale)
        if output_dtype not in (None, a.dtype):
            raise _fail(op, f"output_dtype must be None or {a.dtype} for {a.dtype} inputs, got {output_dtype}")
        out_dtype = a.dtype
    else:
        _dtype(op, "weight", w, (torch.int8,))
        if scale is None or len(scale) != 1:
            raise _fail(op, "int8 x and weight need scale: a list of one tensor, as long as weight")
        s = _tensor(op, "scale[0]", scale[0])
        if s.dtype == torch.int64:
            raise _not_emulated(op, "an int64 scale (per-channel quantization to int8)")
        _dtype(op, "scale[0]", s, (torch.bfloat16, torch.float32))
        if list(s.shape) != [e, n]:
            raise _fail(op, f"scale[0] must be [E, N] = [{e}, {n}] for a single weight tensor, got {list(s.shape)}")
        want = torch.bfloat16 if s.dtype == torch.bfloat16 else torch.float16
        if output_dtype != want:
            raise _fail(
                op, f"int8 with a {s.dtype} scale gives {want}: output_dtype must be {want}, got {output_dtype}"
            )
        pt = None
        if per_token_scale is not None:
            if len(per_token_scale) != 1:
                raise _fail(op, "per_token_scale must be a list of one tensor, as long as x")
            pt = _tensor(op, "per_token_scale[0]", per_token_scale[0])
            _dtype(op, "per_token_scale[0]", pt, (torch.float32,))
            if list(pt.shape) != [m]:
                raise _fail(op, f"per_token_scale[0] must be [M] = [{m}], got {list(pt.shape)}")
        out_dtype = want
    y = torch.zeros(m, n, dtype=torch.float32)
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            if quantized:
                acc = (a[start:end].long() @ w[g].long()).float() * s[g].float()
                y[start:end] = acc if pt is None else acc * pt[start:end].unsqueeze(1)
            else:
                y[start:end] = a[start:end].float() @ w[g].float()
        start = end
    return [y.to(out_dtype)]


# ---------------------------------------------------------------------------------------------------
# Small ops
# ---------------------------------------------------------------------------------------------------


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over gamma's dims: ``(x * rsqrt(mean(x²) + epsilon) * gamma, rstd)``.

    self float16 | bfloat16 | float32 with 2-8 dims; gamma of self's dtype, shaped like self's last dims.
    """
    op = "npu_rms_norm"
    calls.append(op)
    x = _tensor(op, "self", self)
    _tensor(op, "gamma", gamma)
    _dtype(op, "self", x, _FLOATS)
    if not 2 <= x.dim() <= 8:
        raise _fail(op, f"self must have 2-8 dims, got shape {list(x.shape)}")
    if gamma.dtype != x.dtype:
        raise _fail(op, f"gamma's dtype must be self's ({x.dtype}), got {gamma.dtype}")
    g = gamma.dim()
    if g < 1 or g > x.dim() or list(x.shape[-g:]) != list(gamma.shape):
        raise _fail(op, f"gamma must have the shape of self's last dims, got {list(gamma.shape)} for {list(x.shape)}")
    dims = tuple(range(x.dim() - g, x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_swiglu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``silu(A) * B`` with A, B the halves of input along dim; float32 | float16 | bfloat16, 1-8 dims,
    contiguous, not empty."""
    op = "npu_swiglu"
    calls.append(op)
    x = _tensor(op, "input", input)
    _dtype(op, "input", x, _FLOATS)
    if not 1 <= x.dim() <= 8:
        raise _fail(op, f"input must have 1-8 dims, got shape {list(x.shape)}")
    _contiguous(op, "input", x)
    if x.numel() == 0:
        raise _fail(op, "input must not be empty")
    if not -x.dim() <= dim < x.dim():
        raise _fail(op, f"dim must be in [{-x.dim()}, {x.dim() - 1}], got {dim}")
    if x.shape[dim] % 2:
        raise _fail(op, f"input's size along dim {dim} must be even, got {list(x.shape)}")
    a, b = x.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)


#: r1/r2 shapes each layout allows, by rotary_mode (jit_compile=False, Atlas A2/A3); letters are x's
#: dims in that layout, "1" a broadcast dim.
_ROTARY_R_LAYOUTS = {
    "half": {"BNSD": ("11SD", "B1SD", "BNSD"), "BSND": ("1S1D", "BS1D", "BSND"), "SBND": ("S11D", "SB1D", "SBND")},
    "interleave": {"BNSD": ("11SD",), "BSND": ("1S1D",), "SBND": ("S11D",)},
}


def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half") -> torch.Tensor:
    """``r1 * input + r2 * rotate(input)``: 'half' rotates ``cat(-x2, x1)`` of the halves, 'interleave'
    the pairs ``(x[2i], x[2i+1]) -> (-x[2i+1], x[2i])``. 4-D input; r1/r2 broadcast shapes per layout
    (interleave: 11SD, 1S1D or S11D); B * N < 1000; D even and < 896; r1, r2 in [-1, 1]."""
    op = "npu_rotary_mul"
    calls.append(op)
    x = _tensor(op, "input", input)
    for name, t in (("r1", r1), ("r2", r2)):
        _tensor(op, name, t)
        _dtype(op, name, t, (x.dtype,))
    _dtype(op, "input", x, _FLOATS)
    if rotary_mode not in _ROTARY_R_LAYOUTS:
        raise _fail(op, f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    if x.dim() != 4 or r1.dim() != 4:
        raise _fail(op, f"input, r1 and r2 must be 4-D, got {list(x.shape)} and {list(r1.shape)}")
    d = x.shape[-1]
    if d % 2 or d >= 896:
        raise _fail(op, f"D must be even and < 896, got {d}")
    if r2.shape != r1.shape:
        raise _fail(op, f"r2's shape must be r1's {list(r1.shape)}, got {list(r2.shape)}")
    matched = []
    for layout, patterns in _ROTARY_R_LAYOUTS[rotary_mode].items():
        size = dict(zip(layout, x.shape, strict=True))
        for pattern in patterns:
            if [1 if c == "1" else size[c] for c in pattern] == list(r1.shape):
                matched.append(size["B"] * size["N"])
    if not matched:
        raise _fail(op, f"r1 shape {list(r1.shape)} fits no {rotary_mode} layout of input {list(x.shape)}")
    if min(matched) >= 1000:
        raise _fail(op, f"B * N must be < 1000, got {min(matched)} for input {list(x.shape)}")
    if r1.abs().max() > 1 or r2.abs().max() > 1:
        raise _fail(op, "r1 and r2 must lie in [-1, 1]")
    xf = x.float()
    if rotary_mode == "half":
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        rotated = torch.stack((-xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)
    return (r1.float() * xf + r2.float() * rotated).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# MoE gating
# ---------------------------------------------------------------------------------------------------


def npu_moe_gating_top_k(
    x: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    k_group: int = 1,
    group_count: int = 1,
    group_select_mode: int = 0,
    renorm: int = 0,
    norm_type: int = 0,
    out_flag: bool = False,
    routed_scaling_factor: float = 1.0,
    eps: float = 1e-20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid (norm_type 1) or softmax (0) scores, group-limited top-k on ``normOut + bias``.

    Returns ``(yOut x's dtype [T, k], expertIdxOut int32 [T, k], normOut float32 [T, E])``; yOut is the
    chosen experts' normOut, divided by its sum + eps for sigmoid, times routed_scaling_factor. normOut's
    content is not defined without out_flag (NaN here, so a reader notices).
    """
    op = "npu_moe_gating_top_k"
    calls.append(op)
    _tensor(op, "x", x)
    _dtype(op, "x", x, _FLOATS)
    if x.dim() != 2:
        raise _fail(op, f"x must be 2-D [T, E], got shape {list(x.shape)}")
    t, e = x.shape
    if e > 2048:
        raise _fail(op, f"the expert count (x's last dim) must not exceed 2048, got {e}")
    for name, value in (("k", k), ("k_group", k_group), ("group_count", group_count)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(op, f"{name} must be an int, got {value!r}")
    if group_count <= 0 or e % group_count:
        raise _fail(op, f"group_count must be > 0 and divide E = {e}, got {group_count}")
    per_group = e // group_count
    if per_group <= 2:
        raise _fail(op, f"E / group_count must be greater than 2, got {per_group}")
    if math.ceil(per_group / 32) * 32 * group_count > 2048:
        raise _fail(op, "ceil32(E / group_count) * group_count must not exceed 2048")
    if not 1 <= k_group <= group_count:
        raise _fail(op, f"k_group must be in 1..group_count ({group_count}), got {k_group}")
    if not 1 <= k <= per_group * k_group:
        raise _fail(op, f"k must be in 1..E / group_count * k_group ({per_group * k_group}), got {k}")
    if group_select_mode not in (0, 1):
        raise _fail(op, f"group_select_mode must be 0 (max) or 1 (top-2 sum), got {group_select_mode!r}")
    if renorm != 0:
        raise _fail(op, f"renorm supports only 0, got {renorm!r}")
    if norm_type not in (0, 1):
        raise _fail(op, f"norm_type must be 1 (sigmoid) or 0 (softmax), got {norm_type!r}")
    if bias is not None:
        _tensor(op, "bias", bias)
        if bias.dtype != x.dtype:
            raise _fail(op, f"bias's dtype must be x's ({x.dtype}), got {bias.dtype}")
        if bias.dim() != 1 or bias.shape[0] != e:
            raise _fail(op, f"bias must be 1-D [E] = [{e}], got shape {list(bias.shape)}")
    scores = x.float().sigmoid() if norm_type == 1 else x.float().softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()
    if group_count > 1:
        grouped = choice.view(t, group_count, per_group)
        group_scores = grouped.amax(-1) if group_select_mode == 0 else grouped.topk(2, dim=-1).values.sum(-1)
        kept = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :k_group]
        dropped = torch.ones(t, group_count, dtype=torch.bool).scatter_(1, kept, False)
        choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(t, e)
    ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :k]
    y = scores.gather(1, ids)
    if norm_type == 1:
        y = y / (y.sum(dim=-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    norm_out = scores if out_flag else torch.full((t, e), float("nan"))
    return y.to(x.dtype), ids.to(torch.int32), norm_out


# ---------------------------------------------------------------------------------------------------
# MoE token routing (permute / finalize)
# ---------------------------------------------------------------------------------------------------


def _int_arg(op: str, name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(op, f"{name} must be an int, got {value!r}")
    return value


def npu_moe_init_routing(
    x: torch.Tensor, row_idx: torch.Tensor, expert_idx: torch.Tensor, active_num: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``expanded_expert_idx, sorted_row_idx = keyValueSort(expert_idx, row_idx)`` (stable over the
    row-major flattened expert_idx, as op-plugin's test golden), ``expanded_row_idx[sorted_row_idx[i]] =
    i``, ``expanded_x[i] = x[sorted_row_idx[i] % NUM_ROWS]`` for ``min(NUM_ROWS, active_num) * K`` rows.

    x float16 | bfloat16 | float32 2-D with fewer than 2^24 elements; row_idx and expert_idx int32 2-D
    ``[NUM_ROWS, K]``. Returns ``(expanded_x, expanded_row_idx int32 [NUM_ROWS * K], expanded_expert_idx
    int32 [NUM_ROWS * K])``.
    """
    op = "npu_moe_init_routing"
    calls.append(op)
    _tensor(op, "x", x)
    _tensor(op, "row_idx", row_idx)
    _tensor(op, "expert_idx", expert_idx)
    _dtype(op, "x", x, _FLOATS)
    _dtype(op, "row_idx", row_idx, (torch.int32,))
    _dtype(op, "expert_idx", expert_idx, (torch.int32,))
    if x.dim() != 2:
        raise _fail(op, f"x must be 2-D [NUM_ROWS, H], got shape {list(x.shape)}")
    if x.numel() >= 2**24:
        raise _fail(op, f"x's size must be below 2^24 elements, got {x.numel()}")
    if expert_idx.dim() != 2 or expert_idx.shape[0] != x.shape[0]:
        raise _fail(op, f"expert_idx must be 2-D [NUM_ROWS = {x.shape[0]}, K], got shape {list(expert_idx.shape)}")
    if row_idx.shape != expert_idx.shape:
        raise _fail(op, f"row_idx's shape must be expert_idx's {list(expert_idx.shape)}, got {list(row_idx.shape)}")
    active_num = _int_arg(op, "active_num", active_num)
    if active_num < 0:
        raise _fail(op, f"active_num must be >= 0, got {active_num}")
    num_rows, k = expert_idx.shape
    flat_rows = row_idx.reshape(-1).long()
    if flat_rows.numel() and (flat_rows.min() < 0 or flat_rows.max() >= num_rows * k):
        raise _fail(op, f"row_idx values must lie in [0, NUM_ROWS * K = {num_rows * k}) (positions in the expansion)")
    flat_experts = expert_idx.reshape(-1)
    perm = torch.sort(flat_experts, stable=True).indices
    sorted_row_idx = flat_rows[perm]
    expanded_row_idx = torch.zeros(num_rows * k, dtype=torch.int32)
    expanded_row_idx[sorted_row_idx] = torch.arange(num_rows * k, dtype=torch.int32)
    rows = min(num_rows, active_num) * k
    expanded_x = x[sorted_row_idx[:rows] % num_rows]
    return expanded_x, expanded_row_idx, flat_experts[perm]


def npu_moe_finalize_routing(
    expanded_permuted_rows: torch.Tensor,
    skip1: torch.Tensor | None,
    skip2: torch.Tensor | None,
    bias: torch.Tensor | None,
    scales: torch.Tensor | None,
    expanded_src_to_dst_row: torch.Tensor,
    export_for_source_row: torch.Tensor | None,
    drop_pad_mode: int = 0,
) -> torch.Tensor:
    """``out(i, j) = skip1 + skip2 + sum_k scales[i, k] * (rows[expanded_src_to_dst_row[i + k * NUM_ROWS], j]
    + bias[export_for_source_row[i, k], j])`` (drop_pad_mode 0; 2 indexes ``i * K + k``).

    rows float16 | bfloat16 | float32 ``[NUM_ROWS * K, H]``; skip1, skip2, bias, scales of the rows' dtype
    (each may be None; skip2 only with skip1); scales ``[NUM_ROWS, K]``; expanded_src_to_dst_row int32
    ``[NUM_ROWS * K]`` in ``[0, NUM_ROWS * K - 1]``; export_for_source_row int32 ``[NUM_ROWS, K]`` in
    ``[0, E - 1]``. The drop-pad modes (1, 3) are not emulated. Computed in float32, returned in the rows'
    dtype.
    """
    op = "npu_moe_finalize_routing"
    calls.append(op)
    rows = _tensor(op, "expanded_permuted_rows", expanded_permuted_rows)
    _dtype(op, "expanded_permuted_rows", rows, _FLOATS)
    drop_pad_mode = _int_arg(op, "drop_pad_mode", drop_pad_mode)
    if drop_pad_mode in (1, 3):
        raise _not_emulated(op, f"drop_pad_mode {drop_pad_mode} (drop pad)")
    if drop_pad_mode not in (0, 2):
        raise _fail(op, f"drop_pad_mode must be in [0, 3], got {drop_pad_mode}")
    if rows.dim() != 2:
        raise _fail(op, f"expanded_permuted_rows must be 2-D [NUM_ROWS * K, H], got shape {list(rows.shape)}")
    if skip1 is None and skip2 is not None:
        raise _fail(op, "skip2 must be None when skip1 is None")
    for name, t in (("skip1", skip1), ("skip2", skip2), ("bias", bias), ("scales", scales)):
        if t is not None:
            _tensor(op, name, t)
            if t.dtype != rows.dtype:
                raise _fail(op, f"{name}'s dtype must be expanded_permuted_rows' ({rows.dtype}), got {t.dtype}")
            if t.dim() != 2:
                raise _fail(op, f"{name} must be 2-D, got shape {list(t.shape)}")
    if scales is None:
        raise _not_emulated(op, "scales=None (NUM_ROWS and K then come from other inputs)")
    num_rows, k = scales.shape
    h = rows.shape[1]
    if rows.shape[0] != num_rows * k:
        raise _fail(op, f"expanded_permuted_rows must have NUM_ROWS * K = {num_rows * k} rows, got {rows.shape[0]}")
    src_to_dst = _tensor(op, "expanded_src_to_dst_row", expanded_src_to_dst_row)
    _dtype(op, "expanded_src_to_dst_row", src_to_dst, (torch.int32,))
    if src_to_dst.dim() != 1 or src_to_dst.shape[0] != num_rows * k:
        raise _fail(
            op, f"expanded_src_to_dst_row must be 1-D [NUM_ROWS * K = {num_rows * k}], got {list(src_to_dst.shape)}"
        )
    if src_to_dst.numel() and (src_to_dst.min() < 0 or src_to_dst.max() >= num_rows * k):
        raise _fail(op, f"expanded_src_to_dst_row values must lie in [0, {num_rows * k - 1}]")
    for name, t in (("skip1", skip1), ("skip2", skip2)):
        if t is not None and list(t.shape) != [num_rows, h]:
            raise _fail(op, f"{name} must have out's shape [{num_rows}, {h}], got {list(t.shape)}")
    if export_for_source_row is not None:
        _tensor(op, "export_for_source_row", export_for_source_row)
        _dtype(op, "export_for_source_row", export_for_source_row, (torch.int32,))
        if list(export_for_source_row.shape) != [num_rows, k]:
            raise _fail(op, f"export_for_source_row must be [NUM_ROWS, K] = [{num_rows}, {k}]")
    if bias is not None:
        if export_for_source_row is None:
            raise _fail(op, "bias needs export_for_source_row (the expert of each row)")
        if bias.shape[1] != h:
            raise _fail(op, f"bias must be [E, H = {h}], got {list(bias.shape)}")
        if export_for_source_row.numel() and (
            export_for_source_row.min() < 0 or export_for_source_row.max() >= bias.shape[0]
        ):
            raise _fail(op, f"export_for_source_row values must lie in [0, E - 1 = {bias.shape[0] - 1}]")
    if drop_pad_mode == 0:
        dst = src_to_dst.long().view(k, num_rows).t()  # [NUM_ROWS, K]: entry i + k * NUM_ROWS
    else:
        dst = src_to_dst.long().view(num_rows, k)  # entry i * K + k
    gathered = rows.float()[dst]  # [NUM_ROWS, K, H]
    if bias is not None:
        gathered = gathered + bias.float()[export_for_source_row.long()]
    out = (scales.float().unsqueeze(-1) * gathered).sum(dim=1)
    for t in (skip1, skip2):
        if t is not None:
            out = out + t.float()
    return out.to(rows.dtype)


# ---------------------------------------------------------------------------------------------------
# Fused inference attention (MLA mode with PageAttention)
# ---------------------------------------------------------------------------------------------------

_FIA_LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "BSH_NBSD", "BSND_NBSD", "BNSD_NBSD", "TND", "TND_NTD", "NTD_TND")


def _fia_mla_checks(
    op: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_rope: torch.Tensor,
    key_rope: torch.Tensor,
    num_heads: int,
    num_key_value_heads: int,
    block_size: int,
) -> None:
    for name, t in (
        ("query", query),
        ("key", key),
        ("value", value),
        ("query_rope", query_rope),
        ("key_rope", key_rope),
    ):
        _tensor(op, name, t)
        _contiguous(op, name, t)
    _dtype(op, "query", query, _HALF)
    if query.dim() != 4:
        raise _fail(op, f"query must be 4-D [B, S, N, D] for input_layout 'BSND', got {list(query.shape)}")
    b, s, n, d = query.shape
    if d == 128:
        raise _not_emulated(op, "the MLA mode with query d = 128 (TND layouts)")
    if d != 512:
        raise _fail(op, f"with query_rope and key_rope, query's d must be 512 or 128, got {d}")
    if n != num_heads:
        raise _fail(op, f"num_heads ({num_heads}) must equal query's N ({n})")
    if n not in (32, 64, 128):
        raise _fail(op, f"the MLA mode takes query N of 32, 64 or 128, got {n}")
    if not 1 <= s <= 16:
        raise _fail(op, f"the MLA mode takes query S of 1-16, got {s}")
    if query_rope.dtype != query.dtype or list(query_rope.shape) != [b, s, n, 64]:
        raise _fail(
            op,
            f"query_rope must be {query.dtype} [B, S, N, 64] = {[b, s, n, 64]}, "
            f"got {query_rope.dtype} {list(query_rope.shape)}",
        )
    if key.dtype != query.dtype or value.dtype != query.dtype or key_rope.dtype != key.dtype:
        raise _fail(op, "key, value and key_rope must have query's dtype here (no quantized KV in the MLA mode)")
    if key.dim() != 3:
        raise _fail(op, f"paged key must be (blocknum, blocksize, H) for 'BSND', got {list(key.shape)}")
    if key.shape != value.shape:
        raise _fail(op, f"key and value shapes must be identical, got {list(key.shape)} and {list(value.shape)}")
    if key.shape[2] != 512:
        raise _fail(op, f"the MLA mode takes key N = 1 and d = 512 (H = 512), got H = {key.shape[2]}")
    if list(key_rope.shape) != [key.shape[0], key.shape[1], 64]:
        raise _fail(
            op,
            f"key_rope must be [blocknum, blocksize, 64] = {[key.shape[0], key.shape[1], 64]}, "
            f"got {list(key_rope.shape)}",
        )
    if num_key_value_heads != 1:
        raise _fail(op, f"key has one head in the MLA mode: num_key_value_heads must be 1, got {num_key_value_heads}")
    if block_size not in (16, 128):
        raise _fail(op, f"the MLA mode's PageAttention takes block_size 16 or 128, got {block_size}")
    if key.shape[1] != block_size:
        raise _fail(op, f"key's blocksize dim ({key.shape[1]}) must equal block_size ({block_size})")


def npu_fused_infer_attention_score(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    pse_shift: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    actual_seq_lengths: Sequence[int] | None = None,
    actual_seq_lengths_kv: Sequence[int] | None = None,
    dequant_scale1: torch.Tensor | None = None,
    quant_scale1: torch.Tensor | None = None,
    dequant_scale2: torch.Tensor | None = None,
    quant_scale2: torch.Tensor | None = None,
    quant_offset2: torch.Tensor | None = None,
    antiquant_scale: torch.Tensor | None = None,
    antiquant_offset: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    query_padding_size: torch.Tensor | None = None,
    kv_padding_size: torch.Tensor | None = None,
    key_antiquant_scale: torch.Tensor | None = None,
    key_antiquant_offset: torch.Tensor | None = None,
    value_antiquant_scale: torch.Tensor | None = None,
    value_antiquant_offset: torch.Tensor | None = None,
    key_shared_prefix: torch.Tensor | None = None,
    value_shared_prefix: torch.Tensor | None = None,
    actual_shared_prefix_len: Sequence[int] | None = None,
    query_rope: torch.Tensor | None = None,
    key_rope: torch.Tensor | None = None,
    key_rope_antiquant_scale: torch.Tensor | None = None,
    num_heads: int = 1,
    scale: float = 1.0,
    pre_tokens: int = 2147483647,
    next_tokens: int = 2147483647,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    sparse_mode: int = 0,
    inner_precise: int = 0,
    block_size: int = 0,
    antiquant_mode: int = 0,
    softmax_lse_flag: bool = False,
    key_antiquant_mode: int = 0,
    value_antiquant_mode: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused inference attention, emulated in its MLA mode with PageAttention and input_layout 'BSND'.

    query ``[B, S, N, 512]`` + query_rope ``[B, S, N, 64]`` (N 32/64/128, S 1-16); key = value
    ``[blocknum, block_size, 512]`` + key_rope ``[blocknum, block_size, 64]``, all contiguous;
    block_table int32 ``[B, >= blocks needed]``; block_size 16 or 128; actual_seq_lengths_kv a list of
    ints (required with PageAttention); sparse_mode 0 without mask for S = 1, 3 with the 2048 x 2048
    causal mask for S > 1; no softmax LSE in this mode. Scores ``(q·k + q_rope·k_rope) * scale`` in
    float32; value is key's 512 values. Returns ``(attention_out [B, S, N, 512], tensor([0.]))``.
    """
    op = "npu_fused_infer_attention_score"
    calls.append(op)
    if input_layout not in _FIA_LAYOUTS:
        raise _fail(op, f"input_layout must be one of {', '.join(_FIA_LAYOUTS)}, got {input_layout!r}")
    if (query_rope is None) != (key_rope is None):
        raise _fail(op, "query_rope and key_rope must be given together or not at all")
    if query_rope is None or key_rope is None or block_table is None:
        raise _not_emulated(op, "a mode other than MLA (query_rope/key_rope) with PageAttention (block_table)")
    if input_layout != "BSND":
        raise _not_emulated(op, f"input_layout {input_layout!r} in the MLA mode (only 'BSND' is)")
    if softmax_lse_flag:
        raise _fail(op, "softmax_lse_flag is not supported in the MLA mode (query d = 512)")
    for name, value_ in (
        ("pse_shift", pse_shift),
        ("dequant_scale1", dequant_scale1),
        ("quant_scale1", quant_scale1),
        ("dequant_scale2", dequant_scale2),
        ("quant_scale2", quant_scale2),
        ("quant_offset2", quant_offset2),
        ("antiquant_scale", antiquant_scale),
        ("antiquant_offset", antiquant_offset),
        ("query_padding_size", query_padding_size),
        ("kv_padding_size", kv_padding_size),
        ("key_antiquant_scale", key_antiquant_scale),
        ("key_antiquant_offset", key_antiquant_offset),
        ("value_antiquant_scale", value_antiquant_scale),
        ("value_antiquant_offset", value_antiquant_offset),
        ("key_shared_prefix", key_shared_prefix),
        ("value_shared_prefix", value_shared_prefix),
        ("actual_shared_prefix_len", actual_shared_prefix_len),
    ):
        if value_ is not None:
            raise _fail(op, f"{name} is not supported in the MLA mode (no pse, quantization, padding or prefix)")
    _fia_mla_checks(op, query, key, value, query_rope, key_rope, num_heads, num_key_value_heads, block_size)
    b, s, n, _ = query.shape
    if s == 1 and (sparse_mode != 0 or atten_mask is not None):
        raise _fail(op, f"with query S = 1 the MLA mode takes sparse_mode 0 and no atten_mask, got {sparse_mode}")
    if s > 1:
        if sparse_mode != 3 or atten_mask is None:
            raise _fail(op, f"with query S > 1 the MLA mode takes sparse_mode 3 and an atten_mask, got {sparse_mode}")
        _dtype(op, "atten_mask", atten_mask, (torch.bool, torch.int8, torch.uint8))
        if list(atten_mask.shape) not in ([2048, 2048], [1, 2048, 2048], [1, 1, 2048, 2048]):
            raise _fail(op, f"sparse_mode 3 needs the optimized 2048 x 2048 mask, got {list(atten_mask.shape)}")
        expected = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
        if not torch.equal(atten_mask.reshape(2048, 2048).bool(), expected):
            raise _fail(op, "sparse_mode 3's mask must be the 2048 x 2048 causal mask (1 above the diagonal)")
    _dtype(op, "block_table", _tensor(op, "block_table", block_table), (torch.int32,))
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise _fail(op, f"block_table must be 2-D with B = {b} rows, got {list(block_table.shape)}")
    if actual_seq_lengths_kv is None:
        raise _fail(op, "actual_seq_lengths_kv is required with PageAttention")
    if not isinstance(actual_seq_lengths_kv, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in actual_seq_lengths_kv
    ):
        raise _fail(
            op, f"actual_seq_lengths_kv must be a list of ints (SymInt[]), got {type(actual_seq_lengths_kv).__name__}"
        )
    lens = list(actual_seq_lengths_kv)
    if len(lens) == 1:
        lens = lens * b
    if len(lens) < b or any(v < 0 for v in lens):
        raise _fail(
            op, f"actual_seq_lengths_kv must hold 1 or >= B ({b}) non-negative lengths, got {actual_seq_lengths_kv}"
        )
    blocks_needed = [-(-v // block_size) for v in lens[:b]]
    if max(blocks_needed, default=0) > block_table.shape[1]:
        raise _fail(
            op, f"block_table's second dim ({block_table.shape[1]}) is below the blocks needed ({max(blocks_needed)})"
        )
    if sum(blocks_needed) > key.shape[0]:
        raise _fail(op, f"blocknum ({key.shape[0]}) is below the blocks the lengths need ({sum(blocks_needed)})")
    out = torch.zeros(b, s, n, 512, dtype=torch.float32)
    for i in range(b):
        length = lens[i]
        ids = block_table[i, : blocks_needed[i]].long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= key.shape[0]):
            raise _fail(
                op,
                f"block_table row {i} holds block ids outside [0, {key.shape[0]}) (the NPU would read out of bounds)",
            )
        k_tok = key.index_select(0, ids).reshape(-1, 512)[:length].float()  # [L, 512]
        kr_tok = key_rope.index_select(0, ids).reshape(-1, 64)[:length].float()
        v_tok = value.index_select(0, ids).reshape(-1, 512)[:length].float()
        scores = (
            torch.einsum("snd,ld->nsl", query[i].float(), k_tok)
            + torch.einsum("snd,ld->nsl", query_rope[i].float(), kr_tok)
        ) * scale  # [N, S, L]
        if sparse_mode == 3:
            rows = torch.arange(s).unsqueeze(1)
            cols = torch.arange(length).unsqueeze(0)
            scores = scores.masked_fill(~(cols <= rows + (length - s)), float("-inf"))
        seen = torch.isfinite(scores).any(dim=-1, keepdim=True)
        probs = torch.where(seen, scores.softmax(dim=-1).nan_to_num(0.0), 0.0)
        out[i] = (probs @ v_tok).transpose(0, 1)
    return out.to(query.dtype), torch.zeros(1, dtype=torch.float32)
