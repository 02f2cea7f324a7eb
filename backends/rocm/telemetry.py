"""AMD GPU telemetry through ``amdsmi``: temperature, power, VRAM used and total, XGMI links.

Every function here returns data and never raises: ``amdsmi`` fails in odd ways (``import amdsmi``
raises ``KeyError: 'libamd_smi.so'`` when the ROCm library is missing; a query unsupported on one
board raises ``AmdSmiLibraryException``; fields read ``"N/A"``; enum names move between releases), so
each failure becomes a note and the value ``None``. amdsmi talks to the amdgpu driver, not to the HIP
runtime: no HIP context is created. Nothing is imported until a function is called.

:func:`read_telemetry` opens and closes its own amdsmi session; :func:`read_devices` works inside a
session the caller holds (the probe's, which also reads names and the driver version).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["describe", "read_devices", "read_telemetry"]

#: Temperature sensors, best first: MI300 reports no edge temperature, and ``HOTSPOT`` was named
#: ``JUNCTION`` before ROCm 6.
_SENSORS = ("HOTSPOT", "JUNCTION", "EDGE")
#: ``amdsmi_get_power_info`` keys, best first (watts; ``"N/A"`` where the board has no such sensor:
#: MI300 reports the current socket power, MI200 the average).
_POWER_KEYS = ("socket_power", "current_socket_power", "average_socket_power")
#: (reading, what a note calls it, the amdsmi function taking (handle, AmdSmiMemoryType.VRAM)), in bytes.
_MEMORY = (
    ("memory_used_bytes", "VRAM used", "amdsmi_get_gpu_memory_usage"),
    ("memory_total_bytes", "VRAM total", "amdsmi_get_gpu_memory_total"),
)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _number(value: Any) -> float | int | None:
    """A reading as a number; ``None`` for amdsmi's ``"N/A"`` and anything else not numeric."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(str(value))
    except ValueError:
        return None


def _xgmi_link_type(amdsmi: Any) -> int:
    """The value ``amdsmi_topo_get_link_type`` reports for XGMI in this amdsmi release (the link-type
    enum was renamed and its XGMI and PCIE values swapped between releases, so never hard-code it)."""
    enum = getattr(amdsmi, "AmdSmiLinkType", None)
    if enum is not None:
        return int(enum.AMDSMI_LINK_TYPE_XGMI)
    return int(amdsmi.AmdSmiIoLinkType.XGMI)


class _Notes:
    """Failures grouped by what failed and why, so eight GPUs failing alike give one line."""

    def __init__(self) -> None:
        self._gpus: dict[tuple[str, str], list[int | None]] = {}

    def add(self, gpu: int | None, what: str, why: str) -> None:
        """Record that ``what`` failed on ``gpu`` (``None``: on every GPU) because ``why``."""
        self._gpus.setdefault((what, why), []).append(gpu)

    def lines(self) -> list[str]:
        out = []
        for (what, why), gpus in self._gpus.items():
            if None in gpus:
                where = "every gpu"
            elif len(gpus) == 1:
                where = f"gpu {gpus[0]}"
            else:
                where = "gpus " + ", ".join(map(str, gpus))
            out.append(f"{what} unavailable on {where}: {why}")
        return out


def _temperature(amdsmi: Any, handle: Any) -> tuple[float | int | None, str | None, str | None]:
    """(degrees C, sensor name, why not) from the first sensor that answers."""
    why = "no temperature sensor answered"
    try:
        kinds, metric = amdsmi.AmdSmiTemperatureType, amdsmi.AmdSmiTemperatureMetric.CURRENT
    except Exception as exc:  # an amdsmi without the enums: a note, not a failure
        return None, None, _error(exc)
    for sensor in _SENSORS:
        kind = getattr(kinds, sensor, None)
        if kind is None:
            continue
        try:
            value = _number(amdsmi.amdsmi_get_temp_metric(handle, kind, metric))
        except Exception as exc:  # unsupported sensor on this board: try the next
            why = _error(exc)
            continue
        if value is not None:
            return value, sensor.lower(), None
        why = f"{sensor.lower()} sensor reads N/A"
    return None, None, why


def _power(amdsmi: Any, handle: Any) -> tuple[float | int | None, str | None]:
    try:
        info = amdsmi.amdsmi_get_power_info(handle)
    except Exception as exc:  # see the module docstring
        return None, _error(exc)
    for key in _POWER_KEYS:
        value = _number(info.get(key)) if isinstance(info, Mapping) else None
        if value is not None:
            return value, None
    return None, f"no socket power reading in {sorted(info) if isinstance(info, Mapping) else info!r}"


