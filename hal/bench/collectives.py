"""Collective benchmarks over a 2-process ``torch.distributed`` group (gloo): the support for ``bench/collectives``.

A collective needs every rank to call it, so a benchmark needs a second process doing exactly the same
calls. :class:`Pair` makes the calling process rank 0 (where pytest-benchmark times the calls) and
spawns rank 1, a :func:`follower` that waits for commands: before each benchmark rank 0 broadcasts
``(op, shape, implementation, calls)``, and the follower makes that many matching calls on a payload
of the same size. Starting the group costs a few seconds, which is why ``hal bench`` leaves
collectives out.

Payloads follow the shape sets (:mod:`hal.bench.shapes`): ``all_reduce`` of ``[tokens, hidden]``
activations (zeros, so repeated in-place sums stay finite), and ``all_to_all`` of DeepEP's
dispatch / combine rows as bytes (``tokens·top_k`` rows of ``hidden + hidden/128·4 + 16`` bytes for an
FP8 dispatch, ``2·hidden`` for a bf16 combine), split evenly between the ranks.

Each is compared with plain ``torch.distributed`` moving the same bytes (``all_reduce`` in place,
``all_to_all_single`` into a fresh output, as HAL's ``all_to_all`` returns one). Bandwidths are
reported the way nccl-tests does: ``algbw = bytes / t`` and ``busbw = algbw · 2(n-1)/n`` for
all-reduce, ``algbw · (n-1)/n`` for all-to-all.
"""

from __future__ import annotations

import datetime
import multiprocessing
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from hal.backend import Backend
from hal.bench.shapes import Shape, shape_set
from hal.errors import BenchError

__all__ = ["IMPLS", "WORLD", "Pair", "bandwidth", "call", "follower", "payload"]

WORLD = 2
#: The implementations timed per collective: HAL's op, and plain torch.distributed on the same bytes.
IMPLS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("hal", "torch.distributed.all_reduce"),
    "all_to_all": ("hal", "torch.distributed.all_to_all_single"),
}
_OPS = tuple(IMPLS)
_TIMEOUT = datetime.timedelta(seconds=120)


def payload(op: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor one rank contributes to ``op`` at ``shape``."""
    p = shape.params
    if op == "all_reduce":
        return torch.zeros(p["t"], p["h"], dtype=dtype, device=device)
    if op == "all_to_all":
        rows = p["t"] * p["top_k"]
        rows -= rows % WORLD
        return torch.zeros(rows, p["row_bytes"], dtype=torch.uint8, device=device)
    raise BenchError(f"no collective benchmark for {op!r}; known: {', '.join(_OPS)}")


def call(backend: Backend, op: str, impl: str, t: torch.Tensor) -> Callable[[], Any]:
    """A no-argument call of ``op`` on ``t`` through ``impl`` (``"hal"`` or the plain torch.distributed one)."""
    if impl == "hal":
        fn = backend.op(op)
        return lambda: fn(t)
    if op == "all_reduce":
        return lambda: dist.all_reduce(t)

    def all_to_all_single() -> torch.Tensor:
        # A fresh output per call, as HAL's op returns one: the ratio then shows HAL's own overhead.
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t)
        return out

    return all_to_all_single


def bandwidth(op: str, t: torch.Tensor, seconds: float) -> dict[str, float]:
    """``bytes``, ``algbw_gbps`` and ``busbw_gbps`` (nccl-tests' conventions) of one call taking ``seconds``."""
    size = t.numel() * t.element_size()
    alg = size / seconds / 1e9
    factor = 2 * (WORLD - 1) / WORLD if op == "all_reduce" else (WORLD - 1) / WORLD
    return {"bytes": float(size), "algbw_gbps": alg, "busbw_gbps": alg * factor}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def follower(port: int, backend_name: str, shapes_name: str, dtype_name: str) -> None:
    """Rank 1: join the group, then make the calls rank 0 announces until told to stop."""
    import hal

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=WORLD, timeout=_TIMEOUT)
    try:
        backend = hal.get_backend(backend_name)
        shapes = shape_set(shapes_name)
        dtype = getattr(torch, dtype_name)
        cmd = torch.zeros(4, dtype=torch.int64)
        while True:
            dist.broadcast(cmd, src=0)
            op_i, shape_i, impl_i, calls = cmd.tolist()
            if op_i < 0:
                break
            op = _OPS[op_i]
            t = payload(op, shapes.shapes[op][shape_i], dtype, backend.device)
            fn = call(backend, op, IMPLS[op][impl_i], t)
            for _ in range(calls):
                fn()
    finally:
        dist.destroy_process_group()


class Pair:
    """Rank 0 of a 2-process gloo group in this process, rank 1 a spawned :func:`follower`.

    :param backend: the backend whose collectives are measured (its ``dist_backend`` must be gloo).
    :param shapes_name: the shape set the follower reads its payload sizes from.
    :param dtype: the dtype of ``all_reduce`` payloads.
    """

    def __init__(self, backend: Backend, shapes_name: str, dtype: torch.dtype) -> None:
        if backend.capabilities.dist_backend != "gloo":
            raise BenchError(
                f"collective benchmarks run over a 2-process gloo group; backend {backend.name!r} uses "
                f"{backend.capabilities.dist_backend} (run its collectives under torchrun with one device per rank)"
            )
        if dist.is_initialized():
            raise BenchError("a torch.distributed process group already exists in this process")
        self.backend = backend
        port = _free_port()
        ctx = multiprocessing.get_context("spawn")
        self._proc = ctx.Process(
            target=follower, args=(port, backend.name, shapes_name, str(dtype).removeprefix("torch.")), daemon=True
        )
        self._proc.start()
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=WORLD, timeout=_TIMEOUT
        )

    def announce(self, op: str, shape_index: int, impl: str, calls: int) -> None:
        """Tell rank 1 to make ``calls`` calls of ``op`` at shape ``shape_index`` through ``impl``."""
        cmd = torch.tensor([_OPS.index(op), shape_index, IMPLS[op].index(impl), calls], dtype=torch.int64)
        dist.broadcast(cmd, src=0)

    def close(self) -> None:
        """Stop rank 1 and destroy the group."""
        try:
            if dist.is_initialized():
                dist.broadcast(torch.tensor([-1, 0, 0, 0], dtype=torch.int64), src=0)
                dist.destroy_process_group()
        finally:
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)
