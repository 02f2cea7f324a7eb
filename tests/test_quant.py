"""Tests of :mod:`hal.quant` against float64 oracles written as explicit per-group and per-block loops.

Quantization is checked three independent ways: the scale formula (per-tile amax in float64), that every
fp8 value is a nearest representable value of ``x / scale`` (against a table of all 256 codes), and the
error bound of a 3-mantissa-bit format (``|dequant - x| <= 2^-4 |x|`` plus the subnormal floor).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hal.errors import DTypeError, OpInputError, ShapeError
from hal.quant import AMAX_FLOOR, dequantize_fp8_blocks, dequantize_fp8_groups, fp8_max, quantize_fp8_blocks

FP8 = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]
FP8_IDS = ["e4m3fn", "e4m3fnuz"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _random_fp8(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random fp8 values spread over many binades (subnormals included), within the format's range."""
    qmax = torch.finfo(dtype).max
    mag = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-8, 7, shape, generator=gen).float())
    return mag.clamp(-qmax, qmax).to(dtype)


def _random_scales(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Positive fp32 scales spanning a few orders of magnitude, so a misplaced scale shows."""
    return torch.rand(shape, generator=gen) * torch.exp2(torch.randint(-6, 6, shape, generator=gen).float()) + 1e-3


def _fp8_table(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of an fp8 format, sorted, in float64."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).double()
    return values[values.isfinite()].unique()


def _assert_nearest_fp8(q: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> None:
    """Each ``q`` is a nearest fp8 value to ``v`` (float64), ties either way."""
    table = _fp8_table(dtype)
    v = v.flatten()
    idx = torch.searchsorted(table, v).clamp(1, table.numel() - 1)
    nearest = torch.minimum((table[idx] - v).abs(), (table[idx - 1] - v).abs())
    err = (q.double().flatten() - v).abs()
    # The implementation divides in fp32, so allow its rounding on top of the exact nearest distance.
    slack = 1e-6 * v.abs() + 1e-30
    bad = err > nearest + slack
    assert not bad.any(), f"{int(bad.sum())} values not rounded to a nearest fp8, e.g. {v[bad][:4].tolist()}"


def _assert_error_bound(deq: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    """e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself, a subnormal by half
    the subnormal step (``smallest_normal * 2^-4`` in fp8 units, times the scale)."""
    floor = torch.finfo(dtype).smallest_normal * 2.0**-4 * scale
    bound = 2.0**-4 * x.abs() * (1 + 1e-6) + floor * (1 + 1e-6)
    err = (deq - x).abs()
    assert (err <= bound).all(), f"max excess {float((err - bound).max()):.3g}"


# ---------------------------------------------------------------------------------------------------
# fp8_max
# ---------------------------------------------------------------------------------------------------


def test_fp8_max() -> None:
    assert fp8_max(torch.float8_e4m3fn) == 448.0
    assert fp8_max(torch.float8_e4m3fnuz) == 240.0
    with pytest.raises(DTypeError, match="fp8_max: dtype: expected float8_e4m3fn"):
        fp8_max(torch.float32)


# ---------------------------------------------------------------------------------------------------
# dequantize_fp8_groups
# ---------------------------------------------------------------------------------------------------


def _dequant_groups_oracle(xq: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    x = xq.double()
    out = torch.empty_like(x)
    for g, start in enumerate(range(0, x.shape[-1], group_size)):
        out[..., start : start + group_size] = x[..., start : start + group_size] * scales[..., g : g + 1].double()
    return out


GROUP_CASES = [((3, 256), 128), ((4, 200), 128), ((2, 3, 130), 128), ((5,), 128), ((3, 50), 128), ((2, 96), 32)]


@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize(("shape", "group_size"), GROUP_CASES, ids=[f"S{list(s)}-g{g}" for s, g in GROUP_CASES])
def test_dequantize_fp8_groups(shape: tuple[int, ...], group_size: int, fp8_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    xq = _random_fp8(shape, fp8_dtype, gen)
    scales = _random_scales((*shape[:-1], _cdiv(shape[-1], group_size)), gen)
    out = dequantize_fp8_groups(xq, scales, group_size)
    assert out.dtype == torch.float32 and out.shape == xq.shape
    torch.testing.assert_close(out.double(), _dequant_groups_oracle(xq, scales, group_size), rtol=1e-6, atol=0)


def test_dequantize_fp8_groups_errors() -> None:
    xq = torch.zeros(3, 200).to(torch.float8_e4m3fn)
    good = torch.ones(3, 2)
    with pytest.raises(
        DTypeError, match=r"dequantize_fp8_groups: xq: expected dtype float8_e4m3fn .*got torch\.float32"
    ):
        dequantize_fp8_groups(torch.zeros(3, 200), good)
    with pytest.raises(ShapeError, match=r"scales: expected shape \[3, 2\].*got \[3, 1\]"):
        dequantize_fp8_groups(xq, torch.ones(3, 1))
    with pytest.raises(DTypeError, match=r"scales: expected dtype float32, got torch\.float16"):
        dequantize_fp8_groups(xq, good.half())
    with pytest.raises(ShapeError, match=r"xq: expected \[\.\.\., K\]"):
        dequantize_fp8_groups(xq[0, 0], good)
    with pytest.raises(OpInputError, match="group_size: expected a positive int"):
        dequantize_fp8_groups(xq, good, 0)


# ---------------------------------------------------------------------------------------------------
# quantize_fp8_blocks / dequantize_fp8_blocks
# ---------------------------------------------------------------------------------------------------


def _tiles(n: int, k: int, block: int) -> list[tuple[int, int, slice, slice]]:
    return [
        (i, j, slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
        for i, j in itertools.product(range(_cdiv(n, block)), range(_cdiv(k, block)))
    ]


def _dequant_blocks_oracle(wq: torch.Tensor, ws: torch.Tensor, block: int) -> torch.Tensor:
    w = wq.double()
    out = torch.empty_like(w)
    for i, j, rows, cols in _tiles(w.shape[-2], w.shape[-1], block):
        out[..., rows, cols] = w[..., rows, cols] * ws[..., i, j, None, None].double()
    return out


def _block_scale_map(ws: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """Each value's scale, float64 [..., N, K]."""
    out = torch.empty(*ws.shape[:-2], n, k, dtype=torch.float64)
    for i, j, rows, cols in _tiles(n, k, block):
        out[..., rows, cols] = ws[..., i, j, None, None].double()
    return out


BLOCK_CASES = [
    ((128, 128), 128),
    ((256, 384), 128),
    ((200, 300), 128),
    ((1, 5), 128),
    ((3, 130, 257), 128),
    ((2, 100, 70), 64),
]
BLOCK_IDS = [f"S{list(s)}-b{b}" for s, b in BLOCK_CASES]


@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize(("shape", "block"), BLOCK_CASES, ids=BLOCK_IDS)
def test_dequantize_fp8_blocks(shape: tuple[int, ...], block: int, fp8_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    wq = _random_fp8(shape, fp8_dtype, gen)
    ws = _random_scales((*shape[:-2], _cdiv(shape[-2], block), _cdiv(shape[-1], block)), gen)
    out = dequantize_fp8_blocks(wq, ws, block)
    assert out.dtype == torch.float32 and out.shape == wq.shape
    torch.testing.assert_close(out.double(), _dequant_blocks_oracle(wq, ws, block), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
def test_dequantization_gives_every_fp8_code_its_value(fp8_dtype: torch.dtype) -> None:
    # All 256 codes (NaN included), with unit scales: exactly torch's own conversion of each.
    codes = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).repeat(128, 2)[:, :384]  # [128, 384]
    want = codes.float()
    for got in (dequantize_fp8_blocks(codes, torch.ones(1, 3)), dequantize_fp8_groups(codes, torch.ones(128, 3))):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
        assert torch.equal(got.signbit(), want.signbit())  # -0.0 stays -0.0


def _non_nan_codes(dtype: torch.dtype, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Every code of ``dtype`` but its NaNs (subnormals and both zeros included), in a random arrangement."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[~codes.view(dtype).float().isnan()]
    return codes[torch.randint(0, codes.numel(), shape, generator=gen)].view(dtype)


@pytest.mark.parametrize("scale_exp", [-140, -60, 0, 60, 110, 125], ids=lambda e: f"2^{e}")
@pytest.mark.parametrize("shape", [(256, 384), (200, 300)], ids=["whole-tiles", "ragged"])
@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
def test_dequantization_is_bitwise_torch_conversion_times_scale(
    fp8_dtype: torch.dtype, shape: tuple[int, int], scale_exp: int
) -> None:
    # Without NaN codes the CPU converts fp8 by moving bits into float16 and folds a power of two into the
    # scales: the result must still be torch's own conversion times the scale, bit for bit, for scales
    # from subnormal (products underflow) to past 2^100 (where no power of two is folded; 2^125 overflows).
    gen = torch.Generator().manual_seed(scale_exp + 200)
    wq = _non_nan_codes(fp8_dtype, shape, gen)
    n, k = shape
    ws = (torch.rand(_cdiv(n, 128), _cdiv(k, 128), generator=gen) + 0.5) * 2.0**scale_exp
    per_value = ws.repeat_interleave(128, dim=0)[:n].repeat_interleave(128, dim=1)[:, :k]
    want = wq.float() * per_value
    assert torch.equal(dequantize_fp8_blocks(wq, ws).view(torch.int32), want.view(torch.int32))
    xs = (torch.rand(n, _cdiv(k, 128), generator=gen) + 0.5) * 2.0**scale_exp
    want = wq.float() * xs.repeat_interleave(128, dim=1)[:, :k]
    assert torch.equal(dequantize_fp8_groups(wq, xs).view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("shape", [(256, 384), (200, 300)], ids=["whole-tiles", "ragged"])
def test_dequantize_fp8_blocks_of_strided_views(shape: tuple[int, int]) -> None:
    # Transposed views of the weight and its scales: the same values as their contiguous copies give.
    gen = torch.Generator().manual_seed(3)
    wq = _random_fp8(shape[::-1], FP8[0], gen).t()
    ws = _random_scales((_cdiv(shape[1], 128), _cdiv(shape[0], 128)), gen).t()
    assert not wq.is_contiguous() and not ws.is_contiguous()
    out = dequantize_fp8_blocks(wq, ws)
    assert torch.equal(out, dequantize_fp8_blocks(wq.contiguous(), ws.contiguous()))
    torch.testing.assert_close(out.double(), _dequant_blocks_oracle(wq, ws, 128), rtol=1e-6, atol=0)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize(("shape", "block"), BLOCK_CASES, ids=BLOCK_IDS)
def test_quantize_fp8_blocks(shape: tuple[int, ...], block: int, fp8_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    # Rows of very different magnitudes, some below the amax floor, so tiles get distinct scales.
    row_scale = torch.exp2(torch.randint(-16, 6, (*shape[:-1], 1), generator=gen).float())
    w = (torch.randn(shape, generator=gen) * row_scale).to(w_dtype)
    qmax = torch.finfo(fp8_dtype).max

    wq, ws = quantize_fp8_blocks(w, block, fp8_dtype)

    n, k = shape[-2:]
    assert wq.dtype == fp8_dtype and wq.shape == w.shape
    assert ws.dtype == torch.float32 and list(ws.shape) == [*shape[:-2], _cdiv(n, block), _cdiv(k, block)]
    qf = wq.double()
    assert qf.isfinite().all() and qf.abs().max() <= qmax
    w64 = w.double()
    for i, j, rows, cols in _tiles(n, k, block):
        tile = w64[..., rows, cols]
        amax = tile.abs().amax(dim=(-2, -1))
        expected = amax.clamp(min=AMAX_FLOOR) / qmax
        torch.testing.assert_close(ws[..., i, j].double(), expected, rtol=1e-6, atol=0)
        # The tile's largest value maps onto the top of the fp8 range (unless the floor kicked in).
        top = qf[..., rows, cols].abs().amax(dim=(-2, -1))
        assert (top[amax >= AMAX_FLOOR] == qmax).all()
        s = ws[..., i, j, None, None].double()
        _assert_nearest_fp8(qf[..., rows, cols], tile / s, fp8_dtype)

    deq = dequantize_fp8_blocks(wq, ws, block).double()
    torch.testing.assert_close(deq, _dequant_blocks_oracle(wq, ws, block), rtol=1e-6, atol=0)
    _assert_error_bound(deq, w64, _block_scale_map(ws, n, k, block), fp8_dtype)


@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
def test_quantize_fp8_blocks_zero_tile(fp8_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(200, 300, generator=gen)
    w[:128, 128:256] = 0  # one whole interior tile
    w[128:, 256:] = 0  # the ragged corner tile
    wq, ws = quantize_fp8_blocks(w, 128, fp8_dtype)
    floor_scale = torch.tensor(AMAX_FLOOR, dtype=torch.float32) / fp8_max(fp8_dtype)
    assert ws[0, 1] == floor_scale and ws[1, 2] == floor_scale
    assert (ws[0, 0] != floor_scale) and (ws[1, 1] != floor_scale)
    assert (wq[:128, 128:256].float() == 0).all() and (wq[128:, 256:].float() == 0).all()


def test_quantize_fp8_blocks_errors() -> None:
    with pytest.raises(
        ShapeError, match=r"quantize_fp8_blocks: w: expected \[\.\.\., N, K\] \(rank >= 2\), got shape \[5\]"
    ):
        quantize_fp8_blocks(torch.zeros(5))
    with pytest.raises(DTypeError, match=r"w: expected a float dtype .*got torch\.int32"):
        quantize_fp8_blocks(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(DTypeError, match=r"w: expected a float dtype .*got torch\.float8_e4m3fn"):
        quantize_fp8_blocks(torch.zeros(4, 4).to(torch.float8_e4m3fn))
    with pytest.raises(OpInputError, match=r"fp8_dtype: expected float8_e4m3fn \| float8_e4m3fnuz, got torch\.float16"):
        quantize_fp8_blocks(torch.zeros(4, 4), 128, torch.float16)
    with pytest.raises(OpInputError, match="block: expected a positive int"):
        quantize_fp8_blocks(torch.zeros(4, 4), -1)


def test_dequantize_fp8_blocks_errors() -> None:
    wq = torch.zeros(2, 200, 300).to(torch.float8_e4m3fnuz)
    with pytest.raises(ShapeError, match=r"dequantize_fp8_blocks: ws: expected shape \[2, 2, 3\].*got \[2, 3\]"):
        dequantize_fp8_blocks(wq, torch.ones(2, 3))
    with pytest.raises(DTypeError, match=r"wq: expected dtype float8_e4m3fn \| float8_e4m3fnuz, got torch\.bfloat16"):
        dequantize_fp8_blocks(torch.zeros(200, 300, dtype=torch.bfloat16), torch.ones(2, 3))
    with pytest.raises(ShapeError, match=r"wq: expected \[\.\.\., N, K\] \(rank >= 2\)"):
        dequantize_fp8_blocks(wq[0, 0], torch.ones(1, 3))
    with pytest.raises(DTypeError, match=r"ws: expected dtype float32, got torch\.float64"):
        dequantize_fp8_blocks(wq, torch.ones(2, 2, 3, dtype=torch.float64))
