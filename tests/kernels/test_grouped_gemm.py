"""``hal_kernels.grouped_gemm``'s four MoE GEMMs against the reference ops, under the interpreter.

Contiguous layout cases cover empty experts (first, middle, last), segments that do and do not line
up with ``BLOCK_M``, padding rows after ``offsets[E]`` (filled with NaN in x: they must come out zero,
not NaN), a single row, and all rows padding. Masked layout cases cover ``masked_m`` of 0, of
``max_m`` and in between, with NaN in the rows past ``masked_m``. Tolerances (:func:`assert_gemm_close`,
as in ``test_gemm.py``): the reference computes in fp32; the half-precision kernels upcast to fp32
after the load under the interpreter (exact products, fp32 sums) and the FP8 ones sum exact fp8
products per scale block, so kernel and reference differ by fp32 rounding, then by the output cast.
"""

from __future__ import annotations

import pytest
import torch

from hal.errors import DTypeError, LayoutError, OpInputError, ShapeError
from hal.quant import quantize_fp8_blocks
from hal_kernels import _common, grouped_gemm, quant
from tests.kernels.conftest import FP8S, reference

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
SMALL = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128}

#: Per-element relative tolerance by output dtype. fp32: 1e-5 (fp32 reassociation of a K <= 256 sum
#: measures ~1e-6). fp16: one fp16 ulp (2^-10), since the two fp32 results may round to neighbours.
#: bf16: one bf16 ulp (2^-7): the interpreter truncates fp32 → bf16 where the reference rounds to
#: nearest (on a GPU both round to nearest).
RTOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def assert_gemm_close(out: torch.Tensor, want: torch.Tensor) -> None:
    """``out`` equals ``want`` (the reference, same dtype) within :data:`RTOL`, elementwise, and has no
    NaN (an unwritten, poisoned element). The absolute term, 1e-5 of the largest output, covers elements
    near zero where the fp32 rounding of the large terms of the sum dominates their own magnitude."""
    assert out.dtype == want.dtype and out.shape == want.shape and out.is_contiguous()
    atol = 1e-5 * float(want.float().abs().max().clamp(min=1e-30)) if want.numel() else 0.0
    torch.testing.assert_close(out.float(), want.float(), rtol=RTOL[want.dtype], atol=atol)


# (rows of each expert, padding rows after them): ragged, tile-aligned, empty experts, one row, all padding.
CONTIGUOUS = [
    ([10, 0, 45, 15], 7),  # empty middle expert, segments crossing 32-row tiles, padding
    ([0, 32, 64, 0], 0),  # empty first and last experts, tile-aligned segments, no padding
    ([1], 0),  # M = 1
    ([0, 0, 0], 5),  # every row is padding
    ([3, 5, 2, 1, 4, 0, 6, 2], 3),  # many small experts share one tile's worth of rows
]
CONTIGUOUS_IDS = ["ragged", "aligned", "M1", "all-padding", "many-small"]

# (masked_m, max_m)
MASKED = [([0, 30, 1, 17], 40), ([64, 64], 64), ([1], 1), ([0, 0], 16)]
MASKED_IDS = ["ragged", "full", "M1", "all-empty"]


def _offsets(counts: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=dtype)


def _fp8(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 1×128 quantization of ``x [..., K]`` with torch (the reference)."""
    xq, xs = reference(quant, "quantize_fp8")(x.reshape(-1, x.shape[-1]), fp8_dtype=fp8_dtype)
    return xq.view(x.shape), xs.view(*x.shape[:-1], -1)


def _poison_rows_fp8(xq: torch.Tensor, xs: torch.Tensor, rows: torch.Tensor) -> None:
    """Garbage in invalid rows: the fp8 format's NaN and NaN scales."""
    nan_bits = 0x80 if xq.dtype == torch.float8_e4m3fnuz else 0x7F
    xq.view(torch.uint8)[rows] = nan_bits
    xs[rows] = float("nan")


# ---------------------------------------------------------------------------------------------------
# Contiguous layout
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("counts", "padding"), CONTIGUOUS, ids=CONTIGUOUS_IDS)
def test_contiguous(counts: list[int], padding: int, dtype: torch.dtype) -> None:
    torch.manual_seed(len(counts) * 100 + padding)
    n, k = 72, 160  # N and K ragged against the blocks (K is masked in the half-precision kernels)
    m = sum(counts) + padding
    x = torch.randn(m, k).to(dtype)
    x[sum(counts) :] = float("nan")
    w = torch.randn(len(counts), n, k).to(dtype)
    offsets = _offsets(counts, torch.int32)
    out = grouped_gemm.grouped_gemm(x, w, offsets, config=SMALL)
    assert torch.all(out[sum(counts) :] == 0)
    assert_gemm_close(out, reference(grouped_gemm, "grouped_gemm")(x, w, offsets))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32-out", "bf16-out"])
