"""Parity of HAL's DeepSeek-V3 model with transformers' ``DeepseekV3ForCausalLM`` (the reference).

Random tiny configs are built with transformers, their norms and routing bias perturbed away from the
initial ones and zeros (so both are really tested), saved with ``save_pretrained`` and loaded by HAL's
loader on the CPU backend. Checked: prefill logits of a batch of different prompt lengths, greedy
continuations, absorbed vs expanded MLA decode, FP8 (quantize at load, DeepSeek-format checkpoints) and
``hal run --json``.

``HAL_PARITY_BACKEND=NAME`` runs the checks that take the ``backend`` fixture on another installed
backend, without the project's conftest (which turns Triton's interpreter on), as on an H100::

    HAL_PARITY_BACKEND=nvidia python -m pytest -c /dev/null --confcutdir tests/model tests/model/test_parity.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import hal
import hal_cpu
from hal.model import DeepseekModel, Fp8Weight, ModelConfig
from hal.model.generate import generate
from hal.model.loader import load_model, load_weights, save_fp8_checkpoint
from hal.model.weights import is_linear
from hal.quant import dequantize_fp8_blocks, quantize_fp8_blocks

VOCAB = 128
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}
TINY: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 256,  # = factor x original_max_position_embeddings under YaRN
    # Larger than transformers' 0.02, so attention is far from uniform and routing far from ties.
    "initializer_range": 0.1,
    "eos_token_id": None,
    "bos_token_id": None,
    "pad_token_id": None,
}


def _variant(q_lora: bool, n_group: int, topk_group: int, dense: int, norm: bool, yarn: bool) -> dict[str, Any]:
    return {
        "q_lora_rank": 32 if q_lora else None,
        "n_group": n_group,
        "topk_group": topk_group,
        "first_k_dense_replace": dense,
        "num_hidden_layers": dense + 1,  # at least one MoE layer after the dense ones
        "norm_topk_prob": norm,
        "rope_scaling": dict(YARN) if yarn else None,
    }


# Every value of every feature at least once (not the full product).
CONFIGS: dict[str, dict[str, Any]] = {
    "qlora-group1-dense1-norm-yarn": _variant(True, 1, 1, 1, True, True),
    "noqlora-group4-dense2-nonorm-plain": _variant(False, 4, 2, 2, False, False),
    "qlora-group2-dense2-nonorm-yarn": _variant(True, 2, 1, 2, False, True),
    "noqlora-group2-dense1-norm-yarn": _variant(False, 2, 1, 1, True, True),
    "qlora-group4-dense1-norm-plain": _variant(True, 4, 3, 1, True, False),
}

# Different lengths; 40 + 32 generated tokens passes YaRN's original 64 positions and a 64-token cache block.
PROMPT_LENGTHS = (5, 17, 40)
NEW_TOKENS = 32
TOL = 1e-5


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` (on the CPU: one side may be on the backend's device)."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().cpu().flatten(), b.double().cpu().flatten(), dim=0))


def random_prompts(lengths: tuple[int, ...], seed: int, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def build_hf(out_dir: Path, seed: int, *, save_dtype: torch.dtype = torch.float32, **config: Any):
    """A seeded random ``DeepseekV3ForCausalLM`` with perturbed norms and routing bias, saved to
    ``out_dir`` (``save_pretrained``, in ``save_dtype``); returns the fp32 model in eval mode."""
    hf_cfg = DeepseekV3Config(**{**TINY, **config})
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    norms = biases = 0
    with torch.no_grad():
        for module in hf.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(1.0 + 0.3 * torch.randn(module.weight.shape, generator=g))
                norms += 1
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:
                # Router scores are sigmoids near 0.5 +- 0.1: a bias of this size changes the choices.
                bias.copy_(0.1 * torch.randn(bias.shape, generator=g))
                biases += 1
    moe_layers = hf_cfg.num_hidden_layers - hf_cfg.first_k_dense_replace
    assert norms >= 2 * hf_cfg.num_hidden_layers + 1 and biases == moe_layers >= 1
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = None
    hf.to(save_dtype).save_pretrained(out_dir)
    return hf.float()


def hf_logits(hf: DeepseekV3ForCausalLM, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt]), use_cache=False).logits[0].float()


def hf_greedy(hf: DeepseekV3ForCausalLM, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None
        )
    tokens = out[0, len(prompt) :].tolist()
    assert len(tokens) == new_tokens, f"transformers stopped early: {tokens}"
    return tokens


def first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"first difference at token {i}:\n  hal:          {a}\n  transformers: {b}"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these tensors are tiny, and on a busy 2-core machine torch's thread pool
    made every op wait (generation ran 30x slower with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backend() -> hal.Backend:
    """The cpu backend alone (no plugin discovery), unless ``HAL_PARITY_BACKEND`` names another."""
    name = os.environ.get("HAL_PARITY_BACKEND", "cpu")
    if name == "cpu":
        return hal.Registry(entry_points=False, plugins=[("cpu", hal_cpu)]).get_backend("cpu")
    return hal.Registry().get_backend(name)


@dataclass
class Tiny:
    name: str
    path: Path
    hf: DeepseekV3ForCausalLM


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    name = request.param
    path = tmp_path_factory.mktemp(name)
    hf = build_hf(path, seed=list(CONFIGS).index(name), **CONFIGS[name])
    return Tiny(name, path, hf)


# ---------------------------------------------------------------------------------------------------
# fp32 parity with transformers
# ---------------------------------------------------------------------------------------------------


def test_config_reads_the_variant(tiny: Tiny) -> None:
    """The loader's config matches what transformers built (a guard for the tests below)."""
    cfg = ModelConfig.from_file(tiny.path / "config.json")
    want = CONFIGS[tiny.name]
    assert cfg.q_lora_rank == want["q_lora_rank"]
    assert (cfg.n_group, cfg.topk_group) == (want["n_group"], want["topk_group"])
    assert cfg.first_k_dense_replace == want["first_k_dense_replace"]
    assert cfg.norm_topk_prob == want["norm_topk_prob"]
    assert cfg.rope["rope_type"] == ("yarn" if want["rope_scaling"] else "default")
    assert cfg.eos_token_id == ()


