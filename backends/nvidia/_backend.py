"""Builds the NVIDIA backend: the CUDA device, its capabilities, the runtime ops and the kernel ops.

Imported only by the backend's ``load`` (after selection) and by its ``plan`` (``hal info`` on a machine
without the GPU); importing it creates no CUDA context, :func:`build` does. The runtime ops (device
count, synchronize, memory, pinned buffers) go through ``torch.cuda``. The compute ops served by the
shared Triton kernels (:mod:`hal_kernels`) are registered with the launch configs of this backend's
tuning files (``tuning/<op>.json``, keyed by ``sm_XY``; see :mod:`hal_kernels._tuning`), the FP8 ones
only on GPUs with fp8 (sm89 and newer); ``gemm`` is cuBLAS, ``gemm_fp8`` is chosen per shape from the
measured ``tuning/gemm_choice.json`` and ``quantize_fp8`` can be the CUDA C kernel
(``HAL_NVIDIA_QUANT_IMPL=cuda``, :mod:`hal_nvidia.cuda_kernels`). Every other compute op falls back to the reference
implementation, which is device-agnostic torch and so runs on the GPU; collectives fall back to plain
``torch.distributed``, which uses NCCL once the process group is initialized with
``capabilities.dist_backend``.
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
from hal_nvidia import cublas
from hal_nvidia.cuda_kernels import quantize_fp8_op, select_quantize_impl
from hal_nvidia.gemm_choice import arch_key, gemm_chooser, load_gemm_choice, scaled_mm_blockwise_support
from hal_nvidia.probe import arch_of, fp8_format_of

__all__ = ["DEFAULT_ARCH", "RUNTIME_OPS", "TUNING_DIR", "build", "kernel_ops_for", "native_ops", "plan"]


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
#: the architecture :func:`plan` describes when none is asked: H100 / H200.
DEFAULT_ARCH = "sm_90"


def kernel_ops_for(arch: str, fp8_format: str | None) -> dict[str, Callable[..., Any]]:
    """The Triton kernels' ops with this backend's tuning for ``arch`` bound (imports Triton); without
    fp8 arithmetic (``fp8_format`` ``None``) the FP8 ops are left to the reference."""
    from hal_kernels._tuning import backend_kernel_ops

    return backend_kernel_ops(TUNING_DIR, arch, fp8_format)


def plan(arch: str | None = None) -> Mapping[str, str]:
    """Which implementation would serve each op on ``arch`` (``sm_90`` when ``None``), without a device:
    the kernel ops as :func:`build` registers them there, and the runtime ops.

    :raises ValueError: ``arch`` is not an NVIDIA ``sm_XY`` architecture.
    """
    from hal_kernels._tuning import ArchPlan, normalize_arch

    key = normalize_arch(arch or DEFAULT_ARCH)
    if not key.startswith("sm_"):
        raise ValueError(f"arch {arch!r}: the nvidia backend serves NVIDIA architectures (sm_80, sm_90, sm_100, …)")
    number = int(key.removeprefix("sm_"))
    fp8_format = fp8_format_of((number // 10, number % 10))
    # Without a device nothing can be measured or tried: the plan is what build() chooses when the
    # gemm_choice table has no entry for a shape (or _scaled_mm cannot block-scale).
    quant = select_quantize_impl(os.environ, cupy_installed=True)
    ops = {**native_ops(key, fp8_format, quantize_impl=quant, choose_fp8=None), **RUNTIME_OPS}
    return ArchPlan(key, {op: impl_name(fn) for op, fn in ops.items()})


def native_ops(
    arch: str,
    fp8_format: str | None,
    *,
    quantize_impl: str = "triton",
    choose_fp8: Callable[[int, int, int], str] | None = None,
) -> dict[str, Callable[..., Any]]:
    """Every compute op this backend serves itself on ``arch``: the Triton kernels (tuned), ``gemm``
    through cuBLAS, ``gemm_fp8`` chosen per shape by ``choose_fp8`` (``None``: the Triton kernel) and
    ``quantize_fp8`` from the CUDA C kernel when ``quantize_impl`` is ``"cuda"``
    (``HAL_NVIDIA_QUANT_IMPL``)."""
    ops = kernel_ops_for(arch, fp8_format)
    ops["gemm"] = cublas.gemm
    if "gemm_fp8" in ops:
        ops["gemm_fp8"] = cublas.fp8_gemm_op(ops["gemm_fp8"], choose_fp8)
    if quantize_impl == "cuda" and "quantize_fp8" in ops:
        ops["quantize_fp8"] = quantize_fp8_op(fallback=ops["quantize_fp8"])
    return ops


def _fp8_chooser(arch: str) -> Callable[[int, int, int], str] | None:
    """The measured cuBLAS-or-Triton choice for ``gemm_fp8`` on this GPU, or ``None`` when there is
    nothing to choose: no measured shape for ``arch``, or this torch's ``_scaled_mm`` does not
    block-scale correctly (tried once on the device)."""
    table = load_gemm_choice()
    if not table.archs.get(arch_key(arch), {}).get("fp8"):
        return None
    if scaled_mm_blockwise_support().status != "yes":
        return None
    return gemm_chooser(table, arch, kind="fp8", scaled_mm_blockwise=True)


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
    try:
        kernels = native_ops(
            caps.arch,
            caps.fp8_format,
            quantize_impl=select_quantize_impl(os.environ),
            choose_fp8=_fp8_chooser(caps.arch) if caps.fp8_format else None,
        )
    except ImportError as exc:  # CUDA builds of torch ship Triton; a broken install says so here
        raise BackendLoadError(
            f"the Triton kernels cannot be imported ({type(exc).__name__}: {exc}); pip install 'hal-accel[nvidia]'"
        ) from exc
    # The bare "cuda" device follows torch.cuda.set_device, as torchrun-launched code expects.
    return BackendImpl(device=torch.device("cuda"), capabilities=caps, ops={**kernels, **RUNTIME_OPS})
