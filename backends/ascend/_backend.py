"""Builds the Ascend backend: the NPU device, its capabilities and its op table.

Imported only by the backend's ``load``, after selection. :func:`build` imports ``torch_npu``, which
registers the ``npu`` device type and ``torch.npu`` (it leaves ``TORCH_DEVICE_BACKEND_AUTOLOAD`` as
the user set it), and initializes the current NPU; it then imports :mod:`hal_ascend.ops`, the compute
ops through torch_npu's fused operators. Importing this module alone imports no vendor code. The
runtime ops go through ``torch.npu``; compute ops :mod:`hal_ascend.ops` does not serve fall back to the
reference implementation, which is device-agnostic torch and so runs on the NPU; collectives fall back
to plain ``torch.distributed`` over HCCL once the process group is initialized with
``capabilities.dist_backend``.

Atlas A2/A3 (910B/910C) have int8 but no fp8 arithmetic: the backend declares fp8 none and int8 yes, and
DeepSeek FP8 checkpoints load as W8A8 INT8 (``capabilities.extra["fp8_checkpoints"]``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hal.errors import BackendLoadError
from hal.types import BackendImpl, Capabilities, MemoryStats

__all__ = ["FP8_CHECKPOINTS", "RUNTIME_OPS", "arch_of_device_name", "build"]


def _npu() -> Any:
    """``torch.npu``, which exists once ``torch_npu`` has been imported (:func:`build` does that first)."""
    return torch.npu  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------
# Runtime ops (signatures exactly as in hal.ops.catalogue)
# ---------------------------------------------------------------------------------------------------


def device_count() -> int:
    return int(_npu().device_count())


def synchronize() -> None:
    _npu().synchronize()


def memory_stats() -> MemoryStats:
    npu = _npu()
    device = npu.current_device()
    total = getattr(npu.get_device_properties(device), "total_memory", None)
    if total is None:
        total = npu.mem_get_info(device)[1]
    return MemoryStats(
        allocated=int(npu.memory_allocated(device)),
        reserved=int(npu.memory_reserved(device)),
        peak=int(npu.max_memory_allocated(device)),
        total=int(total),
    )


def empty_cache() -> None:
    _npu().empty_cache()


def pinned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    # With torch_npu loaded, pin_memory page-locks through the NPU's host allocator.
    return torch.empty(tuple(shape), dtype=dtype, device="cpu", pin_memory=True)


def _unpinned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    # A backend built on the CPU (the tests' emulation) has no page-locking allocator.
    return torch.empty(tuple(shape), dtype=dtype, device="cpu")


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


def arch_of_device_name(name: str) -> str:
    """The tuning-table key of an NPU name, following CANN's SoC families.

    ``"Ascend910B3"`` → ``"ascend910b"`` (A2), ``"Ascend910_9391"`` → ``"ascend910_93"`` (A3, 910C),
    ``"Ascend950PR"`` → ``"ascend950"``, ``"Ascend310P3"`` → ``"ascend310p"``; anything else lowercased.
    """
    key = name.strip().lower().replace(" ", "")
    if key.startswith("ascend910_93"):
        return "ascend910_93"
    if key.startswith(("ascend950", "ascend910_95")):
        return "ascend950"
    m = re.fullmatch(r"(ascend\d+[a-z]*)\d*", key)
    return m.group(1) if m else key


#: What ``hal info`` says about FP8 checkpoints on this backend (capabilities.extra).
FP8_CHECKPOINTS = "DeepSeek FP8 checkpoints load as W8A8 INT8 (no fp8 arithmetic on Atlas A2/A3)"


def build(device: torch.device | None = None) -> BackendImpl:
    """The Ascend backend on torch_npu's current NPU.

    :param device: where the ops run; ``None`` means ``npu`` (the current NPU). Tests pass the CPU to
        run the backend over their emulation of torch_npu.
    :raises BackendLoadError: ``torch_npu`` fails to import (CANN missing or not sourced) or sees no NPU.
    """
    try:
        # Registers the "npu" device type and torch.npu; loads CANN's libascendcl / libhccl.
        importlib.import_module("torch_npu")
    except Exception as exc:  # CANN missing or mismatched: the error names the library, keep it
        raise BackendLoadError(
            f"import torch_npu failed ({type(exc).__name__}: {exc}); install Huawei CANN and source "
            "its set_env.sh (e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh)"
        ) from exc
    npu = _npu()
    count = int(npu.device_count())
    if count == 0:
        raise BackendLoadError("torch_npu sees no NPU; check npu-smi info and ASCEND_RT_VISIBLE_DEVICES")
    index = int(npu.current_device())
    name = str(npu.get_device_name(index))
    props = npu.get_device_properties(index)
    total = getattr(props, "total_memory", None)
    # After torch_npu: the op module imports it at import.
    from hal_ascend.ops import COMPUTE_OPS

    # The bare "npu" device follows torch.npu.set_device, as torchrun-launched code expects.
    target = torch.device("npu") if device is None else device
    caps = Capabilities(
        device_type=target.type,
        device_name=name,
        arch=arch_of_device_name(name),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        # A2/A3 (910B/910C) cube units have no fp8; fp8 paths run dequantized through the reference.
        fp8_format=None,
        int8=True,
        memory_bytes=int(total) if total is not None else int(npu.mem_get_info(index)[1]),
        device_count=count,
        dist_backend="hccl",
        extra={"current_device": str(index), "fp8_checkpoints": FP8_CHECKPOINTS},
    )
    ops: dict[str, Callable[..., Any]] = {**RUNTIME_OPS, **COMPUTE_OPS}
    if target.type == "cpu":
        ops["pinned_empty"] = _unpinned_empty
    return BackendImpl(device=target, capabilities=caps, ops=ops)
