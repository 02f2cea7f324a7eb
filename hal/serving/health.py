"""Device health: one :class:`~hal.types.DeviceHealth` per device of every available backend (``hal.health()``).

Each backend reports its own devices through the optional ``health`` callable of its
:class:`~hal.types.BackendSpec`: cheap, driver-level facts only (no compute SDK is imported and no
device context is created, the same rule the probes follow). The in-tree readers live beside their
backends (``hal_cpu.health``, ``hal_nvidia.health``, ``hal_rocm.health``, ``hal_ascend.health``); this
module knows no vendor. A backend without ``health`` gets one row saying it is available, without
telemetry; a ``health`` that raises, or returns something other than ``DeviceHealth`` rows, gives one
unhealthy row with the error (a driver that cannot answer is not a healthy one).

A device the serving layer saw fail (:mod:`hal.serving.failover`) is marked in a :class:`HealthBook`
and reported unhealthy with the error until the mark is cleared, whatever its telemetry says.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from hal.types import DeviceHealth

if TYPE_CHECKING:
    from hal.registry import BackendInfo, Registry

__all__ = [
    "DeviceHealth",
    "HealthBook",
    "default_book",
    "format_health",
    "health",
]

log = logging.getLogger("hal.serving")


# ---------------------------------------------------------------------------------------------------
# Marks: devices the serving layer saw fail
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mark:
    reason: str
    since: float  # time.time()


class HealthBook:
    """Devices marked unhealthy by the serving layer, keyed by ``(backend, device)``; thread-safe.

    Failover marks the device whose op raised; :func:`health` reports it unhealthy and failover skips
    its backend until :meth:`clear` is called (say, after the device was reset).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._marks: dict[tuple[str, str], _Mark] = {}

    def mark_unhealthy(self, backend: str, device: str, reason: str) -> None:
        """Record that ``device`` of ``backend`` failed, and why."""
        with self._lock:
            self._marks[(backend, device)] = _Mark(reason, time.time())
        log.warning("device %s of backend %r marked unhealthy: %s", device, backend, reason)

    def clear(self, backend: str | None = None, device: str | None = None) -> None:
        """Forget the marks of ``backend`` (every backend when ``None``), only ``device`` when given."""
        with self._lock:
            for key in list(self._marks):
                if (backend is None or key[0] == backend) and (device is None or key[1] == device):
                    del self._marks[key]

    def marks(self) -> dict[tuple[str, str], str]:
        """``(backend, device)`` → the reason it was marked."""
        with self._lock:
            return {key: mark.reason for key, mark in self._marks.items()}

    def is_healthy(self, backend: str, device: str | None = None) -> bool:
        """False when ``device`` of ``backend`` (any of its devices when ``None``) is marked."""
        with self._lock:
            return not any(b == backend and (device is None or d == device) for b, d in self._marks)


_default_book = HealthBook()


def default_book() -> HealthBook:
    """The process-wide :class:`HealthBook` that :func:`health` and failover use unless given another."""
    return _default_book


# ---------------------------------------------------------------------------------------------------
# hal.health()
# ---------------------------------------------------------------------------------------------------


def _rows_of(info: BackendInfo, read: Callable[[], Sequence[DeviceHealth]]) -> list[DeviceHealth]:
    """One backend's rows from its ``BackendSpec.health``; a failure is one unhealthy row saying why."""
    try:
        found = read()
    except Exception as exc:  # vendor telemetry fails in odd ways: the failure is the finding
        return [DeviceHealth(info.name, "-", "?", False, f"telemetry failed: {type(exc).__name__}: {exc}")]
    if isinstance(found, (str, bytes)) or not isinstance(found, Sequence):
        why = f"health() returned {type(found).__name__}, not a sequence of hal.DeviceHealth"
        return [DeviceHealth(info.name, "-", "?", False, f"telemetry failed: {why}")]
    bad = [type(row).__name__ for row in found if not isinstance(row, DeviceHealth)]
    if bad:
        why = f"health() returned {', '.join(sorted(set(bad)))} rows, not hal.DeviceHealth"
        return [DeviceHealth(info.name, "-", "?", False, f"telemetry failed: {why}")]
    return list(found)


def health(registry: Registry | None = None, *, book: HealthBook | None = None) -> list[DeviceHealth]:
    """Per-device health of every available backend, highest priority first.

    :param registry: whose backends (``None``: :func:`hal.default_registry`).
    :param book: the devices the serving layer marked unhealthy (``None``: :func:`default_book`).
    :returns: the rows of each available backend's ``BackendSpec.health`` in backend order (one generic
        row for a backend without one), the marks applied; then one row for each marked device no
        backend listed. A ``health`` that raises gives one unhealthy row with its error.
    """
    if registry is None:
        import hal

        registry = hal.default_registry()
    book = default_book() if book is None else book
    marks = book.marks()
    rows: list[DeviceHealth] = []
    for info in registry.backends():
        if not info.available:
            continue
        read = registry.spec(info.name).health
        if read is None:
            rows.append(DeviceHealth(info.name, "-", info.description or info.name, True, f"available: {info.reason}"))
        else:
            rows.extend(_rows_of(info, read))
    # Apply the marks; a marked device no backend listed (a "-" row, a backend now gone) gets its own row.
    out: list[DeviceHealth] = []
    used: set[tuple[str, str]] = set()
    for row in rows:
        key = (row.backend, row.device)
        if key in marks:
            used.add(key)
            row = replace(row, healthy=False, reason=f"marked unhealthy: {marks[key]}")
        elif row.device == "-":
            # A backend whose devices are unknown: any mark of that backend names its device.
            for (b, d), why in marks.items():
                if b == row.backend:
                    used.add((b, d))
                    row = replace(row, device=d, healthy=False, reason=f"marked unhealthy: {why}")
                    break
        out.append(row)
    for (b, d), why in marks.items():
        if (b, d) not in used:
            out.append(DeviceHealth(b, d, "?", False, f"marked unhealthy: {why}"))
    return out


def _bytes(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f}"


def format_health(rows: Sequence[DeviceHealth | Mapping[str, Any]]) -> list[str]:
    """Lines for ``hal info``: a header and one line per device (rows, or their :meth:`~DeviceHealth.as_dict`)."""
    return _format_health([r if isinstance(r, DeviceHealth) else DeviceHealth(**r) for r in rows])


def _format_health(rows: Sequence[DeviceHealth]) -> list[str]:
    if not rows:
        return ["Device health: no available backend"]
    out = ["Device health (hal.health())"]
    width = max(len(f"{r.backend} {r.device}") for r in rows)
    for r in rows:
        facts = []
        if r.memory_total_bytes is not None:
            facts.append(f"memory {_bytes(r.memory_used_bytes)}/{_bytes(r.memory_total_bytes)} GiB")
        if r.temperature_c is not None:
            facts.append(f"{r.temperature_c:.0f} C")
        if r.utilization_pct is not None:
            facts.append(f"util {r.utilization_pct:.0f}%")
        if r.power_w is not None:
            facts.append(f"{r.power_w:.0f} W")
        state = "healthy  " if r.healthy else "UNHEALTHY"
        tail = " · ".join([r.name, *facts, r.reason])
        out.append(f"  {f'{r.backend} {r.device}'.ljust(width)}  {state}  {tail}")
    return out
