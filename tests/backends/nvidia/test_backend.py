"""The NVIDIA build against a simulated ``torch.cuda`` (no GPU here): capabilities and the runtime ops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hal.errors import BackendLoadError
from hal.ops.catalogue import CATALOGUE
from hal.registry import check_impl_signature
from hal.types import MemoryStats
from hal_nvidia import _backend
from hal_nvidia._backend import build

RUNTIME = {name for name, spec in CATALOGUE.items() if spec.kind == "runtime"}


def _simulate(monkeypatch: pytest.MonkeyPatch, *, cc: tuple[int, int], name: str, count: int = 8) -> None:
    props = SimpleNamespace(name=name, major=cc[0], minor=cc[1], total_memory=85_520_809_984, multi_processor_count=132)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def test_h100_capabilities_and_runtime_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate(monkeypatch, cc=(9, 0), name="NVIDIA H100 80GB HBM3")
    impl = build()
    caps = impl.capabilities
    assert impl.device == torch.device("cuda")
    assert (caps.device_type, caps.arch, caps.fp8_format, caps.dist_backend) == ("cuda", "sm90", "e4m3fn", "nccl")
    assert caps.device_name == "NVIDIA H100 80GB HBM3"
    assert caps.memory_bytes == 85_520_809_984 and caps.device_count == 8 and caps.int8
    assert torch.bfloat16 in caps.dtypes
    # Runtime ops only, each callable exactly as the catalogue declares it.
    assert set(impl.ops) == RUNTIME
    assert all(check_impl_signature(CATALOGUE[op], fn) is None for op, fn in impl.ops.items())


@pytest.mark.parametrize(
    ("cc", "arch", "fp8", "bf16"),
    [((8, 0), "sm80", None, True), ((8, 9), "sm89", "e4m3fn", True), ((7, 0), "sm70", None, False)],
)
def test_arch_fp8_and_bf16_follow_the_compute_capability(
    monkeypatch: pytest.MonkeyPatch, cc: tuple[int, int], arch: str, fp8: str | None, bf16: bool
) -> None:
    _simulate(monkeypatch, cc=cc, name="NVIDIA GPU")
    caps = build().capabilities
    assert (caps.arch, caps.fp8_format, torch.bfloat16 in caps.dtypes) == (arch, fp8, bf16)


def test_memory_stats_reads_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate(monkeypatch, cc=(9, 0), name="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3)
    assert _backend.memory_stats() == MemoryStats(allocated=1, reserved=2, peak=3, total=85_520_809_984)


def test_no_visible_device_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate(monkeypatch, cc=(9, 0), name="NVIDIA H100 80GB HBM3", count=0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(BackendLoadError, match=r"sees no CUDA device.*CUDA_VISIBLE_DEVICES \(''\)"):
        build()


def test_cpu_torch_is_a_load_error() -> None:
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    with pytest.raises(BackendLoadError, match="not a CUDA build; install a CUDA build of torch"):
        build()
