"""DeepseekModel refuses bad weights and bad input before computing anything."""

from __future__ import annotations

import pytest
import torch

import hal
from hal.errors import KVCacheExhaustedError
from hal.model import DeepseekModel, ModelError, random_state_dict, tiny_config


@pytest.fixture(scope="module")
def model() -> DeepseekModel:
    import hal_cpu

    cfg = tiny_config(num_hidden_layers=2, max_position_embeddings=256)
    backend = hal.Registry(entry_points=False, plugins=[("cpu", hal_cpu)]).get_backend("cpu")
    return DeepseekModel(cfg, backend, random_state_dict(cfg))


def test_missing_unexpected_and_misshaped_weights_are_listed(model: DeepseekModel) -> None:
    weights = random_state_dict(model.cfg)
    del weights["model.layers.1.mlp.experts.3.up_proj.weight"]
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    weights["model.norm.weight"] = torch.ones(7)
    with pytest.raises(ModelError) as info:
        DeepseekModel(model.cfg, model.backend, weights)
    msg = str(info.value)
    assert "1 missing: model.layers.1.mlp.experts.3.up_proj.weight" in msg
    assert "1 unexpected: model.layers.0.self_attn.extra.weight" in msg
    assert "model.norm.weight: expected [256], got [7]" in msg


def test_ids_outside_the_vocabulary_are_refused_before_any_write(model: DeepseekModel) -> None:
    cache = model.new_cache(8)
    with pytest.raises(ModelError, match=r"outside the vocabulary \[0, 1024\)"):
        model.prefill(cache, ["a"], [[1, 2, 1024]])
    assert "a" not in cache and cache.num_used_blocks == 0


def test_prompt_longer_than_the_cache_changes_nothing(model: DeepseekModel) -> None:
    cache = model.new_cache(2)
    model.prefill(cache, ["a"], [[1] * 10])
    before = cache.layer(0).clone()
    with pytest.raises(KVCacheExhaustedError, match="need 2 blocks of 64 tokens, 1 are free"):
        model.prefill(cache, ["b", "c"], [[2] * 64, [3] * 5])
    assert "b" not in cache and "c" not in cache and cache.num_used_blocks == 1
    assert torch.equal(cache.layer(0), before)


def test_prompt_longer_than_positions_is_refused(model: DeepseekModel) -> None:
    with pytest.raises(ModelError, match="more than max_position_embeddings"):
        model.prefill(model.new_cache(8), ["a"], [[1] * 257])


def test_decode_needs_one_token_per_sequence(model: DeepseekModel) -> None:
    cache = model.new_cache(4)
    model.prefill(cache, ["a", "b"], [[1, 2], [3]])
    with pytest.raises(ModelError, match="one token per sequence"):
        model.decode(cache, ["a", "b"], [5])
    with pytest.raises(ModelError, match="outside the vocabulary"):
        model.decode(cache, ["a", "b"], [5, -1])
    assert cache.seq_len("a") == 2 and cache.seq_len("b") == 1  # nothing appended


def test_decode_cache_full_changes_nothing(model: DeepseekModel) -> None:
    cache = model.new_cache(1)
    model.prefill(cache, ["a"], [[1] * 64])
    with pytest.raises(KVCacheExhaustedError, match="need a new block"):
        model.decode(cache, ["a"], [5])
    assert cache.seq_len("a") == 64


def test_unsupported_dtype(model: DeepseekModel) -> None:
    with pytest.raises(ModelError, match="dtype"):
        DeepseekModel(model.cfg, model.backend, random_state_dict(model.cfg), dtype=torch.float64)
