"""Dispatch overhead: ``backend.gemm(x, w)`` against ``F.linear(x, w)`` on 64×64 fp32.

At this size the matmul takes a few microseconds, so whatever HAL adds per call shows. Two costs are
measured separately, in the same run, with the same settings:

- **dispatch** (``validate=False``): the op table hands back a plain callable, so a call costs the
  implementation's own Python frame (the reference's dtype branch) and nothing else. pluggy is not on
  this path (a pluggy hook call alone costs ~8 µs). Goal: median ratio ≤ 1.10.
- **dispatch + contract validation** (the default): the op's contract reads the operands' ranks,
  sizes, dtypes and devices before calling the implementation, about eight tensor attribute reads.
  Reported; held to ≤ 1.25 so that a regression in the checks' cost shows.

Run with ``make bench``. The ratios are printed and checked after the three benchmarks ran.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hal
from hal.registry import Registry

DISPATCH_GOAL = 1.10
VALIDATED_CEILING = 1.25
SHAPE = (64, 64)
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def operands() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(*SHAPE, generator=g), torch.randn(*SHAPE, generator=g)


def _run(benchmark, fn, x: torch.Tensor, w: torch.Tensor, key: str) -> None:  # type: ignore[no-untyped-def]
    if benchmark.disabled:  # --benchmark-disable: one call, as a smoke test; no stats to record
        benchmark(fn, x, w)
        return
    # Many calls per round spread the timer's own cost thin; the same settings for every side.
    benchmark.pedantic(fn, args=(x, w), rounds=300, iterations=200, warmup_rounds=20)
    _medians[key] = benchmark.stats.stats.median


@pytest.mark.benchmark(group="dispatch-gemm-64x64-fp32")
def test_f_linear(benchmark, operands) -> None:  # type: ignore[no-untyped-def]
    _run(benchmark, F.linear, *operands, key="F.linear")


@pytest.mark.benchmark(group="dispatch-gemm-64x64-fp32")
def test_hal_gemm_validated(benchmark, operands, backend: hal.Backend) -> None:  # type: ignore[no-untyped-def]
    assert backend.validate, "HAL_VALIDATE=0 is set; this benchmark measures the default"
    _run(benchmark, backend.gemm, *operands, key="validated")


@pytest.mark.benchmark(group="dispatch-gemm-64x64-fp32")
def test_hal_gemm_dispatch_only(benchmark, operands, backend: hal.Backend) -> None:  # type: ignore[no-untyped-def]
    unchecked = Registry(validate=False).get_backend(backend.name)
    _run(benchmark, unchecked.gemm, *operands, key="dispatch")


def test_dispatch_ratios(request: pytest.FixtureRequest, backend: hal.Backend) -> None:
    if set(_medians) != {"F.linear", "validated", "dispatch"}:
        if request.config.getoption("benchmark_disable", False):
            pytest.skip("--benchmark-disable: no medians to compare")
        pytest.fail("run the whole file with benchmarks enabled: the ratios need all three measurements")
    dispatch = _medians["dispatch"] / _medians["F.linear"]
    validated = _medians["validated"] / _medians["F.linear"]
    print(
        f"\n{backend.name}.gemm vs F.linear, 64x64 fp32, median per call: "
        f"F.linear {_medians['F.linear'] * 1e6:.2f} us; "
        f"dispatch only {dispatch:.3f}x (goal <= {DISPATCH_GOAL}); "
        f"with validation (default) {validated:.3f}x (ceiling {VALIDATED_CEILING})"
    )
    assert dispatch <= DISPATCH_GOAL, f"dispatch overhead {dispatch:.3f}x exceeds the goal {DISPATCH_GOAL}x"
    assert validated <= VALIDATED_CEILING, f"validated call {validated:.3f}x exceeds {VALIDATED_CEILING}x"
