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

__all__ = ["ABSENT_KEY_DEFAULTS", "ConfigError", "ModelConfig", "tiny_config"]


class ConfigError(HALError, ValueError):
    """A config value the model cannot run with; the message names the key."""


#: What a ``config.json`` that leaves one of these keys out means, by ``model_type``: transformers'
#: ``DeepseekV3Config`` / ``DeepseekV2Config`` defaults, and for ``scoring_func`` / ``topk_method``
#: (which transformers does not read) what its routers always do: V3 sigmoid scores with the bias and
#: group-limited top-k, V2 softmax scores and greedy top-k. These keys change the output without
#: changing any weight's shape, so a default other than transformers' would run a different model
#: silently (transformers' V2 config never writes ``scoring_func``). Keys that shape the weights are
#: checked against the checkpoint by the loader instead.
ABSENT_KEY_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "deepseek_v3": {
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_interleave": True,
        "eos_token_id": 1,
        "bos_token_id": 0,
    },
    "deepseek_v2": {
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "num_experts_per_tok": None,
        "n_group": None,
        "topk_group": None,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "rope_interleave": True,
        "eos_token_id": 2,
        "bos_token_id": 1,
    },
}


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
        does not implement, and every value of the wrong type or out of range, with the key named."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config.json: expected a JSON object, got {_JSON_TYPES.get(type(raw), 'null')}")

        def get(key: str, default: Any = None) -> Any:
            return raw.get(key, default)

        model_type = get("model_type")
        if model_type not in (None, "deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"model_type: expected 'deepseek_v3' or 'deepseek_v2', got {model_type!r}")
        # A key left out means what transformers makes of it for this model type (V3 without one): the
        # readers below take these defaults.
        defaults = ABSENT_KEY_DEFAULTS[model_type or "deepseek_v3"]
        absent = [key for key in defaults if key not in raw]
        if get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act: only 'silu' is implemented, got {get('hidden_act')!r}")
        if _bool(raw, "attention_bias", False):
            raise ConfigError("attention_bias: true is not implemented (DeepSeek models have no attention bias)")
        heads = _int(raw, "num_attention_heads", None, minimum=1)  # required
        kv_heads = _int(raw, "num_key_value_heads", heads, minimum=1, null=heads)
        if kv_heads != heads:
            raise ConfigError(
                f"num_key_value_heads: MLA needs it equal to num_attention_heads ({heads}), got {kv_heads}"
            )
        if _int(raw, "moe_layer_freq", 1, minimum=1, null=1) != 1:  # DeepSeek's code reads it; transformers not
            raise ConfigError(
                f"moe_layer_freq: only 1 (every layer from first_k_dense_replace on is MoE) is implemented, "
                f"got {get('moe_layer_freq')}"
            )
        if _int(raw, "ep_size", 1, minimum=1, null=1) != 1:
            raise ConfigError(f"ep_size: expert parallelism is configured at run time, got {get('ep_size')}")
        scoring = get("scoring_func", defaults["scoring_func"])
        if scoring not in ("sigmoid", "softmax"):
            raise ConfigError(f"scoring_func: expected 'sigmoid' or 'softmax', got {scoring!r}")
        topk_method = get("topk_method", defaults["topk_method"])
        if topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method: expected noaux_tc, greedy or group_limited_greedy, got {topk_method!r}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _int(raw, key, None, minimum=1)  # required: None fails too
        intermediate = get("intermediate_size")
        max_positions = _int(raw, "max_position_embeddings", defaults["max_position_embeddings"], minimum=1)
        cfg = cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=intermediate,
            moe_intermediate_size=_int(raw, "moe_intermediate_size", intermediate, minimum=1, null=intermediate),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            n_routed_experts=_int(raw, "n_routed_experts", 0, null=0),
            num_experts_per_tok=_int(raw, "num_experts_per_tok", defaults["num_experts_per_tok"], null=0),
            n_shared_experts=_int(raw, "n_shared_experts", 0, null=0),
            first_k_dense_replace=_int(raw, "first_k_dense_replace", 0, null=0),
            n_group=_int(raw, "n_group", defaults["n_group"], minimum=1, null=1),
            topk_group=_int(raw, "topk_group", defaults["topk_group"], minimum=1, null=1),
            norm_topk_prob=_bool(raw, "norm_topk_prob", defaults["norm_topk_prob"]),
            routed_scaling_factor=_float(raw, "routed_scaling_factor", defaults["routed_scaling_factor"]),
            scoring_func=scoring,
            topk_method=topk_method,
            q_lora_rank=_int(raw, "q_lora_rank", None, minimum=1, null=None),
            kv_lora_rank=_int(raw, "kv_lora_rank", 512, minimum=1),
            qk_nope_head_dim=_int(raw, "qk_nope_head_dim", 128, minimum=1),
            qk_rope_head_dim=_int(raw, "qk_rope_head_dim", 64, minimum=1),
            v_head_dim=_int(raw, "v_head_dim", 128, minimum=1),
            rms_norm_eps=_float(raw, "rms_norm_eps", defaults["rms_norm_eps"], zero=True),
            max_position_embeddings=max_positions,
            rope_interleave=_bool(raw, "rope_interleave", defaults["rope_interleave"]),
            rope=_rope(raw, max_positions),
            eos_token_id=_token_ids(raw, "eos_token_id", defaults["eos_token_id"]),
            bos_token_id=_int(raw, "bos_token_id", defaults["bos_token_id"], minimum=0, null=None),
            tie_word_embeddings=_bool(raw, "tie_word_embeddings", False),
            torch_dtype=get("torch_dtype") or get("dtype"),
            num_nextn_predict_layers=_int(raw, "num_nextn_predict_layers", 0, null=0),
        )
        try:
            cfg.check()
        except ConfigError as exc:
            key = str(exc).split(":", 1)[0]
            if key in absent:  # the value came from the defaults: say so, or the user hunts for it in vain
                kind = model_type or "deepseek_v3"
                raise ConfigError(f"{exc} (not in config.json: transformers' default for {kind}; set it)") from None
            raise
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if not path.parent.is_dir():
                raise ConfigError(
                    f"{path.parent}: no such directory (expected a Hugging Face model directory)"
                ) from None
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face model directory?)") from None
        except NotADirectoryError:
            raise ConfigError(f"{path.parent}: not a directory (expected a Hugging Face model directory)") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {_JSON_TYPES.get(type(raw), 'null')}")
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


