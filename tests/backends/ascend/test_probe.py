"""The Ascend probe: decisions from simulated machines, a fake npu-smi, and this box.

``torch_npu`` is never imported here: where a test needs it "installed", a stand-in package that
raises on import sits on ``sys.path``, so an accidental import fails the test.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from hal.types import Availability, BackendSpec
from hal_ascend import hal_register_backends
from hal_ascend._backend import arch_of_device_name
from hal_ascend.probe import AscendFacts, decide, gather, parse_npu_smi_list, probe

NO_TORCH_NPU = "torch_npu is not installed (pip install hal-accel[ascend]; needs Huawei CANN)"

#: `npu-smi info -l` on an 8-NPU Atlas 800T A2 (serials shortened).
NPU_SMI_8 = "\tTotal Count                    : 8\n\n" + "".join(
    f"\tNPU ID                         : {i}\n"
    "\tProduct Name                   : IT21PDDA01\n"
    f"\tSerial Number                  : 102351{i:04d}\n"
    "\tChip Count                     : 1\n\n"
    for i in range(8)
)
NPU_SMI_0 = "\tTotal Count                    : 0\n"

WITH_TORCH_NPU = AscendFacts(
    torch_version="2.13.0", torch_npu_found=True, torch_npu_version="2.13.0", npu_smi="/usr/local/sbin/npu-smi"
)


def _one_line(a: Availability) -> None:
    assert a.reason.strip()
    assert "\n" not in a.reason


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def torch_npu_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A findable ``torch_npu`` that raises if anything imports it."""
    site = tmp_path / "site"
    (site / "torch_npu").mkdir(parents=True)
    (site / "torch_npu" / "__init__.py").write_text(
        "raise RuntimeError('torch_npu was imported; the probe must only look it up')\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(site))


# ---------------------------------------------------------------------------------------------------
# decide() on simulated facts
# ---------------------------------------------------------------------------------------------------


def test_missing_torch_npu_is_unavailable_with_the_install_hint() -> None:
    a = decide(AscendFacts(torch_version="2.13.0+cpu", torch_npu_found=False))
    assert not a.available
    assert a.reason == NO_TORCH_NPU


def test_missing_torch_npu_on_an_npu_machine_still_lists_the_npus() -> None:
    a = decide(replace(WITH_TORCH_NPU, torch_npu_found=False, torch_npu_version=None, npu_smi_output=NPU_SMI_8))
    assert a.reason == NO_TORCH_NPU
    assert a.details["npu_ids"] == list(range(8))


def test_torch_npu_without_npu_smi_or_devices_is_unavailable() -> None:
    a = decide(replace(WITH_TORCH_NPU, npu_smi=None))
    assert not a.available
    _one_line(a)
    assert "npu-smi not found on PATH" in a.reason and "install the Ascend driver" in a.reason


def test_davinci_nodes_stand_in_for_a_missing_npu_smi() -> None:
    a = decide(replace(WITH_TORCH_NPU, npu_smi=None, davinci_devices=8))
    assert a.available
    assert a.reason == "8 NPUs (/dev/davinci*; npu-smi not on PATH)"


def test_npu_smi_reporting_zero_devices_is_unavailable() -> None:
    a = decide(replace(WITH_TORCH_NPU, npu_smi_output=NPU_SMI_0))
    assert not a.available
    _one_line(a)
    assert "0 NPUs" in a.reason and "/dev/davinci" in a.reason


def test_npu_smi_reporting_eight_devices_is_available() -> None:
    a = decide(replace(WITH_TORCH_NPU, npu_smi_output=NPU_SMI_8))
    assert a.available
    assert a.reason == "8 NPUs (npu-smi)"
    assert a.details["npu_ids"] == list(range(8))


def test_npu_smi_failure_is_the_reason() -> None:
    error = "`npu-smi info -l` exited with 255: dcmi module initialize failed. ret is -8005"
    a = decide(replace(WITH_TORCH_NPU, npu_smi_error=error))
    assert not a.available
    assert a.reason.startswith(error) and "check the Ascend driver" in a.reason


def test_unparseable_npu_smi_output_is_the_reason() -> None:
    a = decide(replace(WITH_TORCH_NPU, npu_smi_output="Usage: npu-smi info\n"))
    assert not a.available
    assert "cannot read `npu-smi info -l` output" in a.reason


def test_torch_npu_built_for_another_torch_is_unavailable() -> None:
    a = decide(replace(WITH_TORCH_NPU, torch_npu_version="2.6.0.post1", npu_smi_output=NPU_SMI_8))
    assert not a.available
    assert "torch_npu 2.6.0.post1 does not match torch 2.13.0" in a.reason


def test_a_failed_lookup_of_torch_npu_is_the_reason() -> None:
    a = decide(
        replace(WITH_TORCH_NPU, torch_npu_found=False, torch_npu_error="cannot look up torch_npu: ValueError: x")
    )
    assert not a.available
    assert a.reason.startswith("cannot look up torch_npu: ValueError: x")


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        (NPU_SMI_8, tuple(range(8))),
        (NPU_SMI_0, ()),
        ("Total Count : 2\n", (0, 1)),
        ("NPU ID : 4\nNPU ID : 5\n", (4, 5)),
        ("command not supported\n", None),
    ],
    ids=["eight", "zero", "total-only", "ids-only", "garbage"],
)
def test_parse_npu_smi_list(text: str, ids: tuple[int, ...] | None) -> None:
    assert parse_npu_smi_list(text) == ids


