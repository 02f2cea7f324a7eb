"""An amdsmi stand-in for the ROCm tests: an MI300X box's enums and query functions, each replaceable."""

from __future__ import annotations

import enum
import importlib.machinery
import types
from typing import Any

GIB = 2**30


class AmdSmiLibraryException(Exception):
    """What amdsmi raises for a failed query (``AMDSMI_STATUS_NOT_SUPPORTED`` and the like)."""


def fake_amdsmi(
    n: int = 8,
    *,
    link_enum: str = "AmdSmiLinkType",
    hotspot: str = "HOTSPOT",
    xgmi_pairs: set[frozenset[int]] | None = None,
    **overrides: Any,
) -> types.ModuleType:
    """An amdsmi stand-in for an ``n``-GPU MI300X box.

    :param link_enum: ``"AmdSmiLinkType"`` (ROCm 6.x names, XGMI = 1) or ``"AmdSmiIoLinkType"`` (older
        names, XGMI = 2): the releases disagree on the XGMI value.
    :param hotspot: the hotspot sensor's enum name (``"JUNCTION"`` before ROCm 6).
    :param xgmi_pairs: GPU pairs joined by XGMI (default: all of them, as on an MI300X platform).
    :param overrides: functions to replace, by name.
    """
    module = types.ModuleType("amdsmi")
    module.__spec__ = importlib.machinery.ModuleSpec("amdsmi", None)
    sensors = enum.IntEnum("AmdSmiTemperatureType", {"EDGE": 0, hotspot: 1, "VRAM": 2})
    metric = enum.IntEnum("AmdSmiTemperatureMetric", {"CURRENT": 0, "MAX": 1})
    memory = enum.IntEnum("AmdSmiMemoryType", {"VRAM": 0, "VIS_VRAM": 1, "GTT": 2})
    if link_enum == "AmdSmiLinkType":
        links = enum.IntEnum(
            link_enum, {"AMDSMI_LINK_TYPE_INTERNAL": 0, "AMDSMI_LINK_TYPE_XGMI": 1, "AMDSMI_LINK_TYPE_PCIE": 2}
        )
        xgmi, pcie = links.AMDSMI_LINK_TYPE_XGMI, links.AMDSMI_LINK_TYPE_PCIE
    else:
        links = enum.IntEnum(link_enum, {"UNDEFINED": 0, "PCIEXPRESS": 1, "XGMI": 2})
        xgmi, pcie = links.XGMI, links.PCIEXPRESS
    pairs = xgmi_pairs if xgmi_pairs is not None else {frozenset((a, b)) for a in range(n) for b in range(n) if a != b}

    def temp(h: int, sensor: Any, m: Any) -> int:
        assert m == metric.CURRENT
        if sensor == sensors.EDGE:
            raise AmdSmiLibraryException("AMDSMI_STATUS_NOT_SUPPORTED")  # MI300 has no edge sensor
        return 40 + h

    def link(a: int, b: int) -> dict[str, Any]:
        if a == b:
            return {"hops": 0, "type": 0}
        return {"hops": 1, "type": int(xgmi if frozenset((a, b)) in pairs else pcie)}

    def vram_only(value: int) -> Any:
        def query(h: int, kind: Any) -> int:
            if kind != memory.VRAM:
                raise AmdSmiLibraryException(f"asked for {kind}, not VRAM")
            return value

        return query

    functions: dict[str, Any] = {
        "amdsmi_init": lambda: None,
        "amdsmi_shut_down": lambda: None,
        "amdsmi_get_processor_handles": lambda: list(range(n)),
        "amdsmi_get_gpu_asic_info": lambda h: {
            "market_name": "AMD Instinct MI300X",
            "target_graphics_version": "gfx942",
        },
        "amdsmi_get_gpu_driver_info": lambda h: {"driver_version": "6.10.5"},
        "amdsmi_get_temp_metric": temp,
        "amdsmi_get_power_info": lambda h: {"current_socket_power": 130 + h, "average_socket_power": "N/A"},
        "amdsmi_get_gpu_memory_usage": vram_only(300 * 2**20),
        "amdsmi_get_gpu_memory_total": vram_only(192 * GIB),
        "amdsmi_topo_get_link_type": link,
        "AmdSmiTemperatureType": sensors,
        "AmdSmiTemperatureMetric": metric,
        "AmdSmiMemoryType": memory,
        link_enum: links,
        "AmdSmiLibraryException": AmdSmiLibraryException,
    }
    functions.update(overrides)
    for name, value in functions.items():
        setattr(module, name, value)
    return module
