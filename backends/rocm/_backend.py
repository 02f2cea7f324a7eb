"""Builds the ROCm backend: the GPU device, its capabilities and the runtime ops.

Imported only by the backend's ``load``, after selection; building initializes HIP (a context on the
current device). ROCm builds of torch drive AMD GPUs under the ``cuda`` device type and the
``torch.cuda`` API, so the runtime ops go through ``torch.cuda``. Until the Triton kernels land with
their ROCm configs every compute op falls back to the reference implementation, which is
device-agnostic torch and so runs on the GPU; collectives fall back to plain ``torch.distributed``,
whose ``nccl`` backend is RCCL on ROCm.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hal.errors import BackendLoadError
from hal.types import BackendImpl, Capabilities, MemoryStats
from hal_rocm.probe import fp8_format_of

__all__ = ["RUNTIME_OPS", "arch_of_gcn_name", "build"]


# ---------------------------------------------------------------------------------------------------
# Runtime ops (signatures exactly as in hal.ops.catalogue)
# ---------------------------------------------------------------------------------------------------


def device_count() -> int:
    return torch.cuda.device_count()


def synchronize() -> None:
    torch.cuda.synchronize()


def memory_stats() -> MemoryStats:
    device = torch.cuda.current_device()
    return MemoryStats(
        allocated=torch.cuda.memory_allocated(device),
        reserved=torch.cuda.memory_reserved(device),
        peak=torch.cuda.max_memory_allocated(device),
        total=torch.cuda.get_device_properties(device).total_memory,
    )


def empty_cache() -> None:
    torch.cuda.empty_cache()


def pinned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="cpu", pin_memory=True)


#: op name → implementation, for the runtime ops of the catalogue.
RUNTIME_OPS: dict[str, Callable[..., Any]] = {
    "device_count": device_count,
    "synchronize": synchronize,
    "memory_stats": memory_stats,
    "empty_cache": empty_cache,
    "pinned_empty": pinned_empty,
}


# ---------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------


def arch_of_gcn_name(gcn_arch_name: str) -> str:
    """The tuning-table key of a HIP arch name: ``"gfx942:sramecc+:xnack-"`` → ``"gfx942"``."""
    return gcn_arch_name.split(":", 1)[0].strip()


def build() -> BackendImpl:
    """The ROCm backend on torch's current GPU.

    :raises BackendLoadError: torch is not a ROCm build or sees no GPU (``HIP_VISIBLE_DEVICES``,
        ``ROCR_VISIBLE_DEVICES``, ``CUDA_VISIBLE_DEVICES``).
    """
    if getattr(torch.version, "hip", None) is None:
        raise BackendLoadError(f"torch {torch.__version__} is not a ROCm build; install a ROCm build of torch")
    count = torch.cuda.device_count()
    if count == 0:
        visible = {
            name: os.environ[name]
            for name in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
            if name in os.environ
        }
        raise BackendLoadError(
            "torch sees no AMD GPU; check rocminfo, /dev/kfd access (the video/render groups) and the "
            f"visible-devices variables ({visible or 'none set'})"
        )
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    gcn_name = str(props.gcnArchName)  # ROCm builds only, e.g. "gfx942:sramecc+:xnack-"
    arch = arch_of_gcn_name(gcn_name)
    caps = Capabilities(
        device_type="cuda",
        device_name=props.name,
        arch=arch,
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        fp8_format=fp8_format_of(arch),
        int8=True,
        memory_bytes=int(props.total_memory),
        device_count=count,
        dist_backend="nccl",
        extra={
            "gcn_arch_name": gcn_name,
            "compute_units": str(props.multi_processor_count),
            "hip": str(torch.version.hip),
            "current_device": str(index),
        },
    )
    # ROCm torch names its device type "cuda"; the bare device follows torch.cuda.set_device.
    return BackendImpl(device=torch.device("cuda"), capabilities=caps, ops=dict(RUNTIME_OPS))
