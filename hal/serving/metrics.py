"""Prometheus metrics of the serving layer, through ``prometheus-client`` (``pip install hal-accel[metrics]``).

:class:`ServingMetrics` owns its own ``CollectorRegistry`` (never the process-global default, so two
batchers or two tests never share counters) and can serve it over HTTP (:meth:`ServingMetrics.serve`).
:class:`~hal.serving.AutoBatcher` feeds it once per scheduler step and once per request; nothing is
recorded per op unless per-op metrics are asked for.

Every name, its type and labels (``deploy/grafana-dashboard.json`` queries exactly these):

=========================================  =========  =================================  ===========================
name                                       type       labels                             what
=========================================  =========  =================================  ===========================
``hal_requests_total``                     counter    ``outcome``                        finished, failed, rejected,
                                                                                         cancelled
``hal_prompt_tokens_total``                counter                                       prompt tokens prefilled
``hal_generated_tokens_total``             counter                                       tokens generated
``hal_tokens_per_second``                  gauge                                         generated tokens/s, last 10 s
``hal_request_latency_seconds``            histogram                                     submit → result
``hal_time_to_first_token_seconds``        histogram                                     submit → first token
``hal_request_queue_seconds``              histogram                                     submit → prefill starts
``hal_batch_size``                         histogram  ``phase`` (prefill, decode)        sequences per model call
``hal_step_seconds``                       histogram  ``phase``                          model call wall time
``hal_requests_running``                   gauge                                         sequences decoding
``hal_requests_waiting``                   gauge                                         queued (incl. back-pressure)
``hal_kv_cache_blocks_used``               gauge                                         blocks held by sequences
``hal_kv_cache_blocks_reserved``           gauge                                         blocks promised to admitted
                                                                                         requests (admission budget)
``hal_kv_cache_blocks_total``              gauge                                         blocks in the cache
``hal_failovers_total``                    counter    ``from_backend``, ``to_backend``   failovers
``hal_failover_recovery_seconds``          histogram                                     error → requests resumed
``hal_failover_reprefill_tokens_total``    counter                                       prompt + generated tokens
                                                                                         re-prefilled by failovers
``hal_device_memory_bytes``                gauge      ``backend``, ``device``, ``kind``  allocated, reserved, peak,
                                                                                         total (read at scrape)
``hal_device_healthy``                     gauge      ``backend``, ``device``            1 healthy, 0 not
                                                                                         (``hal.health()``)
``hal_serving_backend_info``               gauge      ``backend``, ``device``            1 for the serving backend
``hal_op_latency_seconds``                 histogram  ``backend``, ``op``                per-op host time; ``_count``
                                                                                         is the call count (opt-in)
=========================================  =========  =================================  ===========================

**Per-op metrics cost nothing when off.** They are recorded by wrapping the backend's op attributes
(:meth:`ServingMetrics.instrument`), which happens only when they are enabled; otherwise the model
calls the op table's plain callables exactly as without metrics, with no flag tested on the way. On
an asynchronous device (CUDA, NPU) an op's latency is its host-side time (launch, or the whole op when
it synchronizes), not the kernel's device time.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hal.ops.catalogue import CATALOGUE
from hal.serving.errors import MetricsUnavailableError, ServingError

if TYPE_CHECKING:
    from hal.backend import Backend
    from hal.serving.failover import FailoverEvent
    from hal.serving.health import DeviceHealth

__all__ = ["LATENCY_BUCKETS", "METRIC_NAMES", "ServingMetrics", "parse_listen_address", "prometheus_client"]

log = logging.getLogger("hal.serving")

#: Seconds: request latency, time to first token, queueing.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_OP_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_RECOVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Seconds of history behind ``hal_tokens_per_second``.
RATE_WINDOW_S = 10.0

#: The metric families, as exposed (counters with ``_total``; histograms also give ``_bucket``,
#: ``_sum``, ``_count``).
METRIC_NAMES = (
    "hal_requests_total",
    "hal_prompt_tokens_total",
    "hal_generated_tokens_total",
    "hal_tokens_per_second",
    "hal_request_latency_seconds",
    "hal_time_to_first_token_seconds",
    "hal_request_queue_seconds",
    "hal_batch_size",
    "hal_step_seconds",
    "hal_requests_running",
    "hal_requests_waiting",
    "hal_kv_cache_blocks_used",
    "hal_kv_cache_blocks_reserved",
    "hal_kv_cache_blocks_total",
    "hal_failovers_total",
    "hal_failover_recovery_seconds",
    "hal_failover_reprefill_tokens_total",
    "hal_device_memory_bytes",
    "hal_device_healthy",
    "hal_serving_backend_info",
    "hal_op_latency_seconds",
)


def parse_listen_address(text: str) -> tuple[str, int]:
    """``"9400"`` → ``("127.0.0.1", 9400)``; ``"0.0.0.0:9400"`` → ``("0.0.0.0", 9400)`` (``hal run --metrics-port``).

    :raises ValueError: not ``[ADDR:]PORT`` with a port in 0..65535.
    """
    addr, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected [ADDR:]PORT with PORT in 0..65535 (0: any free port), got {text!r}")
    return addr.strip("[]") or "127.0.0.1", int(port)


def prometheus_client() -> Any:
    """The ``prometheus_client`` module. :raises MetricsUnavailableError: it is not installed."""
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:
        raise MetricsUnavailableError(
            "Prometheus metrics need the prometheus-client package: pip install 'hal-accel[metrics]' "
            "(or pip install prometheus-client)"
        ) from None


class ServingMetrics:
    """The serving metrics, in a registry of their own.

    :param op_metrics: also time (and so count) every compute/collective op of the backends passed to
        :meth:`instrument` (off by default; see the module docstring for the cost).
    :param registry: a ``prometheus_client.CollectorRegistry`` to add to (``None``: a new one).
    :param health_ttl_s: seconds a :func:`hal.health` reading is reused across scrapes (NVML and
        ``npu-smi`` calls are not free).
    :raises MetricsUnavailableError: ``prometheus-client`` is not installed.
    """

    def __init__(self, *, op_metrics: bool = False, registry: Any = None, health_ttl_s: float = 10.0) -> None:
        pc = prometheus_client()
        self._pc = pc
        self.registry = pc.CollectorRegistry() if registry is None else registry
        self.op_metrics = op_metrics
        self.health_ttl_s = health_ttl_s
        r = self.registry
        self.requests = pc.Counter("hal_requests", "Requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = pc.Counter("hal_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = pc.Counter("hal_generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_second = pc.Gauge(
            "hal_tokens_per_second", f"Generated tokens per second over the last {RATE_WINDOW_S:g} s", registry=r
        )
        self.request_latency = pc.Histogram(
            "hal_request_latency_seconds", "Request latency: submit to result", buckets=LATENCY_BUCKETS, registry=r
        )
        self.time_to_first_token = pc.Histogram(
            "hal_time_to_first_token_seconds", "Submit to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_time = pc.Histogram(
            "hal_request_queue_seconds", "Submit to prefill start (queueing)", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = pc.Histogram(
            "hal_batch_size", "Sequences per model call", ["phase"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.step_seconds = pc.Histogram(
            "hal_step_seconds", "Wall time of one model call", ["phase"], buckets=_STEP_BUCKETS, registry=r
        )
        self.requests_running = pc.Gauge("hal_requests_running", "Sequences being decoded", registry=r)
        self.requests_waiting = pc.Gauge("hal_requests_waiting", "Requests queued, not yet admitted", registry=r)
        self.kv_blocks_used = pc.Gauge("hal_kv_cache_blocks_used", "KV-cache blocks held by sequences", registry=r)
        self.kv_blocks_reserved = pc.Gauge(
            "hal_kv_cache_blocks_reserved", "KV-cache blocks promised to admitted requests", registry=r
        )
        self.kv_blocks_total = pc.Gauge("hal_kv_cache_blocks_total", "KV-cache blocks in the cache", registry=r)
        self.failovers = pc.Counter(
            "hal_failovers", "Failovers to another backend", ["from_backend", "to_backend"], registry=r
        )
        self.failover_recovery = pc.Histogram(
            "hal_failover_recovery_seconds",
            "Time to recover: device error caught to in-flight requests resumed",
            buckets=_RECOVERY_BUCKETS,
            registry=r,
        )
        self.failover_reprefill_tokens = pc.Counter(
            "hal_failover_reprefill_tokens",
            "Prompt and generated tokens re-prefilled to resume requests after a failover",
            registry=r,
        )
        self.op_latency: Any = None
        if op_metrics:
            # One histogram: its _count is the call count, so no separate counter is kept.
            self.op_latency = pc.Histogram(
                "hal_op_latency_seconds", "HAL op host time", ["backend", "op"], buckets=_OP_BUCKETS, registry=r
            )
        for outcome in ("finished", "failed", "rejected", "cancelled"):
            self.requests.labels(outcome)  # present at 0 from the start, so rate() has a baseline
        for phase in ("prefill", "decode"):
            self.batch_size.labels(phase)
            self.step_seconds.labels(phase)
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()
        self._started = time.monotonic()
        self.tokens_per_second.set_function(self._rate)
        self._backend: Callable[[], Backend | None] = lambda: None
        self._health: Callable[[], Sequence[DeviceHealth]] | None = None
        self._health_cache: tuple[float, Sequence[DeviceHealth]] | None = None
        r.register(_LiveCollector(self))
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    # -- wiring -----------------------------------------------------------------------------------

    def bind(
        self,
        backend: Callable[[], Backend | None],
        health: Callable[[], Sequence[DeviceHealth]] | None = None,
    ) -> None:
        """Where scrape-time gauges read from: the serving backend now, and device health."""
        self._backend = backend
        self._health = health
        self._health_cache = None

    def instrument(self, backend: Backend) -> Callable[[], None]:
        """Wrap ``backend``'s compute and collective op attributes to time each call (into
        ``hal_op_latency_seconds``, whose ``_count`` counts the calls).

        Does nothing (and returns a no-op) unless ``op_metrics`` is on.

        :returns: a function that puts the original attributes back.
        :raises ServingError: the backend's ops are already wrapped by someone else.
        """
        if not self.op_metrics:
            return _nothing
        originals: dict[str, Any] = {}
        for op, entry in backend.table.items():
            if CATALOGUE[op].kind == "runtime":
                continue  # memory_stats is read at scrape time; device_count & co. are not the model's work
            current = getattr(backend, op)
            if current is not entry.fn:
                raise ServingError(
                    f"ServingMetrics.instrument: op {op!r} of backend {backend.name!r} is already wrapped "
                    "(another ServingMetrics instruments it?); remove that instrumentation first"
                )
            originals[op] = current
        for op, fn in originals.items():
            setattr(backend, op, self._timed(fn, backend.name, op))

        def restore() -> None:
            for op, fn in originals.items():
                setattr(backend, op, fn)

        return restore

    def _timed(self, fn: Callable[..., Any], backend: str, op: str) -> Callable[..., Any]:
        latency = self.op_latency.labels(backend, op)
        clock = time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                latency.observe(clock() - t0)

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        timed.__doc__ = fn.__doc__
        timed.__name__ = getattr(fn, "__name__", op)
        return timed

    # -- what the batcher records ---------------------------------------------------------------

    def observe_prefill(self, batch: int, prompt_tokens: int, seconds: float) -> None:
        self.batch_size.labels("prefill").observe(batch)
        self.step_seconds.labels("prefill").observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def observe_decode(self, batch: int, seconds: float) -> None:
        self.batch_size.labels("decode").observe(batch)
        self.step_seconds.labels("decode").observe(seconds)

    def observe_tokens(self, n: int) -> None:
        """``n`` tokens were generated (chosen) just now."""
        self.generated_tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            self._trim(now)

    def observe_finished(self, queue_s: float, first_token_s: float | None, latency_s: float) -> None:
        self.requests.labels("finished").inc()
        self.queue_time.observe(queue_s)
        if first_token_s is not None:
            self.time_to_first_token.observe(first_token_s)
        self.request_latency.observe(latency_s)

    def observe_outcome(self, outcome: str, n: int = 1) -> None:
        """``n`` requests ended as ``outcome`` (``failed``, ``rejected``, ``cancelled``)."""
        self.requests.labels(outcome).inc(n)

    def set_load(self, running: int, waiting: int, kv_used: int, kv_reserved: int, kv_total: int) -> None:
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)
        self.kv_blocks_used.set(kv_used)
        self.kv_blocks_reserved.set(kv_reserved)
        self.kv_blocks_total.set(kv_total)

    def observe_failover(self, event: FailoverEvent) -> None:
        self.failovers.labels(event.from_backend, event.to_backend).inc()
        self.failover_recovery.observe(event.recovery_seconds)
        self.failover_reprefill_tokens.inc(event.resumed_tokens)
        self._health_cache = None  # the next scrape shows the device as marked

    def _trim(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            if not self._recent:
                return 0.0
            tokens = sum(n for _, n in self._recent)
        # Over the whole window (or the whole life, when shorter): idle time counts.
        span = max(min(RATE_WINDOW_S, now - self._started), 0.05)
        return tokens / span

    def health_rows(self) -> Sequence[DeviceHealth]:
        """The last :func:`hal.health` reading, refreshed when older than ``health_ttl_s``."""
        if self._health is None:
            return ()
        now = time.monotonic()
        cached = self._health_cache
        if cached is None or now - cached[0] > self.health_ttl_s:
            cached = (now, list(self._health()))
            self._health_cache = cached
        return cached[1]

    # -- exposition -------------------------------------------------------------------------------

    def exposition(self) -> str:
        """The Prometheus text format of every metric, as a scrape would get it."""
        return str(self._pc.generate_latest(self.registry).decode("utf-8"))

    def serve(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP on ``addr:port`` (0: a free port) from a daemon thread.

        :returns: the port bound.
        """
        if self._server is not None:
            raise ServingError(f"ServingMetrics.serve: already serving on port {self._server.server_port}")
        server, thread = self._pc.start_http_server(port, addr=addr, registry=self.registry)
        self._server, self._server_thread = server, thread
        return int(server.server_port)

    @property
    def port(self) -> int | None:
        """The HTTP port, ``None`` when not serving."""
        return None if self._server is None else int(self._server.server_port)

    def close(self, *, linger_s: float = 0.0) -> None:
        """Stop the HTTP server, if any.

        :param linger_s: keep serving this many seconds first (blocking), so that a Prometheus scraping
            every ``linger_s`` or more often sees the final values of a short run (``hal run``).
        :raises ValueError: ``linger_s`` is not a finite number >= 0.
        """
        if isinstance(linger_s, bool) or not isinstance(linger_s, int | float) or not 0 <= linger_s < math.inf:
            raise ValueError(f"ServingMetrics.close: linger_s must be a finite number >= 0, got {linger_s!r}")
        if self._server is not None and linger_s > 0:
            log.info("metrics: serving on port %d for %g s more before stopping", self._server.server_port, linger_s)
            time.sleep(linger_s)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(timeout=5)
            self._server = self._server_thread = None


