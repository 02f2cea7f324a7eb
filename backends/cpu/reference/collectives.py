"""Reference collectives: plain ``torch.distributed``, valid for any process group on any device.

These are the fallback of every backend, so they use only what every torch.distributed backend
(gloo, nccl, RCCL, hccl) offers, and work around what some lack:

- gloo rejects fp8 tensors, and fp8 support varies between transports. Collectives that only move
  bytes (all_gather, all_to_all, broadcast) send 1-byte float tensors as ``uint8`` views and view the
  result back: bit-exact and valid on every transport. Reductions of fp8 are refused by the catalogue.
- ``ReduceOp.AVG`` is missing from gloo in older torch versions, and gloo's (torch 2.13) fails on
  integer tensors, so ``"avg"`` is a SUM followed by a division by the group's size.
- gloo's ``reduce_scatter_tensor`` before torch 2.9 ignores ``op`` and always sums (its all-reduce
  is called without the options); on gloo, ``"max"`` and ``"min"`` therefore go through an explicit
  all-reduce of a copy and take this rank's chunk, which is what gloo does internally anyway.
- Transports need contiguous buffers; a non-contiguous in-place argument is reduced or received in a
  contiguous copy that is copied back into it.

Inputs are validated by :mod:`hal.ops.catalogue` before these run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather", "all_reduce", "all_to_all", "barrier", "broadcast", "reduce_scatter"]

# "avg" is absent on purpose: it is a SUM followed by a division (see the module docstring).
_REDUCE_OPS: dict[str, Any] = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

# Recent torch (2.13 here) renamed the tensor-in, tensor-out collectives and the old names warn; the
# project supports torch from 2.6, and older versions have only the old names.
_all_gather_tensor: Callable[..., Any] = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor: Callable[..., Any] = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _wire(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the transport can carry it: fp8 (and any 1-byte float) as a ``uint8`` view."""
    if t.dtype.is_floating_point and t.dtype.itemsize == 1:
        return t.view(torch.uint8)
    return t


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


def all_reduce(t: torch.Tensor, *, op: str = "sum", group: Any = None) -> torch.Tensor:
    """Reduce ``t`` across the ranks of ``group``, in place; see :func:`hal.ops.catalogue.all_reduce`."""
    buf = t if t.is_contiguous() else t.contiguous()
    dist.all_reduce(buf, op=_reduce_op(op), group=group)
    _finish_avg(buf, op, group)
    if buf is not t:
        t.copy_(buf)
    return t


def all_gather(t: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0; see :func:`hal.ops.catalogue.all_gather`."""
    world = dist.get_world_size(group)
    out = torch.empty((world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    _all_gather_tensor(_wire(out), _wire(t.contiguous()), group=group)
    return out


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


def broadcast(t: torch.Tensor, *, src: int = 0, group: Any = None) -> torch.Tensor:
    """Copy rank ``src``'s ``t`` into every rank's ``t``, in place; see :func:`hal.ops.catalogue.broadcast`."""
    buf = t if t.is_contiguous() else t.contiguous()
    dist.broadcast(_wire(buf), src=src, group=group)
    if buf is not t:
        t.copy_(buf)
    return t


def barrier(*, group: Any = None) -> None:
    """Wait until every rank of ``group`` has reached the barrier; see :func:`hal.ops.catalogue.barrier`."""
    dist.barrier(group=group)
