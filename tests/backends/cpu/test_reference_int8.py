"""The reference INT8 W8A8 ops against independent oracles (integer matmul in int64, per-row loops)."""

from __future__ import annotations

import pytest
import torch

from hal.quant import dequantize_int8_rows, quantize_int8_rows
from hal_cpu.reference.gemm import gemm_int8, grouped_gemm_int8, quantize_int8


def oracle_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, scales = [], []
    for row in x.double():
        amax = row.abs().max().item()
        scale = amax / 127 if amax > 0 else 1.0
        rows.append(torch.clamp(torch.round(row / scale), -127, 127))
        scales.append(scale)
    return torch.stack(rows).to(torch.int8), torch.tensor(scales, dtype=torch.float64)


@pytest.mark.parametrize(("m", "k"), [(1, 7), (5, 64), (33, 300)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_int8_matches_per_row_oracle(m: int, k: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=g) * 5).to(dtype)
    x[0] = 0
    xq, xs = quantize_int8(x)
    oq, os_ = oracle_quantize(x)
    assert xq.dtype == torch.int8 and xs.dtype == torch.float32 and xs.shape == (m,)
    torch.testing.assert_close(xs.double(), os_, rtol=1e-6, atol=0)
    # fp32 vs float64 division can break an exact .5 tie the other way: at most one code apart.
    assert (xq.int() - oq.int()).abs().max() <= 1
    assert (xq.int() != oq.int()).float().mean() < 0.01
    assert xq.abs().max() <= 127 and torch.equal(xq[0], torch.zeros(k, dtype=torch.int8)) and xs[0] == 1.0
    err = (dequantize_int8_rows(xq, xs) - x.float()).abs()
    assert bool((err <= xs.unsqueeze(1) * 0.5001).all())


@pytest.mark.parametrize(("m", "n", "k"), [(1, 8, 16), (9, 40, 300), (64, 96, 4096)], ids=lambda v: str(v))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_int8_is_exact_integer_matmul_then_scales(m: int, n: int, k: int, out_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(n + k)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(m, generator=g), torch.rand(n, generator=g)
    exact = xq.long() @ wq.long().T  # int64: the integer result, no rounding
    expected = exact.double() * xs.double()[:, None] * ws.double()[None, :]
    out = gemm_int8(xq, xs, wq, ws, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, n)
    tol = 1e-6 if out_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_grouped_gemm_int8_per_expert_rows_and_zero_padding() -> None:
    g = torch.Generator().manual_seed(3)
    counts, k, n = [3, 0, 5, 1], 48, 16
    offsets = torch.tensor([0, 3, 3, 8, 9])
    m = sum(counts) + 2
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (4, n, k), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(m, generator=g), torch.rand(4, n, generator=g)
    out = grouped_gemm_int8(xq, xs, wq, ws, offsets, out_dtype=torch.float32)
    for e in range(4):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        want = (xq[rows].long() @ wq[e].long().T).double() * xs[rows, None].double() * ws[e][None].double()
        torch.testing.assert_close(out[rows].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[9:], torch.zeros(2, n))


def test_weight_rows_round_trip_within_half_a_step() -> None:
    w = torch.randn(3, 8, 32) * 0.02
    q, s = quantize_int8_rows(w)
    assert q.shape == w.shape and s.shape == (3, 8)
    assert bool(((dequantize_int8_rows(q, s) - w).abs() <= s.unsqueeze(-1) * 0.5001).all())


def test_non_finite_rows_stay_non_finite() -> None:
    # NaN or inf in a row must not quantize to zeros (a broken checkpoint would run with zeroed rows).
    x = torch.randn(4, 32)
    x[1, 3], x[2, 5], x[3] = float("nan"), float("inf"), 0.0
    q, s = quantize_int8_rows(x)
    back = dequantize_int8_rows(q, s)
    assert torch.isfinite(back[0]).all() and not torch.isfinite(back[1]).all() and not torch.isfinite(back[2]).all()
    assert s[3] == 1.0 and torch.equal(back[3], torch.zeros(32))
    assert q.abs().max() <= 127
