"""Small ops: RMSNorm, rotary embedding, SwiGLU's ``silu_and_mul``.

Baselines beside HAL: the reference, ``F.rms_norm`` and eager torch. See ``bench/conftest.py`` for the
parametrization.
"""

from __future__ import annotations

from collections.abc import Callable

OPS = ("rms_norm", "rotary", "silu_and_mul")


def test_small_op(op_case: object, run_op_case: Callable[[], None]) -> None:
    run_op_case()
