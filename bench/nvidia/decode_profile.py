"""Where a decode step of the benchmark model goes on a backend: host or device, and what input checks cost.

    python bench/nvidia/decode_profile.py [--backend nvidia] [--config large] [--dtypes float32,bfloat16]

For each dtype it builds ``test_decode.py``'s config with seeded random weights twice, once on a backend
that checks every op's input (the default) and once on one that does not (``HAL_VALIDATE=0``), prefills
a batch of 1 and a batch of 8, and then times ``--steps`` greedy decode steps of the four models in
turn, so that both variants see the same machine state. It prints the median step of each. Then it
profiles 5 steps of the checked model at batch 1 (``torch.profiler``, host and device) and prints the
ops by host time and by device time.

Timings on a shared host vary between machines and runs; compare only rows of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import hal
from hal.model.config import ModelConfig
from hal.model.deepseek import DeepseekModel
from hal.model.weights import random_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from test_decode import CONFIGS, PROMPT_LEN  # the benchmark's configs

BATCHES = (1, 8)


def _start(model: DeepseekModel, batch: int, steps: int) -> dict[str, Any]:
    """A prefilled batch with room for ``steps`` more tokens and 3 warm-up steps."""
    cache = model.new_cache(batch * -(-(PROMPT_LEN + steps + 8) // 64))
    seqs = list(range(batch))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.cfg.vocab_size, (PROMPT_LEN,), generator=g).tolist() for _ in seqs]
    run = {"model": model, "cache": cache, "seqs": seqs, "tokens": model.prefill(cache, seqs, prompts).argmax(-1)}
    for _ in range(3):
        _step(run)
    return run


def _step(run: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    run["tokens"] = run["model"].decode(run["cache"], run["seqs"], run["tokens"].tolist()).argmax(-1)
    run["tokens"].tolist()  # on the host: the step's device work is done
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="nvidia", help="HAL backend (default nvidia)")
    parser.add_argument("--config", default="large", choices=sorted(CONFIGS), help="test_decode.py's config")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtype names")
    parser.add_argument("--steps", type=int, default=40, help="timed decode steps per model (default 40)")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler tables")
    args = parser.parse_args(argv)
    cfg = ModelConfig.from_dict(CONFIGS[args.config])
    backends = {checked: hal.Registry(validate=checked).get_backend(args.backend) for checked in (True, False)}
    print(f"{args.config} config on {backends[True].name} ({backends[True].device}), torch {torch.__version__}")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip())
        weights = dict(random_state_dict(cfg, dtype=dtype))
        runs = {}
        for checked, backend in backends.items():
            model = DeepseekModel(cfg, backend, weights, dtype=dtype)
            for batch in BATCHES:
                runs[checked, batch] = _start(model, batch, args.steps)
        times: dict[tuple[bool, int], list[float]] = {key: [] for key in runs}
        for _ in range(args.steps):
            for key, run in runs.items():
                times[key].append(_step(run))
        for (checked, batch), ts in times.items():
            label = "checked" if checked else "unchecked (HAL_VALIDATE=0)"
            print(f"{name:9s} batch {batch}: {label:27s} median step {statistics.median(ts) * 1e3:7.2f} ms")
        if not args.no_profile:
            from torch.profiler import ProfilerActivity, profile

            run = runs[True, 1]
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            with profile(activities=activities) as prof:
                for _ in range(5):
                    _step(run)
            table = prof.key_averages()
            print(f"\n{name}, batch 1, 5 steps, by host time:")
            print(table.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
            if torch.cuda.is_available():
                print(f"{name}, batch 1, 5 steps, by device time:")
                print(table.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
        del runs, weights
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
