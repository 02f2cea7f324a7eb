"""The 2-process side of ``tests/parallel``: run by ``torchrun --nproc-per-node 2 worker.py OUT_DIR CKPT_DIR``.

One launch checks every layout (:data:`LAYOUTS`) over the same gloo group, since starting a group
costs seconds: for each, every rank builds the same seeded full weights and keeps its shard (or, for
``ckpt-*`` layouts, reads only its shard of the checkpoint in ``CKPT_DIR`` with the loader), and writes
the logits of a prefill and of a few decode steps with fixed tokens, plus the greedy tokens of a short
generation, to ``OUT_DIR/{layout}-rank{rank}.safetensors``. The test imports this file too, to compute
the same tensors in one process (:func:`run`) and compare.

Besides the plain layouts: FP8 weights under tensor and under expert parallelism, a one-token batch
(fewer tokens than ranks: rank 1's expert-parallel chunk is empty at every step), and the expanded
(non-absorbed) MLA decode under tensor parallelism.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed
from safetensors.torch import save_file

import hal
from hal.model import DeepseekModel, random_state_dict, tiny_config
from hal.model.config import ModelConfig
from hal.model.generate import generate
from hal.model.loader import load_model, quantize_linear
from hal.model.parallel import ParallelConfig, shard_state_dict
from hal.model.weights import Weight, is_linear

#: Prompts of different lengths (a packed prefill, a ragged decode); the fixed tokens of each decode step.
PROMPTS = [[1, 17, 300, 42, 7], [900, 5, 5, 64, 128, 3, 77, 1000, 12, 9, 31], [2, 4]]
DECODE_TOKENS = [[11, 12, 13], [500, 600, 700], [8, 1, 1023]]
#: One sequence of one token: every step has fewer tokens than ranks.
ONE_TOKEN, ONE_TOKEN_DECODE = [[5]], [[7], [8]]
NEW_TOKENS = 6


class Layout(NamedTuple):
    tp: int
    ep: int
    quantize: str | None = None
    prompts: list[list[int]] = PROMPTS
    decode_tokens: list[list[int]] = DECODE_TOKENS
    absorbed: bool = True  # the decode steps' MLA form (generate() always absorbs)
    ep_low_latency_tokens: int = 128  # ParallelConfig's: 0 dispatches every step in the normal mode


LAYOUTS: dict[str, Layout] = {
    "tp2": Layout(2, 1),
    "ep2": Layout(1, 2),  # every chunk small: ep_dispatch's low-latency mode
    "ep2-normal": Layout(1, 2, ep_low_latency_tokens=0),  # ep_dispatch's normal mode
    "tp2-ep2": Layout(2, 2),
    "tp2-fp8": Layout(2, 1, "fp8"),
    "ep2-fp8": Layout(1, 2, "fp8"),
    "ep2-one-token": Layout(1, 2, prompts=ONE_TOKEN, decode_tokens=ONE_TOKEN_DECODE),
    "tp2-ep2-one-token": Layout(2, 2, prompts=ONE_TOKEN, decode_tokens=ONE_TOKEN_DECODE),
    "tp2-expanded": Layout(2, 1, absorbed=False),
    "ckpt-tp2-ep2": Layout(2, 2),
}
#: A small checkpoint's config (written by the test with :func:`write_checkpoint`).
CKPT_RAW = {
    "model_type": "deepseek_v3", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256,
    "moe_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
    "q_lora_rank": None, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "max_position_embeddings": 512, "tie_word_embeddings": True,
}  # fmt: skip


def config(quantize: str | None) -> ModelConfig:
    """The tiny config; for FP8 one whose tp = 2 splits fall on 128-blocks (q_b rows 2·128 per rank,
    o_proj and expert columns 128)."""
    if quantize != "fp8":
        return tiny_config()
    return tiny_config(
        qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, moe_intermediate_size=256, n_routed_experts=8,
        n_group=4, topk_group=2, num_hidden_layers=3,
    )  # fmt: skip


def write_checkpoint(root: Path) -> Path:
    """A Hugging Face directory of :data:`CKPT_RAW` (no q LoRA, tied embeddings) with seeded fp32 weights."""
    from hal.model.config import ModelConfig

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(CKPT_RAW))
    weights = random_state_dict(ModelConfig.from_dict(CKPT_RAW), seed=5)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(root / "model.safetensors"))
    return root


def build(layout: str, backend: hal.Backend, par: ParallelConfig | None, ckpt: Path | None = None) -> DeepseekModel:
    """The model of ``layout`` on this rank (``par``), or in one process (``par`` None)."""
    if layout.startswith("ckpt-"):
        assert ckpt is not None
        return load_model(ckpt, backend, progress=False, parallel=par)
    quantize = LAYOUTS[layout].quantize
    cfg = config(quantize)
    weights: dict[str, Weight] = dict(random_state_dict(cfg, seed=0))
    if quantize is not None:  # as hal run --quantize does it: the whole weights, before sharding
        for name, w in list(weights.items()):
            if is_linear(name) and isinstance(w, torch.Tensor):
                weights[name] = quantize_linear(w, quantize) or w
    if par is not None:
        weights = shard_state_dict(weights, cfg, par)
    return DeepseekModel(cfg, backend, weights, parallel=par)


def run(model: DeepseekModel, layout: str) -> dict[str, torch.Tensor]:
    """Prefill logits, one set of logits per decode step, the greedy tokens, the linear weights' bytes."""
    case = LAYOUTS[layout]
    cache = model.new_cache(8)
    ids = list(range(len(case.prompts)))
    out = {"prefill": model.prefill(cache, ids, case.prompts)}
    for step, tokens in enumerate(case.decode_tokens):
        out[f"decode{step}"] = model.decode(cache, ids, tokens, absorbed=case.absorbed)
    result = generate(model, case.prompts, max_new_tokens=NEW_TOKENS)
    out["greedy"] = torch.tensor(result.tokens)
    out["weight_bytes"] = torch.tensor([model.linear_weight_bytes])
    return out


def main(out_dir: str, ckpt: str) -> None:
    import hal.distributed

    torch.set_num_threads(1)  # two ranks share the host's cores
    backend = hal.get_backend("cpu")
    info = hal.distributed.init(backend, timeout_s=60)
    try:
        for layout, case in LAYOUTS.items():
            # One layout names its group (checked against the layout), the others use the default one.
            group = torch.distributed.group.WORLD if layout == "tp2-ep2" else None
            par = ParallelConfig.create(case.tp, case.ep, rank=info.rank, world_size=info.world_size, group=group)
            par = dataclasses.replace(par, ep_low_latency_tokens=case.ep_low_latency_tokens)
            tensors = run(build(layout, backend, par, Path(ckpt)), layout)
            save_file(tensors, str(Path(out_dir) / f"{layout}-rank{info.rank}.safetensors"))
    finally:
        hal.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
