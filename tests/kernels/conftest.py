"""Kernel tests: each kernel against its reference under TRITON_INTERPRET=1 (set by tests/conftest.py).

``poison`` (autouse) makes every kernel output start as garbage, so an element a kernel fails to write
fails the comparison. ``reference(module, op)`` resolves a kernel module's ``REFERENCE`` entry.

``FP8S`` parametrizes a test over both fp8 formats; its e4m3fnuz case is skipped, with the reason, when
this Triton's interpreter cannot run a kernel on an e4m3fnuz tensor (:data:`FNUZ_PROBLEM`, found by
running one): the e4m3fnuz support comes from a patch of a Triton private
(:func:`hal_kernels._common._interpreter_knows_fp8e4b8`), so a Triton that changed it must show up as
a skip that says so, never as a crash or a silent pass.

``bounds_checked`` checks every load and store the interpreter executes against the tensors passed
to the kernel: an access outside all of them, which on the CPU would read or write whatever memory
lies there unnoticed, fails the test.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (it is in the test extras: pip install -e '.[test]')")

assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must turn the Triton interpreter on first"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from hal_kernels import _common  # noqa: E402


@pytest.fixture(autouse=True)
def poison() -> Iterator[None]:
    old = _common.set_poison(True)
    yield
    _common.set_poison(old)


def reference(module: Any, op: str) -> Callable[..., Any]:
    """The oracle of ``module.OPS[op]``: the function named by ``module.REFERENCE[op]``."""
    mod_name, _, fn_name = module.REFERENCE[op].partition(":")
    return getattr(importlib.import_module(mod_name), fn_name)


# ---------------------------------------------------------------------------------------------------
# e4m3fnuz under the interpreter
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _fnuz_probe_kernel(src_ptr, dst_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(src_ptr + offs)  # pointer arithmetic on e4m3fnuz: what the unpatched interpreter fails
    tl.store(out_ptr + offs, x.to(tl.float32))
    tl.store(dst_ptr + offs, x)


def fnuz_problem() -> str | None:
    """``None`` when the interpreter loads and stores e4m3fnuz tensors correctly; otherwise why not."""
    src = torch.tensor([1.0, -2.0, 0.5, 0.0, 240.0, -0.015625, 3.5, 0.0], dtype=torch.float8_e4m3fnuz)
    dst = torch.zeros_like(src)
    out = torch.zeros(src.shape)
    patch = _common.FNUZ_PATCH_PROBLEM or "the fp8e4b8 patch is applied"
    try:
        _fnuz_probe_kernel[(1,)](src, dst, out, BLOCK=src.numel())
    except Exception as exc:  # any failure is the finding, reported as the skip reason
        return f"the Triton {triton.__version__} interpreter cannot run a kernel on e4m3fnuz ({patch}): {exc}"
    if not (torch.equal(out, src.float()) and torch.equal(dst.view(torch.uint8), src.view(torch.uint8))):
        return (
            f"the Triton {triton.__version__} interpreter reads or writes e4m3fnuz wrongly ({patch}): "
            f"{src.float().tolist()} came back as {out.tolist()}"
        )
    return None


#: Why the e4m3fnuz kernel tests cannot run here (``None``: they can).
FNUZ_PROBLEM = fnuz_problem()
needs_fnuz = pytest.mark.skipif(FNUZ_PROBLEM is not None, reason=str(FNUZ_PROBLEM))
#: Both fp8 formats as test parameters, e4m3fnuz marked :data:`needs_fnuz`.
FP8S = [
    pytest.param(torch.float8_e4m3fn, id="e4m3fn"),
    pytest.param(torch.float8_e4m3fnuz, id="e4m3fnuz", marks=needs_fnuz),
]


# ---------------------------------------------------------------------------------------------------
# Out-of-bounds accesses
# ---------------------------------------------------------------------------------------------------


class BoundsViolation(AssertionError):
    """A kernel touched memory outside every tensor passed to it."""


@pytest.fixture
def bounds_checked(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """While the test runs, every interpreted load and store (its unmasked lanes) must lie within one of the
    tensors (their whole storage) passed to the kernel being run; the violations are collected in the
    yielded list (a test asserts it empty after its launches) and fail the test at its end if it does not.
    A wild lane is not executed (a load gives ``other`` there), so the test fails instead of the process
    crashing. An access that lands inside another argument is not caught.

    It hooks two Triton privates (``GridExecutor._init_args_hst``, where the interpreter takes a launch's
    arguments, and the interpreter builder's masked load and store); a Triton without them gives a skip
    that says so.
    """
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    executor = getattr(interpreter, "GridExecutor", None)
    hooks = ("create_masked_load", "create_masked_store")
    if builder is None or executor is None or not hasattr(executor, "_init_args_hst"):
        pytest.skip(f"triton {triton.__version__}'s interpreter lacks the hooks bounds_checked uses")
    if not all(hasattr(builder, h) for h in hooks):
        pytest.skip(f"triton {triton.__version__}'s interpreter builder lacks {hooks}")

    ranges: list[tuple[int, int]] = []
    violations: list[str] = []
    init_args = executor._init_args_hst

    def init_args_hst(self: Any, args_dev: Any, kwargs: Any) -> Any:
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        ranges.clear()
        for arg in [*args_hst, *kwargs_hst.values()]:
            if isinstance(arg, torch.Tensor):
                storage = arg.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        return args_hst, kwargs_hst

    def checked(what: str, ptrs: Any, mask: Any) -> Any:
        """``mask`` with the lanes outside every argument turned off (recorded as a violation): the access
        is checked before it happens, and a wild one is never made (it could crash the process)."""
        import numpy as np

        active = np.asarray(mask.data, dtype=bool)
        addr = np.asarray(ptrs.data).astype(np.uint64)
        size = np.uint64(max(ptrs.get_element_ty().primitive_bitwidth // 8, 1))
        inside = np.zeros(addr.shape, dtype=bool)
        for start, end in ranges:
            inside |= (addr >= np.uint64(start)) & (addr + size <= np.uint64(end))
        wild = active & ~inside
        if not wild.any():
            return mask
        first = hex(int(addr[wild][0]))
        violations.append(f"{what} of {int(wild.sum())} elements outside every argument, e.g. at {first}")
        return type(mask)(active & inside, mask.dtype)

    load, store = builder.create_masked_load, builder.create_masked_store

    def masked_load(ptrs: Any, mask: Any, *args: Any) -> Any:
        return load(ptrs, checked("load", ptrs, mask), *args)

    def masked_store(ptrs: Any, value: Any, mask: Any, *args: Any) -> Any:
        return store(ptrs, value, checked("store", ptrs, mask), *args)

    monkeypatch.setattr(executor, "_init_args_hst", init_args_hst)
    monkeypatch.setattr(builder, "create_masked_load", masked_load)
    monkeypatch.setattr(builder, "create_masked_store", masked_store)
    yield violations
    if violations:
        raise BoundsViolation("\n".join(violations[:10]))
