"""A built backend: its device, capabilities and op table, each op one plain callable.

Resolution happens once, when the backend is built: for every op of the catalogue the candidates are
the backend's own implementation (priority 0) and the overrides plugins registered for it (their
priority, if their capability predicate holds on this device). The highest priority wins; on a tie
the backend's own implementation wins. With no candidate, compute and collective ops fall back to the
reference backend's implementation (device-agnostic torch), and runtime ops do too when the backend
runs on the reference's device type. Every entry records which implementation serves the op and why.

The callable stored for each op is the op's contract function from :mod:`hal.ops.catalogue`, cloned
with the chosen implementation bound in: it validates its input and calls the implementation, one
Python call in all, with no argument packing. With validation turned off (``HAL_VALIDATE=0``) the
implementation itself is stored and a call costs nothing beyond it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from hal.errors import BackendLoadError, OpNotImplementedError
from hal.ops.catalogue import CATALOGUE, OpSpec
from hal.types import BackendImpl, Capabilities, Dispatched, MemoryStats, Permutation, RouteResult

if TYPE_CHECKING:
    from hal.registry import OpRegistration

__all__ = ["Backend", "OpEntry", "bind_op", "impl_name", "resolve_ops"]

Source = Literal["native", "override", "fallback", "missing"]


@dataclass(frozen=True)
class OpEntry:
    """How one op of one backend is served.

    :ivar fn: the callable the backend exposes (validation + implementation).
    :ivar impl: the implementation itself (unvalidated), for kernels that want to skip the check.
    :ivar impl_name: ``module:qualname`` or the name a plugin gave it.
    :ivar source: ``native`` (the backend's own), ``override`` (a plugin's), ``fallback`` (the
        reference's), ``missing`` (nothing can serve it; calling ``fn`` raises).
    :ivar provider: the plugin that supplied the implementation.
    :ivar reason: one line for ``hal info``.
    """

    op: str
    fn: Callable[..., Any]
    impl: Callable[..., Any]
    impl_name: str
    source: Source
    provider: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"impl": self.impl_name, "source": self.source, "provider": self.provider, "reason": self.reason}


def bind_op(spec: OpSpec, impl: Callable[..., Any]) -> Callable[..., Any]:
    """``spec``'s contract function with its ``_impl`` bound to ``impl``: validates, then calls ``impl``.

    The clone shares the contract's code and defaults; only the globals it reads ``_impl`` from differ.
    """
    contract = spec.contract
    namespace = dict(contract.__globals__)
    namespace["_impl"] = impl
    fn = types.FunctionType(
        contract.__code__, namespace, contract.__name__, contract.__defaults__, contract.__closure__
    )
    fn.__kwdefaults__ = dict(contract.__kwdefaults__) if contract.__kwdefaults__ else None
    fn.__doc__ = contract.__doc__
    fn.__qualname__ = f"Backend.{spec.name}"
    fn.__module__ = contract.__module__
    fn.__annotations__ = dict(contract.__annotations__)
    fn.__wrapped__ = impl  # type: ignore[attr-defined]
    return fn


def _missing(op: str, reason: str) -> Callable[..., Any]:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise OpNotImplementedError(f"{op}: {reason}")

    return missing


def impl_name(impl: Callable[..., Any]) -> str:
    """``module:qualname`` of a callable, for ``hal info``."""
    module = getattr(impl, "__module__", None) or "?"
    qualname = getattr(impl, "__qualname__", None) or type(impl).__name__
    return f"{module}:{qualname}"


def resolve_ops(
    *,
    backend: str,
    plugin: str,
    impl: BackendImpl,
    overrides: Sequence[OpRegistration],
    reference: BackendImpl | None,
    reference_name: str | None,
    validate: bool = True,
) -> dict[str, OpEntry]:
    """Resolve every catalogue op of one backend to an :class:`OpEntry` (see the module docstring)."""
    caps = impl.capabilities
    entries: dict[str, OpEntry] = {}
    for spec in CATALOGUE.values():
        notes: list[str] = []
        candidates: list[tuple[int, int, Source, Callable[..., Any], str, str]] = []
        if spec.name in impl.ops:
            fn = impl.ops[spec.name]
            candidates.append((0, 1, "native", fn, impl_name(fn), plugin))
        for reg in overrides:
            if reg.op != spec.name:
                continue
            ok, why = _predicate(reg, caps)
            if not ok:
                notes.append(f"skipped {reg.name} from plugin {reg.plugin!r}: {why}")
                continue
            candidates.append((reg.priority, 0, "override", reg.impl, reg.name, reg.plugin))
        if candidates:
            candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
            priority, _, source, fn, name, provider = candidates[0]
            if source == "native":
                reason = f"implemented by backend {backend!r}"
            else:
                reason = f"override from plugin {provider!r} (priority {priority})"
            losers = [f"{c[4]} (priority {c[0]})" for c in candidates[1:]]
            if losers:
                notes.append("outranked: " + ", ".join(losers))
            entries[spec.name] = _entry(spec, fn, name, source, provider, reason, notes, validate)
            continue
        lacks = f"backend {backend!r} does not implement it"
        usable = reference is not None and spec.name in reference.ops
        if usable and spec.kind == "runtime" and reference is not None:
            usable = reference.device.type == impl.device.type
            if not usable:
                raise BackendLoadError(
                    f"backend {backend!r} (plugin {plugin!r}) does not implement the runtime op {spec.name!r}, "
                    f"and the reference's ({reference_name}) serves only {reference.device.type!r} devices; "
                    f"add {spec.name!r} to the ops of its BackendImpl"
                )
        if usable and reference is not None:
            fn = reference.ops[spec.name]
            reason = f"fallback to reference {reference_name!r}: {lacks}"
            entries[spec.name] = _entry(
                spec, fn, impl_name(fn), "fallback", str(reference_name), reason, notes, validate
            )
        else:
            reason = f"no implementation: {lacks} and no reference backend is loaded (is 'cpu' blocked?)"
            fn = _missing(spec.name, reason)
            entries[spec.name] = OpEntry(spec.name, fn, fn, "-", "missing", "-", _join(reason, notes))
    return entries


def _predicate(reg: OpRegistration, caps: Capabilities) -> tuple[bool, str]:
    if reg.when is None:
        return True, ""
    try:
        ok = bool(reg.when(caps))
    except Exception as exc:  # a plugin's predicate failing must not take the backend down; say so
        return False, f"its predicate raised {type(exc).__name__}: {exc}"
    return ok, "" if ok else f"its predicate is false on {caps.arch}"


def _join(reason: str, notes: list[str]) -> str:
    return reason + ("; " + "; ".join(notes) if notes else "")


def _entry(
    spec: OpSpec,
    fn: Callable[..., Any],
    name: str,
    source: Source,
    provider: str,
    reason: str,
    notes: list[str],
    validate: bool,
) -> OpEntry:
    exposed = bind_op(spec, fn) if validate else fn
    return OpEntry(spec.name, exposed, fn, name, source, provider, _join(reason, notes))


class Backend:
    """A selected, built backend. Get one with :func:`hal.get_backend`.

    Every op of the catalogue is an attribute holding a plain callable (``be.gemm(x, w)``); its
    signature and contract are those in :mod:`hal.ops.catalogue`, and ``help(be.gemm)`` shows them.
    :attr:`table` tells which implementation serves each op and why.
    """

    name: str
    device: torch.device
    capabilities: Capabilities
    table: Mapping[str, OpEntry]

    # Typed facade over the op table (assigned per instance in __init__; see hal.ops.catalogue).
    device_count: Callable[[], int]
    synchronize: Callable[[], None]
    memory_stats: Callable[[], MemoryStats]
    empty_cache: Callable[[], None]
    pinned_empty: Callable[..., torch.Tensor]
    gemm: Callable[..., torch.Tensor]
    quantize_fp8: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    gemm_fp8: Callable[..., torch.Tensor]
    grouped_gemm: Callable[..., torch.Tensor]
    grouped_gemm_masked: Callable[..., torch.Tensor]
    grouped_gemm_fp8: Callable[..., torch.Tensor]
    grouped_gemm_fp8_masked: Callable[..., torch.Tensor]
    quantize_int8: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    gemm_int8: Callable[..., torch.Tensor]
    grouped_gemm_int8: Callable[..., torch.Tensor]
    mla_decode: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    attention_prefill: Callable[..., torch.Tensor]
    moe_route: Callable[..., RouteResult]
    moe_permute: Callable[..., Permutation]
    moe_unpermute: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    rotary: Callable[..., torch.Tensor]
    silu_and_mul: Callable[..., torch.Tensor]
    all_reduce: Callable[..., torch.Tensor]
    all_gather: Callable[..., torch.Tensor]
    reduce_scatter: Callable[..., torch.Tensor]
    all_to_all: Callable[..., torch.Tensor]
    broadcast: Callable[..., torch.Tensor]
    barrier: Callable[..., None]
    ep_dispatch: Callable[..., Dispatched]
    ep_combine: Callable[..., torch.Tensor]

    def __init__(
        self,
        name: str,
        device: torch.device,
        capabilities: Capabilities,
        table: Mapping[str, OpEntry],
        validate: bool = True,
    ) -> None:
        self.name = name
        self.validate = validate
        self.device = device
        self.capabilities = capabilities
        self.table = dict(table)
        for op, entry in self.table.items():
            setattr(self, op, entry.fn)

    def op(self, name: str) -> Callable[..., Any]:
        """The callable serving op ``name`` (same as ``getattr(backend, name)``, for names held in data)."""
        if name not in self.table:
            raise OpNotImplementedError(f"{name}: not in the op catalogue; known ops: {', '.join(self.table)}")
        return self.table[name].fn

    def __repr__(self) -> str:
        own = sum(e.source != "fallback" for e in self.table.values())
        return (
            f"<hal.Backend {self.name!r} on {self.device} ({self.capabilities.arch}), {own}/{len(self.table)} ops own>"
        )
