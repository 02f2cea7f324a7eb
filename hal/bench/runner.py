"""Run a benchmark suite: every case of a shape set on one backend, its baselines beside it.

:func:`run_suite` measures the device's peaks (:mod:`hal.bench.peaks`), then for each case builds its
inputs, checks each baseline's output against the op's once (a baseline that computes something else
is flagged, not silently compared), times the op and each baseline with the same timer, times the op
in a CUDA graph where the device has them, derives the figures (:mod:`hal.bench.metrics`) and frees
the inputs. A case that raises is recorded with its error and the run goes on.

The result is a :class:`Run`; :meth:`Run.as_dict` is the JSON document (schema ``hal-bench/1``).
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TextIO

import torch

import hal
from hal.backend import Backend
from hal.bench.cases import BenchCase, Prepared, cases_for, prepare
from hal.bench.metrics import derive
from hal.bench.peaks import Peaks, peaks_for
from hal.bench.shapes import ShapeSet
from hal.bench.timing import Timer, Timing, make_timer, steady_cpu_allocator
from hal.errors import BenchError
from hal.progress import Progress

__all__ = ["SCHEMA", "BaselineResult", "CaseResult", "Run", "disagreement", "run_suite"]

SCHEMA = "hal-bench/1"
log = logging.getLogger("hal.bench")

#: Largest relative difference a baseline's output may have from the op's before it is flagged, by the
#: dtype of the op's output: loose, it catches a baseline computing something else.
_AGREE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class BaselineResult:
    """One baseline of one case: its time and HAL's time divided by it (below 1: HAL is faster)."""

    name: str
    median_us: float | None
    ratio: float | None
    spread: float | None = None
    unavailable: str | None = None
    mismatch: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"median_us": self.median_us, "ratio": self.ratio, "spread": self.spread}
        if self.unavailable is not None:
            d["unavailable"] = self.unavailable
        if self.mismatch is not None:
            d["mismatch"] = self.mismatch
        return d


@dataclass(frozen=True)
class CaseResult:
    """One measured case (see :meth:`as_dict` for the JSON fields)."""

    case: BenchCase
    timing: Timing
    graph: Timing | str
    flops: float
    bytes: float
    tflops: float | None
    gbps: float
    intensity: float | None
    pct_peak: float | None
    pct_peak_compute: float | None
    pct_peak_bandwidth: float | None
    bound: str
    baselines: Mapping[str, BaselineResult]

    @property
    def median_us(self) -> float:
        return self.timing.median_s * 1e6

    def as_dict(self) -> dict[str, Any]:
        graph_us = self.graph.median_s * 1e6 if isinstance(self.graph, Timing) else None
        return {
            "op": self.case.op,
            "shape": self.case.shape.id,
            "dtype": self.case.dtype,
            "params": dict(self.case.shape.params),
            "median_us": self.median_us,
            "spread": self.timing.spread,
            "samples": self.timing.samples,
            "timing": self.timing.method,
            "graph_us": graph_us,
            "graph_note": None if isinstance(self.graph, Timing) else self.graph,
            "flops": self.flops,
            "bytes": self.bytes,
            "tflops": self.tflops,
            "gbps": self.gbps,
            "intensity": self.intensity,
            "pct_peak": self.pct_peak,
            "pct_peak_compute": self.pct_peak_compute,
            "pct_peak_bandwidth": self.pct_peak_bandwidth,
            "bound": self.bound,
            "baselines": {name: b.as_dict() for name, b in self.baselines.items()},
        }


@dataclass
class Run:
    """A whole run: what was measured, where, how, and the results."""

    date: str
    command: str
    machine: dict[str, Any]
    versions: dict[str, Any]
    backend: str
    device: str
    device_type: str
    shapes: str
    quick: bool
    timing: str
    peaks: Peaks
    results: list[CaseResult] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON document (schema ``hal-bench/1``)."""
        return {
            "schema": SCHEMA,
            "date": self.date,
            "command": self.command,
            "machine": self.machine,
            "versions": self.versions,
            "backend": self.backend,
            "device": self.device,
            "device_type": self.device_type,
            "shapes": self.shapes,
            "quick": self.quick,
            "timing": self.timing,
            "ratio": "HAL's median time / the baseline's: below 1, HAL is faster",
            "peaks": self.peaks.as_dict(),
            "results": [r.as_dict() for r in self.results],
            "skipped": self.skipped,
            "errors": self.errors,
        }


# ---------------------------------------------------------------------------------------------------
# Environment facts
# ---------------------------------------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Versions of what the figures depend on (read from package metadata: nothing is imported)."""
    return {
        "python": platform.python_version(),
        "hal": hal.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "triton": _dist_version("triton"),
    }


