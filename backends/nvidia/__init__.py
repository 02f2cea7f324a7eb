"""The NVIDIA backend's plugin module: declares the ``nvidia`` backend (CUDA GPUs through torch).

Importing this module imports only hal's light modules and, through them, torch. It never imports a
vendor SDK (``pynvml``, ``cupy``, ``triton``) and never creates a CUDA context. The probe
(:mod:`hal_nvidia.probe`) reads cheap facts through NVML when asked; the implementation
(:mod:`hal_nvidia._backend`) is imported only once the backend has been selected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hal.hookspecs import hookimpl
from hal.types import Availability, BackendImpl, BackendSpec

if TYPE_CHECKING:
    from hal.registry import RegisterBackend

__all__ = ["hal_register_backends"]


def _probe() -> Availability:
    from hal_nvidia.probe import probe

    return probe()


def _load() -> BackendImpl:
    from hal_nvidia._backend import build

    return build()


@hookimpl
def hal_register_backends(register: RegisterBackend) -> None:
    register(
        BackendSpec(
            name="nvidia",
            priority=100,
            probe=_probe,
            load=_load,
            description="NVIDIA GPUs through CUDA torch; NCCL collectives, NVML probe",
        )
    )
