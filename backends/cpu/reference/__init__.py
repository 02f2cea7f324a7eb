"""The reference ops: plain, device-agnostic torch, fp32 accumulation, one module per op family.

Each function has exactly the signature of its catalogue entry (:mod:`hal.ops.catalogue`) and is
called only with validated input. Readability beats speed here: these are the oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hal_cpu.reference import attention, collectives, gemm, moe, small

__all__ = ["REFERENCE_OPS"]

#: op name → reference implementation, for every compute and collective op of the catalogue.
REFERENCE_OPS: dict[str, Callable[..., Any]] = {
    name: getattr(module, name) for module in (gemm, attention, moe, small, collectives) for name in module.__all__
}
