"""Is the ROCm backend usable here? Cheap facts only: no HIP context, no heavy vendor import.

Two steps, so tests can feed simulated machines:

- :func:`gather` reads the facts: torch's build (``torch.version.hip``); the GPUs the amdgpu kernel
  driver lists in its KFD topology (``/sys/class/kfd/kfd/topology/nodes/*/properties``, plain files:
  reading them touches no GPU), with each one's ``gfx_target_version`` (→ ``gfx942``) and
  ``unique_id``; whether this process may open ``/dev/kfd`` (containers often see the host's sysfs
  without the device); the visible-device variables (``ROCR_VISIBLE_DEVICES``, then
  ``HIP_VISIBLE_DEVICES`` or ``CUDA_VISIBLE_DEVICES``); and, for names and telemetry only, ``amdsmi``
  when it imports (:mod:`hal_rocm.telemetry`).
- :func:`decide` turns the facts into an :class:`~hal.types.Availability`, pure and deterministic:
  availability, the reason, each visible GPU's arch and the fp8 format of the first (gfx942 MI300
  ``e4m3fnuz``, gfx950 MI350 ``e4m3fn``, others none).

``amdsmi`` never decides availability: it fails in odd ways (``import amdsmi`` raises
``KeyError: 'libamd_smi.so'`` when the ROCm library is missing), so any exception it raises becomes a
note in ``details``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hal.types import Availability
from hal_rocm.telemetry import describe, read_devices

__all__ = [
    "DEV_KFD",
    "KFD_TOPOLOGY",
    "VISIBLE_DEVICE_VARIABLES",
    "RocmFacts",
    "arch_of_gfx_version",
    "decide",
    "fp8_format_of",
    "gather",
    "probe",
    "visible_gpus",
]

#: Where the amdgpu driver publishes one directory per node (CPUs and GPUs) of the machine.
KFD_TOPOLOGY = Path("/sys/class/kfd/kfd/topology/nodes")
#: The device node every HIP process opens; the amdgpu driver's compute interface.
DEV_KFD = Path("/dev/kfd")
#: What hides or reorders AMD GPUs: ROCr applies ``ROCR_VISIBLE_DEVICES`` to the KFD's GPUs, then HIP
#: applies ``HIP_VISIBLE_DEVICES`` (or, when that is unset, ``CUDA_VISIBLE_DEVICES``) to what is left.
VISIBLE_DEVICE_VARIABLES = ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")

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
    :param unique_ids: each GPU node's ``unique_id`` (what ``GPU-<hex>`` UUIDs name), in the order of
        ``gfx_versions``; 0 where the driver does not publish one; empty when not read.
    :param dev_kfd: ``"ok"``, ``"missing"`` or ``"denied"`` (``/dev/kfd`` exists but this user may not
        open it); ``None`` when not checked (no GPU listed, or simulated facts).
    :param visible_env: the variables of :data:`VISIBLE_DEVICE_VARIABLES` that are set, by name.
    :param telemetry: one reading per GPU from :func:`hal_rocm.telemetry.read_devices` (empty
        without amdsmi).
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
    unique_ids: tuple[int, ...] = ()
    dev_kfd: str | None = None
    visible_env: Mapping[str, str] = field(default_factory=dict)
    telemetry: tuple[Mapping[str, Any], ...] = ()


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


def _read_kfd(root: Path) -> tuple[bool, tuple[tuple[int, int], ...], str | None]:
    """GPU nodes under ``root`` as ``(gfx_target_version, unique_id)`` in node order; (found, gpus, error)."""
    if not root.is_dir():
        return False, (), None
    gpus: list[tuple[int, int, int]] = []
    try:
        for node in root.iterdir():
            props = node / "properties"
            if not node.name.isdigit() or not props.is_file():
                continue
            fields = {}
            for line in props.read_text(encoding="utf-8").splitlines():
                key, _, value = line.partition(" ")
                if key in ("gfx_target_version", "unique_id"):
                    fields[key] = int(value)
            if fields.get("gfx_target_version", 0) != 0:
                gpus.append((int(node.name), fields["gfx_target_version"], fields.get("unique_id", 0)))
    except (OSError, ValueError) as exc:
        return True, (), f"cannot read the KFD topology {root}: {type(exc).__name__}: {exc}"
    return True, tuple((version, uid) for _, version, uid in sorted(gpus)), None


def _check_dev_kfd(path: Path) -> str:
    """``"ok"``, ``"missing"`` or ``"denied"``: can this process open the KFD device? (``os.access``
    only: opening it is what a HIP context does.)"""
    if not path.exists():
        return "missing"
    return "ok" if os.access(path, os.R_OK | os.W_OK) else "denied"


def _read_amdsmi(notes: list[str]) -> tuple[tuple[str, ...], str | None, tuple[dict[str, Any], ...]]:
    """Names, the driver version and telemetry through amdsmi; any failure becomes a note, never a verdict."""
    try:
        amdsmi = importlib.import_module("amdsmi")
        amdsmi.amdsmi_init()
    except Exception as exc:  # import amdsmi raises KeyError('libamd_smi.so') without ROCm: a note
        notes.append(f"amdsmi unavailable: {type(exc).__name__}: {exc}")
        return (), None, ()
    driver: str | None = None
    devices: list[dict[str, Any]] = []
    try:
        handles = list(amdsmi.amdsmi_get_processor_handles())
        devices, more = read_devices(amdsmi, handles)  # never raises: each failure is a note
        notes.extend(more)
        if handles:
            driver = str(amdsmi.amdsmi_get_gpu_driver_info(handles[0])["driver_version"])
    except Exception as exc:  # telemetry only: keep what was read, say what was not
        notes.append(f"amdsmi query failed: {type(exc).__name__}: {exc}")
    finally:
        try:
            amdsmi.amdsmi_shut_down()
        except Exception as exc:  # the reading is already taken
            notes.append(f"amdsmi_shut_down failed: {type(exc).__name__}: {exc}")
    names = tuple(str(d["name"]) for d in devices if d.get("name"))
    return names, driver, tuple(devices)


def gather(
    kfd_root: Path | str = KFD_TOPOLOGY,
    *,
    use_amdsmi: bool = True,
    dev_kfd: Path | str = DEV_KFD,
    env: Mapping[str, str] | None = None,
) -> RocmFacts:
    """Read this machine's facts. Creates no HIP context.

    :param kfd_root: the KFD ``topology/nodes`` directory (tests point it at a temporary tree).
    :param use_amdsmi: ask amdsmi for names, the driver version and telemetry when the KFD lists a GPU.
    :param dev_kfd: the KFD device node whose access is checked when the KFD lists a GPU.
    :param env: the environment to read the visible-device variables from (``None``: ``os.environ``).
    """
    notes: list[str] = []
    kfd_found, gpus, kfd_error = _read_kfd(Path(kfd_root))
    names: tuple[str, ...] = ()
    driver: str | None = None
    telemetry: tuple[dict[str, Any], ...] = ()
    if use_amdsmi and gpus:
        names, driver, telemetry = _read_amdsmi(notes)
    environ = os.environ if env is None else env
    return RocmFacts(
        torch_version=str(torch.__version__),
        torch_hip=getattr(torch.version, "hip", None),
        torch_cuda=getattr(torch.version, "cuda", None),
        kfd_found=kfd_found,
        gfx_versions=tuple(version for version, _ in gpus),
        kfd_error=kfd_error,
        device_names=names,
        driver_version=driver,
        notes=tuple(notes),
        unique_ids=tuple(uid for _, uid in gpus),
        dev_kfd=_check_dev_kfd(Path(dev_kfd)) if gpus else None,
        visible_env={name: environ[name] for name in VISIBLE_DEVICE_VARIABLES if name in environ},
        telemetry=telemetry,
    )


def _select(variable: str, value: str, gpus: list[int], unique_ids: tuple[int, ...]) -> tuple[list[int], str | None]:
    """The GPUs (KFD indices) a visible-device variable keeps of ``gpus``, and a note when it is odd.

    Entries are indices into ``gpus`` or ``GPU-<hex unique_id>`` UUIDs. As in CUDA and HIP, an entry
    that names no GPU ends the list (so ``""`` and ``"-1"`` hide everything). A UUID that cannot be
    checked (the driver publishes no ``unique_id``) leaves ``gpus`` as they are: an unknown is never
    turned into "no GPU".
    """
    kept: list[int] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.upper().startswith("GPU-"):
            if not unique_ids or not any(unique_ids[g] for g in gpus):
                return (
                    gpus,
                    f"{variable}={value!r}: cannot match UUIDs (the KFD lists no unique_id); assuming all listed",
                )
            try:
                uid = int(entry[4:], 16)
            except ValueError:
                uid = -1
            found = [g for g in gpus if unique_ids[g] == uid]
            if not found:
                return kept, f"{variable}={value!r}: {entry!r} names no GPU; later entries are ignored"
            if found[0] not in kept:
                kept.append(found[0])
            continue
        try:
            index = int(entry)
        except ValueError:
            index = -1
        if not 0 <= index < len(gpus):
            if entry not in ("", "-1"):
                return kept, f"{variable}={value!r}: {entry!r} names no GPU (of {len(gpus)}); later entries are ignored"
            return kept, None
        if gpus[index] not in kept:
            kept.append(gpus[index])
    return kept, None


def visible_gpus(
    n_gpus: int, visible_env: Mapping[str, str], unique_ids: tuple[int, ...] = ()
) -> tuple[list[int], list[str], str | None]:
    """Which of the KFD's ``n_gpus`` GPUs a HIP process would see, in its device order.

    :param visible_env: the set variables of :data:`VISIBLE_DEVICE_VARIABLES`, by name.
    :param unique_ids: each GPU's KFD ``unique_id``, to match ``GPU-<hex>`` entries.
    :returns: ``(kfd_indices, notes, hiding)``: the KFD indices of the visible GPUs (torch's device 0
        first), a note per odd entry, and ``"NAME='value'"`` of the variable that left none (``None``
        when some are left).
    """
    gpus = list(range(n_gpus))
    notes: list[str] = []
    if len(unique_ids) != n_gpus:
        unique_ids = ()  # not read (simulated facts): UUID entries cannot be matched
    hip = "HIP_VISIBLE_DEVICES" if "HIP_VISIBLE_DEVICES" in visible_env else "CUDA_VISIBLE_DEVICES"
    for variable in ("ROCR_VISIBLE_DEVICES", hip):
        if variable not in visible_env:
            continue
        value = visible_env[variable]
        gpus, note = _select(variable, value, gpus, unique_ids)
        if note is not None:
            notes.append(note)
        if not gpus:
            return [], notes, f"{variable}={value!r}"
    return gpus, notes, None


def decide(facts: RocmFacts) -> Availability:
    """The availability the facts imply; the reason, when unavailable, names the remedy."""
    all_archs = [arch_of_gfx_version(v) for v in facts.gfx_versions]
    visible, visible_notes, hiding = visible_gpus(len(all_archs), facts.visible_env, facts.unique_ids)
    archs = [all_archs[i] for i in visible]
    details: dict[str, Any] = {"torch": facts.torch_version, "torch_hip": facts.torch_hip}
    if archs:
        details["arch"] = archs
        details["gfx_target_version"] = [facts.gfx_versions[i] for i in visible]
        details["fp8_format"] = fp8_format_of(archs[0])
    if facts.visible_env:
        details["visible_devices"] = dict(facts.visible_env)
        details["kfd_gpus"] = len(all_archs)
    if facts.device_names:
        details["devices"] = list(facts.device_names)
    if facts.driver_version is not None:
        details["driver"] = facts.driver_version
    if facts.telemetry:
        details["telemetry"] = [describe(reading) for reading in facts.telemetry]
    notes = list(facts.notes) + visible_notes
    if len({fp8_format_of(a) for a in archs}) > 1:
        notes.append(f"the visible GPUs mix fp8 formats ({', '.join(sorted(set(archs)))}); device 0's is used")
    if notes:
        details["notes"] = notes

    n_all = len(all_archs)
    seen = f" (KFD lists {n_all} AMD GPU{'' if n_all == 1 else 's'})" if all_archs else ""
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
    if not all_archs:
        return Availability.no(
            "the KFD topology lists no AMD GPU (CPU nodes only); check rocminfo and that the GPU is passed "
            "to this container (--device=/dev/kfd --device=/dev/dri)",
            **details,
        )
    if facts.dev_kfd == "missing":
        return Availability.no(
            f"the KFD topology lists {n_all} AMD GPU{'' if n_all == 1 else 's'} but /dev/kfd is missing; run the "
            "container with --device=/dev/kfd --device=/dev/dri",
            **details,
        )
    if facts.dev_kfd == "denied":
        return Availability.no(
            "no permission to open /dev/kfd; add this user to the 'render' and 'video' groups "
            "(or run the container with --group-add render --group-add video)",
            **details,
        )
    if hiding is not None:
        return Availability.no(
            f"{hiding} hides every AMD GPU (the KFD lists {n_all}); unset it or list device indices 0..{n_all - 1}",
            **details,
        )
    if len(facts.device_names) == n_all:
        label = ", ".join(sorted({facts.device_names[i] for i in visible}))
    else:
        label = ", ".join(sorted(set(archs)))
    n = len(archs)
    return Availability.yes(f"{n} device{'' if n == 1 else 's'}: {label}", **details)


def probe(facts: RocmFacts | None = None) -> Availability:
    """The ROCm backend's probe: :func:`decide` on ``facts``, or on :func:`gather`'s when ``None``."""
    return decide(gather() if facts is None else facts)