def test_contiguous_int64_offsets_and_out_dtype(out_dtype: torch.dtype) -> None:
    torch.manual_seed(21)
    x = torch.randn(40, 128, dtype=torch.bfloat16)
    w = torch.randn(3, 130, 128, dtype=torch.bfloat16)
    offsets = _offsets([12, 0, 25], torch.int64)
    out = grouped_gemm.grouped_gemm(x, w, offsets, out_dtype=out_dtype, config={"BLOCK_M": 16, "BLOCK_N": 128})
    assert_gemm_close(out, reference(grouped_gemm, "grouped_gemm")(x, w, offsets, out_dtype=out_dtype))


@pytest.mark.parametrize("fp8_dtype", FP8S)
@pytest.mark.parametrize(("counts", "padding"), CONTIGUOUS, ids=CONTIGUOUS_IDS)
def test_contiguous_fp8(counts: list[int], padding: int, fp8_dtype: torch.dtype) -> None:
    torch.manual_seed(len(counts) * 100 + padding + 1)
    n, k = 200, 256  # N not a multiple of 128: the last weight block row is ragged
    m = sum(counts) + padding
    xq, xs = _fp8(torch.randn(m, k), fp8_dtype)
    _poison_rows_fp8(xq, xs, torch.arange(sum(counts), m))
    wq, ws = quantize_fp8_blocks(torch.randn(len(counts), n, k), fp8_dtype=fp8_dtype)
    offsets = _offsets(counts, torch.int64)
    out = grouped_gemm.grouped_gemm_fp8(xq, xs, wq, ws, offsets, config={"BLOCK_M": 32, "BLOCK_N": 128})
    assert torch.all(out[sum(counts) :] == 0)
    assert_gemm_close(out, reference(grouped_gemm, "grouped_gemm_fp8")(xq, xs, wq, ws, offsets))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32-out", "fp16-out"])
def test_contiguous_fp8_out_dtypes_and_k_steps(out_dtype: torch.dtype) -> None:
    """Two K steps per scale block, and fp32 / fp16 outputs."""
    torch.manual_seed(22)
    xq, xs = _fp8(torch.randn(30, 256), torch.float8_e4m3fn)
    wq, ws = quantize_fp8_blocks(torch.randn(2, 64, 256), fp8_dtype=torch.float8_e4m3fn)
    offsets = _offsets([17, 13], torch.int32)
    config = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
    out = grouped_gemm.grouped_gemm_fp8(xq, xs, wq, ws, offsets, out_dtype=out_dtype, config=config)
    want = reference(grouped_gemm, "grouped_gemm_fp8")(xq, xs, wq, ws, offsets, out_dtype=out_dtype)
    assert_gemm_close(out, want)


# ---------------------------------------------------------------------------------------------------
# Masked layout
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("masked", "max_m"), MASKED, ids=MASKED_IDS)
def test_masked(masked: list[int], max_m: int, dtype: torch.dtype) -> None:
    torch.manual_seed(len(masked) * 100 + max_m)
    e, n, k = len(masked), 72, 160
    masked_m = torch.tensor(masked, dtype=torch.int32)
    x = torch.randn(e, max_m, k).to(dtype)
    invalid = torch.arange(max_m)[None, :] >= masked_m[:, None]
    x[invalid] = float("nan")
    w = torch.randn(e, n, k).to(dtype)
    out = grouped_gemm.grouped_gemm_masked(x, w, masked_m, config=SMALL)
    assert torch.all(out[invalid] == 0)
    assert_gemm_close(out, reference(grouped_gemm, "grouped_gemm_masked")(x, w, masked_m))


