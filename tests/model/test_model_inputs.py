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
    with pytest.raises(ModelError, match=r"decode: sequence ids must be distinct, \['a'\] repeat"):
        model.decode(cache, ["a", "a"], [5, 6])
    with pytest.raises(ModelError, match=r"prefill: sequences \['b'\] are in the cache already"):
        model.prefill(cache, ["c", "b"], [[1], [2]])
    with pytest.raises(ModelError, match=r"prefill: sequence ids must be distinct"):
        model.prefill(cache, ["c", "c"], [[1], [2]])
    assert "c" not in cache and cache.seq_len("a") == 2 and cache.seq_len("b") == 1 and cache.num_used_blocks == 2


def test_decode_cache_full_changes_nothing(model: DeepseekModel) -> None:
    cache = model.new_cache(1)
    model.prefill(cache, ["a"], [[1] * 64])
    with pytest.raises(KVCacheExhaustedError, match="need a new block"):
        model.decode(cache, ["a"], [5])
    assert cache.seq_len("a") == 64


def test_unsupported_dtype(model: DeepseekModel) -> None:
    with pytest.raises(ModelError, match="dtype"):
        DeepseekModel(model.cfg, model.backend, random_state_dict(model.cfg), dtype=torch.float64)


def test_the_rotary_table_grows_with_the_positions_and_gives_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table starts small (a config may declare 10^6+ positions) and doubles on demand; a model
    whose table had to grow several times computes exactly what one with the table in place does."""
    from hal.model import deepseek
    from hal.model.generate import generate
    from hal.model.rope import cos_sin_cache

    cfg = tiny_config(max_position_embeddings=10**9)  # a whole table would be 10^9 rows
    weights = random_state_dict(cfg, seed=5)
    cpu = hal.get_backend("cpu")
    whole = DeepseekModel(cfg, cpu, weights)
    assert whole._cos_sin.shape[0] == deepseek.ROPE_ROWS
    monkeypatch.setattr(deepseek, "ROPE_ROWS", 4)
    growing = DeepseekModel(cfg, cpu, weights)
    assert growing._cos_sin.shape[0] == 4
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    want = generate(whole, prompts, max_new_tokens=12)
    got = generate(growing, prompts, max_new_tokens=12)
    assert got.tokens == want.tokens
    assert growing._cos_sin.shape[0] == 32  # 4 -> 8 (prefill, last position 5) -> 16 -> 32 (position 16)
    assert torch.equal(growing._cos_sin, cos_sin_cache(cfg, max_position=32))
    capped = DeepseekModel(tiny_config(max_position_embeddings=6), cpu, random_state_dict(tiny_config(), seed=5))
    assert capped._rope_table(5).shape[0] == 6  # never past max_position_embeddings
