"""``hal_kernels.quant.quantize_fp8`` against the reference ``quantize_fp8``, under the interpreter.

The scales are compared exactly: the kernel computes them with the reference's correctly rounded
fp32 divisions. The fp8 values are compared exactly except for two deviations of the interpreter's
fp32 → fp8 cast (a GPU has neither, so off the interpreter nothing is admitted):

- when rounding carries into the exponent, the interpreter drops the carry and the value comes out
  halved (triton issue 8322): the reference gives a power of two ``2^e``, the kernel ``2^(e-1)``;
- it rounds exact ties away from zero, where the reference rounds them to even: the exact quotient
  ``x / scale`` lies halfway between the two, and the kernel's is the larger in magnitude;
- results in the subnormal range are rounded at normal precision and then truncated: they may be
  one subnormal step off (e4m3fn: 2^-9, e4m3fnuz: 2^-10).

e4m3fnuz has no -0: its sign bit alone, 0x80, is the format's NaN. The interpreter writes a negative
value that its cast truncates to zero as 0x80; that is admitted only where the reference value is
exactly 0 (anywhere else it is a NaN where a number belongs).
"""

from __future__ import annotations

import pytest
import torch

from hal.errors import OpInputError
from hal_kernels import _common, quant
from tests.kernels.conftest import FP8S, reference

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# Interpreter programs are slow; 64 rows per program keeps each launch to a few programs.
SMALL = {"BLOCK_M": 64}


