"""Benchmark-session set-up: the measured backend comes from HAL_BACKEND (default: cpu)."""

from __future__ import annotations

import os

import pytest

import hal


@pytest.fixture(scope="session")
def backend() -> hal.Backend:
    return hal.get_backend(os.environ.get("HAL_BACKEND", "cpu"))
