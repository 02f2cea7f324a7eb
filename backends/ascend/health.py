"""The ``ascend`` backend's device health (its ``BackendSpec.health``): every NPU, asked through ``npu-smi``.

``npu-smi info -t health -i N`` per NPU (``OK`` and ``Warning`` are healthy; ``Alarm``, ``Critical`` or
an error are not) and ``npu-smi info -t usages -i N`` for HBM capacity and usage and AI Core
utilization. ``npu-smi`` runs as a subprocess with a timeout: ``torch_npu`` is never imported and no
device context is created in this process. Without ``npu-smi`` on ``PATH``, the NPUs the probe counted
from ``/dev/davinciN`` are reported healthy, without telemetry.

The ``npu-smi`` output formats follow Huawei's documentation; this repository's CI parses simulated
output only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from hal.types import DeviceHealth
from hal_ascend.probe import NPU_SMI_TIMEOUT_S

__all__ = ["read_npu_smi"]

_BACKEND = "ascend"


def _npu_smi(args: Sequence[str]) -> str:
    path = shutil.which("npu-smi")
    if path is None:
        raise FileNotFoundError("npu-smi not on PATH")
    done = subprocess.run([path, *args], capture_output=True, text=True, timeout=NPU_SMI_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`npu-smi {' '.join(args)}` exited with {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _field(text: str, pattern: str) -> str | None:
    m = re.search(rf"^\s*{pattern}\s*:\s*(.+?)\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    return m.group(1) if m else None


def _probed_npu_ids() -> list[int]:
    """The NPU ids the probe found: ``npu-smi info -l``'s, else ``0 .. n-1`` for the ``/dev/davinciN`` nodes."""
    from hal_ascend.probe import probe

    details = probe().details
    return [int(i) for i in details.get("npu_ids") or range(int(details.get("davinci_devices") or 0))]


def read_npu_smi(
    *, run: Callable[[Sequence[str]], str] | None = None, npu_ids: Sequence[int] | None = None
) -> list[DeviceHealth]:
    """Every NPU, asked ``npu-smi info -t health`` and ``-t usages`` one by one (``npu:N`` in id order).

    :param run: runs ``npu-smi`` with the given arguments and returns its stdout (``None``: the real one,
        with a timeout); tests pass a fake.
    :param npu_ids: the NPU ids to ask about (``None``: the probe's, from ``npu-smi info -l`` or the
        ``/dev/davinciN`` nodes).
    """
    ids = _probed_npu_ids() if npu_ids is None else list(npu_ids)
    if run is None:
        if shutil.which("npu-smi") is None:
            return [
                DeviceHealth(_BACKEND, f"npu:{i}", "Ascend NPU", True, "device node present; npu-smi not on PATH")
                for i in range(len(ids))
            ]
        run = _npu_smi
    rows = []
    for index, npu in enumerate(ids):
        device = f"npu:{index}"
        try:
            text = run(["info", "-t", "health", "-i", str(npu)])
        except Exception as exc:  # the tool failing for one NPU is that NPU's problem
            why = f"npu-smi: {type(exc).__name__}: {exc}"
            rows.append(DeviceHealth(_BACKEND, device, "Ascend NPU", False, why, details={"npu_id": npu}))
            continue
        status = _field(text, r"Health(?:\s+Status)?") or "unknown"
        details: dict[str, Any] = {"npu_id": npu, "health": status}
        code = _field(text, r"Error\s+Code")
        if code and code.upper() != "NA":
            details["error_code"] = code
        healthy = status.upper() in ("OK", "WARNING")
        used = total = None
        util = None
        try:
            usage = run(["info", "-t", "usages", "-i", str(npu)])
            cap = _field(usage, r"HBM\s+Capacity\s*\(MB\)")
            rate = _field(usage, r"HBM\s+Usage\s+Rate\s*\(%\)")
            core = _field(usage, r"Aicore\s+Usage\s+Rate\s*\(%\)")
            if cap is not None:
                total = int(cap) * 2**20
                used = int(total * float(rate) / 100) if rate is not None else None
            util = float(core) if core is not None else None
        except Exception as exc:  # usage is telemetry only
            details["usages_error"] = f"{type(exc).__name__}: {exc}"
        reason = f"npu-smi health {status}" + (f", error code {code}" if "error_code" in details else "")
        rows.append(
            DeviceHealth(_BACKEND, device, "Ascend NPU", healthy, reason, used, total, None, util, None, details)
        )
    return rows
