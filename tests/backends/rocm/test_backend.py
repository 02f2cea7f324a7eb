"""The ROCm build against a simulated ROCm ``torch.cuda`` (no GPU here): capabilities and the runtime ops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hal.errors import BackendLoadError
from hal.ops.catalogue import CATALOGUE
from hal.registry import check_impl_signature
from hal_rocm._backend import build

RUNTIME = {name for name, spec in CATALOGUE.items() if spec.kind == "runtime"}


def _simulate(monkeypatch: pytest.MonkeyPatch, *, gcn: str, count: int = 8) -> None:
    props = SimpleNamespace(
        name="AMD Instinct MI300X", gcnArchName=gcn, total_memory=205_822_885_888, multi_processor_count=304
    )
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


@pytest.mark.parametrize(
    ("gcn", "arch", "fp8"),
    [
        ("gfx942:sramecc+:xnack-", "gfx942", "e4m3fnuz"),
        ("gfx950:sramecc+:xnack-", "gfx950", "e4m3fn"),
        ("gfx90a:sramecc+:xnack-", "gfx90a", None),
    ],
)
def test_capabilities_follow_the_arch(monkeypatch: pytest.MonkeyPatch, gcn: str, arch: str, fp8: str | None) -> None:
    _simulate(monkeypatch, gcn=gcn)
    impl = build()
    caps = impl.capabilities
    assert impl.device == torch.device("cuda")  # ROCm torch drives AMD GPUs as "cuda"
    assert (caps.device_type, caps.arch, caps.fp8_format, caps.dist_backend) == ("cuda", arch, fp8, "nccl")
    assert caps.extra["gcn_arch_name"] == gcn
    assert caps.memory_bytes == 205_822_885_888 and caps.device_count == 8
    assert set(impl.ops) == RUNTIME
    assert all(check_impl_signature(CATALOGUE[op], fn) is None for op, fn in impl.ops.items())


def test_no_visible_device_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate(monkeypatch, gcn="gfx942", count=0)
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "")
    with pytest.raises(BackendLoadError, match=r"sees no AMD GPU.*HIP_VISIBLE_DEVICES"):
        build()


def test_cpu_torch_is_a_load_error() -> None:
    if torch.version.hip is not None:
        pytest.skip("this torch is a ROCm build")
    with pytest.raises(BackendLoadError, match="not a ROCm build; install a ROCm build of torch"):
        build()
