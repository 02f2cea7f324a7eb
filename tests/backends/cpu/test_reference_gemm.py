"""The reference GEMMs against float64 oracles written independently: broadcast-and-sum products,
per-row expert lookups, per-group and per-block dequantization loops.

FP8 GEMMs take random fp8 data and random scales (not ``quantize_fp8``'s output) so a misplaced scale
shows; they are compared with the float64 product of the dequantized operands, which they share.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import hal_cpu.reference.gemm as ref
from hal.ops.catalogue import op_spec
from hal.quant import quantize_fp8_blocks

FP8 = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]
FP8_IDS = ["e4m3fn", "e4m3fnuz"]
#: Max-norm relative error allowed, by the dtype of the result.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
NAN = float("nan")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rel_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    """``max |out - oracle| / max |oracle|`` in float64 (0 when both are all zero)."""
    diff = (out.double() - oracle).abs().max() if out.numel() else torch.tensor(0.0)
    scale = oracle.abs().max() if oracle.numel() else torch.tensor(0.0)
    return float(diff / scale) if scale > 0 else float(diff)


def _assert_matches(out: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype, f"dtype {out.dtype}, expected {dtype}"
    assert out.shape == oracle.shape, f"shape {list(out.shape)}, expected {list(oracle.shape)}"
    assert not out.isnan().any()
    err = _rel_err(out, oracle)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


def _matmul_oracle(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ w [N, K].T`` in float64 as an explicit broadcast product and sum."""
    return (x.double()[:, None, :] * w.double()[None, :, :]).sum(dim=-1)