def _nothing() -> None:
    return None


class _NoMetrics:
    """Stands in for :class:`ServingMetrics` when metrics are off (the batcher makes one no-op call per
    step or request; nothing per op). Needs no prometheus-client."""

    def observe_prefill(self, batch: int, prompt_tokens: int, seconds: float) -> None:
        pass

    def observe_decode(self, batch: int, seconds: float) -> None:
        pass

    def observe_tokens(self, n: int) -> None:
        pass

    def observe_finished(self, queue_s: float, first_token_s: float | None, latency_s: float) -> None:
        pass

    def observe_outcome(self, outcome: str, n: int = 1) -> None:
        pass

    def set_load(self, running: int, waiting: int, kv_used: int, kv_reserved: int, kv_total: int) -> None:
        pass

    def observe_failover(self, event: FailoverEvent) -> None:
        pass

    def instrument(self, backend: Backend) -> Callable[[], None]:
        return _nothing

    def close(self, *, linger_s: float = 0.0) -> None:
        pass


class _LiveCollector:
    """Gauges read at scrape time: device memory of the serving backend, device health."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self._m = metrics
        self._core = importlib.import_module("prometheus_client.core")

    def collect(self) -> Iterator[Any]:
        core = self._core
        memory = core.GaugeMetricFamily(
            "hal_device_memory_bytes", "Device memory of the serving backend", labels=["backend", "device", "kind"]
        )
        info = core.GaugeMetricFamily(
            "hal_serving_backend_info", "The backend serving now (1)", labels=["backend", "device"]
        )
        healthy = core.GaugeMetricFamily(
            "hal_device_healthy", "1 when the device is healthy (hal.health())", labels=["backend", "device"]
        )
        backend = self._m._backend()
        if backend is not None:
            info.add_metric([backend.name, str(backend.device)], 1)
            try:
                stats = backend.memory_stats()
            except Exception as exc:  # a failed device cannot report memory; the health gauge says why
                log.debug("scrape: %s memory_stats failed: %s", backend.name, exc)
                stats = None
            if stats is not None:
                for kind in ("allocated", "reserved", "peak", "total"):
                    value = getattr(stats, kind)
                    if value is not None:
                        memory.add_metric([backend.name, str(backend.device), kind], value)
        try:
            rows = self._m.health_rows()
        except Exception as exc:  # health readers catch their own errors; never fail a scrape on one
            log.warning("scrape: hal.health() failed: %s: %s", type(exc).__name__, exc)
            rows = ()
        for row in rows:
            healthy.add_metric([row.backend, row.device], 1 if row.healthy else 0)
        yield memory
        yield info
        yield healthy