@pytest.mark.parametrize("fp8_dtype", FP8S)
@pytest.mark.parametrize(("masked", "max_m"), MASKED, ids=MASKED_IDS)
def test_masked_fp8(masked: list[int], max_m: int, fp8_dtype: torch.dtype) -> None:
    torch.manual_seed(len(masked) * 100 + max_m + 1)
    e, n, k = len(masked), 136, 256
    masked_m = torch.tensor(masked, dtype=torch.int64)
    xq, xs = _fp8(torch.randn(e, max_m, k), fp8_dtype)
    invalid = torch.arange(max_m)[None, :] >= masked_m[:, None]
    _poison_rows_fp8(xq, xs, invalid)
    wq, ws = quantize_fp8_blocks(torch.randn(e, n, k), fp8_dtype=fp8_dtype)
    out = grouped_gemm.grouped_gemm_fp8_masked(xq, xs, wq, ws, masked_m, config={"BLOCK_M": 32, "BLOCK_N": 128})
    assert torch.all(out[invalid] == 0)
    assert_gemm_close(out, reference(grouped_gemm, "grouped_gemm_fp8_masked")(xq, xs, wq, ws, masked_m))


def test_masked_fp32_out() -> None:
    torch.manual_seed(23)
    x = torch.randn(2, 20, 128, dtype=torch.bfloat16)
    w = torch.randn(2, 40, 128, dtype=torch.bfloat16)
    masked_m = torch.tensor([20, 7], dtype=torch.int64)
    out = grouped_gemm.grouped_gemm_masked(x, w, masked_m, out_dtype=torch.float32, config=SMALL)
    want = reference(grouped_gemm, "grouped_gemm_masked")(x, w, masked_m, out_dtype=torch.float32)
    assert_gemm_close(out, want)


# ---------------------------------------------------------------------------------------------------
# Index tensors past the rows: clamped on the device, never read or written out of bounds
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_masked_m_past_max_m_is_clamped(fp8: bool, bounds_checked: list[str]) -> None:
    """``masked_m = [9, 1]`` with ``max_m = 4``: expert 0 computes its 4 rows (not 9, which would read
    expert 1's slab and, for the last expert, past the tensor); the result is the reference's with
    ``masked_m`` clamped to ``max_m``."""
    torch.manual_seed(31)
    e, max_m, n, k = 2, 4, 24, 128
    masked_m = torch.tensor([9, 1], dtype=torch.int64)
    clamped = masked_m.clamp(max=max_m)
    w = torch.randn(e, n, k)
    x = torch.randn(e, max_m, k)
    if fp8:
        xq, xs = _fp8(x, torch.float8_e4m3fn)
        wq, ws = quantize_fp8_blocks(w)
        out = grouped_gemm.grouped_gemm_fp8_masked(xq, xs, wq, ws, masked_m, config={"BLOCK_M": 16, "BLOCK_N": 32})
        want = reference(grouped_gemm, "grouped_gemm_fp8_masked")(xq, xs, wq, ws, clamped)
    else:
        x, w = x.bfloat16(), w.bfloat16()
        out = grouped_gemm.grouped_gemm_masked(x, w, masked_m, config={"BLOCK_M": 16, "BLOCK_N": 32})
        want = reference(grouped_gemm, "grouped_gemm_masked")(x, w, clamped)
    assert not bounds_checked
    assert_gemm_close(out, want)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_offsets_past_m_are_clamped(fp8: bool, bounds_checked: list[str]) -> None:
    """Offsets beyond ``M`` (a corrupt or oversized table: ``[0, 5, 40, 90]`` for 12 rows) are clamped to
    ``M`` on the device: the experts own rows ``0:5``, ``5:12`` and none, nothing is padding, and no access
    leaves x or out."""
    torch.manual_seed(32)
    m, n, k = 12, 24, 128
    offsets = torch.tensor([0, 5, 40, 90], dtype=torch.int64)
    clamped = offsets.clamp(max=m)
    x = torch.randn(m, k)
    w = torch.randn(3, n, k)
    if fp8:
        xq, xs = _fp8(x, torch.float8_e4m3fn)
        wq, ws = quantize_fp8_blocks(w)
        out = grouped_gemm.grouped_gemm_fp8(xq, xs, wq, ws, offsets, config={"BLOCK_M": 16, "BLOCK_N": 32})
        want = reference(grouped_gemm, "grouped_gemm_fp8")(xq, xs, wq, ws, clamped)
    else:
        x, w = x.bfloat16(), w.bfloat16()
        out = grouped_gemm.grouped_gemm(x, w, offsets, config={"BLOCK_M": 16, "BLOCK_N": 32})
        want = reference(grouped_gemm, "grouped_gemm")(x, w, clamped)
    assert not bounds_checked
    assert_gemm_close(out, want)


