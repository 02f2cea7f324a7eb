"""Tests of :mod:`hal.model.loader`: Hugging Face safetensors directories in, checked weights out.

Checkpoints come from two places: transformers' own ``DeepseekV3ForCausalLM.save_pretrained`` (the real
key layout, single-file and sharded), and :func:`hal.model.loader.save_fp8_checkpoint` on a config with
hidden 256 (DeepSeek's FP8 format needs K a multiple of 128). Every broken checkpoint must fail with a
:class:`ModelLoadError` naming the directory, the file and the keys. Only ``test_load_model_builds_model``
needs :class:`hal.model.deepseek.DeepseekModel` itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hal
from hal.backend import Backend
from hal.model.config import ModelConfig
from hal.model.loader import ModelLoadError, load_model, load_weights, save_fp8_checkpoint
from hal.model.weights import Fp8Weight, Int8Weight, expected_shapes, is_linear, random_state_dict
from hal.quant import dequantize_fp8_blocks, quantize_fp8_blocks

transformers = pytest.importorskip("transformers")

# transformers' tiny DeepSeek-V3: q LoRA, one dense layer then MoE layers with a shared expert.
HF_TINY: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "n_shared_experts": 1,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}

# Hidden 256 so most linear weights have K % 128 == 0; moe_intermediate 64 (the experts' down_proj K) and
# v_head_dim 48 (o_proj K = 4 * 48 = 192) are not, so both sides of the K rule are exercised.
FP8_RAW: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 384,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
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
    "v_head_dim": 48,
    "max_position_embeddings": 512,
}


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return is_linear(name) and shape[-1] % 128 == 0


# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One transformers model saved twice: one ``model.safetensors``, and shards with an index."""
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**HF_TINY))
    root = tmp_path_factory.mktemp("hf")
    single, sharded = root / "single", root / "sharded"
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20KB")
    # The file, not model.state_dict(): transformers 5 fuses the experts in memory and splits them on save.
    state = load_file(str(single / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in state
    return {"single": single, "sharded": sharded, "state": state, "cfg": ModelConfig.from_file(single / "config.json")}


@pytest.fixture
def single_copy(hf_dirs: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the single-file checkpoint, for tests that break it."""
    return Path(shutil.copytree(hf_dirs["single"], tmp_path / "model"))


@pytest.fixture(scope="module")
def fp8_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Random fp32 weights for FP8_RAW, written plain and as a DeepSeek FP8 checkpoint."""
    cfg = ModelConfig.from_dict(FP8_RAW)
    weights = random_state_dict(cfg, seed=1)
    root = tmp_path_factory.mktemp("fp8")
    plain = root / "plain"
    plain.mkdir()
    save_file(weights, str(plain / "model.safetensors"))
    (plain / "config.json").write_text(json.dumps(FP8_RAW))
    fp8 = save_fp8_checkpoint(weights, FP8_RAW, root / "fp8")
    return {"cfg": cfg, "weights": weights, "plain": plain, "fp8": fp8}


def _rewrite(path: Path, edit: dict[str, torch.Tensor | None]) -> None:
    """Rewrite a safetensors file with keys added or replaced (a tensor) or removed (``None``)."""
    tensors = load_file(str(path))
    for key, value in edit.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, str(path))


# ---------------------------------------------------------------------------------------------------
# Plain checkpoints
# ---------------------------------------------------------------------------------------------------


def test_single_and_sharded_give_the_checkpoint(hf_dirs: dict[str, Any]) -> None:
    cfg, state = hf_dirs["cfg"], hf_dirs["state"]
    assert (hf_dirs["sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(hf_dirs["sharded"].glob("*.safetensors"))) > 1
    single = load_weights(hf_dirs["single"], cfg, progress=False)
    sharded = load_weights(hf_dirs["sharded"], cfg, progress=False)
    assert list(single) == list(expected_shapes(cfg))
    assert list(sharded) == list(single)
    for name, w in single.items():
        assert isinstance(w, torch.Tensor) and w.dtype == torch.float32, name
        assert torch.equal(w, state[name]), name
        assert torch.equal(sharded[name], w), name


def test_shards_without_index(hf_dirs: dict[str, Any], tmp_path: Path) -> None:
    """With neither model.safetensors nor an index, every *.safetensors of the directory is read."""
    d = Path(shutil.copytree(hf_dirs["sharded"], tmp_path / "m"))
    (d / "model.safetensors.index.json").unlink()
    weights = load_weights(d, hf_dirs["cfg"], progress=False)
    for name, w in weights.items():
        assert torch.equal(w, hf_dirs["state"][name]), name


def test_dtype_cast(hf_dirs: dict[str, Any]) -> None:
    weights = load_weights(hf_dirs["single"], hf_dirs["cfg"], dtype=torch.bfloat16, progress=False)
    biases = [n for n in weights if n.endswith("e_score_correction_bias")]
    assert biases  # the MoE layers' routing bias is there, and stays float32
    for name, w in weights.items():
        assert isinstance(w, torch.Tensor)
        want = torch.float32 if name in biases else torch.bfloat16
        assert w.dtype == want, name
        assert torch.equal(w, hf_dirs["state"][name].to(want)), name


def test_mtp_layers_are_skipped_with_one_log_line(
    hf_dirs: dict[str, Any], single_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = hf_dirs["cfg"]
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    _rewrite(
        single_copy / "model.safetensors",
        {
            mtp + "eh_proj.weight": torch.zeros(64, 128),
            mtp + "enorm.weight": torch.ones(64),
            mtp + "self_attn.o_proj.weight": torch.zeros(64, 64).to(torch.float8_e4m3fn),
            mtp + "self_attn.o_proj.weight_scale_inv": torch.ones(1, 1),
        },
    )
    caplog.set_level(logging.INFO, logger="hal")
    weights = load_weights(single_copy, cfg, progress=False)
    assert not any(k.startswith(mtp) for k in weights)
    lines = [r.getMessage() for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(lines) == 1
    assert "skipped 4 tensors of 1 multi-token-prediction layer" in lines[0]


def test_layers_past_the_config_are_unexpected_unless_mtp(hf_dirs: dict[str, Any], single_copy: Path) -> None:
    """A config with fewer layers than the checkpoint must not run a truncated model: a later layer is
    skipped only as a multi-token-prediction layer, which has MTP's ``eh_proj``."""
    cfg = hf_dirs["cfg"]
    extra = f"model.layers.{cfg.num_hidden_layers}.input_layernorm.weight"
    far = f"model.layers.{cfg.num_hidden_layers + 5}.garbage"
    _rewrite(single_copy / "model.safetensors", {extra: torch.ones(64), far: torch.ones(3)})
    with pytest.raises(ModelLoadError, match="2 unexpected") as err:
        load_weights(single_copy, cfg, progress=False)
    assert extra in str(err.value) and far in str(err.value)
    # A truncated config: the checkpoint's last real layer is unexpected, listed by name.
    _rewrite(single_copy / "model.safetensors", {extra: None, far: None})
    short = dataclasses.replace(cfg, num_hidden_layers=cfg.num_hidden_layers - 1)
    with pytest.raises(ModelLoadError, match="unexpected") as err:
        load_weights(single_copy, short, progress=False)
    assert f"model.layers.{short.num_hidden_layers}." in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Broken checkpoints
# ---------------------------------------------------------------------------------------------------


def test_missing_key(hf_dirs: dict[str, Any], single_copy: Path) -> None:
    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(single_copy / "model.safetensors", {gone: None})
    with pytest.raises(ModelLoadError, match="1 missing") as info:
        load_weights(single_copy, hf_dirs["cfg"], progress=False)
    assert gone in str(info.value) and str(single_copy) in str(info.value)


def test_many_missing_keys_are_summarized(hf_dirs: dict[str, Any], tmp_path: Path) -> None:
    """A checkpoint of another model: the message lists the first 20 names and counts the rest."""
    cfg = dataclasses.replace(hf_dirs["cfg"], first_k_dense_replace=0)  # layer 0's experts are not there
    with pytest.raises(ModelLoadError, match=r"missing: .* and \d+ more") as info:
        load_weights(hf_dirs["single"], cfg, progress=False)
    assert "model.layers.0.mlp.experts.0.down_proj.weight" in str(info.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num_hidden_layers": 10**8}, r"num_hidden_layers is 100000000, but the checkpoint holds layers 0\.\.2"),
        ({"n_routed_experts": 10**8}, r"n_routed_experts is 100000000, but the checkpoint holds experts 0\.\.7"),
        ({"num_hidden_layers": 4}, r"num_hidden_layers is 4, but the checkpoint holds layers 0\.\.2"),
    ],
    ids=str,
)
def test_a_config_larger_than_its_checkpoint_is_named(hf_dirs: dict[str, Any], change: dict, match: str) -> None:
    # Before the expected keys are listed: 10**8 layers' or experts' names would exhaust the memory.
    cfg = dataclasses.replace(hf_dirs["cfg"], **change)
    with pytest.raises(ModelLoadError, match="config.json does not match the checkpoint: " + match):
        load_weights(hf_dirs["single"], cfg, progress=False)


def test_a_non_finite_routing_bias_is_refused(hf_dirs: dict[str, Any], single_copy: Path) -> None:
    name = next(k for k in hf_dirs["state"] if k.endswith("e_score_correction_bias"))
    bias = hf_dirs["state"][name].clone()
    bias[1] = float("nan")
    _rewrite(single_copy / "model.safetensors", {name: bias})
    with pytest.raises(ModelLoadError, match=rf"{name}: holds NaN or inf; the routing bias must be finite"):
        load_weights(single_copy, hf_dirs["cfg"], progress=False)


def _write_raw(path: Path, tensors: dict[str, torch.Tensor], raw: dict[str, tuple[str, list[int], bytes]]) -> None:
    """Write a safetensors file by hand, with ``raw`` entries (header dtype, shape, data) in dtypes
    ``save_file`` cannot write (float4, ...) replacing or joining ``tensors``."""
    import struct

    entries = {k: ("F32", list(t.shape), t.float().numpy().tobytes()) for k, t in tensors.items()} | raw
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for key, (dtype, shape, data) in entries.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_dtypes_are_checked_from_the_headers(
    hf_dirs: dict[str, Any], single_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every tensor of the wrong dtype is listed in one error, before any tensor data is read (no
    # progress line): float4 (a float torch cannot convert), an integer weight, an E5M2 "FP8" weight.
    path = single_copy / "model.safetensors"
    tensors = load_file(str(path))
    late = "model.layers.2.mlp.shared_experts.down_proj.weight"  # one of the last keys read
    e5m2 = "model.layers.1.self_attn.o_proj.weight"
    raw = {
        "model.norm.weight": ("F4", [64], bytes(32)),
        late: ("I32", list(tensors[late].shape), tensors[late].to(torch.int32).numpy().tobytes()),
        e5m2: ("F8_E5M2", list(tensors[e5m2].shape), bytes(tensors[e5m2].numel())),
        e5m2 + "_scale_inv": ("F32", [1, 1], torch.ones(1).numpy().tobytes()),
    }
    _write_raw(path, tensors, raw)
    with pytest.raises(ModelLoadError, match=r"the checkpoint does not match config\.json") as info:
        load_weights(single_copy, hf_dirs["cfg"], progress=True)
    msg = str(info.value)
    assert "model.norm.weight: stored as F4; expected F32, BF16, F16 or F64" in msg
    assert f"{late}: stored as I32; expected F32, BF16, F16 or F64" in msg
    assert f"{e5m2}: stored as F8_E5M2; FP8 weights must be F8_E4M3 or F8_E4M3FNUZ" in msg
    assert "loading" not in capsys.readouterr().err  # refused from the headers: no tensor was read


def test_fp8_scale_dtypes_are_checked_from_the_headers(fp8_setup: dict[str, Any], tmp_path: Path) -> None:
    # A scale beside a weight that is not FP8 (bytes stored as U8), and a scale in an integer format.
    d = Path(shutil.copytree(fp8_setup["fp8"], tmp_path / "m"))
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    u8 = "model.layers.0.mlp.down_proj.weight"
    int_scale = "model.layers.1.self_attn.q_a_proj.weight_scale_inv"
    kept = {k: t for k, t in tensors.items() if k not in (u8, int_scale) and t.dtype == torch.float32}
    raw = {  # the FP8 weights as they are, with the two broken entries
        k: ("F8_E4M3", list(t.shape), t.view(torch.uint8).numpy().tobytes())
        for k, t in tensors.items()
        if t.dtype == torch.float8_e4m3fn and k != u8
    }
    raw[u8] = ("U8", list(tensors[u8].shape), tensors[u8].view(torch.uint8).numpy().tobytes())
    raw[int_scale] = ("I32", list(tensors[int_scale].shape), bytes(4 * tensors[int_scale].numel()))
    _write_raw(path, kept, raw)
    with pytest.raises(ModelLoadError) as info:
        load_weights(d, fp8_setup["cfg"], progress=False)
    msg = str(info.value)
    assert f"{u8}_scale_inv: an FP8 scale, but {u8} is stored as U8, not as F8_E4M3" in msg
    assert f"{u8}: stored as U8; expected F32" in msg
    assert f"{int_scale}: stored as I32; a scale must be F32" in msg


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["fp8", "dequantize", "int8"])
def test_fp8_scales_must_be_finite_and_not_negative(
    fp8_setup: dict[str, Any], tmp_path: Path, value: float, mode: str
) -> None:
    # A negative scale gives finite garbage no later check catches; NaN and inf poison the block. (A zero
    # scale is a block of zeros: accepted, below.)
    d = Path(shutil.copytree(fp8_setup["fp8"], tmp_path / "m"))
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    scale = load_file(str(d / "model.safetensors"))[key].clone()
    scale.view(-1)[0] = value
    _rewrite(d / "model.safetensors", {key: scale})
    kwargs = {"fp8": {}, "dequantize": {"dequantize_fp8": True}, "int8": {"quantize": "int8", "fp8_to_int8": True}}
    with pytest.raises(ModelLoadError, match=rf"{key}: 1 of {scale.numel()} scales are negative, NaN or inf"):
        load_weights(d, fp8_setup["cfg"], progress=False, **kwargs[mode])


def test_a_zero_fp8_scale_is_a_block_of_zeros(fp8_setup: dict[str, Any], tmp_path: Path) -> None:
    d = Path(shutil.copytree(fp8_setup["fp8"], tmp_path / "m"))
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    scale = load_file(str(d / "model.safetensors"))[key].clone()
    scale.view(-1)[0] = 0.0
    _rewrite(d / "model.safetensors", {key: scale})
    w = load_weights(d, fp8_setup["cfg"], progress=False, dequantize_fp8=True)[key.removesuffix("_scale_inv")]
    assert isinstance(w, torch.Tensor) and bool((w[:128, :128] == 0).all()) and bool((w[128:] != 0).any())


def test_unexpected_key(hf_dirs: dict[str, Any], single_copy: Path) -> None:
    _rewrite(single_copy / "model.safetensors", {"model.layers.0.self_attn.rotary.extra": torch.zeros(3)})
    with pytest.raises(ModelLoadError, match="1 unexpected") as info:
        load_weights(single_copy, hf_dirs["cfg"], progress=False)
    assert "model.layers.0.self_attn.rotary.extra" in str(info.value)


def test_shape_mismatch(hf_dirs: dict[str, Any], single_copy: Path) -> None:
    _rewrite(
        single_copy / "model.safetensors",
        {"model.layers.2.self_attn.kv_b_proj.weight": torch.zeros(128, 31), "model.norm.weight": torch.ones(65)},
    )
    with pytest.raises(ModelLoadError, match="2 with the wrong shape") as info:
        load_weights(single_copy, hf_dirs["cfg"], progress=False)
    msg = str(info.value)
    assert "model.layers.2.self_attn.kv_b_proj.weight: expected [128, 32], got [128, 31]" in msg
    assert "model.norm.weight: expected [64], got [65]" in msg


def test_truncated_file(hf_dirs: dict[str, Any], single_copy: Path) -> None:
    path = single_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as info:
        load_weights(single_copy, hf_dirs["cfg"], progress=False)
    assert str(path) in str(info.value)


def test_garbage_header(hf_dirs: dict[str, Any], single_copy: Path) -> None:
    path = single_copy / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelLoadError) as info:
        load_weights(single_copy, hf_dirs["cfg"], progress=False)
    assert str(path) in str(info.value)


def test_no_safetensors_with_pickles(hf_dirs: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelLoadError, match="can run code") as info:
        load_weights(tmp_path, hf_dirs["cfg"], progress=False)
    assert "pytorch_model.bin" in str(info.value) and "safetensors only" in str(info.value)


def test_no_safetensors(hf_dirs: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors files") as info:
        load_weights(tmp_path, hf_dirs["cfg"], progress=False)
    assert "can run code" not in str(info.value)


def test_missing_directory(hf_dirs: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_weights(tmp_path / "nowhere", hf_dirs["cfg"], progress=False)


def test_missing_shard(hf_dirs: dict[str, Any], tmp_path: Path) -> None:
    d = Path(shutil.copytree(hf_dirs["sharded"], tmp_path / "m"))
    shard = sorted(d.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match="missing") as info:
        load_weights(d, hf_dirs["cfg"], progress=False)
    assert shard.name in str(info.value) and "model.safetensors.index.json" in str(info.value)


def test_index_names_key_not_in_shard(hf_dirs: dict[str, Any], tmp_path: Path) -> None:
    d = Path(shutil.copytree(hf_dirs["sharded"], tmp_path / "m"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mystery.weight"] = next(iter(index["weight_map"].values()))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.mystery\.weight \(index says"):
        load_weights(d, hf_dirs["cfg"], progress=False)


@pytest.mark.parametrize(
    "shard", [None, 3, "", ".", "..", "../model.safetensors", "/etc/hostname", "sub/x.safetensors"]
)
def test_index_shards_must_be_file_names(hf_dirs: dict[str, Any], tmp_path: Path, shard: Any) -> None:
    # A shard outside the model directory is never opened; null or "." is named as what it is.
    d = Path(shutil.copytree(hf_dirs["sharded"], tmp_path / "m"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = "model.norm.weight"
    index["weight_map"][key] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=re.escape(f"{key} is placed in {json.dumps(shard)}, which is not a file")):
        load_weights(d, hf_dirs["cfg"], progress=False)


def test_empty_index(hf_dirs: dict[str, Any], tmp_path: Path) -> None:
    d = Path(shutil.copytree(hf_dirs["sharded"], tmp_path / "m"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(ModelLoadError, match="'weight_map' is empty"):
        load_weights(d, hf_dirs["cfg"], progress=False)


def test_bad_quantize_value(hf_dirs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"quantize: expected one of \[None, 'fp8', 'int8'\], got 'int4'"):
        load_weights(hf_dirs["single"], hf_dirs["cfg"], quantize="int4", progress=False)


# ---------------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------------


def test_fp8_checkpoint_format(fp8_setup: dict[str, Any]) -> None:
    """What save_fp8_checkpoint writes is DeepSeek's layout: fp8 weight + fp32 weight_scale_inv."""
    config = json.loads((fp8_setup["fp8"] / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(str(fp8_setup["fp8"] / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name, w in fp8_setup["weights"].items():
            sl = f.get_slice(name)
            if _quantizable(name, tuple(w.shape)):
                assert sl.get_dtype() == "F8_E4M3", name
                scale = f.get_slice(name + "_scale_inv")
                assert scale.get_dtype() == "F32"
                assert scale.get_shape() == [-(-w.shape[0] // 128), -(-w.shape[1] // 128)], name
            else:
                assert sl.get_dtype() == "F32", name
                assert name + "_scale_inv" not in keys


def test_fp8_checkpoint_round_trips(fp8_setup: dict[str, Any]) -> None:
    cfg, originals = fp8_setup["cfg"], fp8_setup["weights"]
    weights = load_weights(fp8_setup["fp8"], cfg, progress=False)
    n_fp8 = 0
    for name, w in originals.items():
        got = weights[name]
        if _quantizable(name, tuple(w.shape)):
            q, s = quantize_fp8_blocks(w)
            assert isinstance(got, Fp8Weight), name
            assert got.q.dtype == torch.float8_e4m3fn and got.scale.dtype == torch.float32
            assert torch.equal(got.q.view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(got.scale, s), name
            n_fp8 += 1
        else:
            assert isinstance(got, torch.Tensor) and torch.equal(got, w), name
    assert 0 < n_fp8 < sum(is_linear(n) for n in originals)


def test_fp8_checkpoint_dequantized(fp8_setup: dict[str, Any]) -> None:
    cfg, originals = fp8_setup["cfg"], fp8_setup["weights"]
    for dtype in (torch.float32, torch.bfloat16):
        weights = load_weights(fp8_setup["fp8"], cfg, dtype=dtype, dequantize_fp8=True, progress=False)
        for name, w in originals.items():
            got = weights[name]
            assert isinstance(got, torch.Tensor), name
            want_dtype = torch.float32 if name.endswith("e_score_correction_bias") else dtype
            assert got.dtype == want_dtype, name
            if _quantizable(name, tuple(w.shape)) and dtype == torch.float32:
                # 3 mantissa bits: 2^-4 relative, plus the subnormal floor of the block's scale.
                floor = w.abs().max() / 448 * 2.0**-9
                assert ((got - w).abs() <= w.abs() / 16 + floor).all(), name
                assert not torch.equal(got, w), name  # it really went through FP8
            elif dtype == torch.float32:
                assert torch.equal(got, w), name


def test_fp8_checkpoint_as_e4m3fnuz(fp8_setup: dict[str, Any]) -> None:
    """An e4m3fn checkpoint on an e4m3fnuz device: same values, bits kept, scales doubled."""
    fn = load_weights(fp8_setup["fp8"], fp8_setup["cfg"], progress=False)
    fnuz = load_weights(fp8_setup["fp8"], fp8_setup["cfg"], fp8_dtype=torch.float8_e4m3fnuz, progress=False)
    for name, w in fn.items():
        if isinstance(w, Fp8Weight):
            other = fnuz[name]
            assert isinstance(other, Fp8Weight) and other.q.dtype == torch.float8_e4m3fnuz
            assert torch.equal(dequantize_fp8_blocks(other.q, other.scale), dequantize_fp8_blocks(w.q, w.scale)), name


def test_fp8_weight_without_scale(fp8_setup: dict[str, Any], tmp_path: Path) -> None:
    d = Path(shutil.copytree(fp8_setup["fp8"], tmp_path / "m"))
    name = "model.layers.1.self_attn.q_a_proj.weight"
    _rewrite(d / "model.safetensors", {name + "_scale_inv": None})
    with pytest.raises(ModelLoadError, match="FP8 weight without its") as info:
        load_weights(d, fp8_setup["cfg"], progress=False)
    assert name + "_scale_inv" in str(info.value)


def test_fp8_blocks_other_than_128_are_named(fp8_setup: dict[str, Any], tmp_path: Path) -> None:
    d = Path(shutil.copytree(fp8_setup["fp8"], tmp_path / "m"))
    config = json.loads((d / "config.json").read_text())
    for blocks in ([64, 64], 128):
        config["quantization_config"]["weight_block_size"] = blocks
        (d / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match=r"quantization_config\.weight_block_size: only \[128, 128\]"):
            load_weights(d, fp8_setup["cfg"], progress=False)


def test_fp8_scale_of_wrong_shape(fp8_setup: dict[str, Any], tmp_path: Path) -> None:
    d = Path(shutil.copytree(fp8_setup["fp8"], tmp_path / "m"))
    key = "model.layers.0.mlp.down_proj.weight_scale_inv"  # [256, 384] -> [2, 3]
    _rewrite(d / "model.safetensors", {key: torch.ones(2, 2)})
    with pytest.raises(ModelLoadError, match=rf"{key}: expected \[2, 3\] .*got \[2, 2\]"):
        load_weights(d, fp8_setup["cfg"], progress=False)


def test_quantize_on_load(fp8_setup: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    cfg, originals = fp8_setup["cfg"], fp8_setup["weights"]
    caplog.set_level(logging.INFO, logger="hal")
    weights = load_weights(fp8_setup["plain"], cfg, quantize="fp8", progress=False)
    left = 0
    for name, w in originals.items():
        got = weights[name]
        if _quantizable(name, tuple(w.shape)):
            q, s = quantize_fp8_blocks(w)
            assert isinstance(got, Fp8Weight), name
            assert torch.equal(got.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(got.scale, s), name
        else:
            assert isinstance(got, torch.Tensor) and torch.equal(got, w), name
            left += is_linear(name)
    # o_proj (K = 192) in both layers, the experts' and shared expert's down_proj (K = 64) in layer 1.
    assert left == 2 + 4 + 1
    assert any(f"left {left} linear weights" in r.getMessage() for r in caplog.records)
    fnuz = load_weights(fp8_setup["plain"], cfg, quantize="fp8", fp8_dtype=torch.float8_e4m3fnuz, progress=False)
    q_a = fnuz["model.layers.0.self_attn.q_a_proj.weight"]
    assert isinstance(q_a, Fp8Weight) and q_a.q.dtype == torch.float8_e4m3fnuz


# ---------------------------------------------------------------------------------------------------
# Progress display and load_model
# ---------------------------------------------------------------------------------------------------


def test_int8_of_a_nan_weight_is_not_zeros(fp8_setup: dict[str, Any], tmp_path: Path) -> None:
    # A NaN in a weight survives INT8 conversion: generation then stops on non-finite logits instead of
    # running the model with that row zeroed. (An FP8 checkpoint's NaN scale is refused at load, above.)
    from hal.model.generate import NonFiniteLogitsError, generate

    d = Path(shutil.copytree(fp8_setup["plain"], tmp_path / "plain"))
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors = load_file(str(d / "model.safetensors"))
    broken = tensors[name].clone()
    broken.view(-1)[0] = float("nan")
    _rewrite(d / "model.safetensors", {name: broken})
    model = load_model(d, hal.get_backend("cpu"), quantize="int8", progress=False)
    with pytest.raises(NonFiniteLogitsError, match="prefill"):
        generate(model, [[1, 2, 3]], max_new_tokens=2)


def test_int8_of_an_fp8_checkpoint_counts_the_converted_weights(
    fp8_setup: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hal")
    weights = load_weights(fp8_setup["fp8"], fp8_setup["cfg"], quantize="int8", fp8_to_int8=True, progress=False)
    n = sum(isinstance(w, Int8Weight) for w in weights.values())
    assert n > 0 and f"quantized {n} linear weights to W8A8 INT8" in caplog.text


def test_progress_line(hf_dirs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    n = len(expected_shapes(hf_dirs["cfg"]))
    load_weights(hf_dirs["single"], hf_dirs["cfg"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{n}/{n} tensors [" in err and "\r" not in err
    load_weights(hf_dirs["single"], hf_dirs["cfg"], progress=False)
    assert capsys.readouterr().err == ""


def _without_fp8(backend: Backend, *, int8: bool = False) -> Backend:
    caps = dataclasses.replace(backend.capabilities, fp8_format=None, int8=int8)
    return Backend(backend.name + "-nofp8", backend.device, caps, backend.table)


def test_load_model_quantize_needs_fp8(hf_dirs: dict[str, Any]) -> None:
    backend = _without_fp8(hal.get_backend("cpu"))
    with pytest.raises(ModelLoadError, match="needs FP8 arithmetic"):
        load_model(hf_dirs["single"], backend, quantize="fp8", progress=False)


def test_load_model_builds_model(hf_dirs: dict[str, Any], fp8_setup: dict[str, Any]) -> None:
    """The only test here that builds the model: an FP8 checkpoint is kept FP8 on an FP8 backend,
    converted to W8A8 INT8 on one with INT8 only, dequantized on one with neither."""
    from hal.model.deepseek import DeepseekModel

    cpu = hal.get_backend("cpu")
    model = load_model(hf_dirs["single"], cpu, progress=False)
    assert isinstance(model, DeepseekModel)
    fp8_model = load_model(fp8_setup["fp8"], cpu, progress=False)
    int8_model = load_model(fp8_setup["fp8"], _without_fp8(cpu, int8=True), progress=False)
    plain_model = load_model(fp8_setup["fp8"], _without_fp8(cpu), progress=False)
    # kv_a_proj has K = hidden_size, a multiple of 128, so the checkpoint stores it in FP8.
    kinds = [{type(layer.attn.kv_a) for layer in m.layers} for m in (fp8_model, int8_model, plain_model)]
    assert kinds == [{Fp8Weight}, {Int8Weight}, {torch.Tensor}]
    assert fp8_model.linear_weight_bytes < plain_model.linear_weight_bytes
    assert int8_model.linear_weight_bytes < plain_model.linear_weight_bytes
    # INT8 asked for on an FP8 backend: the FP8 checkpoint's weights are converted, not kept FP8.
    asked = load_model(fp8_setup["fp8"], cpu, quantize="int8", progress=False)
    assert {type(layer.attn.kv_a) for layer in asked.layers} == {Int8Weight}
