"""MoE ops: DeepSeek-V3 routing and the token permutation around the grouped GEMM.

Baseline beside HAL: the reference. See ``bench/conftest.py`` for the parametrization.
"""

from __future__ import annotations

from collections.abc import Callable

OPS = ("moe_route", "moe_permute", "moe_unpermute")


def test_moe_op(op_case: object, run_op_case: Callable[[], None]) -> None:
    run_op_case()
