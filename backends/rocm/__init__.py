"""The ROCm backend's plugin module: declares the ``rocm`` backend (AMD GPUs through HIP torch).

Importing this module imports only hal's light modules and, through them, torch. It never imports a
vendor SDK (``amdsmi``, ``triton``) and never creates a HIP context. The probe (:mod:`hal_rocm.probe`)
reads the KFD topology when asked; the implementation (:mod:`hal_rocm._backend`) is imported only once
the backend has been selected, or when ``hal info`` asks for the backend's op plan (``plan(arch)``: the
Triton kernels and their tuning for an architecture; that imports Triton but creates no HIP context
either). ``hal.health()`` reads amdsmi through :mod:`hal_rocm.health`, imported when it asks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hal.hookspecs import hookimpl
from hal.types import Availability, BackendImpl, BackendSpec, DeviceHealth

if TYPE_CHECKING:
    from hal.registry import RegisterBackend

__all__ = ["hal_register_backends"]


def _probe() -> Availability:
    from hal_rocm.probe import probe

    return probe()


def _load() -> BackendImpl:
    from hal_rocm._backend import build

    return build()


def _plan(arch: str | None) -> Mapping[str, str]:
    from hal_rocm._backend import plan

    return plan(arch)


def _health() -> Sequence[DeviceHealth]:
    from hal_rocm.health import read_amdsmi

    return read_amdsmi()


@hookimpl
def hal_register_backends(register: RegisterBackend) -> None:
    register(
        BackendSpec(
            name="rocm",
            priority=90,
            probe=_probe,
            load=_load,
            plan=_plan,
            health=_health,
            description="AMD Instinct GPUs through ROCm torch; RCCL collectives, KFD probe",
        )
    )
