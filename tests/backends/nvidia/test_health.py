"""The nvidia backend's health reader on a simulated NVML; the plugin registers it lazily."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

import hal
import hal_nvidia
from hal_nvidia.health import read_nvml


class NVMLError_GpuIsLost(Exception):  # pynvml's own spelling
    pass


def fake_nvml(ecc: Sequence[int], lost: Sequence[int] = ()) -> Any:
    calls: list[str] = []

    def handle(i: int) -> int:
        if i in lost:
            raise NVMLError_GpuIsLost("GPU is lost")
        return i

    return SimpleNamespace(
        calls=calls,
        NVML_TEMPERATURE_GPU=0,
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
        NVML_VOLATILE_ECC=0,
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(ecc),
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30),
        nvmlDeviceGetTemperature=lambda h, sensor: 40 + h,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=90),
        nvmlDeviceGetPowerUsage=lambda h: 350_000,  # milliwatts
        nvmlDeviceGetTotalEccErrors=lambda h, kind, counter: ecc[h],
    )


def test_nvml_reader_on_simulated_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = fake_nvml(ecc=[0, 3, 0], lost=[2])
    ok, ecc, lost = read_nvml(pynvml=nvml)
    assert (ok.backend, ok.device, ok.healthy, ok.name) == ("nvidia", "cuda:0", True, "NVIDIA H100 80GB HBM3")
    assert (ok.memory_used_bytes, ok.memory_total_bytes) == (2**30, 80 * 2**30)
    assert (ok.temperature_c, ok.utilization_pct, ok.power_w) == (40.0, 90.0, 350.0)
    assert not ecc.healthy and ecc.reason == "3 uncorrected ECC error(s) since the driver loaded"
    assert not lost.healthy and lost.reason == "NVML: NVMLError_GpuIsLost: GPU is lost"
    assert nvml.calls == ["init", "shutdown"]
    # NVML counts every GPU; torch numbers only the visible ones, in CUDA_VISIBLE_DEVICES order.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert [r.device for r in read_nvml(pynvml=fake_nvml(ecc=[0, 0, 0]))] == ["cuda:1", "nvml:1", "cuda:0"]


def test_an_unsupported_optional_reading_is_a_detail_not_a_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = fake_nvml(ecc=[0])

    def not_supported(*args: Any) -> Any:
        raise RuntimeError("NVMLError_NotSupported")

    nvml.nvmlDeviceGetTotalEccErrors = not_supported  # a consumer board: no ECC
    (row,) = read_nvml(pynvml=nvml)
    assert row.healthy and row.details["ecc_error"] == "RuntimeError: NVMLError_NotSupported"


def test_the_plugin_registers_it_and_imports_it_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delitem(sys.modules, "hal_nvidia.health", raising=False)
    spec = hal.Registry(entry_points=False, plugins=[("nvidia", hal_nvidia)]).spec("nvidia")
    assert spec.health is not None and "hal_nvidia.health" not in sys.modules
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(ecc=[0, 0]))
    assert [(r.backend, r.device, r.healthy) for r in spec.health()] == [
        ("nvidia", "cuda:0", True),
        ("nvidia", "cuda:1", True),
    ]
