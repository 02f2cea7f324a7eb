"""Is the NVIDIA backend usable here? Cheap facts only: no CUDA context, no heavy vendor import.

Two steps, so tests can feed simulated machines:

- :func:`gather` reads the facts: torch's build (``torch.version.cuda`` / ``torch.version.hip``),
  then NVML through ``pynvml`` (package ``nvidia-ml-py``): driver version, the CUDA version the driver
  supports, device names and compute capabilities. NVML talks to the driver, not to the CUDA runtime,
  so it creates no context. Without ``pynvml`` it falls back to ``torch.cuda.device_count()``, which
  does not create a context either, and only when torch is a CUDA build.
- :func:`decide` turns the facts into an :class:`~hal.types.Availability`, pure and deterministic.

Every vendor call is wrapped in ``except Exception``: NVML fails in odd ways (``pynvml.nvmlInit()``
raises ``NVMLError_LibraryNotFound`` on a machine without the driver), and each failure becomes the
reason a user reads in ``hal info``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from hal.types import Availability

__all__ = ["NvidiaFacts", "NvmlReading", "arch_of", "decide", "fp8_format_of", "gather", "probe"]

#: The remedy for a torch without CUDA, shared by the CPU-build and ROCm-build reasons.
_INSTALL_CUDA_TORCH = "install a CUDA build of torch (https://pytorch.org/get-started/locally/)"


@dataclass(frozen=True)
class NvmlReading:
    """What NVML reported.

    :param driver_version: e.g. ``"550.54.15"``.
    :param cuda_driver_version: the newest CUDA the driver supports as ``(major, minor)``, or ``None``
        when NVML could not tell.
    :param device_names: one per GPU, in NVML order (NVML ignores ``CUDA_VISIBLE_DEVICES``).
    :param compute_capabilities: ``(major, minor)`` per GPU, in the same order.
    """

    driver_version: str
    cuda_driver_version: tuple[int, int] | None
    device_names: tuple[str, ...]
    compute_capabilities: tuple[tuple[int, int], ...]


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
        for index in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            names.append(_text(pynvml.nvmlDeviceGetName(handle)))
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            ccs.append((int(major), int(minor)))
        return NvmlReading(driver, cuda_driver, tuple(names), tuple(ccs)), None
    except Exception as exc:  # see above
        return None, _nvml_error(exc)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:  # the reading is already taken; say so rather than fail the probe
            notes.append(f"nvmlShutdown failed: {type(exc).__name__}: {exc}")


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
