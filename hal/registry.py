"""Plugin discovery, validation and backend selection.

A :class:`Registry` owns one pluggy ``PluginManager``. It loads every plugin of the ``hal`` entry-point
group (or only the plugins it is handed), calls each plugin's hooks once with a ``register`` callback,
and validates what the plugin registers. A plugin that fails to import, has an unknown hook, or
registers something malformed is recorded as failed with its error and ignored as a whole; the other
plugins are unaffected. ``HAL_DISABLE_PLUGINS=name,name`` blocks plugins by entry-point name.

Backends are probed lazily (first :meth:`Registry.backends`) and built lazily (first
:meth:`Registry.get_backend` for that name); each only once per registry. Building resolves every op
of the catalogue to one plain callable (:mod:`hal.backend`): pluggy is not involved after that.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pluggy
import torch

from hal import hookspecs
from hal.backend import Backend, impl_name, resolve_ops
from hal.errors import (
    BackendLoadError,
    BackendNotFoundError,
    BackendUnavailableError,
    PluginLoadError,
    PluginValidationError,
)
from hal.ops.catalogue import CATALOGUE, OpSpec
from hal.types import Availability, BackendImpl, BackendSpec, Capabilities

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendInfo",
    "OpRegistration",
    "PluginInfo",
    "RegisterBackend",
    "RegisterOp",
    "Registry",
    "check_impl_signature",
    "disabled_from_env",
    "validate_from_env",
]

log = logging.getLogger("hal")

ENTRY_POINT_GROUP = "hal"
_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


class RegisterBackend(Protocol):
    """The callback ``hal_register_backends`` receives."""

    def __call__(self, spec: BackendSpec) -> None: ...


class RegisterOp(Protocol):
    """The callback ``hal_register_ops`` receives."""

    def __call__(
        self,
        op: str,
        impl: Callable[..., Any],
        *,
        backend: str,
        priority: int = 1,
        when: Callable[[Capabilities], bool] | None = None,
        name: str | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class PluginInfo:
    """A discovered plugin and what became of it.

    :ivar status: ``loaded``, ``blocked`` (``HAL_DISABLE_PLUGINS``) or ``failed`` (see ``error``).
    :ivar backends: names of the backends it registered.
    :ivar ops: ``"op@backend"`` for each op implementation it registered.
    """

    name: str
    distribution: str | None
    version: str | None
    status: Literal["loaded", "blocked", "failed"]
    error: str | None = None
    backends: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "backends": list(self.backends),
            "ops": list(self.ops),
        }


@dataclass(frozen=True)
class BackendInfo:
    """A registered backend and its probe result (no device touched)."""

    name: str
    priority: int
    plugin: str
    available: bool
    reason: str
    description: str
    reference: bool
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OpRegistration:
    """One op implementation a plugin added to a backend through ``hal_register_ops``."""

    op: str
    impl: Callable[..., Any]
    backend: str
    priority: int
    when: Callable[[Capabilities], bool] | None
    name: str
    plugin: str


def validate_from_env() -> bool:
    """False when ``HAL_VALIDATE`` is ``0``, ``false``, ``off`` or ``no``; True otherwise."""
    return os.environ.get("HAL_VALIDATE", "1").strip().lower() not in ("0", "false", "off", "no")


def disabled_from_env() -> frozenset[str]:
    """Plugin names listed in ``HAL_DISABLE_PLUGINS`` (comma- or space-separated)."""
    raw = os.environ.get("HAL_DISABLE_PLUGINS", "")
    return frozenset(n for n in re.split(r"[,\s]+", raw) if n)


def check_impl_signature(spec: OpSpec, impl: Callable[..., Any]) -> str | None:
    """Why ``impl`` cannot be called the way the table calls it (``None`` when it can).

    The table passes positional-or-keyword parameters positionally and keyword-only ones by keyword,
    exactly as the catalogue declares them.
    """
    try:
        sig = inspect.signature(impl)
    except (TypeError, ValueError):
        return None  # builtins and C callables without a signature: trust them
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for p in spec.signature.parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[p.name] = None
        else:
            args.append(None)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        return f"implementation {impl_name(impl)}{sig} cannot take {spec.name}{spec.signature}: {exc}"
    return None


class Registry:
    """Discovered plugins, their backends and op implementations; builds and caches backends.

    :param entry_points: load every plugin of the ``hal`` entry-point group now.
    :param disabled: plugin names to block; ``None`` means read ``HAL_DISABLE_PLUGINS``.
    :param plugins: extra plugins (modules or objects with hookimpls) to register by hand, as
        ``(name, plugin)`` pairs; tests and embedding applications use this instead of globals.
    :param validate: check every op's input against its contract (the default). ``False`` binds the
        implementations directly, saving a few tensor attribute reads per call (about 0.5-1 µs on a
        CPU) at the price of unchecked input reaching kernels; ``None`` means read ``HAL_VALIDATE``
        (``0``, ``false``, ``off`` or ``no`` turn it off).
    """

    def __init__(
        self,
        *,
        entry_points: bool = True,
        disabled: Iterable[str] | None = None,
        plugins: Iterable[tuple[str, object]] = (),
        validate: bool | None = None,
    ) -> None:
        self.validate = validate_from_env() if validate is None else validate
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._disabled = frozenset(disabled) if disabled is not None else disabled_from_env()
        self._plugins: dict[str, PluginInfo] = {}
        self._specs: dict[str, tuple[BackendSpec, str]] = {}
        self._op_regs: list[OpRegistration] = []
        self._probes: dict[str, Availability] = {}
        self._built: dict[str, Backend] = {}
        self._impls: dict[str, BackendImpl] = {}
        self._load_errors: dict[str, BackendLoadError] = {}
        # Guards probing, loading and building so concurrent callers probe, load and build once.
        self._lock = threading.RLock()
        if entry_points:
            self.load_entry_points()
        for name, plugin in plugins:
            self.register(plugin, name)

    # ------------------------------------------------------------------------------------------
    # Plugins
    # ------------------------------------------------------------------------------------------

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load and register every plugin of entry-point ``group``; failures are recorded, not raised."""
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            if ep.name in self._plugins:
                other = self._plugins[ep.name]
                self._fail(
                    ep.name,
                    dist_name,
                    version,
                    PluginValidationError(
                        ep.name, f"name already taken by distribution {other.distribution!r}; rename the entry point"
                    ),
                )
                continue
            if ep.name in self._disabled:
                self._plugins[ep.name] = PluginInfo(ep.name, dist_name, version, "blocked")
                continue
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as exc:  # a plugin's import may fail in any way; report it, go on
                self._fail(
                    ep.name,
                    dist_name,
                    version,
                    PluginLoadError(ep.name, f"importing {ep.value!r} raised {type(exc).__name__}: {exc}"),
                )
                continue
            self.register(plugin, ep.name, distribution=dist_name, version=version)

    def register(
        self, plugin: object, name: str, *, distribution: str | None = None, version: str | None = None
    ) -> PluginInfo:
        """Register one plugin by hand and run its hooks; returns what became of it (never raises)."""
        if name in self._plugins:
            return self._fail(
                name, distribution, version, PluginValidationError(name, "a plugin of this name is already registered")
            )
        if name in self._disabled:
            info = PluginInfo(name, distribution, version, "blocked")
            self._plugins[name] = info
            return info
        try:
            self._pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            return self._fail(name, distribution, version, PluginValidationError(name, str(exc)))
        except ValueError as exc:  # pluggy: this object is already registered (under another name)
            other = self._pm.get_name(plugin)
            why = f"this plugin object is already registered as {other!r}" if other else str(exc)
            return self._fail(name, distribution, version, PluginValidationError(name, why))
        try:
            specs, regs = self._collect(plugin, name)
        except PluginValidationError as exc:
            self._pm.unregister(plugin)
            return self._fail(name, distribution, version, exc)
        except (Exception, SystemExit) as exc:  # a hook body raised: the plugin is broken, the others are not
            self._pm.unregister(plugin)
            return self._fail(
                name, distribution, version, PluginValidationError(name, f"a hook raised {type(exc).__name__}: {exc}")
            )
        for spec in specs:
            self._specs[spec.name] = (spec, name)
        self._op_regs.extend(regs)
        self._built.clear()
        info = PluginInfo(
            name,
            distribution,
            version,
            "loaded",
            backends=tuple(s.name for s in specs),
            ops=tuple(f"{r.op}@{r.backend}" for r in regs),
        )
        self._plugins[name] = info
        return info

    def _fail(self, name: str, dist: str | None, version: str | None, exc: Exception) -> PluginInfo:
        log.warning("HAL plugin %r ignored: %s", name, exc)
        info = PluginInfo(name, dist, version, "failed", error=str(exc))
        self._plugins.setdefault(name, info)
        return info

    def _collect(self, plugin: object, plugin_name: str) -> tuple[list[BackendSpec], list[OpRegistration]]:
        """Run one plugin's hooks with validating callbacks; all-or-nothing."""
        for caller in self._pm.get_hookcallers(plugin) or []:
            if not caller.has_spec():
                known = ", ".join(n for n in dir(hookspecs) if n.startswith("hal_"))
                raise PluginValidationError(plugin_name, f"unknown hook {caller.name!r}; known hooks: {known}")
        specs: list[BackendSpec] = []
        regs: list[OpRegistration] = []

        def register_backend(spec: BackendSpec) -> None:
            if not isinstance(spec, BackendSpec):
                raise PluginValidationError(
                    plugin_name, f"register() takes a hal.BackendSpec, got {type(spec).__name__}"
                )
            if not isinstance(spec.name, str) or not _NAME.match(spec.name):
                raise PluginValidationError(plugin_name, f"backend name {spec.name!r} must match {_NAME.pattern}")
            if not isinstance(spec.priority, int) or isinstance(spec.priority, bool):
                raise PluginValidationError(
                    plugin_name, f"backend {spec.name!r}: priority must be an int, got {spec.priority!r}"
                )
            if not callable(spec.probe) or not callable(spec.load):
                raise PluginValidationError(plugin_name, f"backend {spec.name!r}: probe and load must be callables")
            if spec.health is not None and not callable(spec.health):
                raise PluginValidationError(
                    plugin_name,
                    f"backend {spec.name!r}: health must be a callable returning hal.DeviceHealth rows, or None; "
                    f"got {type(spec.health).__name__}",
                )
            if spec.name in self._specs or any(s.name == spec.name for s in specs):
                owner = self._specs[spec.name][1] if spec.name in self._specs else plugin_name
                raise PluginValidationError(
                    plugin_name, f"backend {spec.name!r} is already registered by plugin {owner!r}"
                )
            if spec.reference and any(s.reference for s, _ in self._specs.values()):
                raise PluginValidationError(
                    plugin_name, f"backend {spec.name!r} claims to be the reference; one already is"
                )
            specs.append(spec)

        def register_op(
            op: str,
            impl: Callable[..., Any],
            *,
            backend: str,
            priority: int = 1,
            when: Callable[[Capabilities], bool] | None = None,
            name: str | None = None,
        ) -> None:
            if op not in CATALOGUE:
                close = difflib.get_close_matches(str(op), CATALOGUE, n=3)
                hint = f"did you mean {', '.join(close)}?" if close else f"known ops: {', '.join(CATALOGUE)}"
                raise PluginValidationError(plugin_name, f"op {op!r} is not in the catalogue ({hint})")
            if not callable(impl):
                raise PluginValidationError(plugin_name, f"op {op!r}: impl must be callable, got {type(impl).__name__}")
            if not isinstance(priority, int) or isinstance(priority, bool):
                raise PluginValidationError(plugin_name, f"op {op!r}: priority must be an int, got {priority!r}")
            if when is not None and not callable(when):
                raise PluginValidationError(plugin_name, f"op {op!r}: when must be a predicate (Capabilities) -> bool")
            problem = check_impl_signature(CATALOGUE[op], impl)
            if problem:
                raise PluginValidationError(plugin_name, f"op {op!r}: {problem}")
            regs.append(OpRegistration(op, impl, backend, priority, when, name or impl_name(impl), plugin_name))

        callbacks: dict[str, Any] = {
            "hal_register_backends": register_backend,
            "hal_register_ops": register_op,
        }
        for hook_name, callback in callbacks.items():
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(**{arg: callback for arg in impl.argnames if arg == "register"})
        return specs, regs

    def plugins(self) -> list[PluginInfo]:
        """Every plugin seen: loaded, blocked or failed, sorted by name."""
        return [self._plugins[n] for n in sorted(self._plugins)]

    # ------------------------------------------------------------------------------------------
    # Backends
    # ------------------------------------------------------------------------------------------

    def _probe(self, name: str) -> Availability:
        with self._lock:
            return self._probe_locked(name)

    def _probe_locked(self, name: str) -> Availability:
        if name not in self._probes:
            spec = self._specs[name][0]
            try:
                result = spec.probe()
                if not isinstance(result, Availability):
                    result = Availability.no(f"probe returned {type(result).__name__}, not hal.Availability")
            except Exception as exc:  # probes touch vendor libraries that fail in odd ways
                result = Availability.no(f"probe raised {type(exc).__name__}: {exc}")
            self._probes[name] = result
        return self._probes[name]

    def backends(self) -> list[BackendInfo]:
        """Every registered backend, available or not, highest priority first."""
        infos = []
        for name, (spec, plugin) in self._specs.items():
            avail = self._probe(name)
            infos.append(
                BackendInfo(
                    spec.name,
                    spec.priority,
                    plugin,
                    avail.available,
                    avail.reason,
                    spec.description,
                    spec.reference,
                    dict(avail.details),
                )
            )
        return sorted(infos, key=lambda b: (-b.priority, b.name))

    def spec(self, name: str) -> BackendSpec:
        """The :class:`~hal.types.BackendSpec` registered as ``name`` (nothing is probed or built).

        :raises BackendNotFoundError: no backend of that name, with every registered backend's state.
        """
        if name not in self._specs:
            raise self._not_found(name)
        return self._specs[name][0]

    def _not_found(self, name: str, *, from_env: bool = False) -> BackendNotFoundError:
        source = " (from HAL_BACKEND)" if from_env else ""
        blocked = " (its plugin is blocked by HAL_DISABLE_PLUGINS)" if name in self._disabled else ""
        msg = f"no backend named {name!r}{source}{blocked}. Registered backends:\n{self._reasons()}"
        failed = [p for p in self.plugins() if p.status == "failed"]
        if failed:
            msg += "\nPlugins that failed to load:\n" + "\n".join(f"  {p.name}: {p.error}" for p in failed)
        return BackendNotFoundError(msg)

    def _reasons(self) -> str:
        lines = [
            f"  {b.name}: {'available' if b.available else 'unavailable'}" + (f" ({b.reason})" if b.reason else "")
            for b in self.backends()
        ]
        return "\n".join(lines) if lines else "  (no backend registered: is the hal-accel package installed?)"

    def select(self, name: str | None = None) -> str:
        """The backend name ``get_backend(name)`` would build: ``name``, else ``HAL_BACKEND``, else the
        highest-priority available backend. Raises with every backend's reason when that is impossible.
        """
        env = os.environ.get("HAL_BACKEND", "").strip()
        wanted = name or env or None
        if wanted is not None:
            if wanted not in self._specs:
                raise self._not_found(wanted, from_env=not name)
            if not self._probe(wanted).available:
                raise BackendUnavailableError(
                    f"backend {wanted!r} is unavailable: {self._probe(wanted).reason}\nAll backends:\n{self._reasons()}"
                )
            return wanted
        for info in self.backends():
            if info.available:
                return info.name
        raise BackendUnavailableError(f"no available backend. Backends and reasons:\n{self._reasons()}")

    def get_backend(self, name: str | None = None) -> Backend:
        """Build (once) and return a backend; see :meth:`select` for which."""
        with self._lock:
            chosen = self.select(name)
            if chosen not in self._built:
                self._built[chosen] = self._build(chosen)
            return self._built[chosen]

    def _reference_name(self) -> str | None:
        return next((name for name, (spec, _) in self._specs.items() if spec.reference), None)

    def reference_ops(self) -> Mapping[str, Callable[..., Any]]:
        """The reference backend's own ops (no plugin override): the conformance kit's oracle."""
        name = self._reference_name()
        if name is None:
            raise BackendNotFoundError("no reference backend is registered (is the 'cpu' plugin blocked?)")
        return self._load(name).ops

    def _load(self, name: str) -> BackendImpl:
        with self._lock:
            return self._load_locked(name)

    def _load_locked(self, name: str) -> BackendImpl:
        spec, plugin = self._specs[name]
        if name in self._impls:
            return self._impls[name]
        if name in self._load_errors:
            raise self._load_errors[name]
        try:
            impl = spec.load()
        except Exception as exc:
            err = BackendLoadError(f"backend {name!r} (plugin {plugin!r}) failed to load: {type(exc).__name__}: {exc}")
            self._load_errors[name] = err
            raise err from exc
        problems = _check_backend_impl(impl)
        if problems:
            err = BackendLoadError(
                f"backend {name!r} (plugin {plugin!r}) returned an invalid BackendImpl:\n  " + "\n  ".join(problems)
            )
            self._load_errors[name] = err
            raise err
        self._impls[name] = impl
        return impl

    def _build(self, name: str) -> Backend:
        plugin = self._specs[name][1]
        impl = self._load(name)
        reference: BackendImpl | None = None
        ref_name = self._reference_name()
        if ref_name is not None:
            reference = impl if ref_name == name else self._load(ref_name)
        entries = resolve_ops(
            backend=name,
            plugin=plugin,
            impl=impl,
            overrides=[r for r in self._op_regs if r.backend == name],
            reference=reference,
            reference_name=ref_name,
            validate=self.validate,
        )
        return Backend(name, impl.device, impl.capabilities, entries, self.validate)


def _check_backend_impl(impl: object) -> list[str]:
    if not isinstance(impl, BackendImpl):
        return [f"load() must return hal.BackendImpl, got {type(impl).__name__}"]
    problems = []
    if not isinstance(impl.device, torch.device):
        problems.append(f"device must be a torch.device, got {impl.device!r}")
    if not isinstance(impl.capabilities, Capabilities):
        problems.append(f"capabilities must be hal.Capabilities, got {type(impl.capabilities).__name__}")
    if not isinstance(impl.ops, Mapping):
        problems.append(f"ops must be a Mapping[str, callable], got {type(impl.ops).__name__}")
        return problems
    for op, fn in impl.ops.items():
        if op not in CATALOGUE:
            problems.append(f"op {op!r} is not in the catalogue")
        elif not callable(fn):
            problems.append(f"op {op!r} is not callable")
        else:
            problem = check_impl_signature(CATALOGUE[op], fn)
            if problem:
                problems.append(f"op {op!r}: {problem}")
    return problems
