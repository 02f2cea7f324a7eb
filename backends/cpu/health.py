"""The ``cpu`` backend's device health (its ``BackendSpec.health``): the host, from ``sysconf``.

Reads two ``sysconf`` values; imports nothing beyond the standard library and creates no device context.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

from hal.types import DeviceHealth

__all__ = ["read_cpu"]


def _sysconf(name: str) -> int | None:
    try:
        value = os.sysconf(name)
    except (OSError, ValueError, AttributeError):  # not on this platform (Windows has no sysconf)
        return None
    return value if value > 0 else None


def read_cpu(*, sysconf: Callable[[str], int | None] = _sysconf) -> list[DeviceHealth]:
    """The host: always healthy; memory from ``sysconf`` (total and available pages).

    :param sysconf: ``os.sysconf`` returning ``None`` for an unknown or non-positive value (tests pass a
        fake).
    :returns: one row, device ``"cpu"``; memory ``None`` where the platform cannot tell.
    """
    page = sysconf("SC_PAGE_SIZE")
    phys, avail = sysconf("SC_PHYS_PAGES"), sysconf("SC_AVPHYS_PAGES")
    total = phys * page if page and phys else None
    used = total - avail * page if total is not None and page and avail else None
    name = f"{platform.machine() or 'unknown'} CPU, {os.cpu_count() or '?'} cores"
    return [DeviceHealth("cpu", "cpu", name, True, "the CPU reports itself healthy", used, total)]
