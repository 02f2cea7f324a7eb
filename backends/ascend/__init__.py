"""The Ascend backend's plugin module: declares the ``ascend`` backend (Huawei NPUs through torch_npu).

Importing this module imports only hal's light modules and, through them, torch. It never imports
``torch_npu`` (which loads Huawei's CANN libraries) and never creates a device context. The probe
(:mod:`hal_ascend.probe`) only looks ``torch_npu`` up and asks ``npu-smi``; the implementation
(:mod:`hal_ascend._backend`) is imported only once the backend has been selected, and imports
``torch_npu`` when it builds. ``hal.health()`` asks ``npu-smi`` through :mod:`hal_ascend.health`,
imported when it asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hal.hookspecs import hookimpl
from hal.types import Availability, BackendImpl, BackendSpec, DeviceHealth

if TYPE_CHECKING:
    from hal.registry import RegisterBackend

__all__ = ["hal_register_backends"]


def _probe() -> Availability:
    from hal_ascend.probe import probe

    return probe()


def _load() -> BackendImpl:
    from hal_ascend._backend import build

    return build()


def _health() -> Sequence[DeviceHealth]:
    from hal_ascend.health import read_npu_smi

    return read_npu_smi()


@hookimpl
def hal_register_backends(register: RegisterBackend) -> None:
    register(
        BackendSpec(
            name="ascend",
            priority=80,
            probe=_probe,
            load=_load,
            health=_health,
            description="Huawei Ascend NPUs through torch_npu (CANN); HCCL collectives, npu-smi probe",
        )
    )
