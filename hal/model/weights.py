"""The model's weights as Hugging Face names them, their expected shapes, and the FP8 weight type.

Weights travel between the loader and the model as a flat dict keyed by the checkpoint's own names
(``model.layers.3.self_attn.q_a_proj.weight``), so a missing or unexpected key is reported by the name a
user finds in their files. A linear weight is a plain tensor ``[N, K]``, an :class:`Fp8Weight`
(DeepSeek's format: float8_e4m3fn data with one fp32 scale per 128×128 block) or an
:class:`Int8Weight` (W8A8: int8 data with one fp32 scale per output channel, for devices with INT8
but no FP8 arithmetic).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

import torch

from hal.model.config import ModelConfig

__all__ = [
    "Fp8Weight",
    "Weight",
    "checked_shapes",
    "expected_shapes",
    "is_linear",
    "random_state_dict",
    "weight_nbytes",
]


@dataclass(frozen=True)
class _QuantizedWeight:
    """Quantized data and its fp32 scales; subclasses say how the scales apply."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()


@dataclass(frozen=True)
class Fp8Weight(_QuantizedWeight):
    """A linear weight in DeepSeek-V3's FP8 format: ``dequantized = q * scale`` per 128×128 block.

    :ivar q: float8_e4m3fn (or e4m3fnuz) ``[..., N, K]``.
    :ivar scale: float32 ``[..., ceil(N / 128), ceil(K / 128)]`` (a checkpoint's ``weight_scale_inv``).
    """


@dataclass(frozen=True)
class Int8Weight(_QuantizedWeight):
    """A linear weight in W8A8 INT8 form: ``dequantized = q * scale[..., None]`` per output channel.

    :ivar q: int8 ``[..., N, K]`` in [-127, 127].
    :ivar scale: float32 ``[..., N]``.
    """


Weight = Union[torch.Tensor, Fp8Weight, Int8Weight]  # noqa: UP007  (a runtime alias; `|` on a class and a dataclass works only from 3.10 in annotations)

_LINEAR_SUFFIXES = (
    "q_proj.weight",
    "q_a_proj.weight",
    "q_b_proj.weight",
    "kv_a_proj_with_mqa.weight",
    "kv_b_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


def is_linear(name: str) -> bool:
    """True for the projection weights DeepSeek's FP8 checkpoints store in FP8 (not the router, the
    embeddings, the norms or the LM head)."""
    return name.endswith(_LINEAR_SUFFIXES)


def weight_nbytes(w: Weight) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the model needs, by checkpoint name, with its shape (layers of the main model only:
    multi-token-prediction layers, numbered from ``num_hidden_layers``, are not part of it)."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        a = p + "self_attn."
        if cfg.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (nh * cfg.qk_head_dim, h)
        else:
            shapes[a + "q_a_proj.weight"] = (cfg.q_lora_rank, h)
            shapes[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (nh * cfg.qk_head_dim, cfg.q_lora_rank)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (cfg.kv_entry_dim, h)
        shapes[a + "kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        shapes[a + "kv_b_proj.weight"] = (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        shapes[a + "o_proj.weight"] = (h, nh * cfg.v_head_dim)
        m = p + "mlp."
        if not cfg.is_moe_layer(i):
            _mlp(shapes, m, h, cfg.intermediate_size)
            continue
        shapes[m + "gate.weight"] = (cfg.n_routed_experts, h)
        if cfg.topk_method == "noaux_tc":
            shapes[m + "gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        for e in range(cfg.n_routed_experts):
            _mlp(shapes, f"{m}experts.{e}.", h, cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            _mlp(shapes, m + "shared_experts.", h, cfg.moe_intermediate_size * cfg.n_shared_experts)
    return shapes


def _mlp(shapes: dict[str, tuple[int, ...]], prefix: str, h: int, inter: int) -> None:
    shapes[prefix + "gate_proj.weight"] = (inter, h)
    shapes[prefix + "up_proj.weight"] = (inter, h)
    shapes[prefix + "down_proj.weight"] = (h, inter)


def random_state_dict(
    cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.02
) -> dict[str, torch.Tensor]:
    """Seeded random weights for every expected key (normal(0, std) matrices, unit norms, a small
    random routing bias so the bias path is exercised)."""
    g = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            weights[name] = torch.ones(shape, dtype=dtype)
        elif name.endswith("e_score_correction_bias"):
            weights[name] = torch.randn(shape, generator=g) * 0.01  # fp32 in every DeepSeek checkpoint
        else:
            weights[name] = (torch.randn(shape, generator=g) * std).to(dtype)
    return weights


def checked_shapes(
    cfg: ModelConfig, weights: Mapping[str, Weight], expected: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, mismatched)`` key lists of ``weights`` against ``expected`` (``None``:
    :func:`expected_shapes`; a tensor- or expert-parallel rank passes its
    :func:`hal.model.parallel.local_shapes`)."""
    if expected is None:
        expected = expected_shapes(cfg)
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [
        f"{k}: expected {list(shape)}, got {list(weights[k].shape)}"
        for k, shape in expected.items()
        if k in weights and tuple(weights[k].shape) != shape
    ]
    return missing, unexpected, mismatched
