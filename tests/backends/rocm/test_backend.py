"""The ROCm build against a simulated ROCm ``torch.cuda`` (no GPU here): capabilities, the runtime ops,
the kernel ops with this backend's tuning (wave64), and the op plan ``hal info`` shows without the GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hal.cli import format_info, info_data
from hal.errors import BackendLoadError
from hal.ops.catalogue import CATALOGUE
from hal.registry import Registry, check_impl_signature
from hal_kernels._tuning import load_tuning
from hal_rocm._backend import TUNING_DIR, build, kernel_ops_for, plan

RUNTIME = {name for name, spec in CATALOGUE.items() if spec.kind == "runtime"}
KERNEL_OPS = set(kernel_ops_for("gfx942", "e4m3fnuz"))
FP8_OPS = {op for op in KERNEL_OPS if "fp8" in op}


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
    # gfx90a (MI200) has no fp8: those ops fall back to the reference.
    assert set(impl.ops) == RUNTIME | (KERNEL_OPS if fp8 else KERNEL_OPS - FP8_OPS)
    assert all(check_impl_signature(CATALOGUE[op], fn) is None for op, fn in impl.ops.items())
    tuning = load_tuning(TUNING_DIR, arch)
    for op in KERNEL_OPS & set(impl.ops):
        fn = impl.ops[op].__wrapped__ if "fp8" in op else impl.ops[op]  # fp8 ops: inside the format guard
        assert fn.keywords == {"config": tuning[op]}, op


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


# ---------------------------------------------------------------------------------------------------
# The plan: the op table without a device
# ---------------------------------------------------------------------------------------------------


def test_plan_defaults_to_gfx942_with_kernels_and_runtime_ops() -> None:
    table = plan(None)
    assert table.arch == "gfx942"  # type: ignore[attr-defined]
    assert FP8_OPS and set(table) == RUNTIME | KERNEL_OPS
    assert table["mla_decode"] == "hal_kernels.mla_decode:mla_decode"
    assert table["memory_stats"] == "hal_rocm._backend:memory_stats"
    assert set(plan("gfx950")) == RUNTIME | KERNEL_OPS
    assert set(plan("gfx90a")) == RUNTIME | (KERNEL_OPS - FP8_OPS)
    with pytest.raises(ValueError, match="serves AMD architectures"):
        plan("sm_90")


def test_hal_info_shows_the_unavailable_backends_plan() -> None:
    if torch.version.hip is not None:
        pytest.skip("this torch is a ROCm build: rocm may be available here")
    data = info_data(Registry())
    rocm = {b["name"]: b for b in data["backends"]}["rocm"]
    assert rocm["available"] is False and "ROCm build of torch" in rocm["reason"]
    assert rocm["plan"]["arch"] == "gfx942"
    ops = rocm["plan"]["ops"]
    assert {op for op, e in ops.items() if e["source"] == "kernel"} == KERNEL_OPS
    assert {op for op, e in ops.items() if e["source"] == "runtime"} == RUNTIME
    assert {e["source"] for op, e in ops.items() if op not in KERNEL_OPS | RUNTIME} == {"fallback"}
    text = format_info(data)
    assert "Backend rocm (unavailable): ops it would serve on gfx942" in text
    gfx90a = {b["name"]: b for b in info_data(Registry(), arch="gfx90a")["backends"]}["rocm"]
    assert gfx90a["plan"]["ops"]["grouped_gemm_fp8"]["source"] == "fallback"


def test_fp8_ops_refuse_the_other_fp8_format() -> None:
    from hal.errors import DTypeError

    ops = kernel_ops_for("gfx942", "e4m3fnuz")
    x = torch.zeros(4, 128)
    with pytest.raises(DTypeError, match=r"quantize_fp8: this device computes in torch\.float8_e4m3fnuz"):
        ops["quantize_fp8"](x, fp8_dtype=torch.float8_e4m3fn)
    # gfx950 is OCP e4m3fn, like NVIDIA.
    q = torch.zeros(4, 128, dtype=torch.float8_e4m3fnuz)
    with pytest.raises(DTypeError, match=r"gemm_fp8: .*not torch\.float8_e4m3fnuz"):
        kernel_ops_for("gfx950", "e4m3fn")["gemm_fp8"](q, torch.ones(4, 1), q, torch.ones(1, 1))
