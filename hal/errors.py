"""The one exception hierarchy of HAL.

Every error HAL raises on purpose derives from :class:`HALError`. Input errors also derive from the
built-in exception a Python user would expect (``ValueError``, ``TypeError``), so ``except ValueError``
keeps working. Messages name the op (or plugin, or backend), what was expected, what was given and,
where there is one, the remedy.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendLoadError",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "BenchError",
    "CollectiveError",
    "DTypeError",
    "DeviceError",
    "DeviceFailure",
    "HALError",
    "KVCacheError",
    "KVCacheExhaustedError",
    "LayoutError",
    "OpInputError",
    "OpNotImplementedError",
    "PluginError",
    "PluginLoadError",
    "PluginValidationError",
    "ShapeError",
]


class HALError(Exception):
    """Base class of every error HAL raises on purpose."""


# ---------------------------------------------------------------------------------------------------
# Bad input at an op boundary
# ---------------------------------------------------------------------------------------------------


class OpInputError(HALError, ValueError):
    """An op was called with an argument that breaks its contract.

    :ivar op: the op's catalogue name (``"gemm_fp8"``).
    :ivar arg: the offending argument's name (``"ws"``), or ``None`` when several are involved.
    """

    def __init__(self, op: str, arg: str | None, message: str) -> None:
        self.op = op
        self.arg = arg
        where = f"{op}: {arg}: " if arg else f"{op}: "
        super().__init__(where + message)


class ShapeError(OpInputError):
    """Wrong rank, wrong size, or sizes that do not agree between arguments."""


class DTypeError(OpInputError, TypeError):
    """A tensor of a dtype the op does not accept."""


class DeviceError(OpInputError):
    """Tensors on different devices, or on a device the backend does not drive."""


class LayoutError(OpInputError):
    """Alignment or block-layout rules broken (K not a multiple of 128, block table out of range)."""


# ---------------------------------------------------------------------------------------------------
# Plugins
# ---------------------------------------------------------------------------------------------------


class PluginError(HALError):
    """A plugin could not be used. ``plugin`` names it."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}")


class PluginLoadError(PluginError):
    """Importing a plugin's entry point raised."""


class PluginValidationError(PluginError):
    """A plugin's hooks or registrations break the contract (unknown hook, unknown op, bad spec)."""


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------


class BackendError(HALError):
    """Selecting or building a backend failed."""


class BackendNotFoundError(BackendError, LookupError):
    """No backend of that name was discovered."""


class BackendUnavailableError(BackendError):
    """The backend exists but its probe says it cannot run here; the message carries every reason."""


class BackendLoadError(BackendError):
    """The backend probed available but its implementation module failed to load or validate."""


class OpNotImplementedError(BackendError, NotImplementedError):
    """No implementation serves an op: the backend lacks it and no fallback is allowed or present."""


# ---------------------------------------------------------------------------------------------------
# Paged KV cache
# ---------------------------------------------------------------------------------------------------


class KVCacheError(HALError, ValueError):
    """Misuse of the paged KV cache (unknown sequence, bad slot, wrong entry shape)."""


class KVCacheExhaustedError(KVCacheError):
    """No free block is left. Nothing was written: the cache is unchanged."""


# ---------------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------------


class CollectiveError(HALError, RuntimeError):
    """A collective cannot run as asked (no process group, unsupported dtype for the transport)."""


# ---------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------


class BenchError(HALError, ValueError):
    """``hal bench`` cannot run or compare as asked (unknown op or shape set, an unreadable results file)."""


# ---------------------------------------------------------------------------------------------------
# A device that stopped working
# ---------------------------------------------------------------------------------------------------


class DeviceFailure(HALError, RuntimeError):
    """A device stopped working (lost, ECC failure, driver reset): retrying on it is pointless.

    A backend raises it from an op (or wraps a vendor error in it) to make the serving layer
    (:mod:`hal.serving.failover`) mark the device unhealthy and fail over to another backend.

    :ivar backend: the backend whose device failed, when known.
    :ivar device: the device, as torch spells it (``"cuda:0"``), when known.
    """

    def __init__(self, message: str, *, backend: str | None = None, device: str | None = None) -> None:
        self.backend = backend
        self.device = device
        super().__init__(message)
