"""What every kernel module shares: compile specs, tuning configs and interpreter detection."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hal.errors import OpInputError

__all__ = ["FP8", "INTERPRETING", "CompileSpec", "empty", "merge_config", "require_device", "set_poison"]

#: ``TRITON_INTERPRET=1`` at import: the kernels run on the CPU through Triton's interpreter.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: placeholder in a :class:`CompileSpec` signature for the target's fp8 pointer type: ``*fp8e4nv``
#: (e4m3fn) on NVIDIA and gfx950, ``*fp8e4b8`` (e4m3fnuz) on gfx942.
FP8 = "*fp8"


@dataclass(frozen=True)
class CompileSpec:
    """One compilation of one Triton kernel, enough for ``triton.compile`` without a GPU.

    :param name: what ``hal compile-check`` prints, e.g. ``"gemm_fp8[bf16 out]"``.
    :param kernel: the ``@triton.jit`` function.
    :param signature: every kernel argument → its Triton type (``"*fp32"``, ``"*bf16"``, ``"i32"``,
        ``"fp32"``, ``"constexpr"``); :data:`FP8` stands for the target's fp8 pointer type.
    :param constexprs: the value of every ``constexpr`` argument.
    :param num_warps: warps per program.
    :param num_stages: software-pipelining stages.
    :param divisible_by_16: arguments compiled as multiples of 16, as Triton's JIT specializes them
        at a real launch (pointers from the allocator; strides and sizes of real shapes, e.g. K).
        Without it a pointer's alignment is unknown, loads are not vectorized, and the K loop is not
        software-pipelined, so the compiled code (and its shared memory) would not be what runs.
    """

    name: str
    kernel: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    divisible_by_16: tuple[str, ...] = ()

    def attrs(self) -> dict[tuple[int, ...], list[list[Any]]]:
        """``ASTSource``'s ``attrs`` (Triton >= 3.3): ``tt.divisibility = 16`` on :attr:`divisible_by_16`."""
        names = list(self.kernel.arg_names)
        return {(names.index(n),): [["tt.divisibility", 16]] for n in self.divisible_by_16}


def merge_config(default: Mapping[str, int], config: Mapping[str, int] | None, op: str) -> dict[str, int]:
    """``default`` updated with ``config``; a key the kernel does not know is an error, not ignored."""
    merged = dict(default)
    if config:
        unknown = sorted(set(config) - set(default))
        if unknown:
            raise OpInputError(op, "config", f"unknown keys {unknown}; {op} takes {sorted(default)}")
        merged.update(config)
    return merged


def require_device(op: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Kernels run on a GPU, or on the CPU only under the interpreter."""
    for name, t in tensors.items():
        if t.device.type == "cpu" and not INTERPRETING:
            raise OpInputError(op, name, "is on the CPU; Triton kernels need a GPU tensor (or TRITON_INTERPRET=1)")


# ---------------------------------------------------------------------------------------------------
# Output allocation, poisonable for tests
# ---------------------------------------------------------------------------------------------------

_POISON = False


def set_poison(on: bool) -> bool:
    """Fill every output :func:`empty` allocates with garbage (NaN for floats and fp8, the minimum
    for integers) so that an element a kernel forgets to write fails the test. Returns the old value."""
    global _POISON
    old, _POISON = _POISON, on
    return old


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` for kernel outputs: every launcher allocates its outputs through this."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _POISON:
        if dtype.is_floating_point and dtype.itemsize == 1:
            # fp8: e4m3fn's NaN is 0x7f, e4m3fnuz's only NaN is 0x80.
            out.view(torch.uint8).fill_(0x80 if dtype == torch.float8_e4m3fnuz else 0x7F)
        elif dtype.is_floating_point:
            out.fill_(float("nan"))
        elif dtype != torch.bool:
            out.fill_(torch.iinfo(dtype).min)
    return out


# ---------------------------------------------------------------------------------------------------
# Interpreter: e4m3fnuz
# ---------------------------------------------------------------------------------------------------


def _interpreter_knows_fp8e4b8() -> None:
    """Teach Triton's interpreter the e4m3fnuz type (``fp8e4b8``, AMD gfx942's fp8).

    The interpreter implements e4m3fnuz (its builder has the type and its float conversion handles
    the exponent bias) but the ``dtype.to_ir`` it installs while a kernel runs lacks the case, so any
    pointer arithmetic on an e4m3fnuz tensor fails with "fail to convert fp8e4b8 to ir type" (seen in
    triton 3.7.1). This wraps that patch with the missing case. Only ever called when interpreting;
    a Triton without the hook (or with the case) is left alone.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_core", None)
    if original is None or getattr(original, "_hal_fp8e4b8", False):
        return

    def patch_lang_core(lang: Any, scope: Any) -> None:
        original(lang, scope)
        to_ir = lang.dtype.to_ir

        def to_ir_with_fp8e4b8(self: Any, builder: Any) -> Any:
            if self.name == "fp8e4b8":
                return builder.get_fp8e4b8_ty()
            return to_ir(self, builder)

        scope.set_attr(lang.dtype, "to_ir", to_ir_with_fp8e4b8)

    patch_lang_core._hal_fp8e4b8 = True  # type: ignore[attr-defined]
    interpreter._patch_lang_core = patch_lang_core


if INTERPRETING:
    _interpreter_knows_fp8e4b8()
