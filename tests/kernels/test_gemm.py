"""``hal_kernels.gemm.gemm_fp8`` against the reference ``gemm_fp8``, under the interpreter.

Inputs are quantized with torch (the reference ``quantize_fp8`` and ``hal.quant.quantize_fp8_blocks``),
not with the quantization kernel, so the GEMM is tested on its own. Tolerances (see
:func:`assert_gemm_close`): the reference dequantizes to fp32 and runs one fp32 matmul; the kernel
sums exact fp8 products per 128-deep block in fp32 and scales each block's partial, so the two differ
by fp32 rounding only. Then each rounds to ``out_dtype``.
"""

from __future__ import annotations

import pytest
import torch

from hal.errors import DTypeError, LayoutError, OpInputError, ShapeError
from hal.quant import quantize_fp8_blocks
from hal_kernels import _common, gemm, quant
from tests.kernels.conftest import FP8S, reference

OUT_DTYPES = [torch.bfloat16, torch.float32, torch.float16]

#: Per-element relative tolerance by output dtype. fp32: 1e-5 (the fp32 reassociation of a K <= 384
#: sum measures ~1e-6). fp16: one fp16 ulp (2^-10 of the value), since the two fp32 results may
#: round to neighbours. bf16: one bf16 ulp (2^-7): the interpreter truncates fp32 → bf16 where the
#: reference rounds to nearest (on a GPU both round to nearest; half an ulp apart at most).
RTOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def assert_gemm_close(out: torch.Tensor, want: torch.Tensor) -> None:
    """``out`` equals ``want`` (the reference, same dtype) within :data:`RTOL`, elementwise.

    The absolute term, 1e-5 of the largest output, covers elements near zero where the fp32
    reassociation error of the large terms in the sum dominates their own magnitude.
    """
    assert out.dtype == want.dtype and out.shape == want.shape and out.is_contiguous()
    atol = 1e-5 * float(want.float().abs().max().clamp(min=1e-30))
    torch.testing.assert_close(out.float(), want.float(), rtol=RTOL[want.dtype], atol=atol)


