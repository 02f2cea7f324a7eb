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

Expert parallelism's ``ep_dispatch`` (FP8 x with its scales) and ``ep_combine`` (bf16 rows) run on the
same shapes (the ``all_to_all`` shapes of kind ``dispatch`` and ``combine``) with a random routing of
every token to ``top_k`` of :data:`NUM_EXPERTS` experts, a deterministic function of the rank, so each
rank knows every rank's routing without communicating (the combine's handle is built that way: the
benchmark times the combine alone).

Each is compared with plain ``torch.distributed`` moving the same bytes (``all_reduce`` in place,
``all_to_all_single`` into a fresh output, as HAL's ``all_to_all`` returns one). For ``ep_dispatch`` and
``ep_combine`` there are two baselines, both one ``all_to_all_single`` of the routed rows with the op's
per-rank splits (dispatch: one row per (token, destination rank) of x, scales, expert ids and weights;
combine: the received rows back): ``torch.distributed.all_to_all_single`` with a rank's rows for itself
included, as a plain exchange of the payload copies them, and :data:`REMOTE_ROWS` without them, which
is the exchange HAL's normal mode actually makes. Over the first, the ratio is what the layer costs
over moving the payload by hand (the count exchange, routing, packing, the per-token sum) less what it
saves by keeping the own rows; over the second, what it costs over the bytes it sends, with nothing
saved. Both modes of the ops are timed against both baselines: ``hal``
(normal mode: a rank's own rows never travel) and ``hal-ll`` (low-latency mode, ``max_tokens_per_rank
= T``: one fixed-size exchange of ``T`` slots to each other rank, whatever the routing, while a rank's
own rows stay where they are written; its rows also carry every rank's local ids and weights); their
``wire_bytes`` say what they send. Bandwidths are reported the way nccl-tests does:
``algbw = bytes / t`` and ``busbw = algbw · 2(n-1)/n`` for all-reduce, ``algbw · (n-1)/n`` for
all-to-all; for ``ep_dispatch`` / ``ep_combine`` ``bytes`` is the anchors' formula (BENCHMARKS.md:
``tokens·top_k`` selected experts of ``hidden + hidden/128·4 + 16`` bytes for an FP8 dispatch,
``2·hidden`` for a bf16 combine), as DeepEP reports it, and ``wire_bytes`` what actually travels.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hal.backend import Backend
from hal.bench.shapes import Shape, ShapeSet, shape_set
from hal.errors import BenchError
from hal.types import DispatchHandle

__all__ = [
    "HAL_IMPLS",
    "IMPLS",
    "NUM_EXPERTS",
    "REMOTE_ROWS",
    "WORLD",
    "EpPayload",
    "Pair",
    "bandwidth",
    "call",
    "follower",
    "nbytes",
    "op_shapes",
    "payload",
    "threads_per_rank",
    "timed_rounds",
]

WORLD = 2
#: The second baseline of ``ep_dispatch`` / ``ep_combine``: one ``all_to_all_single`` of only the routed
#: rows that change rank (a rank's rows for itself stay out, as HAL's normal mode keeps them).
REMOTE_ROWS = "torch.distributed.all_to_all_single.remote-rows"
#: The implementations timed per collective: HAL's op, and plain torch.distributed on the same bytes.
IMPLS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("hal", "torch.distributed.all_reduce"),
    "all_to_all": ("hal", "torch.distributed.all_to_all_single"),
    "ep_dispatch": ("hal", "hal-ll", "torch.distributed.all_to_all_single", REMOTE_ROWS),
    "ep_combine": ("hal", "hal-ll", "torch.distributed.all_to_all_single", REMOTE_ROWS),
}
#: HAL implementations (the rest are baselines): ``hal-ll`` is the op's low-latency mode
#: (``max_tokens_per_rank`` = the tokens of a rank: one fixed-size exchange).
HAL_IMPLS = ("hal", "hal-ll")
_OPS = tuple(IMPLS)
_TIMEOUT = datetime.timedelta(seconds=120)
#: Routed experts of the expert-parallel benchmarks (DeepSeek-V3's 256), split evenly between the ranks.
NUM_EXPERTS = 256
_EP_KIND = {"ep_dispatch": "dispatch", "ep_combine": "combine"}


def op_shapes(shapes: ShapeSet, op: str) -> list[Shape]:
    """The shapes of ``op`` in ``shapes``; ``ep_dispatch`` / ``ep_combine`` take the matching ``all_to_all`` ones."""
    if op in _EP_KIND:
        return [s for s in shapes.shapes.get("all_to_all", ()) if s.params.get("kind") == _EP_KIND[op]]
    return list(shapes.shapes.get(op, ()))


