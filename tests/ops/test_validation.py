"""Bad input at every op boundary: an exception from hal.errors naming the op, the argument, what was
expected and what was given. Runs through a real backend's op table, so it checks what users call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import hal
from hal.errors import CollectiveError, DeviceError, DTypeError, LayoutError, OpInputError, ShapeError

F8 = torch.float8_e4m3fn
r = torch.randn


def q8(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape).to(F8)


def q8i(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.int8)


def s32(*shape: int) -> torch.Tensor:
    return torch.ones(*shape)


def i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


# (op, args, kwargs, error class, fragments the message must contain)
CASES: list[tuple[str, tuple[Any, ...], dict[str, Any], type[Exception], tuple[str, ...]]] = [
    # gemm
    ("gemm", (r(4, 8, 2), r(3, 8)), {}, ShapeError, ("gemm: x:", "[M, K]", "[4, 8, 2]")),
    ("gemm", (r(4, 8), r(3, 7)), {}, ShapeError, ("gemm: w:", "K = 8", "[3, 7]")),
    ("gemm", (r(4, 8).long(), r(3, 8).long()), {}, DTypeError, ("gemm: x:", "float32 | bfloat16 | float16", "int64")),
    ("gemm", (r(4, 8), r(3, 8).bfloat16()), {}, DTypeError, ("gemm: w:", "dtype of x (torch.float32)", "bfloat16")),
    ("gemm", (r(4, 8), meta(3, 8)), {}, DeviceError, ("gemm: w:", "device cpu", "meta")),
    ("gemm", (r(4, 8), r(3, 8)), {"out_dtype": torch.int8}, DTypeError, ("gemm: out_dtype:", "int8")),
    ("gemm", ([[1.0]], r(3, 8)), {}, OpInputError, ("gemm: x:", "torch.Tensor", "list")),
    # quantize_fp8
    ("quantize_fp8", (r(8),), {}, ShapeError, ("quantize_fp8: x:", "[M, K]")),
    ("quantize_fp8", (r(2, 128),), {"fp8_dtype": torch.int8}, OpInputError, ("fp8_dtype", "float8_e4m3fn")),
    ("quantize_fp8", (r(2, 128),), {"group_size": 0}, OpInputError, ("group_size", "positive int", "0")),
    # gemm_fp8
    (
        "gemm_fp8",
        (q8(4, 200), s32(4, 2), q8(8, 200), s32(1, 2)),
        {},
        LayoutError,
        ("gemm_fp8: xq:", "multiple of 128", "K = 200", "pad K"),
    ),
    (
        "gemm_fp8",
        (q8(4, 256), s32(4, 3), q8(8, 256), s32(1, 2)),
        {},
        ShapeError,
        ("gemm_fp8: xs:", "[4, 2]", "1x128", "[4, 3]"),
    ),
    (
        "gemm_fp8",
        (q8(4, 256), s32(4, 2), q8(130, 256), s32(1, 2)),
        {},
        ShapeError,
        ("gemm_fp8: ws:", "[2, 2]", "128x128", "[1, 2]"),
    ),
    ("gemm_fp8", (q8(4, 256), s32(4, 2).double(), q8(8, 256), s32(1, 2)), {}, DTypeError, ("xs", "float32", "float64")),
    (
        "gemm_fp8",
        (q8(4, 256), s32(4, 2), q8(8, 256).to(torch.float8_e4m3fnuz), s32(1, 2)),
        {},
        DTypeError,
        ("gemm_fp8: wq:", "dtype of xq"),
    ),
    ("gemm_fp8", (r(4, 256), s32(4, 2), q8(8, 256), s32(1, 2)), {}, DTypeError, ("gemm_fp8: xq:", "float8_e4m3fn")),
    ("gemm_fp8", (q8(4, 256), s32(4, 2), q8(8, 128), s32(1, 1)), {}, ShapeError, ("gemm_fp8: wq:", "K = 256")),
    # grouped
    (
        "grouped_gemm",
        (r(10, 16), r(3, 8, 16), i32(0, 4, 10)),
        {},
        ShapeError,
        ("grouped_gemm: offsets:", "E + 1 for 3 experts", "[3]"),
    ),
    ("grouped_gemm", (r(10, 16), r(3, 8, 16), torch.zeros(4)), {}, DTypeError, ("offsets", "int32 | int64", "float32")),
    ("grouped_gemm", (r(10, 16), r(8, 16), i32(0, 4)), {}, ShapeError, ("grouped_gemm: w:", "[E, N, K]")),
    ("grouped_gemm", (r(10, 16), r(3, 8, 12), i32(0, 4, 8, 10)), {}, ShapeError, ("grouped_gemm: w:", "K of x")),
    (
        "grouped_gemm_masked",
        (r(3, 4, 16), r(2, 8, 16), i32(1, 2)),
        {},
        ShapeError,
        ("grouped_gemm_masked: w:", "E of x"),
    ),
    ("grouped_gemm_masked", (r(2, 4, 16), r(2, 8, 16), i32(1, 2, 3)), {}, ShapeError, ("masked_m", "(E)", "[3]")),
    (
        "grouped_gemm",
        (r(10, 16), r(3, 8, 16), i32(0, 6, 4, 10)),
        {},
        LayoutError,
        ("grouped_gemm: offsets:", "never decrease", "x's 10 rows"),
    ),
    (
        "grouped_gemm",
        (r(10, 16), r(3, 8, 16), i32(0, 4, 8, 11)),
        {},
        LayoutError,
        ("grouped_gemm: offsets:", "at most at 10"),
    ),
    (
        "grouped_gemm_masked",
        (r(2, 4, 16), r(2, 8, 16), i32(1, 5)),
        {},
        LayoutError,
        ("grouped_gemm_masked: masked_m:", "[0, 5)", "max_m = 4", "found 5"),
    ),
    (
        "grouped_gemm_fp8",
        (q8(10, 256), s32(10, 2), q8(3, 8, 256), s32(3, 1, 1), i32(0, 1, 2, 10)),
        {},
        ShapeError,
        ("grouped_gemm_fp8: ws:", "[3, 1, 2]"),
    ),
    (
        "grouped_gemm_fp8_masked",
        (q8(2, 4, 100), s32(2, 4, 1), q8(2, 8, 100), s32(2, 1, 1), i32(1, 1)),
        {},
        LayoutError,
        ("multiple of 128",),
    ),
    # INT8 W8A8
    ("quantize_int8", (r(4, 8).long(),), {}, DTypeError, ("quantize_int8: x:", "int64")),
    ("quantize_int8", (r(8),), {}, ShapeError, ("quantize_int8: x:", "[M, K]")),
    (
        "gemm_int8",
        (q8i(4, 16), s32(4), q8i(8, 16), s32(7)),
        {},
        ShapeError,
        ("gemm_int8: ws:", "[8]", "per output channel", "[7]"),
    ),
    ("gemm_int8", (q8i(4, 16), s32(3), q8i(8, 16), s32(8)), {}, ShapeError, ("gemm_int8: xs:", "M of xq")),
    ("gemm_int8", (q8i(4, 16), s32(4), q8i(8, 12), s32(8)), {}, ShapeError, ("gemm_int8: wq:", "K of xq")),
    ("gemm_int8", (q8i(4, 16).float(), s32(4), q8i(8, 16), s32(8)), {}, DTypeError, ("gemm_int8: xq:", "int8")),
    ("gemm_int8", (q8i(4, 16), s32(4).double(), q8i(8, 16), s32(8)), {}, DTypeError, ("gemm_int8: xs:", "float32")),
    (
        "grouped_gemm_int8",
        (q8i(10, 16), s32(10), q8i(3, 8, 16), s32(3, 8), i32(0, 4, 10)),
        {},
        ShapeError,
        ("grouped_gemm_int8: offsets:", "E + 1"),
    ),
    (
        "grouped_gemm_int8",
        (q8i(10, 16), s32(10), q8i(3, 8, 16), s32(3, 7), i32(0, 4, 8, 10)),
        {},
        ShapeError,
        ("grouped_gemm_int8: ws:", "[3, 8]"),
    ),
    # mla_decode
    (
        "mla_decode",
        (r(2, 1, 4, 96), r(3, 64, 1, 96), i32(0, 1).view(2, 1), i32(5, 5)),
        {"head_dim_v": 64},
        ShapeError,
        (),
    ),  # placeholder replaced below: valid shapes except the dtype of block_table
    (
        "mla_decode",
        (r(2, 4, 96), r(3, 64, 1, 96), torch.zeros(2, 1, dtype=torch.int32), i32(5, 5)),
        {"head_dim_v": 64},
        ShapeError,
        ("mla_decode: q:", "[b, s_q, h, d]"),
    ),
    (
        "mla_decode",
        (r(2, 1, 4, 96), r(3, 64, 1, 80), torch.zeros(2, 1, dtype=torch.int32), i32(5, 5)),
        {"head_dim_v": 64},
        ShapeError,
        ("mla_decode: kv_cache:", "d of q"),
    ),
    (
        "mla_decode",
        (r(2, 1, 4, 96), r(3, 64, 2, 96), torch.zeros(2, 1, dtype=torch.int32), i32(5, 5)),
        {"head_dim_v": 64},
        ShapeError,
        ("kv_cache", "one latent head"),
    ),
    (
        "mla_decode",
        (r(2, 1, 4, 96), r(3, 64, 1, 96), torch.zeros(2, 1, dtype=torch.int64), i32(5, 5)),
        {"head_dim_v": 64},
        DTypeError,
        ("mla_decode: block_table:", "int32", "int64"),
    ),
    (
        "mla_decode",
        (r(2, 1, 4, 96), r(3, 64, 1, 96), torch.zeros(3, 1, dtype=torch.int32), i32(5, 5)),
        {"head_dim_v": 64},
        ShapeError,
        ("block_table", "b of q"),
    ),
    (
        "mla_decode",
        (r(2, 1, 4, 96), r(3, 64, 1, 96), torch.zeros(2, 1, dtype=torch.int32), i32(5, 5)),
        {"head_dim_v": 128},
        OpInputError,
        ("head_dim_v", "1..96", "128"),
    ),
    (
        "mla_decode",
        (r(2, 1, 4, 96), r(3, 64, 1, 96).bfloat16(), torch.zeros(2, 1, dtype=torch.int32), i32(5, 5)),
        {"head_dim_v": 64},
        DTypeError,
        ("kv_cache", "dtype of q"),
    ),
    (
        "mla_decode",
        (r(2, 1, 4, 96), r(3, 64, 1, 96), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), i32(65, 70)),
        {"head_dim_v": 64},
        LayoutError,
        ("mla_decode: block_table:", "[0, 3)", "block ids of kv_cache", "found 3"),
    ),
    (
        "mla_decode",
        (r(2, 1, 4, 96), r(3, 64, 1, 96), torch.tensor([[0], [-1]], dtype=torch.int32), i32(5, 5)),
        {"head_dim_v": 64},
        LayoutError,
        ("mla_decode: block_table:", "found -1"),
    ),
    (
        "mla_decode",
        (r(2, 1, 4, 96), r(3, 64, 1, 96), torch.tensor([[0], [1]], dtype=torch.int32), i32(5, 65)),
        {"head_dim_v": 64},
        LayoutError,
        ("mla_decode: cache_seqlens:", "at most 64 tokens fit the block table", "65"),
    ),
    # attention_prefill
    (
        "attention_prefill",
        (r(5, 4, 32), r(5, 4, 32), r(5, 4, 16), i32(0, 3, 2, 5), i32(0, 2, 4, 5)),
        {},
        LayoutError,
        ("attention_prefill: cu_seqlens_q:", "never decrease", "end at 5", "[0, 3, 2, 5]"),
    ),
    (
        "attention_prefill",
        (r(5, 4, 32), r(5, 4, 32), r(5, 4, 16), i32(0, 5), i32(0, 4)),
        {},
        LayoutError,
        ("attention_prefill: cu_seqlens_k:", "end at 5"),
    ),
    (
        "attention_prefill",
        (r(5, 4, 32), r(5, 3, 32), r(5, 3, 16), i32(0, 5), i32(0, 5)),
        {},
        ShapeError,
        ("attention_prefill: k:", "h_kv = 3 must divide h = 4"),
    ),
    (
        "attention_prefill",
        (r(5, 4, 32), r(5, 4, 24), r(5, 4, 16), i32(0, 5), i32(0, 5)),
        {},
        ShapeError,
        ("attention_prefill: k:", "d_qk of q"),
    ),
    (
        "attention_prefill",
        (r(5, 4, 32), r(5, 4, 32), r(6, 4, 16), i32(0, 5), i32(0, 5)),
        {},
        ShapeError,
        ("attention_prefill: v:", "total_k of k"),
    ),
    (
        "attention_prefill",
        (r(5, 4, 32), r(5, 4, 32), r(5, 4, 16), i32(0, 5), i32(0, 2, 5)),
        {},
        ShapeError,
        ("cu_seqlens_k", "b + 1 of cu_seqlens_q"),
    ),
    (
        "attention_prefill",
        (r(5, 4, 32), r(5, 4, 32), r(5, 4, 16), torch.tensor([0, 5]), i32(0, 5)),
        {},
        DTypeError,
        ("cu_seqlens_q", "int32", "int64"),
    ),
    (
        "attention_prefill",
        (r(5, 4, 32), r(5, 4, 32), r(5, 4, 16), i32(5), i32(5)),
        {},
        ShapeError,
        ("cu_seqlens_q", "b >= 1"),
    ),
    # moe
    ("moe_route", (r(4, 16), None), {"top_k": 2, "n_group": 3}, OpInputError, ("moe_route: n_group:", "divide E = 16")),
    (
        "moe_route",
        (r(4, 16), None),
        {"top_k": 2, "n_group": 4, "topk_group": 5},
        OpInputError,
        ("topk_group", "<= n_group"),
    ),
    (
        "moe_route",
        (r(4, 16), None),
        {"top_k": 9, "n_group": 4, "topk_group": 2},
        OpInputError,
        ("top_k", "<= E / n_group * topk_group = 8"),
    ),
    ("moe_route", (r(4, 16), r(15)), {"top_k": 2}, ShapeError, ("correction_bias", "E of router_logits")),
    ("moe_route", (r(4, 16), r(16).bfloat16()), {"top_k": 2}, DTypeError, ("correction_bias", "float32")),
    ("moe_route", (r(4, 16), None), {"top_k": 2, "scoring_func": "relu"}, OpInputError, ("scoring_func", "'relu'")),
    ("moe_route", (r(4, 16), None), {"top_k": 0}, OpInputError, ("top_k", "positive int")),
    (
        "moe_permute",
        (r(4, 8), torch.zeros(3, 2, dtype=torch.int64), 4),
        {},
        ShapeError,
        ("moe_permute: topk_ids:", "T of x"),
    ),
    ("moe_permute", (r(4, 8), torch.zeros(4, 2), 4), {}, DTypeError, ("topk_ids", "int32 | int64")),
    (
        "moe_permute",
        (r(4, 8), torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]]), 4),
        {},
        LayoutError,
        ("moe_permute: topk_ids:", "[0, 4)", "found 4"),
    ),
    (
        "moe_unpermute",
        (r(8, 8), torch.arange(1, 9), torch.rand(4, 2)),
        {},
        LayoutError,
        ("moe_unpermute: order:", "found 8"),
    ),
    ("moe_permute", (r(4, 8), torch.zeros(4, 2, dtype=torch.int64), 0), {}, OpInputError, ("num_experts", "positive")),
    ("moe_unpermute", (r(7, 8), torch.arange(8), torch.rand(4, 2)), {}, ShapeError, ("moe_unpermute: y:", "T * top_k")),
    (
        "moe_unpermute",
        (r(8, 8), torch.arange(8), torch.rand(4, 2).double()),
        {},
        DTypeError,
        ("topk_weights", "float32"),
    ),
    # small ops
    ("rms_norm", (r(4, 8), r(7)), {}, ShapeError, ("rms_norm: weight:", "D of x")),
    ("rms_norm", (r(4, 8).long(), r(8)), {}, DTypeError, ("rms_norm: x:",)),
    ("rotary", (r(4, 2, 7), torch.arange(4), r(10, 7)), {}, ShapeError, ("rotary: x:", "even")),
    ("rotary", (r(4, 2, 8), torch.arange(3), r(10, 8)), {}, ShapeError, ("rotary: positions:", "T of x")),
    ("rotary", (r(4, 2, 8), torch.arange(4), r(10, 6)), {}, ShapeError, ("cos_sin_cache", "D of x")),
    ("rotary", (r(4, 2, 8), torch.arange(4).float(), r(10, 8)), {}, DTypeError, ("positions", "int32 | int64")),
    ("rotary", (r(4, 2, 8), torch.arange(7, 11), r(10, 8)), {}, LayoutError, ("rotary: positions:", "found 10")),
    ("rotary", (r(2, 2, 8), torch.tensor([-1, 0]), r(10, 8)), {}, LayoutError, ("rotary: positions:", "found -1")),
    ("silu_and_mul", (r(4, 7),), {}, ShapeError, ("silu_and_mul: x:", "even (2N)")),
    ("silu_and_mul", (r(4, 8).long(),), {}, DTypeError, ("silu_and_mul: x:",)),
    # runtime
    ("pinned_empty", ([2, -1], torch.float32), {}, OpInputError, ("pinned_empty: shape:",)),
    ("pinned_empty", ([2, 3], "float32"), {}, OpInputError, ("pinned_empty: dtype:",)),
    # collectives need a process group first
    ("all_reduce", (r(4),), {}, CollectiveError, ("all_reduce:", "init_process_group")),
    ("barrier", (), {}, CollectiveError, ("barrier:", "process group")),
]
# the first mla_decode row above is a deliberately valid call, kept to prove validation is not too strict
VALID_MLA = CASES.pop(next(i for i, c in enumerate(CASES) if c[0] == "mla_decode" and not c[4]))


def case_id(case: tuple[Any, ...]) -> str:
    return f"{case[0]}-{case[3].__name__}-" + (case[4][0].split(":")[-1].strip() if case[4] else "")


@pytest.fixture(scope="module")
def cpu() -> hal.Backend:
    import hal_cpu

    return hal.Registry(entry_points=False, plugins=[("cpu", hal_cpu)]).get_backend("cpu")


@pytest.mark.parametrize("case", CASES, ids=[f"{i:02d}-{case_id(c)}" for i, c in enumerate(CASES)])
def test_bad_input_raises_a_clear_error(cpu: hal.Backend, case: tuple[Any, ...]) -> None:
    op, args, kwargs, error, fragments = case
    fn: Callable[..., Any] = cpu.op(op)
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{op}"), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, hal.errors.HALError)


def test_valid_call_passes_validation(cpu: hal.Backend) -> None:
    op, args, kwargs, _, _ = VALID_MLA
    out, lse = cpu.op(op)(*args, **kwargs)
    assert out.shape == (2, 1, 4, 64) and lse.shape == (2, 4, 1)


def test_every_compute_op_has_a_bad_input_case() -> None:
    covered = {c[0] for c in CASES}
    missing = [op for op, spec in hal.CATALOGUE.items() if spec.kind == "compute" and op not in covered]
    assert not missing, f"compute ops without a bad-input test: {missing}"


def test_input_errors_are_value_errors_too(cpu: hal.Backend) -> None:
    # code written against plain Python exceptions keeps working
    with pytest.raises(ValueError):
        cpu.gemm(r(2, 3), r(2, 4))
    with pytest.raises(TypeError):
        cpu.gemm(r(2, 3).long(), r(2, 3).long())


def test_calling_a_contract_directly_says_how_to_call_the_op() -> None:
    from hal.ops.catalogue import gemm

    with pytest.raises(TypeError, match="through a backend"):
        gemm(r(2, 3), r(4, 3))


def test_index_checks_agree_on_small_and_large_host_tensors() -> None:
    """Host index tensors of up to ``SMALL`` values are checked as Python lists, larger ones by torch
    reductions: both reject the same bad value with the same message."""
    from hal.ops import _validate as v

    for n in (v.SMALL, v.SMALL + 1):
        good = torch.arange(n)
        v.values_in("op", "ids", good, 0, n, "ids")
        v.cumulative("op", "offsets", good, n - 1, True, "offsets")
        for bad, found in ((-1, "found -1"), (n, f"found {n}")):
            t = good.clone()
            t[n // 2] = bad
            with pytest.raises(LayoutError, match=rf"op: ids: values must lie in \[0, {n}\) \(ids\), {found}"):
                v.values_in("op", "ids", t, 0, n, "ids")
        dip = good.clone()
        dip[n // 2] = 0
        with pytest.raises(LayoutError, match="never decrease"):
            v.cumulative("op", "offsets", dip, n - 1, True, "offsets")
        with pytest.raises(LayoutError, match=f"end at {n}"):
            v.cumulative("op", "offsets", good, n, True, "offsets")


@pytest.mark.parametrize("rows", [1, 300], ids=["list-check", "tensor-check"])
def test_mla_decode_checks_the_used_block_ids_at_any_table_size(rows: int) -> None:
    be = hal.get_backend("cpu")
    q, cache = torch.randn(rows, 1, 2, 16), torch.randn(4, 64, 1, 16)
    table = torch.full((rows, 2), 3, dtype=torch.int32)
    table[:, 1] = 99  # past each sequence's length: never read, never checked
    seqlens = torch.full((rows,), 64, dtype=torch.int32)
    be.mla_decode(q, cache, table, seqlens, head_dim_v=8)
    table[rows - 1, 0] = 4  # a used entry past the cache's 4 blocks
    with pytest.raises(LayoutError, match=r"mla_decode: block_table: values must lie in \[0, 4\).*found 4"):
        be.mla_decode(q, cache, table, seqlens, head_dim_v=8)