def fp8_operands(
    m: int, n: int, k: int, fp8_dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xq, xs, wq, ws)``: random activations and weights, quantized with torch."""
    g = torch.Generator().manual_seed(seed)
    # Row and column magnitudes over several binades, so the scales matter.
    x = torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m)[:, None]
    w = torch.randn(n, k, generator=g) * torch.logspace(-1, 1, k)[None, :]
    xq, xs = reference(quant, "quantize_fp8")(x, fp8_dtype=fp8_dtype)
    wq, ws = quantize_fp8_blocks(w, fp8_dtype=fp8_dtype)
    return xq, xs, wq, ws


# Small blocks and shapes: each interpreted program costs milliseconds.
SHAPES = [
    # (M, N, K, config)
    (1, 128, 128, {"BLOCK_M": 16, "BLOCK_N": 128}),  # decode: one row
    (50, 200, 256, {"BLOCK_M": 32, "BLOCK_N": 64}),  # M not a block multiple, N not a multiple of 128
    (77, 72, 384, {"BLOCK_M": 64, "BLOCK_N": 32, "GROUP_M": 2}),  # N < 128, several M bands
    (64, 256, 256, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}),  # two K steps per scale block
]


@pytest.mark.parametrize("fp8_dtype", FP8S)
@pytest.mark.parametrize(("m", "n", "k", "config"), SHAPES, ids=[f"M{s[0]}-N{s[1]}-K{s[2]}" for s in SHAPES])
def test_matches_reference(m: int, n: int, k: int, config: dict[str, int], fp8_dtype: torch.dtype) -> None:
    xq, xs, wq, ws = fp8_operands(m, n, k, fp8_dtype, seed=m * 1009 + n * 31 + k)
    out = gemm.gemm_fp8(xq, xs, wq, ws, config=config)
    assert_gemm_close(out, reference(gemm, "gemm_fp8")(xq, xs, wq, ws))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["bf16", "fp32", "fp16"])
def test_out_dtypes(out_dtype: torch.dtype) -> None:
    xq, xs, wq, ws = fp8_operands(20, 136, 256, torch.float8_e4m3fn, seed=11)
    out = gemm.gemm_fp8(xq, xs, wq, ws, out_dtype=out_dtype, config={"BLOCK_M": 32, "BLOCK_N": 128})
    assert_gemm_close(out, reference(gemm, "gemm_fp8")(xq, xs, wq, ws, out_dtype=out_dtype))


def test_strided_operands() -> None:
    """Rows of x and w may be slices of wider buffers; scales may be column-major (DeepGEMM's TMA layout)."""
    xq, xs, wq, ws = fp8_operands(33, 130, 256, torch.float8_e4m3fn, seed=12)
    x_wide = torch.zeros(33, 512, dtype=xq.dtype)
    x_wide[:, 128:384] = xq
    xs_colmajor = xs.t().contiguous().t()
    ws_colmajor = ws.t().contiguous().t()
    out = gemm.gemm_fp8(
        x_wide[:, 128:384], xs_colmajor, wq, ws_colmajor, out_dtype=torch.float32, config={"BLOCK_M": 64}
    )
    assert_gemm_close(out, reference(gemm, "gemm_fp8")(xq, xs, wq, ws, out_dtype=torch.float32))


def test_default_config_runs() -> None:
    xq, xs, wq, ws = fp8_operands(3, 140, 128, torch.float8_e4m3fn, seed=13)
    out = gemm.gemm_fp8(xq, xs, wq, ws, config=None)
    assert_gemm_close(out, reference(gemm, "gemm_fp8")(xq, xs, wq, ws))


def test_empty_m() -> None:
    xq, xs, wq, ws = fp8_operands(0, 128, 128, torch.float8_e4m3fn, seed=14)
    assert gemm.gemm_fp8(xq, xs, wq, ws).shape == (0, 128)


# ---------------------------------------------------------------------------------------------------
# Launcher errors
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return fp8_operands(4, 128, 256, torch.float8_e4m3fn, seed=15)


def test_rejects_unknown_config_key(operands: tuple[torch.Tensor, ...]) -> None:
    with pytest.raises(OpInputError, match=r"gemm_fp8: config: unknown keys \['BLOCK_Q'\]"):
        gemm.gemm_fp8(*operands, config={"BLOCK_Q": 64})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"BLOCK_M": 48}, "BLOCK_M must be a power of two >= 16"),
        ({"BLOCK_N": 8}, "BLOCK_N must be a power of two >= 16"),
        ({"BLOCK_K": 256}, "BLOCK_K must divide the scale block 128"),
        ({"BLOCK_N": 256}, "BLOCK_N must divide the scale block 128"),
        # GROUP_M 0 used to launch with a 0-wide band (a division by 0) and leave the output unwritten.
        ({"GROUP_M": 0}, "GROUP_M must be a positive int, got 0"),
        ({"GROUP_M": 2.0}, "GROUP_M must be a positive int, got 2.0"),
        ({"num_warps": True}, "num_warps must be a positive int, got True"),
    ],
)
def test_rejects_bad_blocks(operands: tuple[torch.Tensor, ...], config: dict[str, int], message: str) -> None:
    with pytest.raises(OpInputError, match=message):
        gemm.gemm_fp8(*operands, config=config)


def test_rejects_strided_k(operands: tuple[torch.Tensor, ...]) -> None:
    xq, xs, wq, ws = operands
    wq_t = wq.t().contiguous().t()  # same values, K no longer stride 1
    with pytest.raises(OpInputError, match=r"gemm_fp8: wq: must have stride 1 in its last dim"):
        gemm.gemm_fp8(xq, xs, wq_t, ws)


