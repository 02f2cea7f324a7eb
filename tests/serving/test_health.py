"""hal.health(), the core: each available backend's ``BackendSpec.health`` rows in backend order, a
generic row for a backend without one, a failing ``health`` as an unhealthy row, devices marked by
failover; ``hal info`` shows it all. The vendor readers are tested beside their backends
(``tests/backends/<vendor>/test_health.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import hal
import hal_cpu
from hal.cli import format_info, info_data
from hal.serving import DeviceHealth, HealthBook, format_health
from tests.serving.conftest import cpu_registry, flaky_registry


def backend(
    name: str,
    priority: int,
    health: Callable[[], Sequence[DeviceHealth]] | None,
    *,
    available: bool = True,
) -> Any:
    """A plugin declaring one backend with the given ``health`` (its load is never called here)."""

    def load() -> hal.BackendImpl:
        raise AssertionError("hal.health() must not build a backend")

    @hal.hookimpl
    def hal_register_backends(register: Any) -> None:
        probe = (lambda: hal.Availability.yes("simulated")) if available else (lambda: hal.Availability.no("gone"))
        register(hal.BackendSpec(name, priority, probe, load, description=f"{name} devices", health=health))

    return SimpleNamespace(hal_register_backends=hal_register_backends)


def registry(*plugins: tuple[str, Any]) -> hal.Registry:
    return hal.Registry(entry_points=False, plugins=list(plugins))


def row(backend: str, device: str, healthy: bool = True, reason: str = "simulated") -> DeviceHealth:
    return DeviceHealth(backend, device, f"{backend} device", healthy, reason)


def test_the_cpu_backend_reports_itself_healthy_through_its_spec() -> None:
    assert cpu_registry().spec("cpu").health is not None
    (cpu,) = hal.health(cpu_registry(), book=HealthBook())
    assert (cpu.backend, cpu.device, cpu.healthy) == ("cpu", "cpu", True)
    assert cpu.reason == "the CPU reports itself healthy"
    assert cpu.as_dict()["healthy"] is True


def test_rows_come_from_each_available_backend_in_priority_order() -> None:
    calls: list[str] = []

    def reader(name: str, devices: int) -> Callable[[], list[DeviceHealth]]:
        def read() -> list[DeviceHealth]:
            calls.append(name)
            return [row(name, f"{name}:{i}") for i in range(devices)]

        return read

    reg = registry(
        ("low", backend("low", 10, reader("low", 1))),
        ("high", backend("high", 90, reader("high", 2))),
        ("off", backend("off", 50, reader("off", 1), available=False)),
        ("bare", backend("bare", 30, None)),
    )
    rows = hal.health(reg, book=HealthBook())
    assert [(r.backend, r.device) for r in rows] == [
        ("high", "high:0"),
        ("high", "high:1"),
        ("bare", "-"),
        ("low", "low:0"),
    ]
    assert sorted(calls) == ["high", "low"]  # an unavailable backend's health is never called
    bare = rows[2]
    assert bare.healthy and bare.name == "bare devices" and bare.reason == "available: simulated"


def test_a_marked_device_is_unhealthy_until_cleared() -> None:
    book = HealthBook()
    reg = cpu_registry()
    book.mark_unhealthy("cpu", "cpu", "DeviceFailure: gone")
    (cpu,) = hal.health(reg, book=book)
    assert not cpu.healthy and cpu.reason == "marked unhealthy: DeviceFailure: gone"
    assert not book.is_healthy("cpu") and not book.is_healthy("cpu", "cpu") and book.is_healthy("cpu", "cuda:0")
    book.clear("cpu")
    assert hal.health(reg, book=book)[0].healthy


def test_a_mark_wins_over_healthy_telemetry_and_clearing_one_device_keeps_the_other() -> None:
    reg = registry(("gpu", backend("gpu", 90, lambda: [row("gpu", "cuda:0"), row("gpu", "cuda:1")])))
    book = HealthBook()
    book.mark_unhealthy("gpu", "cuda:1", "DeviceFailure: ECC")
    book.mark_unhealthy("gpu", "cuda:0", "DeviceFailure: hang")
    book.clear("gpu", "cuda:0")
    rows = hal.health(reg, book=book)
    assert [(r.device, r.healthy, r.reason) for r in rows] == [
        ("cuda:0", True, "simulated"),
        ("cuda:1", False, "marked unhealthy: DeviceFailure: ECC"),
    ]


def test_a_backend_without_health_gets_a_row_and_marks_name_its_device() -> None:
    reg, _ = flaky_registry(None)
    assert reg.spec("flaky").health is None
    book = HealthBook()
    rows = {r.backend: r for r in hal.health(reg, book=book)}
    assert rows["flaky"].healthy and rows["flaky"].device == "-" and "available" in rows["flaky"].reason
    book.mark_unhealthy("flaky", "cpu", "DeviceFailure: injected")
    book.mark_unhealthy("gone", "cuda:3", "lost")  # a backend no longer registered still shows up
    rows = {r.backend: r for r in hal.health(reg, book=book)}
    assert (rows["flaky"].device, rows["flaky"].healthy) == ("cpu", False)
    assert (rows["gone"].device, rows["gone"].healthy) == ("cuda:3", False)
    assert rows["cpu"].healthy


def test_a_health_that_raises_is_one_unhealthy_row_and_the_others_still_report() -> None:
    def broken() -> list[DeviceHealth]:
        raise OSError("driver did not answer")

    reg = registry(("cpu", hal_cpu), ("gpu", backend("gpu", 90, broken)))
    gpu, cpu = hal.health(reg, book=HealthBook())
    assert (gpu.backend, gpu.device, gpu.healthy) == ("gpu", "-", False)
    assert gpu.reason == "telemetry failed: OSError: driver did not answer"
    assert cpu.backend == "cpu" and cpu.healthy


def test_a_health_returning_something_else_is_an_unhealthy_row() -> None:
    reg = registry(
        ("dicts", backend("dicts", 20, lambda: [{"backend": "dicts"}])),  # type: ignore[list-item]
        ("none", backend("none", 10, lambda: None)),  # type: ignore[arg-type,return-value]
    )
    dicts, none = hal.health(reg, book=HealthBook())
    assert not dicts.healthy and dicts.reason == "telemetry failed: health() returned dict rows, not hal.DeviceHealth"
    assert not none.healthy and none.reason == (
        "telemetry failed: health() returned NoneType, not a sequence of hal.DeviceHealth"
    )


def test_hal_info_shows_device_health() -> None:
    data = info_data(cpu_registry())
    assert [h["backend"] for h in data["health"]] == ["cpu"] and data["health"][0]["healthy"] is True
    text = format_info(data)
    assert "Device health (hal.health())" in text
    assert "cpu cpu  healthy" in text and "the CPU reports itself healthy" in text
    lines = format_health([DeviceHealth("nvidia", "cuda:1", "H100", False, "NVML: GpuIsLost", None, None, 81.0)])
    assert lines[1] == "  nvidia cuda:1  UNHEALTHY  H100 · 81 C · NVML: GpuIsLost"


def test_device_health_is_importable_from_its_old_and_new_homes() -> None:
    from hal.serving.health import DeviceHealth as from_serving
    from hal.types import DeviceHealth as from_types

    assert hal.DeviceHealth is from_types is from_serving is DeviceHealth
