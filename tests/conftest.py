"""Test-session set-up: the example third-party plugin on sys.path, and HAL's pytest plugin.

`make test` installs ``examples/hal-example-plugin`` into ``build/plugins`` (not into .venv); putting
that folder on sys.path makes its entry point visible to ``importlib.metadata``, exactly as an
installed distribution's would be.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "build" / "plugins"

if not (PLUGINS / "hal_example").is_dir():
    raise RuntimeError(
        f"the example plugin is not installed in {PLUGINS}; run `make test` (it installs it), or "
        f"`pip install --no-deps --target {PLUGINS} examples/hal-example-plugin`"
    )
sys.path.insert(0, str(PLUGINS))
# Subprocesses started by tests (hal info, torchrun) see it too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))
# The Triton kernels run on the CPU through Triton's interpreter; it must be on before any kernel
# module is imported (its @triton.jit decorators read it). `hal compile-check` subprocesses unset it.
os.environ["TRITON_INTERPRET"] = "1"
# Tests choose backends explicitly; a developer's own selection must not leak in.
os.environ.pop("HAL_BACKEND", None)
os.environ.pop("HAL_DISABLE_PLUGINS", None)

pytest_plugins = ["hal.testing.plugin"]
