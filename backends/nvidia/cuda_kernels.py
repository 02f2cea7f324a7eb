"""The NVIDIA backend's CUDA C kernels, compiled at run time by NVRTC through CuPy, tensors passed by DLPack.

One kernel so far: per-token-group FP8 quantization (``cuda/quant_fp8.cu``), the CUDA C twin of the
Triton kernel ``hal_kernels.quant.quantize_fp8``. Which of the two serves the backend's
``quantize_fp8`` is chosen when the backend is built, by the environment variable
``HAL_NVIDIA_QUANT_IMPL``:

- ``triton`` (the default): the Triton kernel;
- ``cuda``: this module's :func:`quantize_fp8`. It needs CuPy (``pip install hal-accel[nvidia]``);
  asking for it without CuPy is an error at build time, never a silent switch back to Triton.

The CUDA C kernel serves exactly DeepSeek-V3's case, groups of 128 and ``float8_e4m3fn`` (every
NVIDIA GPU with fp8, sm89 and newer), from float32, bfloat16 or float16. Called with another
``group_size`` or ``fp8_dtype`` it hands the call to the Triton kernel (no error): the backend then
uses the Triton kernel for that call, the tuned one when the backend binds it
(:func:`quantize_fp8_op`). The backend's build::

    if select_quantize_impl(os.environ) == "cuda":
        ops["quantize_fp8"] = quantize_fp8_op(fallback=ops.get("quantize_fp8"))

Importing this module imports neither CuPy nor NVRTC and touches no GPU. The first call on a device
imports CuPy, compiles the source for that device's architecture (CuPy also caches the binary on
disk, in ``~/.cupy/kernel_cache``) and keeps the module for the process. Each launch goes on torch's
current stream of the input's device; inputs and outputs cross to CuPy as DLPack views (no copy):
bfloat16 / float16 inputs as their 16-bit patterns and the fp8 output as bytes, dtypes CuPy lacks.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from hal.errors import BackendLoadError, DeviceError

__all__ = [
    "CUDA_SOURCES",
    "DEFAULT_QUANT_IMPL",
    "QUANT_IMPLS",
    "QUANT_IMPL_ENV",
    "cuda_source",
    "natively_supported",
    "quantize_fp8",
    "quantize_fp8_op",
    "require_cupy",
    "select_quantize_impl",
]

#: The environment variable that picks the backend's ``quantize_fp8``.
QUANT_IMPL_ENV = "HAL_NVIDIA_QUANT_IMPL"
#: Its values; the first is the default.
QUANT_IMPLS = ("triton", "cuda")
DEFAULT_QUANT_IMPL = QUANT_IMPLS[0]

#: The CUDA C sources under ``hal_nvidia/cuda/`` (``hal compile-check`` compiles every ``*.cu`` there).
CUDA_SOURCES = ("quant_fp8.cu",)

_INSTALL = "pip install hal-accel[nvidia]"

# The contract of cuda/quant_fp8.cu: 128-value groups, 8 warps of 32 threads per block, one group per warp.
_GROUP = 128
_WARPS = 8
_THREADS = 32 * _WARPS
_INT32_MAX = 2**31 - 1
#: Input dtype → the kernel's C name and the dtype its raw bits cross DLPack as.
_KERNELS: dict[torch.dtype, tuple[str, torch.dtype]] = {
    torch.float32: ("hal_quantize_fp8_e4m3_f32", torch.float32),
    torch.bfloat16: ("hal_quantize_fp8_e4m3_bf16", torch.int16),
    torch.float16: ("hal_quantize_fp8_e4m3_f16", torch.int16),
}


# ---------------------------------------------------------------------------------------------------
# Selection (called by the backend's build)
# ---------------------------------------------------------------------------------------------------


def select_quantize_impl(env: Mapping[str, str] | None = None, *, cupy_installed: bool | None = None) -> str:
    """Which kernel serves the NVIDIA backend's ``quantize_fp8``: ``"triton"`` or ``"cuda"``.

    :param env: the environment to read ``HAL_NVIDIA_QUANT_IMPL`` from (``None``: ``os.environ``).
        Unset or empty means ``"triton"``; case and surrounding spaces are ignored.
    :param cupy_installed: whether CuPy can be imported; ``None`` looks it up (without importing it).
    :raises BackendLoadError: an unknown value, or ``cuda`` without CuPy.
    """
    env = os.environ if env is None else env
    raw = env.get(QUANT_IMPL_ENV, "")
    value = raw.strip().lower() or DEFAULT_QUANT_IMPL
    if value not in QUANT_IMPLS:
        raise BackendLoadError(
            f"{QUANT_IMPL_ENV}={raw!r}: expected one of {', '.join(QUANT_IMPLS)} (unset means {DEFAULT_QUANT_IMPL})"
        )
    if value == "cuda":
        if cupy_installed is None:
            cupy_installed = _find_cupy()
        if not cupy_installed:
            raise BackendLoadError(
                f"{QUANT_IMPL_ENV}=cuda needs CuPy to compile the CUDA C kernel (NVRTC) and it is not installed: "
                f"{_INSTALL}, or unset {QUANT_IMPL_ENV} to use the Triton kernel"
            )
    return value


def _find_cupy() -> bool:
    try:
        return importlib.util.find_spec("cupy") is not None
    except Exception:  # a broken installation cannot serve the kernel either
        return False


# ---------------------------------------------------------------------------------------------------
# Source, CuPy, compilation
# ---------------------------------------------------------------------------------------------------


def cuda_source(name: str) -> str:
    """The text of ``hal_nvidia/cuda/<name>`` (shipped as package data)."""
    return (resources.files("hal_nvidia") / "cuda" / name).read_text(encoding="utf-8")


def require_cupy() -> Any:
    """``import cupy``, or a :class:`BackendLoadError` that says how to get it."""
    try:
        return importlib.import_module("cupy")
    except ModuleNotFoundError as exc:
        raise BackendLoadError(
            f"the NVIDIA backend's CUDA C kernels need CuPy (NVRTC and DLPack) and it is not installed: {_INSTALL}"
        ) from exc
    except Exception as exc:  # CuPy fails oddly without a matching CUDA runtime: say what it said
        raise BackendLoadError(
            f"the NVIDIA backend's CUDA C kernels need CuPy, and importing it failed ({type(exc).__name__}: {exc}); "
            f"reinstall the CuPy matching your CUDA ({_INSTALL})"
        ) from exc


@functools.cache
def _kernel(device_index: int, name: str) -> Any:
    """The compiled kernel ``name`` of ``quant_fp8.cu`` for one device, compiled on first use."""
    cupy = require_cupy()
    with cupy.cuda.Device(device_index):
        module = _module(device_index)
        try:
            return module.get_function(name)
        except Exception as exc:  # NVRTC's log is in the message: pass it on
            raise BackendLoadError(
                f"compiling cuda/quant_fp8.cu with NVRTC for CUDA device {device_index} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


@functools.cache
def _module(device_index: int) -> Any:
    # One RawModule per device: CuPy compiles a module for the architecture of the device current at
    # its first use, and a machine may mix architectures.
    return require_cupy().RawModule(code=cuda_source("quant_fp8.cu"), options=("--std=c++14",))


# ---------------------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------------------


def natively_supported(x: torch.Tensor, group_size: int, fp8_dtype: torch.dtype) -> bool:
    """Whether the CUDA C kernel itself serves this call (else :func:`quantize_fp8` hands it to Triton)."""
    return (
        group_size == _GROUP
        and fp8_dtype == torch.float8_e4m3fn
        and x.dtype in _KERNELS
        and x.dim() == 2
        and x.shape[0] <= _INT32_MAX
        and x.shape[1] <= _INT32_MAX
    )


@dataclass(frozen=True)
class _Launch:
    """One launch of the kernel, worked out from the input alone (testable without a GPU)."""

    kernel: str
    view_dtype: torch.dtype
    grid: int
    block: int
    m: int
    k: int
    groups: int
    row_stride: int
    vec: int


def _plan(x: torch.Tensor) -> _Launch:
    """The launch for ``x`` (2-D, unit column stride, a dtype of :data:`_KERNELS`)."""
    m, k = x.shape
    groups = -(-k // _GROUP)
    kernel, view_dtype = _KERNELS[x.dtype]
    row_stride = x.stride(0) if m > 1 else k
    # 4-wide accesses need 4-element alignment of every row start (x's and xq's, whose rows are K long).
    vec = int(k % 4 == 0 and row_stride % 4 == 0 and x.data_ptr() % (4 * x.element_size()) == 0)
    return _Launch(kernel, view_dtype, -(-m * groups // _WARPS), _THREADS, m, k, groups, row_stride, vec)


def quantize_fp8(
    x: torch.Tensor,
    *,
    group_size: int = _GROUP,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    fallback: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantization by the CUDA C kernel; the catalogue's ``quantize_fp8``.

    Bit-exact with the reference: ``scale = max(amax, 1e-4) / 448`` per group, values ``x / scale``
    rounded to nearest even (saturating at ±448). Any ``group_size`` other than 128 or ``fp8_dtype``
    other than ``float8_e4m3fn`` is handed to the Triton kernel (``hal_kernels.quant.quantize_fp8``).

    :param x: float32 | bfloat16 | float16 [M, K] on a CUDA device; a column stride other than 1 is
        copied to contiguous first.
    :param group_size: values per scale group; 128 runs here.
    :param fp8_dtype: ``torch.float8_e4m3fn`` runs here.
    :param fallback: what serves the other calls, with the catalogue's signature; ``None`` means
        ``hal_kernels.quant.quantize_fp8`` with its default config.
    :returns: ``(xq, scales)``: xq ``fp8_dtype [M, K]`` contiguous, scales ``float32 [M, ceil(K / group_size)]``.
    :raises DeviceError: ``x`` is not on a CUDA device.
    :raises BackendLoadError: CuPy is missing or broken, or NVRTC fails to compile the kernel.
    """
    if not natively_supported(x, group_size, fp8_dtype):
        serve = _triton_quantize_fp8() if fallback is None else fallback
        return serve(x, group_size=group_size, fp8_dtype=fp8_dtype)
    if x.device.type != "cuda":
        raise DeviceError(
            "quantize_fp8", "x", f"is on {x.device}; the NVIDIA backend's CUDA C kernel needs a CUDA tensor"
        )
    from hal_kernels._common import empty  # poisonable outputs, as every kernel's

    if x.stride(1) != 1:
        x = x.contiguous()
    plan = _plan(x)
    xq = empty([plan.m, plan.k], torch.float8_e4m3fn, x.device)
    scales = empty([plan.m, plan.groups], torch.float32, x.device)
    if plan.grid > 0:
        _launch(plan, x, xq, scales)
    return xq, scales


