"""Reference collectives: plain ``torch.distributed``, valid for any process group on any device.

These are the fallback of every backend, so they use only what every torch.distributed backend
(gloo, nccl, RCCL, hccl) offers, and work around what some lack:

- gloo rejects fp8 tensors, and fp8 support varies between transports; gloo carries no int16, uint16,
  uint32 or uint64 either. Collectives that only move bytes (all_gather, all_to_all, broadcast) send
  1-byte float tensors as ``uint8`` views, and tensors of any other dtype outside the common set (bool,
  int8, uint8, int32, int64, fp16, bf16, fp32, fp64, complex) as ``uint8`` views of their last dim,
  and view the result back: bit-exact and valid on every transport. Reductions of fp8, int16 and
  uint16/32/64 are refused by the catalogue.
- ``ReduceOp.AVG`` is missing from gloo in older torch versions, and gloo's (torch 2.13) fails on
  integer tensors, so ``"avg"`` is a SUM followed by a division by the group's size.
- gloo's ``reduce_scatter_tensor`` before torch 2.9 ignores ``op`` and always sums (its all-reduce
  is called without the options); on gloo, ``"max"`` and ``"min"`` therefore go through an explicit
  all-reduce of a copy and take this rank's chunk, which is what gloo does internally anyway.
- Transports need contiguous buffers; a non-contiguous in-place argument is reduced or received in a
  contiguous copy that is copied back into it.
- Expert parallelism (``ep_dispatch`` / ``ep_combine``, DeepEP's normal mode) is built from the same
  pieces: one ``all_to_all_single`` of the per-rank row counts (asynchronous: it travels while the rows
  are packed; the host needs the counts for the splits), then one ``all_to_all_single`` of the rows
  packed as bytes (x, its scales, the global expert ids and the weights side by side in one ``uint8``
  row, each field 8-byte aligned so the receiver reads them as views; a rank's rows for itself are
  written in place and never sent), so a dispatch costs two collectives whatever it carries; a combine
  costs one. The low-latency mode (``max_tokens_per_rank``, DeepEP's ``low_latency_dispatch`` for
  decode) drops the count exchange: every rank sends a fixed ``M`` rows to every other rank in one
  exchange (its own rows stay where they were written), so a dispatch costs one collective too.

Inputs are validated by :mod:`hal.ops.catalogue` before these run. A transport failure (a peer that
exited, a collective that stalled past the process group's timeout) is raised as
:class:`hal.errors.CollectiveError` naming the collective and this rank (:func:`hal.distributed.collective_guard`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from hal.distributed import collective_guard
from hal.errors import LayoutError
from hal.types import Dispatched, DispatchHandle

__all__ = [
    "all_gather",
    "all_reduce",
    "all_to_all",
    "barrier",
    "broadcast",
    "ep_combine",
    "ep_dispatch",
    "reduce_scatter",
]

# "avg" is absent on purpose: it is a SUM followed by a division (see the module docstring).
_REDUCE_OPS: dict[str, Any] = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

# Recent torch (2.13 here) renamed the tensor-in, tensor-out collectives and the old names warn; the
# project supports torch from 2.6, and older versions have only the old names.
_all_gather_tensor: Callable[..., Any] = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor: Callable[..., Any] = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# The dtypes the transports carry as they are (gloo, the narrowest, carries exactly these, torch 2.13);
# _wire sends any other as bytes.
_NATIVE = frozenset(
    {torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32}
    | {torch.float64, torch.complex64, torch.complex128}
)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous, with the canonical strides on size-1 dims too (a view when ``t`` is contiguous).

    ``is_contiguous()`` ignores the stride of a size-1 dim: ``x[:1, 1]`` (stride (4,)) and
    ``ids[None].t()`` (``[T, 1]``, strides (1, T)) are contiguous, and ``contiguous()``, ``clone()`` and
    ``view(-1)`` keep their strides, which a byte view of the last dim refuses. Their elements lie where
    the canonical strides put them, so a view with those strides reads the same memory.
    """
    t = t.contiguous()
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= max(size, 1)
    return t.as_strided(t.shape, strides[::-1])


