"""Ready-made conformance tests: ``from hal.testing.suite import *`` in a test module.

Needs the fixtures of :mod:`hal.testing.plugin` (``pytest_plugins = ["hal.testing.plugin"]``).
Every (backend, case) pair is one test; a case that does not apply to a backend (a dtype it does not
compute in, another fp8 format) is a skip saying so.
"""

from __future__ import annotations

from typing import Any

import pytest

from hal.backend import Backend
from hal.testing.conformance import Case, cases_for, check_runtime, run_case

__all__ = ["test_hal_conformance", "test_hal_runtime"]


def test_hal_runtime(hal_backend: Backend) -> None:
    check_runtime(hal_backend)


def test_hal_conformance(hal_backend: Backend, hal_case: Case, hal_reference_ops: Any) -> None:
    why = dict((str(c), w) for c, w in cases_for(hal_backend, [hal_case.op]))[str(hal_case)]
    if why is not None:
        pytest.skip(why)
    run_case(hal_backend, hal_case, hal_reference_ops)
