"""The CPU reference backend: every op of the catalogue in plain torch with fp32 accumulation.

It is always available, it is the default when no accelerator backend is, and its ops are the oracle
the conformance kit checks every other backend against and the fallback for ops a backend lacks.
The reference ops are device-agnostic torch, so they run on any backend's device.

Importing this module imports only torch and hal; the op modules load when the backend is built, and
the health reader (:mod:`hal_cpu.health`, host memory from ``sysconf``) when ``hal.health()`` asks.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hal.hookspecs import hookimpl
from hal.types import Availability, BackendImpl, BackendSpec, DeviceHealth

if TYPE_CHECKING:
    from hal.registry import RegisterBackend

__all__ = ["hal_register_backends"]


def _probe() -> Availability:
    return Availability.yes(f"always available ({platform.machine() or 'unknown'} CPU)")


def _load() -> BackendImpl:
    from hal_cpu._backend import build

    return build()


def _health() -> Sequence[DeviceHealth]:
    from hal_cpu.health import read_cpu

    return read_cpu()


@hookimpl
def hal_register_backends(register: RegisterBackend) -> None:
    register(
        BackendSpec(
            name="cpu",
            priority=0,
            probe=_probe,
            load=_load,
            health=_health,
            description="plain-torch reference backend (the oracle and the fallback)",
            reference=True,
        )
    )