def test_default_configs_run() -> None:
    torch.manual_seed(24)
    x = torch.randn(5, 64)
    w = torch.randn(2, 24, 64)
    offsets = _offsets([2, 3], torch.int32)
    assert_gemm_close(grouped_gemm.grouped_gemm(x, w, offsets), reference(grouped_gemm, "grouped_gemm")(x, w, offsets))
    xq, xs = _fp8(torch.randn(2, 3, 128), torch.float8_e4m3fn)
    wq, ws = quantize_fp8_blocks(torch.randn(2, 24, 128))
    masked_m = torch.tensor([3, 1])
    assert_gemm_close(
        grouped_gemm.grouped_gemm_fp8_masked(xq, xs, wq, ws, masked_m),
        reference(grouped_gemm, "grouped_gemm_fp8_masked")(xq, xs, wq, ws, masked_m),
    )


def test_empty_shapes() -> None:
    x = torch.randn(0, 64)
    w = torch.randn(2, 24, 64)
    assert grouped_gemm.grouped_gemm(x, w, torch.zeros(3, dtype=torch.int32)).shape == (0, 24)
    assert grouped_gemm.grouped_gemm_masked(torch.randn(2, 0, 64), w, torch.zeros(2)).shape == (2, 0, 24)


# ---------------------------------------------------------------------------------------------------
# Launcher errors
# ---------------------------------------------------------------------------------------------------


def test_rejects_unknown_config_key() -> None:
    x, w, offsets = torch.randn(4, 64), torch.randn(2, 16, 64), _offsets([2, 2], torch.int32)
    with pytest.raises(OpInputError, match=r"grouped_gemm: config: unknown keys \['GROUP_M'\]"):
        grouped_gemm.grouped_gemm(x, w, offsets, config={"GROUP_M": 8})


def test_rejects_fp8_k_block_past_the_scale_block() -> None:
    xq, xs = _fp8(torch.randn(2, 4, 256), torch.float8_e4m3fn)
    wq, ws = quantize_fp8_blocks(torch.randn(2, 16, 256))
    with pytest.raises(OpInputError, match=r"grouped_gemm_fp8_masked: config: BLOCK_K must divide"):
        grouped_gemm.grouped_gemm_fp8_masked(xq, xs, wq, ws, torch.tensor([4, 4]), config={"BLOCK_K": 256})


