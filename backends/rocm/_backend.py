"""Builds the ROCm backend: the GPU device, its capabilities, the runtime ops and the kernel ops.

Imported only by the backend's ``load`` (after selection) and by its ``plan`` (``hal info`` on a machine
without the GPU); importing it creates no HIP context, :func:`build` does. ROCm builds of torch drive
AMD GPUs under the ``cuda`` device type and the ``torch.cuda`` API, so the runtime ops go through
``torch.cuda``. The compute ops served by the shared Triton kernels (:mod:`hal_kernels`) are registered
with the launch configs of this backend's tuning files (``tuning/<op>.json``, keyed by ``gfxNNN``,
written for wave64 and CDNA's 64 KiB (gfx942) / 160 KiB (gfx950) of LDS; see
:mod:`hal_kernels._tuning`), the FP8 ones only where the GPU has fp8 (FNUZ e4m3 on gfx942, OCP e4m3 on
gfx950). Every other compute op falls back to the reference implementation, which is device-agnostic
torch and so runs on the GPU; collectives fall back to plain ``torch.distributed``, whose ``nccl``
backend is RCCL on ROCm.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hal.backend import impl_name
from hal.errors import BackendLoadError
from hal.types import BackendImpl, Capabilities, MemoryStats
from hal_rocm.probe import fp8_format_of

__all__ = ["DEFAULT_ARCH", "RUNTIME_OPS", "TUNING_DIR", "arch_of_gcn_name", "build", "kernel_ops_for", "plan"]


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
# Kernel ops and the plan
# ---------------------------------------------------------------------------------------------------

#: this backend's kernel tuning files, one per op (package data).
TUNING_DIR = Path(__file__).resolve().parent / "tuning"
#: the architecture :func:`plan` describes when none is asked: MI300X / MI325X.
DEFAULT_ARCH = "gfx942"


def kernel_ops_for(arch: str, fp8_format: str | None) -> dict[str, Callable[..., Any]]:
    """The Triton kernels' ops with this backend's tuning for ``arch`` bound (imports Triton); without
    fp8 arithmetic (``fp8_format`` ``None``) the FP8 ops are left to the reference."""
    from hal_kernels._tuning import backend_kernel_ops

    return backend_kernel_ops(TUNING_DIR, arch, fp8_format)


def plan(arch: str | None = None) -> Mapping[str, str]:
    """Which implementation would serve each op on ``arch`` (``gfx942`` when ``None``), without a
    device: the kernel ops as :func:`build` registers them there, and the runtime ops.

    :raises ValueError: ``arch`` is not an AMD ``gfxNNN`` architecture.
    """
    from hal_kernels._tuning import ArchPlan, normalize_arch

    key = normalize_arch(arch or DEFAULT_ARCH)
    if not key.startswith("gfx"):
        raise ValueError(f"arch {arch!r}: the rocm backend serves AMD architectures (gfx942, gfx950, …)")
    ops = {**kernel_ops_for(key, fp8_format_of(key)), **RUNTIME_OPS}
    return ArchPlan(key, {op: impl_name(fn) for op, fn in ops.items()})


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
    try:
        kernels = kernel_ops_for(arch, caps.fp8_format)
    except ImportError as exc:  # ROCm builds of torch ship Triton; a broken install says so here
        raise BackendLoadError(
            f"the Triton kernels cannot be imported ({type(exc).__name__}: {exc}); pip install 'hal-accel[rocm]'"
        ) from exc
    # ROCm torch names its device type "cuda"; the bare device follows torch.cuda.set_device.
    return BackendImpl(device=torch.device("cuda"), capabilities=caps, ops={**kernels, **RUNTIME_OPS})
