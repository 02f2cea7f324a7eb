"""The ascend backend's health reader on simulated ``npu-smi`` output, and through the plugin's
``BackendSpec.health`` with a stand-in ``npu-smi`` on ``PATH``."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import hal
import hal_ascend
import hal_ascend.probe
from hal.types import Availability
from hal_ascend.health import read_npu_smi

HEALTH = {
    "0": "        Health Status                  : OK\n        Error Code                     : NA\n",
    "1": "        Health Status                  : Alarm\n        Error Code                     : 80E18005\n",
}
USAGES = (
    "        HBM Capacity(MB)               : 65536\n        HBM Usage Rate(%)              : 25\n"
    "        Aicore Usage Rate(%)           : 60\n"
)


def test_npu_smi_reader_on_simulated_npus() -> None:
    calls: list[list[str]] = []

    def run(args: Sequence[str]) -> str:
        calls.append(list(args))
        if args[2] == "health":
            if args[4] == "4":
                raise RuntimeError("`npu-smi info -t health -i 4` exited with 255: device not found")
            return HEALTH[args[4]]
        return USAGES

    ok, alarm, missing = read_npu_smi(run=run, npu_ids=[0, 1, 4])
    assert (ok.backend, ok.device, ok.healthy, ok.reason) == ("ascend", "npu:0", True, "npu-smi health OK")
    assert (ok.memory_total_bytes, ok.memory_used_bytes, ok.utilization_pct) == (65536 * 2**20, 16384 * 2**20, 60.0)
    assert not alarm.healthy and alarm.reason == "npu-smi health Alarm, error code 80E18005"
    assert alarm.details["error_code"] == "80E18005"
    assert (missing.device, missing.healthy) == ("npu:2", False) and "device not found" in missing.reason
    assert calls[0] == ["info", "-t", "health", "-i", "0"]


def test_a_failing_usages_query_is_a_detail_not_a_fault() -> None:
    def run(args: Sequence[str]) -> str:
        if args[2] == "usages":
            raise TimeoutError("npu-smi did not answer")
        return HEALTH["0"]

    (row,) = read_npu_smi(run=run, npu_ids=[0])
    assert row.healthy and row.memory_total_bytes is None
    assert row.details["usages_error"] == "TimeoutError: npu-smi did not answer"


def test_without_npu_smi_the_probes_device_nodes_are_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no npu-smi
    probed = Availability.yes("2 NPUs (/dev/davinci*; npu-smi not on PATH)", davinci_devices=2)
    monkeypatch.setattr(hal_ascend.probe, "probe", lambda: probed)
    rows = read_npu_smi()
    assert [(r.device, r.healthy) for r in rows] == [("npu:0", True), ("npu:1", True)]
    assert rows[0].reason == "device node present; npu-smi not on PATH"


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_the_plugin_runs_npu_smi_for_the_npus_it_lists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``spec.health()``: the probe's ``npu-smi info -l`` ids, then ``-t health`` / ``-t usages`` per NPU,
    through the real subprocess runner; ``torch_npu`` is never imported."""
    for name, text in {"list": "\tTotal Count : 2\n\tNPU ID : 3\n\tNPU ID : 5\n", "usages": USAGES}.items():
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "health.txt").write_text(HEALTH["0"], encoding="utf-8")
    _script(
        tmp_path / "npu-smi",
        f'case "$*" in\n  "info -l") cat "{tmp_path}/list.txt";;\n'
        f'  "info -t health -i 3") cat "{tmp_path}/health.txt";;\n'
        f'  "info -t usages -i 3") cat "{tmp_path}/usages.txt";;\n'
        '  *) echo "no device $*" >&2; exit 255;;\nesac\n',
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delitem(sys.modules, "hal_ascend.health", raising=False)
    spec = hal.Registry(entry_points=False, plugins=[("ascend", hal_ascend)]).spec("ascend")
    assert spec.health is not None and "hal_ascend.health" not in sys.modules
    first, second = spec.health()
    assert (first.device, first.healthy, first.details["npu_id"], first.utilization_pct) == ("npu:0", True, 3, 60.0)
    assert (second.device, second.healthy, second.details["npu_id"]) == ("npu:1", False, 5)
    assert "exited with 255: no device info -t health -i 5" in second.reason
    assert "torch_npu" not in sys.modules