@pytest.mark.parametrize(
    ("name", "arch"),
    [
        ("Ascend910B3", "ascend910b"),
        ("Ascend910B1", "ascend910b"),
        ("Ascend910_9391", "ascend910_93"),
        ("Ascend910_9382", "ascend910_93"),
        ("Ascend950PR", "ascend950"),
        ("Ascend310P3", "ascend310p"),
    ],
)
def test_arch_of_device_name(name: str, arch: str) -> None:
    assert arch_of_device_name(name) == arch


# ---------------------------------------------------------------------------------------------------
# gather() with stand-ins for torch_npu and npu-smi
# ---------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("torch_npu_stand_in")
def test_gather_finds_torch_npu_without_importing_it_and_counts_with_npu_smi(tmp_path: Path) -> None:
    output = tmp_path / "npu-smi-l.txt"
    output.write_text(NPU_SMI_8, encoding="utf-8")
    npu_smi = _script(tmp_path / "npu-smi", f'[ "$1 $2" = "info -l" ] || exit 2\ncat "{output}"\n')
    facts = gather(npu_smi=str(npu_smi), dev_root=tmp_path)
    assert "torch_npu" not in sys.modules
    assert facts.torch_npu_found
    assert facts.torch_npu_version is None  # no package metadata for the stand-in
    assert any("no package metadata" in n for n in facts.notes)
    a = decide(facts)
    assert a.available and a.reason == "8 NPUs (npu-smi)"


@pytest.mark.usefixtures("torch_npu_stand_in")
def test_gather_turns_a_failing_npu_smi_into_a_reason(tmp_path: Path) -> None:
    npu_smi = _script(tmp_path / "npu-smi", "echo 'dcmi module initialize failed. ret is -8005' >&2\nexit 255\n")
    a = decide(gather(npu_smi=str(npu_smi), dev_root=tmp_path))
    assert not a.available
    assert "exited with 255: dcmi module initialize failed" in a.reason


@pytest.mark.usefixtures("torch_npu_stand_in")
def test_gather_gives_up_on_a_hanging_npu_smi(tmp_path: Path) -> None:
    npu_smi = _script(tmp_path / "npu-smi", "exec sleep 10\n")
    a = decide(gather(npu_smi=str(npu_smi), dev_root=tmp_path, timeout_s=0.3))
    assert not a.available
    assert "did not answer within 0.3 s" in a.reason


@pytest.mark.usefixtures("torch_npu_stand_in")
def test_gather_finds_npu_smi_on_path_and_counts_davinci_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "npu-smi", "printf '\\tTotal Count : 0\\n'\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("davinci0", "davinci1", "davinci_manager", "devmm_svm"):
        (dev / name).touch()
    facts = gather(dev_root=dev)
    assert facts.npu_smi == str(bin_dir / "npu-smi")
    assert facts.davinci_devices == 2
    assert not decide(facts).available  # npu-smi's count wins over the device nodes


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
    assert not a.available, "torch_npu must never be installed in the test environment"
    assert a.reason == NO_TORCH_NPU


def test_registers_the_ascend_spec() -> None:
    specs: list[BackendSpec] = []
    hal_register_backends(register=specs.append)
    assert [(s.name, s.priority, s.reference) for s in specs] == [("ascend", 80, False)]
    assert isinstance(specs[0].probe(), Availability)


def test_importing_and_probing_never_import_torch_npu(tmp_path: Path) -> None:
    # A findable torch_npu stand-in that imports fine, so an import would show in sys.modules.
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text('"""stand-in"""\n', encoding="utf-8")
    code = (
        "import hal_nvidia, hal_rocm, hal_ascend\n"
        "print(sorted(set(Spy.seen)))\n"
        "from hal_ascend.probe import probe\n"
        "a = probe()\n"
        "print(sorted(set(Spy.seen)), 'torch_npu' in sys.modules, a.available)\n"
        "import torch_npu\n"
        "print('torch_npu' in sys.modules)\n"
    )
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    # The probe looks torch_npu up (and then fails on the missing npu-smi) but never imports it.
    assert _run(code, PYTHONPATH=pythonpath) == ["[]", "['torch_npu'] False False", "True"]