def _random_fp8(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    qmax = torch.finfo(dtype).max
    return (torch.randn(shape, generator=gen) * qmax / 4).clamp(-qmax, qmax).to(dtype)


def _random_scales(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * torch.exp2(torch.randint(-8, -2, shape, generator=gen).float()) + 1e-4


def _dequant_x_oracle(xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Per-1×128-group dequantization of ``[..., K]``, one group at a time."""
    out = xq.double().clone()
    for g in range(xs.shape[-1]):
        out[..., g * 128 : (g + 1) * 128] *= xs[..., g : g + 1].double()
    return out


def _dequant_w_oracle(wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Per-128×128-block dequantization of ``[N, K]``, one block at a time."""
    out = wq.double().clone()
    for i in range(ws.shape[0]):
        for j in range(ws.shape[1]):
            out[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= float(ws[i, j])
    return out


@pytest.mark.parametrize("name", ref.__all__)
def test_signature_matches_catalogue(name: str) -> None:
    def shape(sig: inspect.Signature) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

    assert shape(inspect.signature(getattr(ref, name))) == shape(op_spec(name).signature)


# ---------------------------------------------------------------------------------------------------
# gemm
# ---------------------------------------------------------------------------------------------------

GEMM_SHAPES = [(1, 1, 1), (5, 130, 67), (64, 64, 64), (17, 257, 129)]
GEMM_DTYPES = [
    (torch.float32, None),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, None),
    (torch.bfloat16, torch.float32),
    (torch.float16, None),
]


@pytest.mark.parametrize(("dtype", "out_dtype"), GEMM_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("m", "n", "k"), GEMM_SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in GEMM_SHAPES])
def test_gemm(m: int, n: int, k: int, dtype: torch.dtype, out_dtype: torch.dtype | None) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    out = ref.gemm(x, w, out_dtype=out_dtype)
    _assert_matches(out, _matmul_oracle(x, w), out_dtype or dtype)


def test_gemm_fp32_is_linear() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 64, generator=gen), torch.randn(48, 64, generator=gen)
    assert torch.equal(ref.gemm(x, w), F.linear(x, w))
    assert torch.equal(ref.gemm(x, w, out_dtype=torch.float32), F.linear(x, w))


@pytest.mark.parametrize("m", [1, 3, 4, 8, 15, 16, 33])
def test_gemm_fp32_row_blocks(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large fp32 weight at 4-15 rows goes by blocks of its rows (a partial last block included);
    every row count gives F.linear's product, and the blocks are taken exactly where they should be."""
    monkeypatch.setattr(ref, "ROW_BLOCKS_MIN_BYTES", 300 * 40 * 4)
    monkeypatch.setattr(ref, "ROW_BLOCK_BYTES", 64 * 40 * 4)  # 64 rows per block: 5 blocks, the last of 44
    calls: list[int] = []
    linear = ref._linear
    monkeypatch.setattr(ref, "_linear", lambda x, w: calls.append(w.shape[0]) or linear(x, w))
    gen = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 40, generator=gen), torch.randn(300, 40, generator=gen)
    out = ref.gemm(x, w)
    _assert_matches(out, _matmul_oracle(x, w), torch.float32)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-6, atol=1e-6)
    assert calls == ([64, 64, 64, 64, 44] if 4 <= m < 16 else [300])
    # Below the size threshold, the weight is multiplied whole.
    calls.clear()
    ref.gemm(x, w[:299])
    assert calls == [299]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 8, 33])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_gemm_half_row_blocks(
    m: int, dtype: torch.dtype, out_dtype: torch.dtype | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large half-precision weight is upcast block by block at 1-15 rows, whole at more: the product is
    the one of the whole upcast weight (up to MKL's order of summation), rounded once to the output dtype."""
    monkeypatch.setattr(ref, "ROW_BLOCKS_MIN_BYTES", 300 * 40 * 4)
    monkeypatch.setattr(ref, "ROW_BLOCK_BYTES", 64 * 40 * 4)
    calls: list[tuple[int, torch.dtype]] = []
    linear = ref._linear
    monkeypatch.setattr(ref, "_linear", lambda x, w: calls.append((w.shape[0], w.dtype)) or linear(x, w))
    gen = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 40, generator=gen).to(dtype), torch.randn(300, 40, generator=gen).to(dtype)
    out = ref.gemm(x, w, out_dtype=out_dtype)
    assert calls == ([(64, torch.float32)] * 4 + [(44, torch.float32)] if m < 16 else [(300, torch.float32)])
    whole = F.linear(x.float(), w.float())
    if out_dtype is None:  # the fp32 sums agree to ~1e-7: rounded to half precision they agree, or differ by an ulp
        torch.testing.assert_close(out, whole.to(dtype), rtol=torch.finfo(dtype).eps, atol=0.0)
    else:
        torch.testing.assert_close(out, whole, rtol=1e-6, atol=1e-5)
    _assert_matches(out, _matmul_oracle(x, w), out_dtype or dtype)


def test_gemm_fp32_row_blocks_real_size() -> None:
    """At the real thresholds: an 8 MiB weight at 8 rows, blocks of 1 MiB, against the float64 oracle."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 1024, generator=gen), torch.randn(2048, 1024, generator=gen)
    assert w.numel() * 4 >= ref.ROW_BLOCKS_MIN_BYTES and 8 in ref.ROW_BLOCKS_M
    _assert_matches(ref.gemm(x, w), _matmul_oracle(x, w), torch.float32)


# ---------------------------------------------------------------------------------------------------
# quantize_fp8
# ---------------------------------------------------------------------------------------------------


def _fp8_table(dtype: torch.dtype) -> torch.Tensor:
    values = torch.arange(256, dtype=torch.uint8).view(dtype).double()
    return values[values.isfinite()].unique()


QUANT_SHAPES = [(4, 128, 128), (3, 200, 128), (5, 64, 128), (2, 96, 32), (1, 1, 128), (6, 300, 128)]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize(("m", "k", "g"), QUANT_SHAPES, ids=[f"M{m}-K{k}-g{g}" for m, k, g in QUANT_SHAPES])
def test_quantize_fp8(m: int, k: int, g: int, fp8_dtype: torch.dtype, x_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k)
    # Rows of very different magnitudes; row 0 sits below the 1e-4 amax floor.
    row_scale = torch.exp2(torch.randint(-10, 8, (m, 1), generator=gen).float())
    row_scale[0] = 1e-6
    x = (torch.randn(m, k, generator=gen) * row_scale).to(x_dtype)
    qmax = torch.finfo(fp8_dtype).max
    tiny = torch.finfo(fp8_dtype).smallest_normal
    table = _fp8_table(fp8_dtype)

    xq, scales = ref.quantize_fp8(x, group_size=g, fp8_dtype=fp8_dtype)

    groups = _cdiv(k, g)
    assert xq.dtype == fp8_dtype and xq.shape == (m, k)
    assert scales.dtype == torch.float32 and scales.shape == (m, groups)
    q = xq.double()
    assert q.isfinite().all() and q.abs().max() <= qmax
    x64 = x.double()
    for row in range(m):
        for grp in range(groups):
            cols = slice(grp * g, min((grp + 1) * g, k))
            vals, qv, s = x64[row, cols], q[row, cols], float(scales[row, grp])
            amax = float(vals.abs().max())
            assert s == pytest.approx(max(amax, 1e-4) / qmax, rel=1e-6)
            if amax >= 1e-4:
                assert float(qv.abs().max()) == qmax  # the group's largest value maps to the top of the range
            # Every value rounds to a nearest fp8 of x / scale (fp32 division slack on top).
            v = vals / s
            idx = torch.searchsorted(table, v).clamp(1, table.numel() - 1)
            nearest = torch.minimum((table[idx] - v).abs(), (table[idx - 1] - v).abs())
            assert ((qv - v).abs() <= nearest + 1e-6 * v.abs()).all()
            # 3 mantissa bits: within 2^-4 of the value, or half a subnormal step.
            err = (qv * s - vals).abs()
            assert (err <= (2.0**-4 * vals.abs() + 2.0**-4 * tiny * s) * (1 + 1e-6)).all()


@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
def test_quantize_fp8_zero_groups(fp8_dtype: torch.dtype) -> None:
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(5))
    x[0] = 0  # a whole row, ragged group included
    x[2, 128:256] = 0  # one interior group
    xq, scales = ref.quantize_fp8(x, fp8_dtype=fp8_dtype)
    floor_scale = torch.tensor(1e-4, dtype=torch.float32) / torch.finfo(fp8_dtype).max
    assert (scales[0] == floor_scale).all() and scales[2, 1] == floor_scale
    assert (scales[1] != floor_scale).all() and scales[2, 0] != floor_scale
    assert (xq[0].float() == 0).all() and (xq[2, 128:256].float() == 0).all()


# ---------------------------------------------------------------------------------------------------
# gemm_fp8
# ---------------------------------------------------------------------------------------------------

FP8_GEMM_SHAPES = [(1, 128, 128), (7, 200, 256), (16, 64, 384), (3, 129, 128), (2, 1, 128)]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize(("m", "n", "k"), FP8_GEMM_SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in FP8_GEMM_SHAPES])
def test_gemm_fp8(m: int, n: int, k: int, fp8_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(m + n * 7 + k)
    xq, xs = _random_fp8((m, k), fp8_dtype, gen), _random_scales((m, k // 128), gen)
    wq, ws = _random_fp8((n, k), fp8_dtype, gen), _random_scales((_cdiv(n, 128), k // 128), gen)
    out = ref.gemm_fp8(xq, xs, wq, ws, out_dtype=out_dtype)
    _assert_matches(out, _dequant_x_oracle(xq, xs) @ _dequant_w_oracle(wq, ws).T, out_dtype)


def test_gemm_fp8_default_out_is_bf16() -> None:
    gen = torch.Generator().manual_seed(6)
    xq, xs = _random_fp8((4, 128), torch.float8_e4m3fn, gen), _random_scales((4, 1), gen)
    wq, ws = _random_fp8((8, 128), torch.float8_e4m3fn, gen), _random_scales((1, 1), gen)
    assert ref.gemm_fp8(xq, xs, wq, ws).dtype == torch.bfloat16


@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
def test_gemm_fp8_end_to_end(fp8_dtype: torch.dtype) -> None:
    """quantize_fp8 + block-quantized weights through gemm_fp8 approximate the fp32 product."""
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(9, 256, generator=gen), torch.randn(200, 256, generator=gen)
    xq, xs = ref.quantize_fp8(x, fp8_dtype=fp8_dtype)
    wq, ws = quantize_fp8_blocks(w, 128, fp8_dtype)
    out = ref.gemm_fp8(xq, xs, wq, ws, out_dtype=torch.float32)
    # Quantization error (up to 2^-4 per value, ~2^-6 typical) averages out over K.
    assert _rel_err(out, _matmul_oracle(x, w)) < 0.05


# ---------------------------------------------------------------------------------------------------
# Grouped GEMMs: contiguous layout
# ---------------------------------------------------------------------------------------------------

#: (rows per expert, padding rows after offsets[E], offsets dtype)
CONTIGUOUS_CASES = [
    ([5, 0, 7], 3, torch.int64),
    ([0, 0, 0, 0], 4, torch.int32),
    ([9], 0, torch.int64),
    ([0, 0, 9, 1, 0], 2, torch.int32),
]
CONTIGUOUS_IDS = [f"E{len(c)}-rows{'_'.join(map(str, c))}-pad{p}" for c, p, _ in CONTIGUOUS_CASES]


def _offsets(counts: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=dtype)


def _contiguous_oracle(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row by row: find the expert that owns the row (if any) and take the dot products in float64."""
    bounds = [int(v) for v in offsets]
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    for r in range(x.shape[0]):
        for e in range(w.shape[0]):
            if bounds[e] <= r < bounds[e + 1]:
                out[r] = w[e].double() @ x[r].double()
    return out


@pytest.mark.parametrize(("dtype", "out_dtype"), GEMM_DTYPES[:4], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("n", "k"), [(130, 72), (64, 32)], ids=["N130-K72", "N64-K32"])
@pytest.mark.parametrize(("counts", "pad", "idx_dtype"), CONTIGUOUS_CASES, ids=CONTIGUOUS_IDS)
def test_grouped_gemm(
    counts: list[int],
    pad: int,
    idx_dtype: torch.dtype,
    n: int,
    k: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype | None,
) -> None:
    gen = torch.Generator().manual_seed(sum(counts) * 31 + n + k)
    valid = sum(counts)
    x = torch.randn(valid + pad, k, generator=gen).to(dtype)
    x[valid:] = NAN  # padding rows hold garbage; they must not leak into the result
    w = torch.randn(len(counts), n, k, generator=gen).to(dtype)
    offsets = _offsets(counts, idx_dtype)
    out = ref.grouped_gemm(x, w, offsets, out_dtype=out_dtype)
    _assert_matches(out, _contiguous_oracle(x, w, offsets), out_dtype or dtype)
    assert (out[valid:] == 0).all()


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize(("counts", "pad", "idx_dtype"), CONTIGUOUS_CASES, ids=CONTIGUOUS_IDS)
def test_grouped_gemm_fp8(
    counts: list[int], pad: int, idx_dtype: torch.dtype, fp8_dtype: torch.dtype, out_dtype: torch.dtype
) -> None:
    n, k = 130, 256
    gen = torch.Generator().manual_seed(sum(counts) * 17 + pad)
    valid, e = sum(counts), len(counts)
    xq, xs = _random_fp8((valid + pad, k), fp8_dtype, gen), _random_scales((valid + pad, k // 128), gen)
    xq[valid:], xs[valid:] = NAN, NAN
    wq, ws = _random_fp8((e, n, k), fp8_dtype, gen), _random_scales((e, _cdiv(n, 128), k // 128), gen)
    offsets = _offsets(counts, idx_dtype)
    out = ref.grouped_gemm_fp8(xq, xs, wq, ws, offsets, out_dtype=out_dtype)
    x64 = torch.zeros(valid + pad, k, dtype=torch.float64)
    x64[:valid] = _dequant_x_oracle(xq[:valid], xs[:valid])
    w64 = torch.stack([_dequant_w_oracle(wq[i], ws[i]) for i in range(e)])
    _assert_matches(out, _contiguous_oracle(x64, w64, offsets), out_dtype)
    assert (out[valid:] == 0).all()


# ---------------------------------------------------------------------------------------------------
# Grouped GEMMs: masked layout
# ---------------------------------------------------------------------------------------------------

#: (max_m, masked_m, masked_m dtype)
MASKED_CASES = [
    (6, [0, 6, 3], torch.int32),
    (5, [5, 5], torch.int64),
    (3, [0, 0, 0, 0], torch.int32),
    (1, [1], torch.int64),
]
MASKED_IDS = [f"E{len(mm)}-max_m{mx}-m{'_'.join(map(str, mm))}" for mx, mm, _ in MASKED_CASES]


def _masked_oracle(x: torch.Tensor, w: torch.Tensor, masked_m: list[int]) -> torch.Tensor:
    """Expert by expert, row by row, in float64; rows past masked_m stay zero."""
    out = torch.zeros(x.shape[0], x.shape[1], w.shape[1], dtype=torch.float64)
    for e, rows in enumerate(masked_m):
        for r in range(rows):
            out[e, r] = w[e].double() @ x[e, r].double()
    return out


def _assert_masked_rows_zero(out: torch.Tensor, masked_m: list[int]) -> None:
    for e, rows in enumerate(masked_m):
        assert (out[e, rows:] == 0).all(), f"expert {e}: rows past masked_m = {rows} are not zero"


@pytest.mark.parametrize(("dtype", "out_dtype"), GEMM_DTYPES[:4], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("max_m", "masked_m", "idx_dtype"), MASKED_CASES, ids=MASKED_IDS)
def test_grouped_gemm_masked(
    max_m: int, masked_m: list[int], idx_dtype: torch.dtype, dtype: torch.dtype, out_dtype: torch.dtype | None
) -> None:
    n, k, e = 130, 72, len(masked_m)
    gen = torch.Generator().manual_seed(max_m * 13 + e)
    x = torch.randn(e, max_m, k, generator=gen).to(dtype)
    for i, rows in enumerate(masked_m):
        x[i, rows:] = NAN  # rows past masked_m are never read
    w = torch.randn(e, n, k, generator=gen).to(dtype)
    out = ref.grouped_gemm_masked(x, w, torch.tensor(masked_m, dtype=idx_dtype), out_dtype=out_dtype)
    _assert_matches(out, _masked_oracle(x, w, masked_m), out_dtype or dtype)
    _assert_masked_rows_zero(out, masked_m)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("fp8_dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize(("max_m", "masked_m", "idx_dtype"), MASKED_CASES, ids=MASKED_IDS)
def test_grouped_gemm_fp8_masked(
    max_m: int, masked_m: list[int], idx_dtype: torch.dtype, fp8_dtype: torch.dtype, out_dtype: torch.dtype
) -> None:
    n, k, e = 129, 256, len(masked_m)
    gen = torch.Generator().manual_seed(max_m * 11 + e)
    xq, xs = _random_fp8((e, max_m, k), fp8_dtype, gen), _random_scales((e, max_m, k // 128), gen)
    for i, rows in enumerate(masked_m):
        xq[i, rows:], xs[i, rows:] = NAN, NAN
    wq, ws = _random_fp8((e, n, k), fp8_dtype, gen), _random_scales((e, _cdiv(n, 128), k // 128), gen)
    out = ref.grouped_gemm_fp8_masked(xq, xs, wq, ws, torch.tensor(masked_m, dtype=idx_dtype), out_dtype=out_dtype)
    x64 = torch.stack([_dequant_x_oracle(xq[i], xs[i]) for i in range(e)])
    w64 = torch.stack([_dequant_w_oracle(wq[i], ws[i]) for i in range(e)])
    _assert_matches(out, _masked_oracle(x64, w64, masked_m), out_dtype)
    _assert_masked_rows_zero(out, masked_m)
