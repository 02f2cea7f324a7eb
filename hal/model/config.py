"""The DeepSeek-V3 architecture's configuration, read from a Hugging Face ``config.json``.

Reads DeepSeek's own config files (``rope_scaling``) and transformers 5's (``rope_parameters``), checks
every value the model depends on, and rejects what it does not implement, naming the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hal.errors import HALError

__all__ = ["ConfigError", "ModelConfig", "tiny_config"]


class ConfigError(HALError, ValueError):
    """A config value the model cannot run with; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    """The hyper-parameters of a DeepSeek-V2/V3-style MoE+MLA model (names as in transformers).

    ``q_lora_rank`` ``None`` means queries come from one ``q_proj`` (DeepSeek-V2-Lite). Layers below
    ``first_k_dense_replace`` use a dense MLP; the others a MoE of ``n_routed_experts`` experts (top
    ``num_experts_per_tok``) plus ``n_shared_experts`` shared ones. ``rope`` holds the RoPE parameters
    (``rope_type`` ``default`` or ``yarn`` with ``factor``, ``original_max_position_embeddings``,
    ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_interleave: bool = True
    rope: Mapping[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    eos_token_id: tuple[int, ...] = ()
    bos_token_id: int | None = None
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    num_nextn_predict_layers: int = 0

    # ------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_entry_dim(self) -> int:
        """Values per token in the latent KV cache: ``kv_lora_rank + qk_rope_head_dim`` (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN (as in
        DeepSeek's code and transformers' ``yarn_apply_mscale``)."""
        scale = self.qk_head_dim**-0.5
        if self.rope.get("rope_type", "default") == "yarn":
            mscale_all_dim = self.rope.get("mscale_all_dim") or 0
            if mscale_all_dim:
                m = yarn_mscale(float(self.rope["factor"]), float(mscale_all_dim))
                scale *= m * m
        return scale

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rope"] = dict(self.rope)
        return data

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` dict (DeepSeek's or transformers'), rejecting what the model
        does not implement with the offending key named."""

        def get(key: str, default: Any = None) -> Any:
            return raw.get(key, default)

        model_type = get("model_type")
        if model_type not in (None, "deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"model_type: expected 'deepseek_v3' or 'deepseek_v2', got {model_type!r}")
        if get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act: only 'silu' is implemented, got {get('hidden_act')!r}")
        if get("attention_bias", False):
            raise ConfigError("attention_bias: true is not implemented (DeepSeek models have no attention bias)")
        heads, kv_heads = get("num_attention_heads"), get("num_key_value_heads")
        if kv_heads is not None and heads is not None and kv_heads != heads:
            raise ConfigError(
                f"num_key_value_heads: MLA needs it equal to num_attention_heads ({heads}), got {kv_heads}"
            )
        if get("ep_size", 1) not in (1, None):
            raise ConfigError(f"ep_size: expert parallelism is configured at run time, got {get('ep_size')!r}")
        scoring = get("scoring_func", "sigmoid")
        if scoring not in ("sigmoid", "softmax"):
            raise ConfigError(f"scoring_func: expected 'sigmoid' or 'softmax', got {scoring!r}")
        topk_method = get("topk_method", "noaux_tc")
        if topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method: expected noaux_tc, greedy or group_limited_greedy, got {topk_method!r}")
        rope = _rope(raw)
        eos = get("eos_token_id")
        eos_ids: tuple[int, ...] = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in required:
            if not isinstance(get(key), int) or get(key) <= 0:
                raise ConfigError(f"{key}: expected a positive int, got {get(key)!r}")
        n_routed = get("n_routed_experts") or 0
        cfg = cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            moe_intermediate_size=get("moe_intermediate_size") or get("intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            n_routed_experts=n_routed,
            num_experts_per_tok=get("num_experts_per_tok") or 0,
            n_shared_experts=get("n_shared_experts") or 0,
            first_k_dense_replace=get("first_k_dense_replace", 0) or 0,
            n_group=get("n_group") or 1,
            topk_group=get("topk_group") or 1,
            norm_topk_prob=bool(get("norm_topk_prob", False)),
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0) or 1.0),
            scoring_func=scoring,
            topk_method=topk_method,
            q_lora_rank=get("q_lora_rank"),
            kv_lora_rank=get("kv_lora_rank", 512),
            qk_nope_head_dim=get("qk_nope_head_dim", 128),
            qk_rope_head_dim=get("qk_rope_head_dim", 64),
            v_head_dim=get("v_head_dim", 128),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            max_position_embeddings=get("max_position_embeddings", 4096),
            rope_interleave=bool(get("rope_interleave", True)),
            rope=rope,
            eos_token_id=eos_ids,
            bos_token_id=get("bos_token_id"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            torch_dtype=get("torch_dtype") or get("dtype"),
            num_nextn_predict_layers=get("num_nextn_predict_layers", 0) or 0,
        )
        cfg.check()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face model directory?)") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent key."""
        positive = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}: expected a positive int, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError(f"q_lora_rank: expected a positive int or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim: must be even, got {self.qk_rope_head_dim}")
        if self.first_k_dense_replace < self.num_hidden_layers and self.n_routed_experts > 0:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(
                    f"num_experts_per_tok: expected 1..{self.n_routed_experts}, got {self.num_experts_per_tok}"
                )
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"n_group: must divide n_routed_experts ({self.n_routed_experts}), got {self.n_group}"
                )
            if not 0 < self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group: expected 1..n_group ({self.n_group}), got {self.topk_group}")
            if self.num_experts_per_tok > self.n_routed_experts // self.n_group * self.topk_group:
                raise ConfigError("num_experts_per_tok: more than the experts in topk_group groups")
        if self.vocab_size <= max(self.eos_token_id, default=-1):
            raise ConfigError(f"eos_token_id: {self.eos_token_id} outside the vocabulary of {self.vocab_size}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE parameters from ``rope_parameters`` (transformers 5) or ``rope_scaling`` (DeepSeek)."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling")
    if scaling:
        params.update(scaling)
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.pop("type", None) or params.get("rope_type") or "default"
    params["rope_type"] = rope_type
    if rope_type not in ("default", "yarn"):
        key = "rope_scaling" if scaling else "rope_parameters"
        raise ConfigError(f"{key}.rope_type: only 'default' and 'yarn' are implemented, got {rope_type!r}")
    if rope_type == "yarn":
        if "original_max_position_embeddings" not in params:
            raise ConfigError("rope_scaling.original_max_position_embeddings: required for YaRN")
        if params.get("factor") is None:
            params["factor"] = raw["max_position_embeddings"] / params["original_max_position_embeddings"]
    return params


def tiny_config(**overrides: Any) -> ModelConfig:
    """The built-in tiny config ``hal run`` uses without ``--model``: every feature of the architecture
    (q LoRA, YaRN, a dense layer then MoE layers with shared experts, group-limited routing) at a size
    that generates quickly on a CPU (6.6M parameters)."""
    raw: dict[str, Any] = {
        "model_type": "deepseek_v3",
        "vocab_size": 1024,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "q_lora_rank": 128,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 32,
        "v_head_dim": 32,
        "max_position_embeddings": 2048,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "eos_token_id": None,
        "bos_token_id": 0,
    }
    raw.update(overrides)
    return ModelConfig.from_dict(raw)
