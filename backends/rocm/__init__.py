"""The ROCm backend's plugin module: declares the ``rocm`` backend (AMD GPUs through HIP torch).

Importing this module imports only hal's light modules and, through them, torch. It never imports a
vendor SDK (``amdsmi``, ``triton``) and never creates a HIP context. The probe
(:mod:`hal_rocm.probe`) reads the KFD topology when asked; the implementation
(:mod:`hal_rocm._backend`) is imported only once the backend has been selected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hal.hookspecs import hookimpl
from hal.types import Availability, BackendImpl, BackendSpec

if TYPE_CHECKING:
    from hal.registry import RegisterBackend

__all__ = ["hal_register_backends"]


def _probe() -> Availability:
    from hal_rocm.probe import probe

    return probe()


def _load() -> BackendImpl:
    from hal_rocm._backend import build

    return build()


@hookimpl
def hal_register_backends(register: RegisterBackend) -> None:
    register(
        BackendSpec(
            name="rocm",
            priority=90,
            probe=_probe,
            load=_load,
            description="AMD Instinct GPUs through ROCm torch; RCCL collectives, KFD probe",
        )
    )
