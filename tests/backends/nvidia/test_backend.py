"""The NVIDIA build against a simulated ``torch.cuda`` (no GPU here): capabilities, the runtime ops, the
kernel ops with this backend's tuning, and the op plan ``hal info`` shows without the GPU."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hal.cli import format_info, info_data
from hal.errors import BackendLoadError
from hal.ops.catalogue import CATALOGUE
from hal.registry import Registry, check_impl_signature
from hal.types import MemoryStats
from hal_kernels._tuning import load_tuning
from hal_nvidia import _backend, cublas
from hal_nvidia._backend import build, kernel_ops_for, plan

RUNTIME = {name for name, spec in CATALOGUE.items() if spec.kind == "runtime"}
KERNEL_OPS = set(kernel_ops_for("sm_90", "e4m3fn"))
FP8_OPS = {op for op in KERNEL_OPS if "fp8" in op}
#: ops the backend serves itself besides the shared kernels: cuBLAS gemm.
OWN_OPS = {"gemm"}


def _unguarded(op: str, fn: Any) -> Any:
    """The implementation inside the backend's fp8-format guard (every fp8 op has one)."""
    return fn.__wrapped__ if "fp8" in op else fn


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
    # Runtime ops and the kernel ops, each callable exactly as the catalogue declares it.
    assert set(impl.ops) == RUNTIME | KERNEL_OPS | OWN_OPS
    assert impl.ops["gemm"] is cublas.gemm
    assert all(check_impl_signature(CATALOGUE[op], fn) is None for op, fn in impl.ops.items())


def test_kernel_ops_carry_the_sm90_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate(monkeypatch, cc=(9, 0), name="NVIDIA H100 80GB HBM3")
    ops = build().ops
    tuning = load_tuning(_backend.TUNING_DIR, "sm_90")
    assert FP8_OPS and KERNEL_OPS <= set(tuning)
    for op in KERNEL_OPS:
        assert _unguarded(op, ops[op]).keywords == {"config": tuning[op]}, op
        assert ops[op].__module__.startswith("hal_kernels."), op


@pytest.mark.parametrize(
    ("cc", "arch", "fp8", "bf16"),
    [((8, 0), "sm80", None, True), ((8, 9), "sm89", "e4m3fn", True), ((7, 0), "sm70", None, False)],
)
def test_arch_fp8_and_bf16_follow_the_compute_capability(
    monkeypatch: pytest.MonkeyPatch, cc: tuple[int, int], arch: str, fp8: str | None, bf16: bool
) -> None:
    _simulate(monkeypatch, cc=cc, name="NVIDIA GPU")
    impl = build()
    caps = impl.capabilities
    assert (caps.arch, caps.fp8_format, torch.bfloat16 in caps.dtypes) == (arch, fp8, bf16)
    # FP8 kernels only where the GPU has fp8; without it those ops fall back to the reference.
    assert set(impl.ops) == RUNTIME | OWN_OPS | (KERNEL_OPS if fp8 else KERNEL_OPS - FP8_OPS)


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


# ---------------------------------------------------------------------------------------------------
# The plan: the op table without a device
# ---------------------------------------------------------------------------------------------------


def test_plan_defaults_to_sm90_with_kernels_and_runtime_ops() -> None:
    table = plan(None)
    assert table.arch == "sm_90"  # type: ignore[attr-defined]
    assert set(table) == RUNTIME | KERNEL_OPS | OWN_OPS
    assert table["gemm_fp8"] == "hal_kernels.gemm:gemm_fp8"
    assert table["gemm"] == "hal_nvidia.cublas:gemm"
    assert table["quantize_fp8"] == "hal_kernels.quant:quantize_fp8"
    assert table["device_count"] == "hal_nvidia._backend:device_count"


def test_plan_for_sm80_leaves_fp8_to_the_reference_and_rejects_amd_archs() -> None:
    assert set(plan("sm80")) == RUNTIME | OWN_OPS | (KERNEL_OPS - FP8_OPS)
    assert set(plan("sm_100")) == RUNTIME | OWN_OPS | KERNEL_OPS
    with pytest.raises(ValueError, match="serves NVIDIA architectures"):
        plan("gfx942")


def test_hal_info_shows_the_unavailable_backends_plan() -> None:
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build: nvidia may be available here")
    data = info_data(Registry())
    nvidia = {b["name"]: b for b in data["backends"]}["nvidia"]
    assert nvidia["available"] is False and nvidia["reason"]
    assert "ops" not in nvidia  # no built table: nothing was built
    assert nvidia["plan"]["arch"] == "sm_90"
    ops = nvidia["plan"]["ops"]
    assert list(ops) == list(CATALOGUE)
    assert {op for op, e in ops.items() if e["source"] == "kernel"} == KERNEL_OPS
    assert {op for op, e in ops.items() if e["source"] == "runtime"} == RUNTIME
    assert ops["gemm"] == {"impl": "hal_nvidia.cublas:gemm", "source": "native"}
    assert ops["all_reduce"] == {"impl": "hal_cpu.reference.collectives:all_reduce", "source": "fallback"}
    text = format_info(data)
    assert "Backend nvidia (unavailable): ops it would serve on sm_90" in text
    assert "hal_kernels.mla_decode:mla_decode" in text
    sm80 = {b["name"]: b for b in info_data(Registry(), arch="sm_80")["backends"]}
    assert sm80["nvidia"]["plan"]["arch"] == "sm_80"
    assert sm80["nvidia"]["plan"]["ops"]["gemm_fp8"]["source"] == "fallback"
    assert "error" in sm80["rocm"]["plan"]  # an NVIDIA arch asked of the AMD backend: said, not a crash


