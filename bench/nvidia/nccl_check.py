"""Every collective op of a backend over its own transport (NCCL for ``nvidia``), under torchrun, checked
against the single-process result:

    torchrun --nproc-per-node N bench/nvidia/nccl_check.py [--backend nvidia] [--json OUT]

Each rank's inputs are a deterministic function of its rank, so every rank computes the whole expected
result alone and compares: ``all_reduce`` (sum, avg; fp32 and bf16), ``all_gather`` and ``broadcast`` of
FP8 (which travels as bytes), ``reduce_scatter``, ``all_to_all`` with uneven splits (rank ``r`` sends
``r + d + 1`` rows to rank ``d``), ``barrier``, and ``ep_dispatch`` → local experts → ``ep_combine`` in
both modes, with bf16 and FP8 (with scales) tokens, against the one-process MoE sum.

It runs at any world size, one device per rank (``--backend cpu`` runs it on gloo, which is how the
test suite checks the script). On a one-GPU machine it runs at world size 1: NCCL refuses two ranks on
one device. Then it checks what a single rank can: the process group from torchrun's environment with
the backend's transport, the device binding, and that every op's tensors (FP8 payloads included) are
ones the transport accepts; it moves no bytes between GPUs. Rank 0 prints one line per check and exits
with status 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

import hal
import hal.distributed as hd

FP8 = torch.float8_e4m3fn
EXPERTS = 8  # routed experts, split evenly between the ranks (world must divide 8)


def _x(rank: int, *shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randn(*shape, generator=g)


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.cpu(), want.cpu()
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"got {got.dtype} {list(got.shape)}, want {want.dtype} {list(want.shape)}")
    if want.dtype.itemsize == 1 and want.dtype.is_floating_point:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    if not torch.equal(got, want):
        raise AssertionError("values differ")


def _checks(backend: hal.Backend, rank: int, world: int) -> dict[str, Callable[[], None]]:
    dev = backend.device
    op = backend.op

    def all_reduce_sum() -> None:
        t = _x(rank, 33, 5).to(dev)
        op("all_reduce")(t)
        torch.testing.assert_close(t.cpu(), sum(_x(r, 33, 5) for r in range(world)), rtol=1e-5, atol=1e-5)

    def all_reduce_avg_bf16() -> None:
        t = _x(rank, 17).bfloat16().to(dev)
        op("all_reduce")(t, op="avg")
        want = sum(_x(r, 17).bfloat16().float() for r in range(world)) / world
        torch.testing.assert_close(t.cpu().float(), want, rtol=2e-2, atol=2e-2)

    def all_gather_fp8() -> None:
        out = op("all_gather")(_x(rank, 6, 16).to(FP8).to(dev))
        _same(out, torch.cat([_x(r, 6, 16).to(FP8) for r in range(world)]))

    def broadcast_fp8() -> None:
        t = _x(rank, 9, 32).to(FP8).to(dev)
        op("broadcast")(t, src=world - 1)
        _same(t, _x(world - 1, 9, 32).to(FP8))

    def reduce_scatter() -> None:
        out = op("reduce_scatter")(_x(rank, 4 * world, 3).to(dev))
        want = sum(_x(r, 4 * world, 3) for r in range(world)).chunk(world)[rank]
        torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-5)

    def all_to_all_uneven() -> None:
        rows = [[s + d + 1 for d in range(world)] for s in range(world)]  # rows[s][d]: s sends d
        mine = _x(rank, sum(rows[rank]), 8)
        out = op("all_to_all")(
            mine.to(dev), output_split_sizes=[rows[s][rank] for s in range(world)], input_split_sizes=rows[rank]
        )
        want = [_x(s, sum(rows[s]), 8).split(rows[s])[rank] for s in range(world)]
        _same(out, torch.cat(want))

    def barrier() -> None:
        op("barrier")()

    def moe(fp8: bool, low_latency: bool) -> Callable[[], None]:
        def run() -> None:
            tokens, hidden, top_k, local = 5 + rank, 256, 3, EXPERTS // world

            def routing(r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                g = torch.Generator().manual_seed(50 + r)
                ids = torch.rand(5 + r, EXPERTS, generator=g).argsort(dim=1)[:, :top_k]
                return _x(r, 5 + r, hidden, seed=2).bfloat16(), ids, torch.rand(5 + r, top_k, generator=g)

            x, ids, w = routing(rank)
            scales = torch.rand(tokens, hidden // 128) + 0.5 if fp8 else None
            xs = x.float().to(FP8) if fp8 else x
            d = op("ep_dispatch")(
                xs.to(dev),
                ids.to(dev),
                w.to(dev),
                num_experts=EXPERTS,
                x_scales=None if scales is None else scales.to(dev),
                max_tokens_per_rank=5 + world if low_latency else None,
            )
            # Local expert e multiplies by (global id + 1); the received rows carry local ids, -1 elsewhere.
            rx = d.x.float()
            if fp8:
                rx = rx * d.x_scales.float().repeat_interleave(128, dim=1)
            coef = (d.topk_weights * torch.where(d.topk_ids >= 0, d.topk_ids + rank * local + 1, 0)).sum(dim=1)
            y = (rx * coef[:, None]).bfloat16()
            out = op("ep_combine")(y, d.handle).float().cpu()
            xw = xs.float() * (scales.repeat_interleave(128, dim=1) if fp8 else 1.0)
            want = xw * (w * (ids + 1)).sum(dim=1)[:, None]
            torch.testing.assert_close(out, want, rtol=3e-2, atol=3e-2)

        return run

    return {
        "all_reduce sum fp32": all_reduce_sum,
        "all_reduce avg bf16": all_reduce_avg_bf16,
        "all_gather fp8": all_gather_fp8,
        "broadcast fp8": broadcast_fp8,
        "reduce_scatter fp32": reduce_scatter,
        "all_to_all uneven splits": all_to_all_uneven,
        "barrier": barrier,
        "ep_dispatch/combine bf16": moe(False, False),
        "ep_dispatch/combine fp8+scales": moe(True, False),
        "ep_dispatch/combine low-latency bf16": moe(False, True),
        "ep_dispatch/combine low-latency fp8+scales": moe(True, True),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="nvidia", help="the HAL backend whose collectives are checked (default nvidia)")
    p.add_argument("--json", metavar="OUT", help="also write rank 0's verdicts to this JSON file")
    args = p.parse_args(argv)
    hd.bind_local_device()
    backend = hal.get_backend(args.backend)
    info = hd.init(backend, timeout_s=60)
    rank, world = info.rank, info.world_size
    if EXPERTS % world:
        raise SystemExit(f"world size {world} must divide the {EXPERTS} experts")
    verdicts: dict[str, str] = {}
    for name, check in _checks(backend, rank, world).items():
        try:
            check()
            verdicts[name] = "ok"
        except Exception:  # every check reports; none stops the others
            verdicts[name] = "FAILED: " + traceback.format_exc(limit=3).strip().splitlines()[-1]
    gathered: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(gathered, verdicts)
    failed = 0
    if rank == 0:
        for name in verdicts:
            per_rank = [g[name] if g else "no result" for g in gathered]
            bad = [f"rank {r}: {v}" for r, v in enumerate(per_rank) if v != "ok"]
            failed += bool(bad)
            print(f"{'ok    ' if not bad else 'FAILED'} {name}" + ("".join("\n       " + b for b in bad)))
        summary = {
            "backend": backend.name,
            "dist_backend": info.dist_backend,
            "world_size": world,
            "device": str(backend.device),
            "torch": torch.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
            "verdicts": gathered,
        }
        print(f"{len(verdicts) - failed}/{len(verdicts)} checks passed on {world} rank(s) over {info.dist_backend}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
    hd.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