def quantize_fp8_op(
    fallback: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """:func:`quantize_fp8` as a backend registers it: ``fallback`` (the backend's tuned Triton
    ``quantize_fp8``; ``None``: the untuned one) bound, the name kept for ``hal info``
    (``hal_nvidia.cuda_kernels:quantize_fp8``)."""
    if fallback is None:
        return quantize_fp8
    bound = functools.partial(quantize_fp8, fallback=fallback)
    functools.update_wrapper(bound, quantize_fp8)
    return bound


def _launch(plan: _Launch, x: torch.Tensor, xq: torch.Tensor, scales: torch.Tensor) -> None:
    cupy = require_cupy()
    import numpy  # CuPy's own dependency: present wherever CuPy is

    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    kernel = _kernel(index, plan.kernel)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream, index):
        # Views, not copies: the kernel writes through xq's and scales' memory. DLPack refuses tensors
        # that require grad; the kernel only reads x.
        args = (
            cupy.from_dlpack(x.detach().view(plan.view_dtype)),
            cupy.from_dlpack(xq.view(torch.uint8)),
            cupy.from_dlpack(scales),
            numpy.int32(plan.m),
            numpy.int32(plan.k),
            numpy.int64(plan.row_stride),
            numpy.int32(plan.vec),
        )
        kernel((plan.grid,), (plan.block,), args)


def _triton_quantize_fp8() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The Triton twin, for the calls the CUDA C kernel does not serve."""
    return importlib.import_module("hal_kernels.quant").quantize_fp8
