"""Plain data that crosses the plugin boundary: probe results, capabilities, backend specs, device health,
op results.

Everything here is a frozen dataclass or a named tuple: backends build these values, the core reads
them, and ``hal info --json`` serializes them. Nothing here touches a device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

__all__ = [
    "FP8_FORMATS",
    "Availability",
    "BackendImpl",
    "BackendSpec",
    "Capabilities",
    "DeviceHealth",
    "DispatchHandle",
    "Dispatched",
    "MemoryStats",
    "Permutation",
    "RouteResult",
]

#: fp8 formats by name. ``e4m3fn`` (OCP, max 448) is what NVIDIA Hopper/Blackwell, MI350 (gfx950) and
#: DeepSeek's checkpoints use; ``e4m3fnuz`` (max 240, no negative zero, NaN = 0x80) is MI300's (gfx942).
FP8_FORMATS: Mapping[str, torch.dtype] = {
    "e4m3fn": torch.float8_e4m3fn,
    "e4m3fnuz": torch.float8_e4m3fnuz,
}


@dataclass(frozen=True)
class Availability:
    """What a backend's probe found.

    :param available: True when the backend can run on this machine now.
    :param reason: why not, in one line a user can act on (empty when available; may still say
        something useful, e.g. ``"1 device: NVIDIA H100 80GB HBM3"``).
    :param details: cheap facts the probe read (driver version, device names), shown by ``hal info``.
    """

    available: bool
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def yes(cls, reason: str = "", **details: Any) -> Availability:
        return cls(True, reason, details)

    @classmethod
    def no(cls, reason: str, **details: Any) -> Availability:
        return cls(False, reason, details)


@dataclass(frozen=True)
class Capabilities:
    """What a built backend's device can do, as data (read by op predicates and ``hal info``).

    :param device_type: torch's device type string (``"cpu"``, ``"cuda"``, ``"npu"``).
    :param device_name: human name (``"NVIDIA H100 80GB HBM3"``, ``"x86_64 CPU"``).
    :param arch: architecture key used by tuning tables (``"cpu"``, ``"sm90"``, ``"gfx942"``,
        ``"ascend910b"``).
    :param dtypes: floating dtypes the device computes in natively.
    :param fp8_format: ``"e4m3fn"``, ``"e4m3fnuz"`` or ``None`` when the device has no fp8 arithmetic.
    :param int8: True when the device has int8 matmul.
    :param memory_bytes: device memory in bytes, ``None`` when unknown.
    :param device_count: devices of this kind visible to the process.
    :param dist_backend: the torch.distributed backend name for collectives (``"gloo"``, ``"nccl"``,
        ``"hccl"``).
    :param extra: anything else worth showing (topology, driver), as strings.
    """

    device_type: str
    device_name: str
    arch: str
    dtypes: tuple[torch.dtype, ...]
    fp8_format: str | None
    int8: bool
    memory_bytes: int | None
    device_count: int
    dist_backend: str
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fp8_format is not None and self.fp8_format not in FP8_FORMATS:
            raise ValueError(
                f"Capabilities.fp8_format: expected one of {sorted(FP8_FORMATS)} or None, got {self.fp8_format!r}"
            )

    @property
    def fp8_dtype(self) -> torch.dtype | None:
        """The torch dtype of :attr:`fp8_format`, or ``None``."""
        return FP8_FORMATS[self.fp8_format] if self.fp8_format else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_type": self.device_type,
            "device_name": self.device_name,
            "arch": self.arch,
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
            "fp8_format": self.fp8_format,
            "int8": self.int8,
            "memory_bytes": self.memory_bytes,
            "device_count": self.device_count,
            "dist_backend": self.dist_backend,
            "extra": dict(self.extra),
        }


@dataclass(frozen=True)
class BackendImpl:
    """What a backend's ``load`` returns once it has been selected.

    :param device: the torch device its ops run on.
    :param capabilities: the device's capabilities.
    :param ops: op name → callable, for the ops this backend implements itself. Missing compute ops
        fall back to the reference backend's; see :mod:`hal.ops.catalogue` for each op's contract.
    """

    device: torch.device
    capabilities: Capabilities
    ops: Mapping[str, Callable[..., Any]]


@dataclass(frozen=True)
class DeviceHealth:
    """The health of one device of one backend (a row of ``hal.health()``).

    :ivar backend: the backend's name (``"nvidia"``).
    :ivar device: the device as torch spells it (``"cuda:0"``, ``"npu:1"``, ``"cpu"``), ``"-"`` when the
        backend's devices are unknown without building it.
    :ivar name: the device's name (``"NVIDIA H100 80GB HBM3"``).
    :ivar healthy: False when the driver reports a fault, the telemetry cannot be read, or the serving
        layer saw the device fail (then ``reason`` carries the error).
    :ivar reason: one line: what was read, or what is wrong.
    :ivar memory_used_bytes: / :ivar memory_total_bytes: device memory, ``None`` when unknown.
    :ivar temperature_c: degrees Celsius, ``None`` when unknown.
    :ivar utilization_pct: compute utilization in percent, ``None`` when unknown.
    :ivar power_w: power draw in watts, ``None`` when unknown.
    :ivar details: anything else read (ECC counts, driver health codes), JSON-ready.
    """

    backend: str
    device: str
    name: str
    healthy: bool
    reason: str
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    utilization_pct: float | None = None
    power_w: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": self.device,
            "name": self.name,
            "healthy": self.healthy,
            "reason": self.reason,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_total_bytes": self.memory_total_bytes,
            "temperature_c": self.temperature_c,
            "utilization_pct": self.utilization_pct,
            "power_w": self.power_w,
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class BackendSpec:
    """A backend as a plugin declares it through ``hal_register_backends``.

    :param name: unique backend name (``"cpu"``, ``"nvidia"``), what ``HAL_BACKEND`` takes.
    :param priority: higher wins when no backend is named. In-tree: nvidia 100, rocm 90, ascend 80,
        cpu 0.
    :param probe: cheap availability check. It must not import a vendor SDK's heavy modules or create
        a device context; exceptions it raises are caught and reported as the reason.
    :param load: called only after selection; imports the heavy module and returns a
        :class:`BackendImpl`.
    :param description: one line for ``hal info``.
    :param reference: True for the backend whose ops are the oracle and the fallback (``cpu``).
    :param plan: optional, ``plan(arch)`` → op name → the implementation (``"module:function"``) that
        would serve it on ``arch`` (``None``: the backend's main target), computed without a device,
        so that ``hal info`` can show an unavailable backend's op table. Ops it leaves out fall back
        to the reference.
    :param health: optional, ``health()`` → one :class:`DeviceHealth` per device of the backend, for
        ``hal.health()`` (called only while the backend is available). Cheap, driver-level facts only,
        like the probe: it must not import a compute SDK or create a device context (driver tools such
        as NVML, amdsmi or ``npu-smi`` are the right source). It may raise: the core turns the exception
        into one unhealthy row carrying the error. ``None``: one generic "available" row, no telemetry.
    """

    name: str
    priority: int
    probe: Callable[[], Availability]
    load: Callable[[], BackendImpl]
    description: str = ""
    reference: bool = False
    plan: Callable[[str | None], Mapping[str, str]] | None = None
    health: Callable[[], Sequence[DeviceHealth]] | None = None


class MemoryStats(NamedTuple):
    """Device memory in bytes; ``None`` where the device cannot tell."""

    allocated: int | None
    reserved: int | None
    peak: int | None
    total: int | None


class RouteResult(NamedTuple):
    """``moe_route``'s result.

    :ivar weights: float32 [T, top_k], the combine weights (after normalization and scaling).
    :ivar ids: int64 [T, top_k], the selected experts, distinct per token, in no particular order.
    """

    weights: torch.Tensor
    ids: torch.Tensor


class Permutation(NamedTuple):
    """``moe_permute``'s result: token rows sorted by expert (DeepGEMM's contiguous layout).

    :ivar x: [T * top_k, H], row ``r`` is token ``order[r] // top_k``.
    :ivar offsets: int64 [E + 1], expert ``e`` owns rows ``offsets[e]:offsets[e + 1]``.
    :ivar order: int64 [T * top_k], the flat index ``t * top_k + j`` each sorted row came from.
    """

    x: torch.Tensor
    offsets: torch.Tensor
    order: torch.Tensor


class Dispatched(NamedTuple):
    """``ep_dispatch``'s result on one rank: the token copies this rank's experts must process.

    One received row per (source token, this rank) pair where the token selected at least one of this
    rank's experts, ordered by source rank, then by source token index.

    In low-latency mode (``ep_dispatch(..., max_tokens_per_rank=M)``) the rows are fixed slots instead:
    ``world * M`` of them in ``world`` blocks of ``M``, this rank's own tokens first, then each other
    rank's in rank order; row ``t`` of a block is its source's token ``t``, whether or not that token
    selected one of this rank's experts. A token that did not, and a slot past the source's ``T``, has
    every id ``-1`` and every weight ``0`` (its x row is the token's, or zeros past ``T``). The tensors
    are then views of one receive buffer (rows strided by the packed row).

    :ivar x: [R, H] the received token rows (x's dtype; fp8 travels as bytes where the transport lacks it),
        unit stride in H but possibly a view with a larger row stride (the reference's packed rows).
    :ivar x_scales: float32 [R, H / 128] the rows' FP8 scales when dispatched with ``x_scales``, else ``None``.
    :ivar topk_ids: int64 [R, top_k] each row's selected experts as LOCAL ids (``global - rank * E_local``),
        ``-1`` where the expert lives on another rank.
    :ivar topk_weights: float32 [R, top_k] the matching weights, ``0`` where the expert is not local.
    :ivar handle: what ``ep_combine`` needs to send results back (opaque; keep it until combine).
    """

    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    handle: DispatchHandle


class DispatchHandle(NamedTuple):
    """The routing of one ``ep_dispatch``, for its ``ep_combine``.

    :ivar send_index: int64 [S] the source token of each row this rank sent, in send order. In
        low-latency mode: the tokens ``t`` that selected none of this rank's own experts (the combine
        ignores their own-block results).
    :ivar send_counts: rows sent to each rank (length world_size); in low-latency mode ``M`` for every
        rank (the slots; this rank's own never travel).
    :ivar recv_counts: rows received from each rank (length world_size); ``M`` each in low-latency mode.
    :ivar num_tokens: T, this rank's tokens before dispatch.
    :ivar max_tokens_per_rank: M in low-latency mode (one fixed-size exchange), ``None`` in normal mode.
    :ivar remote_ignored: low-latency mode only: the slots ``(j - 1) * M + t`` of the results coming back
        from the other ranks (``j``-th block, ranks in order without this one) whose token ``t`` selected
        none of that rank's experts; the combine ignores them.
    """

    send_index: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int
    max_tokens_per_rank: int | None = None
    remote_ignored: torch.Tensor | None = None

    @classmethod
    def low_latency(cls, skipped: torch.Tensor, rank: int, max_tokens: int) -> DispatchHandle:
        """The handle of a low-latency dispatch of ``T`` tokens in ``max_tokens`` slots per rank.

        :param skipped: bool ``[world, T]``: token ``t`` selected none of rank ``r``'s experts.
        :param rank: this rank.
        :param max_tokens: M, the slots per rank (``>= T``).
        """
        world, num_tokens = skipped.shape
        own_ignored = skipped[rank].nonzero().squeeze(1)
        others = [r for r in range(world) if r != rank]
        padded = skipped.new_zeros(len(others), max_tokens)  # slots past T come back as nothing
        padded[:, :num_tokens] = skipped[others]
        counts = [max_tokens] * world
        return cls(own_ignored, counts, counts, num_tokens, max_tokens, padded.view(-1).nonzero().squeeze(1))
