"""HAL: one DeepSeek-style MoE+MLA model on any accelerator, through pluggable vendor backends.

Typical use::

    import hal
    be = hal.get_backend()            # HAL_BACKEND, else the highest-priority available backend
    y = be.gemm(x, w)                 # x @ w.T, validated, served by the backend's best implementation
    hal.backends()                    # every discovered backend, available or not, with its reason

Plugins are found through the ``hal`` entry-point group when first needed, never at import.
"""

from __future__ import annotations

import threading
from importlib.metadata import PackageNotFoundError, version

from hal import distributed, errors, quant
from hal.backend import Backend, OpEntry
from hal.hookspecs import hookimpl
from hal.kvcache import PagedKVCache
from hal.ops.catalogue import CATALOGUE, OPS
from hal.registry import BackendInfo, PluginInfo, Registry
from hal.serving import AutoBatcher, health
from hal.types import (
    Availability,
    BackendImpl,
    BackendSpec,
    Capabilities,
    DeviceHealth,
    MemoryStats,
    Permutation,
    RouteResult,
)

__all__ = [
    "CATALOGUE",
    "OPS",
    "AutoBatcher",
    "Availability",
    "Backend",
    "BackendImpl",
    "BackendInfo",
    "BackendSpec",
    "Capabilities",
    "DeviceHealth",
    "MemoryStats",
    "OpEntry",
    "PagedKVCache",
    "Permutation",
    "PluginInfo",
    "Registry",
    "RouteResult",
    "__version__",
    "backends",
    "default_registry",
    "distributed",
    "errors",
    "get_backend",
    "health",
    "hookimpl",
    "quant",
]

try:
    __version__ = version("hal-accel")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_lock = threading.Lock()
_default: Registry | None = None
_discovering: int | None = None  # ident of the thread creating the default registry, while it does


def default_registry(*, refresh: bool = False) -> Registry:
    """The process-wide registry, created (plugins discovered) on first use.

    :param refresh: discard the current one and discover plugins again (after installing a plugin or
        changing ``HAL_DISABLE_PLUGINS``).
    """
    global _default, _discovering
    if _discovering == threading.get_ident():
        # A plugin's hook (run during discovery) called back into hal: the lock is held by this
        # very thread, so waiting on it would deadlock.
        raise errors.BackendError(
            "hal.get_backend()/hal.backends() called while HAL is discovering plugins: "
            "hooks must not call get_backend/backends during discovery (decide in probe/load, or use "
            "a `when` predicate on the op registration)"
        )
    with _lock:
        if _default is None or refresh:
            _discovering = threading.get_ident()
            try:
                _default = Registry()
            finally:
                _discovering = None
        return _default


def backends() -> list[BackendInfo]:
    """Every discovered backend, available or not, with its probe's reason; highest priority first."""
    return default_registry().backends()


def get_backend(name: str | None = None) -> Backend:
    """The backend ``name``, else ``HAL_BACKEND``, else the highest-priority available one (built once).

    :raises hal.errors.BackendNotFoundError: no backend of that name (the message lists them all).
    :raises hal.errors.BackendUnavailableError: it cannot run here (the message gives every reason).
    :raises hal.errors.BackendLoadError: it probed available but failed to load.
    """
    return default_registry().get_backend(name)
