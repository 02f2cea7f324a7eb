"""The ROCm probe: decisions from simulated machines and fake KFD trees, /dev/kfd access, the
visible-device variables, amdsmi failures and telemetry, this box."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hal.types import Availability, BackendSpec
from hal_rocm import hal_register_backends
from hal_rocm._backend import arch_of_gcn_name
from hal_rocm.probe import (
    RocmFacts,
    arch_of_gfx_version,
    decide,
    fp8_format_of,
    gather,
    probe,
    visible_gpus,
)
from tests.backends.rocm.amdsmi_standin import fake_amdsmi

ROCM_TORCH = RocmFacts(torch_version="2.13.0+rocm6.4", torch_hip="6.4.43482", torch_cuda=None, kfd_found=True)
CPU_TORCH = RocmFacts(torch_version="2.13.0+cpu", torch_hip=None, torch_cuda=None, kfd_found=False)

#: A CPU node's properties as the amdgpu driver writes them (abridged).
CPU_NODE = "cpu_cores_count 96\nsimd_count 0\nmem_banks_count 1\ngfx_target_version 0\nvendor_id 0\n"


def gpu_node(gfx_target_version: int, unique_id: int = 0) -> str:
    return (
        "cpu_cores_count 0\nsimd_count 1216\nmem_banks_count 1\n"
        f"gfx_target_version {gfx_target_version}\nvendor_id 4098\ndevice_id 29857\n"
        + (f"unique_id {unique_id}\n" if unique_id else "")
    )


def kfd_tree(root: Path, gpus: list[int], cpus: int = 2, unique_ids: list[int] | None = None) -> Path:
    """A fake ``topology/nodes`` directory: ``cpus`` CPU nodes, then one node per GPU version; and a
    fake ``/dev/kfd`` beside it (``root / "kfd"``) that :func:`gather_fake` points the probe at."""
    nodes = root / "nodes"
    uids = unique_ids or [0] * len(gpus)
    for i, text in enumerate([CPU_NODE] * cpus + [gpu_node(v, u) for v, u in zip(gpus, uids, strict=True)]):
        (nodes / str(i)).mkdir(parents=True)
        (nodes / str(i) / "properties").write_text(text, encoding="utf-8")
    (root / "kfd").write_bytes(b"")
    return nodes


def gather_fake(nodes: Path, env: dict[str, str] | None = None, **kwargs: Any) -> RocmFacts:
    """:func:`gather` on a :func:`kfd_tree`, with its fake ``/dev/kfd`` and ``env`` (empty by default)
    instead of this machine's."""
    return gather(nodes, dev_kfd=nodes.parent / "kfd", env=env or {}, **kwargs)


def _with_rocm_torch(facts: RocmFacts) -> RocmFacts:
    return replace(facts, torch_version=ROCM_TORCH.torch_version, torch_hip=ROCM_TORCH.torch_hip, torch_cuda=None)


def _one_line(a: Availability) -> None:
    assert a.reason.strip()
    assert "\n" not in a.reason


# ---------------------------------------------------------------------------------------------------
# decide() on simulated facts
# ---------------------------------------------------------------------------------------------------


def test_cpu_torch_is_unavailable_and_names_the_remedy() -> None:
    a = decide(CPU_TORCH)
    assert not a.available
    _one_line(a)
    assert "2.13.0+cpu is a CPU build" in a.reason and "install a ROCm build of torch" in a.reason


def test_cuda_torch_is_unavailable() -> None:
    a = decide(replace(CPU_TORCH, torch_version="2.13.0+cu128", torch_cuda="12.8"))
    assert not a.available
    assert "CUDA build" in a.reason and "install a ROCm build of torch" in a.reason


def test_rocm_torch_without_kfd_is_unavailable() -> None:
    a = decide(replace(ROCM_TORCH, kfd_found=False))
    assert not a.available
    _one_line(a)
    assert "/sys/class/kfd" in a.reason and "amdgpu" in a.reason


def test_rocm_torch_with_cpu_nodes_only_is_unavailable(tmp_path: Path) -> None:
    facts = gather_fake(kfd_tree(tmp_path, gpus=[]), use_amdsmi=False)
    assert facts.kfd_found and facts.gfx_versions == ()
    a = decide(_with_rocm_torch(facts))
    assert not a.available
    assert "lists no AMD GPU" in a.reason


