"""Serving: continuous batching, device health, failover and Prometheus metrics for HAL models.

- :class:`AutoBatcher` (``hal.AutoBatcher``): thread-safe ``submit`` / ``process`` over one model, with
  continuous batching over the paged KV cache, back-pressure when the cache is full, failover and
  metrics.
- :func:`health` (``hal.health()``): per-device health of every available backend, as each backend's
  ``BackendSpec.health`` reports it.
- :class:`Failover`: where to go when a device fails, and how to rebuild the model there.
- :class:`~hal.serving.metrics.ServingMetrics`: the Prometheus metrics (needs ``prometheus-client``:
  ``pip install hal-accel[metrics]``), which is imported only when metrics are asked for.
- :class:`~hal.serving.faults.FaultInjectionPlugin`: a backend that fails after N ops, for testing
  failover.
"""

from __future__ import annotations

from hal.serving.batcher import AutoBatcher, BatcherStats, Request, RequestResult, generate_batched
from hal.serving.errors import (
    BatcherClosedError,
    DeviceFailure,
    FailoverError,
    MetricsUnavailableError,
    RequestTooLargeError,
    ServingError,
)
from hal.serving.failover import Failover, FailoverEvent, is_device_error
from hal.serving.faults import FaultInjectionPlugin
from hal.serving.health import DeviceHealth, HealthBook, default_book, format_health, health

__all__ = [
    "AutoBatcher",
    "BatcherClosedError",
    "BatcherStats",
    "DeviceFailure",
    "DeviceHealth",
    "Failover",
    "FailoverError",
    "FailoverEvent",
    "FaultInjectionPlugin",
    "HealthBook",
    "MetricsUnavailableError",
    "Request",
    "RequestResult",
    "RequestTooLargeError",
    "ServingError",
    "default_book",
    "format_health",
    "generate_batched",
    "health",
    "is_device_error",
]