def test_prefill_logits_match_transformers(tiny: Tiny, backend: hal.Backend) -> None:
    model = load_model(tiny.path, backend, dtype=torch.float32, progress=False)
    prompts = random_prompts(PROMPT_LENGTHS, seed=1)
    cache = model.new_cache(8)
    ours = model.prefill(cache, [10, 11, 12], prompts, all_logits=True)
    assert ours.shape == (sum(PROMPT_LENGTHS), VOCAB) and ours.dtype == torch.float32
    start = 0
    for i, prompt in enumerate(prompts):
        ref = hf_logits(tiny.hf, prompt)
        err = rel_err(ours[start : start + len(prompt)], ref)
        assert err <= TOL, f"prompt {i} ({len(prompt)} tokens): relative error {err:.3g} > {TOL}"
        start += len(prompt)
    # Without all_logits: the last position of each prompt.
    last = model.prefill(model.new_cache(8), [0, 1, 2], prompts)
    ends = torch.tensor(PROMPT_LENGTHS).cumsum(0) - 1
    assert rel_err(last, ours[ends]) <= TOL


def test_greedy_generation_matches_transformers(tiny: Tiny, backend: hal.Backend) -> None:
    model = load_model(tiny.path, backend, dtype=torch.float32, progress=False)
    prompts = random_prompts(PROMPT_LENGTHS, seed=2)
    result = generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_ids=())
    assert result.finish_reasons == ["length"] * len(prompts)
    for i, prompt in enumerate(prompts):
        ref = hf_greedy(tiny.hf, prompt, NEW_TOKENS)
        assert result.tokens[i] == ref, f"prompt {i} ({len(prompt)} tokens): " + first_difference(result.tokens[i], ref)


