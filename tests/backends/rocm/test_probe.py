"""The ROCm probe: decisions from simulated machines and fake KFD trees, amdsmi failures, this box."""

from __future__ import annotations

import importlib.machinery
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
from hal_rocm.probe import RocmFacts, arch_of_gfx_version, decide, fp8_format_of, gather, probe

ROCM_TORCH = RocmFacts(torch_version="2.13.0+rocm6.4", torch_hip="6.4.43482", torch_cuda=None, kfd_found=True)
CPU_TORCH = RocmFacts(torch_version="2.13.0+cpu", torch_hip=None, torch_cuda=None, kfd_found=False)

#: A CPU node's properties as the amdgpu driver writes them (abridged).
CPU_NODE = "cpu_cores_count 96\nsimd_count 0\nmem_banks_count 1\ngfx_target_version 0\nvendor_id 0\n"


def gpu_node(gfx_target_version: int) -> str:
    return (
        "cpu_cores_count 0\nsimd_count 1216\nmem_banks_count 1\n"
        f"gfx_target_version {gfx_target_version}\nvendor_id 4098\ndevice_id 29857\n"
    )


def kfd_tree(root: Path, gpus: list[int], cpus: int = 2) -> Path:
    """A fake ``topology/nodes`` directory: ``cpus`` CPU nodes, then one node per GPU version."""
    nodes = root / "nodes"
    for i, text in enumerate([CPU_NODE] * cpus + [gpu_node(v) for v in gpus]):
        (nodes / str(i)).mkdir(parents=True)
        (nodes / str(i) / "properties").write_text(text, encoding="utf-8")
    return nodes


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
    facts = gather(kfd_tree(tmp_path, gpus=[]), use_amdsmi=False)
    assert facts.kfd_found and facts.gfx_versions == ()
    a = decide(_with_rocm_torch(facts))
    assert not a.available
    assert "lists no AMD GPU" in a.reason


def test_mi300x_tree_is_available_with_e4m3fnuz(tmp_path: Path) -> None:
    facts = gather(kfd_tree(tmp_path, gpus=[90402] * 8), use_amdsmi=False)
    assert facts.gfx_versions == (90402,) * 8
    a = decide(_with_rocm_torch(facts))
    assert a.available
    assert a.reason == "8 devices: gfx942"
    assert a.details["arch"] == ["gfx942"] * 8
    assert a.details["fp8_format"] == "e4m3fnuz"


def test_mi350_tree_is_available_with_e4m3fn(tmp_path: Path) -> None:
    a = decide(_with_rocm_torch(gather(kfd_tree(tmp_path, gpus=[90500]), use_amdsmi=False)))
    assert a.available
    assert a.reason == "1 device: gfx950"
    assert a.details["fp8_format"] == "e4m3fn"


def test_cpu_torch_on_an_amd_machine_mentions_the_gpus(tmp_path: Path) -> None:
    facts = replace(gather(kfd_tree(tmp_path, gpus=[90010, 90010]), use_amdsmi=False), torch_hip=None)
    a = decide(replace(facts, torch_version="2.13.0+cpu", torch_cuda=None))
    assert not a.available
    assert "KFD lists 2 AMD GPUs" in a.reason and "install a ROCm build of torch" in a.reason
    assert a.details["arch"] == ["gfx90a", "gfx90a"]


def test_unreadable_topology_is_a_reason(tmp_path: Path) -> None:
    nodes = kfd_tree(tmp_path, gpus=[90402])
    (nodes / "2" / "properties").write_text("gfx_target_version not-a-number\n", encoding="utf-8")
    facts = gather(nodes, use_amdsmi=False)
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
# gather() with amdsmi stand-ins (the real one is not installed here)
# ---------------------------------------------------------------------------------------------------


def test_gather_notes_amdsmi_raising_keyerror_at_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What `import amdsmi` does on a machine without the ROCm library.
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "amdsmi.py").write_text("raise KeyError('libamd_smi.so')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    facts = gather(kfd_tree(tmp_path, gpus=[90402]))
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
    facts = gather(kfd_tree(tmp_path, gpus=[90402, 90402]))
    assert facts.device_names == ("AMD Instinct MI300X",) * 2
    assert facts.driver_version == "6.10.5"
    assert calls == ["init", "shut_down"]
    a = decide(_with_rocm_torch(facts))
    assert a.reason == "2 devices: AMD Instinct MI300X"
    assert a.details["driver"] == "6.10.5"


def test_gather_skips_amdsmi_without_an_amd_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("amdsmi")
    module.__spec__ = importlib.machinery.ModuleSpec("amdsmi", None)

    def init() -> None:
        raise AssertionError("amdsmi must not be asked when the KFD lists no GPU")

    module.amdsmi_init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "amdsmi", module)
    facts = gather(kfd_tree(tmp_path, gpus=[]))
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