def read_devices(amdsmi: Any, handles: Sequence[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Telemetry for each GPU handle, inside an amdsmi session the caller has opened.

    :param amdsmi: the imported ``amdsmi`` module (or a stand-in with the same functions).
    :param handles: ``amdsmi_get_processor_handles()``, in that order.
    :returns: ``(devices, notes)``: one dict per handle with ``index``, ``name``, ``temperature_c``,
        ``temperature_sensor``, ``power_w``, ``memory_used_bytes``, ``memory_total_bytes``,
        ``xgmi_links`` (how many of the other GPUs this one reaches over XGMI) — ``None`` where the
        reading failed — and one line per kind of failure.
    """
    notes = _Notes()
    devices: list[dict[str, Any]] = []
    try:
        xgmi: int | None = _xgmi_link_type(amdsmi)
    except Exception as exc:  # an amdsmi without the link-type enum: no link counts
        xgmi = None
        notes.add(None, "XGMI links", _error(exc))
    try:
        vram: Any = amdsmi.AmdSmiMemoryType.VRAM
    except Exception as exc:  # an amdsmi without the memory-type enum: no memory readings
        vram = None
        notes.add(None, "VRAM", _error(exc))
    for i, handle in enumerate(handles):
        device: dict[str, Any] = {"index": i}
        try:
            device["name"] = str(amdsmi.amdsmi_get_gpu_asic_info(handle)["market_name"])
        except Exception as exc:  # see the module docstring
            device["name"] = None
            notes.add(i, "name", _error(exc))
        temp, sensor, why = _temperature(amdsmi, handle)
        device["temperature_c"], device["temperature_sensor"] = temp, sensor
        if why is not None:
            notes.add(i, "temperature", why)
        device["power_w"], why = _power(amdsmi, handle)
        if why is not None:
            notes.add(i, "power", why)
        for key, what, fn in _MEMORY:
            device[key] = None
            if vram is None:
                continue
            try:
                raw = getattr(amdsmi, fn)(handle, vram)
            except Exception as exc:  # see the module docstring
                notes.add(i, what, _error(exc))
                continue
            device[key] = _number(raw)
            if device[key] is None:
                notes.add(i, what, f"reads {raw!r}")
        device["xgmi_links"] = None
        if xgmi is not None:
            try:
                links = 0
                for j, peer in enumerate(handles):
                    if j != i and int(amdsmi.amdsmi_topo_get_link_type(handle, peer)["type"]) == xgmi:
                        links += 1
                device["xgmi_links"] = links
            except Exception as exc:  # see the module docstring
                notes.add(i, "XGMI links", _error(exc))
        devices.append(device)
    return devices, notes.lines()


def read_telemetry(amdsmi: Any | None = None) -> dict[str, Any]:
    """Telemetry of every AMD GPU amdsmi sees, in its own amdsmi session. Never raises.

    :param amdsmi: a module to use instead of importing ``amdsmi`` (tests pass a stand-in).
    :returns: ``{"devices": [...], "notes": [...]}``: ``devices`` as :func:`read_devices` gives them
        (empty when amdsmi is missing or fails to start), ``notes`` one line per failure, e.g.
        ``"amdsmi unavailable: KeyError: 'libamd_smi.so'"``.
    """
    notes: list[str] = []
    devices: list[dict[str, Any]] = []
    try:
        if amdsmi is None:
            amdsmi = importlib.import_module("amdsmi")
        amdsmi.amdsmi_init()
    except Exception as exc:  # import amdsmi raises KeyError('libamd_smi.so') without ROCm
        return {"devices": devices, "notes": [f"amdsmi unavailable: {_error(exc)}"]}
    try:
        devices, more = read_devices(amdsmi, list(amdsmi.amdsmi_get_processor_handles()))
        notes += more
    except Exception as exc:  # read_devices catches per reading; this is the handle listing
        notes.append(f"amdsmi query failed: {_error(exc)}")
    finally:
        try:
            amdsmi.amdsmi_shut_down()
        except Exception as exc:  # the readings are already taken
            notes.append(f"amdsmi_shut_down failed: {_error(exc)}")
    return {"devices": devices, "notes": notes}


def _gib(n: float | int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f}"


def describe(device: Mapping[str, Any]) -> str:
    """One line for a person: ``"gpu 0 AMD Instinct MI300X: 41 °C hotspot · 132 W · VRAM 0.3/192.0 GiB ·
    7 XGMI links"``; ``?`` marks a reading that failed."""
    temp = device.get("temperature_c")
    parts = [
        "? °C" if temp is None else f"{temp:g} °C {device.get('temperature_sensor') or ''}".rstrip(),
        "? W" if device.get("power_w") is None else f"{device['power_w']:g} W",
        f"VRAM {_gib(device.get('memory_used_bytes'))}/{_gib(device.get('memory_total_bytes'))} GiB",
        f"{'?' if device.get('xgmi_links') is None else device['xgmi_links']} XGMI links",
    ]
    name = device.get("name") or "AMD GPU"
    return f"gpu {device.get('index', '?')} {name}: " + " · ".join(parts)