_MISSING = object()
#: The largest int a config value may hold: sizes become tensor shapes, which are int64.
_INT64_MAX = 2**63 - 1
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _shown(value: Any) -> str:
    """``value`` as config.json writes it (``true``, ``null``, ``"abc"``), for error messages."""
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown if len(shown) <= 80 else f"{shown[:60]}... ({len(shown)} characters)"


def _int(raw: Mapping[str, Any], key: str, default: Any, *, minimum: int = 0, null: Any = _MISSING) -> Any:
    """``raw[key]`` (``default`` when absent; ``null`` when JSON null, if null is allowed), an int (not
    a bool) ``>= minimum``."""
    value = raw.get(key, default)
    if value is None and null is not _MISSING:
        return null
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= _INT64_MAX:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        what += " (at most 2**63 - 1)" if isinstance(value, int) and value > _INT64_MAX else ""
        raise ConfigError(f"{key}: expected {what}{' or null' if null is not _MISSING else ''}, got {_shown(value)}")
    return value


def _float(
    raw: Mapping[str, Any], key: str, default: float, *, above: float = 0.0, zero: bool = False, where: str = ""
) -> float:
    """``raw[key]`` (``default`` when absent), a finite number ``> above`` (``>= 0`` with ``zero``);
    ``where`` prefixes the key's section in the error."""
    value = raw.get(key, default)
    try:  # math.isfinite raises on an int beyond float's range (JSON allows any number of digits)
        number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    except OverflowError:
        number = False
    if not number or not (value > above or (zero and value == 0)):
        bound = ">= 0" if zero else f"> {above:g}"
        raise ConfigError(f"{where}{key}: expected a finite number {bound}, got {_shown(value)}")
    return float(value)