def machine(backend: Backend) -> dict[str, Any]:
    """The host and the device: CPU, cores, threads; on CUDA the GPU's model, SMs, clocks and driver."""
    caps = backend.capabilities
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device_name": caps.device_name,
        "arch": caps.arch,
        "memory_bytes": caps.memory_bytes,
    }
    if caps.device_type == "cpu":
        info["cpu"] = caps.device_name
    if backend.device.type == "cuda":
        props = torch.cuda.get_device_properties(backend.device)
        info["gpu"] = props.name
        info["sm_count"] = props.multi_processor_count
        info.update(_nvml(backend.device.index or 0))
    return info


class _CpuShare:
    """How much of the host's CPU *other* processes used while the run lasted (Linux ``/proc/stat``).

    Other work on a small CPU inflates timings by factors, not percents (two processes each running
    two threads on two cores); recording it tells a clean run from a disturbed one.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):  # not Linux
            return None
        hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        # user, nice, system, irq, softirq, steal (guest time is already inside user and nice)
        busy = sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields))
        return busy / hz, time.process_time(), time.monotonic()

    def others(self) -> float | None:
        """Fraction of all cores' time spent by other processes since construction (0..1)."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        busy, mine, wall = (e - s for e, s in zip(end, self._start, strict=True))
        cores = os.cpu_count() or 1
        return round(min(1.0, max(0.0, (busy - mine) / (wall * cores))), 3) if wall > 0 else None


def _nvml(index: int) -> dict[str, Any]:
    """Clocks and driver from NVML when it is installed (only called on CUDA devices)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        return {
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
        }
    except Exception as exc:  # NVML missing or refusing (AMD, containers): the clocks are then unknown
        return {"nvml": f"unavailable: {type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------


def _main_tensor(out: Any) -> torch.Tensor | None:
    """The tensor an op's output is compared on: itself, or a tuple's first element."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def disagreement(out: Any, other: Any) -> str | None:
    """Why ``other`` does not compute what ``out`` does (``None``: it agrees within the dtype's slack)."""
    a, b = _main_tensor(out), _main_tensor(other)
    if a is None or b is None:
        return None
    if a.shape != b.shape:
        return f"output shape {list(b.shape)}, the op's is {list(a.shape)}"
    af, bf = a.detach().float(), b.detach().float()
    scale = af.abs().max().item() if af.numel() else 0.0
    err = (af - bf).abs().max().item() / max(scale, 1e-30) if af.numel() else 0.0
    tol = _AGREE.get(a.dtype, 5e-2)
    if not err <= tol:
        return f"max relative difference {err:.3g} from the op's output (> {tol:g})"
    return None


def _measure(case: BenchCase, prepared: Prepared, timer: Timer, peaks: Peaks, graphs: bool) -> CaseResult:
    out = prepared.fn()
    checks: dict[str, str | None] = {}
    for b in prepared.baselines:
        if b.fn is not None:
            checks[b.name] = disagreement(out, b.fn()) if b.compare else None
    del out
    runnable = [b for b in prepared.baselines if b.fn is not None]
    timings = timer.many([prepared.fn, *(b.fn for b in runnable if b.fn is not None)])
    timing, by_name = timings[0], {b.name: t for b, t in zip(runnable, timings[1:], strict=True)}
    graph = timer.graph(prepared.fn) if graphs else "n/a: graph timing off"
    baselines: dict[str, BaselineResult] = {}
    for b in prepared.baselines:
        if b.fn is None:
            baselines[b.name] = BaselineResult(b.name, None, None, unavailable=b.unavailable)
            continue
        t = by_name[b.name]
        baselines[b.name] = BaselineResult(
            b.name, t.median_s * 1e6, timing.median_s / t.median_s, t.spread, mismatch=checks.get(b.name)
        )
    peak = peaks.compute_peak(_peak_class(prepared.work.peak_dtype))
    d = derive(prepared.work, timing.median_s, peak, peaks.bandwidth)
    return CaseResult(
        case,
        timing,
        graph,
        prepared.work.flops,
        prepared.work.bytes,
        d.tflops,
        d.gbps,
        d.intensity,
        d.pct_peak,
        d.pct_peak_compute,
        d.pct_peak_bandwidth,
        d.bound,
        baselines,
    )


