"""hal_kernels.fused (rms_norm, rotary, silu_and_mul) against hal_cpu.reference.small under the interpreter.

Kernel and oracle do the same fp32 math on the same upcast inputs; they differ only in reduction order
and in the last ulp of rsqrt / exp (measured: at most 4e-7 relative in fp32). Tolerances by output
dtype (``TOL``): fp32 1e-5 (DESIGN.md's bound; many ulps of margin); bf16 and fp16 one ulp of the
output type (2^-7, 2^-10 relative). One ulp is also the interpreter's own error for bf16: its
fp32 -> bf16 store truncates where torch and the GPU round to nearest even (about half of all values
differ by one ulp, even with ``fp_downcast_rounding="rtne"``; seen with triton 3.7.1).
"""

from __future__ import annotations

import math

import pytest
import torch

from hal.errors import OpInputError
from hal_kernels import _common, fused
from tests.kernels.conftest import reference

RMS_NORM = reference(fused, "rms_norm")
ROTARY = reference(fused, "rotary")
SILU_AND_MUL = reference(fused, "silu_and_mul")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
}


def _gen(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(sum(k * 7919**i for i, k in enumerate(key)) % 2**31)


# ---------------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------------

NORM_SHAPES = [(1, 7), (37, 100), (3, 5, 512), (4, 1536)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=["x".join(map(str, s)) for s in NORM_SHAPES])
def test_rms_norm(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = _gen(*shape, dtype.itemsize)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    got = fused.rms_norm(x, weight, eps=1e-5, config={"BLOCK_M": 8})
    want = RMS_NORM(x, weight, eps=1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_rms_norm_mixed_weight_default_config_and_strides() -> None:
    gen = _gen(1)
    # bf16 activations, fp32 weight (a checkpoint's norm kept in fp32); default config: a row per program.
    x = torch.randn(5, 96, generator=gen).to(torch.bfloat16)
    w = torch.randn(96, generator=gen)
    torch.testing.assert_close(fused.rms_norm(x, w), RMS_NORM(x, w), **TOL[torch.bfloat16])
    # Rows with a stride (a slice of a wider tensor), and a transposed x (copied by the launcher).
    wide = torch.randn(9, 160, generator=gen)
    tall = torch.randn(96, 20, generator=gen)
    for xs in (wide[:, 16:112], tall[:, :9].t()):
        got = fused.rms_norm(xs, w, config={"BLOCK_M": 4})
        torch.testing.assert_close(got, RMS_NORM(xs, w), **TOL[torch.float32])
    assert fused.rms_norm(torch.randn(0, 96), w).shape == (0, 96)


# ---------------------------------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------------------------------


def _cos_sin_cache(max_pos: int, d: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).float()


# x shapes [T, ..., D]: DeepSeek's rope dim 64 with heads, a 2-D x (the shared k_pe), D/2 = 5 (not a
# power of two), two middle dims.
ROPE_SHAPES = [(7, 5, 64), (1, 64), (9, 3, 10), (4, 2, 3, 16)]


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=["x".join(map(str, s)) for s in ROPE_SHAPES])
def test_rotary(shape: tuple[int, ...], dtype: torch.dtype, interleaved: bool) -> None:
    gen = _gen(*shape, dtype.itemsize, interleaved)
    max_pos = 4096
    x = torch.randn(shape, generator=gen).to(dtype)
    positions = torch.randint(0, max_pos, (shape[0],), generator=gen)
    cache = _cos_sin_cache(max_pos, shape[-1])
    got = fused.rotary(x, positions, cache, interleaved=interleaved, config={"BLOCK_H": 4})
    want = ROTARY(x, positions, cache, interleaved=interleaved)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_rotary_rope_slice_of_q_int32_positions() -> None:
    """MLA's q_pe is the last 64 values of each head's 192: a strided view, rotated without a copy."""
    gen = _gen(2)
    t, h = 6, 16
    q = torch.randn(t, h, 192, generator=gen).to(torch.bfloat16)
    q_pe = q[..., 128:]
    positions = torch.randint(0, 512, (t,), generator=gen, dtype=torch.int32)
    cache = _cos_sin_cache(512, 64)
    got = fused.rotary(q_pe, positions, cache)  # default config
    torch.testing.assert_close(got, ROTARY(q_pe, positions, cache), **TOL[torch.bfloat16])
    # YaRN-style magnitude folded into the cache: the kernel must not assume cos² + sin² = 1.
    scaled = cache * (0.1 * math.log(40) + 1)
    got = fused.rotary(q_pe, positions, scaled, interleaved=False)
    torch.testing.assert_close(got, ROTARY(q_pe, positions, scaled, interleaved=False), **TOL[torch.bfloat16])


# ---------------------------------------------------------------------------------------------------
# silu_and_mul
# ---------------------------------------------------------------------------------------------------

SILU_SHAPES = [(1, 2), (37, 200), (2, 3, 128), (5, 2 * 1100)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SILU_SHAPES, ids=["x".join(map(str, s)) for s in SILU_SHAPES])
def test_silu_and_mul(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = _gen(*shape, dtype.itemsize)
    x = (torch.randn(shape, generator=gen) * 4).to(dtype)  # reaches silu's saturated tails
    got = fused.silu_and_mul(x, config={"BLOCK_M": 16, "BLOCK_N": 512})
    want = SILU_AND_MUL(x)
    assert got.dtype == dtype and got.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(got, want, **TOL[dtype])


# The interpreter's numpy exp warns where it overflows to inf, which is the case under test.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_silu_and_mul_default_config_strided_rows_and_extremes() -> None:
    gen = _gen(3)
    wide = torch.randn(6, 300, generator=gen) * 4
    x = wide[:, :256]  # row stride 300
    torch.testing.assert_close(fused.silu_and_mul(x), SILU_AND_MUL(x), **TOL[torch.float32])
    # Large |gate|: exp overflows to inf on the negative side; silu must give -0, not NaN.
    x = torch.tensor([[-200.0, 200.0, -5.0, 2.0, 3.0, 1.0]])
    torch.testing.assert_close(fused.silu_and_mul(x), SILU_AND_MUL(x), **TOL[torch.float32])
    assert fused.silu_and_mul(torch.randn(0, 8)).shape == (0, 4)


# ---------------------------------------------------------------------------------------------------
# Launcher errors and compile specs
# ---------------------------------------------------------------------------------------------------


def test_unknown_config_key_is_an_error() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(OpInputError, match=r"rms_norm: config: unknown keys \['BLOCK_N'\]"):
        fused.rms_norm(x, torch.ones(8), config={"BLOCK_N": 4})
    with pytest.raises(OpInputError, match="rotary: config"):
        fused.rotary(x, torch.zeros(2, dtype=torch.int64), torch.ones(4, 8), config={"BLOCK_M": 4})
    with pytest.raises(OpInputError, match="silu_and_mul: config"):
        fused.silu_and_mul(x, config={"BLOCK_D": 4})


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "INTERPRETING", False)
    x = torch.randn(2, 8)
    with pytest.raises(OpInputError, match="rms_norm: x: is on the CPU"):
        fused.rms_norm(x, torch.ones(8))
    with pytest.raises(OpInputError, match="rotary: x: is on the CPU"):
        fused.rotary(x, torch.zeros(2, dtype=torch.int64), torch.ones(4, 8))
    with pytest.raises(OpInputError, match="silu_and_mul: x: is on the CPU"):
        fused.silu_and_mul(x)


def test_compile_specs_cover_every_kernel() -> None:
    specs = fused.compile_specs("*fp8e4nv", {"rms_norm": {"num_warps": 2}})
    assert {s.kernel for s in specs} == {fused._rms_norm_kernel, fused._rotary_kernel, fused._silu_and_mul_kernel}
    assert {s.num_warps for s in specs if s.kernel is fused._rms_norm_kernel} == {2}
    # num_warps 0 (the default): a 7168-wide row gets enough warps not to spill.
    auto = fused.compile_specs("*fp8e4nv", {})
    assert max(s.num_warps for s in auto if s.kernel is fused._rms_norm_kernel) == 16
    for s in specs:
        assert list(s.signature) == s.kernel.arg_names
        assert {k for k, v in s.signature.items() if v == "constexpr"} == set(s.constexprs)
    names = {s.name for s in specs}
    # DeepSeek-V3's q_lora_rank (1536) and every float dtype the launchers take.
    assert {"rms_norm[bf16, D=1536]", "rms_norm[fp16, D=7168]", "silu_and_mul[fp16]"} <= names
    assert "rotary[bf16, interleaved, D=64, i32 positions]" in names
