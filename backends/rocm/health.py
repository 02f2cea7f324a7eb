"""The ``rocm`` backend's device health (its ``BackendSpec.health``): every AMD GPU, read through amdsmi.

amdsmi talks to the amdgpu driver, not to the HIP runtime: no HIP context is created, and ``amdsmi`` is
imported only when :func:`read_amdsmi` is called. Name, temperature, power and VRAM come from
:func:`hal_rocm.telemetry.read_devices` (the probe's readings); this module adds what only health needs,
GPU activity and the uncorrectable ECC count. A GPU amdsmi cannot identify, or one with uncorrectable
ECC errors, is unhealthy. Without amdsmi (``import amdsmi`` raises ``KeyError: 'libamd_smi.so'`` when
the ROCm library is missing), the GPUs the amdgpu driver lists in the KFD topology (the probe's facts)
are reported healthy, without telemetry.

The amdsmi calls follow AMD's documented interface; this repository's CI runs them against a simulated
``amdsmi`` only.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import Any

from hal.types import DeviceHealth
from hal_rocm.telemetry import read_devices

__all__ = ["read_amdsmi"]

log = logging.getLogger("hal.rocm")

_BACKEND = "rocm"


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _kfd_archs() -> list[str]:
    """The visible GPUs' gfx names from the probe's KFD facts (plain sysfs files, no amdsmi)."""
    from hal_rocm.probe import decide, gather

    return [str(a) for a in decide(gather(use_amdsmi=False)).details.get("arch") or []]


def _int(value: float | int | None) -> int | None:
    return None if value is None else int(value)


def read_amdsmi(*, amdsmi: Any = None, archs: Sequence[str] | None = None) -> list[DeviceHealth]:
    """Every AMD GPU amdsmi sees (``cuda:N`` in amdsmi's order, as torch's ROCm builds number them).

    :param amdsmi: the amdsmi module (``None``: import it); tests pass a stand-in.
    :param archs: the GPUs to list when amdsmi is missing or fails to start, as gfx names (``None``: the
        probe's KFD facts).
    :raises Exception: what listing the GPUs raises once amdsmi has started (``hal.health()`` reports it
        as one unhealthy row); every per-GPU reading that fails is a note in the row's ``details``.
    """
    try:
        if amdsmi is None:
            amdsmi = importlib.import_module("amdsmi")
        amdsmi.amdsmi_init()
    except Exception as exc:  # KeyError('libamd_smi.so') and the like: fall back to the KFD listing
        note = f"listed by the amdgpu driver (KFD); no telemetry (amdsmi: {_error(exc)})"
        listed = _kfd_archs() if archs is None else list(archs)
        return [DeviceHealth(_BACKEND, f"cuda:{i}", arch, True, note) for i, arch in enumerate(listed)]
    rows: list[DeviceHealth] = []
    try:
        handles = list(amdsmi.amdsmi_get_processor_handles())
        devices, notes = read_devices(amdsmi, handles)  # never raises: each failed reading is a note
        unnamed = "; ".join(n for n in notes if n.startswith("name unavailable"))
        for i, (handle, reading) in enumerate(zip(handles, devices, strict=True)):
            device = f"cuda:{i}"
            if reading["name"] is None:  # not even the ASIC info answers: the device itself is the problem
                rows.append(DeviceHealth(_BACKEND, device, "?", False, f"amdsmi cannot identify the GPU ({unnamed})"))
                continue
            details: dict[str, Any] = {}
            if reading["temperature_sensor"] is not None:
                details["temperature_sensor"] = reading["temperature_sensor"]
            util: float | None = None
            ecc: int | None = None
            try:
                util = float(amdsmi.amdsmi_get_gpu_activity(handle)["gfx_activity"])
            except Exception as exc:  # optional reading ("N/A" on some boards)
                details["utilization_error"] = _error(exc)
            try:
                ecc = int(amdsmi.amdsmi_get_gpu_total_ecc_count(handle)["uncorrectable_count"])
                details["ecc_uncorrectable"] = ecc
            except Exception as exc:  # ECC unsupported or off
                details["ecc_error"] = _error(exc)
            if notes:
                details["notes"] = list(notes)
            healthy = not ecc
            reason = "amdsmi reports no fault" if healthy else f"{ecc} uncorrectable ECC error(s)"
            temp, power = reading["temperature_c"], reading["power_w"]
            rows.append(
                DeviceHealth(
                    _BACKEND,
                    device,
                    str(reading["name"]),
                    healthy,
                    reason,
                    _int(reading["memory_used_bytes"]),
                    _int(reading["memory_total_bytes"]),
                    None if temp is None else float(temp),
                    util,
                    None if power is None else float(power),
                    details,
                )
            )
    finally:
        try:
            amdsmi.amdsmi_shut_down()
        except Exception as exc:  # the readings are taken
            log.debug("amdsmi_shut_down failed: %s", exc)
    return rows
