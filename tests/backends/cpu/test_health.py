"""The cpu backend's health reader: the host from ``sysconf``, registered as its ``BackendSpec.health``."""

from __future__ import annotations

import hal
import hal_cpu
from hal_cpu.health import read_cpu


def test_the_cpu_reports_itself_healthy_with_host_memory() -> None:
    (row,) = read_cpu()
    assert (row.backend, row.device, row.healthy) == ("cpu", "cpu", True)
    assert row.reason == "the CPU reports itself healthy"
    assert row.memory_total_bytes is not None and 0 < (row.memory_used_bytes or 0) <= row.memory_total_bytes
    assert row.as_dict()["healthy"] is True


def test_memory_is_computed_from_pages_and_unknown_without_sysconf() -> None:
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 1000, "SC_AVPHYS_PAGES": 250}
    (row,) = read_cpu(sysconf=pages.get)
    assert (row.memory_used_bytes, row.memory_total_bytes) == (750 * 4096, 1000 * 4096)
    (row,) = read_cpu(sysconf=lambda name: None)  # a platform without sysconf: still healthy
    assert row.healthy and (row.memory_used_bytes, row.memory_total_bytes) == (None, None)


def test_the_plugin_registers_it() -> None:
    spec = hal.Registry(entry_points=False, plugins=[("cpu", hal_cpu)]).spec("cpu")
    assert spec.health is not None
    assert [r.device for r in spec.health()] == ["cpu"]
