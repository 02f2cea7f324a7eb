"""What every kernel module shares: compile specs, tuning configs and interpreter detection."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hal.errors import OpInputError

__all__ = [
    "FNUZ_PATCH_PROBLEM",
    "FP8",
    "INTERPRETING",
    "CompileSpec",
    "Launch",
    "empty",
    "fp8_dtype",
    "merge_config",
    "ptr",
    "require_device",
    "set_poison",
]

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


# ---------------------------------------------------------------------------------------------------
# What a launcher launches, and what compile-check compiles: one description for both
# ---------------------------------------------------------------------------------------------------

#: torch dtype → Triton pointer type, as Triton's JIT types a tensor argument at a launch.
_PTR_TYPES: dict[torch.dtype, str] = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float8_e4m3fn: "*fp8e4nv",
    torch.float8_e4m3fnuz: "*fp8e4b8",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.int8: "*i8",
    torch.uint8: "*u8",
}


def ptr(dtype: torch.dtype) -> str:
    """The Triton pointer type of a tensor of ``dtype`` (``torch.bfloat16`` → ``"*bf16"``).

    :raises KeyError: a dtype no kernel takes.
    """
    return _PTR_TYPES[dtype]


def fp8_dtype(fp8: str) -> torch.dtype:
    """The torch dtype of a target's fp8 pointer type: ``"*fp8e4b8"`` → ``float8_e4m3fnuz``, ``"*fp8e4nv"``
    (or :data:`FP8`, the placeholder) → ``float8_e4m3fn``."""
    return torch.float8_e4m3fnuz if fp8 == "*fp8e4b8" else torch.float8_e4m3fn


def _constexpr_args(kernel: Any) -> list[str]:
    """The ``tl.constexpr`` arguments of a ``@triton.jit`` function (compiled or interpreted)."""
    params = getattr(kernel, "params", None)
    if params is not None:  # a JITFunction
        return [p.name for p in params if p.is_constexpr]
    fn = getattr(kernel, "fn", kernel)  # the interpreter's InterpretedFunction wraps the Python function
    return [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if "constexpr" in str(p.annotation)  # "tl.constexpr" (a string under postponed annotations)
    ]


@functools.lru_cache(maxsize=1024)
def _launch_problem(
    kernel: Any, constexprs: tuple[str, ...], pointers: tuple[str, ...], scalars: tuple[str, ...]
) -> str | None:
    """What is wrong with a :class:`Launch` of ``kernel`` giving these names (``None``: nothing)."""
    names = list(kernel.arg_names)
    declared = set(_constexpr_args(kernel))
    problems = []
    if set(constexprs) != declared:
        problems.append(f"constexprs given {sorted(constexprs)}, the kernel declares {sorted(declared)}")
    unknown = sorted((set(pointers) | set(scalars)) - set(names))
    if unknown:
        problems.append(f"no such arguments {unknown}")
    untyped = [n for n in names if n.endswith("_ptr") and n not in pointers]
    if untyped:
        problems.append(f"pointer arguments without a type {untyped}")
    return "; ".join(problems) or None


@dataclass(frozen=True)
class Launch:
    """Everything a launcher gives one kernel besides its runtime values: the type of every pointer
    argument, the value of every ``constexpr``, the types of non-``i32`` scalars, warps and stages.

    A launcher builds it from its inputs' dtypes and flags and calls it (``launch(grid, *args)``);
    ``compile_specs`` builds it with the *same* function from the dtypes and flags it compiles for and
    turns it into a :class:`CompileSpec` (:meth:`spec`), so what ``hal compile-check`` compiles is what
    runs, by construction.

    :param kernel: the ``@triton.jit`` function.
    :param pointers: every pointer argument → its Triton type (:func:`ptr` of the tensor's dtype).
    :param constexprs: every ``constexpr`` argument → its value.
    :param num_warps: warps per program.
    :param num_stages: software-pipelining stages.
    :param scalars: scalar arguments that are not ``i32`` → their type (``{"eps": "fp32"}``).
    """

    kernel: Any
    pointers: Mapping[str, str]
    constexprs: Mapping[str, Any]
    num_warps: int
    num_stages: int
    scalars: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked once per kernel and set of names (launchers build a Launch per call: a few µs at most).
        problem = _launch_problem(self.kernel, tuple(self.constexprs), tuple(self.pointers), tuple(self.scalars))
        if problem:
            raise TypeError(f"Launch of {getattr(self.kernel, '__name__', self.kernel)}: {problem}")

    def __call__(self, grid: tuple[int, ...], *args: Any) -> None:
        """Launch the kernel on ``grid`` with the runtime ``args`` (every non-``constexpr`` argument, in order)."""
        self.kernel[grid](*args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)

    def signature(self) -> dict[str, str]:
        """Every kernel argument → its Triton type: pointers as given, ``constexpr``, scalars ``i32`` unless
        :attr:`scalars` says otherwise (Triton types an ``int`` argument below 2**31 as ``i32``)."""
        return {
            n: "constexpr" if n in self.constexprs else self.pointers.get(n) or self.scalars.get(n, "i32")
            for n in self.kernel.arg_names
        }

    def spec(self, name: str, divisible_by_16: tuple[str, ...] = ()) -> CompileSpec:
        """This launch as ``hal compile-check`` compiles it (``divisible_by_16``: see :class:`CompileSpec`;
        names the kernel does not take are dropped, so one list can serve several kernels)."""
        signature = self.signature()
        return CompileSpec(
            name=name,
            kernel=self.kernel,
            signature=signature,
            constexprs=dict(self.constexprs),
            num_warps=self.num_warps,
            num_stages=self.num_stages,
            divisible_by_16=tuple(a for a in divisible_by_16 if a in signature),
        )


def merge_config(default: Mapping[str, int], config: Mapping[str, int] | None, op: str) -> dict[str, int]:
    """``default`` updated with ``config``; a key the kernel does not know is an error, not ignored, and so
    is a value that is not a positive int (0 only for a key whose default is 0, "automatic": a 0 block
    or group size would leave the output unwritten)."""
    merged = dict(default)
    if config:
        unknown = sorted(set(config) - set(default))
        if unknown:
            raise OpInputError(op, "config", f"unknown keys {unknown}; {op} takes {sorted(default)}")
        for key, value in config.items():
            least = 0 if default[key] == 0 else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "an int >= 0 (0: automatic)" if least == 0 else "a positive int"
                raise OpInputError(op, "config", f"{key} must be {kind}, got {value!r}")
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


def _interpreter_knows_fp8e4b8(interpreter: Any = None) -> str | None:
    """Teach Triton's interpreter the e4m3fnuz type (``fp8e4b8``, AMD gfx942's fp8); ``None`` when the
    patch is in place, otherwise why it could not be applied.

    The interpreter implements e4m3fnuz (its builder has the type and its float conversion handles
    the exponent bias) but the ``dtype.to_ir`` it installs while a kernel runs lacks the case, so any
    pointer arithmetic on an e4m3fnuz tensor fails with "fail to convert fp8e4b8 to ir type" (seen in
    triton 3.7.1). This wraps that patch, ``triton.runtime.interpreter._patch_lang_core`` (a Triton
    private), with the missing case. Only ever called when interpreting. A Triton without that hook is
    left alone and the reason returned: whether its interpreter knows e4m3fnuz anyway is for a probe to
    find out (``tests/kernels/conftest.py`` runs one and skips the e4m3fnuz kernel tests, saying why,
    when it does not).

    :param interpreter: the module to patch; ``None`` means ``triton.runtime.interpreter``.
    """
    if interpreter is None:
        try:
            interpreter = importlib.import_module("triton.runtime.interpreter")
        except ImportError as exc:
            return f"triton.runtime.interpreter cannot be imported ({exc})"
    original = getattr(interpreter, "_patch_lang_core", None)
    if original is None:
        return "this Triton's interpreter has no _patch_lang_core to extend with the fp8e4b8 case"
    if getattr(original, "_hal_fp8e4b8", False):
        return None

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
    return None


#: Why the interpreter's e4m3fnuz patch could not be applied (``None``: applied, or not interpreting).
FNUZ_PATCH_PROBLEM: str | None = _interpreter_knows_fp8e4b8() if INTERPRETING else None