def _wire(t: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous) as the transport can carry it: fp8 (and any 1-byte float) as a ``uint8`` view, a
    dtype some transport lacks (int16, uint16/32/64 on gloo) as a ``uint8`` view of its last dim.

    The byte view keeps dim 0, which all_gather concatenates and all_to_all splits by rows, so a 0-dim
    or 1-D tensor is first viewed as ``[n, 1]`` (its rows then become ``[n, itemsize]`` bytes). A view,
    never a copy: what the transport writes into it lands in ``t``.
    """
    if t.dtype in _NATIVE:
        return t
    if t.dtype.itemsize == 1:
        return t.view(torch.uint8)
    return _dense(t).view(t.shape if t.dim() >= 2 else (-1, 1)).view(torch.uint8)


def _reduce_op(op: str) -> Any:
    return _REDUCE_OPS["sum" if op == "avg" else op]


def _finish_avg(t: torch.Tensor, op: str, group: Any) -> None:
    """Turn a SUM into the mean for ``op == "avg"``, in place."""
    if op != "avg":
        return
    world = dist.get_world_size(group)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t.div_(world)
    else:
        # An integer tensor has to hold an integer mean: truncate towards zero, as C integer division does.
        t.div_(world, rounding_mode="trunc")


@collective_guard("all_reduce")
def all_reduce(t: torch.Tensor, *, op: str = "sum", group: Any = None) -> torch.Tensor:
    """Reduce ``t`` across the ranks of ``group``, in place; see :func:`hal.ops.catalogue.all_reduce`."""
    buf = t if t.is_contiguous() else t.contiguous()
    dist.all_reduce(buf, op=_reduce_op(op), group=group)
    _finish_avg(buf, op, group)
    if buf is not t:
        t.copy_(buf)
    return t


@collective_guard("all_gather")
def all_gather(t: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0; see :func:`hal.ops.catalogue.all_gather`."""
    world = dist.get_world_size(group)
    out = torch.empty((world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    _all_gather_tensor(_wire(out), _wire(t.contiguous()), group=group)
    return out


@collective_guard("reduce_scatter")
def reduce_scatter(t: torch.Tensor, *, op: str = "sum", group: Any = None) -> torch.Tensor:
    """Reduce ``t`` across ranks and keep this rank's chunk; see :func:`hal.ops.catalogue.reduce_scatter`.

    ``t`` is left unchanged. gloo serves this as an all-reduce of a copy followed by taking the chunk
    (twice the traffic of a true reduce-scatter); that is fine for the CPU and for tests.
    """
    world = dist.get_world_size(group)
    if op in ("max", "min") and dist.get_backend(group) == "gloo":
        full = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(full, op=_reduce_op(op), group=group)
        return full.chunk(world)[dist.get_rank(group)].clone()
    out = torch.empty((t.shape[0] // world, *t.shape[1:]), dtype=t.dtype, device=t.device)
    _reduce_scatter_tensor(out, t.contiguous(), op=_reduce_op(op), group=group)
    _finish_avg(out, op, group)
    return out


@collective_guard("all_to_all")
def all_to_all(
    t: torch.Tensor,
    *,
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
    group: Any = None,
) -> torch.Tensor:
    """Exchange rows of ``t`` between ranks (``all_to_all_single``); see :func:`hal.ops.catalogue.all_to_all`."""
    # Without output_split_sizes every rank sends this rank equally many rows: as many as t has.
    rows = t.shape[0] if output_split_sizes is None else sum(output_split_sizes)
    out = torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_to_all_single(
        _wire(out),
        _wire(t.contiguous()),
        output_split_sizes=None if output_split_sizes is None else list(output_split_sizes),
        input_split_sizes=None if input_split_sizes is None else list(input_split_sizes),
        group=group,
    )
    return out


@collective_guard("broadcast")
def broadcast(t: torch.Tensor, *, src: int = 0, group: Any = None) -> torch.Tensor:
    """Copy rank ``src``'s ``t`` into every rank's ``t``, in place; see :func:`hal.ops.catalogue.broadcast`."""
    buf = t if t.is_contiguous() else t.contiguous()
    dist.broadcast(_wire(buf), src=src, group=group)
    if buf is not t:
        t.copy_(buf)
    return t


@collective_guard("barrier")
def barrier(*, group: Any = None) -> None:
    """Wait until every rank of ``group`` has reached the barrier; see :func:`hal.ops.catalogue.barrier`."""
    dist.barrier(group=group)


# -- expert parallelism ------------------------------------------------------------------------------


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A 2-D ``[n, m]`` tensor as ``[n, m * itemsize]`` bytes (a view when ``t`` is contiguous)."""
    return _dense(t).view(torch.uint8)


def _unbytes(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`_bytes` on a column slice of packed byte rows: a view where the slice's
    offset and row stride suit ``dtype`` (the packing aligns them), else a copy."""
    width = b.shape[1] // dtype.itemsize
    if b.shape[0] == 0:  # an empty slice keeps the packed row's stride, which view() may refuse
        return torch.empty(0, width, dtype=dtype, device=b.device)
    try:
        return b.view(dtype)
    except RuntimeError:  # offset or stride not a multiple of the itemsize
        return b.contiguous().view(dtype)


def _aligned(n: int) -> int:
    """``n`` rounded up to 8 bytes: every field of a packed row starts on a multiple of 8, so the receiver
    reads scales, ids and weights as views of the received bytes."""
    return -(-n // 8) * 8


def _packed_fields(
    x: torch.Tensor, x_scales: torch.Tensor | None, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> tuple[list[torch.Tensor], list[int]]:
    """Each token's dispatch fields as bytes ``[x | x_scales | global ids (int32) | weights]`` and each
    field's width in the packed row (8-byte aligned)."""
    fields = [x] + ([x_scales.to(torch.float32)] if x_scales is not None else [])
    fields += [topk_ids.to(torch.int32), topk_weights.to(torch.float32)]
    packed = [_bytes(f) for f in fields]
    return packed, [_aligned(p.shape[1]) for p in packed]


def _gather_rows(out: torch.Tensor, packed: list[torch.Tensor], widths: list[int], index: torch.Tensor) -> None:
    """``out[i]`` = the packed row of token ``index[i]``: each field's selected rows go straight into its
    columns of ``out`` (one ``index_select`` per field, written through ``out``'s strides), so no packed
    table of every token is built first; alignment padding between fields is zeroed."""
    at = 0
    for p, w in zip(packed, widths, strict=True):
        torch.index_select(p, 0, index, out=out[:, at : at + p.shape[1]])
        if w > p.shape[1]:
            out[:, at + p.shape[1] : at + w].zero_()
        at += w


def _write_rows(out: torch.Tensor, packed: list[torch.Tensor], widths: list[int]) -> torch.Tensor:
    """Write the packed fields side by side into ``out [..., T, sum(widths)]`` (broadcast over leading dims)."""
    at = 0
    for p, w in zip(packed, widths, strict=True):
        out[..., : p.shape[0], at : at + p.shape[1]] = p
        at += w
    return out


def _unpack(
    recv: torch.Tensor,
    packed: list[torch.Tensor],
    widths: list[int],
    dtype: torch.dtype,
    has_scales: bool,
    rank: int,
    local: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Received packed rows → ``(x, x_scales, local ids (-1: another rank's), weights (0 there))``."""
    cols = recv.split(widths, dim=1)
    cols = [c[:, : p.shape[1]] for c, p in zip(cols, packed, strict=True)]
    got_x = _unbytes(cols[0], dtype)  # a view: rows strided by the packed row (kernels take a row stride)
    got_scales = _unbytes(cols[1], torch.float32) if has_scales else None
    got_ids = _unbytes(cols[-2], torch.int32).long() - rank * local
    mine = (got_ids >= 0) & (got_ids < local)
    got_ids = got_ids.masked_fill_(~mine, -1)
    got_w = _unbytes(cols[-1], torch.float32).masked_fill(~mine, 0.0)
    return got_x, got_scales, got_ids, got_w


@collective_guard("ep_dispatch")
def ep_dispatch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    x_scales: torch.Tensor | None = None,
    max_tokens_per_rank: int | None = None,
    group: Any = None,
) -> Dispatched:
    """Send each token once to every rank owning one of its experts; see :func:`hal.ops.catalogue.ep_dispatch`.

    The rows sent to a rank are ordered by token index, and ``all_to_all_single`` concatenates what
    arrives in source-rank order, which gives ``Dispatched``'s order (source rank, then source token).

    Cost: two collectives, the row counts (started asynchronously, so its latency overlaps the packing)
    and the rows. A row is the token's bytes ``[x | x_scales | global ids (int32) | weights]`` (fields
    8-byte aligned). The metadata fields are packed into one small table; the rows for the other ranks
    are gathered per destination, x and that table each straight into their columns of the send buffer
    (:func:`_gather_rows`: one pass over the x bytes, no packed copy of every token's x first). This
    rank's own rows never travel: they are gathered the same way straight into their place in the
    receive buffer (:func:`_exchange_around_own`). The receiver turns global ids into local ones
    (``-1`` and weight 0 for another rank's experts) and reads the metadata as views of the received
    bytes. With ``max_tokens_per_rank`` (low-latency mode) see :func:`_dispatch_low_latency`: one
    collective.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    local = num_experts // world
    num_tokens = topk_ids.shape[0]
    dev = x.device
    if max_tokens_per_rank is not None:
        ll = (num_experts, max_tokens_per_rank, world, rank)
        return _dispatch_low_latency(x, x_scales, topk_ids, topk_weights, *ll, group)
    packed, widths = _packed_fields(x, x_scales, topk_ids, topk_weights)
    goes = _destinations(topk_ids, local, world)  # each token is sent once to each of them
    # Each rank's row count for each other rank, with this rank's layout beside it: ranks that disagree
    # on it would exchange rows of different sizes (gloo aborts the process, or a receiver reads garbage),
    # so every rank compares the others' layout with its own before the rows travel.
    layout = _layout(x, x_scales, topk_ids, num_experts)
    meta = torch.cat([goes.sum(dim=1, keepdim=True), layout.expand(world, -1)], dim=1)  # [world, 1 + fields]
    recv_meta = torch.empty_like(meta)
    pending = dist.all_to_all_single(recv_meta, meta, group=group, async_op=True)
    send_counts = meta[:, 0]

    # While the counts travel: the packed rows each other rank gets, by rank, gathered as two column
    # blocks, x and the small metadata fields side by side (one table of those, not of the x bytes).
    row = sum(widths)
    if widths[1:] == [p.shape[1] for p in packed[1:]]:
        meta = torch.cat(packed[1:], dim=1)
    else:  # a field to pad (a top_k of 1, an odd hidden / 128)
        meta = _write_rows(
            torch.zeros(num_tokens, row - widths[0], dtype=torch.uint8, device=dev), packed[1:], widths[1:]
        )
    blocks, block_widths = [packed[0], meta], [widths[0], row - widths[0]]
    send_index = goes.nonzero()[:, 1]  # row-major: by destination rank, then token
    send_list = [int(c) for c in send_counts.tolist()]
    lo, hi = sum(send_list[:rank]), sum(send_list[: rank + 1])  # this rank's own rows in send order
    others = torch.cat([send_index[:lo], send_index[hi:]])
    send = torch.empty(others.shape[0], row, dtype=torch.uint8, device=dev)
    _gather_rows(send, blocks, block_widths, others)

    pending.wait()
    _check_layouts(recv_meta[:, 1:], layout, rank)
    recv_counts = [int(c) for c in recv_meta[:, 0].tolist()]
    recv = torch.empty(sum(recv_counts), row, dtype=torch.uint8, device=dev)
    own = _exchange_around_own(recv, send, recv_counts, send_list, rank, group)
    _gather_rows(own, blocks, block_widths, send_index[lo:hi])

    got = _unpack(recv, packed, widths, x.dtype, x_scales is not None, rank, local)
    handle = DispatchHandle(
        send_index=send_index, send_counts=send_list, recv_counts=recv_counts, num_tokens=num_tokens
    )
    return Dispatched(*got, handle)


#: What every rank's dispatch must agree on (the order :func:`_layout` writes it), and the argument each is of.
_LAYOUT_FIELDS = (
    ("x", "x's hidden size"),
    ("x", "x's dtype"),
    ("x_scales", "x_scales' columns (-1: none)"),
    ("topk_ids", "top_k"),
    ("num_experts", "num_experts"),
)
#: Dtype codes in the layout: the index here, or ``1000 + itemsize`` for another dtype.
_DTYPE_CODES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn)
_DTYPE_CODES += (torch.float8_e4m3fnuz, torch.float8_e5m2, torch.int8, torch.uint8, torch.int32, torch.int64)


def _layout(x: torch.Tensor, x_scales: torch.Tensor | None, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [1, len(_LAYOUT_FIELDS)] on ``topk_ids``' device: this rank's dispatch layout."""
    dtype = _DTYPE_CODES.index(x.dtype) if x.dtype in _DTYPE_CODES else 1000 + x.element_size()
    scales = -1 if x_scales is None else x_scales.shape[1]
    fields = [[x.shape[1], dtype, scales, topk_ids.shape[1], num_experts]]
    return torch.tensor(fields, dtype=torch.int64, device=topk_ids.device)  # beside the counts, on the device


def _check_layouts(theirs: torch.Tensor, mine: torch.Tensor, rank: int) -> None:
    """Raise if another rank's layout differs from this one's: every rank compares the others with itself,
    so every rank raises, and before the rows travel."""
    if bool((theirs == mine).all()):
        return
    r, f = (int(i) for i in (theirs != mine).nonzero()[0])
    got, want = int(theirs[r, f]), int(mine[0, f])

    def shown(v: int) -> str:
        if f != 1:
            return str(v)
        return str(_DTYPE_CODES[v]).removeprefix("torch.") if 0 <= v < len(_DTYPE_CODES) else f"{v - 1000}-byte"

    arg, what = _LAYOUT_FIELDS[f]
    raise LayoutError(
        "ep_dispatch",
        arg,
        f"every rank must dispatch the same layout, but {what} is {shown(got)} on rank {r} and {shown(want)} "
        f"on this rank ({rank})",
    )


def _destinations(topk_ids: torch.Tensor, per_rank: int, world: int) -> torch.Tensor:
    """bool [world, T]: token ``t`` selected at least one of rank ``r``'s experts."""
    owner = torch.div(topk_ids, per_rank, rounding_mode="floor").long()
    return torch.zeros(world, topk_ids.shape[0], dtype=torch.bool, device=topk_ids.device).scatter_(0, owner.t(), True)


def _exchange_around_own(
    out: torch.Tensor, send: torch.Tensor, out_splits: list[int], in_splits: list[int], rank: int, group: Any
) -> torch.Tensor:
    """``all_to_all_single`` of every rank's rows but this rank's own, which never travel.

    ``send`` holds the rows for the other ranks (``in_splits`` without this rank's); the other ranks'
    rows arrive in ``out`` in rank order around this rank's block of ``out_splits[rank]`` rows, which is
    left for the caller to fill and returned (a view). The exchange needs one contiguous output: the
    rows from later ranks land right after the earlier ones and, when the own block sits between the
    two (a middle rank of three or more), are moved past it.
    """
    before, own = sum(out_splits[:rank]), out_splits[rank]
    after = sum(out_splits[rank + 1 :])
    region = out[own:] if before == 0 else out[: before + after]
    out_skip, in_skip = list(out_splits), list(in_splits)
    out_skip[rank] = in_skip[rank] = 0
    dist.all_to_all_single(_bytes(region), _bytes(send), out_skip, in_skip, group=group)
    if before and own and after:
        out[before + own :] = region[before:].clone()
    return out[before : before + own]


@functools.lru_cache(maxsize=64)
def _local_ids(num_experts: int, world: int, device: torch.device) -> torch.Tensor:
    """int64 [world, E + 1]: expert ``e``'s id on rank ``r`` (``-1``: another rank's); the id ``E`` marks an
    empty slot, nobody's."""
    per_rank = num_experts // world
    ids = torch.arange(num_experts, device=device)
    ranks = torch.arange(world, device=device).unsqueeze(1)
    local = torch.where(ids // per_rank == ranks, ids - ranks * per_rank, -1)
    return torch.cat([local, local.new_full((world, 1), -1)], dim=1)


#: Up to this many ranks, a low-latency row carries every rank's local ids and weights (``world · top_k ·
#: 12`` bytes) so that nothing is left to do after the exchange; above it, the global ids and the raw
#: weights (``top_k · 12`` bytes), mapped to local ones by one lookup on arrival.
PER_RANK_ROUTING_MAX_WORLD = 4


def _remote_splits(world: int, rank: int, rows: int) -> list[int]:
    """All-to-all splits that skip this rank: ``rows`` to (from) every other rank, 0 to (from) itself."""
    return [0 if r == rank else rows for r in range(world)]


def _dispatch_low_latency(
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    max_tokens: int,
    world: int,
    rank: int,
    group: Any,
) -> Dispatched:
    """Low-latency mode: every rank's whole token table, padded to ``max_tokens`` rows, goes to every
    other rank in one ``all_to_all_single`` of fixed splits (no count exchange: the sizes are known to
    all).

    - The table is written once, straight into the first block of the receive buffer (this rank's own
      slots, which never travel); that block is what is sent (repeated for more than one other rank),
      and the other ranks' tables arrive behind it.
    - Up to :data:`PER_RANK_ROUTING_MAX_WORLD` ranks, a row carries, besides x and its scales, every
      rank's view of the token's routing: its experts as that rank's local ids (int64, ``-1`` for
      another rank's) and the weights (0 there), from one table lookup per rank on the sender. The
      received ids and weights are then what the local experts take, and every output is a view made
      before the exchange: nothing is left to do once it arrives. With more ranks (where that would
      grow every row by ``world · top_k · 12`` bytes) a row carries the global ids and the weights, and
      one lookup and one mask on arrival make them local.
    - The combine's bookkeeping (which results to ignore) is done before the exchange.
    - Slots past ``T`` are zeros with ids ``-1`` (or the empty id ``E``, which maps to ``-1``).
    """
    num_tokens, top_k, dev = topk_ids.shape[0], topk_ids.shape[1], topk_ids.device
    local_of = _local_ids(num_experts, world, dev)
    flat_ids = topk_ids.reshape(-1)
    weights = topk_weights.to(torch.float32)
    per_rank = world <= PER_RANK_ROUTING_MAX_WORLD
    if per_rank:
        local = [local_of[r].index_select(0, flat_ids).view(num_tokens, top_k) for r in range(world)]
        routing = local + [weights.masked_fill(ids < 0, 0.0) for ids in local]
    else:
        routing = [topk_ids.to(torch.int64), weights]
    fields = [x] + ([x_scales.to(torch.float32)] if x_scales is not None else []) + routing
    packed = [_bytes(f) for f in fields]
    widths = [_aligned(p.shape[1]) for p in packed]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    first_id = len(fields) - len(routing)  # the first ids field
    ids_at = starts[first_id + rank] if per_rank else starts[first_id]
    w_at = starts[first_id + world + rank] if per_rank else starts[first_id + 1]
    row, rows = sum(widths), world * max_tokens
    recv = torch.empty(rows, row, dtype=torch.uint8, device=dev)
    own = recv[:max_tokens]
    if num_tokens < max_tokens:
        own[num_tokens:].zero_()
        for f in range(first_id, first_id + (world if per_rank else 1)):  # nobody's: -1, or the empty id E
            own[num_tokens:, starts[f] : starts[f] + 8 * top_k].view(torch.int64).fill_(-1 if per_rank else num_experts)
    _write_rows(own, packed, widths)

    # The outputs, as views of the slots (x's row stride is the packed row's).
    got_x = recv[:, : packed[0].shape[1]].view(x.dtype)
    got_scales = None
    if x_scales is not None:
        got_scales = recv[:, starts[1] : starts[1] + packed[1].shape[1]].view(torch.float32)
    got_ids = recv[:, ids_at : ids_at + 8 * top_k].view(torch.int64)
    got_w = recv[:, w_at : w_at + 4 * top_k].view(torch.float32)

    # The combine's bookkeeping: which tokens selected none of each rank's experts.
    skipped = _destinations(topk_ids, num_experts // world, world).logical_not_()
    handle = DispatchHandle.low_latency(skipped, rank, max_tokens)

    if world > 1:
        # One copy of the own block per other rank (``expand(...).reshape`` would give a strided view,
        # not a copy, when the block is one row: the transports take contiguous buffers only).
        send = own if world == 2 else own.repeat(world - 1, 1)
        splits = _remote_splits(world, rank, max_tokens)
        dist.all_to_all_single(recv[max_tokens:], send, splits, splits, group=group)
    if not per_rank:  # global ids and raw weights arrived: make them this rank's
        got_ids = local_of[rank].index_select(0, got_ids.reshape(-1)).view(rows, top_k)
        got_w = got_w.masked_fill(got_ids < 0, 0.0)
    return Dispatched(got_x, got_scales, got_ids, got_w, handle)


@collective_guard("ep_combine")
def ep_combine(y: torch.Tensor, handle: DispatchHandle, *, group: Any = None) -> torch.Tensor:
    """Send every received row's result back and sum per token; see :func:`hal.ops.catalogue.ep_combine`.

    The reverse of the dispatch's exchange (splits swapped), again without this rank's own rows, whose
    results are read where they are in ``y``. A token gets at most one row back from each rank it was
    sent to, so its sum has at most ``world`` terms, added in source-rank order by one ``index_add_``
    per rank's block (:func:`_sum_by_token`). With two ranks the sums run in y's dtype, which for bf16 /
    fp16 is the fp32 sum rounded once, as an fp32 accumulation gives (and no fp32 copy of the rows is
    made); with more they run in fp32.

    Low-latency mode (:func:`_combine_low_latency`): the own block stays, one fixed-split exchange brings
    back the other ranks' ``M`` rows each, and the terms are added in rank order the same way, so both
    modes give the same sums.
    """
    if handle.max_tokens_per_rank is not None:
        return _combine_low_latency(y, handle, group)
    rank = dist.get_rank(group)
    back_splits, y_splits = list(handle.send_counts), list(handle.recv_counts)
    lo, hi = sum(y_splits[:rank]), sum(y_splits[: rank + 1])  # the own rows' results in y
    send = y[hi:] if lo == 0 else y[:lo] if hi == y.shape[0] else torch.cat([y[:lo], y[hi:]])
    back_splits[rank] = y_splits[rank] = 0
    back = torch.empty(sum(back_splits), y.shape[1], dtype=y.dtype, device=y.device)
    dist.all_to_all_single(_bytes(back), _bytes(send), back_splits, y_splits, group=group)
    blocks = list(back.split(back_splits))
    blocks[rank] = y[lo:hi]
    return _sum_by_token(blocks, handle.send_index.to(device=y.device), handle.num_tokens)


def _combine_low_latency(y: torch.Tensor, handle: DispatchHandle, group: Any) -> torch.Tensor:
    """Low-latency combine: the own block of ``y`` stays; the others go back to their ranks in one
    fixed-split exchange. Token ``t``'s terms are added in rank order with the ignored slots left out
    (the other ranks' are zeroed on arrival; the tokens that chose none of this rank's experts are summed
    again afterwards without the own term, so ``y`` is never copied), which gives the normal mode's sums.
    With two ranks the sum is made in the receive buffer and the result is a view of it."""
    world, hidden, tokens, m = len(handle.send_counts), y.shape[1], handle.num_tokens, handle.max_tokens_per_rank
    assert m is not None and handle.remote_ignored is not None  # low-latency handles carry both
    own_ignored = handle.send_index.to(device=y.device)
    own = y[:tokens]
    if world == 1:
        return own.clone().index_fill_(0, own_ignored, 0)
    rank = dist.get_rank(group)
    back = torch.empty((world - 1) * m, hidden, dtype=y.dtype, device=y.device)
    splits = _remote_splits(world, rank, m)
    dist.all_to_all_single(_bytes(back), _bytes(y[m:]), splits, splits, group=group)
    back.index_fill_(0, handle.remote_ignored.to(device=y.device), 0)
    remote = list(back.view(world - 1, m, hidden)[:, :tokens])
    if world == 2:  # one term from each rank: the own one is added in place to the received rows (a + b is
        # b + a, bit for bit), so no [T, H] output is allocated (first-touching one costs about as much as the sum)
        kept = remote[0].index_select(0, own_ignored)
        return remote[0].add_(own).index_copy_(0, own_ignored, kept)
    out = _add_in_order([*remote[:rank], own, *remote[rank:]], y.dtype)  # rank order
    if own_ignored.numel():
        out.index_copy_(0, own_ignored, _add_in_order([r.index_select(0, own_ignored) for r in remote], y.dtype))
    return out


def _add_in_order(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``parts[0] + parts[1] + ...`` in that order as a new tensor: two terms in ``dtype`` (for bf16 / fp16
    the fp32 sum rounded once), more accumulated in fp32 and rounded once."""
    if len(parts) == 1:
        return parts[0].clone()
    if len(parts) == 2:
        return parts[0] + parts[1]
    out = parts[0].to(torch.float32, copy=True)
    for p in parts[1:]:
        out += p
    return out.to(dtype)


def _sum_by_token(blocks: list[torch.Tensor], token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``out[t] = Σ`` of the rows of token ``t`` in ``blocks``, in block order, fp32-accurate.

    :param blocks: ``[n_i, H]`` rows, one block per rank in rank order, all of one dtype.
    :param token: int64 ``[Σ n_i]``, each row's token, the blocks one after another; a token appears at
        most once in a block.
    :returns: the blocks' dtype ``[num_tokens, H]``.

    One ``index_add_`` per block into a zero output: within a block the tokens are distinct, so each
    token's terms are added in block order. With at most two blocks a token has at most two terms, and
    ``0 + a + b`` in the blocks' dtype is the fp32 sum rounded once; with more, the sum runs in fp32.
    """
    dtype, hidden = blocks[0].dtype, blocks[0].shape[1]
    acc_dtype = dtype if len(blocks) <= 2 else torch.float32
    out = torch.zeros(num_tokens, hidden, dtype=acc_dtype, device=blocks[0].device)
    start = 0
    for rows in blocks:
        n = rows.shape[0]
        if n:
            out.index_add_(0, token[start : start + n], rows.to(acc_dtype))
        start += n
    return out.to(dtype)
