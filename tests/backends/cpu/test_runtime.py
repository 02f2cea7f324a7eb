"""Tests of the CPU backend's runtime ops (:mod:`hal_cpu.runtime`)."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from hal.ops.catalogue import CATALOGUE
from hal.types import MemoryStats
from hal_cpu import runtime


def test_runtime_ops_cover_the_catalogue_with_its_signatures() -> None:
    expected = {name for name, spec in CATALOGUE.items() if spec.kind == "runtime"}
    assert set(runtime.RUNTIME_OPS) == expected
    for name, fn in runtime.RUNTIME_OPS.items():
        want = [(p.name, p.kind, p.default) for p in CATALOGUE[name].signature.parameters.values()]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
        assert got == want, name


def test_device_count_is_one() -> None:
    assert runtime.device_count() == 1


def test_synchronize_and_empty_cache_are_no_ops() -> None:
    assert runtime.synchronize() is None
    assert runtime.empty_cache() is None


def test_memory_stats() -> None:
    stats = runtime.memory_stats()
    assert isinstance(stats, MemoryStats)
    for name, value in stats._asdict().items():
        assert value is None or (isinstance(value, int) and value > 0), (name, value)
    assert stats.allocated == stats.reserved  # no caching allocator
    if stats.peak is not None and stats.allocated is not None:
        assert stats.peak >= stats.allocated
    if stats.total is not None:
        assert stats.total == runtime.total_memory()
        if stats.peak is not None:
            assert stats.total > stats.peak


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="exact figures are read on Linux")
def test_memory_stats_on_linux_are_known_and_track_allocation() -> None:
    before = runtime.memory_stats()
    assert None not in before
    assert before.total is not None and before.total > 0
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched so it is resident
    after = runtime.memory_stats()
    assert after.allocated is not None and before.allocated is not None
    assert after.allocated - before.allocated >= 32 * 2**20
    assert after.peak is not None and after.peak >= after.allocated
    del block


@pytest.mark.parametrize(("shape", "dtype"), [((2, 3), torch.float32), ([0], torch.bfloat16), ((4,), torch.uint8)])
def test_pinned_empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> None:
    t = runtime.pinned_empty(shape, dtype)
    assert t.shape == tuple(shape)
    assert t.dtype == dtype
    assert t.device.type == "cpu"