# ---------------------------------------------------------------------------------------------------
# The backend's own choices: CUDA C quantization, cuBLAS or Triton for gemm_fp8
# ---------------------------------------------------------------------------------------------------


def test_quant_impl_env_selects_the_cuda_c_kernel_in_build_and_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_NVIDIA_QUANT_IMPL", "cuda")
    # plan() describes the choice even where CuPy is missing; build() would refuse without CuPy.
    assert plan("sm_90")["quantize_fp8"] == "hal_nvidia.cuda_kernels:quantize_fp8"
    ops = _backend.native_ops("sm_90", "e4m3fn", quantize_impl="cuda")
    assert ops["quantize_fp8"].keywords["fallback"].__wrapped__.keywords == {
        "config": load_tuning(_backend.TUNING_DIR, "sm_90")["quantize_fp8"]
    }
    # No fp8 on the GPU: no fp8 quantization to serve, whatever the variable says.
    assert "quantize_fp8" not in _backend.native_ops("sm_80", None, quantize_impl="cuda")


def test_fp8_gemm_follows_the_measured_choice_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def triton_gemm_fp8(xq, xs, wq, ws, *, out_dtype=torch.bfloat16):  # type: ignore[no-untyped-def]
        calls.append("triton")
        return torch.zeros(xq.shape[0], wq.shape[0], dtype=out_dtype)

    def fake_scaled_mm(xq, xs, wq, ws, *, out_dtype=torch.bfloat16):  # type: ignore[no-untyped-def]
        calls.append("cublas")
        return torch.ones(xq.shape[0], wq.shape[0], dtype=out_dtype)

    import hal_nvidia.gemm_choice as gc

    monkeypatch.setattr(gc, "scaled_mm_blockwise", fake_scaled_mm)
    # Nothing to choose: the Triton kernel itself is the op (no wrapper on the hot path).
    assert cublas.fp8_gemm_op(triton_gemm_fp8, None) is triton_gemm_fp8
    op = cublas.fp8_gemm_op(triton_gemm_fp8, lambda m, n, k: "cublas" if m >= 64 else "triton")
    assert check_impl_signature(CATALOGUE["gemm_fp8"], op) is None
    w = torch.zeros(256, 128, dtype=torch.float8_e4m3fn)
    ws = torch.ones(2, 1)
    for m in (1, 64):
        out = op(torch.zeros(m, 128, dtype=torch.float8_e4m3fn), torch.ones(m, 1), w, ws, out_dtype=torch.float32)
        assert out.shape == (m, 256) and out.dtype == torch.float32
    assert calls == ["triton", "cublas"]


def test_cublas_gemm_matches_the_reference() -> None:
    from hal_cpu.reference.gemm import gemm as reference_gemm

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 48, generator=g), torch.randn(7, 48, generator=g)
    torch.testing.assert_close(cublas.gemm(x, w), reference_gemm(x, w), rtol=1e-5, atol=1e-5)
    assert cublas.gemm(x, w, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    # bf16 inputs, fp32 out: the fp32 accumulation itself, not a bf16 result widened.
    xb, wb = x.bfloat16(), w.bfloat16()
    exact = xb.float() @ wb.float().t()
    out = cublas.gemm(xb, wb, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, out.bfloat16().float())  # it carries more than bf16's 8 bits


def test_fp8_ops_refuse_amds_fnuz_format_with_a_clear_error() -> None:
    from hal.errors import DTypeError

    ops = _backend.native_ops("sm_90", "e4m3fn")
    fp8_ops = {op for op in ops if "fp8" in op}
    assert fp8_ops == FP8_OPS
    # Still each op's own implementation for hal info, with the catalogue's signature.
    assert plan("sm_90")["gemm_fp8"] == "hal_kernels.gemm:gemm_fp8"
    assert all(check_impl_signature(CATALOGUE[op], ops[op]) is None for op in fp8_ops)
    x = torch.zeros(4, 128)
    with pytest.raises(DTypeError, match=r"quantize_fp8: this device computes in torch\.float8_e4m3fn"):
        ops["quantize_fp8"](x, fp8_dtype=torch.float8_e4m3fnuz)
    q = torch.zeros(4, 128, dtype=torch.float8_e4m3fnuz)
    with pytest.raises(DTypeError, match=r"gemm_fp8: .*not torch\.float8_e4m3fnuz"):
        ops["gemm_fp8"](q, torch.ones(4, 1), q, torch.ones(1, 1))
