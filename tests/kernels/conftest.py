"""Kernel tests: each kernel against its reference under TRITON_INTERPRET=1 (set by tests/conftest.py).

``poison`` (autouse) makes every kernel output start as garbage, so an element a kernel fails to write
fails the comparison. ``reference(module, op)`` resolves a kernel module's ``REFERENCE`` entry.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("triton", reason="triton is not installed (it is in the test extras: pip install -e '.[test]')")

assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must turn the Triton interpreter on first"

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