def test_mi300x_tree_is_available_with_e4m3fnuz(tmp_path: Path) -> None:
    facts = gather_fake(kfd_tree(tmp_path, gpus=[90402] * 8), use_amdsmi=False)
    assert facts.gfx_versions == (90402,) * 8
    a = decide(_with_rocm_torch(facts))
    assert a.available
    assert a.reason == "8 devices: gfx942"
    assert a.details["arch"] == ["gfx942"] * 8
    assert a.details["fp8_format"] == "e4m3fnuz"


def test_mi350_tree_is_available_with_e4m3fn(tmp_path: Path) -> None:
    a = decide(_with_rocm_torch(gather_fake(kfd_tree(tmp_path, gpus=[90500]), use_amdsmi=False)))
    assert a.available
    assert a.reason == "1 device: gfx950"
    assert a.details["fp8_format"] == "e4m3fn"


def test_cpu_torch_on_an_amd_machine_mentions_the_gpus(tmp_path: Path) -> None:
    facts = replace(gather_fake(kfd_tree(tmp_path, gpus=[90010, 90010]), use_amdsmi=False), torch_hip=None)
    a = decide(replace(facts, torch_version="2.13.0+cpu", torch_cuda=None))
    assert not a.available
    assert "KFD lists 2 AMD GPUs" in a.reason and "install a ROCm build of torch" in a.reason
    assert a.details["arch"] == ["gfx90a", "gfx90a"]


def test_unreadable_topology_is_a_reason(tmp_path: Path) -> None:
    nodes = kfd_tree(tmp_path, gpus=[90402])
    (nodes / "2" / "properties").write_text("gfx_target_version not-a-number\n", encoding="utf-8")
    facts = gather_fake(nodes, use_amdsmi=False)
    assert facts.kfd_error is not None and "cannot read the KFD topology" in facts.kfd_error
    a = decide(_with_rocm_torch(facts))
    assert not a.available and "cannot read the KFD topology" in a.reason


def test_broken_amdsmi_is_a_note_not_a_verdict() -> None:
    note = "amdsmi unavailable: KeyError: 'libamd_smi.so'"
    a = decide(replace(ROCM_TORCH, gfx_versions=(90402,), notes=(note,)))
    assert a.available
    assert a.details["notes"] == [note]


@pytest.mark.parametrize(
    ("version", "arch"),
    [
        (90402, "gfx942"),
        (90500, "gfx950"),
        (90008, "gfx908"),
        (90010, "gfx90a"),
        (110000, "gfx1100"),
        (120001, "gfx1201"),
    ],
)
def test_arch_of_gfx_target_version(version: int, arch: str) -> None:
    assert arch_of_gfx_version(version) == arch


@pytest.mark.parametrize(("arch", "fp8"), [("gfx942", "e4m3fnuz"), ("gfx950", "e4m3fn"), ("gfx90a", None)])
def test_fp8_format_by_arch(arch: str, fp8: str | None) -> None:
    assert fp8_format_of(arch) == fp8


def test_arch_of_gcn_arch_name() -> None:
    assert arch_of_gcn_name("gfx942:sramecc+:xnack-") == "gfx942"
    assert arch_of_gcn_name("gfx1100") == "gfx1100"


# ---------------------------------------------------------------------------------------------------
# Scenarios: availability, reason, arch and fp8 format each time
# ---------------------------------------------------------------------------------------------------

