"""How fast can a batch-1 decode step of a benchmark config be in plain eager torch on this machine?

A yardstick for ``test_decode.py``'s goals, not HAL: one decode step of the config's architecture
written as directly as torch allows (absorbed MLA over a fixed 128-token latent cache instead of a
paged one, no op layer, no input checks, no sampler; seeded random weights), timed over 97 steps after
3 warm-up steps. Each step reads the same weights as HAL's: every attention projection, the dense MLP,
each MoE layer's router, shared expert and the ``top_k`` routed experts the token picks, and the LM head.

``--experts loop`` (the default) runs the picked experts one by one with ``F.linear`` on views of the
stacked weights (the host reads the ids, as HAL's reference grouped GEMM does); ``--experts gather``
indexes the stacked weights with the id tensor and reduces, which needs no host read (so
``torch.compile`` can take the whole step as one graph, and fuses the gather into the reductions) but
in eager mode copies the picked experts' weights.
``--compile`` runs the step through ``torch.compile`` (inductor) with static shapes; the warm-up then
includes the compilation.

    .venv/bin/python bench/model/eager_floor.py                      # eager, experts one by one
    .venv/bin/python bench/model/eager_floor.py --experts gather --compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_decode import CONFIGS  # the benchmark's configs, beside this file

CACHE = 128  # latent cache rows: the step attends over all of them, masked to the positions written


def _weights(c: dict[str, Any]) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    h, heads, e = c["hidden_size"], c["num_attention_heads"], c["n_routed_experts"]
    nope, rope, vd, kvr = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    qr, im = c["q_lora_rank"], c["moe_intermediate_size"]
    if qr is None:
        raise SystemExit("eager_floor.py: the config needs a q LoRA (q_lora_rank)")
    layers = []
    for i in range(c["num_hidden_layers"]):
        d = {
            "ln1": torch.ones(h),
            "ln2": torch.ones(h),
            "q_a": rand(qr, h),
            "q_a_ln": torch.ones(qr),
            "q_b": rand(heads * (nope + rope), qr),
            "kv_a": rand(kvr + rope, h),
            "kv_ln": torch.ones(kvr),
            "w_uk": rand(heads, nope, kvr),  # q_nope [h, 1, nope] @ w_uk -> [h, 1, kvr]
            "w_uv": rand(heads, kvr, vd),  # latent out [h, 1, kvr] @ w_uv -> [h, 1, vd]
            "o": rand(h, heads * vd),
            "cache": torch.zeros(CACHE, kvr + rope),
        }
        if i < c["first_k_dense_replace"]:
            d.update(gu=rand(2 * c["intermediate_size"], h), down=rand(h, c["intermediate_size"]))
        else:
            d.update(
                gate=rand(e, h),
                bias=torch.zeros(e),
                egu=rand(e, 2 * im, h),
                edown=rand(e, h, im),
                sgu=rand(2 * im, h),
                sdown=rand(h, im),
            )
        layers.append(d)
    top = {
        "embed": rand(c["vocab_size"], h),
        "norm": torch.ones(h),
        "lm": rand(c["vocab_size"], h),
        "cos_sin": torch.randn(CACHE, rope, generator=g),
    }
    return layers, top


def _step_fn(c: dict[str, Any], gather: bool) -> Any:
    layers, top = _weights(c)
    heads, nope, rope = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"]
    kvr, k, eps = c["kv_lora_rank"], c["num_experts_per_tok"], 1e-6
    scale = (nope + rope) ** -0.5
    positions = torch.arange(CACHE)

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w

    def rotate(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:  # interleaved pairs
        cos, sin = cs[: rope // 2], cs[rope // 2 :]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)

    def experts(d: dict[str, torch.Tensor], x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if gather:  # [k, 2I, H] and [k, H, I] copies of the picked experts, then reductions
            g, u = (d["egu"][ids] * x).sum(-1).chunk(2, -1)
            return (d["edown"][ids] * (F.silu(g) * u)[:, None, :]).sum(-1)
        out = []
        for e in ids.tolist():
            g, u = F.linear(x, d["egu"][e]).chunk(2, -1)
            out.append(F.linear(F.silu(g) * u, d["edown"][e]))
        return torch.cat(out)

    def step(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = top["embed"][tok]  # [1, H]
        cs = top["cos_sin"].index_select(0, pos.view(1))[0]  # not [pos]: indexing by a 0-d tensor reads it
        seen = positions <= pos
        for d in layers:
            x = rms(h, d["ln1"])
            q = F.linear(rms(F.linear(x, d["q_a"]), d["q_a_ln"]), d["q_b"]).view(heads, nope + rope)
            kv = F.linear(x, d["kv_a"])[0]
            latent = torch.cat([rms(kv[:kvr], d["kv_ln"]), rotate(kv[kvr:], cs)])
            d["cache"].index_copy_(0, pos.view(1), latent.view(1, -1))
            q_lat = torch.bmm(q[:, None, :nope], d["w_uk"])[:, 0]  # [heads, kvr]
            scores = torch.cat([q_lat, rotate(q[:, nope:], cs)], -1) @ d["cache"].t() * scale
            probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
            o = torch.bmm((probs @ d["cache"][:, :kvr])[:, None, :], d["w_uv"]).reshape(1, -1)
            h = h + F.linear(o, d["o"])
            x = rms(h, d["ln2"])
            if "gu" in d:
                g, u = F.linear(x, d["gu"]).chunk(2, -1)
                h = h + F.linear(F.silu(g) * u, d["down"])
                continue
            s = F.linear(x, d["gate"]).sigmoid()[0]
            ids = (s + d["bias"]).topk(k).indices
            w = s[ids] / s[ids].sum() * c["routed_scaling_factor"]
            sg, su = F.linear(x, d["sgu"]).chunk(2, -1)
            shared = F.linear(F.silu(sg) * su, d["sdown"])
            h = h + (w[:, None] * experts(d, x, ids)).sum(0, keepdim=True) + shared
        return F.linear(rms(h, top["norm"]), top["lm"]).argmax(-1)

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="large", help="benchmark config (default large)")
    parser.add_argument("--experts", choices=("loop", "gather"), default="loop", help="how the picked experts run")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step (inductor, static shapes)")
    args = parser.parse_args(argv)
    step = _step_fn(CONFIGS[args.config], gather=args.experts == "gather")
    if args.compile:
        step = torch.compile(step, dynamic=False)
    tok = torch.tensor([5])
    t0 = time.perf_counter()
    for pos in range(3):
        tok = step(tok, torch.tensor(pos))
    warm = time.perf_counter() - t0
    times = []
    for pos in range(3, CACHE - 28):
        t0 = time.perf_counter()
        tok = step(tok, torch.tensor(pos))
        times.append(time.perf_counter() - t0)
    how = f"experts {args.experts}" + (", torch.compile" if args.compile else ", eager")
    print(
        f"{args.config} config, batch 1, {how}: median step {statistics.median(times) * 1e3:.2f} ms "
        f"(min {min(times) * 1e3:.2f}) over {len(times)} steps; warm-up {warm:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
