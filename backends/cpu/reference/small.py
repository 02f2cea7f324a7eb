"""Reference small ops: RMSNorm, rotary position embedding, SwiGLU's ``silu_and_mul``.

Each computes in fp32 and returns x's dtype. Inputs have been validated by the catalogue
(:mod:`hal.ops.catalogue`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rms_norm", "rotary", "silu_and_mul"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """``x [..., D] * rsqrt(mean(x²) + eps) * weight [D]`` over the last dim, in fp32; x's dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def rotary(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    interleaved: bool = True,
) -> torch.Tensor:
    """Rotate ``x [T, ..., D]`` by the angles of ``cos_sin_cache[positions]``; x's dtype, layout and shape.

    Interleaved (DeepSeek): pair ``(x[2i], x[2i+1])`` rotates by ``cos/sin[i]``. NeoX: pair
    ``(x[i], x[i + D/2])``.
    """
    half = x.shape[-1] // 2
    cos_sin = cos_sin_cache[positions.long()]
    # [T, D/2] → [T, 1, ..., 1, D/2]: one angle per token, shared by every head in between.
    bcast = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos = cos_sin[:, :half].reshape(bcast)
    sin = cos_sin[:, half:].reshape(bcast)
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf[..., :half], xf[..., half:]
    r1 = x1 * cos - x2 * sin
    r2 = x1 * sin + x2 * cos
    # Put each rotated pair back where it came from.
    out = torch.stack((r1, r2), dim=-1).flatten(-2) if interleaved else torch.cat((r1, r2), dim=-1)
    return out.to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :N]) * x[..., N:]`` for ``x [..., 2N]``, in fp32; x's dtype ``[..., N]``."""
    n = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :n]) * xf[..., n:]).to(x.dtype)