MI300X_8 = replace(ROCM_TORCH, gfx_versions=(90402,) * 8, dev_kfd="ok")
SCENARIOS: dict[str, tuple[RocmFacts, bool, str, list[str] | None, str | None]] = {
    # name: (facts, available, a phrase of the reason, details["arch"], details["fp8_format"])
    "cpu-torch": (CPU_TORCH, False, "is a CPU build", None, None),
    "cpu-torch-on-mi300": (
        replace(MI300X_8, torch_hip=None, torch_version="2.13.0+cpu"),
        False,
        "KFD lists 8 AMD GPUs",
        ["gfx942"] * 8,
        "e4m3fnuz",
    ),
    "rocm-torch-no-driver": (replace(ROCM_TORCH, kfd_found=False), False, "/sys/class/kfd", None, None),
    "rocm-torch-no-gpu": (ROCM_TORCH, False, "lists no AMD GPU", None, None),
    "mi300x": (MI300X_8, True, "8 devices: gfx942", ["gfx942"] * 8, "e4m3fnuz"),
    "mi325x": (replace(MI300X_8, gfx_versions=(90402,)), True, "1 device: gfx942", ["gfx942"], "e4m3fnuz"),
    "mi355x": (replace(MI300X_8, gfx_versions=(90500,) * 8), True, "8 devices: gfx950", ["gfx950"] * 8, "e4m3fn"),
    "mi250x": (replace(MI300X_8, gfx_versions=(90010,) * 2), True, "2 devices: gfx90a", ["gfx90a"] * 2, None),
    "no-dev-kfd": (
        replace(MI300X_8, dev_kfd="missing"),
        False,
        "/dev/kfd is missing; run the container with --device=/dev/kfd",
        ["gfx942"] * 8,
        "e4m3fnuz",
    ),
    "dev-kfd-denied": (
        replace(MI300X_8, dev_kfd="denied"),
        False,
        "no permission to open /dev/kfd; add this user to the 'render'",
        ["gfx942"] * 8,
        "e4m3fnuz",
    ),
    "hip-visible-empty": (
        replace(MI300X_8, visible_env={"HIP_VISIBLE_DEVICES": ""}),
        False,
        "HIP_VISIBLE_DEVICES='' hides every AMD GPU (the KFD lists 8)",
        None,
        None,
    ),
    "rocr-visible-minus-one": (
        replace(MI300X_8, visible_env={"ROCR_VISIBLE_DEVICES": "-1"}),
        False,
        "ROCR_VISIBLE_DEVICES='-1' hides every",
        None,
        None,
    ),
    "hip-visible-two": (
        replace(MI300X_8, visible_env={"HIP_VISIBLE_DEVICES": "2,5"}),
        True,
        "2 devices: gfx942",
        ["gfx942"] * 2,
        "e4m3fnuz",
    ),
    "mixed-box-picks-mi350": (
        replace(MI300X_8, gfx_versions=(90402, 90500), visible_env={"CUDA_VISIBLE_DEVICES": "1"}),
        True,
        "1 device: gfx950",
        ["gfx950"],
        "e4m3fn",
    ),
    "amdsmi-broken": (
        replace(MI300X_8, notes=("amdsmi unavailable: KeyError: 'libamd_smi.so'",)),
        True,
        "8 devices: gfx942",
        ["gfx942"] * 8,
        "e4m3fnuz",
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str) -> None:
    facts, available, phrase, arch, fp8 = SCENARIOS[name]
    a = decide(facts)
    assert a.available is available
    _one_line(a)
    assert phrase in a.reason
    assert a.details.get("arch") == arch
    assert a.details.get("fp8_format") == fp8


def test_mixed_fp8_formats_are_noted() -> None:
    a = decide(replace(MI300X_8, gfx_versions=(90402, 90500)))
    assert a.available and a.details["fp8_format"] == "e4m3fnuz"  # device 0's
    assert any("mix fp8 formats" in n for n in a.details["notes"])


@pytest.mark.parametrize(
    ("env", "visible", "hiding", "note"),
    [
        ({}, [0, 1, 2, 3], None, None),
        ({"HIP_VISIBLE_DEVICES": "3,1"}, [3, 1], None, None),
        ({"HIP_VISIBLE_DEVICES": " 1 , 1 ,2"}, [1, 2], None, None),
        ({"HIP_VISIBLE_DEVICES": "0,7,1"}, [0], None, "'7' names no GPU (of 4)"),
        ({"HIP_VISIBLE_DEVICES": "x"}, [], "HIP_VISIBLE_DEVICES='x'", "'x' names no GPU"),
        ({"CUDA_VISIBLE_DEVICES": "2"}, [2], None, None),
        ({"HIP_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": "3"}, [0], None, None),  # HIP's wins
        ({"ROCR_VISIBLE_DEVICES": "1,2,3", "HIP_VISIBLE_DEVICES": "2"}, [3], None, None),  # HIP indexes ROCr's
        (
            {"ROCR_VISIBLE_DEVICES": "2", "HIP_VISIBLE_DEVICES": "1"},
            [],
            "HIP_VISIBLE_DEVICES='1'",
            "'1' names no GPU (of 1)",
        ),
        ({"ROCR_VISIBLE_DEVICES": "GPU-00000000000000bb,GPU-AA"}, [1, 0], None, None),
        ({"ROCR_VISIBLE_DEVICES": "GPU-ff"}, [], "ROCR_VISIBLE_DEVICES='GPU-ff'", "'GPU-ff' names no GPU"),
    ],
)
def test_visible_device_variables(
    env: dict[str, str], visible: list[int], hiding: str | None, note: str | None
) -> None:
    got, notes, hider = visible_gpus(4, env, unique_ids=(0xAA, 0xBB, 0xCC, 0xDD))
    assert (got, hider) == (visible, hiding)
    assert (note is None and notes == []) or (note is not None and len(notes) == 1 and note in notes[0])


def test_uuids_without_unique_ids_are_not_a_verdict() -> None:
    got, notes, hider = visible_gpus(2, {"ROCR_VISIBLE_DEVICES": "GPU-1234"}, unique_ids=(0, 0))
    assert (got, hider) == ([0, 1], None)
    assert "cannot match UUIDs" in notes[0]


def test_gather_reads_unique_ids_and_the_environment(tmp_path: Path) -> None:
    nodes = kfd_tree(tmp_path, gpus=[90402, 90500], unique_ids=[0x1F2E3D4C5B6A7988, 0x99])
    facts = gather_fake(nodes, env={"ROCR_VISIBLE_DEVICES": "GPU-1f2e3d4c5b6a7988", "PATH": "/bin"}, use_amdsmi=False)
    assert facts.unique_ids == (0x1F2E3D4C5B6A7988, 0x99)
    assert facts.visible_env == {"ROCR_VISIBLE_DEVICES": "GPU-1f2e3d4c5b6a7988"}
    a = decide(_with_rocm_torch(facts))
    assert a.available and a.reason == "1 device: gfx942"
    assert (a.details["arch"], a.details["fp8_format"], a.details["kfd_gpus"]) == (["gfx942"], "e4m3fnuz", 2)


def test_gather_checks_dev_kfd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = kfd_tree(tmp_path, gpus=[90402])
    assert gather_fake(nodes, use_amdsmi=False).dev_kfd == "ok"
    missing = gather(nodes, dev_kfd=tmp_path / "absent", env={}, use_amdsmi=False)
    assert missing.dev_kfd == "missing"
    assert "/dev/kfd is missing" in decide(_with_rocm_torch(missing)).reason
    # This test may run as root, for whom os.access always says yes: simulate the answer for a user
    # outside the render group.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    denied = gather_fake(nodes, use_amdsmi=False)
    assert denied.dev_kfd == "denied"
    assert "no permission to open /dev/kfd" in decide(_with_rocm_torch(denied)).reason
    # Without a GPU in the topology the device is not looked at.
    assert gather(kfd_tree(tmp_path / "cpu", gpus=[]), dev_kfd=tmp_path / "absent", env={}).dev_kfd is None


# ---------------------------------------------------------------------------------------------------
# gather() with amdsmi stand-ins (the real one is not installed here)
# ---------------------------------------------------------------------------------------------------


def test_gather_notes_amdsmi_raising_keyerror_at_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What `import amdsmi` does on a machine without the ROCm library.
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "amdsmi.py").write_text("raise KeyError('libamd_smi.so')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    facts = gather_fake(kfd_tree(tmp_path, gpus=[90402]))
    assert facts.notes == ("amdsmi unavailable: KeyError: 'libamd_smi.so'",)
    a = decide(_with_rocm_torch(facts))
    assert a.available
    assert a.details["notes"] == ["amdsmi unavailable: KeyError: 'libamd_smi.so'"]


def test_gather_reads_names_from_amdsmi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    module = types.ModuleType("amdsmi")
    module.__spec__ = importlib.machinery.ModuleSpec("amdsmi", None)
    functions: dict[str, Any] = {
        "amdsmi_init": lambda: calls.append("init"),
        "amdsmi_get_processor_handles": lambda: ["h0", "h1"],
        "amdsmi_get_gpu_asic_info": lambda h: {"market_name": "AMD Instinct MI300X"},
        "amdsmi_get_gpu_driver_info": lambda h: {"driver_version": "6.10.5"},
        "amdsmi_shut_down": lambda: calls.append("shut_down"),
    }
    for name, fn in functions.items():
        setattr(module, name, fn)
    monkeypatch.setitem(sys.modules, "amdsmi", module)
    facts = gather_fake(kfd_tree(tmp_path, gpus=[90402, 90402]))
    assert facts.device_names == ("AMD Instinct MI300X",) * 2
    assert facts.driver_version == "6.10.5"
    assert calls == ["init", "shut_down"]
    a = decide(_with_rocm_torch(facts))
    assert a.reason == "2 devices: AMD Instinct MI300X"
    assert a.details["driver"] == "6.10.5"
    # This stand-in has no telemetry functions: each gap is one note for both GPUs, never a failure.
    assert a.available and facts.notes
    assert all("unavailable on" in n and "AttributeError" in n for n in facts.notes)
    assert a.details["telemetry"] == [
        "gpu 0 AMD Instinct MI300X: ? °C · ? W · VRAM ?/? GiB · ? XGMI links",
        "gpu 1 AMD Instinct MI300X: ? °C · ? W · VRAM ?/? GiB · ? XGMI links",
    ]


def test_gather_reads_telemetry_from_amdsmi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(8))
    facts = gather_fake(kfd_tree(tmp_path, gpus=[90402] * 8))
    assert facts.notes == ()
    assert [t["temperature_c"] for t in facts.telemetry] == list(range(40, 48))
    assert {t["xgmi_links"] for t in facts.telemetry} == {7}
    a = decide(_with_rocm_torch(facts))
    assert a.available and a.reason == "8 devices: AMD Instinct MI300X"
    assert (a.details["arch"], a.details["fp8_format"]) == (["gfx942"] * 8, "e4m3fnuz")
    assert (
        a.details["telemetry"][0]
        == "gpu 0 AMD Instinct MI300X: 40 °C hotspot · 130 W · VRAM 0.3/192.0 GiB · 7 XGMI links"
    )
    assert "notes" not in a.details