@dataclass
class EpPayload:
    """One rank's inputs of an ``ep_dispatch`` or ``ep_combine`` benchmark, and its baseline's.

    :ivar x: FP8 [T, H] tokens (dispatch).
    :ivar x_scales: float32 [T, H / 128] their scales (dispatch).
    :ivar topk_ids: int64 [T, top_k] the routing (dispatch).
    :ivar topk_weights: float32 [T, top_k] (dispatch).
    :ivar y: bf16 [R, H] the received rows' results (combine).
    :ivar handle: the dispatch's handle, built locally from every rank's routing (combine).
    :ivar y_ll: bf16 [world * T, H], the same in low-latency mode (every slot).
    :ivar handle_ll: the low-latency dispatch's handle, built locally (combine).
    :ivar wire: uint8 rows of the bytes the op moves, for the plain ``all_to_all_single`` baseline.
    :ivar wire_send: rows of ``wire`` sent to each rank.
    :ivar wire_recv: rows received from each rank.
    :ivar wire_own: rows of ``wire`` this rank sends itself (the baseline copies them; HAL's ops keep them).
    :ivar formula_bytes: the anchors' bytes (``tokens·top_k·row_bytes``).
    """

    x: torch.Tensor
    x_scales: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    y: torch.Tensor
    handle: DispatchHandle
    y_ll: torch.Tensor
    handle_ll: DispatchHandle
    wire: torch.Tensor
    wire_send: list[int]
    wire_recv: list[int]
    wire_own: int
    formula_bytes: int


def _routing(rank: int, tokens: int, top_k: int) -> torch.Tensor:
    """Rank ``rank``'s routing: ``top_k`` distinct random experts per token (the same in every process)."""
    g = torch.Generator().manual_seed(rank)
    return torch.rand(tokens, NUM_EXPERTS, generator=g).argsort(dim=1)[:, :top_k]


def _goes(ids: torch.Tensor, world: int) -> torch.Tensor:
    """[world, T] bool: token t is sent to rank r (it selected one of r's experts)."""
    owner = ids // (NUM_EXPERTS // world)
    return torch.stack([(owner == r).any(dim=1) for r in range(world)])


