"""The ``nvidia`` backend's device health (its ``BackendSpec.health``): every GPU, read through NVML.

NVML (``pynvml``, package ``nvidia-ml-py``) talks to the driver, not to the CUDA runtime: reading it
creates no CUDA context, and this module imports ``pynvml`` only when :func:`read_nvml` is called.
Per GPU: memory used/total, temperature, utilization, power and volatile uncorrected ECC errors. A GPU
NVML cannot read (``GpuIsLost``) or one with uncorrected ECC errors is unhealthy.

The NVML calls follow NVIDIA's documented interface; this repository's CI runs them against a simulated
``pynvml`` only.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from typing import Any

from hal.types import DeviceHealth

__all__ = ["read_nvml"]

log = logging.getLogger("hal.nvidia")

_BACKEND = "nvidia"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible_cuda_map(count: int) -> dict[int, str]:
    """NVML index → torch device name. NVML ignores ``CUDA_VISIBLE_DEVICES``; torch numbers only the
    visible GPUs, in the order listed. Hidden GPUs are named ``nvml:N``; non-numeric lists (UUIDs) are
    taken as all-visible."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None or not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", raw):
        return {i: f"cuda:{i}" for i in range(count)}
    order = [int(x) for x in raw.split(",")]
    return {i: (f"cuda:{order.index(i)}" if i in order else f"nvml:{i}") for i in range(count)}


def read_nvml(*, pynvml: Any = None) -> list[DeviceHealth]:
    """Every GPU NVML sees, one row each, named as torch numbers them (``cuda:N``; ``nvml:N`` when hidden
    by ``CUDA_VISIBLE_DEVICES``).

    :param pynvml: the NVML module (``None``: import ``pynvml``); tests pass a stand-in.
    :raises Exception: whatever ``import pynvml`` or ``nvmlInit`` raises (no driver): ``hal.health()``
        reports it as one unhealthy row.
    """
    nvml = importlib.import_module("pynvml") if pynvml is None else pynvml
    nvml.nvmlInit()
    rows: list[DeviceHealth] = []
    try:
        count = int(nvml.nvmlDeviceGetCount())
        names = _visible_cuda_map(count)
        for i in range(count):
            try:
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                name = _text(nvml.nvmlDeviceGetName(h))
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
            except Exception as exc:  # GpuIsLost, Unknown: the device itself is the problem
                rows.append(DeviceHealth(_BACKEND, names[i], "?", False, f"NVML: {type(exc).__name__}: {exc}"))
                continue
            details: dict[str, Any] = {"nvml_index": i}
            temp = util = power = None
            ecc: int | None = None
            # Each optional reading may be unsupported on a given board (NVMLError_NotSupported).
            try:
                temp = float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
            except Exception as exc:  # optional reading
                details["temperature_error"] = f"{type(exc).__name__}: {exc}"
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception as exc:  # optional reading
                details["utilization_error"] = f"{type(exc).__name__}: {exc}"
            try:
                power = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0  # milliwatts
            except Exception as exc:  # optional reading
                details["power_error"] = f"{type(exc).__name__}: {exc}"
            try:
                ecc = int(
                    nvml.nvmlDeviceGetTotalEccErrors(h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
                )
                details["ecc_uncorrected_volatile"] = ecc
            except Exception as exc:  # ECC off or unsupported (consumer boards)
                details["ecc_error"] = f"{type(exc).__name__}: {exc}"
            healthy = not ecc
            reason = "NVML reports no fault" if healthy else f"{ecc} uncorrected ECC error(s) since the driver loaded"
            rows.append(
                DeviceHealth(
                    _BACKEND,
                    names[i],
                    name,
                    healthy,
                    reason,
                    int(mem.used),
                    int(mem.total),
                    temp,
                    util,
                    power,
                    details,
                )
            )
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:  # the readings are taken; only say so
            log.debug("nvmlShutdown failed: %s", exc)
    return rows