def test_hal_info_shows_telemetry_in_the_probe_details(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hal info --json`` carries the probe's details: on an MI300X box with a CPU build of torch, rocm
    is unavailable with its reason, and the arch, fp8 format and telemetry are there."""
    import hal_rocm
    import hal_rocm.probe
    from hal.cli import info_data
    from hal.registry import Registry

    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(8))
    facts = replace(gather_fake(kfd_tree(tmp_path, gpus=[90402] * 8)), torch_hip=None, torch_version="2.13.0+cpu")
    monkeypatch.setattr(hal_rocm.probe, "gather", lambda: facts)
    data = info_data(Registry(entry_points=False, plugins=[("rocm", hal_rocm)]))
    (rocm,) = data["backends"]
    assert rocm["name"] == "rocm" and rocm["available"] is False
    assert "install a ROCm build of torch" in rocm["reason"] and "KFD lists 8 AMD GPUs" in rocm["reason"]
    assert rocm["details"]["fp8_format"] == "e4m3fnuz"
    assert rocm["details"]["telemetry"][7] == (
        "gpu 7 AMD Instinct MI300X: 47 °C hotspot · 137 W · VRAM 0.3/192.0 GiB · 7 XGMI links"
    )
    json.dumps(data)  # what --json prints


def test_gather_skips_amdsmi_without_an_amd_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("amdsmi")
    module.__spec__ = importlib.machinery.ModuleSpec("amdsmi", None)

    def init() -> None:
        raise AssertionError("amdsmi must not be asked when the KFD lists no GPU")

    module.amdsmi_init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "amdsmi", module)
    facts = gather_fake(kfd_tree(tmp_path, gpus=[]))
    assert facts.notes == ()


# ---------------------------------------------------------------------------------------------------
# This machine, registration, import weight
# ---------------------------------------------------------------------------------------------------


#: Run in a fresh interpreter: ``import torch`` first (torch itself imports pynvml on CUDA/CPU builds and
#: amdsmi on ROCm builds when they are installed), then record every lookup of a vendor module.
SPY = """
import sys, torch
VENDOR = ("pynvml", "amdsmi", "torch_npu", "cupy", "triton")
class Spy:
    seen = []
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in VENDOR:
            Spy.seen.append(name)
        return None
sys.meta_path.insert(0, Spy())
"""


def _run(code: str, **env: str) -> list[str]:
    """stdout lines of ``code`` run after :data:`SPY` in a fresh interpreter, with ``env`` added."""
    out = subprocess.run(
        [sys.executable, "-c", SPY + code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_real_probe_on_this_machine_is_unavailable_with_a_reason() -> None:
    a = probe()
    assert not a.available, "this test machine has a CPU build of torch and no AMD GPU"
    _one_line(a)


def test_registers_the_rocm_spec() -> None:
    specs: list[BackendSpec] = []
    hal_register_backends(register=specs.append)
    assert [(s.name, s.priority, s.reference) for s in specs] == [("rocm", 90, False)]
    assert isinstance(specs[0].probe(), Availability)


def test_importing_and_probing_look_up_no_vendor_module() -> None:
    # No KFD GPU on this machine, so the probe must not even look amdsmi up.
    code = (
        "import importlib.util, hal_nvidia, hal_rocm, hal_ascend\n"
        "print(sorted(set(Spy.seen)))\n"
        "from hal_rocm.probe import probe\n"
        "probe()\n"
        "print(sorted(set(Spy.seen)))\n"
        "importlib.util.find_spec('amdsmi')\n"  # the spy works: a lookup does show
        "print(sorted(set(Spy.seen)))\n"
    )
    assert _run(code) == ["[]", "[]", "['amdsmi']"]
