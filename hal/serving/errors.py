"""The errors of the serving layer (batching, failover, metrics), all :class:`~hal.errors.HALError`.

``DeviceFailure`` (defined in :mod:`hal.errors`, re-exported here) is the one a backend (or a fault
injector) raises to say "this device is gone": :func:`hal.serving.failover.is_device_error` treats it,
and runtime errors naming a fatal device condition (an illegal memory access, a lost GPU, ...), as a
reason to fail over; every other error is a bug or bad input and fails the requests it touched instead.
"""

from __future__ import annotations

from hal.errors import DeviceFailure, HALError

__all__ = [
    "BatcherClosedError",
    "DeviceFailure",
    "FailoverError",
    "MetricsUnavailableError",
    "RequestTooLargeError",
    "ServingError",
]


class ServingError(HALError):
    """The serving layer cannot do what was asked (the message says why and what to change)."""


class BatcherClosedError(ServingError, RuntimeError):
    """A request was submitted to an :class:`~hal.serving.AutoBatcher` that is closed or closing."""


class RequestTooLargeError(ServingError, ValueError):
    """A request needs more KV-cache blocks than the whole cache has: it could never be scheduled."""


class FailoverError(ServingError, RuntimeError):
    """A device failed and no other backend could take over (each candidate's reason is in the message)."""


class MetricsUnavailableError(ServingError, ImportError):
    """Prometheus metrics were asked for but ``prometheus-client`` is not installed."""
