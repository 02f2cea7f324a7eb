"""Small, fast checks shared by the op contracts (:mod:`hal.ops.catalogue`).

They run on every op call, so each is a handful of attribute reads: no tensor data is read (that would
synchronize an accelerator), only ranks, sizes, dtypes and devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

from hal.errors import DeviceError, DTypeError, LayoutError, OpInputError, ShapeError

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


# ---------------------------------------------------------------------------------------------------
# Value checks of index tensors (block tables, offsets, lengths, expert ids)
# ---------------------------------------------------------------------------------------------------
# Reading a tensor's values on an accelerator would synchronize it on every call, so these run only
# when the index tensor lives on the CPU: always in the reference backend and in CI, and for host-side
# metadata on any backend. On a device they are skipped and the kernel trusts its input, as FlashMLA
# and DeepGEMM do.


#: Host tensors of up to this many values are checked as Python lists (a microsecond or two); larger ones
#: by torch reductions, which cost ~10 us each on a CPU but scale.
SMALL = 256


def on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def ints_in(op: str, name: str, values: Sequence[int], lo: int, hi: int, what: str) -> None:
    """Every one of ``values`` (host ints) in ``[lo, hi)``."""
    if values:
        low, high = min(values), max(values)
        if low < lo or high >= hi:
            raise LayoutError(op, name, f"values must lie in [{lo}, {hi}) ({what}), found {low if low < lo else high}")


def values_in(op: str, name: str, t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """Every value of ``t`` in ``[lo, hi)`` (host tensors only)."""
    if t.numel() == 0 or not on_host(t):
        return
    if t.numel() <= SMALL:
        ints_in(op, name, t.reshape(-1).tolist(), lo, hi, what)
        return
    low_t, high_t = torch.aminmax(t)  # one pass, not two
    ints_in(op, name, (int(low_t), int(high_t)), lo, hi, what)


def cumulative(op: str, name: str, t: torch.Tensor, total: int, exact: bool, what: str) -> None:
    """``t`` starts at 0, never decreases, and ends at ``total`` (``exact``) or at most ``total``."""
    if not on_host(t):
        return
    if t.numel() <= SMALL:
        v = t.tolist()
        first, last, decreasing = v[0], v[-1], any(b < a for a, b in pairwise(v))
    else:
        first, last, decreasing = int(t[0]), int(t[-1]), bool((t[1:] < t[:-1]).any())
    if first != 0 or decreasing or (last != total if exact else last > total):
        end = f"end at {total}" if exact else f"end at most at {total}"
        raise LayoutError(op, name, f"must start at 0, never decrease and {end} ({what}); got {t.tolist()[:16]}")
