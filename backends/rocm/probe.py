"""Is the ROCm backend usable here? Cheap facts only: no HIP context, no heavy vendor import.

Two steps, so tests can feed simulated machines:

- :func:`gather` reads the facts: torch's build (``torch.version.hip``), the GPUs the amdgpu kernel
  driver lists in its KFD topology (``/sys/class/kfd/kfd/topology/nodes/*/properties``, plain files:
  reading them touches no GPU), and, for telemetry only, marketing names and the driver version
  through ``amdsmi`` when it imports.
- :func:`decide` turns the facts into an :class:`~hal.types.Availability`, pure and deterministic.

``amdsmi`` never decides availability: it fails in odd ways (``import amdsmi`` raises
``KeyError: 'libamd_smi.so'`` when the ROCm library is missing), so any exception it raises becomes a
note in ``details``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hal.types import Availability

__all__ = [
    "KFD_TOPOLOGY",
    "RocmFacts",
    "arch_of_gfx_version",
    "decide",
    "fp8_format_of",
    "gather",
    "probe",
]

#: Where the amdgpu driver publishes one directory per node (CPUs and GPUs) of the machine.
KFD_TOPOLOGY = Path("/sys/class/kfd/kfd/topology/nodes")

_INSTALL_ROCM_TORCH = "install a ROCm build of torch (https://pytorch.org/get-started/locally/)"


@dataclass(frozen=True)
class RocmFacts:
    """The cheap facts :func:`decide` needs.

    :param torch_version: ``torch.__version__``.
    :param torch_hip: ``torch.version.hip`` (``None`` for CPU and CUDA builds).
    :param torch_cuda: ``torch.version.cuda``.
    :param kfd_found: whether the KFD topology directory exists (the amdgpu driver is loaded).
    :param gfx_versions: ``gfx_target_version`` of each GPU node, in node order (CPU nodes, which
        report 0, are left out).
    :param kfd_error: why the topology could not be read, if it could not.
    :param device_names: marketing names from amdsmi (empty without it).
    :param driver_version: the driver version from amdsmi, ``None`` without it.
    :param notes: amdsmi and other non-fatal failures, shown in ``details``.
    """

    torch_version: str
    torch_hip: str | None
    torch_cuda: str | None
    kfd_found: bool
    gfx_versions: tuple[int, ...] = ()
    kfd_error: str | None = None
    device_names: tuple[str, ...] = ()
    driver_version: str | None = None
    notes: tuple[str, ...] = ()


def arch_of_gfx_version(version: int) -> str:
    """The gfx name of a KFD ``gfx_target_version``: ``90402`` → ``"gfx942"``, ``90010`` → ``"gfx90a"``.

    The version is ``major * 10000 + minor * 100 + stepping``; the name spells minor and stepping as
    one hex digit each.
    """
    major, rest = divmod(version, 10000)
    minor, stepping = divmod(rest, 100)
    return f"gfx{major}{minor:x}{stepping:x}"


def fp8_format_of(arch: str) -> str | None:
    """fp8 by architecture: MI300 (gfx942) uses ``e4m3fnuz``, MI350 (gfx950) OCP ``e4m3fn``, others none."""
    return {"gfx942": "e4m3fnuz", "gfx950": "e4m3fn"}.get(arch)


def _read_kfd(root: Path) -> tuple[bool, tuple[int, ...], str | None]:
    """GPU nodes' ``gfx_target_version`` under ``root``; (found, versions, error)."""
    if not root.is_dir():
        return False, (), None
    versions: list[tuple[int, int]] = []
    try:
        for node in root.iterdir():
            props = node / "properties"
            if not node.name.isdigit() or not props.is_file():
                continue
            for line in props.read_text(encoding="utf-8").splitlines():
                key, _, value = line.partition(" ")
                if key == "gfx_target_version" and int(value) != 0:
                    versions.append((int(node.name), int(value)))
    except (OSError, ValueError) as exc:
        return True, (), f"cannot read the KFD topology {root}: {type(exc).__name__}: {exc}"
    return True, tuple(v for _, v in sorted(versions)), None


