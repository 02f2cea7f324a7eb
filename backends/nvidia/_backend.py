"""Builds the NVIDIA backend: the CUDA device, its capabilities and the runtime ops.

Imported only by the backend's ``load``, after selection; building initializes CUDA (a context on
the current device). Only the runtime ops (device count, synchronize, memory, pinned buffers) are
implemented here, through ``torch.cuda``. Until the CUDA and Triton kernels land every compute op
falls back to the reference implementation, which is device-agnostic torch and so runs on the GPU;
collectives fall back to plain ``torch.distributed``, which uses NCCL once the process group is
initialized with ``capabilities.dist_backend``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hal.errors import BackendLoadError
from hal.types import BackendImpl, Capabilities, MemoryStats
from hal_nvidia.probe import arch_of, fp8_format_of

__all__ = ["RUNTIME_OPS", "build"]


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


def build() -> BackendImpl:
    """The NVIDIA backend on torch's current CUDA device.

    :raises BackendLoadError: torch is not a CUDA build or sees no device (``CUDA_VISIBLE_DEVICES``).
    """
    if torch.version.cuda is None or getattr(torch.version, "hip", None) is not None:
        raise BackendLoadError(f"torch {torch.__version__} is not a CUDA build; install a CUDA build of torch")
    count = torch.cuda.device_count()
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise BackendLoadError(
            "torch sees no CUDA device; check nvidia-smi and CUDA_VISIBLE_DEVICES "
            f"({'unset' if visible is None else repr(visible)})"
        )
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    cc = (props.major, props.minor)
    # bf16 arithmetic needs Ampere (sm80) or newer; older GPUs would emulate it slowly.
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if cc >= (8, 0) else (torch.float32, torch.float16)
    caps = Capabilities(
        device_type="cuda",
        device_name=props.name,
        arch=arch_of(cc),
        dtypes=dtypes,
        fp8_format=fp8_format_of(cc),
        int8=True,
        memory_bytes=int(props.total_memory),
        device_count=count,
        dist_backend="nccl",
        extra={
            "compute_capability": f"{cc[0]}.{cc[1]}",
            "multiprocessors": str(props.multi_processor_count),
            "cuda": str(torch.version.cuda),
            "current_device": str(index),
        },
    )
    # The bare "cuda" device follows torch.cuda.set_device, as torchrun-launched code expects.
    return BackendImpl(device=torch.device("cuda"), capabilities=caps, ops=dict(RUNTIME_OPS))
