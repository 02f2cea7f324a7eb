"""Benchmark-session set-up (``make bench`` = ``pytest bench``).

- ``backend``: the backend of the dispatch and model benchmarks, from ``HAL_BACKEND`` (default: cpu).
- ``op_case`` / ``run_op_case``: the op benchmarks under ``bench/gemm``, ``bench/attention``,
  ``bench/moe`` and ``bench/small``. A file declares the ops it covers (``OPS``); ``op_case`` is
  parametrized over every available backend (or ``HAL_BACKEND`` alone), every case of the shape set
  (``HAL_BENCH_SHAPES``, default ``cpu-small`` on a CPU and ``deepseek-v3`` on an accelerator;
  ``HAL_BENCH_QUICK=1`` keeps the quick shapes only) and every implementation: ``hal`` and each
  baseline of :data:`hal.bench.cases.BASELINES`, grouped per case so pytest-benchmark prints them side
  by side. The cases, inputs and derived figures are :mod:`hal.bench`'s, the same as ``hal bench``;
  each benchmark's ``extra_info`` holds TFLOPS, GB/s, % of peak and, for a baseline, HAL's time over it.
  On an accelerator every call is followed by the backend's ``synchronize()``, so pytest-benchmark's
  wall clock covers the kernels (``hal bench`` times them with device events and an L2 flush instead).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

import hal
from hal.bench.cases import BASELINES, BenchCase, Prepared, cases_for, prepare
from hal.bench.metrics import derive
from hal.bench.peaks import Peaks, peaks_for
from hal.bench.shapes import ShapeSet, default_shape_set, shape_set
from hal.bench.timing import make_timer


@pytest.fixture(scope="session")
def backend() -> hal.Backend:
    return hal.get_backend(os.environ.get("HAL_BACKEND", "cpu"))


# ---------------------------------------------------------------------------------------------------
# Op benchmarks
# ---------------------------------------------------------------------------------------------------


def _backend_names() -> list[str]:
    wanted = os.environ.get("HAL_BACKEND")
    if wanted:
        return [wanted]
    return [b.name for b in hal.backends() if b.available]


def bench_shapes(be: hal.Backend) -> ShapeSet:
    """``HAL_BENCH_SHAPES``, else the device's default set."""
    name = os.environ.get("HAL_BENCH_SHAPES")
    return shape_set(name) if name else default_shape_set(be.device.type)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "op_case" not in metafunc.fixturenames:
        return
    ops = getattr(metafunc.module, "OPS", None)
    if not ops:
        raise pytest.UsageError(f"{metafunc.module.__name__}: declare the ops it benchmarks as OPS = (...)")
    quick = os.environ.get("HAL_BENCH_QUICK") == "1"
    params = []
    for name in _backend_names():
        be = hal.get_backend(name)
        for case, why in cases_for(bench_shapes(be), be, ops, quick=quick):
            marks = [pytest.mark.skip(reason=why)] if why else []
            for impl in ("hal", *BASELINES[case.op]):
                params.append(pytest.param((name, case, impl), id=f"{name}-{case}-{impl}", marks=marks))
    metafunc.parametrize("op_case", params)


@functools.lru_cache(maxsize=1)
def _prepared(name: str, case: BenchCase) -> Prepared:
    # Parameters run case by case, implementation after implementation: one cached case at a time
    # shares its inputs between them and frees them when the next case starts.
    registry = hal.default_registry()
    return prepare(case, registry.get_backend(name), registry.reference_ops())


@functools.cache
def _peaks(name: str) -> Peaks:
    be = hal.get_backend(name)
    return peaks_for(be.device, be.capabilities.device_name, make_timer(be.device, quick=True))


_hal_medians: dict[tuple[str, tuple[str, str, str]], float] = {}


def _rounds(fn: Callable[[], Any]) -> tuple[int, int]:
    """(iterations, rounds): rounds of at least a millisecond, about 0.3 s in all, 5 to 200 rounds."""
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    per_call = max((time.perf_counter() - start) / 3, 1e-7)
    iterations = max(1, int(1e-3 / per_call))
    rounds = max(5, min(200, int(0.3 / (per_call * iterations))))
    return iterations, rounds


@pytest.fixture
def run_op_case(benchmark: Any, op_case: tuple[str, BenchCase, str]) -> Callable[[], None]:
    """Time one implementation of one case with pytest-benchmark and record the derived figures."""

    def run() -> None:
        name, case, impl = op_case
        be = hal.get_backend(name)
        prepared = _prepared(name, case)
        if impl == "hal":
            fn = prepared.fn
        else:
            baseline = next(b for b in prepared.baselines if b.name == impl)
            if baseline.fn is None:
                pytest.skip(f"{impl} unavailable: {baseline.unavailable}")
            fn = baseline.fn
        if be.device.type != "cpu":
            inner, sync = fn, be.synchronize

            def fn() -> Any:
                out = inner()
                sync()
                return out

        benchmark.group = f"{name} {case}"
        if benchmark.disabled:
            benchmark(fn)
            return
        iterations, rounds = _rounds(fn)
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=2)
        median = benchmark.stats.stats.median
        peaks = _peaks(name)
        peak_class = "float8" if prepared.work.peak_dtype.startswith("float8") else prepared.work.peak_dtype
        d = derive(prepared.work, median, peaks.compute_peak(peak_class), peaks.bandwidth)
        benchmark.extra_info.update(
            {
                "backend": name,
                "op": case.op,
                "shape": case.shape.id,
                "dtype": case.dtype,
                "impl": impl,
                "flops": prepared.work.flops,
                "bytes": prepared.work.bytes,
                "tflops": d.tflops,
                "gbps": d.gbps,
                "pct_peak": d.pct_peak,
                "bound": d.bound,
                "peaks": peaks.source,
            }
        )
        if impl == "hal":
            _hal_medians[(name, case.key)] = median
        elif (name, case.key) in _hal_medians:
            benchmark.extra_info["hal_over_baseline"] = _hal_medians[(name, case.key)] / median

    return run