def _bool(raw: Mapping[str, Any], key: str, default: bool, *, where: str = "") -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}{key}: expected true or false, got {_shown(value)}")
    return value


def _token_ids(raw: Mapping[str, Any], key: str, default: Any) -> tuple[int, ...]:
    """``raw[key]`` (``default`` when absent): ``null`` (none), one id, or a list of ids (each a
    non-negative int)."""
    value = raw.get(key, default)
    ids = [] if value is None else list(value) if isinstance(value, list | tuple) else [value]
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
        raise ConfigError(f"{key}: expected null, a token id or a list of token ids, got {_shown(value)}")
    return tuple(ids)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope(raw: Mapping[str, Any], max_positions: int) -> dict[str, Any]:
    """The RoPE parameters from ``rope_parameters`` (transformers 5) or ``rope_scaling`` (DeepSeek), each
    value checked; an error names the section the value came from. ``max_positions`` is the config's
    ``max_position_embeddings`` (YaRN's factor when none is given)."""
    sections = {key: raw.get(key) for key in ("rope_parameters", "rope_scaling")}
    for key, section in sections.items():
        if section is not None and not isinstance(section, Mapping):
            raise ConfigError(f"{key}: expected an object or null, got {_shown(section)}")
    params = dict(sections["rope_parameters"] or {})
    if sections["rope_scaling"]:
        params.update(sections["rope_scaling"])
    where = "rope_scaling." if sections["rope_scaling"] else "rope_parameters."
    # The base must exceed 1: the frequencies are base ** -(2i / d) and YaRN divides by log(base).
    if "rope_theta" in params:
        params["rope_theta"] = _float(params, "rope_theta", 10000.0, above=1.0, where=where)
    else:  # DeepSeek's config.json keeps it at the top level
        params["rope_theta"] = _float(raw, "rope_theta", 10000.0, above=1.0)
    rope_type = params.pop("type", None) or params.get("rope_type")
    if rope_type is None and params.get("factor") is not None:
        raise ConfigError(f"{where}rope_type: missing, but a scaling factor is given (expected 'yarn' or no factor)")
    params["rope_type"] = rope_type = rope_type or "default"
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"{where}rope_type: only 'default' and 'yarn' are implemented, got {rope_type!r}")
    if rope_type != "yarn":
        return params
    # As transformers: without it, YaRN's pretraining length is max_position_embeddings.
    original = params.get("original_max_position_embeddings")
    if original is None:
        original = max_positions
    if isinstance(original, float) and original.is_integer():  # 4096.0: transformers computes with it as is
        original = int(original)
    if not isinstance(original, int) or isinstance(original, bool) or not 1 <= original <= _INT64_MAX:
        raise ConfigError(f"{where}original_max_position_embeddings: expected a positive int, got {_shown(original)}")
    params["original_max_position_embeddings"] = original
    if params.get("factor") is None:  # as transformers: the ratio of the context lengths
        params["factor"] = max_positions / original
    params["factor"] = _float(params, "factor", 1.0, where=where)
    for key in ("beta_fast", "beta_slow", "attention_factor"):  # null: the default
        if params.get(key) is not None:
            params[key] = _float(params, key, 1.0, where=where)
    for key in ("mscale", "mscale_all_dim"):  # 0 or null turns the correction off
        if params.get(key) is not None:
            params[key] = _float(params, key, 0.0, zero=True, where=where)
    if "truncate" in params:
        _bool(params, "truncate", True, where=where)
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
