"""Loading a Python file that is no importable module (a script in bench/, a torchrun worker, an emulation)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType


def load_module(path: Path, name: str) -> ModuleType:
    """The module in ``path``, executed under ``name`` and registered in ``sys.modules`` as that name
    (dataclasses and pickling look a class's module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def loaded_module(path: Path, name: str) -> Iterator[ModuleType]:
    """:func:`load_module` for the ``with`` block only: the name leaves ``sys.modules`` afterwards."""
    try:
        yield load_module(path, name)
    finally:
        sys.modules.pop(name, None)