@pytest.mark.parametrize("masked", [False, True], ids=["contiguous", "masked"])
def test_fp8_launchers_check_their_operands(masked: bool) -> None:
    """K not a multiple of 128, scales of the wrong shape or dtype, mixed fp8 formats: each an error naming
    the argument, before any launch (attribute checks only)."""
    e, m, n, k = 2, 4, 16, 256
    lead = (e, m) if masked else (m,)
    xq = torch.zeros(*lead, k, dtype=torch.float8_e4m3fn)
    xs = torch.ones(*lead, k // 128)
    wq = torch.zeros(e, n, k, dtype=torch.float8_e4m3fn)
    ws = torch.ones(e, 1, k // 128)
    index = torch.tensor([m, m]) if masked else torch.tensor([0, 2, m])
    op = grouped_gemm.grouped_gemm_fp8_masked if masked else grouped_gemm.grouped_gemm_fp8
    name = "grouped_gemm_fp8_masked" if masked else "grouped_gemm_fp8"
    x192 = torch.zeros(*lead, 192, dtype=torch.float8_e4m3fn)
    xs192 = torch.ones(*lead, 2)
    w192 = torch.zeros(e, n, 192, dtype=torch.float8_e4m3fn)
    with pytest.raises(LayoutError, match=rf"{name}: xq: K = 192 must be a multiple of 128"):
        op(x192, xs192, w192, torch.ones(e, 1, 2), index)
    with pytest.raises(ShapeError, match=rf"{name}: xs: expected"):
        op(xq, xs[..., :1], wq, ws, index)
    with pytest.raises(ShapeError, match=rf"{name}: ws: expected \[2, 1, 2\]"):
        op(xq, xs, wq, ws[:1], index)
    with pytest.raises(DTypeError, match=rf"{name}: xs: expected float32 scales"):
        op(xq, xs.half(), wq, ws, index)
    with pytest.raises(DTypeError, match=rf"{name}: wq: expected xq's fp8 dtype"):
        op(xq, xs, wq.view(torch.uint8).view(torch.float8_e4m3fnuz), ws, index)
    with pytest.raises(ShapeError, match=rf"{name}: wq: expected \[E, N, K\]"):
        op(xq, xs, wq[0], ws, index)
    with pytest.raises(ShapeError, match=rf"{name}: xq: expected"):
        op(xq[0] if masked else xq[None], xs, wq, ws, index)


def test_rejects_strided_k() -> None:
    x = torch.randn(64, 4).t()  # [4, 64] with K strided
    w, offsets = torch.randn(2, 16, 64), _offsets([2, 2], torch.int32)
    with pytest.raises(OpInputError, match=r"grouped_gemm: x: must have stride 1 in its last dim"):
        grouped_gemm.grouped_gemm(x, w, offsets)


def test_rejects_strided_offsets() -> None:
    x, w = torch.randn(4, 64), torch.randn(2, 16, 64)
    offsets = torch.tensor([0, 9, 2, 9, 4, 9], dtype=torch.int32)[::2]
    with pytest.raises(OpInputError, match=r"grouped_gemm: offsets: must be contiguous"):
        grouped_gemm.grouped_gemm(x, w, offsets)


def test_rejects_cpu_tensors_without_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "INTERPRETING", False)
    x, w = torch.randn(2, 4, 64), torch.randn(2, 16, 64)
    with pytest.raises(OpInputError, match=r"grouped_gemm_masked: x: is on the CPU"):
        grouped_gemm.grouped_gemm_masked(x, w, torch.tensor([4, 4]))


def test_ops_and_compile_specs() -> None:
    assert (
        set(grouped_gemm.OPS)
        == set(grouped_gemm.REFERENCE)
        == set(grouped_gemm.DEFAULTS)
        == {
            "grouped_gemm",
            "grouped_gemm_masked",
            "grouped_gemm_fp8",
            "grouped_gemm_fp8_masked",
        }
    )
    specs = grouped_gemm.compile_specs("*fp8e4b8", {"grouped_gemm_fp8": {"num_stages": 2}})
    assert len(specs) == 14
    for spec in specs:
        assert list(spec.signature) == list(spec.kernel.arg_names)
        assert set(spec.divisible_by_16) <= set(spec.signature)
        if "fp8" in spec.name:
            assert spec.signature["x_ptr"] == "*fp8e4b8"
    by_name = {s.name: s for s in specs}
    assert by_name["grouped_gemm_fp8[bf16 out, i64 offsets]"].num_stages == 2
    # What the model launches: int64 offsets (moe_permute's) and int64 masked_m (the absorbed decode's).
    assert by_name["grouped_gemm[bf16, bf16 out, i64 offsets]"].signature["offsets_ptr"] == "*i64"
    assert by_name["grouped_gemm_masked[bf16, bf16 out, i64 masked_m]"].signature["masked_m_ptr"] == "*i64"
    # fp32 steps through half the K of the half-precision tiles: the same shared memory (on an H100 the
    # tuned 128x256x64 tiles in fp32 needed 288 KiB of its 227 and failed to launch).
    assert by_name["grouped_gemm[bf16, bf16 out, i64 offsets]"].constexprs["BLOCK_K"] == 64
    assert by_name["grouped_gemm[fp32, fp32 out, i64 offsets]"].constexprs["BLOCK_K"] == 32
    assert by_name["grouped_gemm_masked[fp32, fp32 out, i64 masked_m]"].constexprs["BLOCK_K"] == 32
    assert by_name["grouped_gemm_masked[bf16, bf16 out, i32 masked_m]"].signature["masked_m_ptr"] == "*i32"
    assert by_name["grouped_gemm[fp16, fp16 out, i64 offsets]"].signature["out_ptr"] == "*fp16"