def test_absorbed_decode_equals_expanded(tiny: Tiny, backend: hal.Backend) -> None:
    """Absorbed MLA decode (``mla_decode`` over the latent cache) equals the expanded computation from
    identical caches, step after step, and both equal transformers' logits of the whole sequence.
    The 62-token prompt crosses a 64-token cache block during the steps."""
    model = load_model(tiny.path, backend, dtype=torch.float32, progress=False)
    prompts = random_prompts((3, 62), seed=3)
    ids = ["a", "b"]
    absorbed, expanded = model.new_cache(4), model.new_cache(4)
    first = model.prefill(absorbed, ids, prompts)
    assert torch.equal(first, model.prefill(expanded, ids, prompts))
    seqs = [list(p) for p in prompts]
    tokens = first.argmax(-1).tolist()
    for step in range(6):
        for s, t in zip(seqs, tokens, strict=True):
            s.append(t)
        a = model.decode(absorbed, ids, tokens, absorbed=True)
        b = model.decode(expanded, ids, tokens, absorbed=False)
        err = rel_err(a, b)
        assert err <= TOL, f"step {step}: absorbed vs expanded relative error {err:.3g} > {TOL}"
        ref = torch.stack([hf_logits(tiny.hf, s)[-1] for s in seqs])
        err = rel_err(a, ref)
        assert err <= TOL, f"step {step}: absorbed decode vs transformers relative error {err:.3g} > {TOL}"
        tokens = a.argmax(-1).tolist()
    assert [absorbed.seq_len(i) for i in ids] == [len(s) for s in seqs]


