"""Testing support for HAL and for third-party backend packages.

- :mod:`hal.testing.conformance`: the conformance kit (every op against the reference).
- :mod:`hal.testing.plugin`: a pytest plugin (``pytest_plugins = ["hal.testing.plugin"]``) giving the
  ``hal_registry`` and ``hal_backend`` fixtures; ``hal_backend`` is parametrized over every discovered
  backend, and an unavailable backend shows as a skip with its probe's reason.
- :mod:`hal.testing.suite`: ready-made tests; ``from hal.testing.suite import *`` in a test module
  runs the whole kit against every discovered backend.
"""

from __future__ import annotations

from hal.testing.conformance import (
    CASES,
    TOLERANCE,
    Case,
    ConformanceFailure,
    assert_close,
    cases_for,
    check_backend,
    check_runtime,
    run_case,
)

__all__ = [
    "CASES",
    "TOLERANCE",
    "Case",
    "ConformanceFailure",
    "assert_close",
    "cases_for",
    "check_backend",
    "check_runtime",
    "run_case",
]
