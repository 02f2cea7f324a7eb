"""Timing done the way the anchors were measured (``shared/BENCHMARKS.md``, "Timing").

- **CUDA** (NVIDIA, and ROCm's HIP, which torch also calls ``cuda``): device events around each call,
  with the L2 cache flushed before every call by zeroing a 256 MB buffer, after a warm-up; the median
  of the per-call times. ``triton.testing.do_bench`` does exactly this and is used when triton is
  importable; otherwise the same loop runs on ``torch.cuda.Event``. Separately, the call is captured
  in a CUDA graph and the graph replayed, which takes the Python dispatch (HAL's and the op's own)
  off the clock; an op that cannot be captured (it reads device values on the host, as the reference
  implementations do) reports why instead.
- **CPU**: ``time.perf_counter_ns`` around loops of calls, each loop long enough that the clock's own
  cost is negligible, repeated for a fixed minimum time after a warm-up; the median of the per-call
  times. An op and its baselines are sampled in turn (:meth:`Timer.many`), so drift weighs on all
  alike. Caches stay warm: a CPU has no L2-flush convention, and a decode step's small operands stay
  cached in a real hot loop too (the ``cpu-small`` memory-bound cases use working sets past L2, so
  they meet the DRAM roof). There is no graph capture on the CPU.
- **Other devices**: the CPU method with the backend's ``synchronize()`` closing each loop.

Nothing here imports triton or touches CUDA unless the device is a CUDA device. The spread of a
timing is the interquartile range of its samples divided by their median: :func:`hal.bench.report.compare`
treats a difference smaller than that as noise.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timer", "Timing", "make_timer", "steady_cpu_allocator", "summarize"]

#: Bytes zeroed between two timed calls on a CUDA device to evict the operands from L2 (H100: 50 MB).
L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Timing:
    """The outcome of timing one callable.

    :param median_s: median seconds per call.
    :param spread: interquartile range of the per-call samples divided by the median (0 for one sample).
    :param samples: number of samples the median is over.
    :param method: how it was timed (``"perf_counter"``, ``"triton.do_bench"``, ``"cuda-event"``,
        ``"cuda-graph"``).
    """

    median_s: float
    spread: float
    samples: int
    method: str


def summarize(per_call_s: Sequence[float], method: str) -> Timing:
    """Median and relative interquartile range of per-call times."""
    if not per_call_s:
        raise ValueError("summarize: no samples")
    med = statistics.median(per_call_s)
    if len(per_call_s) >= 4:
        q = statistics.quantiles(per_call_s, n=4)
        spread = (q[2] - q[0]) / med if med > 0 else 0.0
    else:
        spread = (max(per_call_s) - min(per_call_s)) / med if med > 0 and len(per_call_s) > 1 else 0.0
    return Timing(med, spread, len(per_call_s), method)


@dataclass(frozen=True)
class Budget:
    """How long to warm up and to measure one callable.

    :param warmup_s: least seconds of untimed calls first (at least two calls).
    :param min_s: least seconds of timed calls.
    :param min_samples: least samples (a slow call gets this many whatever ``min_s`` says).
    :param max_samples: most samples.
    :param sample_s: least seconds one CPU sample (a loop of calls) lasts.
    """

    warmup_s: float
    min_s: float
    min_samples: int
    max_samples: int
    sample_s: float


QUICK = Budget(warmup_s=0.01, min_s=0.06, min_samples=5, max_samples=200, sample_s=0.0005)
FULL = Budget(warmup_s=0.05, min_s=0.4, min_samples=10, max_samples=1000, sample_s=0.001)


class Timer:
    """Times callables on one device; :meth:`graph` is the CUDA-graph variant.

    Build with :func:`make_timer`.
    """

    def __init__(self, device: torch.device, budget: Budget, synchronize: Callable[[], Any] | None = None) -> None:
        self.device = device
        self.budget = budget
        self._sync = synchronize
        self._flush: torch.Tensor | None = None
        self._graph_broken: str | None = None

    # -- eager --------------------------------------------------------------------------------------

    @property
    def method(self) -> str:
        """How :meth:`__call__` times, in words (recorded in the results)."""
        if self.device.type == "cuda":
            return (
                f"{self._cuda_method()}: device events per call, L2 flushed ({L2_FLUSH_BYTES >> 20} MiB zeroed) "
                f"before each, median after {self.budget.warmup_s * 1e3:.0f} ms warm-up"
            )
        sync = "" if self.device.type == "cpu" else ", synchronize() after each loop"
        return (
            f"perf_counter_ns around loops of >= {self.budget.sample_s * 1e3:g} ms{sync}, an op's and its "
            f"baselines' loops interleaved; median over >= "
            f"{self.budget.min_s:g} s and >= {self.budget.min_samples} samples after >= "
            f"{self.budget.warmup_s * 1e3:g} ms warm-up; caches warm"
        )

    def __call__(self, fn: Callable[[], Any]) -> Timing:
        """Median time per call of ``fn`` (no arguments; its inputs are bound)."""
        if self.device.type == "cuda":
            return self._cuda(fn)
        return self._wall([fn])[0]

    def many(self, fns: Sequence[Callable[[], Any]]) -> list[Timing]:
        """Time several callables side by side (an op and its baselines).

        On the CPU (and other non-CUDA devices) their samples are interleaved, one loop of each in
        turn, so that a drift of the machine (frequency, another process, the allocator settling)
        weighs on all of them alike and their ratio stays fair. On CUDA each is timed in turn with
        device events, which such drift barely touches.
        """
        if self.device.type == "cuda":
            return [self._cuda(fn) for fn in fns]
        return self._wall(fns)

    def _wall(self, fs: Sequence[Callable[[], Any]]) -> list[Timing]:
        b = self.budget
        sync = self._sync if self.device.type != "cpu" else None
        clock = time.perf_counter_ns
        numbers = []
        for fn in fs:
            # Warm-up, and a first estimate of one call's time.
            calls, start = 0, clock()
            while calls < 2 or clock() - start < b.warmup_s * 1e9:
                fn()
                if sync is not None:
                    sync()
                calls += 1
            per_call = (clock() - start) / 1e9 / calls
            numbers.append(max(1, int(b.sample_s / per_call)) if per_call > 0 else 1000)
        samples: list[list[float]] = [[] for _ in fs]
        spent = [0.0 for _ in fs]
        while True:
            n = len(samples[0])
            if n >= b.max_samples or (n >= b.min_samples and min(spent) >= b.min_s):
                break
            for i, fn in enumerate(fs):
                number = numbers[i]
                t0 = clock()
                for _ in range(number):
                    fn()
                if sync is not None:
                    sync()
                elapsed = (clock() - t0) / 1e9
                spent[i] += elapsed
                samples[i].append(elapsed / number)
        return [summarize(s, "perf_counter") for s in samples]

    # -- CUDA ---------------------------------------------------------------------------------------

    def _cuda_method(self) -> str:
        try:
            import triton.testing  # noqa: F401
        except Exception:  # triton missing or broken: the event loop below measures the same way
            return "cuda-event"
        return "triton.do_bench"

    def _cuda(self, fn: Callable[[], Any]) -> Timing:
        warmup_ms, rep_ms = self.budget.warmup_s * 1e3, self.budget.min_s * 1e3
        with torch.cuda.device(self.device):
            try:
                from triton.testing import do_bench
            except Exception:  # see _cuda_method
                return self._cuda_events(fn)
            try:
                times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
            except TypeError:  # older triton: no return_mode="all"
                return Timing(float(do_bench(fn, warmup=warmup_ms, rep=rep_ms)) / 1e3, 0.0, 1, "triton.do_bench")
            return summarize([t / 1e3 for t in times], "triton.do_bench")

    def _cuda_events(self, fn: Callable[[], Any]) -> Timing:
        if self._flush is None:
            self._flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)
        flush = self._flush
        fn()
        torch.cuda.synchronize(self.device)
        # Estimate one call, then size the warm-up and the measured loop in calls.
        est_start, est_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        est_start.record()
        for _ in range(5):
            flush.zero_()
            fn()
        est_end.record()
        torch.cuda.synchronize(self.device)
        per_call_ms = max(est_start.elapsed_time(est_end) / 5, 1e-4)
        b = self.budget
        for _ in range(max(1, int(b.warmup_s * 1e3 / per_call_ms))):
            fn()
        n = min(b.max_samples, max(b.min_samples, int(b.min_s * 1e3 / per_call_ms)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return summarize([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)], "cuda-event")

    # -- CUDA graphs --------------------------------------------------------------------------------

    def graph(self, fn: Callable[[], Any]) -> Timing | str:
        """Median time per replay of ``fn`` captured in a CUDA graph, or why there is none.

        Only on CUDA devices. Replays run back to back (operands stay in L2 when they fit): this
        measures the kernels without Python dispatch or launch gaps.
        """
        if self.device.type != "cuda":
            return f"n/a: no graph capture on {self.device.type}"
        if self._graph_broken is not None:
            return self._graph_broken
        with torch.cuda.device(self.device):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            try:
                with torch.cuda.stream(stream):
                    for _ in range(3):  # allocator and library warm-up off the capture
                        fn()
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                graph.replay()
                torch.cuda.synchronize(self.device)
            except Exception as exc:  # capture refuses host syncs and some allocations: report which
                reason = f"n/a: capture failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                try:
                    torch.cuda.synchronize(self.device)
                except Exception as broken:  # the context did not recover: stop capturing for this run
                    self._graph_broken = f"n/a: graph capture disabled after an unrecoverable failure ({broken})"
                return reason
            b = self.budget
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize(self.device)
            per_ms = max(start.elapsed_time(end), 1e-4)
            number = max(1, int(b.sample_s * 1e3 / per_ms))
            samples: list[float] = []
            total_ms = 0.0
            while len(samples) < b.max_samples and (len(samples) < b.min_samples or total_ms < b.min_s * 1e3):
                start.record()
                for _ in range(number):
                    graph.replay()
                end.record()
                torch.cuda.synchronize(self.device)
                ms = start.elapsed_time(end)
                total_ms += ms
                samples.append(ms / 1e3 / number)
            del graph
            return summarize(samples, "cuda-graph")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
#: glibc's largest mmap threshold on 64-bit hosts (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD = 32 * 2**20


def steady_cpu_allocator() -> str | None:
    """Make glibc keep freed blocks of up to 32 MiB for reuse instead of unmapping them (Linux, glibc).

    By default glibc serves large allocations with fresh ``mmap`` pages and raises that threshold
    only as blocks are freed, so whether an op's temporaries (the FP8 reference's 4 MB dequantized
    weights) page-fault on every call depends on the process's history: the same case was measured
    1.6× apart in two runs on the development CPU. Fixed thresholds give every call the steady state
    that torch's caching allocator gives a GPU. Process-wide: call it in a benchmark process only.

    :returns: what was set, for the results; ``None`` where there is no glibc (nothing is changed).
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, 8 * _MMAP_THRESHOLD)
    except (OSError, AttributeError):  # an unusual libc: leave the allocator as it is
        return None
    if not ok:
        return None
    return "glibc mallopt: mmap threshold 32 MiB, trim threshold 256 MiB (temporaries reused between calls)"


def make_timer(device: torch.device, *, quick: bool, synchronize: Callable[[], Any] | None = None) -> Timer:
    """A :class:`Timer` for ``device``; ``quick`` shortens warm-up and measurement (``hal bench --quick``).

    :param synchronize: waits for the device's queued work (the backend's ``synchronize`` op); used on
        devices that are neither CPU nor CUDA.
    """
    return Timer(device, QUICK if quick else FULL, synchronize)
