"""The NVIDIA probe: decisions from simulated machines, NVML failures, and the real probe on this box."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import types
from dataclasses import replace
from typing import Any

import pytest

from hal.types import Availability, BackendSpec
from hal_nvidia import hal_register_backends
from hal_nvidia.probe import NvidiaFacts, NvmlReading, arch_of, decide, fp8_format_of, gather, probe

CPU_TORCH = NvidiaFacts(torch_version="2.13.0+cpu", torch_cuda=None, torch_hip=None, pynvml_installed=False)
CUDA_TORCH = NvidiaFacts(torch_version="2.13.0+cu128", torch_cuda="12.8", torch_hip=None, pynvml_installed=True)
H100 = NvmlReading(
    driver_version="570.86.15",
    cuda_driver_version=(12, 8),
    device_names=("NVIDIA H100 80GB HBM3",),
    compute_capabilities=((9, 0),),
)


def _one_line(a: Availability) -> None:
    assert a.reason.strip(), "an unavailable backend must say why"
    assert "\n" not in a.reason


# ---------------------------------------------------------------------------------------------------
# decide() on simulated facts
# ---------------------------------------------------------------------------------------------------


def test_cpu_torch_is_unavailable_and_names_the_remedy() -> None:
    a = decide(CPU_TORCH)
    assert not a.available
    _one_line(a)
    assert "2.13.0+cpu is a CPU build" in a.reason
    assert "install a CUDA build of torch" in a.reason


def test_rocm_torch_is_unavailable() -> None:
    a = decide(replace(CUDA_TORCH, torch_cuda=None, torch_hip="6.3.42131"))
    assert not a.available
    assert "ROCm build" in a.reason and "install a CUDA build of torch" in a.reason


def test_cpu_torch_on_a_gpu_machine_mentions_the_gpus() -> None:
    a = decide(replace(CPU_TORCH, pynvml_installed=True, nvml=H100))
    assert not a.available
    assert "NVML sees 1 GPU" in a.reason
    assert a.details["devices"] == ["NVIDIA H100 80GB HBM3"]


def test_cuda_torch_without_the_nvml_library_is_unavailable() -> None:
    reason = "NVML: libnvidia-ml.so not found (no NVIDIA driver); install the NVIDIA driver"
    a = decide(replace(CUDA_TORCH, nvml_error=reason))
    assert not a.available
    assert a.reason == reason
    assert a.details["nvml"] == reason


def test_nvml_with_zero_devices_is_unavailable() -> None:
    a = decide(replace(CUDA_TORCH, nvml=replace(H100, device_names=(), compute_capabilities=())))
    assert not a.available
    _one_line(a)
    assert "no NVIDIA GPU" in a.reason and "570.86.15" in a.reason


def test_one_h100_is_available_with_its_arch() -> None:
    a = decide(replace(CUDA_TORCH, nvml=H100))
    assert a.available
    assert a.reason == "1 device: NVIDIA H100 80GB HBM3"
    assert a.details["compute_capability"] == ["9.0"]
    assert a.details["arch"] == ["sm90"]
    assert a.details["driver"] == "570.86.15"
    assert a.details["driver_cuda"] == "12.8"


def test_eight_gpus_are_counted() -> None:
    eight = replace(H100, device_names=H100.device_names * 8, compute_capabilities=((9, 0),) * 8)
    a = decide(replace(CUDA_TORCH, nvml=eight))
    assert a.available
    assert a.reason.startswith("8 devices: ")
    assert a.details["arch"] == ["sm90"] * 8


def test_a_driver_older_than_torchs_cuda_major_is_unavailable() -> None:
    facts = replace(
        CUDA_TORCH, torch_version="2.13.0+cu130", torch_cuda="13.0", nvml=replace(H100, cuda_driver_version=(12, 2))
    )
    a = decide(facts)
    assert not a.available
    assert "supports CUDA up to 12.2" in a.reason and "upgrade the driver" in a.reason


def test_a_newer_cuda_minor_than_the_driver_is_fine() -> None:
    # CUDA minor-version compatibility: a 12.8 torch runs on a 12.2 driver.
    a = decide(replace(CUDA_TORCH, nvml=replace(H100, cuda_driver_version=(12, 2))))
    assert a.available


def test_without_pynvml_the_torch_count_decides() -> None:
    facts = replace(CUDA_TORCH, pynvml_installed=False, torch_device_count=2)
    a = decide(facts)
    assert a.available
    assert a.reason.startswith("2 devices")
    assert "nvidia-ml-py" in a.details["nvml"]

    none = decide(replace(facts, torch_device_count=0))
    assert not none.available
    assert "sees no CUDA device" in none.reason and "CUDA_VISIBLE_DEVICES" in none.reason

    broken = decide(replace(facts, torch_device_count=None, torch_error="RuntimeError: driver too old"))
    assert not broken.available
    assert "driver too old" in broken.reason


@pytest.mark.parametrize(
    ("cc", "arch", "fp8"),
    [
        ((7, 0), "sm70", None),
        ((8, 0), "sm80", None),
        ((8, 9), "sm89", "e4m3fn"),
        ((9, 0), "sm90", "e4m3fn"),
        ((10, 0), "sm100", "e4m3fn"),
    ],
    ids=lambda v: str(v),
)
def test_arch_and_fp8_by_compute_capability(cc: tuple[int, int], arch: str, fp8: str | None) -> None:
    assert arch_of(cc) == arch
    assert fp8_format_of(cc) == fp8


# ---------------------------------------------------------------------------------------------------
# gather() against a fake pynvml (the real one is not installed here)
# ---------------------------------------------------------------------------------------------------


class NVMLError_LibraryNotFound(Exception):
    pass


def _fake_pynvml(monkeypatch: pytest.MonkeyPatch, **functions: Any) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    module.__spec__ = importlib.machinery.ModuleSpec("pynvml", None)
    module.shutdowns = 0  # type: ignore[attr-defined]

    def shutdown() -> None:
        module.shutdowns += 1  # type: ignore[attr-defined]

    module.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    for name, fn in functions.items():
        setattr(module, name, fn)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def test_gather_turns_nvml_library_not_found_into_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def init() -> None:
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    _fake_pynvml(monkeypatch, nvmlInit=init)
    facts = gather()
    assert facts.pynvml_installed
    assert facts.nvml is None
    assert facts.nvml_error is not None and "libnvidia-ml.so not found" in facts.nvml_error
    a = decide(replace(facts, torch_cuda="12.8", torch_hip=None))
    assert not a.available
    assert "install the NVIDIA driver" in a.reason


def test_gather_reads_devices_from_nvml_and_shuts_it_down(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml(
        monkeypatch,
        nvmlInit=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"570.86.15",  # older pynvml returns bytes
        nvmlSystemGetCudaDriverVersion=lambda: 12080,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
    )
    facts = gather()
    assert facts.nvml == NvmlReading("570.86.15", (12, 8), ("NVIDIA H100 80GB HBM3",) * 2, ((9, 0), (9, 0)))
    assert fake.shutdowns == 1
    a = decide(replace(facts, torch_cuda="12.8", torch_hip=None))
    assert a.available and a.details["arch"] == ["sm90", "sm90"]


def test_gather_reports_an_nvml_failure_after_init(monkeypatch: pytest.MonkeyPatch) -> None:
    def count() -> int:
        raise RuntimeError("GPU is lost")

    fake = _fake_pynvml(
        monkeypatch, nvmlInit=lambda: None, nvmlSystemGetDriverVersion=lambda: "570.86.15", nvmlDeviceGetCount=count
    )
    facts = gather()
    assert facts.nvml is None
    assert facts.nvml_error == "NVML failed: RuntimeError: GPU is lost"
    assert any("CUDA version" in note for note in facts.notes)  # the optional query's failure is noted
    assert fake.shutdowns == 1


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
    assert not a.available, "this test machine has a CPU build of torch and no NVIDIA GPU"
    _one_line(a)


def test_registers_the_nvidia_spec() -> None:
    specs: list[BackendSpec] = []
    hal_register_backends(register=specs.append)
    assert [(s.name, s.priority, s.reference) for s in specs] == [("nvidia", 100, False)]
    assert isinstance(specs[0].probe(), Availability)


def test_importing_the_backends_looks_up_no_vendor_module() -> None:
    code = (
        "import importlib.util, hal_nvidia, hal_rocm, hal_ascend\n"
        "print(sorted(set(Spy.seen)))\n"
        "importlib.util.find_spec('pynvml')\n"  # the spy works: a lookup does show
        "print(sorted(set(Spy.seen)))\n"
    )
    assert _run(code) == ["[]", "['pynvml']"]
