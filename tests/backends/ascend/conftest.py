"""Fixtures of the Ascend tests: the CPU emulation of torch_npu, installed for one test at a time."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.file_modules import load_module

_EMULATION = Path(__file__).with_name("torch_npu_emulation.py")


@pytest.fixture(scope="session")
def emulation_module() -> ModuleType:
    """The emulation module, loaded once per session (not installed as torch_npu by itself)."""
    return load_module(_EMULATION, "torch_npu_emulation")


@pytest.fixture
def torch_npu_emulation(emulation_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """``sys.modules["torch_npu"]`` and ``torch.npu`` are the emulation for this test, and nothing after it.

    ``hal_ascend.ops`` binds torch_npu when imported, so it is dropped before and after the test: each
    test's backend imports it afresh against the module installed now.
    """
    monkeypatch.setitem(sys.modules, "torch_npu", emulation_module)
    monkeypatch.setattr(torch, "npu", emulation_module.npu, raising=False)
    monkeypatch.delitem(sys.modules, "hal_ascend.ops", raising=False)
    emulation_module.calls.clear()
    yield emulation_module
    sys.modules.pop("hal_ascend.ops", None)
    package = sys.modules.get("hal_ascend")
    if package is not None and hasattr(package, "ops"):
        delattr(package, "ops")
