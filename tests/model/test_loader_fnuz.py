"""A DeepSeek e4m3fn checkpoint on an e4m3fnuz device (MI300, gfx942): converted on load, same values.

The checkpoint is written by :func:`hal.model.loader.save_fp8_checkpoint` from random weights (no
transformers needed); one weight is then overwritten with all 256 e4m3fn codes, so -0 and both NaNs go
through the loader too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import hal
from hal.backend import Backend
from hal.model.config import ModelConfig
from hal.model.loader import load_model, load_weights, save_fp8_checkpoint
from hal.model.weights import Fp8Weight, random_state_dict
from hal.quant import dequantize_fp8_blocks

# Hidden 256 so the attention and dense projections have K % 128 == 0 and are stored as FP8.
RAW: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "vocab_size": 128,
    "hidden_size": 256,
    "intermediate_size": 256,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 2,
    "topk_group": 1,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "max_position_embeddings": 256,
}

#: The weight that carries every e4m3fn code (``kv_a_proj_with_mqa``: [kv_lora_rank + rope, hidden]).
ALL_CODES_KEY = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ModelConfig.from_dict(RAW)
    root = save_fp8_checkpoint(random_state_dict(cfg, seed=3), RAW, tmp_path_factory.mktemp("fnuz") / "fp8")
    path = root / "model.safetensors"
    tensors = load_file(str(path))
    w = tensors[ALL_CODES_KEY]
    assert w.dtype == torch.float8_e4m3fn
    codes = torch.arange(w.numel(), dtype=torch.int64).remainder(256).to(torch.uint8)
    tensors[ALL_CODES_KEY] = codes.view(torch.float8_e4m3fn).reshape(w.shape)
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert json.loads((root / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    return root


def _fnuz(backend: Backend) -> Backend:
    """``backend`` as if its device computed in e4m3fnuz (what the ROCm backend reports on gfx942)."""
    caps = dataclasses.replace(backend.capabilities, fp8_format="e4m3fnuz", arch="gfx942")
    return Backend(backend.name + "-fnuz", backend.device, caps, backend.table)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other is NaN."""
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


def test_load_weights_converts_every_fp8_weight(checkpoint: Path) -> None:
    cfg = ModelConfig.from_file(checkpoint / "config.json")
    fn = load_weights(checkpoint, cfg, progress=False)
    fnuz = load_weights(checkpoint, cfg, fp8_dtype=torch.float8_e4m3fnuz, progress=False)
    n = 0
    for name, w in fn.items():
        if not isinstance(w, Fp8Weight):
            assert isinstance(fnuz[name], torch.Tensor) and torch.equal(fnuz[name], w), name
            continue
        got = fnuz[name]
        assert isinstance(got, Fp8Weight) and got.q.dtype == torch.float8_e4m3fnuz, name
        assert torch.equal(got.scale, w.scale * 2), name
        assert _same(dequantize_fp8_blocks(got.q, got.scale), dequantize_fp8_blocks(w.q, w.scale)), name
        n += 1
    assert n >= 8


def test_special_codes_through_the_loader(checkpoint: Path) -> None:
    """-0 becomes +0, e4m3fn's NaNs stay NaN (FNUZ's 0x80), no finite code changes value."""
    cfg = ModelConfig.from_file(checkpoint / "config.json")
    w = load_weights(checkpoint, cfg, fp8_dtype=torch.float8_e4m3fnuz, progress=False)[ALL_CODES_KEY]
    assert isinstance(w, Fp8Weight)
    src = load_file(str(checkpoint / "model.safetensors"))[ALL_CODES_KEY].view(torch.uint8).flatten()
    bits = w.q.view(torch.uint8).flatten()
    assert torch.equal(bits[src == 0x80], torch.zeros_like(bits[src == 0x80]))
    nan_in = (src == 0x7F) | (src == 0xFF)
    assert nan_in.any() and (bits[nan_in] == 0x80).all()
    assert torch.equal(w.q.float().isnan().flatten(), nan_in)
    keep = ~nan_in & (src != 0x80)
    assert torch.equal(bits[keep], src[keep])


def test_load_model_on_an_fnuz_backend(checkpoint: Path) -> None:
    """``load_model`` reads ``capabilities.fp8_format`` and converts: same dequantized weights in the model."""
    cpu = hal.get_backend("cpu")
    fn_model = load_model(checkpoint, cpu, progress=False)
    fnuz_model = load_model(checkpoint, _fnuz(cpu), progress=False)
    checked = 0
    for a, b in zip(fn_model.layers, fnuz_model.layers, strict=True):
        for field in ("q_a", "q_b", "kv_a", "kv_b", "o"):
            wa, wb = getattr(a.attn, field), getattr(b.attn, field)
            if not isinstance(wa, Fp8Weight):
                continue
            assert isinstance(wb, Fp8Weight) and wb.q.dtype == torch.float8_e4m3fnuz, field
            assert _same(dequantize_fp8_blocks(wb.q, wb.scale), dequantize_fp8_blocks(wa.q, wa.scale)), field
            checked += 1
    assert checked >= 4
