"""The CPU backend's runtime ops: device count, synchronization, memory figures, host buffers.

The CPU has one device, runs every op synchronously and has no caching allocator, so most of these
are trivial. Memory figures come from the operating system (``/proc/self/statm``, ``getrusage``,
``sysconf``); a figure the platform cannot give is ``None``, never a guess. Reading them is cheap and
touches no device.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hal.types import MemoryStats

try:
    import resource
except ImportError:  # Windows has no ``resource`` module: the peak is then unknown (None).
    resource = None  # type: ignore[assignment]

__all__ = [
    "RUNTIME_OPS",
    "device_count",
    "empty_cache",
    "memory_stats",
    "pinned_empty",
    "synchronize",
    "total_memory",
]


def device_count() -> int:
    """One CPU device: torch treats all cores of the host as the single device ``cpu``."""
    return 1


def synchronize() -> None:
    """No-op: CPU ops run synchronously, so nothing is ever queued."""


def _page_size() -> int | None:
    try:
        size = os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
    return size if size > 0 else None


def _resident_bytes() -> int | None:
    """This process's resident set size now, from ``/proc/self/statm`` (Linux only)."""
    page = _page_size()
    if page is None:
        return None
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            fields = f.read().split()
        # statm: size resident shared text lib data dt, all in pages.
        return int(fields[1]) * page
    except (OSError, ValueError, IndexError):
        return None


def _peak_resident_bytes() -> int | None:
    """This process's peak resident set size, from ``getrusage``."""
    if resource is None:
        return None
    try:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    # ru_maxrss is in kibibytes on Linux and the BSDs, but in bytes on macOS.
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def total_memory() -> int | None:
    """Physical memory of the host in bytes, or ``None`` where ``sysconf`` cannot tell."""
    page = _page_size()
    if page is None:
        return None
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None
    return pages * page if pages > 0 else None


def memory_stats() -> MemoryStats:
    """The process's resident set (as both allocated and reserved), its peak, and physical memory.

    Without a caching allocator, what the process holds is what it uses: allocated equals reserved.
    """
    resident = _resident_bytes()
    peak = _peak_resident_bytes()
    if peak is not None and resident is not None:
        # The peak is read after the current figure and from other kernel counters, which are updated
        # lazily; a peak is by definition at least the current value, so keep that invariant exact.
        peak = max(peak, resident)
    return MemoryStats(allocated=resident, reserved=resident, peak=peak, total=total_memory())


def empty_cache() -> None:
    """No-op: the CPU allocator caches nothing, so there is nothing to release."""


def pinned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor of ``shape`` and ``dtype``.

    Not page-locked: pinning only speeds up copies to an accelerator, and this backend has none;
    ``pin_memory=True`` would also fail outright on a CPU-only build of torch.
    """
    return torch.empty(tuple(shape), dtype=dtype, device="cpu")


#: op name → implementation, for the runtime ops of the catalogue.
RUNTIME_OPS: dict[str, Callable[..., Any]] = {
    "device_count": device_count,
    "synchronize": synchronize,
    "memory_stats": memory_stats,
    "empty_cache": empty_cache,
    "pinned_empty": pinned_empty,
}
