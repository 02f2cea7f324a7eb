"""The NVIDIA backend's plugin module: declares the ``nvidia`` backend (CUDA GPUs through torch).

Importing this module imports only hal's light modules and, through them, torch. It never imports a
vendor SDK (``pynvml``, ``cupy``, ``triton``) and never creates a CUDA context. The probe
(:mod:`hal_nvidia.probe`) reads cheap facts through NVML when asked; the implementation
(:mod:`hal_nvidia._backend`) is imported only once the backend has been selected, or when ``hal info``
asks for the backend's op plan (``plan(arch)``: the Triton kernels and their tuning for an architecture;
that imports Triton but creates no CUDA context either). ``hal.health()`` reads NVML through
:mod:`hal_nvidia.health`, imported when it asks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hal.hookspecs import hookimpl
from hal.types import Availability, BackendImpl, BackendSpec, DeviceHealth

if TYPE_CHECKING:
    from hal.registry import RegisterBackend

__all__ = ["hal_register_backends"]


def _probe() -> Availability:
    from hal_nvidia.probe import probe

    return probe()


def _load() -> BackendImpl:
    from hal_nvidia._backend import build

    return build()


def _plan(arch: str | None) -> Mapping[str, str]:
    from hal_nvidia._backend import plan

    return plan(arch)


def _health() -> Sequence[DeviceHealth]:
    from hal_nvidia.health import read_nvml

    return read_nvml()


@hookimpl
def hal_register_backends(register: RegisterBackend) -> None:
    register(
        BackendSpec(
            name="nvidia",
            priority=100,
            probe=_probe,
            load=_load,
            plan=_plan,
            health=_health,
            description="NVIDIA GPUs through CUDA torch; NCCL collectives, NVML probe",
        )
    )