def _ep_payload(op: str, shape: Shape, device: torch.device, rank: int, world: int) -> EpPayload:
    p = shape.params
    tokens, hidden, top_k = p["t"], p["h"], p["top_k"]
    if NUM_EXPERTS % world:
        raise BenchError(f"{op}: {world} ranks do not divide the {NUM_EXPERTS} experts evenly")
    goes = [_goes(_routing(r, tokens, top_k), world) for r in range(world)]
    ids = _routing(rank, tokens, top_k)
    send_index = goes[rank].nonzero(as_tuple=True)[1]
    send = [int(n) for n in goes[rank].sum(dim=1).tolist()]
    recv = [int(goes[src][rank].sum()) for src in range(world)]
    handle = DispatchHandle(send_index.to(device), send, recv, tokens)
    handle_ll = DispatchHandle.low_latency(~goes[rank].to(device), rank, tokens)  # max_tokens_per_rank = T
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, hidden, generator=g).to(torch.float8_e4m3fn)
    scales = torch.rand(tokens, hidden // 128, generator=g)
    weights = torch.rand(tokens, top_k, generator=g)
    y = torch.zeros(sum(recv), hidden, dtype=torch.bfloat16)
    if op == "ep_dispatch":
        # Per (token, destination) row: fp8 x, fp32 scales, int32 expert ids, fp32 weights (ep_dispatch's packed row).
        row = hidden + hidden // 128 * 4 + top_k * 8
        wire = torch.zeros(sum(send), row, dtype=torch.uint8)
        wire_send, wire_recv = send, recv
    else:
        wire = torch.zeros(sum(recv), 2 * hidden, dtype=torch.uint8)
        wire_send, wire_recv = recv, send
    return EpPayload(
        x=x.to(device),
        x_scales=scales.to(device),
        topk_ids=ids.to(device),
        topk_weights=weights.to(device),
        y=y.to(device),
        handle=handle,
        y_ll=torch.zeros(world * tokens, hidden, dtype=torch.bfloat16, device=device),
        handle_ll=handle_ll,
        wire=wire.to(device),
        wire_send=wire_send,
        wire_recv=wire_recv,
        wire_own=wire_send[rank],
        formula_bytes=tokens * top_k * p["row_bytes"],
    )


def payload(op: str, shape: Shape, dtype: torch.dtype, device: torch.device, rank: int = 0, world: int = WORLD) -> Any:
    """What rank ``rank`` of ``world`` contributes to ``op`` at ``shape``: a tensor, or an :class:`EpPayload`."""
    p = shape.params
    if op in _EP_KIND:
        return _ep_payload(op, shape, device, rank, world)
    if op == "all_reduce":
        return torch.zeros(p["t"], p["h"], dtype=dtype, device=device)
    if op == "all_to_all":
        rows = p["t"] * p["top_k"]
        rows -= rows % world
        return torch.zeros(rows, p["row_bytes"], dtype=torch.uint8, device=device)
    raise BenchError(f"no collective benchmark for {op!r}; known: {', '.join(_OPS)}")


def _ep_call(backend: Backend, op: str, impl: str, c: EpPayload) -> Callable[[], Any]:
    if impl in HAL_IMPLS:
        fn = backend.op(op)
        ll = impl == "hal-ll"
        if op == "ep_dispatch":
            cap = c.x.shape[0] if ll else None
            return lambda: fn(
                c.x, c.topk_ids, c.topk_weights, num_experts=NUM_EXPERTS, x_scales=c.x_scales, max_tokens_per_rank=cap
            )
        y, handle = (c.y_ll, c.handle_ll) if ll else (c.y, c.handle)
        return lambda: fn(y, handle)

    send, recv, wire = c.wire_send, c.wire_recv, c.wire
    if impl == REMOTE_ROWS:  # the own rows out: the exchange HAL's normal mode makes of the payload
        rank = dist.get_rank()
        send = [0 if r == rank else n for r, n in enumerate(send)]
        recv = [0 if r == rank else n for r, n in enumerate(recv)]
        wire = c.wire.new_zeros(sum(send), c.wire.shape[1])

    def all_to_all_single() -> torch.Tensor:
        out = wire.new_empty(sum(recv), wire.shape[1])
        dist.all_to_all_single(out, wire, output_split_sizes=recv, input_split_sizes=send)
        return out

    return all_to_all_single


def call(backend: Backend, op: str, impl: str, t: Any) -> Callable[[], Any]:
    """A no-argument call of ``op`` on ``t`` (a :func:`payload`) through ``impl``: ``"hal"`` or plain torch."""
    if isinstance(t, EpPayload):
        return _ep_call(backend, op, impl, t)
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


def nbytes(t: Any) -> int:
    """The bytes one call moves by the anchors' formulas: the tensor's, or an :class:`EpPayload`'s formula bytes."""
    if isinstance(t, EpPayload):
        return t.formula_bytes
    return int(t.numel() * t.element_size())


def bandwidth(op: str, t: Any, seconds: float, impl: str = "hal", world: int = WORLD) -> dict[str, float]:
    """``bytes``, ``algbw_gbps`` and ``busbw_gbps`` (nccl-tests' conventions) of one call taking ``seconds``.

    For ``ep_dispatch`` / ``ep_combine`` also ``wire_bytes`` (what this rank really sends to the other
    ranks: the routed rows less its own for ``hal``, the ``(world - 1) · T`` slots of the other ranks for
    ``hal-ll``, every routed row for the baseline, whose ``all_to_all_single`` copies a rank's own rows
    to itself) and its rate.
    """
    size = nbytes(t)
    alg = size / seconds / 1e9
    factor = 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
    out = {"bytes": float(size), "algbw_gbps": alg, "busbw_gbps": alg * factor}
    if isinstance(t, EpPayload):
        wire = t.wire.numel() * t.wire.element_size()
        if impl in ("hal", REMOTE_ROWS):  # the own rows stay
            wire -= t.wire_own * t.wire.shape[1]
        if impl == "hal-ll":  # T slots to each other rank; a dispatch row carries every rank's ids and weights
            top_k = t.topk_ids.shape[1]
            # The reference's low-latency row: x, scales, then int64 ids and fp32 weights (12 bytes an
            # expert) for every rank up to 4 ranks, once above (its PER_RANK_ROUTING_MAX_WORLD), in place
            # of the baseline row's int32 ids and fp32 weights (8 bytes an expert).
            copies = world if world <= 4 else 1
            row = t.wire.shape[1] - top_k * 8 + copies * top_k * 12 if op == "ep_dispatch" else t.wire.shape[1]
            wire = (world - 1) * t.x.shape[0] * row
        out.update({"wire_bytes": float(wire), "wire_gbps": wire / seconds / 1e9})
    return out


def threads_per_rank(ranks: int = WORLD) -> int:
    """Intra-op threads for each of ``ranks`` processes sharing this host's cores: each gets its share
    (oversubscribed OpenMP threads spin against the other ranks and make the ops' host work many times
    slower)."""
    return max(1, (os.cpu_count() or 1) // ranks)


def timed_rounds(size: int) -> int:
    """Timed calls of a collective benchmark case moving ``size`` bytes: 5 to 50, fewer for larger payloads."""
    return max(5, min(50, int(2e8 / max(size, 1))))


def follower(port: int, backend_name: str, shapes_name: str, dtype_name: str) -> None:
    """Rank 1: join the group through rank 0's store on ``port``, then make the calls rank 0 announces
    until told to stop."""
    import hal

    torch.set_num_threads(threads_per_rank())
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False, timeout=_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=1, world_size=WORLD, timeout=_TIMEOUT)
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
            t = payload(op, op_shapes(shapes, op)[shape_i], dtype, backend.device, rank=1)
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
        self._threads = torch.get_num_threads()
        torch.set_num_threads(threads_per_rank())
        # Rank 0 hosts the rendezvous store on a port the OS assigns as it binds (no free-port race with
        # anything started at the same time); rank 1 connects to it.
        store = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, timeout=_TIMEOUT, wait_for_workers=False)
        ctx = multiprocessing.get_context("spawn")
        args = (store.port, backend.name, shapes_name, str(dtype).removeprefix("torch."))
        self._proc = ctx.Process(target=follower, args=args, daemon=True)
        self._proc.start()
        dist.init_process_group("gloo", store=store, rank=0, world_size=WORLD, timeout=_TIMEOUT)

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
            torch.set_num_threads(self._threads)
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)
