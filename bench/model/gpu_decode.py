"""Decode on a GPU: HAL's model on a GPU backend against transformers' ``generate`` on the same GPU.

The GPU counterpart of ``test_decode.py`` (same configs, prompts, token counts and method), run as a
script on a machine with a GPU::

    python bench/model/gpu_decode.py                          # large config, nvidia, fp32 and bf16, batch 1 and 8
    python bench/model/gpu_decode.py --config small --dtypes float32 --json out.json

``DeepseekV3ForCausalLM`` is built with a seeded random init, written with ``save_pretrained`` and read
by HAL's loader onto the backend, so both sides hold the same weights; transformers' copy is moved to
the same GPU in the same dtype. TF32 is off, so fp32 is fp32 on both sides. For each dtype and batch:
one full-length warm-up run per side, whose greedy tokens are compared (fp32 should agree; bf16 may
part after some tokens, as two correct bf16 implementations round differently), then ``REPEATS`` timed
runs of each side with ``N`` and with 1 new tokens, alternating. Decode tokens/s = ``b·(N−1) /
(median t_N − median t_1)``, each ``generate`` call timed whole on the host (both return their tokens
on the host, so the GPU work is finished). Nothing here is a goal: the model issue's goals are for the
CPU (``test_decode.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import hal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_decode import (
    CONFIGS,
    NEW_TOKENS,
    PROMPT_LEN,
    _first_difference,
    _Sides,
)  # the CPU benchmark's, beside this file

REPEATS = 3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure(name: str, backend: hal.Backend, dtypes: list[str], batches: list[int]) -> list[dict[str, Any]]:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from hal.model.loader import load_model

    torch.manual_seed(0)
    hf_cpu = DeepseekV3ForCausalLM(DeepseekV3Config(**CONFIGS[name])).float().eval()
    hf_cpu.generation_config.eos_token_id = None
    n_params = sum(p.numel() for p in hf_cpu.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_cpu.save_pretrained(tmp)
        for dname in dtypes:
            dtype = DTYPES[dname]
            hf = hf_cpu.to(device=backend.device, dtype=dtype)  # nn.Module.to moves in place
            model = load_model(tmp, backend, dtype=dtype, progress=False)
            sides = _Sides(hf, model)  # test_decode.py's two generate calls, each timed whole
            g = torch.Generator().manual_seed(1)
            for batch in batches:
                prompts = torch.randint(0, model.cfg.vocab_size, (batch, PROMPT_LEN), generator=g)
                on_device = prompts.to(backend.device)
                hf_tokens = sides.hf_run(on_device, NEW_TOKENS)[1]  # tokens to the host: the GPU work is done
                hal_tokens = sides.hal_run(prompts, NEW_TOKENS)[1].tokens
                times: dict[tuple[str, int], list[float]] = {(s, n): [] for s in ("hf", "hal") for n in (NEW_TOKENS, 1)}
                for _ in range(REPEATS):
                    for n in (NEW_TOKENS, 1):
                        times[("hf", n)].append(sides.hf_run(on_device, n)[0])
                        times[("hal", n)].append(sides.hal_run(prompts, n)[0])
                med = {k: statistics.median(v) for k, v in times.items()}
                decoded = batch * (NEW_TOKENS - 1)
                hf_tps = decoded / (med[("hf", NEW_TOKENS)] - med[("hf", 1)])
                hal_tps = decoded / (med[("hal", NEW_TOKENS)] - med[("hal", 1)])
                row = {
                    "config": name,
                    "params_M": round(n_params / 1e6, 1),
                    "dtype": dname,
                    "batch": batch,
                    "hf_tok_s": round(hf_tps, 1),
                    "hal_tok_s": round(hal_tps, 1),
                    "ratio": round(hal_tps / hf_tps, 2),
                    "greedy_tokens": _first_difference(hal_tokens, hf_tokens),
                    "hf_median_s": {str(n): round(med[("hf", n)], 4) for n in (NEW_TOKENS, 1)},
                    "hal_median_s": {str(n): round(med[("hal", n)], 4) for n in (NEW_TOKENS, 1)},
                    "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None),
                    "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
                }
                rows.append(row)
                print(
                    f"[{name} {dname} b{batch}] transformers {row['hf_tok_s']} tok/s, HAL {row['hal_tok_s']} tok/s "
                    f"({row['ratio']:.2f}x); greedy tokens {row['greedy_tokens']}",
                    flush=True,
                )
            del model, sides
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="large", choices=sorted(CONFIGS), help="test_decode.py's config")
    parser.add_argument("--backend", default="nvidia", help="the GPU backend to run HAL on (default nvidia)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtype names")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    backend = hal.get_backend(args.backend)
    if backend.device.type == "cpu":
        parser.error(f"backend {args.backend!r} runs on the CPU: use test_decode.py there")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {bad}; expected among {', '.join(DTYPES)}")
    batches = [int(b) for b in args.batches.split(",")]
    rows = measure(args.config, backend, dtypes, batches)
    print(f"\n{'dtype':<10}{'batch':>6}{'HF tok/s':>10}{'HAL tok/s':>11}{'HAL/HF':>8}  greedy tokens")
    for r in rows:
        print(
            f"{r['dtype']:<10}{r['batch']:>6}{r['hf_tok_s']:>10.1f}{r['hal_tok_s']:>11.1f}{r['ratio']:>7.2f}x  "
            f"{r['greedy_tokens']}"
        )
    if args.json:
        import transformers

        doc = {
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else str(backend.device),
            "backend": backend.name,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "transformers": transformers.__version__,
            },
            "prompt_len": PROMPT_LEN,
            "new_tokens": NEW_TOKENS,
            "repeats": REPEATS,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
