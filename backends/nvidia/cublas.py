"""The NVIDIA backend's own GEMM ops: cuBLAS through torch, and the per-shape choice for FP8.

``gemm`` is ``torch.mm`` (cuBLAS, fp32 accumulation), the fastest dense bf16 GEMM on NVIDIA GPUs for
most shapes. ``gemm_fp8`` is the Triton block-scaled kernel unless the measured table
(``tuning/gemm_choice.json``, :mod:`hal_nvidia.gemm_choice`) names cuBLAS (``torch._scaled_mm`` with
block scaling) for a shape and this torch's ``_scaled_mm`` was found to block-scale correctly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["fp8_gemm_op", "gemm"]


def gemm(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ w.T`` through cuBLAS (``torch.mm``); cuBLAS accumulates bf16/fp16 products in fp32.

    A float32 result of half-precision inputs (the LM head's logits) is the fp32 accumulation itself,
    never a bf16 result widened: ``torch.mm(..., out_dtype=float32)`` where this torch has it, else the
    product of the inputs widened to fp32.
    """
    if out_dtype == torch.float32 and x.dtype != torch.float32:
        return _mm_fp32_out(x, w.t())
    y = torch.mm(x, w.t())
    return y if out_dtype is None or out_dtype == y.dtype else y.to(out_dtype)


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)  # type: ignore[call-arg]
        except (TypeError, RuntimeError):  # older torch, or no kernel for this device / dtype
            _MM_OUT_DTYPE = False
    return torch.mm(a.float(), b.float())


#: whether ``torch.mm`` takes ``out_dtype`` here (learned on the first call that needs it).
_MM_OUT_DTYPE = True


def fp8_gemm_op(
    triton_gemm_fp8: Callable[..., torch.Tensor], choose: Callable[[int, int, int], str] | None
) -> Callable[..., torch.Tensor]:
    """The backend's ``gemm_fp8``: the Triton kernel itself when there is nothing to choose (no
    measured entry for this arch, or ``_scaled_mm`` cannot block-scale here), otherwise a function that
    asks ``choose(M, N, K)`` (memoized) on each call."""
    if choose is None:
        return triton_gemm_fp8
    from hal_nvidia.gemm_choice import scaled_mm_blockwise

    def gemm_fp8(
        xq: torch.Tensor,
        xs: torch.Tensor,
        wq: torch.Tensor,
        ws: torch.Tensor,
        *,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> Any:
        if choose(xq.shape[0], wq.shape[0], xq.shape[1]) == "cublas":
            return scaled_mm_blockwise(xq, xs, wq, ws, out_dtype=out_dtype)
        return triton_gemm_fp8(xq, xs, wq, ws, out_dtype=out_dtype)

    # hal info names it hal_nvidia.cublas:gemm_fp8.
    gemm_fp8.__qualname__ = "gemm_fp8"
    return gemm_fp8
