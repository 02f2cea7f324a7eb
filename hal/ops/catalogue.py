"""The op catalogue: every op a backend can serve, its contract, and its input validation.

Each op is one function below, its *contract*: its signature is the op's signature, its docstring
the contract (shapes as ``[M, K]``, dtypes, layouts, what ``None`` means), and its body validates the
input once, at the op boundary, then calls ``_impl``. Building a backend clones each contract with
``_impl`` bound to the implementation that serves the op there (:func:`hal.backend.bind_op`), so
``be.gemm(x, w)`` is one Python call that validates and then calls the kernel, with no wrapper
or argument packing in between. Calling a contract from this module directly raises.

Conventions follow DeepGEMM and FlashMLA so vendor kernels plug in without copies: ``gemm`` is
``x @ w.T`` (``F.linear``); FP8 scales are fp32 with one scale per 1×128 activation group and per
128×128 weight block; the MoE contiguous layout sorts token rows by expert with offsets; the latent
KV cache is ``[num_blocks, block_size, 1, d]``.

Kinds of op:

- ``runtime``: device and memory. Bound to a device: a backend must implement them, except that a
  backend on the reference backend's device type may fall back to the reference's.
- ``compute``: the math. Missing ones fall back to the reference implementation (plain torch, valid
  on any device), and ``hal info`` says so.
- ``collective``: over ``torch.distributed`` with the backend's distributed backend. The reference is
  plain ``torch.distributed``, valid for any process group.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from hal.errors import CollectiveError, DTypeError, LayoutError, OpInputError, ShapeError
from hal.ops import _validate as _v
from hal.types import Dispatched, DispatchHandle, MemoryStats, Permutation, RouteResult

__all__ = ["BLOCK", "CATALOGUE", "KV_BLOCK_SIZE", "OPS", "OpSpec", "op_spec"]

#: FP8 block edge: activations are scaled per 1×BLOCK group, weights per BLOCK×BLOCK block.
BLOCK = 128
#: Tokens per page of the paged latent KV cache (FlashMLA's page size).
KV_BLOCK_SIZE = 64

OpKind = Literal["runtime", "compute", "collective"]


@dataclass(frozen=True)
class OpSpec:
    """One catalogue entry.

    :param name: the op's name, also the attribute on :class:`hal.Backend`.
    :param kind: ``runtime``, ``compute`` or ``collective`` (see the module docstring).
    :param contract: the op's contract function: signature, docstring, validation, then ``_impl``.
    """

    name: str
    kind: OpKind
    contract: Callable[..., Any]

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.contract)

    @property
    def summary(self) -> str:
        return (self.contract.__doc__ or "").strip().splitlines()[0]


CATALOGUE: dict[str, OpSpec] = {}

F = TypeVar("F", bound=Callable[..., Any])


def _op(kind: OpKind) -> Callable[[F], F]:
    def register(contract: F) -> F:
        CATALOGUE[contract.__name__] = OpSpec(contract.__name__, kind, contract)
        return contract

    return register


def _impl(*args: Any, **kwargs: Any) -> Any:
    """Stands for the implementation in every contract; :func:`hal.backend.bind_op` rebinds it."""
    raise TypeError("an op contract was called directly; call the op through a backend: hal.get_backend().<op>(...)")


def op_spec(name: str) -> OpSpec:
    """The spec of op ``name``; raises :class:`hal.errors.OpInputError` naming the known ops."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise OpInputError(name, None, f"not in the op catalogue; known ops: {', '.join(OPS)}") from None


# ===================================================================================================
# Memory and device (runtime)
# ===================================================================================================


@_op("runtime")
def device_count() -> int:
    """Number of devices of this backend's kind visible to the process.

    :returns: int, 0 or more.
    """
    return _impl()


@_op("runtime")
def synchronize() -> None:
    """Wait until all work queued on the backend's current device has finished.

    :returns: None.
    """
    return _impl()


@_op("runtime")
def memory_stats() -> MemoryStats:
    """Memory of the backend's current device.

    :returns: :class:`hal.types.MemoryStats` (``allocated``, ``reserved``, ``peak``, ``total`` bytes;
        ``None`` for a figure the device cannot tell). On the CPU: the process's resident set,
        its peak, and physical memory.
    """
    return _impl()


@_op("runtime")
def empty_cache() -> None:
    """Release cached, unused device memory back to the driver (no-op where there is no cache).

    :returns: None.
    """
    return _impl()


@_op("runtime")
def pinned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized host tensor for fast copies to the device (page-locked where supported).

    :param shape: the tensor's shape.
    :param dtype: its dtype.
    :returns: a CPU tensor of that shape and dtype.
    """
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise OpInputError("pinned_empty", "shape", f"expected non-negative ints, got {shape!r}")
    if not isinstance(dtype, torch.dtype):
        raise OpInputError("pinned_empty", "dtype", f"expected a torch.dtype, got {dtype!r}")
    return _impl(shape, dtype)


# ===================================================================================================
# GEMM
# ===================================================================================================


_FLOATS = frozenset(_v.FLOATS)


def _diagnose_gemm(x: Any, w: Any, out_dtype: Any) -> None:
    _v.rank("gemm", "x", x, 2, "[M, K]")
    _v.rank("gemm", "w", w, 2, "[N, K]")
    _v.dtype("gemm", "x", x, _v.FLOATS)
    _v.same_dtype("gemm", "w", w, "x", x)
    if x.shape[1] != w.shape[1]:
        raise ShapeError(
            "gemm", "w", f"expected [N, K] with K = {x.shape[1]} (x is {list(x.shape)}), got {list(w.shape)}"
        )
    _v.same_device("gemm", (("x", x), ("w", w)))
    _v.out_dtype("gemm", out_dtype, _v.FLOATS)
    raise OpInputError("gemm", None, f"unsupported arguments: x {x.dtype} on {x.device}, w {w.dtype} on {w.device}")


@_op("compute")
def gemm(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense matmul ``x @ w.T`` (the ``F.linear`` convention), fp32 accumulation.

    :param x: float32 | bfloat16 | float16 [M, K].
    :param w: same dtype as x, [N, K].
    :param out_dtype: dtype of the result; ``None`` means x's dtype.
    :returns: [M, N] of ``out_dtype``, on x's device.
    """
    # gemm is the op most often called on small shapes, so its checks are one short-circuit condition
    # (about 0.4 µs, a few tensor attribute reads); the diagnosis that names what is wrong runs only when it fails.
    try:
        xs, ws, xd = x.shape, w.shape, x.dtype
        ok = (
            len(xs) == 2
            and len(ws) == 2
            and xs[1] == ws[1]
            and xd in _FLOATS
            and w.dtype is xd
            and x.device == w.device
            and (out_dtype is None or out_dtype in _FLOATS)
        )
    except (AttributeError, TypeError):
        ok = False
    if not ok:
        _diagnose_gemm(x, w, out_dtype)
    return _impl(x, w, out_dtype=out_dtype)


