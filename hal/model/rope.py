"""Rotary position embedding tables: default RoPE and DeepSeek's YaRN, as transformers computes them.

:func:`cos_sin_cache` returns the ``[max_position, rope_dim]`` fp32 table the ``rotary`` op takes
(cosines then sines), with YaRN's attention factor folded in, exactly as transformers'
``DeepseekV3RotaryEmbedding`` scales its cos and sin.
"""

from __future__ import annotations

import math

import torch

from hal.model.config import ModelConfig, yarn_mscale

__all__ = ["cos_sin_cache", "inv_freq_and_factor"]


def inv_freq_and_factor(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rope_dim / 2]`` and the factor cos/sin are multiplied by."""
    rope = cfg.rope
    dim = cfg.qk_rope_head_dim
    base = float(rope.get("rope_theta", 10000.0))
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.get("rope_type", "default") != "yarn":
        return 1.0 / pos_freqs, 1.0
    factor = float(rope["factor"])
    original = float(rope["original_max_position_embeddings"])
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = float(rope.get("beta_fast") or 32)
    beta_slow = float(rope.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def cos_sin_cache(
    cfg: ModelConfig, max_position: int | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """fp32 ``[max_position, rope_dim]``: ``[:, :rope_dim/2]`` cosines, ``[:, rope_dim/2:]`` sines."""
    inv_freq, factor = inv_freq_and_factor(cfg)
    positions = torch.arange(max_position or cfg.max_position_embeddings, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos() * factor, angles.sin() * factor], dim=-1).to(device)