def _peak_class(dtype: str) -> str:
    return "float8" if dtype.startswith("float8") else dtype


def run_suite(
    backend: Backend,
    reference: Mapping[str, Callable[..., Any]],
    shapes: ShapeSet,
    *,
    ops: Sequence[str] | None = None,
    quick: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
    command: str | None = None,
    graphs: bool = True,
    timer: Timer | None = None,
    peaks: Peaks | None = None,
    steady_allocator: bool = True,
) -> Run:
    """Benchmark every case of ``shapes`` (``quick``: the quick subset) on ``backend``.

    :param reference: the reference backend's own ops (``Registry.reference_ops()``).
    :param ops: only these ops (``None``: all of :data:`hal.bench.cases.BENCH_OPS`).
    :param progress: show progress on ``stream`` (default stderr).
    :param command: the command line recorded in the results (default: this process's argv).
    :param graphs: also time each op captured in a CUDA graph (CUDA devices only).
    :param timer: the timer to use (default: :func:`hal.bench.timing.make_timer` for the device).
    :param peaks: the device's peaks (default: the table, or measured now).
    :param steady_allocator: on a CPU, fix glibc's allocation thresholds first
        (:func:`hal.bench.timing.steady_cpu_allocator`; process-wide).
    :raises hal.errors.BenchError: every selected case is skipped on this backend (nothing to run).
    """
    share = _CpuShare()
    allocator = steady_cpu_allocator() if backend.device.type == "cpu" and steady_allocator else None
    stream = sys.stderr if stream is None else stream
    timer = timer or make_timer(backend.device, quick=quick, synchronize=backend.synchronize)
    cases = cases_for(shapes, backend, ops, quick=quick)

    def say(line: str) -> None:
        if progress:
            stream.write(f"hal bench: {line}\n")
            stream.flush()

    if cases and all(why is not None for _, why in cases):
        reasons = sorted({why for _, why in cases if why is not None})
        raise BenchError(f"nothing to run on backend {backend.name}: {'; '.join(reasons)}")
    if peaks is None:
        peaks = peaks_for(backend.device, backend.capabilities.device_name, timer, log=say)
    run = Run(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        command=command if command is not None else " ".join(["hal", *sys.argv[1:]]),
        machine=machine(backend),
        versions=versions(),
        backend=backend.name,
        device=str(backend.device),
        device_type=backend.device.type,
        shapes=shapes.name,
        quick=quick,
        timing=timer.method,
        peaks=peaks,
    )
    with Progress(
        len(cases), f"hal bench {backend.name} {shapes.name}", unit="cases", stream=stream, enabled=progress
    ) as bar:
        for case, why in cases:
            if why is not None:
                run.skipped.append({"op": case.op, "shape": case.shape.id, "dtype": case.dtype, "reason": why})
                bar.update()
                continue
            try:
                run.results.append(_measure(case, prepare(case, backend, reference), timer, peaks, graphs))
            except Exception as exc:  # one failing case must not cost the rest of a long run
                log.warning("%s failed: %s: %s", case, type(exc).__name__, exc)
                error = f"{type(exc).__name__}: {exc}"
                run.errors.append({"op": case.op, "shape": case.shape.id, "dtype": case.dtype, "error": error})
            if backend.device.type != "cpu":
                # Inputs of deepseek-v3 size are GBs: give them back before the next case allocates.
                gc.collect()
                backend.empty_cache()
            bar.update()
    run.machine["other_processes_cpu_share"] = share.others()
    run.machine["cpu_allocator"] = allocator
    return run