# DeepSeek-V2 as transformers saves it: its config has no scoring_func (its router always takes the
# softmax, and greedy or group-limited top-k), so the loader must not fall back to V3's sigmoid.
V2_VARIANTS: dict[str, dict[str, Any]] = {
    "greedy": {"topk_method": "greedy"},
    "group-limited": {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
}


@pytest.mark.parametrize("variant", list(V2_VARIANTS))
def test_deepseek_v2_checkpoint_matches_transformers(variant: str, tmp_path: Path, backend: hal.Backend) -> None:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    v2 = {k: v for k, v in TINY.items() if k not in ("routed_scaling_factor", "max_position_embeddings")}
    cfg = DeepseekV2Config(**v2, num_hidden_layers=2, first_k_dense_replace=1, q_lora_rank=None, **V2_VARIANTS[variant])
    torch.manual_seed(20)
    hf = DeepseekV2ForCausalLM(cfg).eval()
    with torch.no_grad():  # routers far from uniform: top-k and the group choice are really tested
        for name, p in hf.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = None
    hf.save_pretrained(tmp_path)
    assert "scoring_func" not in json.loads((tmp_path / "config.json").read_text())

    model = load_model(tmp_path, backend, dtype=torch.float32, progress=False)
    assert model.cfg.scoring_func == "softmax"
    prompts = random_prompts((6, 19), seed=6)
    logits = model.prefill(model.new_cache(4), [0, 1], prompts, all_logits=True)
    start = 0
    for prompt in prompts:
        err = rel_err(logits[start : start + len(prompt)], hf_logits(hf, prompt))
        assert err <= TOL, f"{len(prompt)}-token prompt: relative error {err:.3g} > {TOL}"
        start += len(prompt)
    result = generate(model, prompts, max_new_tokens=12, temperature=0.0, eos_token_ids=())
    for i, prompt in enumerate(prompts):
        ref = hf_greedy(hf, prompt, 12)
        assert result.tokens[i] == ref, first_difference(result.tokens[i], ref)


# ---------------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------------

# Every linear weight's K (hidden 256, q/kv LoRA 128, heads x v_head 128, intermediates 256/128) is a
# multiple of 128, so every one of them is quantized.
FP8_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 256,
    "moe_intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "n_group": 2,
    "topk_group": 2,
    "norm_topk_prob": True,
    "rope_scaling": dict(YARN),
    # Every expert routed (top 8 of 8): the router's choice is discrete, and on a random router near-tied
    # scores flip under any rounding, bf16's included, which would measure the flips rather than FP8.
    # The routing weights stay continuous functions of the scores, and every FP8 expert runs.
    "num_experts_per_tok": 8,
    "initializer_range": 0.02,  # transformers' default
}
FP8_PROMPTS = random_prompts((7, 30), seed=4)


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The FP8-sized model saved twice: bf16 (``bf16``) and fp32 (``fp32``)."""
    bf16, fp32 = tmp_path_factory.mktemp("fp8-bf16"), tmp_path_factory.mktemp("fp8-fp32")
    build_hf(bf16, seed=7, save_dtype=torch.bfloat16, **FP8_CONFIG)
    build_hf(fp32, seed=7, **FP8_CONFIG)
    return {"bf16": bf16, "fp32": fp32}


def _all_logits(model: DeepseekModel, prompts: list[list[int]]) -> torch.Tensor:
    return model.prefill(model.new_cache(4), list(range(len(prompts))), prompts, all_logits=True)


def test_fp8_quantize_at_load_close_to_bf16(fp8_dirs: dict[str, Path], backend: hal.Backend) -> None:
    bf16 = load_model(fp8_dirs["bf16"], backend, dtype=torch.bfloat16, progress=False)
    fp8 = load_model(fp8_dirs["bf16"], backend, dtype=torch.bfloat16, quantize="fp8", progress=False)
    cos = cosine(_all_logits(fp8, FP8_PROMPTS), _all_logits(bf16, FP8_PROMPTS))
    ratio = fp8.linear_weight_bytes / bf16.linear_weight_bytes
    print(f"\nFP8 quantize-at-load vs bf16: logits cosine {cos:.6f}, linear weight bytes ratio {ratio:.4f}")
    assert cos >= 0.99, f"FP8 vs bf16 logits cosine similarity {cos:.6f} < 0.99"
    assert ratio <= 0.55, (
        f"FP8 linear weights take {ratio:.4f}x the bf16 ones ({fp8.linear_weight_bytes} vs "
        f"{bf16.linear_weight_bytes} bytes), more than 0.55x"
    )


def _write_fp8_checkpoint(src: Path, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A DeepSeek-format FP8 checkpoint written by hand from ``src`` (fp32): float8_e4m3fn ``weight`` plus
    fp32 ``weight_scale_inv`` per linear layer, in two shards with a ``model.safetensors.index.json``.

    :returns: ``(fp8, dequantized)``: the weights as ``Fp8Weight`` s and as their dequantized fp32 values.
    """
    tensors: dict[str, torch.Tensor] = {}
    fp8: dict[str, Any] = {}
    dequantized: dict[str, Any] = {}
    for name, w in load_file(src / "model.safetensors").items():
        if is_linear(name):
            assert w.shape[-1] % 128 == 0, name
            q, s = quantize_fp8_blocks(w, block=128, fp8_dtype=torch.float8_e4m3fn)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            fp8[name], dequantized[name] = Fp8Weight(q, s), dequantize_fp8_blocks(q, s)
        else:
            tensors[name] = fp8[name] = dequantized[name] = w
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    (out / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (out / "config.json").write_text(json.dumps(config))
    return fp8, dequantized


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def test_fp8_checkpoint_round_trips(fp8_dirs: dict[str, Path], backend: hal.Backend, tmp_path: Path) -> None:
    fp8, dequantized = _write_fp8_checkpoint(fp8_dirs["fp32"], tmp_path)
    cfg = ModelConfig.from_file(tmp_path / "config.json")

    # The FP8 data and scales come back bit for bit.
    loaded = load_weights(tmp_path, cfg, dtype=torch.float32, progress=False)
    assert loaded.keys() == fp8.keys()
    for name, w in fp8.items():
        got = loaded[name]
        if isinstance(w, Fp8Weight):
            assert isinstance(got, Fp8Weight), f"{name}: loaded as {type(got).__name__}, not FP8"
            assert got.q.dtype == torch.float8_e4m3fn and torch.equal(_bits(got.q), _bits(w.q)), name
            assert torch.equal(got.scale, w.scale), name
        else:
            assert torch.equal(got, w), name

    # The loaded FP8 model computes what a model built from the written FP8 weights computes.
    model = load_model(tmp_path, backend, dtype=torch.float32, progress=False)
    direct = DeepseekModel(cfg, backend, fp8, dtype=torch.float32)
    logits = _all_logits(model, FP8_PROMPTS)
    err = rel_err(logits, _all_logits(direct, FP8_PROMPTS))
    assert err <= TOL, f"loaded FP8 model vs the written FP8 weights: relative error {err:.3g}"

    # Dequantized at load, it equals a model built from the dequantized weights ...
    plain = load_weights(tmp_path, cfg, dtype=torch.float32, dequantize_fp8=True, progress=False)
    assert not any(isinstance(w, Fp8Weight) for w in plain.values())
    reference = _all_logits(DeepseekModel(cfg, backend, dequantized, dtype=torch.float32), FP8_PROMPTS)
    err = rel_err(_all_logits(DeepseekModel(cfg, backend, plain, dtype=torch.float32), FP8_PROMPTS), reference)
    assert err <= TOL, f"dequantized FP8 checkpoint vs dequantized weights: relative error {err:.3g}"
    # ... and the FP8 model (which also quantizes activations to FP8) stays close to it.
    cos = cosine(logits, reference)
    assert cos >= 0.99, f"FP8 model vs dequantized weights: logits cosine {cos:.6f} < 0.99"


def test_save_fp8_checkpoint_equals_quantize_at_load(
    fp8_dirs: dict[str, Path], backend: hal.Backend, tmp_path: Path
) -> None:
    src = fp8_dirs["fp32"]
    cfg_dict = json.loads((src / "config.json").read_text())
    cfg = ModelConfig.from_dict(cfg_dict)
    weights = load_weights(src, cfg, dtype=torch.float32, progress=False)
    save_fp8_checkpoint(weights, cfg_dict, tmp_path)

    stored = load_file(tmp_path / "model.safetensors")
    for name, w in weights.items():
        if is_linear(name):
            q, s = quantize_fp8_blocks(w, block=128, fp8_dtype=torch.float8_e4m3fn)
            assert stored[name].dtype == torch.float8_e4m3fn and torch.equal(_bits(stored[name]), _bits(q)), name
            assert torch.equal(stored[name + "_scale_inv"], s), name
        else:
            assert torch.equal(stored[name], w), name
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]

    from_checkpoint = load_model(tmp_path, backend, dtype=torch.float32, progress=False)
    at_load = load_model(src, backend, dtype=torch.float32, quantize="fp8", progress=False)
    assert from_checkpoint.linear_weight_bytes == at_load.linear_weight_bytes
    err = rel_err(_all_logits(from_checkpoint, FP8_PROMPTS), _all_logits(at_load, FP8_PROMPTS))
    assert err <= TOL, f"saved FP8 checkpoint vs quantize-at-load: relative error {err:.3g}"


