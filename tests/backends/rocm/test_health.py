"""The rocm backend's health reader on a simulated amdsmi (the telemetry tests' stand-in, plus activity
and ECC), its KFD fallback without amdsmi, and the plugin registering it lazily."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import hal
import hal_rocm
import hal_rocm.probe
from hal_rocm.health import read_amdsmi
from tests.backends.rocm.amdsmi_standin import AmdSmiLibraryException, fake_amdsmi
from tests.backends.rocm.test_probe import gather_fake, kfd_tree

GIB = 2**30


def mi300x(n: int = 2, **overrides: Any) -> Any:
    """``n`` MI300X GPUs; GPU ``h`` has ``2 * h`` uncorrectable ECC errors and 75% activity."""
    functions: dict[str, Any] = {
        "amdsmi_get_gpu_activity": lambda h: {"gfx_activity": 75, "umc_activity": 10, "mm_activity": "N/A"},
        "amdsmi_get_gpu_total_ecc_count": lambda h: {"uncorrectable_count": h * 2, "correctable_count": 7},
    }
    functions.update(overrides)
    return fake_amdsmi(n, **functions)


def test_amdsmi_reader_on_simulated_gpus() -> None:
    good, bad = read_amdsmi(amdsmi=mi300x(2))
    assert (good.backend, good.device, good.name, good.healthy) == ("rocm", "cuda:0", "AMD Instinct MI300X", True)
    assert (good.memory_used_bytes, good.memory_total_bytes) == (300 * 2**20, 192 * GIB)
    assert (good.temperature_c, good.utilization_pct, good.power_w) == (40.0, 75.0, 130.0)
    assert good.reason == "amdsmi reports no fault" and good.details["temperature_sensor"] == "hotspot"
    assert (bad.device, bad.healthy) == ("cuda:1", False) and "2 uncorrectable ECC" in bad.reason


def test_a_gpu_amdsmi_cannot_identify_is_unhealthy_and_failed_readings_are_notes() -> None:
    def asic(h: int) -> dict[str, str]:
        if h == 1:
            raise AmdSmiLibraryException("AMDSMI_STATUS_NO_HSMP_DRV")
        return {"market_name": "AMD Instinct MI300X"}

    def no_activity(h: int) -> Any:
        raise AmdSmiLibraryException("AMDSMI_STATUS_NOT_SUPPORTED")

    ok, lost = read_amdsmi(amdsmi=mi300x(2, amdsmi_get_gpu_asic_info=asic, amdsmi_get_gpu_activity=no_activity))
    assert (lost.device, lost.healthy, lost.name) == ("cuda:1", False, "?")
    assert lost.reason == (
        "amdsmi cannot identify the GPU (name unavailable on gpu 1: AmdSmiLibraryException: AMDSMI_STATUS_NO_HSMP_DRV)"
    )
    assert ok.healthy and ok.utilization_pct is None  # an optional reading failing is not a fault
    assert ok.details["utilization_error"] == "AmdSmiLibraryException: AMDSMI_STATUS_NOT_SUPPORTED"
    assert any(n.startswith("name unavailable on gpu 1") for n in ok.details["notes"])


def test_the_session_is_shut_down_even_when_listing_fails() -> None:
    calls: list[str] = []

    def listing() -> Any:
        raise AmdSmiLibraryException("AMDSMI_STATUS_DRM_ERROR")

    lib = mi300x(2, amdsmi_get_processor_handles=listing, amdsmi_shut_down=lambda: calls.append("shut_down"))
    with pytest.raises(AmdSmiLibraryException):  # hal.health() turns it into one unhealthy row
        read_amdsmi(amdsmi=lib)
    assert calls == ["shut_down"]


def test_without_amdsmi_the_gpus_the_driver_lists_are_reported() -> None:
    class Missing:
        def amdsmi_init(self) -> None:
            raise KeyError("libamd_smi.so")  # what `import amdsmi` does without ROCm's library

    rows = read_amdsmi(amdsmi=Missing(), archs=["gfx942", "gfx942"])
    assert [(r.device, r.name, r.healthy) for r in rows] == [("cuda:0", "gfx942", True), ("cuda:1", "gfx942", True)]
    assert "no telemetry" in rows[0].reason and "libamd_smi.so" in rows[0].reason


def test_without_amdsmi_the_archs_come_from_the_probes_kfd_facts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nodes = kfd_tree(tmp_path, gpus=[90402, 90402, 90500])
    monkeypatch.setattr(hal_rocm.probe, "gather", lambda use_amdsmi=True: gather_fake(nodes, use_amdsmi=use_amdsmi))
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # `import amdsmi` raises ModuleNotFoundError
    rows = read_amdsmi()
    assert [(r.device, r.name) for r in rows] == [("cuda:0", "gfx942"), ("cuda:1", "gfx942"), ("cuda:2", "gfx950")]
    assert all(r.healthy and "amdsmi: ModuleNotFoundError" in r.reason for r in rows)


def test_the_plugin_registers_it_and_imports_it_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "hal_rocm.health", raising=False)
    spec = hal.Registry(entry_points=False, plugins=[("rocm", hal_rocm)]).spec("rocm")
    assert spec.health is not None and "hal_rocm.health" not in sys.modules
    monkeypatch.setitem(sys.modules, "amdsmi", mi300x(2))
    assert [(r.backend, r.device, r.healthy) for r in spec.health()] == [
        ("rocm", "cuda:0", True),
        ("rocm", "cuda:1", False),
    ]