def _read_amdsmi(notes: list[str]) -> tuple[tuple[str, ...], str | None]:
    """Names and driver version through amdsmi; any failure becomes a note, never a verdict."""
    try:
        amdsmi = importlib.import_module("amdsmi")
        amdsmi.amdsmi_init()
    except Exception as exc:  # import amdsmi raises KeyError('libamd_smi.so') without ROCm: a note
        notes.append(f"amdsmi unavailable: {type(exc).__name__}: {exc}")
        return (), None
    names: list[str] = []
    driver: str | None = None
    try:
        for handle in amdsmi.amdsmi_get_processor_handles():
            names.append(str(amdsmi.amdsmi_get_gpu_asic_info(handle)["market_name"]))
            if driver is None:
                driver = str(amdsmi.amdsmi_get_gpu_driver_info(handle)["driver_version"])
    except Exception as exc:  # telemetry only: keep what was read, say what was not
        notes.append(f"amdsmi query failed: {type(exc).__name__}: {exc}")
    finally:
        try:
            amdsmi.amdsmi_shut_down()
        except Exception as exc:  # the reading is already taken
            notes.append(f"amdsmi_shut_down failed: {type(exc).__name__}: {exc}")
    return tuple(names), driver


def gather(kfd_root: Path | str = KFD_TOPOLOGY, *, use_amdsmi: bool = True) -> RocmFacts:
    """Read this machine's facts. Creates no HIP context.

    :param kfd_root: the KFD ``topology/nodes`` directory (tests point it at a temporary tree).
    :param use_amdsmi: ask amdsmi for names and the driver version when the KFD lists a GPU.
    """
    notes: list[str] = []
    kfd_found, gfx_versions, kfd_error = _read_kfd(Path(kfd_root))
    names: tuple[str, ...] = ()
    driver: str | None = None
    if use_amdsmi and gfx_versions:
        names, driver = _read_amdsmi(notes)
    return RocmFacts(
        torch_version=str(torch.__version__),
        torch_hip=getattr(torch.version, "hip", None),
        torch_cuda=getattr(torch.version, "cuda", None),
        kfd_found=kfd_found,
        gfx_versions=gfx_versions,
        kfd_error=kfd_error,
        device_names=names,
        driver_version=driver,
        notes=tuple(notes),
    )


def decide(facts: RocmFacts) -> Availability:
    """The availability the facts imply; the reason, when unavailable, names the remedy."""
    archs = [arch_of_gfx_version(v) for v in facts.gfx_versions]
    details: dict[str, Any] = {"torch": facts.torch_version, "torch_hip": facts.torch_hip}
    if archs:
        details["arch"] = archs
        details["gfx_target_version"] = list(facts.gfx_versions)
        details["fp8_format"] = fp8_format_of(archs[0])
    if facts.device_names:
        details["devices"] = list(facts.device_names)
    if facts.driver_version is not None:
        details["driver"] = facts.driver_version
    if facts.notes:
        details["notes"] = list(facts.notes)

    seen = f" (KFD lists {len(archs)} AMD GPU{'' if len(archs) == 1 else 's'})" if archs else ""
    if facts.torch_hip is None:
        build = "CUDA" if facts.torch_cuda is not None else "CPU"
        return Availability.no(
            f"torch {facts.torch_version} is a {build} build{seen}; {_INSTALL_ROCM_TORCH}", **details
        )
    if facts.kfd_error is not None:
        return Availability.no(f"{facts.kfd_error}; check the amdgpu driver (rocminfo)", **details)
    if not facts.kfd_found:
        return Availability.no(
            "no AMD GPU driver: the KFD topology (/sys/class/kfd) is missing; load the amdgpu driver, "
            "or run the container with --device=/dev/kfd --device=/dev/dri",
            **details,
        )
    if not archs:
        return Availability.no(
            "the KFD topology lists no AMD GPU (CPU nodes only); check rocminfo and that the GPU is passed "
            "to this container (--device=/dev/kfd --device=/dev/dri)",
            **details,
        )
    label = ", ".join(sorted(set(facts.device_names))) or ", ".join(sorted(set(archs)))
    n = len(archs)
    return Availability.yes(f"{n} device{'' if n == 1 else 's'}: {label}", **details)


def probe(facts: RocmFacts | None = None) -> Availability:
    """The ROCm backend's probe: :func:`decide` on ``facts``, or on :func:`gather`'s when ``None``."""
    return decide(gather() if facts is None else facts)