# ---------------------------------------------------------------------------------------------------
# hal run
# ---------------------------------------------------------------------------------------------------


def test_hal_run_json_matches_transformers(tmp_path: Path) -> None:
    name = "noqlora-group4-dense2-nonorm-plain"
    hf = build_hf(tmp_path, seed=11, **CONFIGS[name])
    prompts = random_prompts((4, 11), seed=5)
    prompt_ids = ";".join(",".join(str(t) for t in p) for p in prompts)
    cmd = [sys.executable, "-m", "hal.cli", "run", "--model", str(tmp_path), "--prompt-ids", prompt_ids]
    cmd += ["--max-new-tokens", "8", "--backend", "cpu", "--dtype", "float32", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"hal run failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    data = json.loads(proc.stdout)
    assert data["backend"] == "cpu"
    assert data["prompts"] == prompts
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes"):
        assert key in data, key
    expected = [hf_greedy(hf, p, 8) for p in prompts]
    diffs = [first_difference(a, b) for a, b in zip(data["tokens"], expected, strict=False)]
    assert data["tokens"] == expected, "\n".join(diffs)


# ------------------------------------------------------------------------------------------------
# INT8 W8A8 (devices with INT8 but no FP8, e.g. Ascend 910B/910C)
# ------------------------------------------------------------------------------------------------


def int8_only(backend: hal.Backend) -> hal.Backend:
    """The cpu backend's ops under capabilities without FP8, as an Ascend A2/A3 device declares."""
    caps = dataclasses.replace(backend.capabilities, fp8_format=None, int8=True)
    return hal.Backend("cpu-int8-only", backend.device, caps, backend.table)


def _linear_weight_types(model: DeepseekModel) -> set[str]:
    kinds = set()
    for layer in model.layers:
        kinds |= {
            type(w).__name__ for w in (layer.attn.q_a, layer.attn.q_b, layer.attn.kv_a, layer.attn.o) if w is not None
        }
        kinds.add(type(layer.mlp.down).__name__)
    return kinds


def test_w8a8_quantize_at_load_close_to_bf16(fp8_dirs: dict[str, Path], backend: hal.Backend) -> None:
    bf16 = load_model(fp8_dirs["bf16"], backend, dtype=torch.bfloat16, progress=False)
    int8 = load_model(fp8_dirs["bf16"], backend, dtype=torch.bfloat16, quantize="int8", progress=False)
    assert _linear_weight_types(int8) == {"Int8Weight"}
    cos = cosine(_all_logits(int8, FP8_PROMPTS), _all_logits(bf16, FP8_PROMPTS))
    ratio = int8.linear_weight_bytes / bf16.linear_weight_bytes
    print(f"\nW8A8 INT8 quantize-at-load vs bf16: logits cosine {cos:.6f}, linear weight bytes ratio {ratio:.4f}")
    assert cos >= 0.99, f"W8A8 vs bf16 logits cosine similarity {cos:.6f} < 0.99"
    assert ratio <= 0.55, f"INT8 linear weights take {ratio:.4f}x the bf16 ones"


def test_fp8_checkpoint_on_an_int8_only_backend_loads_as_w8a8(
    fp8_dirs: dict[str, Path], backend: hal.Backend, tmp_path: Path
) -> None:
    _, dequantized = _write_fp8_checkpoint(fp8_dirs["fp32"], tmp_path)
    cfg = ModelConfig.from_file(tmp_path / "config.json")
    ascend_like = int8_only(backend)
    model = load_model(tmp_path, ascend_like, dtype=torch.float32, progress=False)
    assert _linear_weight_types(model) == {"Int8Weight"}
    reference = DeepseekModel(cfg, backend, dequantized, dtype=torch.float32)
    cos = cosine(_all_logits(model, FP8_PROMPTS), _all_logits(reference, FP8_PROMPTS))
    print(f"\nFP8 checkpoint as W8A8 vs its dequantized fp32 weights: logits cosine {cos:.6f}")
    assert cos >= 0.99, f"FP8 checkpoint converted to W8A8: cosine {cos:.6f} < 0.99"
    # Asked for plain weights instead, it is exactly the dequantized model.
    plain = load_model(tmp_path, ascend_like, dtype=torch.float32, dequantize_fp8=True, progress=False)
    assert _linear_weight_types(plain) == {"Tensor"}
    assert rel_err(_all_logits(plain, FP8_PROMPTS), _all_logits(reference, FP8_PROMPTS)) <= 1e-5
