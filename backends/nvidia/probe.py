"""Is the NVIDIA backend usable here? Cheap facts only: no CUDA context, no heavy vendor import.

Two steps, so tests can feed simulated machines:

- :func:`gather` reads the facts: torch's build (``torch.version.cuda`` / ``torch.version.hip``),
  then NVML through ``pynvml`` (package ``nvidia-ml-py``): driver version, the CUDA version the driver
  supports, device names and compute capabilities. NVML talks to the driver, not to the CUDA runtime,
  so it creates no context. Without ``pynvml`` it falls back to ``torch.cuda.device_count()``, which
  does not create a context either, and only when torch is a CUDA build. NVML also gives the NVLink
  topology: each GPU's active links (``nvmlDeviceGetNvLinkState`` over ``NVML_NVLINK_MAX_LINKS``) and
  what is at each link's far end (``nvmlDeviceGetNvLinkRemotePciInfo`` matched against the local GPUs'
  PCI bus ids, ``nvmlDeviceGetNvLinkRemoteDeviceType`` for NVSwitches).
- :func:`decide` turns the facts into an :class:`~hal.types.Availability`, pure and deterministic; its
  ``details`` carry what ``hal info`` shows (driver, devices, architectures, NVLink topology).

Every vendor call is wrapped in ``except Exception``: NVML fails in odd ways (``pynvml.nvmlInit()``
raises ``NVMLError_LibraryNotFound`` on a machine without the driver), and each failure becomes the
reason a user reads in ``hal info``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from typing import Any

import torch

from hal.types import Availability

__all__ = [
    "NvLink",
    "NvidiaFacts",
    "NvmlReading",
    "arch_of",
    "decide",
    "fp8_format_of",
    "gather",
    "nvlink_peers",
    "nvlink_summary",
    "probe",
]

#: The remedy for a torch without CUDA, shared by the CPU-build and ROCm-build reasons.
_INSTALL_CUDA_TORCH = "install a CUDA build of torch (https://pytorch.org/get-started/locally/)"

#: ``NVML_NVLINK_MAX_LINKS`` when ``pynvml`` does not define it (18 since NVML 11: Hopper's count).
_NVLINK_MAX_LINKS = 18
#: ``nvmlDeviceGetNvLinkRemoteDeviceType`` answers: GPU, IBM NPU, NVSwitch.
_NVLINK_REMOTE_KINDS = {0: "gpu", 1: "unknown", 2: "nvswitch"}


@dataclass(frozen=True)
class NvLink:
    """One active NVLink of one GPU.

    :param link: the link's index on its GPU, ``0 .. NVML_NVLINK_MAX_LINKS - 1``.
    :param remote: what is at the far end: ``"gpu"``, ``"nvswitch"`` or ``"unknown"`` (another kind of
        device, or NVML could not tell).
    :param peer: the far end's index among the GPUs NVML lists here (NVML order), when it is one of
        them; ``None`` otherwise.
    :param remote_bus_id: the far end's PCI bus id as ``"0000:18:00.0"``, ``""`` when NVML did not say.
    """

    link: int
    remote: str
    peer: int | None = None
    remote_bus_id: str = ""


@dataclass(frozen=True)
class NvmlReading:
    """What NVML reported.

    :param driver_version: e.g. ``"550.54.15"``.
    :param cuda_driver_version: the newest CUDA the driver supports as ``(major, minor)``, or ``None``
        when NVML could not tell.
    :param device_names: one per GPU, in NVML order (NVML ignores ``CUDA_VISIBLE_DEVICES``).
    :param compute_capabilities: ``(major, minor)`` per GPU, in the same order.
    :param nvlinks: each GPU's active NVLinks, in the same order (``()`` for a GPU without any: PCIe
        only); ``None`` when NVML could not tell (the reason is among the facts' notes).
    """

    driver_version: str
    cuda_driver_version: tuple[int, int] | None
    device_names: tuple[str, ...]
    compute_capabilities: tuple[tuple[int, int], ...]
    nvlinks: tuple[tuple[NvLink, ...], ...] | None = None


@dataclass(frozen=True)
class NvidiaFacts:
    """The cheap facts :func:`decide` needs.

    :param torch_version: ``torch.__version__``.
    :param torch_cuda: ``torch.version.cuda`` (``None`` for CPU and ROCm builds).
    :param torch_hip: ``torch.version.hip`` (set for ROCm builds, which also answer to ``cuda``).
    :param pynvml_installed: whether ``nvidia-ml-py`` is importable (found without importing it).
    :param nvml: NVML's answer, ``None`` when it was not asked or failed.
    :param nvml_error: why NVML failed, already phrased for a user; ``None`` when it answered or was
        not asked.
    :param torch_device_count: ``torch.cuda.device_count()``, read only without ``pynvml`` on a CUDA
        build of torch; ``None`` otherwise.
    :param torch_error: why ``torch.cuda.device_count()`` failed, if it did.
    :param notes: minor vendor failures that do not decide availability, shown in ``details``.
    """

    torch_version: str
    torch_cuda: str | None
    torch_hip: str | None
    pynvml_installed: bool
    nvml: NvmlReading | None = None
    nvml_error: str | None = None
    torch_device_count: int | None = None
    torch_error: str | None = None
    notes: tuple[str, ...] = ()


def arch_of(cc: tuple[int, int]) -> str:
    """The tuning-table key of a compute capability: ``(9, 0)`` → ``"sm90"``."""
    return f"sm{cc[0]}{cc[1]}"


def fp8_format_of(cc: tuple[int, int]) -> str | None:
    """``"e4m3fn"`` from Ada / Hopper on (sm89+, where fp8 tensor cores exist), else ``None``."""
    return "e4m3fn" if cc >= (8, 9) else None


def _text(value: Any) -> str:
    # Older pynvml returns bytes, newer str.
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_error(exc: BaseException) -> str:
    """One line naming the NVML failure and its remedy."""
    kind = type(exc).__name__
    if "LibraryNotFound" in kind:
        return "NVML: libnvidia-ml.so not found (no NVIDIA driver); install the NVIDIA driver"
    if "DriverNotLoaded" in kind:
        return "NVML: the NVIDIA kernel driver is not loaded; load it (nvidia-smi must work)"
    if "NoPermission" in kind:
        return "NVML: no permission to open the GPU; give this user access to /dev/nvidia*"
    return f"NVML failed: {kind}: {exc}"


def _read_nvml(notes: list[str]) -> tuple[NvmlReading | None, str | None]:
    """Ask NVML through ``pynvml``; a failure becomes the error string, a minor one a note."""
    try:
        pynvml = importlib.import_module("pynvml")
        pynvml.nvmlInit()
    except Exception as exc:  # vendor libraries fail oddly (NVMLError_LibraryNotFound): it becomes the reason
        return None, _nvml_error(exc)
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda_driver: tuple[int, int] | None = None
        try:
            version = int(pynvml.nvmlSystemGetCudaDriverVersion())  # 12020 for CUDA 12.2
            cuda_driver = (version // 1000, version % 1000 // 10)
        except Exception as exc:  # optional: without it the driver/torch CUDA check is skipped
            notes.append(f"NVML could not tell the driver's CUDA version: {type(exc).__name__}: {exc}")
        names: list[str] = []
        ccs: list[tuple[int, int]] = []
        handles: list[Any] = []
        for index in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            handles.append(handle)
            names.append(_text(pynvml.nvmlDeviceGetName(handle)))
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            ccs.append((int(major), int(minor)))
        nvlinks: tuple[tuple[NvLink, ...], ...] | None = None
        if handles:
            try:
                nvlinks = _read_nvlinks(pynvml, handles, notes)
            except Exception as exc:  # optional, like the CUDA version: the topology is then unknown
                notes.append(f"NVML could not tell the NVLink topology: {type(exc).__name__}: {exc}")
        return NvmlReading(driver, cuda_driver, tuple(names), tuple(ccs), nvlinks), None
    except Exception as exc:  # see above
        return None, _nvml_error(exc)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:  # the reading is already taken; say so rather than fail the probe
            notes.append(f"nvmlShutdown failed: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------------
# NVLink topology
# ---------------------------------------------------------------------------------------------------


def _link_absent(exc: BaseException) -> bool:
    """NVML's answer for a link index the GPU does not have: NotSupported (no NVLink at all, e.g. a
    PCIe card) or InvalidArgument (past the GPU's link count)."""
    kind = type(exc).__name__
    # pynvml's error classes are made at run time (NVMLError_NotSupported, ...); .value is NVML's
    # code: NVML_ERROR_INVALID_ARGUMENT = 2, NVML_ERROR_NOT_SUPPORTED = 3.
    return "NotSupported" in kind or "InvalidArgument" in kind or getattr(exc, "value", None) in (2, 3)


_BUS_ID = re.compile(r"([0-9a-fA-F]{1,8}):([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])")


def _bus_id(pci_info: Any) -> str:
    """A PCI bus id as ``"0000:18:00.0"`` from an ``nvmlPciInfo_t`` (its ``busId`` has 8 domain digits
    in NVML's v3 struct and 4 in the legacy one), ``""`` when it cannot be read."""
    raw = _text(getattr(pci_info, "busId", "")).strip().strip("\x00")
    match = _BUS_ID.fullmatch(raw)
    if match is not None:
        domain, bus, device, function = (int(part, 16) for part in match.groups())
        return f"{domain:04x}:{bus:02x}:{device:02x}.{function}"
    try:
        return f"{int(pci_info.domain):04x}:{int(pci_info.bus):02x}:{int(pci_info.device):02x}.0"
    except Exception:  # neither a bus id string nor the numeric fields: unknown
        return ""


def _read_nvlinks(pynvml: Any, handles: list[Any], notes: list[str]) -> tuple[tuple[NvLink, ...], ...]:
    """Each GPU's active NVLinks and their far ends. Absent links are skipped; an unexpected NVML
    error on a link's state raises (the topology is then unknown); a far end NVML cannot describe is
    ``"unknown"``, with a note."""
    max_links = int(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", _NVLINK_MAX_LINKS))
    enabled = int(getattr(pynvml, "NVML_FEATURE_ENABLED", 1))
    local = {_bus_id(pynvml.nvmlDeviceGetPciInfo(handle)): index for index, handle in enumerate(handles)}
    local.pop("", None)
    remote_type = getattr(pynvml, "nvmlDeviceGetNvLinkRemoteDeviceType", None)
    topology: list[tuple[NvLink, ...]] = []
    for gpu, handle in enumerate(handles):
        links: list[NvLink] = []
        for link in range(max_links):
            try:
                state = pynvml.nvmlDeviceGetNvLinkState(handle, link)
            except Exception as exc:  # see _link_absent; anything else makes the topology unknown
                if _link_absent(exc):
                    continue
                raise
            if int(state) != enabled:
                continue
            try:
                bus = _bus_id(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link))
            except Exception as exc:  # the link is up; only its far end is unknown
                notes.append(
                    f"NVML could not tell the far end of GPU {gpu}'s NVLink {link}: {type(exc).__name__}: {exc}"
                )
                bus = ""
            kind: str | None = None
            if remote_type is not None:
                try:
                    kind = _NVLINK_REMOTE_KINDS.get(int(remote_type(handle, link)), "unknown")
                except Exception:  # older drivers lack it: the bus id decides below
                    kind = None
            peer = local.get(bus) if bus else None
            if kind is None:
                kind = "gpu" if peer is not None else "unknown"
            links.append(NvLink(link, kind, peer if kind == "gpu" else None, bus))
        topology.append(tuple(links))
    return tuple(topology)


def nvlink_peers(nvlinks: tuple[tuple[NvLink, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """For each GPU, the other GPUs here it reaches over NVLink, ascending.

    A direct link to a GPU makes it a peer. A link to an NVSwitch makes every other GPU with a link
    to an NVSwitch a peer: one NVSwitch fabric per machine, as on HGX / DGX boards (a fabric manager
    partition that splits them is not visible through these queries).
    """
    switched = {gpu for gpu, links in enumerate(nvlinks) if any(link.remote == "nvswitch" for link in links)}
    peers: list[tuple[int, ...]] = []
    for gpu, links in enumerate(nvlinks):
        reach = {link.peer for link in links if link.remote == "gpu" and link.peer is not None}
        if gpu in switched:
            reach |= switched
        reach.discard(gpu)
        peers.append(tuple(sorted(reach)))
    return tuple(peers)


def _counts(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{_plural(low, 'link')} each" if low == high else f"{low}-{high} links per GPU"


def nvlink_summary(nvlinks: tuple[tuple[NvLink, ...], ...] | None) -> str:
    """One line describing the topology, for ``hal info``."""
    if nvlinks is None:
        return "unknown (see notes)"
    n = len(nvlinks)
    counts = [len(links) for links in nvlinks]
    if sum(counts) == 0:
        return "none: no active NVLink (GPUs talk over PCIe)"
    switch = any(link.remote == "nvswitch" for links in nvlinks for link in links)
    via = ", through NVSwitch" if switch else ""
    if n == 1:
        return f"{_plural(counts[0], 'link')} active{via}; no other GPU here"
    peers = nvlink_peers(nvlinks)
    if all(len(p) == n - 1 for p in peers):
        return f"all {n} GPUs connected, {_counts(counts)}{via}"
    pairs = sorted({(min(a, b), max(a, b)) for a, reach in enumerate(peers) for b in reach})
    linked = [gpu for gpu, reach in enumerate(peers) if reach]
    shown = ", ".join(f"{a}-{b}" for a, b in pairs) or "none"
    if not linked:  # links up, but to nothing identified as a GPU here
        return f"{_plural(sum(counts), 'active link')}, none to a GPU identified here{via}"
    return (
        f"partial: {len(linked)} of {n} GPUs have NVLink peers ({_counts([counts[g] for g in linked])}{via}); "
        f"linked pairs {shown}"
    )


def gather() -> NvidiaFacts:
    """Read this machine's facts. Imports ``pynvml`` if installed; creates no CUDA context."""
    notes: list[str] = []
    torch_cuda = getattr(torch.version, "cuda", None)
    torch_hip = getattr(torch.version, "hip", None)
    try:
        pynvml_installed = importlib.util.find_spec("pynvml") is not None
    except Exception as exc:  # a broken install: report it and carry on as without pynvml
        pynvml_installed = False
        notes.append(f"cannot look up pynvml: {type(exc).__name__}: {exc}")
    nvml: NvmlReading | None = None
    nvml_error: str | None = None
    torch_count: int | None = None
    torch_error: str | None = None
    if pynvml_installed:
        nvml, nvml_error = _read_nvml(notes)
    elif torch_cuda is not None and torch_hip is None:
        try:
            # Counts devices without creating a context (torch keeps CUDA lazily uninitialized).
            torch_count = torch.cuda.device_count()
        except Exception as exc:  # becomes the reason
            torch_error = f"{type(exc).__name__}: {exc}"
    return NvidiaFacts(
        torch_version=str(torch.__version__),
        torch_cuda=torch_cuda,
        torch_hip=torch_hip,
        pynvml_installed=pynvml_installed,
        nvml=nvml,
        nvml_error=nvml_error,
        torch_device_count=torch_count,
        torch_error=torch_error,
        notes=tuple(notes),
    )


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def decide(facts: NvidiaFacts) -> Availability:
    """The availability the facts imply; the reason, when unavailable, names the remedy."""
    details: dict[str, Any] = {"torch": facts.torch_version, "torch_cuda": facts.torch_cuda}
    reading = facts.nvml
    if reading is not None:
        details["driver"] = reading.driver_version
        if reading.cuda_driver_version is not None:
            details["driver_cuda"] = "{}.{}".format(*reading.cuda_driver_version)
        details["devices"] = list(reading.device_names)
        details["compute_capability"] = [f"{a}.{b}" for a, b in reading.compute_capabilities]
        details["arch"] = [arch_of(cc) for cc in reading.compute_capabilities]
        if reading.device_names:
            details["nvlink"] = nvlink_summary(reading.nvlinks)
            if reading.nvlinks is not None and any(reading.nvlinks):
                details["nvlink_links"] = [len(links) for links in reading.nvlinks]
                details["nvlink_peers"] = [list(p) for p in nvlink_peers(reading.nvlinks)]
    if facts.nvml_error is not None:
        details["nvml"] = facts.nvml_error
    elif not facts.pynvml_installed:
        details["nvml"] = "nvidia-ml-py not installed (pip install hal-accel[nvidia]); device names unknown"
    if facts.notes:
        details["notes"] = list(facts.notes)

    seen = f" (NVML sees {_plural(len(reading.device_names), 'GPU')})" if reading and reading.device_names else ""
    if facts.torch_hip is not None:
        return Availability.no(f"torch {facts.torch_version} is a ROCm build{seen}; {_INSTALL_CUDA_TORCH}", **details)
    if facts.torch_cuda is None:
        return Availability.no(f"torch {facts.torch_version} is a CPU build{seen}; {_INSTALL_CUDA_TORCH}", **details)

    if reading is not None:
        n = len(reading.device_names)
        if n == 0:
            return Availability.no(
                f"NVML found no NVIDIA GPU (driver {reading.driver_version}); "
                "check that the GPU is attached to this machine or container (nvidia-smi -L)",
                **details,
            )
        torch_major = _major(facts.torch_cuda)
        driver_cuda = reading.cuda_driver_version
        if driver_cuda is not None and torch_major is not None and torch_major > driver_cuda[0]:
            return Availability.no(
                f"NVIDIA driver {reading.driver_version} supports CUDA up to {driver_cuda[0]}.{driver_cuda[1]} "
                f"but torch {facts.torch_version} needs CUDA {facts.torch_cuda}; upgrade the driver or "
                f"install a torch build for CUDA {driver_cuda[0]}",
                **details,
            )
        names = sorted(set(reading.device_names))
        return Availability.yes(f"{_plural(n, 'device')}: {', '.join(names)}", **details)

    if facts.nvml_error is not None:
        return Availability.no(facts.nvml_error, **details)
    if facts.torch_error is not None:
        return Availability.no(
            f"torch.cuda.device_count() failed ({facts.torch_error}); check the NVIDIA driver (nvidia-smi)",
            **details,
        )
    count = facts.torch_device_count or 0
    details["device_count"] = count
    if count == 0:
        return Availability.no(
            f"torch {facts.torch_version} sees no CUDA device; check the NVIDIA driver (nvidia-smi) and "
            "CUDA_VISIBLE_DEVICES",
            **details,
        )
    return Availability.yes(f"{_plural(count, 'device')} (names unknown: nvidia-ml-py not installed)", **details)


def probe(facts: NvidiaFacts | None = None) -> Availability:
    """The NVIDIA backend's probe: :func:`decide` on ``facts``, or on :func:`gather`'s when ``None``."""
    return decide(gather() if facts is None else facts)
