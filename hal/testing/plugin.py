"""A pytest plugin for testing HAL backends: ``pytest_plugins = ["hal.testing.plugin"]`` in conftest.py.

Fixtures:

- ``hal_registry`` (session): a :class:`hal.Registry` of every installed plugin.
- ``hal_backend``: a built :class:`hal.Backend`, parametrized over every discovered backend (or the
  ones named with ``--hal-backend``). An unavailable backend is a skip carrying its probe's reason.
- ``hal_case``: a :class:`hal.testing.Case`, parametrized over the conformance kit.
"""

from __future__ import annotations

from typing import Any

import pytest

from hal.backend import Backend
from hal.registry import Registry
from hal.testing.conformance import CASES

_registry: Registry | None = None


def _session_registry() -> Registry:
    # Collection (pytest_generate_tests) needs the registry before fixtures exist; one per session.
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--hal-backend",
        action="append",
        default=None,
        metavar="NAME",
        help="run hal_backend tests only for this backend (repeatable; default: every discovered backend)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "hal_backend_name" in metafunc.fixturenames:
        wanted = metafunc.config.getoption("--hal-backend")
        params = []
        for info in _session_registry().backends():
            if wanted and info.name not in wanted:
                continue
            marks = [] if info.available else [pytest.mark.skip(reason=f"backend {info.name!r}: {info.reason}")]
            params.append(pytest.param(info.name, id=info.name, marks=marks))
        metafunc.parametrize("hal_backend_name", params)
    if "hal_case" in metafunc.fixturenames:
        metafunc.parametrize("hal_case", CASES, ids=[f"{c.op}-{c.id}" for c in CASES])


@pytest.fixture(scope="session")
def hal_registry() -> Registry:
    return _session_registry()


@pytest.fixture
def hal_backend(hal_registry: Registry, hal_backend_name: str) -> Backend:
    return hal_registry.get_backend(hal_backend_name)


@pytest.fixture(scope="session")
def hal_reference_ops(hal_registry: Registry) -> Any:
    return hal_registry.reference_ops()
