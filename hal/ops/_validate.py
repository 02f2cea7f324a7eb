"""Small, fast checks shared by the op contracts (:mod:`hal.ops.catalogue`).

They run on every op call, so each is a handful of attribute reads: no tensor data is read (that would
synchronize an accelerator), only ranks, sizes, dtypes and devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hal.errors import DeviceError, DTypeError, OpInputError, ShapeError

FLOATS: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
FP8S: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
INDICES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " | ".join(str(d).removeprefix("torch.") for d in dtypes)


def tensor(op: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise OpInputError(op, name, f"expected a torch.Tensor, got {type(t).__name__}")
    return t


def rank(op: str, name: str, t: torch.Tensor, n: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        tensor(op, name, t)
    if t.dim() != n:
        raise ShapeError(op, name, f"expected {layout} (rank {n}), got shape {list(t.shape)}")


def dtype(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        raise DTypeError(op, name, f"expected dtype {_names(allowed)}, got {t.dtype}")


def same_dtype(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise DTypeError(op, name, f"expected the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def size(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ShapeError(op, name, f"expected size {expected} ({what}) at dim {dim}, got shape {list(t.shape)}")


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    if list(t.shape) != list(expected):
        raise ShapeError(op, name, f"expected shape {list(expected)} {layout}, got {list(t.shape)}")


def same_device(op: str, tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = tensors[0]
    dev = first.device
    for name, t in tensors[1:]:
        if t.device != dev:
            raise DeviceError(op, name, f"expected device {dev} (that of {first_name}), got {t.device}")


def out_dtype(op: str, value: torch.dtype | None, allowed: Sequence[torch.dtype]) -> None:
    if value is not None and value not in allowed:
        raise DTypeError(op, "out_dtype", f"expected {_names(allowed)} or None, got {value}")


def positive_int(op: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise OpInputError(op, name, f"expected a positive int, got {value!r}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
