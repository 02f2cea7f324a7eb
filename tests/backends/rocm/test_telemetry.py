"""amdsmi telemetry with fake amdsmi modules: readings, per-reading failures as notes, never an exception."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from hal_rocm.telemetry import describe, read_devices, read_telemetry
from tests.backends.rocm.amdsmi_standin import GIB, AmdSmiLibraryException, fake_amdsmi


def _raise(exc: BaseException) -> Any:
    def fn(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fn


# ---------------------------------------------------------------------------------------------------
# Readings
# ---------------------------------------------------------------------------------------------------


def test_an_mi300x_box() -> None:
    out = read_telemetry(fake_amdsmi(8))
    assert out["notes"] == []
    assert len(out["devices"]) == 8
    assert out["devices"][3] == {
        "index": 3,
        "name": "AMD Instinct MI300X",
        "temperature_c": 43,
        "temperature_sensor": "hotspot",
        "power_w": 133,
        "memory_used_bytes": 300 * 2**20,
        "memory_total_bytes": 192 * GIB,
        "xgmi_links": 7,
    }
    assert describe(out["devices"][3]) == (
        "gpu 3 AMD Instinct MI300X: 43 °C hotspot · 133 W · VRAM 0.3/192.0 GiB · 7 XGMI links"
    )


def test_older_amdsmi_names() -> None:
    """Before ROCm 6: ``AmdSmiIoLinkType`` with another XGMI value, ``JUNCTION`` for the hotspot."""
    out = read_telemetry(fake_amdsmi(4, link_enum="AmdSmiIoLinkType", hotspot="JUNCTION"))
    assert out["notes"] == []
    assert [d["xgmi_links"] for d in out["devices"]] == [3, 3, 3, 3]
    assert {d["temperature_sensor"] for d in out["devices"]} == {"junction"}


def test_xgmi_links_count_only_xgmi_peers() -> None:
    """Two XGMI pairs over PCIe (an MI250 box): one XGMI peer each, PCIe links not counted."""
    out = read_telemetry(fake_amdsmi(4, xgmi_pairs={frozenset((0, 1)), frozenset((2, 3))}))
    assert [d["xgmi_links"] for d in out["devices"]] == [1, 1, 1, 1]
    single = read_telemetry(fake_amdsmi(1))
    assert single["devices"][0]["xgmi_links"] == 0


def test_power_falls_back_to_the_average_and_na_is_none() -> None:
    average = read_telemetry(
        fake_amdsmi(1, amdsmi_get_power_info=lambda h: {"current_socket_power": "N/A", "average_socket_power": 97})
    )
    assert average["devices"][0]["power_w"] == 97 and average["notes"] == []
    none = read_telemetry(fake_amdsmi(2, amdsmi_get_power_info=lambda h: {"current_socket_power": "N/A"}))
    assert [d["power_w"] for d in none["devices"]] == [None, None]
    assert none["notes"] == ["power unavailable on gpus 0, 1: no socket power reading in ['current_socket_power']"]


# ---------------------------------------------------------------------------------------------------
# Failures become notes, never exceptions
# ---------------------------------------------------------------------------------------------------


def test_failed_readings_are_none_with_one_note_per_kind() -> None:
    module = fake_amdsmi(
        3,
        amdsmi_get_temp_metric=_raise(AmdSmiLibraryException("AMDSMI_STATUS_NOT_SUPPORTED")),
        amdsmi_get_gpu_memory_usage=_raise(AmdSmiLibraryException("AMDSMI_STATUS_NO_PERM")),
        amdsmi_topo_get_link_type=_raise(RuntimeError("topology unreadable")),
    )
    out = read_telemetry(module)
    for d in out["devices"]:
        assert d["temperature_c"] is None and d["memory_used_bytes"] is None and d["xgmi_links"] is None
        assert d["power_w"] is not None and d["memory_total_bytes"] == 192 * GIB  # the rest still read
    assert out["notes"] == [
        "temperature unavailable on gpus 0, 1, 2: AmdSmiLibraryException: AMDSMI_STATUS_NOT_SUPPORTED",
        "VRAM used unavailable on gpus 0, 1, 2: AmdSmiLibraryException: AMDSMI_STATUS_NO_PERM",
        "XGMI links unavailable on gpus 0, 1, 2: RuntimeError: topology unreadable",
    ]
    assert describe(out["devices"][0]) == "gpu 0 AMD Instinct MI300X: ? °C · 130 W · VRAM ?/192.0 GiB · ? XGMI links"


def test_one_gpu_failing_is_named() -> None:
    def power(h: int) -> dict[str, Any]:
        if h == 1:
            raise AmdSmiLibraryException("AMDSMI_STATUS_BUSY")
        return {"current_socket_power": 100}

    out = read_telemetry(fake_amdsmi(3, amdsmi_get_power_info=power))
    assert [d["power_w"] for d in out["devices"]] == [100, None, 100]
    assert out["notes"] == ["power unavailable on gpu 1: AmdSmiLibraryException: AMDSMI_STATUS_BUSY"]


def test_a_module_with_no_functions_at_all() -> None:
    bare = types.ModuleType("amdsmi")
    devices, notes = read_devices(bare, ["h0", "h1"])
    assert [d["index"] for d in devices] == [0, 1]
    assert all(d[k] is None for d in devices for k in d if k != "index")
    assert notes and all("AttributeError" in n for n in notes)
    assert any(n.startswith("XGMI links unavailable on every gpu") for n in notes)
    assert any(n.startswith("VRAM unavailable on every gpu") for n in notes)


def test_odd_return_values() -> None:
    module = fake_amdsmi(
        1,
        amdsmi_get_gpu_asic_info=lambda h: None,
        amdsmi_get_temp_metric=lambda h, s, m: "N/A",
        amdsmi_get_power_info=lambda h: "N/A",
        amdsmi_get_gpu_memory_total=lambda h, t: True,
    )
    out = read_telemetry(module)
    d = out["devices"][0]
    assert (d["name"], d["temperature_c"], d["power_w"], d["memory_total_bytes"]) == (None, None, None, None)
    assert d["xgmi_links"] == 0
    assert describe(d).startswith("gpu 0 AMD GPU: ? °C · ? W")
    assert any(n.startswith("name unavailable on gpu 0: TypeError") for n in out["notes"])
    assert any(n.startswith("temperature unavailable on gpu 0: edge sensor reads N/A") for n in out["notes"])
    assert "VRAM total unavailable on gpu 0: reads True" in out["notes"]


@pytest.mark.parametrize(
    ("overrides", "note"),
    [
        ({"amdsmi_init": _raise(AmdSmiLibraryException("AMDSMI_STATUS_INIT_ERROR"))}, "amdsmi unavailable: "),
        (
            {"amdsmi_get_processor_handles": _raise(AmdSmiLibraryException("AMDSMI_STATUS_DRM_ERROR"))},
            "amdsmi query failed: ",
        ),
        ({"amdsmi_shut_down": _raise(AmdSmiLibraryException("AMDSMI_STATUS_BUSY"))}, "amdsmi_shut_down failed: "),
    ],
)
def test_session_failures(overrides: dict[str, Any], note: str) -> None:
    out = read_telemetry(fake_amdsmi(2, **overrides))
    assert len(out["notes"]) == 1 and out["notes"][0].startswith(note + "AmdSmiLibraryException")


def test_shut_down_runs_after_a_failed_listing() -> None:
    calls: list[str] = []
    module = fake_amdsmi(
        2,
        amdsmi_get_processor_handles=_raise(RuntimeError("no")),
        amdsmi_shut_down=lambda: calls.append("shut_down"),
    )
    read_telemetry(module)
    assert calls == ["shut_down"]


def test_import_raising_keyerror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``import amdsmi`` does on a machine without the ROCm library (this one)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "amdsmi.py").write_text("raise KeyError('libamd_smi.so')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    assert read_telemetry() == {"devices": [], "notes": ["amdsmi unavailable: KeyError: 'libamd_smi.so'"]}


def test_imports_amdsmi_from_sys_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(2))
    out = read_telemetry()
    assert [d["temperature_c"] for d in out["devices"]] == [40, 41] and out["notes"] == []
