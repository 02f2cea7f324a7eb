"""Builds the CPU backend: device, capabilities and the op table (reference ops + CPU runtime)."""

from __future__ import annotations

import os
import platform

import torch

from hal.types import BackendImpl, Capabilities
from hal_cpu import runtime
from hal_cpu.reference import REFERENCE_OPS


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine() or 'unknown'} CPU"


def build() -> BackendImpl:
    caps = Capabilities(
        device_type="cpu",
        device_name=_cpu_name(),
        arch="cpu",
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        # The CPU has no fp8 arithmetic, but the reference emulates e4m3fn exactly (fp8 values
        # upcast to fp32), which is what makes it the fp8 oracle.
        fp8_format="e4m3fn",
        int8=True,
        memory_bytes=runtime.total_memory(),
        device_count=1,
        dist_backend="gloo",
        extra={"threads": str(torch.get_num_threads()), "cores": str(os.cpu_count() or 0)},
    )
    ops = {**REFERENCE_OPS, **runtime.RUNTIME_OPS}
    return BackendImpl(device=torch.device("cpu"), capabilities=caps, ops=ops)
