"""``hal info`` end to end, in subprocesses, with real entry-point discovery (example plugin included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

import hal

HAL = [sys.executable, "-m", "hal.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HAL, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def info() -> dict[str, Any]:
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_info_json_lists_cpu_available_and_vendors_with_reasons(info: dict[str, Any]) -> None:
    backends = {b["name"]: b for b in info["backends"]}
    assert backends["cpu"]["available"] and backends["cpu"]["selected"]
    assert info["selected"] == "cpu"
    for vendor in ("nvidia", "rocm", "ascend"):
        assert vendor in backends, f"{vendor} backend not discovered"
        assert backends[vendor]["available"] is False
        assert backends[vendor]["reason"], f"{vendor} is unavailable without a reason"


def test_info_json_lists_every_catalogue_op_with_its_implementation(info: dict[str, Any]) -> None:
    cpu = {b["name"]: b for b in info["backends"]}["cpu"]
    assert list(cpu["ops"]) == list(hal.OPS) == info["catalogue"]
    for op, entry in cpu["ops"].items():
        assert entry["impl"] and entry["impl"] != "-", op
        assert entry["source"] in ("native", "override"), op
    assert cpu["capabilities"]["arch"] == "cpu" and cpu["capabilities"]["dist_backend"] == "gloo"


def test_info_json_shows_plugins_with_distribution_and_version(info: dict[str, Any]) -> None:
    plugins = {p["name"]: p for p in info["plugins"]}
    assert plugins["cpu"]["distribution"] == "hal-accel" and plugins["cpu"]["version"] == hal.__version__
    assert plugins["example"]["distribution"] == "hal-example-plugin"
    assert plugins["example"]["status"] == "loaded"
    assert plugins["example"]["backends"] == ["example"] and plugins["example"]["ops"] == ["rms_norm@cpu"]


def test_example_plugin_adds_a_backend_overrides_cpu_and_falls_back(info: dict[str, Any]) -> None:
    backends = {b["name"]: b for b in info["backends"]}
    example = backends["example"]
    assert example["available"] and example["priority"] < backends["cpu"]["priority"]
    assert example["ops"]["gemm"]["source"] == "native"
    assert example["ops"]["gemm"]["impl"] == "hal_example.ops:gemm"
    assert example["ops"]["moe_route"]["source"] == "fallback"
    assert example["ops"]["memory_stats"]["source"] == "fallback"
    norm = backends["cpu"]["ops"]["rms_norm"]
    assert norm["source"] == "override" and norm["provider"] == "example"
    assert norm["impl"] == "hal_example.ops:rms_norm"


def test_disabling_the_example_plugin_removes_it_everywhere() -> None:
    proc = run("info", "--json", env={"HAL_DISABLE_PLUGINS": "example"})
    data = json.loads(proc.stdout)
    assert {p["name"]: p["status"] for p in data["plugins"]}["example"] == "blocked"
    backends = {b["name"]: b for b in data["backends"]}
    assert "example" not in backends
    assert backends["cpu"]["ops"]["rms_norm"]["source"] == "native"


def test_hal_backend_selects_the_example_backend() -> None:
    data = json.loads(run("info", "--json", env={"HAL_BACKEND": "example"}).stdout)
    assert data["selected"] == "example"


def test_human_table(info: dict[str, Any]) -> None:
    proc = run("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Plugins (entry-point group 'hal')" in out and "Backends" in out and "Selected: cpu" in out
    assert "*cpu" in out
    for op in hal.OPS:
        assert f"\n  {op} " in out, f"{op} missing from the op table"


def test_asking_for_an_unavailable_backend_fails_with_every_reason() -> None:
    proc = run("info", "--backend", "nvidia")
    assert proc.returncode == 1
    assert "backend 'nvidia' is unavailable" in proc.stderr
    for name in ("rocm", "ascend", "cpu"):
        assert f"  {name}: " in proc.stderr


def test_no_command_prints_help() -> None:
    proc = run()
    assert proc.returncode == 2 and "info" in proc.stdout


def test_plugin_raising_at_import_is_reported_not_fatal(tmp_path: Any) -> None:
    dist = tmp_path / "hal_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hal-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[hal]\nbroken = hal_broken_plugin\n")
    (tmp_path / "hal_broken_plugin.py").write_text("raise ImportError('libfoo.so: cannot open shared object file')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = run("info", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    broken = {p["name"]: p for p in data["plugins"]}["broken"]
    assert broken["status"] == "failed" and broken["distribution"] == "hal-broken"
    assert "ImportError: libfoo.so: cannot open shared object file" in broken["error"]
    assert data["selected"] == "cpu"
    assert "HAL plugin 'broken' ignored" in proc.stderr  # logged as a warning, too


def test_human_output_shows_what_each_probe_read() -> None:
    from hal.cli import format_info, info_data
    from hal.registry import Registry
    from hal.types import Availability, BackendImpl, BackendSpec

    class Plugin:
        @hal.hookimpl
        def hal_register_backends(self, register: Any) -> None:
            def load() -> BackendImpl:
                raise AssertionError("an unavailable backend is never built")

            register(
                BackendSpec(
                    name="fake-gpu",
                    priority=50,
                    probe=lambda: Availability.no(
                        "driver too old",
                        driver="535.1",
                        nvlink="all 8 GPUs connected, 18 links each, through NVSwitch",
                        telemetry=["gpu 0: 40 °C · 130 W", "gpu 1: 41 °C · 128 W"],
                        cuda=None,
                    ),
                    load=load,
                )
            )

    text = format_info(info_data(Registry(entry_points=False, plugins=[("fake-gpu", Plugin())])))
    facts = text.split("Probe facts", 1)[1]
    for line in (
        "  fake-gpu",
        "    driver: 535.1",
        "    nvlink: all 8 GPUs connected, 18 links each, through NVSwitch",
        "    telemetry: gpu 0: 40 °C · 130 W",
        "    telemetry: gpu 1: 41 °C · 128 W",
        "    cuda: -",
    ):
        assert line in facts.splitlines(), line
