"""ModelConfig: reading DeepSeek's and transformers' config.json, and naming what is unsupported."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from hal.model.config import ConfigError, ModelConfig, tiny_config
from hal.model.rope import cos_sin_cache, inv_freq_and_factor

BASE: dict[str, Any] = tiny_config().to_dict()
RAW: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 256,
    "eos_token_id": 1,
}
YARN = {
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"model_type": "llama"}, "model_type"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"topk_method": "magic"}, "topk_method"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 3}, "topk_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"eos_token_id": 500}, "eos_token_id"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"type": "yarn", **YARN, "original_max_position_embeddings": 64.5}}, "original_max"),
        # Values of the wrong type or out of range: the key named, never a Python error.
        ({"vocab_size": True}, "vocab_size"),
        ({"n_routed_experts": "4"}, "n_routed_experts"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
        ({"rms_norm_eps": "abc"}, "rms_norm_eps"),
        ({"rms_norm_eps": -1}, "rms_norm_eps"),
        ({"routed_scaling_factor": "x"}, "routed_scaling_factor"),
        ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
        ({"rope_theta": 0}, "rope_theta"),
        ({"eos_token_id": "abc"}, "eos_token_id"),
        ({"eos_token_id": ["a"]}, "eos_token_id"),
        ({"rope_scaling": "yarn"}, "rope_scaling"),
        ({"rope_scaling": {"factor": 4.0}}, "rope_scaling.rope_type"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": "x"}}, "rope_parameters.rope_theta"),
        ({"rope_parameters": {"rope_type": "yarn", **YARN, "original_max_position_embeddings": "64"}}, "rope_param"),
        # Numbers beyond float's (and int64's) range: JSON allows any number of digits.
        ({"routed_scaling_factor": 10**400}, "routed_scaling_factor: expected a finite number"),
        ({"max_position_embeddings": 10**400}, "max_position_embeddings: expected a positive int (at most 2**63 - 1)"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2**64}}, "original_max"),
        ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 0}}, "original_max_position_embeddings"),
        ({"rope_scaling": {"type": "yarn", **YARN, "factor": "four"}}, "rope_scaling.factor"),
        ({"rope_scaling": {"type": "yarn", **YARN, "factor": -2}}, "rope_scaling.factor"),
        ({"rope_scaling": {"type": "yarn", **YARN, "mscale_all_dim": "x"}}, "rope_scaling.mscale_all_dim"),
        ({"rope_scaling": {"type": "yarn", **YARN, "truncate": "no"}}, "rope_scaling.truncate"),
        ({"rope_theta": 1}, "rope_theta: expected a finite number > 1"),  # YaRN divides by log(base)
        ({"attention_bias": "false"}, "attention_bias: expected true or false"),
        ({"num_key_value_heads": "4"}, "num_key_value_heads"),
        ({"ep_size": True}, "ep_size"),
        ({"moe_layer_freq": 2}, "moe_layer_freq: only 1"),
        ({"routed_scaling_factor": None}, "routed_scaling_factor: expected a finite number > 0, got null"),
        ({"norm_topk_prob": 1}, "norm_topk_prob: expected true or false, got 1"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else v,
)
def test_unsupported_values_are_named(change: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        ModelConfig.from_dict({**RAW, **change})


def test_rope_scaling_and_rope_parameters_read_the_same() -> None:
    deepseek = ModelConfig.from_dict({**RAW, "rope_theta": 5000.0, "rope_scaling": {"type": "yarn", **YARN}})
    hf5 = ModelConfig.from_dict({**RAW, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, **YARN}})
    assert deepseek.rope == hf5.rope
    assert deepseek.rope["rope_type"] == "yarn" and deepseek.rope["rope_theta"] == 5000.0


@pytest.mark.parametrize(
    ("yarn", "top"),
    [
        (YARN, {}),
        # No pretraining length anywhere: transformers takes max_position_embeddings.
        ({k: v for k, v in YARN.items() if k != "original_max_position_embeddings"}, {}),
        # A float that is an int: transformers computes with it as is.
        ({**YARN, "original_max_position_embeddings": 64.0}, {}),
    ],
    ids=["section", "absent", "float"],
)
def test_yarn_softmax_scale_and_tables_match_transformers(yarn: dict[str, Any], top: dict[str, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    ours = ModelConfig.from_dict({**RAW, **top, "rope_scaling": {"type": "yarn", **yarn}})
    hf = transformers.DeepseekV3Config(
        **{k: v for k, v in RAW.items() if k != "model_type"}, **top, rope_scaling={"rope_type": "yarn", **yarn}
    )
    assert ours.rope["original_max_position_embeddings"] == hf.rope_parameters["original_max_position_embeddings"]
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    our_inv, our_factor = inv_freq_and_factor(ours)
    torch.testing.assert_close(our_inv, inv, rtol=0, atol=0)
    assert our_factor == pytest.approx(factor)
    assert ours.softmax_scale == pytest.approx(yarn_apply_mscale(hf.rope_parameters, hf.qk_head_dim**-0.5))
    assert ours.softmax_scale != pytest.approx(ours.qk_head_dim**-0.5)  # the correction is real here


def test_cos_sin_cache_layout() -> None:
    cfg = ModelConfig.from_dict(RAW)
    table = cos_sin_cache(cfg, max_position=10)
    inv, _ = inv_freq_and_factor(cfg)
    assert table.shape == (10, cfg.qk_rope_head_dim) and table.dtype == torch.float32
    torch.testing.assert_close(table[3, : cfg.qk_rope_head_dim // 2], torch.cos(3 * inv))
    torch.testing.assert_close(table[3, cfg.qk_rope_head_dim // 2 :], torch.sin(3 * inv))


def test_from_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path / 'nowhere'))}: no such directory"):
        ModelConfig.from_file(tmp_path / "nowhere" / "config.json")
    (tmp_path / "file").write_text("{}")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path / 'file'))}: not a directory"):
        ModelConfig.from_file(tmp_path / "file" / "config.json")
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("null")
    with pytest.raises(ConfigError, match="expected a JSON object, got null"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # deeper than the parser recurses
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match="cannot be read"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").rmdir()
    (tmp_path / "config.json").write_text(json.dumps(RAW))
    assert ModelConfig.from_file(tmp_path / "config.json").eos_token_id == (1,)


def test_null_eos_never_stops_and_lists_are_kept() -> None:
    assert ModelConfig.from_dict({**RAW, "eos_token_id": None}).eos_token_id == ()
    assert ModelConfig.from_dict({**RAW, "eos_token_id": [1, 2]}).eos_token_id == (1, 2)


def test_tiny_config_covers_the_architecture() -> None:
    cfg = tiny_config()
    assert cfg.q_lora_rank is not None and cfg.n_group > 1 and cfg.rope["rope_type"] == "yarn"
    assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(1) and cfg.n_shared_experts == 1
    assert cfg == ModelConfig.from_dict({**BASE, "rope_scaling": dict(BASE["rope"]), "eos_token_id": None})


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_absent_keys_mean_what_transformers_makes_of_them(model_type: str) -> None:
    # The keys that change the output without changing a weight's shape: left out of config.json, they
    # take the values transformers' config class gives them (V2's config never writes scoring_func).
    transformers = pytest.importorskip("transformers")
    cls = {"deepseek_v3": transformers.DeepseekV3Config, "deepseek_v2": transformers.DeepseekV2Config}[model_type]
    hf = cls()
    keys = ("norm_topk_prob", "routed_scaling_factor", "rms_norm_eps", "max_position_embeddings", "bos_token_id")
    keys += ("eos_token_id", "n_group", "topk_group", "num_experts_per_tok")
    bare = {k: v for k, v in RAW.items() if k not in (*keys, "scoring_func", "topk_method", "rope_interleave")}
    bare["n_routed_experts"] = hf.n_routed_experts  # room for V3's default 8 groups, top-4 groups, top-8
    if model_type == "deepseek_v2":  # V2's defaults take no groups and no top-k: give the one that is required
        bare["num_experts_per_tok"] = RAW["num_experts_per_tok"]
        keys = keys[:-1]
    ours = ModelConfig.from_dict({**bare, "model_type": model_type})
    for key in keys:
        want = getattr(hf, key)
        want = {"eos_token_id": (want,), "n_group": want or 1, "topk_group": want or 1}.get(key, want)
        assert getattr(ours, key) == want, key
    # What transformers' routers always do (they read neither key).
    want = ("sigmoid", "noaux_tc") if model_type == "deepseek_v3" else ("softmax", hf.topk_method)
    assert (ours.scoring_func, ours.topk_method) == want
    assert ours.rope_interleave is getattr(hf, "rope_interleave", True)
    # Given keys win over the defaults.
    given = {"scoring_func": "sigmoid", "n_group": 1, "topk_group": 1, "eos_token_id": None}
    ours = ModelConfig.from_dict({**bare, "model_type": model_type, **given})
    assert (ours.scoring_func, ours.n_group, ours.topk_group, ours.eos_token_id) == ("sigmoid", 1, 1, ())