@_op("compute")
def quantize_fp8(
    x: torch.Tensor, *, group_size: int = BLOCK, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantization (DeepSeek-V3's 1×128 activation scaling).

    Each row is cut into groups of ``group_size`` values (the last may be shorter); a group's scale is
    ``max(amax, 1e-4) / fp8_max`` and its values are ``x / scale`` rounded to fp8, so
    ``x ≈ xq.float() * scale``.

    :param x: float32 | bfloat16 | float16 [M, K].
    :param group_size: values per scale group (128 for DeepSeek-V3).
    :param fp8_dtype: float8_e4m3fn (max 448) or float8_e4m3fnuz (max 240, AMD gfx942). Use
        ``backend.capabilities.fp8_dtype`` for the device's own format.
    :returns: ``(xq, scales)``: xq ``fp8_dtype [M, K]``, scales ``float32 [M, ceil(K / group_size)]``.
    """
    _v.rank("quantize_fp8", "x", x, 2, "[M, K]")
    _v.dtype("quantize_fp8", "x", x, _v.FLOATS)
    _v.positive_int("quantize_fp8", "group_size", group_size)
    if fp8_dtype not in _v.FP8S:
        raise OpInputError("quantize_fp8", "fp8_dtype", f"expected float8_e4m3fn | float8_e4m3fnuz, got {fp8_dtype}")
    return _impl(x, group_size=group_size, fp8_dtype=fp8_dtype)


def _check_fp8_operands(
    op: str,
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    x_layout: str,
    w_layout: str,
) -> tuple[int, int]:
    """Shared checks of the block-scaled FP8 GEMMs; returns (N, K)."""
    x_rank = x_layout.count(",") + 1
    w_rank = w_layout.count(",") + 1
    _v.rank(op, "xq", xq, x_rank, x_layout)
    _v.rank(op, "wq", wq, w_rank, w_layout)
    _v.rank(op, "xs", xs, x_rank, x_layout.replace("K]", "K / 128]"))
    _v.rank(op, "ws", ws, w_rank, w_layout.replace("N, K]", "ceil(N / 128), K / 128]"))
    _v.dtype(op, "xq", xq, _v.FP8S)
    _v.same_dtype(op, "wq", wq, "xq", xq)
    _v.dtype(op, "xs", xs, (torch.float32,))
    _v.dtype(op, "ws", ws, (torch.float32,))
    n, k = wq.shape[-2], wq.shape[-1]
    if xq.shape[-1] != k:
        raise ShapeError(op, "wq", f"expected K = {xq.shape[-1]} (from xq {list(xq.shape)}), got {list(wq.shape)}")
    if k % BLOCK:
        raise LayoutError(op, "xq", f"K must be a multiple of {BLOCK} for block scaling, got K = {k}; pad K with zeros")
    kb = k // BLOCK
    _v.shape(op, "xs", xs, [*xq.shape[:-1], kb], "(one fp32 scale per 1x128 group of xq)")
    _v.shape(op, "ws", ws, [*wq.shape[:-2], _v.cdiv(n, BLOCK), kb], "(one fp32 scale per 128x128 block of wq)")
    _v.same_device(op, (("xq", xq), ("xs", xs), ("wq", wq), ("ws", ws)))
    return n, k


@_op("compute")
def gemm_fp8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled FP8 matmul ``(xq·xs) @ (wq·ws).T`` with DeepSeek-V3 scaling, fp32 accumulation.

    :param xq: float8_e4m3fn | float8_e4m3fnuz [M, K], K a multiple of 128.
    :param xs: float32 [M, K / 128], the scale of each 1×128 group of xq (from ``quantize_fp8``).
    :param wq: xq's fp8 dtype, [N, K]; N need not be a multiple of 128.
    :param ws: float32 [ceil(N / 128), K / 128], the scale of each 128×128 block of wq (a checkpoint's
        ``weight_scale_inv``).
    :param out_dtype: bfloat16 (default) | float32 | float16.
    :returns: [M, N] of ``out_dtype``.
    """
    _check_fp8_operands("gemm_fp8", xq, xs, wq, ws, "[M, K]", "[N, K]")
    _v.out_dtype("gemm_fp8", out_dtype, _v.FLOATS)
    return _impl(xq, xs, wq, ws, out_dtype=out_dtype)


def _check_offsets(op: str, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    _v.rank(op, "offsets", offsets, 1, "[E + 1]")
    _v.dtype(op, "offsets", offsets, _v.INDICES)
    _v.size(op, "offsets", offsets, 0, w.shape[0] + 1, f"E + 1 for {w.shape[0]} experts")
    _v.same_device(op, (("x", x), ("offsets", offsets)))
    _v.cumulative(op, "offsets", offsets, x.shape[0], False, f"row offsets into x's {x.shape[0]} rows")


@_op("compute")
def grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """MoE expert GEMM, contiguous layout: token rows sorted by expert, ``x[rows of e] @ w[e].T``.

    :param x: float32 | bfloat16 | float16 [M, K], rows grouped by expert (``moe_permute``'s output).
    :param w: same dtype, [E, N, K], one weight per expert.
    :param offsets: int32 | int64 [E + 1]; expert ``e`` owns rows ``offsets[e]:offsets[e + 1]``;
        ``offsets[0] == 0``, non-decreasing, ``offsets[E] <= M``. Experts may own no row.
    :param out_dtype: ``None`` means x's dtype.
    :returns: [M, N]; rows at and past ``offsets[E]`` (padding) are zero.
    """
    _v.rank("grouped_gemm", "x", x, 2, "[M, K]")
    _v.rank("grouped_gemm", "w", w, 3, "[E, N, K]")
    _v.dtype("grouped_gemm", "x", x, _v.FLOATS)
    _v.same_dtype("grouped_gemm", "w", w, "x", x)
    _v.size("grouped_gemm", "w", w, 2, x.shape[1], "K of x")
    _v.same_device("grouped_gemm", (("x", x), ("w", w)))
    _check_offsets("grouped_gemm", x, w, offsets)
    _v.out_dtype("grouped_gemm", out_dtype, _v.FLOATS)
    return _impl(x, w, offsets, out_dtype=out_dtype)


def _check_masked_m(op: str, x: torch.Tensor, w: torch.Tensor, masked_m: torch.Tensor) -> None:
    _v.rank(op, "masked_m", masked_m, 1, "[E]")
    _v.dtype(op, "masked_m", masked_m, _v.INDICES)
    _v.size(op, "masked_m", masked_m, 0, w.shape[0], "E")
    _v.same_device(op, (("x", x), ("masked_m", masked_m)))
    _v.values_in(op, "masked_m", masked_m, 0, x.shape[1] + 1, f"valid rows, max_m = {x.shape[1]}")


@_op("compute")
def grouped_gemm_masked(
    x: torch.Tensor, w: torch.Tensor, masked_m: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """MoE expert GEMM, masked layout (fixed shapes, for decode and graph capture): ``x[e] @ w[e].T``.

    :param x: float32 | bfloat16 | float16 [E, max_m, K].
    :param w: same dtype, [E, N, K].
    :param masked_m: int32 | int64 [E], valid rows of each expert (``0 <= masked_m[e] <= max_m``).
    :param out_dtype: ``None`` means x's dtype.
    :returns: [E, max_m, N]; rows at and past ``masked_m[e]`` are zero.
    """
    _v.rank("grouped_gemm_masked", "x", x, 3, "[E, max_m, K]")
    _v.rank("grouped_gemm_masked", "w", w, 3, "[E, N, K]")
    _v.dtype("grouped_gemm_masked", "x", x, _v.FLOATS)
    _v.same_dtype("grouped_gemm_masked", "w", w, "x", x)
    _v.size("grouped_gemm_masked", "w", w, 0, x.shape[0], "E of x")
    _v.size("grouped_gemm_masked", "w", w, 2, x.shape[2], "K of x")
    _v.same_device("grouped_gemm_masked", (("x", x), ("w", w)))
    _check_masked_m("grouped_gemm_masked", x, w, masked_m)
    _v.out_dtype("grouped_gemm_masked", out_dtype, _v.FLOATS)
    return _impl(x, w, masked_m, out_dtype=out_dtype)


@_op("compute")
def grouped_gemm_fp8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 block-scaled MoE expert GEMM, contiguous layout (``gemm_fp8`` per expert's rows).

    :param xq: float8_e4m3fn | float8_e4m3fnuz [M, K], rows grouped by expert, K a multiple of 128.
    :param xs: float32 [M, K / 128].
    :param wq: xq's fp8 dtype, [E, N, K].
    :param ws: float32 [E, ceil(N / 128), K / 128].
    :param offsets: int32 | int64 [E + 1], as in ``grouped_gemm``.
    :param out_dtype: bfloat16 (default) | float32 | float16.
    :returns: [M, N]; padding rows (at and past ``offsets[E]``) are zero.
    """
    _check_fp8_operands("grouped_gemm_fp8", xq, xs, wq, ws, "[M, K]", "[E, N, K]")
    _check_offsets("grouped_gemm_fp8", xq, wq, offsets)
    _v.out_dtype("grouped_gemm_fp8", out_dtype, _v.FLOATS)
    return _impl(xq, xs, wq, ws, offsets, out_dtype=out_dtype)


@_op("compute")
def grouped_gemm_fp8_masked(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    masked_m: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 block-scaled MoE expert GEMM, masked layout.

    :param xq: float8_e4m3fn | float8_e4m3fnuz [E, max_m, K], K a multiple of 128.
    :param xs: float32 [E, max_m, K / 128].
    :param wq: xq's fp8 dtype, [E, N, K].
    :param ws: float32 [E, ceil(N / 128), K / 128].
    :param masked_m: int32 | int64 [E], valid rows per expert.
    :param out_dtype: bfloat16 (default) | float32 | float16.
    :returns: [E, max_m, N]; rows at and past ``masked_m[e]`` are zero.
    """
    _check_fp8_operands("grouped_gemm_fp8_masked", xq, xs, wq, ws, "[E, max_m, K]", "[E, N, K]")
    _v.size("grouped_gemm_fp8_masked", "wq", wq, 0, xq.shape[0], "E of xq")
    _check_masked_m("grouped_gemm_fp8_masked", xq, wq, masked_m)
    _v.out_dtype("grouped_gemm_fp8_masked", out_dtype, _v.FLOATS)
    return _impl(xq, xs, wq, ws, masked_m, out_dtype=out_dtype)


# ===================================================================================================
# INT8 W8A8 (for devices with int8 but no fp8 arithmetic, e.g. Ascend 910B/910C)
# ===================================================================================================


@_op("compute")
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric dynamic INT8 quantization (W8A8's activation side).

    Each row's scale is ``max(|row|) / 127`` (1 for an all-zero row, which quantizes to zeros) and its
    values ``round(x / scale)`` (round half to even), so ``x ≈ xq.float() * scale[:, None]``.

    :param x: float32 | bfloat16 | float16 [M, K].
    :returns: ``(xq, scales)``: xq int8 [M, K] in [-127, 127], scales float32 [M].
    """
    _v.rank("quantize_int8", "x", x, 2, "[M, K]")
    _v.dtype("quantize_int8", "x", x, _v.FLOATS)
    return _impl(x)


def _check_int8_operands(
    op: str, xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, experts: bool
) -> None:
    w_layout, s_layout = ("[E, N, K]", "[E, N]") if experts else ("[N, K]", "[N]")
    _v.rank(op, "xq", xq, 2, "[M, K]")
    _v.rank(op, "xs", xs, 1, "[M]")
    _v.rank(op, "wq", wq, 3 if experts else 2, w_layout)
    _v.rank(op, "ws", ws, 2 if experts else 1, s_layout)
    for name, t, want in (
        ("xq", xq, torch.int8),
        ("wq", wq, torch.int8),
        ("xs", xs, torch.float32),
        ("ws", ws, torch.float32),
    ):
        _v.dtype(op, name, t, (want,))
    _v.size(op, "xs", xs, 0, xq.shape[0], "M of xq")
    _v.size(op, "wq", wq, -1, xq.shape[1], "K of xq")
    _v.shape(op, "ws", ws, list(wq.shape[:-1]), f"{s_layout} (one fp32 scale per output channel of wq)")
    _v.same_device(op, (("xq", xq), ("xs", xs), ("wq", wq), ("ws", ws)))


@_op("compute")
def gemm_int8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8 matmul: ``(xq @ wq.T)`` accumulated exactly in int32, times ``xs[:, None] * ws[None, :]``.

    :param xq: int8 [M, K] (from ``quantize_int8``).
    :param xs: float32 [M], per-token activation scales.
    :param wq: int8 [N, K].
    :param ws: float32 [N], per-output-channel weight scales (``w ≈ wq * ws[:, None]``).
    :param out_dtype: bfloat16 (default) | float32 | float16.
    :returns: [M, N] of ``out_dtype``.
    """
    _check_int8_operands("gemm_int8", xq, xs, wq, ws, experts=False)
    _v.out_dtype("gemm_int8", out_dtype, _v.FLOATS)
    return _impl(xq, xs, wq, ws, out_dtype=out_dtype)


@_op("compute")
def grouped_gemm_int8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8 MoE expert GEMM, contiguous layout (``gemm_int8`` per expert's rows).

    :param xq: int8 [M, K], rows grouped by expert.
    :param xs: float32 [M].
    :param wq: int8 [E, N, K].
    :param ws: float32 [E, N].
    :param offsets: int32 | int64 [E + 1], as in ``grouped_gemm``.
    :param out_dtype: bfloat16 (default) | float32 | float16.
    :returns: [M, N]; padding rows (at and past ``offsets[E]``) are zero.
    """
    _check_int8_operands("grouped_gemm_int8", xq, xs, wq, ws, experts=True)
    _check_offsets("grouped_gemm_int8", xq, wq, offsets)
    _v.out_dtype("grouped_gemm_int8", out_dtype, _v.FLOATS)
    return _impl(xq, xs, wq, ws, offsets, out_dtype=out_dtype)


# ===================================================================================================
# Attention
# ===================================================================================================


@_op("compute")
def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    head_dim_v: int,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode over the paged latent KV cache (FlashMLA semantics).

    Every query head attends to the single latent head: keys are the whole cache entry (``d`` values:
    ``kv_lora_rank`` latent + ``qk_rope_head_dim`` rope), values its first ``head_dim_v`` values.

    :param q: bfloat16 | float16 | float32 [b, s_q, h, d] (d = 576 for DeepSeek-V3).
    :param kv_cache: q's dtype, [num_blocks, block_size, 1, d] (block_size 64).
    :param block_table: int32 [b, max_blocks_per_seq]; token ``i`` of sequence ``s`` lives in block
        ``block_table[s, i // block_size]`` at row ``i % block_size``. Entries past a sequence's
        length are not read. Block ids must lie in ``[0, num_blocks)`` (checked when block_table is
        a CPU tensor; on a device, checking would synchronize it on every call).
    :param cache_seqlens: int32 [b], tokens in the cache per sequence (including the s_q new ones).
    :param head_dim_v: value dims (512 for DeepSeek-V3), ``<= d``.
    :param softmax_scale: ``None`` means ``d ** -0.5``.
    :param causal: with s_q > 1, query ``i`` sees keys ``< cache_seqlens - s_q + i + 1``; otherwise
        every query sees all ``cache_seqlens`` keys.
    :returns: ``(out, lse)``: out q's dtype [b, s_q, h, head_dim_v]; lse float32 [b, h, s_q], the
        natural-log sum of exp of the scaled scores (``-inf`` and a zero output where no key is seen).
    """
    op = "mla_decode"
    _v.rank(op, "q", q, 4, "[b, s_q, h, d]")
    _v.rank(op, "kv_cache", kv_cache, 4, "[num_blocks, block_size, 1, d]")
    _v.rank(op, "block_table", block_table, 2, "[b, max_blocks_per_seq]")
    _v.rank(op, "cache_seqlens", cache_seqlens, 1, "[b]")
    _v.dtype(op, "q", q, _v.FLOATS)
    _v.same_dtype(op, "kv_cache", kv_cache, "q", q)
    _v.dtype(op, "block_table", block_table, (torch.int32,))
    _v.dtype(op, "cache_seqlens", cache_seqlens, (torch.int32,))
    b, _, _, d = q.shape
    _v.size(op, "kv_cache", kv_cache, 2, 1, "one latent head")
    _v.size(op, "kv_cache", kv_cache, 3, d, "d of q")
    _v.size(op, "block_table", block_table, 0, b, "b of q")
    _v.size(op, "cache_seqlens", cache_seqlens, 0, b, "b of q")
    if not isinstance(head_dim_v, int) or not 0 < head_dim_v <= d:
        raise OpInputError(op, "head_dim_v", f"expected an int in 1..{d} (d of q), got {head_dim_v!r}")
    _v.same_device(
        op, (("q", q), ("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens))
    )
    if _v.on_host(block_table) and _v.on_host(cache_seqlens) and b:
        block_size, capacity = kv_cache.shape[1], block_table.shape[1] * kv_cache.shape[1]
        _v.values_in(
            op, "cache_seqlens", cache_seqlens, 0, capacity + 1, f"at most {capacity} tokens fit the block table"
        )
        ids = "block ids of kv_cache"
        if block_table.numel() <= _v.SMALL:  # the used entries of each row, as Python ints
            rows, lens = block_table.tolist(), cache_seqlens.tolist()
            used_ids = [x for row, n in zip(rows, lens, strict=True) for x in row[: _v.cdiv(n, block_size)]]
            _v.ints_in(op, "block_table", used_ids, 0, kv_cache.shape[0], ids)
        else:
            used = torch.arange(block_table.shape[1]) < ((cache_seqlens.long() + block_size - 1) // block_size)[:, None]
            _v.values_in(op, "block_table", block_table[used], 0, kv_cache.shape[0], ids)
    return _impl(
        q, kv_cache, block_table, cache_seqlens, head_dim_v=head_dim_v, softmax_scale=softmax_scale, causal=causal
    )


@_op("compute")
def attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Variable-length attention over packed sequences (FlashAttention's varlen layout).

    q/k head dim may differ from v's (MLA prefill: 192 vs 128). Causal masking is aligned to the
    bottom-right: query ``i`` of a sequence with ``Lq`` queries and ``Lk`` keys sees keys
    ``j <= i + Lk - Lq`` (the same as top-left when ``Lq == Lk``).

    :param q: bfloat16 | float16 | float32 [total_q, h, d_qk].
    :param k: q's dtype, [total_k, h_kv, d_qk]; ``h`` a multiple of ``h_kv``.
    :param v: q's dtype, [total_k, h_kv, d_v].
    :param cu_seqlens_q: int32 [b + 1], cumulative query lengths, starting at 0, ending at total_q.
    :param cu_seqlens_k: int32 [b + 1], cumulative key lengths, starting at 0, ending at total_k.
    :param softmax_scale: ``None`` means ``d_qk ** -0.5``.
    :param causal: mask future keys (bottom-right aligned).
    :returns: q's dtype [total_q, h, d_v]; a query that sees no key gets zeros.
    """
    op = "attention_prefill"
    _v.rank(op, "q", q, 3, "[total_q, h, d_qk]")
    _v.rank(op, "k", k, 3, "[total_k, h_kv, d_qk]")
    _v.rank(op, "v", v, 3, "[total_k, h_kv, d_v]")
    _v.rank(op, "cu_seqlens_q", cu_seqlens_q, 1, "[b + 1]")
    _v.rank(op, "cu_seqlens_k", cu_seqlens_k, 1, "[b + 1]")
    _v.dtype(op, "q", q, _v.FLOATS)
    _v.same_dtype(op, "k", k, "q", q)
    _v.same_dtype(op, "v", v, "q", q)
    _v.dtype(op, "cu_seqlens_q", cu_seqlens_q, (torch.int32,))
    _v.dtype(op, "cu_seqlens_k", cu_seqlens_k, (torch.int32,))
    _v.size(op, "k", k, 2, q.shape[2], "d_qk of q")
    _v.size(op, "v", v, 0, k.shape[0], "total_k of k")
    _v.size(op, "v", v, 1, k.shape[1], "h_kv of k")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ShapeError(op, "k", f"h_kv = {k.shape[1]} must divide h = {q.shape[1]} (q {list(q.shape)})")
    if cu_seqlens_q.shape[0] < 2:
        raise ShapeError(op, "cu_seqlens_q", f"expected [b + 1] with b >= 1, got {list(cu_seqlens_q.shape)}")
    _v.size(op, "cu_seqlens_k", cu_seqlens_k, 0, cu_seqlens_q.shape[0], "b + 1 of cu_seqlens_q")
    _v.same_device(op, (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)))
    _v.cumulative(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], True, "cumulative query lengths")
    _v.cumulative(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], True, "cumulative key lengths")
    return _impl(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=softmax_scale, causal=causal)


# ===================================================================================================
# MoE routing
# ===================================================================================================


@_op("compute")
def moe_route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    scoring_func: str = "sigmoid",
) -> RouteResult:
    """DeepSeek routing: scores, group-limited top-k, normalization and scaling.

    ``scores = sigmoid(logits)`` (V3) or ``softmax(logits)`` (V2). Experts are chosen on
    ``scores + correction_bias``: experts form ``n_group`` equal groups, a group scores the sum of its
    top-2 choice scores (its maximum when there is no bias), the best ``topk_group`` groups stay, and
    the ``top_k`` best experts among them are chosen. Weights are the chosen experts' *unbiased*
    scores, divided by their sum when ``norm_topk_prob``, then times ``routed_scaling_factor``.

    :param router_logits: float32 | bfloat16 | float16 [T, E], the gate's output.
    :param correction_bias: float32 [E] (``e_score_correction_bias``) or ``None`` for no bias.
    :param top_k: experts per token.
    :param n_group: expert groups; must divide E.
    :param topk_group: groups kept per token, ``<= n_group``.
    :param norm_topk_prob: normalize the chosen weights to sum to 1 (before scaling).
    :param routed_scaling_factor: multiplies the final weights.
    :param scoring_func: ``"sigmoid"`` (DeepSeek-V3) or ``"softmax"`` (DeepSeek-V2).
    :returns: :class:`hal.types.RouteResult` ``(weights float32 [T, top_k], ids int64 [T, top_k])``,
        ids distinct per token, in no particular order.
    """
    op = "moe_route"
    _v.rank(op, "router_logits", router_logits, 2, "[T, E]")
    _v.dtype(op, "router_logits", router_logits, _v.FLOATS)
    e = router_logits.shape[1]
    if correction_bias is not None:
        _v.rank(op, "correction_bias", correction_bias, 1, "[E]")
        _v.dtype(op, "correction_bias", correction_bias, (torch.float32,))
        _v.size(op, "correction_bias", correction_bias, 0, e, "E of router_logits")
        _v.same_device(op, (("router_logits", router_logits), ("correction_bias", correction_bias)))
    _v.positive_int(op, "n_group", n_group)
    _v.positive_int(op, "topk_group", topk_group)
    _v.positive_int(op, "top_k", top_k)
    if e % n_group:
        raise OpInputError(op, "n_group", f"must divide E = {e}, got {n_group}")
    if topk_group > n_group:
        raise OpInputError(op, "topk_group", f"must be <= n_group = {n_group}, got {topk_group}")
    if top_k > e // n_group * topk_group:
        raise OpInputError(
            op, "top_k", f"must be <= E / n_group * topk_group = {e // n_group * topk_group}, got {top_k}"
        )
    if scoring_func not in ("sigmoid", "softmax"):
        raise OpInputError(op, "scoring_func", f"expected 'sigmoid' or 'softmax', got {scoring_func!r}")
    if n_group > 1 and correction_bias is not None and e // n_group < 2:
        raise OpInputError(
            op, "n_group", f"groups need >= 2 experts to score their top-2, got E / n_group = {e // n_group}"
        )
    return _impl(
        router_logits,
        correction_bias,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=routed_scaling_factor,
        scoring_func=scoring_func,
    )


@_op("compute")
def moe_permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> Permutation:
    """Sort token copies by expert into the contiguous layout ``grouped_gemm`` takes.

    Each token appears once per selected expert. Rows are ordered by expert and, within an expert,
    by flat index ``t * top_k + j`` (a stable sort).

    :param x: any dtype (float or fp8) [T, H].
    :param topk_ids: int32 | int64 [T, top_k], values in ``[0, num_experts)``.
    :param num_experts: E.
    :returns: :class:`hal.types.Permutation` ``(x [T * top_k, H], offsets int64 [E + 1],
        order int64 [T * top_k])``.
    """
    _v.rank("moe_permute", "x", x, 2, "[T, H]")
    _v.rank("moe_permute", "topk_ids", topk_ids, 2, "[T, top_k]")
    _v.dtype("moe_permute", "topk_ids", topk_ids, _v.INDICES)
    _v.size("moe_permute", "topk_ids", topk_ids, 0, x.shape[0], "T of x")
    _v.positive_int("moe_permute", "num_experts", num_experts)
    _v.same_device("moe_permute", (("x", x), ("topk_ids", topk_ids)))
    _v.values_in("moe_permute", "topk_ids", topk_ids, 0, num_experts, f"expert ids, num_experts = {num_experts}")
    return _impl(x, topk_ids, num_experts)


@_op("compute")
def moe_unpermute(y: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs back in token order (inverse of ``moe_permute``).

    ``out[t] = sum_j topk_weights[t, j] * y[r]`` where ``order[r] == t * top_k + j``; fp32 accumulation.

    :param y: float32 | bfloat16 | float16 [T * top_k, N], expert outputs in permuted order.
    :param order: int64 | int32 [T * top_k], ``moe_permute``'s ``order``.
    :param topk_weights: float32 [T, top_k], ``moe_route``'s weights.
    :returns: y's dtype [T, N].
    """
    op = "moe_unpermute"
    _v.rank(op, "y", y, 2, "[T * top_k, N]")
    _v.rank(op, "order", order, 1, "[T * top_k]")
    _v.rank(op, "topk_weights", topk_weights, 2, "[T, top_k]")
    _v.dtype(op, "y", y, _v.FLOATS)
    _v.dtype(op, "order", order, _v.INDICES)
    _v.dtype(op, "topk_weights", topk_weights, (torch.float32,))
    rows = topk_weights.shape[0] * topk_weights.shape[1]
    _v.size(op, "y", y, 0, rows, "T * top_k of topk_weights")
    _v.size(op, "order", order, 0, rows, "T * top_k of topk_weights")
    _v.same_device(op, (("y", y), ("order", order), ("topk_weights", topk_weights)))
    _v.values_in(op, "order", order, 0, rows, "flat indices t * top_k + j")
    return _impl(y, order, topk_weights)


# ===================================================================================================
# Small ops
# ===================================================================================================


@_op("compute")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x²) + eps) * weight``, computed in fp32.

    :param x: float32 | bfloat16 | float16 [..., D].
    :param weight: float32 | bfloat16 | float16 [D].
    :param eps: added to the mean square.
    :returns: x's dtype and shape.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        _v.rank("rms_norm", "x", x, 2, "[..., D]")
    _v.rank("rms_norm", "weight", weight, 1, "[D]")
    _v.dtype("rms_norm", "x", x, _v.FLOATS)
    _v.dtype("rms_norm", "weight", weight, _v.FLOATS)
    _v.size("rms_norm", "weight", weight, 0, x.shape[-1], "D of x")
    _v.same_device("rms_norm", (("x", x), ("weight", weight)))
    return _impl(x, weight, eps=eps)


@_op("compute")
def rotary(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    interleaved: bool = True,
) -> torch.Tensor:
    """Rotary position embedding on the last dim.

    With ``interleaved`` (DeepSeek's layout) value pairs ``(x[2i], x[2i+1])`` rotate by angle ``i``;
    otherwise (NeoX layout) pairs ``(x[i], x[i + D/2])``. The result keeps x's layout (as DeepSeek's
    own code does; transformers' ``apply_rotary_pos_emb_interleave`` returns the rotated values
    de-interleaved instead, which permutes q and k alike and leaves attention scores unchanged).

    :param x: float32 | bfloat16 | float16 [T, ..., D], D even.
    :param positions: int32 | int64 [T], each token's position, in ``[0, max_position)``.
    :param cos_sin_cache: float32 [max_position, D]: ``[:, :D/2]`` cosines, ``[:, D/2:]`` sines (any
        YaRN magnitude scaling already folded in).
    :param interleaved: DeepSeek's interleaved pairs (True) or NeoX halves (False).
    :returns: x's dtype and shape.
    """
    op = "rotary"
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        _v.rank(op, "x", x, 3, "[T, ..., D]")
    _v.rank(op, "positions", positions, 1, "[T]")
    _v.rank(op, "cos_sin_cache", cos_sin_cache, 2, "[max_position, D]")
    _v.dtype(op, "x", x, _v.FLOATS)
    _v.dtype(op, "positions", positions, _v.INDICES)
    _v.dtype(op, "cos_sin_cache", cos_sin_cache, (torch.float32,))
    if x.shape[-1] % 2:
        raise ShapeError(op, "x", f"the rotary dim D must be even, got shape {list(x.shape)}")
    _v.size(op, "positions", positions, 0, x.shape[0], "T of x")
    _v.size(op, "cos_sin_cache", cos_sin_cache, 1, x.shape[-1], "D of x")
    _v.same_device(op, (("x", x), ("positions", positions), ("cos_sin_cache", cos_sin_cache)))
    # A kernel reads the table at the position's row: out of range it reads past the table.
    _v.values_in(op, "positions", positions, 0, cos_sin_cache.shape[0], "rows of cos_sin_cache")
    return _impl(x, positions, cos_sin_cache, interleaved=interleaved)


@_op("compute")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: ``silu(x[..., :N]) * x[..., N:]``, computed in fp32.

    :param x: float32 | bfloat16 | float16 [..., 2N] (gate and up projections concatenated).
    :returns: x's dtype [..., N].
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        _v.rank("silu_and_mul", "x", x, 2, "[..., 2N]")
    _v.dtype("silu_and_mul", "x", x, _v.FLOATS)
    if x.shape[-1] % 2:
        raise ShapeError("silu_and_mul", "x", f"the last dim must be even (2N), got shape {list(x.shape)}")
    return _impl(x)


# ===================================================================================================
# Collectives
# ===================================================================================================

_REDUCE_OPS = ("sum", "max", "min", "avg")


def _count(s: object) -> bool:
    """Whether ``s`` is a row count: an int >= 0 (a 0-d integer tensor too), not a bool or a float."""
    if isinstance(s, bool):
        return False
    try:
        return operator.index(s) >= 0  # type: ignore[arg-type]
    except TypeError:
        return False


def _check_collective_tensor(op: str, t: torch.Tensor) -> None:
    _v.tensor(op, "t", t)
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise CollectiveError(
            f"{op}: no torch.distributed process group; call torch.distributed.init_process_group "
            "(torchrun sets the environment) with the backend's capabilities.dist_backend first"
        )


def _check_reduce(op: str, t: torch.Tensor, reduce: str) -> None:
    """Refuse what the transports cannot reduce, before anything is sent: past this point a failure is
    reported as a peer's (:func:`hal.distributed.collective_guard`), and an ``"avg"`` would fail only
    after the sum was written."""
    if reduce not in _REDUCE_OPS:
        raise OpInputError(op, "op", f"expected one of {_REDUCE_OPS}, got {reduce!r}")
    if t.dtype.is_floating_point and t.dtype.itemsize == 1:  # every fp8 format, whatever this torch has
        raise OpInputError(op, "t", f"cannot reduce {t.dtype}; reduce in bfloat16 or float32")
    # Neither gloo nor NCCL reduces these (HCCL may take int16): refused everywhere, so that code reducing
    # them does not run on one transport and fail on the next.
    if t.dtype in (torch.int16, torch.uint16, torch.uint32, torch.uint64):
        raise DTypeError(op, "t", f"cannot reduce {t.dtype}; reduce in int32 or int64")
    if reduce in ("max", "min") and t.dtype.is_complex:  # complex numbers have no order
        raise OpInputError(op, "op", f'expected "sum" or "avg" for {t.dtype} (no order), got "{reduce}"')
    if reduce == "avg" and t.dtype == torch.bool:
        hint = '"max" (any rank true), "min" (every rank true), or reduce an integer or float copy'
        raise OpInputError(op, "op", f'expected "sum", "max" or "min" for a bool tensor, got "avg"; use {hint}')


def _check_in_place(op: str, t: torch.Tensor) -> None:
    """Refuse a ``t`` whose elements share memory (an ``expand``-ed view): an in-place collective writes
    each element its own result, which torch refuses only after the exchange, where it would read as a
    peer's failure."""
    if torch._debug_has_internal_overlap(t) == 1:  # 1: overlap for sure; 2: too hard to tell, let it be
        got = f"shape {list(t.shape)} with strides {list(t.stride())} (an expanded view?)"
        raise LayoutError(op, "t", f"expected no overlapping memory (written in place), got {got}; pass t.clone()")


@_op("collective")
def all_reduce(t: torch.Tensor, *, op: str = "sum", group: Any = None) -> torch.Tensor:
    """Reduce ``t`` across the ranks of ``group``, in place.

    :param t: a tensor of any dtype but fp8, int16 and uint16/32/64, the same shape on every rank; no
        two of its elements may share memory (it is written in place).
    :param op: ``"sum"``, ``"max"``, ``"min"`` or ``"avg"`` (``"avg"`` not for bool, integers truncated;
        ``"max"`` and ``"min"`` not for complex).
    :param group: a ``torch.distributed`` process group; ``None`` means the default (world) group.
    :returns: ``t``, holding the reduction.
    """
    _check_collective_tensor("all_reduce", t)
    _check_reduce("all_reduce", t, op)
    _check_in_place("all_reduce", t)
    return _impl(t, op=op, group=group)


@_op("collective")
def all_gather(t: torch.Tensor, *, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order.

    :param t: any dtype (fp8 included) [n, ...], the same shape on every rank.
    :param group: process group; ``None`` means the world.
    :returns: [world_size * n, ...].
    """
    _check_collective_tensor("all_gather", t)
    if t.dim() < 1:
        _v.rank("all_gather", "t", t, 1, "[n, ...]")
    return _impl(t, group=group)


@_op("collective")
def reduce_scatter(t: torch.Tensor, *, op: str = "sum", group: Any = None) -> torch.Tensor:
    """Reduce ``t`` across ranks, then give rank ``r`` the ``r``-th of world_size equal chunks of dim 0.

    :param t: a tensor of any dtype but fp8, int16 and uint16/32/64 [world_size * n, ...], the same shape
        on every rank.
    :param op: ``"sum"``, ``"max"``, ``"min"`` or ``"avg"`` (``"avg"`` not for bool, integers truncated;
        ``"max"`` and ``"min"`` not for complex).
    :param group: process group; ``None`` means the world.
    :returns: [n, ...].
    """
    _check_collective_tensor("reduce_scatter", t)
    _check_reduce("reduce_scatter", t, op)
    world = torch.distributed.get_world_size(group)
    if t.dim() < 1 or t.shape[0] % world:
        raise ShapeError("reduce_scatter", "t", f"dim 0 must be a multiple of world_size {world}, got {list(t.shape)}")
    return _impl(t, op=op, group=group)


@_op("collective")
def all_to_all(
    t: torch.Tensor,
    *,
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
    group: Any = None,
) -> torch.Tensor:
    """Rank ``r`` sends rows ``input_split_sizes[s]`` of ``t`` to each rank ``s``, and receives rows from
    each rank concatenated in rank order (``torch.distributed.all_to_all_single``).

    :param t: any dtype (fp8 included) [n, ...].
    :param output_split_sizes: rows received from each rank (length world_size); ``None`` means equal.
    :param input_split_sizes: rows sent to each rank (length world_size, sum n); ``None`` means equal.
        Give both lists or neither.
    :param group: process group; ``None`` means the world.
    :returns: [sum(output_split_sizes), ...].
    """
    _check_collective_tensor("all_to_all", t)
    if t.dim() < 1:
        _v.rank("all_to_all", "t", t, 1, "[n, ...]")
    if (output_split_sizes is None) != (input_split_sizes is None):
        raise OpInputError(
            "all_to_all", "output_split_sizes", "give both split lists or neither (None means equal splits)"
        )
    world = torch.distributed.get_world_size(group)
    for name, splits in (("output_split_sizes", output_split_sizes), ("input_split_sizes", input_split_sizes)):
        if splits is not None and (len(splits) != world or not all(_count(s) for s in splits)):
            raise OpInputError("all_to_all", name, f"expected {world} non-negative row counts, got {list(splits)}")
    if input_split_sizes is not None and sum(input_split_sizes) != t.shape[0]:
        raise ShapeError(
            "all_to_all", "input_split_sizes", f"must sum to t's {t.shape[0]} rows, got {list(input_split_sizes)}"
        )
    if input_split_sizes is None and t.shape[0] % world:
        raise ShapeError("all_to_all", "t", f"equal splits need dim 0 a multiple of {world}, got {list(t.shape)}")
    return _impl(t, output_split_sizes=output_split_sizes, input_split_sizes=input_split_sizes, group=group)


@_op("collective")
def broadcast(t: torch.Tensor, *, src: int = 0, group: Any = None) -> torch.Tensor:
    """Copy rank ``src``'s ``t`` into every rank's ``t``, in place.

    :param t: any dtype (fp8 included), the same shape on every rank; no two of its elements may share
        memory (it is written in place).
    :param src: the sending rank (global rank).
    :param group: process group; ``None`` means the world.
    :returns: ``t``.
    """
    _check_collective_tensor("broadcast", t)
    _check_in_place("broadcast", t)
    world = torch.distributed.get_world_size()
    if not isinstance(src, int) or isinstance(src, bool) or not 0 <= src < world:
        raise OpInputError("broadcast", "src", f"expected a global rank in [0, {world}), got {src!r}")
    return _impl(t, src=src, group=group)


@_op("collective")
def barrier(*, group: Any = None) -> None:
    """Wait until every rank of ``group`` has reached the barrier.

    :param group: process group; ``None`` means the world.
    :returns: None.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise CollectiveError("barrier: no torch.distributed process group; call init_process_group first")
    return _impl(group=group)


# ---------------------------------------------------------------------------------------------------
# Expert parallelism (DeepEP's normal mode: dispatch, local experts, combine)
# ---------------------------------------------------------------------------------------------------


@_op("collective")
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
    """Send each token to every rank that owns one of its selected experts (expert parallelism).

    Routed experts are split across the ``world_size`` ranks of ``group`` in equal contiguous ranges:
    rank ``r`` owns experts ``[r * E / world, (r + 1) * E / world)``. A token goes once to each rank
    owning at least one of its experts (uneven counts; a rank may receive nothing). The receiving rank
    runs its local experts on the rows and sums them weighted by ``topk_weights`` (0 for non-local
    experts), then ``ep_combine`` brings each row back to its token and sums over ranks.

    :param x: float32 | bfloat16 | float16 | float8 [T, H], this rank's tokens.
    :param topk_ids: int32 | int64 [T, top_k], global expert ids in ``[0, num_experts)``.
    :param topk_weights: float32 [T, top_k].
    :param num_experts: E, a multiple of the group's size.
    :param x_scales: float32 [T, H / 128], x's FP8 scales (from ``quantize_fp8``) to send along; ``None``
        when x is not FP8.
    :param max_tokens_per_rank: M, for the low-latency mode (DeepEP's ``low_latency_dispatch``, for
        decode): every rank passes the same M and has ``T <= M``; the exchange is then one collective of
        fixed size (``M`` rows to every other rank) instead of a row-count exchange followed by the
        rows, and the result has ``world * M`` rows in fixed slots (:class:`hal.types.Dispatched`). It
        sends ``(world - 1) * M`` rows whatever the routing, so it pays off when T is small and most
        tokens reach most ranks. ``None`` (the default): normal mode.
    :param group: process group; ``None`` means the world.
    :returns: :class:`hal.types.Dispatched` ``(x, x_scales, topk_ids, topk_weights, handle)``.
    """
    op = "ep_dispatch"
    _check_collective_tensor(op, x)
    _v.rank(op, "x", x, 2, "[T, H]")
    _v.dtype(op, "x", x, _v.FLOATS + _v.FP8S)
    _v.rank(op, "topk_ids", topk_ids, 2, "[T, top_k]")
    _v.dtype(op, "topk_ids", topk_ids, _v.INDICES)
    _v.size(op, "topk_ids", topk_ids, 0, x.shape[0], "T of x")
    _v.shape(op, "topk_weights", topk_weights, list(topk_ids.shape), "[T, top_k] like topk_ids")
    _v.dtype(op, "topk_weights", topk_weights, (torch.float32,))
    _v.positive_int(op, "num_experts", num_experts)
    world = torch.distributed.get_world_size(group)
    if num_experts % world:
        raise OpInputError(op, "num_experts", f"must be a multiple of the group's {world} ranks, got {num_experts}")
    if x.dtype in _v.FP8S:
        if x_scales is None:
            raise OpInputError(op, "x_scales", f"an FP8 x ({x.dtype}) needs its float32 scales [T, H / 128]")
        _v.shape(op, "x_scales", x_scales, [x.shape[0], _v.cdiv(x.shape[1], BLOCK)], "[T, ceil(H / 128)]")
        _v.dtype(op, "x_scales", x_scales, (torch.float32,))
    elif x_scales is not None:
        raise OpInputError(op, "x_scales", f"scales go with an FP8 x only; x is {x.dtype}")
    if max_tokens_per_rank is not None:
        _v.positive_int(op, "max_tokens_per_rank", max_tokens_per_rank)
        if x.shape[0] > max_tokens_per_rank:
            raise ShapeError(op, "x", f"has {x.shape[0]} tokens, more than max_tokens_per_rank ({max_tokens_per_rank})")
    _v.values_in(op, "topk_ids", topk_ids, 0, num_experts, f"global expert ids, num_experts = {num_experts}")
    return _impl(
        x,
        topk_ids,
        topk_weights,
        num_experts=num_experts,
        x_scales=x_scales,
        max_tokens_per_rank=max_tokens_per_rank,
        group=group,
    )


@_op("collective")
def ep_combine(y: torch.Tensor, handle: DispatchHandle, *, group: Any = None) -> torch.Tensor:
    """Send every dispatched row's result back to its source rank and sum over ranks per token.

    :param y: float32 | bfloat16 | float16 [R, H], the received rows' results in ``ep_dispatch``'s order
        (already weighted by the local experts' ``topk_weights``); in low-latency mode ``R = world * M``,
        and the rows of tokens that selected none of this rank's experts are ignored.
    :param handle: ``ep_dispatch``'s ``handle``.
    :param group: the process group of the dispatch.
    :returns: y's dtype [T, H], each token's sum over the ranks it was sent to (zero for a token sent
        nowhere).
    """
    op = "ep_combine"
    _check_collective_tensor(op, y)
    _v.rank(op, "y", y, 2, "[R, H]")
    _v.dtype(op, "y", y, _v.FLOATS)
    if not isinstance(handle, DispatchHandle):
        raise OpInputError(op, "handle", f"expected ep_dispatch's DispatchHandle, got {type(handle).__name__}")
    _v.size(op, "y", y, 0, sum(handle.recv_counts), "rows received by the dispatch")
    return _impl(y, handle, group=group)


#: Every op name, in catalogue order.
OPS: tuple[str, ...] = tuple(CATALOGUE)
