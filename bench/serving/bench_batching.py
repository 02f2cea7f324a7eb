"""Serving benchmark: tokens/s of N concurrent requests through hal.AutoBatcher against the same N
requests one at a time through hal.model.generate, and the failover recovery time.

Not a test (pytest does not collect it): run it as a script, on the CPU or an accelerator::

    .venv/bin/python bench/serving/bench_batching.py                       # cpu, tiny model, 32 requests
    .venv/bin/python bench/serving/bench_batching.py --backend nvidia --json out.json

**Batching.** N seeded random prompts of 16 to 64 tokens, each asking for ``--max-new-tokens`` greedy
tokens (no EOS stop). *One at a time*: ``generate(model, [prompt])`` for each prompt in turn.
*Concurrent*: N client threads released together by a barrier, each ``submit``-ting one request to an
``AutoBatcher(max_batch_size=N, timeout_ms=50)`` and waiting for its future. Both rates are generated
tokens (N × max_new_tokens) over the wall time of the whole set, the median of ``--repeats`` runs after
one warm-up of each. The concurrent tokens are checked equal to the one-at-a-time tokens.

**Failover.** The same concurrent set runs on ``flaky``, a :class:`~hal.serving.faults.FaultInjectionPlugin`
over the chosen backend that raises a DeviceFailure half-way through the run's ops; the batcher fails
over to the real backend, rebuilding the model (a) from the weights in host memory (a factory) and (b)
from a safetensors checkpoint on disk (``load_model``), and resumes every in-flight request. Reported:
the recovery time (device error caught → every in-flight request re-prefilled and ready to decode),
split into rebuild and resume, the median of ``--repeats``; and whether the tokens still equal the
one-at-a-time ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import hal
from hal.model import DeepseekModel, random_state_dict, tiny_config
from hal.model.config import ModelConfig
from hal.model.generate import generate
from hal.serving import Failover, FaultInjectionPlugin, HealthBook


def prompts_for(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (16 + (48 * i) // max(n - 1, 1),), generator=g).tolist() for i in range(n)]


def sync(model: Any) -> None:
    model.backend.synchronize()


def one_at_a_time(model: Any, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    sync(model)
    t0 = time.perf_counter()
    tokens = [generate(model, [p], max_new_tokens=new, eos_token_ids=()).tokens[0] for p in prompts]
    sync(model)
    return time.perf_counter() - t0, tokens


def concurrent(batcher: hal.AutoBatcher, prompts: list[list[int]], new: int) -> tuple[float, list[Any]]:
    """Every prompt submitted by its own thread, all released together; wall time until the last result."""
    results: list[Any] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    def client(i: int) -> None:
        barrier.wait()
        results[i] = batcher.submit(prompts[i], new, eos_token_ids=()).result()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    sync(batcher.model)
    return time.perf_counter() - t0, results


def write_checkpoint(cfg: ModelConfig, weights: dict[str, Any], root: Path) -> Path:
    raw = cfg.to_dict()
    raw["rope_scaling"] = raw.pop("rope")
    raw["eos_token_id"] = None
    (root / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(root / "model.safetensors"))
    return root


def failover_run(
    backend_name: str,
    make_source: Callable[[], Any],
    cfg: ModelConfig,
    weights: dict[str, Any],
    prompts: list[list[int]],
    new: int,
    fail_after: int,
    num_blocks: int,
) -> tuple[Any, list[list[int]]]:
    """One concurrent run on flaky that dies after ``fail_after`` ops; returns the event and the tokens."""
    flaky = FaultInjectionPlugin(hal.get_backend(backend_name), fail_after=fail_after)
    registry = hal.Registry(plugins=[("flaky", flaky)])  # the installed backends, plus flaky over one of them
    failover = Failover(make_source(), registry=registry, backends=[backend_name], book=HealthBook())
    model = DeepseekModel(cfg, registry.get_backend("flaky"), weights)
    with hal.AutoBatcher(
        model, max_batch_size=len(prompts), timeout_ms=50, num_blocks=num_blocks, failover=failover
    ) as b:
        _, results = concurrent(b, prompts, new)
        (event,) = b.failovers
    return event, [r.tokens for r in results]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=os.environ.get("HAL_BACKEND", "cpu"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    backend = hal.get_backend(args.backend)
    dtype = getattr(torch, args.dtype)
    cfg = tiny_config()
    weights = dict(random_state_dict(cfg, seed=0))
    model = DeepseekModel(cfg, backend, weights, dtype=dtype)
    prompts = prompts_for(args.requests, cfg.vocab_size)
    new = args.max_new_tokens
    num_blocks = args.requests * -(-(64 + new) // 64)
    total_tokens = args.requests * new
    print(
        f"backend {backend.name} ({backend.device}, {backend.capabilities.device_name}) · tiny model "
        f"({sum(w.numel() for w in weights.values()) / 1e6:.1f}M params, {args.dtype}) · {args.requests} requests "
        f"× {new} new tokens · prompts 16-64 tokens",
        flush=True,
    )

    one_at_a_time(model, prompts[:2], 4)  # warm-up
    with hal.AutoBatcher(model, max_batch_size=args.requests, timeout_ms=50, num_blocks=num_blocks) as batcher:
        concurrent(batcher, prompts, 4)  # warm-up
        seq_times, conc_times, latencies = [], [], []
        expected: list[list[int]] = []
        identical = True
        for _ in range(args.repeats):
            seconds, expected = one_at_a_time(model, prompts, new)
            seq_times.append(seconds)
            seconds, results = concurrent(batcher, prompts, new)
            conc_times.append(seconds)
            latencies += [r.latency_seconds for r in results]
            identical &= [r.tokens for r in results] == expected
        stats = batcher.stats()
    seq_rate = total_tokens / statistics.median(seq_times)
    conc_rate = total_tokens / statistics.median(conc_times)
    latencies.sort()
    print(f"one at a time : {seq_rate:10.1f} tok/s  (median of {args.repeats}: {statistics.median(seq_times):.3f} s)")
    print(
        f"concurrent    : {conc_rate:10.1f} tok/s  (median of {args.repeats}: {statistics.median(conc_times):.3f} s), "
        f"{conc_rate / seq_rate:.1f}x; request latency p50 {latencies[len(latencies) // 2]:.3f} s, "
        f"p95 {latencies[int(len(latencies) * 0.95)]:.3f} s; largest decode batch {stats.largest_batch}"
    )
    print(f"greedy tokens identical to one at a time: {identical}")

    # Failover: count the ops of one undisturbed concurrent run on flaky, then fail half-way.
    counter = FaultInjectionPlugin(backend, fail_after=None)
    counting = hal.Registry(entry_points=False, plugins=[("flaky", counter)])
    with hal.AutoBatcher(
        DeepseekModel(cfg, counting.get_backend("flaky"), weights, dtype=dtype),
        max_batch_size=args.requests,
        timeout_ms=50,
        num_blocks=num_blocks,
    ) as b:
        concurrent(b, prompts, new)
    fail_after = counter.calls // 2
    failovers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(cfg, weights, Path(tmp))
        sources: dict[str, Callable[[], Any]] = {
            "factory (weights in host memory)": lambda: lambda be: DeepseekModel(cfg, be, weights, dtype=dtype),
            "checkpoint directory (safetensors)": lambda: checkpoint,
        }
        for label, source in sources.items():
            events, same = [], True
            for _ in range(args.repeats):
                event, tokens = failover_run(args.backend, source, cfg, weights, prompts, new, fail_after, num_blocks)
                events.append(event)
                same &= tokens == expected
            rec = statistics.median(e.recovery_seconds for e in events)
            reb = statistics.median(e.rebuild_seconds for e in events)
            res = statistics.median(e.resume_seconds for e in events)
            print(
                f"failover, {label}: recovery {rec * 1e3:.1f} ms "
                f"(rebuild {reb * 1e3:.1f} ms + resume {res * 1e3:.1f} ms; "
                f"{events[0].resumed_requests} requests, {events[0].resumed_tokens} tokens re-prefilled; median of "
                f"{args.repeats}); tokens identical: {same}"
            )
            failovers[label] = {
                "recovery_seconds": rec,
                "rebuild_seconds": reb,
                "resume_seconds": res,
                "resumed_requests": events[0].resumed_requests,
                "resumed_tokens": events[0].resumed_tokens,
                "tokens_identical": same,
                "events": [e.as_dict() for e in events],
            }
    if args.json:
        doc = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": platform.node(),
            "backend": backend.name,
            "device": str(backend.device),
            "device_name": backend.capabilities.device_name,
            "torch": torch.__version__,
            "requests": args.requests,
            "max_new_tokens": new,
            "dtype": args.dtype,
            "one_at_a_time_tokens_per_s": seq_rate,
            "concurrent_tokens_per_s": conc_rate,
            "speedup": conc_rate / seq_rate,
            "greedy_identical": identical,
            "one_at_a_time_seconds": seq_times,
            "concurrent_seconds": conc_times,
            "failover": failovers,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
