"""GEMM ops: dense, FP8 block-scaled, W8A8 INT8 and grouped (contiguous and masked), with activation
quantization.

Baselines beside HAL: the reference, ``F.linear``, ``torch._scaled_mm`` (block-scaled, where torch has
it), ``torch._grouped_mm``, ``torch.bmm`` and ``torch._int_mm``. See ``bench/conftest.py`` for the parametrization.
"""

from __future__ import annotations

from collections.abc import Callable

OPS = (
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
)


def test_gemm_op(op_case: object, run_op_case: Callable[[], None]) -> None:
    run_op_case()