def _quotients(x: torch.Tensor, scales: torch.Tensor, group_size: int, fp8_dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` in fp32, clamped, exactly as the reference computes it before the cast."""
    qmax = torch.finfo(fp8_dtype).max
    per_value = scales.repeat_interleave(group_size, dim=1)[:, : x.shape[1]]
    return (x.float() / per_value).clamp(-qmax, qmax)


def assert_fp8_matches(got: torch.Tensor, want: torch.Tensor, quotients: torch.Tensor) -> None:
    """``got == want`` but for the interpreter's three cast deviations (see the module docstring)."""
    g, w = got.float(), want.float()
    if _common.INTERPRETING and got.dtype == torch.float8_e4m3fnuz:
        # The interpreter's conversion knows no special values: a negative result truncated to zero
        # is written as sign bit alone, 0x80, which e4m3fnuz reads as its NaN. That is the -0 it meant
        # only where the reference is exactly zero; anywhere else it is a NaN for a number.
        nan_bits = got.view(torch.uint8) == 0x80
        wrong = nan_bits & (w != 0)
        assert not wrong.any(), (
            f"{int(wrong.sum())} e4m3fnuz values are 0x80 (NaN) where the reference is not zero, "
            f"e.g. where it is {w[wrong][:5].tolist()}"
        )
        g = torch.where(nan_bits, w, g)
    differ = g != w
    if _common.INTERPRETING:
        fin = torch.finfo(want.dtype)
        dropped_carry = (g * 2 == w) & (torch.frexp(w).mantissa.abs() == 0.5)
        tie_away = (quotients == (g + w) / 2) & (g.abs() > w.abs())
        subnormal_step = (torch.minimum(g.abs(), w.abs()) < fin.tiny) & ((g - w).abs() <= fin.smallest_normal * 2**-3)
        differ &= ~(dropped_carry | tie_away | subnormal_step)
    assert not differ.any(), (
        f"{int(differ.sum())} fp8 values differ, e.g. got {g[differ][:5].tolist()} want {w[differ][:5].tolist()}"
    )


def _check(x: torch.Tensor, group_size: int, fp8_dtype: torch.dtype, config: dict[str, int] | None = None) -> None:
    xq, xs = quant.quantize_fp8(x, group_size=group_size, fp8_dtype=fp8_dtype, config=config or SMALL)
    want_q, want_s = reference(quant, "quantize_fp8")(x, group_size=group_size, fp8_dtype=fp8_dtype)
    assert xq.dtype == fp8_dtype and xq.shape == x.shape and xq.is_contiguous()
    assert xs.dtype == torch.float32 and xs.shape == want_s.shape and xs.is_contiguous()
    # Scales: bit-exact (same fp32 amax, floor and division as the reference).
    torch.testing.assert_close(xs, want_s, rtol=0, atol=0)
    assert_fp8_matches(xq, want_q, _quotients(x, want_s, group_size, fp8_dtype))


@pytest.mark.parametrize("fp8_dtype", FP8S)
@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("m", "k"), [(1, 128), (37, 300), (70, 256)], ids=lambda v: str(v))
def test_matches_reference(m: int, k: int, dtype: torch.dtype, fp8_dtype: torch.dtype) -> None:
    torch.manual_seed(1000 * m + k)
    # Spread magnitudes over several binades so groups get very different scales.
    x = (torch.randn(m, k) * torch.logspace(-2, 2, k)[torch.randperm(k)]).to(dtype)
    _check(x, 128, fp8_dtype)


@pytest.mark.parametrize("fp8_dtype", FP8S)
@pytest.mark.parametrize(("group_size", "k"), [(64, 200), (96, 200), (128, 7168), (512, 300)], ids=lambda v: str(v))
def test_group_sizes(group_size: int, k: int, fp8_dtype: torch.dtype) -> None:
    """Other group sizes (a power of two or not, larger than K), ragged last groups, DeepSeek's K."""
    torch.manual_seed(group_size + k)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    _check(x, group_size, fp8_dtype)


@pytest.mark.parametrize("fp8_dtype", FP8S)
def test_zero_groups_and_extremes(fp8_dtype: torch.dtype) -> None:
    """All-zero groups get the floored scale 1e-4 / fp8_max and zero values; huge and tiny groups."""
    torch.manual_seed(7)
    x = torch.randn(5, 384)
    x[0] = 0.0
    x[1, 128:256] = 0.0
    x[2] *= 1e30
    x[3] *= 1e-30
    x[4, :128] = 1e-6  # below the amax floor: scaled by 1e-4 / fp8_max, not by its own amax
    _check(x, 128, fp8_dtype)
    xq, xs = quant.quantize_fp8(x, fp8_dtype=fp8_dtype, config=SMALL)
    assert torch.all(xq[0].float() == 0) and torch.all(xs[0] == xs[1, 1])


def test_row_strided_input() -> None:
    """Rows need not be adjacent (a slice of a wider buffer); only K must have stride 1."""
    torch.manual_seed(3)
    wide = torch.randn(9, 512)
    x = wide[:, 64:320]
    assert not x.is_contiguous()
    _check(x, 128, torch.float8_e4m3fn, {"BLOCK_M": 16})


def test_default_config_runs() -> None:
    torch.manual_seed(4)
    _check(torch.randn(3, 256), 128, torch.float8_e4m3fn, dict(quant.DEFAULT_CONFIG))


def test_empty_input() -> None:
    xq, xs = quant.quantize_fp8(torch.randn(0, 256))
    assert xq.shape == (0, 256) and xs.shape == (0, 2)


# ---------------------------------------------------------------------------------------------------
# Launcher errors
# ---------------------------------------------------------------------------------------------------


def test_rejects_unknown_config_key() -> None:
    with pytest.raises(OpInputError, match=r"quantize_fp8: config: unknown keys \['BLOCK_N'\]"):
        quant.quantize_fp8(torch.randn(2, 128), config={"BLOCK_N": 64})


def test_rejects_bad_block() -> None:
    with pytest.raises(OpInputError, match="BLOCK_M must be a power of two"):
        quant.quantize_fp8(torch.randn(2, 128), config={"BLOCK_M": 24})


def test_rejects_strided_k() -> None:
    with pytest.raises(OpInputError, match=r"quantize_fp8: x: must have stride 1 along K"):
        quant.quantize_fp8(torch.randn(256, 4).t())


def test_rejects_cpu_tensors_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "INTERPRETING", False)
    with pytest.raises(OpInputError, match=r"quantize_fp8: x: is on the CPU"):
        quant.quantize_fp8(torch.randn(2, 128))


def test_ops_and_compile_specs() -> None:
    assert quant.OPS == {"quantize_fp8": quant.quantize_fp8}
    specs = quant.compile_specs("*fp8e4b8", {"quantize_fp8": {"BLOCK_M": 32}})
    assert [s.name for s in specs] == ["quantize_fp8[bf16 in]", "quantize_fp8[fp16 in]", "quantize_fp8[fp32 in]"]
    assert [s.signature["x_ptr"] for s in specs] == ["*bf16", "*fp16", "*fp32"]
    assert all(s.signature["q_ptr"] == "*fp8e4b8" and s.constexprs["FNUZ"] for s in specs)
    assert all(s.constexprs["BLOCK_M"] == 32 and s.constexprs["FP8_MAX"] == 240.0 for s in specs)
    with pytest.raises(OpInputError, match="unknown keys"):
        quant.compile_specs("*fp8e4nv", {"quantize_fp8": {"BLOCK_Q": 1}})


def test_fp8_checker_admits_0x80_only_for_a_zero_reference() -> None:
    """``assert_fp8_matches`` itself: e4m3fnuz's NaN byte passes for a reference 0 (the interpreter's -0)
    and fails anywhere else, even one subnormal step away."""
    want = torch.tensor([0.0, -0.0009765625, 1.0], dtype=torch.float8_e4m3fnuz)  # 0, -2^-10, 1
    got = want.clone()
    got.view(torch.uint8)[0] = 0x80
    assert_fp8_matches(got, want, want.float())
    got.view(torch.uint8)[1] = 0x80
    with pytest.raises(AssertionError, match=r"0x80 \(NaN\) where the reference is not zero"):
        assert_fp8_matches(got, want, want.float())
