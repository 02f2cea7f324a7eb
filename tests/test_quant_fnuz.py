"""e4m3fn → e4m3fnuz (MI300's fp8), checked over every one of the 256 codes, and the per-format maximum.

The expected values come from a decoder written here from the two formats' definitions (sign, 4
exponent bits, 3 mantissa bits; bias 7 with NaN at S.1111.111 for e4m3fn, bias 8 with the only NaN at
1.0000.000 for e4m3fnuz), so the test does not rest on torch's fp8 casts alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from hal.errors import DTypeError
from hal.quant import dequantize_fp8_blocks, e4m3fn_to_fnuz, fp8_max, quantize_fp8_blocks

CODES = list(range(256))
FN_NANS = {0x7F, 0xFF}


def decode(code: int, fmt: str) -> float:
    """The real value of an E4M3 byte in ``fmt`` ("e4m3fn" or "e4m3fnuz")."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if fmt == "e4m3fn":
        bias = 7
        if exponent == 0xF and mantissa == 0x7:
            return math.nan
    else:
        bias = 8
        if code == 0x80:
            return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0 ** (1 - bias)
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - bias)


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def all_codes(dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(dtype)


@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz"])
def test_the_decoder_agrees_with_torch(fmt: str) -> None:
    """The reference decoder reads every code as torch does (so the test below checks real semantics)."""
    got = all_codes(getattr(torch, f"float8_{fmt}")).float().tolist()
    for code in CODES:
        want = decode(code, fmt)
        assert (math.isnan(got[code]) and math.isnan(want)) or got[code] == want, hex(code)


@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0e-3, 448.0 / 7.0, 2.0**-20])
def test_every_code_keeps_its_value(scale: float) -> None:
    """fnuz_value(converted) * 2 * scale == fn_value(code) * scale for all 256 codes; NaN → NaN, -0 → +0."""
    q, s = e4m3fn_to_fnuz(all_codes(), torch.tensor([scale], dtype=torch.float32))
    assert q.dtype == torch.float8_e4m3fnuz and q.shape == (256,)
    assert s.dtype == torch.float32 and s.item() == 2 * torch.tensor(scale, dtype=torch.float32).item()
    bits = q.view(torch.uint8).tolist()
    got = (q.float() * s).tolist()
    s32 = torch.tensor(scale, dtype=torch.float32).item()
    for code in CODES:
        want = decode(code, "e4m3fn") * s32
        fnuz_times_scale = decode(bits[code], "e4m3fnuz") * 2 * s32
        if code in FN_NANS:
            assert bits[code] == 0x80, hex(code)  # FNUZ's one NaN
            assert math.isnan(got[code]) and math.isnan(fnuz_times_scale), hex(code)
        else:
            # Exact in float64 (a 4-bit significand times a float32 scale), so the identity holds exactly;
            # torch multiplies in float32, which rounds that one product once.
            assert want == fnuz_times_scale, hex(code)
            assert got[code] == _f32(want), hex(code)
    assert bits[0x80] == 0x00  # e4m3fn's -0 is FNUZ's NaN pattern: it becomes +0
    assert [c for c in CODES if bits[c] != c] == [0x7F, 0x80, 0xFF]  # every other code keeps its bits


def test_the_extremes_do_not_saturate() -> None:
    """448 (e4m3fn's max) reads as 224 in FNUZ and comes back through the doubled scale; the smallest
    subnormal 2^-9 reads as 2^-10."""
    q, s = e4m3fn_to_fnuz(torch.tensor([448.0, -448.0, 2.0**-9]).to(torch.float8_e4m3fn), torch.ones(1))
    assert q.float().tolist() == [224.0, -224.0, 2.0**-10]
    assert (q.float() * s).tolist() == [448.0, -448.0, 2.0**-9]


def test_block_scaled_weights_dequantize_identically() -> None:
    """A DeepSeek-style block-scaled weight (ragged edges) dequantizes to the same fp32 values."""
    torch.manual_seed(0)
    w = torch.randn(300, 260) * torch.logspace(-3, 2, 260)
    wq, ws = quantize_fp8_blocks(w)
    fq, fs = e4m3fn_to_fnuz(wq, ws)
    assert fq.dtype == torch.float8_e4m3fnuz and fs.shape == ws.shape == (3, 3)
    assert torch.equal(dequantize_fp8_blocks(fq, fs), dequantize_fp8_blocks(wq, ws))


def test_keeps_shape_strides_and_scale_dtype() -> None:
    wq = all_codes().reshape(16, 16).t()  # non-contiguous
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, s = e4m3fn_to_fnuz(wq, torch.full((2, 2), 0.25, dtype=dtype))
        assert q.shape == (16, 16) and s.dtype == dtype and torch.equal(s, torch.full((2, 2), 0.5, dtype=dtype))
        finite = ~wq.float().isnan()
        assert torch.equal((q.float() * 2)[finite], wq.float()[finite])
        assert q.float().isnan().sum() == 2  # the two e4m3fn NaNs, and not -0
    assert wq.view(torch.uint8)[0, 8].item() == 0x80  # the input is not modified


@pytest.mark.parametrize(
    ("wq", "scale", "match"),
    [
        (
            all_codes(torch.float8_e4m3fnuz),
            torch.ones(1),
            r"e4m3fn_to_fnuz.*wq.*float8_e4m3fn.*got torch.float8_e4m3fnuz",
        ),
        (torch.zeros(4), torch.ones(1), r"e4m3fn_to_fnuz.*wq.*got torch.float32"),
        (all_codes(), torch.ones(1, dtype=torch.int32), r"e4m3fn_to_fnuz.*scale.*float dtype.*got torch.int32"),
    ],
)
def test_rejects_other_dtypes(wq: torch.Tensor, scale: torch.Tensor, match: str) -> None:
    with pytest.raises(DTypeError, match=match):
        e4m3fn_to_fnuz(wq, scale)


# ---------------------------------------------------------------------------------------------------
# Quantization uses each format's own maximum
# ---------------------------------------------------------------------------------------------------


def test_fp8_max_per_format() -> None:
    assert fp8_max(torch.float8_e4m3fn) == 448.0
    assert fp8_max(torch.float8_e4m3fnuz) == 240.0


@pytest.mark.parametrize(("dtype", "qmax"), [(torch.float8_e4m3fn, 448.0), (torch.float8_e4m3fnuz, 240.0)])
def test_block_quantization_fills_the_format_and_never_overflows(dtype: torch.dtype, qmax: float) -> None:
    torch.manual_seed(1)
    w = torch.randn(256, 384) * 50
    wq, ws = quantize_fp8_blocks(w, fp8_dtype=dtype)
    values = wq.float()
    assert not values.isnan().any()
    # Each tile's largest magnitude lands on the format's maximum (scale = amax / qmax).
    tile_max = values.abs().reshape(2, 128, 3, 128).amax(dim=(1, 3))
    assert torch.equal(tile_max, torch.full((2, 3), qmax))
    err = (dequantize_fp8_blocks(wq, ws) - w).abs()
    assert (err <= w.abs() / 16 + ws.max() * 2.0**-9).all()


def test_reference_activation_quantization_uses_240_for_fnuz() -> None:
    from hal_cpu.reference.gemm import quantize_fp8

    x = torch.randn(4, 256) * 10
    xq, _ = quantize_fp8(x, fp8_dtype=torch.float8_e4m3fnuz)
    assert xq.dtype == torch.float8_e4m3fnuz and not xq.float().isnan().any()
    assert torch.equal(xq.float().abs().reshape(4, 2, 128).amax(-1), torch.full((4, 2), 240.0))
