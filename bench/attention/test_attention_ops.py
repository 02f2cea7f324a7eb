"""Attention ops: absorbed MLA decode over the paged latent cache, and varlen prefill.

Baselines beside HAL: the reference and ``F.scaled_dot_product_attention`` (over gathered pages for
decode, per sequence for prefill). See ``bench/conftest.py`` for the parametrization.
"""

from __future__ import annotations

from collections.abc import Callable

OPS = ("mla_decode", "attention_prefill")


def test_attention_op(op_case: object, run_op_case: Callable[[], None]) -> None:
    run_op_case()
