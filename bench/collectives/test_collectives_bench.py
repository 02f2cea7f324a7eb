"""Collectives over a 2-process gloo group: all_reduce and all_to_all, against plain torch.distributed.

This process is rank 0 and times the calls with pytest-benchmark; rank 1 is spawned once for the
module and makes the matching calls on command (:class:`hal.bench.collectives.Pair`). Payloads are the
shape set's (``HAL_BENCH_SHAPES``, default per device): all_reduce of ``[tokens, hidden]`` activations,
all_to_all of DeepEP's FP8 dispatch and bf16 combine rows, and HAL's ``ep_dispatch`` (FP8) and
``ep_combine`` (bf16) on the same shapes. ``extra_info`` holds the bytes per call (the anchors'
formulas), algbw and busbw (nccl-tests' conventions) and, on the baseline, HAL's time over plain
torch.distributed's on the same bytes (``all_reduce``, ``all_to_all_single``; for dispatch / combine
the bytes the op really moves, with its splits: see :mod:`hal.bench.collectives`).

Backends whose collectives are not gloo (nccl, hccl: one device per rank) are skipped: run those under
torchrun. ``--benchmark-cprofile`` is not supported here (it adds calls rank 1 does not know of).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import hal
from hal.bench.collectives import HAL_IMPLS, IMPLS, Pair, bandwidth, call, nbytes, op_shapes, payload, timed_rounds
from hal.bench.shapes import ShapeSet, default_shape_set, shape_set

pytestmark = pytest.mark.distributed


def _shapes(device_type: str) -> ShapeSet:
    name = os.environ.get("HAL_BENCH_SHAPES")
    return shape_set(name) if name else default_shape_set(device_type)


def _dtype(shapes: ShapeSet) -> torch.dtype:
    dt = getattr(torch, shapes.dtype)
    assert isinstance(dt, torch.dtype)
    return dt


# Parameters are taken from the default device's shape set at collection; the fixture re-reads it.
_SET = _shapes(hal.get_backend(os.environ.get("HAL_BACKEND", "cpu")).device.type)
PARAMS = [
    pytest.param(op, i, impl, id=f"{op}-{shape.id}-{impl}")
    for op in IMPLS
    for i, shape in enumerate(op_shapes(_SET, op))
    for impl in IMPLS[op]
]
_hal: dict[tuple[str, int, str], float] = {}


@pytest.fixture(scope="module")
def pair(backend: hal.Backend) -> Iterator[Pair]:
    if backend.capabilities.dist_backend != "gloo":
        pytest.skip(f"backend {backend.name!r} uses {backend.capabilities.dist_backend}: run under torchrun")
    group = Pair(backend, _SET.name, _dtype(_SET))
    try:
        yield group
    finally:
        group.close()


@pytest.mark.parametrize(("op", "shape_index", "impl"), PARAMS)
def test_collective(benchmark: Any, pair: Pair, op: str, shape_index: int, impl: str) -> None:
    if benchmark.cprofile:
        pytest.skip("--benchmark-cprofile adds calls that rank 1 cannot match")
    shape = op_shapes(_SET, op)[shape_index]
    t = payload(op, shape, _dtype(_SET), pair.backend.device, rank=0)
    inner = call(pair.backend, op, impl, t)
    calls = 0

    def fn() -> None:
        nonlocal calls
        calls += 1
        inner()

    size = nbytes(t)
    rounds = 1 if benchmark.disabled else timed_rounds(size)
    warmup = 0 if benchmark.disabled else 2
    planned = rounds + warmup
    pair.announce(op, shape_index, impl, planned)
    benchmark.group = f"{op} {shape.id}"
    try:
        # iterations=1: pytest-benchmark then makes exactly warmup_rounds + rounds calls.
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    finally:
        while calls < planned:  # rank 1 is waiting for the calls it was told of
            fn()
    assert calls == planned, f"made {calls} calls, rank 1 was told {planned}"
    if benchmark.disabled:
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({"op": op, "shape": shape.id, "impl": impl, **bandwidth(op, t, median, impl)})
    if impl in HAL_IMPLS:
        _hal[(op, shape_index, impl)] = median
        return
    # HAL's time over plain torch.distributed's on the same bytes (below 1: HAL is faster), per HAL mode.
    for hal_impl in HAL_IMPLS:
        if (op, shape_index, hal_impl) in _hal:
            key = "hal_over_baseline" if hal_impl == "hal" else f"{hal_impl.replace('-', '_')}_over_baseline"
            benchmark.extra_info[key] = _hal[(op, shape_index, hal_impl)] / median