def _k192() -> tuple[torch.Tensor, ...]:
    """K = 192: not a multiple of the 128-deep scale block (the scales' shapes follow K / 128 rounded up)."""
    xq = torch.zeros(4, 192, dtype=torch.float8_e4m3fn)
    wq = torch.zeros(128, 192, dtype=torch.float8_e4m3fn)
    return xq, torch.ones(4, 2), wq, torch.ones(1, 2)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ("k192", LayoutError, r"gemm_fp8: xq: K = 192 must be a multiple of 128"),
        ("xs_short", ShapeError, r"gemm_fp8: xs: expected \[4, 2\] .*got \[4, 1\]"),
        ("xs_rows", ShapeError, r"gemm_fp8: xs: expected \[4, 2\]"),
        ("ws_blocks", ShapeError, r"gemm_fp8: ws: expected \[1, 2\] .*got \[2, 2\]"),
        ("ws_bf16", DTypeError, r"gemm_fp8: ws: expected float32 scales, got torch.bfloat16"),
        ("wq_fnuz", DTypeError, r"gemm_fp8: wq: expected xq's fp8 dtype torch.float8_e4m3fn"),
        ("xq_bf16", DTypeError, r"gemm_fp8: xq: expected float8_e4m3fn \| float8_e4m3fnuz, got torch.bfloat16"),
        ("wq_k", ShapeError, r"gemm_fp8: wq: K = 128 differs from xq's K = 256"),
        ("wq_3d", ShapeError, r"gemm_fp8: wq: expected \[N, K\], got shape \[1, 128, 256\]"),
        ("out_int", DTypeError, r"gemm_fp8: out_dtype: expected bfloat16 \| float16 \| float32"),
    ],
)
def test_rejects_operands_the_kernel_would_misread(
    operands: tuple[torch.Tensor, ...], change: str, error: type[Exception], match: str
) -> None:
    """Attribute-only checks (no device read) of what the kernel assumes: each names its argument."""
    xq, xs, wq, ws = operands  # M 4, N 128, K 256
    kwargs: dict[str, object] = {}
    if change == "k192":
        xq, xs, wq, ws = _k192()
    elif change == "xs_short":
        xs = xs[:, :1]
    elif change == "xs_rows":
        xs = torch.ones(3, 2)
    elif change == "ws_blocks":
        ws = torch.ones(2, 2)
    elif change == "ws_bf16":
        ws = ws.bfloat16()
    elif change == "wq_fnuz":
        wq = wq.view(torch.uint8).view(torch.float8_e4m3fnuz)
    elif change == "xq_bf16":
        xq = xq.bfloat16()
    elif change == "wq_k":
        wq = wq[:, :128]
    elif change == "wq_3d":
        wq = wq[None]
    elif change == "out_int":
        kwargs["out_dtype"] = torch.int32
    with pytest.raises(error, match=match) as info:
        gemm.gemm_fp8(xq, xs, wq, ws, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, OpInputError)


def test_rejects_cpu_tensors_without_the_interpreter(
    operands: tuple[torch.Tensor, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_common, "INTERPRETING", False)
    with pytest.raises(OpInputError, match=r"gemm_fp8: xq: is on the CPU"):
        gemm.gemm_fp8(*operands)


def test_ops_and_compile_specs() -> None:
    assert gemm.OPS == {"gemm_fp8": gemm.gemm_fp8}
    specs = gemm.compile_specs("*fp8e4nv", {"gemm_fp8": {"BLOCK_M": 64, "num_stages": 3}})
    assert [s.name for s in specs] == ["gemm_fp8[bf16 out]", "gemm_fp8[fp16 out]", "gemm_fp8[fp32 out]"]
    assert [s.signature["out_ptr"] for s in specs] == ["*bf16", "*fp16", "*fp32"]
    for spec in specs:
        assert list(spec.signature) == list(spec.kernel.arg_names)
        assert spec.signature["x_ptr"] == spec.signature["w_ptr"] == "*fp8e4nv"
        assert spec.constexprs["BLOCK_M"] == 64 and spec.num_stages == 3
        assert set(spec.divisible_by_16) <= set(spec.signature)
