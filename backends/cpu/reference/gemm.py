"""Reference GEMMs: dense, FP8 block-scaled, and the MoE grouped GEMMs (contiguous and masked layouts).

Plain torch with fp32 accumulation: half-precision inputs are upcast to fp32, FP8 inputs are
dequantized to fp32 with their scales (:mod:`hal.quant`), the matmul runs in fp32 and the result is
cast to the output dtype. Inputs have been validated by the catalogue (:mod:`hal.ops.catalogue`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hal.ops.catalogue import BLOCK
from hal.quant import AMAX_FLOOR, dequantize_fp8_blocks, dequantize_fp8_groups, fp8_max, quantize_int8_rows

# Catalogue order, not alphabetical, so this list reads like the catalogue's GEMM section.
__all__ = [  # noqa: RUF022
    "gemm",
    "quantize_fp8",
    "gemm_fp8",
    "grouped_gemm",
    "grouped_gemm_masked",
    "grouped_gemm_fp8",
    "grouped_gemm_fp8_masked",
    "quantize_int8",
    "gemm_int8",
    "grouped_gemm_int8",
]


_F32 = torch.float32
_linear = F.linear

#: Rows of ``x`` at which torch's fp32 CPU matmul (MKL) slows down on a large weight (the 32000x1024 LM
#: head of the decode benchmark: 4.5 ms at 1-3 rows, 8.6 at 4, 13.7 at 8, 18.6 at 12, 14.0 at 16) and
#: multiplying it by blocks of rows is 1.2-2.4x faster (``bench/gemm/cpu_row_blocks.py``): :func:`gemm`
#: does that there.
ROW_BLOCKS_M = range(4, 16)
#: The same for a half-precision weight, which is upcast block by block (below): 1.06-5.7x faster at
#: 1-15 rows (the LM head 5.2-5.7x); from 16 rows on as fast or slower for weights of 11-22 MiB in fp32
#: (``--dtype bfloat16``; the LM head is still 2.8-3.3x faster there, left whole for one rule).
ROW_BLOCKS_M_HALF = range(1, 16)
#: Weights whose fp32 size is below this are multiplied whole (blocks gain nothing measurable below 8 MiB).
ROW_BLOCKS_MIN_BYTES = 8 << 20
#: fp32 bytes of weight per block: small enough that what the matmul does with a block stays in cache.
ROW_BLOCK_BYTES = 1 << 20


def _linear_row_blocks(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w.float())`` for fp32 ``x``, one block of ~:data:`ROW_BLOCK_BYTES` of ``w``'s rows at a
    time; each output column is the same fp32 dot product as over the whole weight (MKL may sum it in
    another order).

    A half-precision ``w`` is upcast one block at a time into one reused buffer: upcasting it whole
    writes a fresh fp32 copy twice its size at every call (5x the time of the blocks for the 32000x1024
    LM head in bf16 at 1-8 rows, ``bench/gemm/cpu_row_blocks.py --dtype bfloat16``).
    """
    rows = max(1, ROW_BLOCK_BYTES // (w.shape[1] * 4))
    out = x.new_empty(x.shape[0], w.shape[0])
    scratch = None if w.dtype is _F32 else x.new_empty(min(rows, w.shape[0]), w.shape[1])
    for start in range(0, w.shape[0], rows):
        block = w[start : start + rows]
        if scratch is not None:
            block = scratch[: block.shape[0]].copy_(block)
        out[:, start : start + block.shape[0]] = _linear(x, block)
    return out


def gemm(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [M, K] @ w [N, K].T`` → ``[M, N]`` of ``out_dtype`` (``None``: x's dtype), fp32 accumulation."""
    # fp32 in, fp32 out is F.linear: no upcast, no cast; a large weight at a few rows goes by row blocks.
    # Half precision is upcast to fp32; a large weight at a few rows block by block. (Blocks are a CPU
    # matter: the Ascend backend runs this op on NPU tensors too.)
    if x.dtype is _F32 and (out_dtype is None or out_dtype is _F32):
        if x.shape[0] in ROW_BLOCKS_M and w.numel() * 4 >= ROW_BLOCKS_MIN_BYTES and x.is_cpu:
            return _linear_row_blocks(x, w)
        return _linear(x, w)
    if x.shape[0] in ROW_BLOCKS_M_HALF and w.numel() * 4 >= ROW_BLOCKS_MIN_BYTES and x.is_cpu:
        return _linear_row_blocks(x.float(), w).to(out_dtype or x.dtype)
    return _linear(x.float(), w.float()).to(out_dtype or x.dtype)


def quantize_fp8(
    x: torch.Tensor, *, group_size: int = BLOCK, fp8_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantization (DeepGEMM's ``per_token_cast_to_fp8``).

    ``x [M, K]`` → ``(xq fp8_dtype [M, K], scales float32 [M, ceil(K / group_size)])`` with
    ``scale = max(amax, 1e-4) / fp8_max`` per group and ``xq = x / scale`` rounded to fp8.
    """
    m, k = x.shape
    groups = -(-k // group_size)
    qmax = fp8_max(fp8_dtype)
    # Zero-pad the ragged last group to a whole one: zeros never raise a group's amax.
    padded = F.pad(x.float(), (0, groups * group_size - k)).view(m, groups, group_size)
    scales = padded.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR) / qmax
    # Clamp before the cast: x / scale may round just past fp8_max, and casts past the top of the
    # range give NaN for e4m3fnuz (and differ between devices); saturate explicitly instead.
    xq = (padded / scales).clamp(-qmax, qmax).to(fp8_dtype)
    return xq.view(m, groups * group_size)[:, :k].contiguous(), scales.view(m, groups)


def gemm_fp8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``(xq·xs) [M, K] @ (wq·ws) [N, K].T`` → ``[M, N]`` of ``out_dtype``, dequantized to fp32 first."""
    x = dequantize_fp8_groups(xq, xs, BLOCK)
    w = dequantize_fp8_blocks(wq, ws, BLOCK)
    return F.linear(x, w).to(out_dtype)


def _contiguous(
    x: torch.Tensor, weight: Callable[[int], torch.Tensor], n: int, offsets: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Grouped matmul of fp32 ``x [M, K]`` over expert row ranges, ``N`` columns; ``weight(e)`` is expert
    ``e``'s fp32 ``[N, K]``, made only for the experts that have rows (upcasting or dequantizing the whole
    stack at every call reads and writes every expert's weight for the few a decode step uses)."""
    out = x.new_zeros(x.shape[0], n)
    # The reference may read the offsets on the host; kernels must not.
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            out[start:end] = F.linear(x[start:end], weight(e))
    return out.to(out_dtype)


def _masked(x: torch.Tensor, w: torch.Tensor, masked_m: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Batched matmul of fp32 ``x [E, max_m, K]`` by fp32 ``w [E, N, K]``, valid rows only."""
    # Rows past masked_m[e] may hold garbage (even NaN) from the dispatch: they are zeroed before the
    # one batched matmul (each output row depends on its own input row only, but 0 * NaN is NaN).
    # The reference reads masked_m on the host: when every group's rows are all valid, nothing is masked.
    if masked_m.numel() and int(masked_m.min()) < x.shape[1]:
        invalid = torch.arange(x.shape[1], device=x.device) >= masked_m.to(x.device).unsqueeze(1)  # [E, max_m]
        x = x.masked_fill(invalid.unsqueeze(-1), 0.0)
    return torch.bmm(x, w.transpose(1, 2)).to(out_dtype)


def grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Contiguous layout: rows ``offsets[e]:offsets[e + 1]`` of ``x [M, K]`` times ``w[e].T`` → ``[M, N]``;
    rows at and past ``offsets[E]`` are zero."""
    return _contiguous(x.float(), lambda e: w[e].float(), w.shape[1], offsets, out_dtype or x.dtype)


def grouped_gemm_masked(
    x: torch.Tensor, w: torch.Tensor, masked_m: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Masked layout: ``x[e, :masked_m[e]] @ w[e].T`` → ``[E, max_m, N]``; the other rows are zero."""
    return _masked(x.float(), w.float(), masked_m, out_dtype or x.dtype)


def grouped_gemm_fp8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 contiguous layout: ``grouped_gemm`` on the fp32 dequantizations of ``(xq, xs)`` and ``(wq, ws)``."""
    x = dequantize_fp8_groups(xq, xs, BLOCK)
    return _contiguous(x, lambda e: dequantize_fp8_blocks(wq[e], ws[e], BLOCK), wq.shape[1], offsets, out_dtype)


def grouped_gemm_fp8_masked(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    masked_m: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 masked layout: ``grouped_gemm_masked`` on the fp32 dequantizations of ``(xq, xs)`` and ``(wq, ws)``."""
    x = dequantize_fp8_groups(xq, xs, BLOCK)
    w = dequantize_fp8_blocks(wq, ws, BLOCK)
    return _masked(x, w, masked_m, out_dtype)


# ---------------------------------------------------------------------------------------------------
# INT8 W8A8
# ---------------------------------------------------------------------------------------------------


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric INT8: ``(xq int8 [M, K], scales float32 [M])``, ``x ≈ xq * scales[:, None]``."""
    return quantize_int8_rows(x)


def _int8_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """``xq [M, K] @ wq [N, K].T`` accumulated exactly, then dequantized in fp32 as hardware does.

    float64 holds every int32 accumulation exactly (|sum| <= K * 127^2 < 2^53), so this equals an
    int32 matmul; the scales apply to the int32 result in fp32.
    """
    acc = (xq.double() @ wq.double().T).float()
    return acc * xs.unsqueeze(1) * ws.unsqueeze(0)


def gemm_int8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8: ``(xq @ wq.T)`` in exact integer arithmetic, times ``xs[:, None] * ws[None, :]``; ``[M, N]``."""
    return _int8_matmul(xq, xs, wq, ws).to(out_dtype)


def grouped_gemm_int8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8 contiguous layout: ``gemm_int8`` of expert ``e``'s rows with ``wq[e], ws[e]``; padding rows zero."""
    out = torch.zeros(xq.shape[0], wq.shape[1], dtype=torch.float32, device=xq.device)
    bounds = offsets.tolist()  # the reference may read the offsets on the host; kernels must not
    for e in range(wq.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            out[start:end] = _int8_matmul(xq[start:end], xs[start:end], wq[e], ws[e])
    return out.to(out_dtype)
