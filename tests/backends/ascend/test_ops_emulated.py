"""The Ascend backend's compute ops over a CPU emulation of the torch_npu operators they call.

The emulation (``torch_npu_emulation.py``) is written from Huawei's documentation of each operator and
rejects what the documents rule out, so these tests check both that the backend's calls are
well-formed (argument names, layouts, dtypes) and that the results keep HAL's contracts: the
conformance kit runs through the backend built on the CPU over the emulation, against the cpu
reference. Nothing here touches an NPU or imports the real torch_npu.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch

import hal
import hal_cpu
from hal.backend import Backend
from hal.hookspecs import hookimpl
from hal.model import DeepseekModel, random_state_dict, tiny_config
from hal.registry import RegisterBackend
from hal.testing import check_backend
from hal.testing.conformance import assert_close
from hal.types import Availability, BackendSpec

CPU = torch.device("cpu")

#: The ops the Ascend backend serves itself: runtime through torch.npu, compute through torch_npu.
NATIVE = {
    "device_count",
    "synchronize",
    "memory_stats",
    "empty_cache",
    "pinned_empty",
    "quantize_int8",
    "gemm_int8",
    "grouped_gemm",
    "grouped_gemm_int8",
    "rms_norm",
    "silu_and_mul",
    "rotary",
    "moe_route",
    "moe_permute",
    "moe_unpermute",
    "mla_decode",
}


class _EmulatedAscend:
    """A test plugin: the ``ascend`` backend, built on the CPU over the emulated torch_npu."""

    @hookimpl
    def hal_register_backends(self, register: RegisterBackend) -> None:
        from hal_ascend._backend import build

        register(
            BackendSpec(
                name="ascend",
                priority=80,
                probe=lambda: Availability.yes("torch_npu emulated on the CPU"),
                load=lambda: build(device=CPU),
                description="Ascend backend over the CPU emulation of torch_npu",
            )
        )


@pytest.fixture
def registry(torch_npu_emulation: ModuleType) -> hal.Registry:
    return hal.Registry(entry_points=False, plugins=[("cpu", hal_cpu), ("ascend-emulated", _EmulatedAscend())])


@pytest.fixture
def ascend(registry: hal.Registry) -> Backend:
    return registry.get_backend("ascend")


@pytest.fixture
def reference(registry: hal.Registry) -> dict[str, Callable[..., Any]]:
    return dict(registry.reference_ops())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# The backend over the emulation: conformance, op table, capabilities
# ---------------------------------------------------------------------------------------------------


def test_conformance_kit_passes_through_the_emulated_backend(
    ascend: Backend, reference: dict[str, Callable[..., Any]], torch_npu_emulation: ModuleType
) -> None:
    results = check_backend(ascend, reference)
    failed = [f"{r.case}: {r.detail}" for r in results if r.status == "fail"]
    assert failed == []
    skipped = [r for r in results if r.status == "skip"]
    assert skipped, "the fp8 cases must skip: the backend declares no fp8"
    assert all("fp8 format is none" in r.detail for r in skipped), [r.detail for r in skipped]
    int8 = [r for r in results if r.case.split("[")[0] in ("quantize_int8", "gemm_int8", "grouped_gemm_int8")]
    assert int8 and all(r.status == "pass" for r in int8)
    # The cases reached the documented operators, not only the reference.
    for operator in ("npu_dynamic_quant", "npu_quant_matmul", "npu_grouped_matmul", "npu_rms_norm", "npu_swiglu"):
        assert operator in torch_npu_emulation.calls
    assert {"npu_rotary_mul", "npu_moe_gating_top_k"} <= set(torch_npu_emulation.calls)
    assert {"npu_moe_init_routing", "npu_moe_finalize_routing"} <= set(torch_npu_emulation.calls)


def test_the_op_table_says_which_ops_are_native(ascend: Backend) -> None:
    native = {op for op, entry in ascend.table.items() if entry.source == "native"}
    assert native == NATIVE
    assert all(entry.source == "fallback" for op, entry in ascend.table.items() if op not in NATIVE)
    assert ascend.table["gemm_int8"].impl_name == "hal_ascend.ops:gemm_int8"


def test_capabilities_declare_int8_without_fp8(ascend: Backend) -> None:
    caps = ascend.capabilities
    assert (caps.fp8_format, caps.int8, caps.dist_backend, caps.arch) == (None, True, "hccl", "ascend910b")
    assert "DeepSeek FP8 checkpoints load as W8A8 INT8" in caps.extra["fp8_checkpoints"]
    assert ascend.device == CPU and ascend.device_count() == 1


# ---------------------------------------------------------------------------------------------------
# Each native op reaches its operator; paths the kit does not cover
# ---------------------------------------------------------------------------------------------------


def _codes(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_int8_follows_npu_dynamic_quant_and_fixes_zero_rows(
    ascend: Backend, reference: dict[str, Callable[..., Any]], torch_npu_emulation: ModuleType, dtype: torch.dtype
) -> None:
    x = (torch.randn(5, 48, generator=_gen()) * 2).to(dtype)
    x[2] = 0
    xq, xs = ascend.quantize_int8(x)
    rq, rs = reference["quantize_int8"](x)
    assert torch_npu_emulation.calls == ["npu_dynamic_quant"]
    assert xs[2] == 1.0 and not xq[2].any()  # the operator's scale 0 becomes HAL's 1
    assert_close(xs, rs, "scales", tol=1e-6)
    assert int((xq.int() - rq.int()).abs().max()) <= 1


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gemm_int8_every_out_dtype(
    ascend: Backend, reference: dict[str, Callable[..., Any]], torch_npu_emulation: ModuleType, out_dtype: torch.dtype
) -> None:
    g = _gen(1)
    args = (_codes(g, 9, 96), torch.rand(9, generator=g) * 0.02, _codes(g, 40, 96), torch.rand(40, generator=g) * 0.01)
    out = ascend.gemm_int8(*args, out_dtype=out_dtype)
    assert torch_npu_emulation.calls == ["npu_quant_matmul"]
    assert_close(out, reference["gemm_int8"](*args, out_dtype=out_dtype), f"gemm_int8 {out_dtype}")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grouped_gemm_int8_every_out_dtype_with_padding_and_an_empty_expert(
    ascend: Backend, reference: dict[str, Callable[..., Any]], torch_npu_emulation: ModuleType, out_dtype: torch.dtype
) -> None:
    g = _gen(2)
    counts = [4, 0, 7]
    m = sum(counts) + 3
    offsets = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
    args = (
        _codes(g, m, 64),
        torch.rand(m, generator=g) * 0.02,
        _codes(g, 3, 24, 64),
        torch.rand(3, 24, generator=g) * 0.01,
    )
    xq = args[0].clone()
    xq[11:] = 127  # padding rows hold anything; their output is zero
    out = ascend.grouped_gemm_int8(xq, *args[1:], offsets, out_dtype=out_dtype)
    assert torch_npu_emulation.calls == ["npu_grouped_matmul"]
    assert not out[11:].any()
    assert_close(
        out, reference["grouped_gemm_int8"](*args, offsets, out_dtype=out_dtype), f"grouped_gemm_int8 {out_dtype}"
    )


def test_grouped_gemm_widens_half_inputs_for_a_float32_result(
    ascend: Backend, reference: dict[str, Callable[..., Any]], torch_npu_emulation: ModuleType
) -> None:
    g = _gen(3)
    x = torch.randn(10, 32, generator=g).bfloat16()
    w = (torch.randn(2, 16, 32, generator=g) * 0.1).bfloat16()
    offsets = torch.tensor([0, 6, 9])
    out = ascend.grouped_gemm(x, w, offsets, out_dtype=torch.float32)
    assert torch_npu_emulation.calls == ["npu_grouped_matmul"]
    assert_close(out, reference["grouped_gemm"](x, w, offsets, out_dtype=torch.float32), "grouped_gemm fp32 out")


@pytest.mark.parametrize(
    ("scoring", "norm", "bias"),
    [("sigmoid", False, True), ("softmax", True, False), ("sigmoid", True, False)],
    ids=["sigmoid-unnormalized", "softmax-normalized", "sigmoid-no-bias"],
)
def test_moe_route_where_the_operator_normalizes_otherwise(
    ascend: Backend,
    reference: dict[str, Callable[..., Any]],
    torch_npu_emulation: ModuleType,
    scoring: str,
    norm: bool,
    bias: bool,
) -> None:
    g = _gen(4)
    logits = torch.randn(6, 32, generator=g) * 2
    b = torch.randn(32, generator=g) * 0.1 if bias else None
    kw = {"top_k": 4, "n_group": 4, "topk_group": 2, "norm_topk_prob": norm, "routed_scaling_factor": 2.5}
    w, ids = ascend.moe_route(logits, b, scoring_func=scoring, **kw)
    rw, rids = reference["moe_route"](logits, b, scoring_func=scoring, **kw)
    assert torch_npu_emulation.calls == ["npu_moe_gating_top_k"]
    sid, order = ids.sort(dim=1)
    rsid, rorder = rids.sort(dim=1)
    assert torch.equal(sid, rsid)
    assert_close(w.gather(1, order), rw.gather(1, rorder), "moe_route weights")


def test_moe_route_outside_the_operator_envelope_uses_the_reference(
    ascend: Backend, reference: dict[str, Callable[..., Any]], torch_npu_emulation: ModuleType
) -> None:
    logits = torch.randn(3, 16, generator=_gen(5))
    bias = torch.zeros(16)
    # E / n_group = 2: the operator needs more than 2 experts per group.
    w, ids = ascend.moe_route(logits, bias, top_k=2, n_group=8, topk_group=2)
    rw, rids = reference["moe_route"](logits, bias, top_k=2, n_group=8, topk_group=2)
    assert torch_npu_emulation.calls == []
    sid, order = ids.sort(dim=1)
    rsid, rorder = rids.sort(dim=1)
    assert torch.equal(sid, rsid)
    assert_close(w.gather(1, order), rw.gather(1, rorder), "moe_route weights")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_permute_matches_the_reference_exactly_with_many_ties(
    ascend: Backend, reference: dict[str, Callable[..., Any]], torch_npu_emulation: ModuleType, dtype: torch.dtype
) -> None:
    g = _gen(11)
    x = torch.randn(13, 8, generator=g).to(dtype)
    ids = torch.randint(0, 4, (13, 3), generator=g)  # 39 copies over 4 experts (one unused: E = 5)
    got = ascend.moe_permute(x, ids, 5)
    want = reference["moe_permute"](x, ids, 5)
    assert torch_npu_emulation.calls == ["npu_moe_init_routing"]
    assert torch.equal(got.order, want.order) and got.order.dtype == torch.int64
    assert torch.equal(got.offsets, want.offsets) and got.offsets.dtype == torch.int64
    assert torch.equal(got.x, want.x)
    y = torch.randn(39, 6, generator=g).to(dtype)
    w = torch.rand(13, 3, generator=g)
    torch_npu_emulation.calls.clear()
    out = ascend.moe_unpermute(y, got.order, w)
    assert torch_npu_emulation.calls == ["npu_moe_finalize_routing"]
    assert out.dtype == dtype
    assert_close(out, reference["moe_unpermute"](y, want.order, w), "moe_unpermute")


def test_moe_permute_and_unpermute_outside_the_envelope_use_the_reference(
    ascend: Backend, reference: dict[str, Callable[..., Any]], torch_npu_emulation: ModuleType
) -> None:
    x = torch.randint(-5, 5, (4, 8), dtype=torch.int8)  # not a dtype npu_moe_init_routing takes
    ids = torch.tensor([[0, 1], [1, 0], [2, 2], [0, 2]])
    got = ascend.moe_permute(x, ids, 3)
    want = reference["moe_permute"](x, ids, 3)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    y = torch.randn(8, 2048, generator=_gen(12))  # a float32 row of 8 KB: past npu_moe_finalize_routing's limit
    w = torch.rand(4, 2, generator=_gen(13))
    assert torch.equal(ascend.moe_unpermute(y, want.order, w), reference["moe_unpermute"](y, want.order, w))
    assert torch_npu_emulation.calls == []


def test_emulated_init_routing_follows_the_document_example(emulation_module: ModuleType) -> None:
    x = torch.tensor([[0.1] * 4, [0.2] * 4, [0.3] * 4])
    row_idx = torch.tensor([[0, 3], [1, 4], [2, 5]], dtype=torch.int32)
    expert_idx = torch.tensor([[1, 2], [0, 1], [0, 2]], dtype=torch.int32)
    ex, erow, eexp = emulation_module.npu_moe_init_routing(x, row_idx, expert_idx, 3)
    assert torch.equal(eexp, torch.tensor([0, 0, 1, 1, 2, 2], dtype=torch.int32))
    assert torch.equal(ex, x[[1, 2, 0, 1, 0, 2]])
    # expanded_row_idx[sorted_row_idx[i]] = i with sorted_row_idx = [1, 2, 0, 4, 3, 5].
    assert torch.equal(erow, torch.tensor([2, 0, 1, 4, 3, 5], dtype=torch.int32))


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
def test_rotary_with_a_yarn_scaled_cache(
    ascend: Backend, reference: dict[str, Callable[..., Any]], torch_npu_emulation: ModuleType, interleaved: bool
) -> None:
    # YaRN's attention factor folded in: |cos|, |sin| up to 1.3, past npu_rotary_mul's [-1, 1].
    ang = torch.arange(50).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, 32, 2).float() / 32))[None, :]
    cache = torch.cat([ang.cos(), ang.sin()], dim=-1) * 1.3
    x = torch.randn(5, 3, 32, generator=_gen(6))
    pos = torch.tensor([0, 7, 3, 49, 12])
    out = ascend.rotary(x, pos, cache, interleaved=interleaved)
    assert torch_npu_emulation.calls == ["npu_rotary_mul"]
    assert_close(out, reference["rotary"](x, pos, cache, interleaved=interleaved), "rotary", tol=2e-6)


def test_rms_norm_and_silu_on_any_rank(
    ascend: Backend, reference: dict[str, Callable[..., Any]], torch_npu_emulation: ModuleType
) -> None:
    x = torch.randn(64, generator=_gen(7)).bfloat16()  # 1-D: npu_rms_norm takes 2-8 dims
    w = torch.rand(64, generator=_gen(8)).bfloat16()
    assert_close(ascend.rms_norm(x, w, eps=1e-5), reference["rms_norm"](x, w, eps=1e-5), "rms_norm 1-D")
    y = torch.randn(2, 1, 1, 1, 1, 1, 1, 1, 2, 8, generator=_gen(9))  # 10-D: npu_swiglu takes 1-8 dims
    assert_close(ascend.silu_and_mul(y), reference["silu_and_mul"](y), "silu_and_mul 10-D")
    assert torch_npu_emulation.calls == ["npu_rms_norm", "npu_swiglu"]


def _mla_inputs(
    g: torch.Generator, lens: list[int], s_q: int, heads: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    per_seq = [max(1, -(-n // 64)) for n in lens]
    total = sum(per_seq) + 2
    perm = torch.randperm(total, generator=g)
    table = torch.full((len(lens), max(per_seq) + 1), 10_000, dtype=torch.int32)  # unused entries: invalid ids
    i = 0
    for s, nb in enumerate(per_seq):
        table[s, :nb] = perm[i : i + nb].to(torch.int32)
        i += nb
    cache = torch.randn(total, 64, 1, 576, generator=g).bfloat16()
    q = torch.randn(len(lens), s_q, heads, 576, generator=g).bfloat16()
    return q, cache, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize(
    ("lens", "s_q", "causal"),
    [([1, 130], 1, False), ([2, 70], 2, True), ([1, 65], 3, True)],
    ids=["decode", "mtp2-causal", "mtp3-causal-unseen-query"],
)
def test_mla_decode_in_the_operator_mla_mode(
    ascend: Backend,
    reference: dict[str, Callable[..., Any]],
    torch_npu_emulation: ModuleType,
    lens: list[int],
    s_q: int,
    causal: bool,
) -> None:
    q, cache, table, seqlens = _mla_inputs(_gen(10), lens, s_q)
    kw = {"head_dim_v": 512, "softmax_scale": 0.1, "causal": causal}
    out, lse = ascend.mla_decode(q, cache, table, seqlens, **kw)
    rout, rlse = reference["mla_decode"](q, cache, table, seqlens, **kw)
    assert torch_npu_emulation.calls == ["npu_fused_infer_attention_score"]
    assert_close(out, rout, "mla_decode out")
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    finite = torch.isfinite(rlse)
    assert torch.allclose(lse[finite], rlse[finite], atol=1e-4)


def test_mla_decode_outside_the_mla_mode_uses_the_reference(
    ascend: Backend, reference: dict[str, Callable[..., Any]], torch_npu_emulation: ModuleType
) -> None:
    q, cache, table, seqlens = _mla_inputs(_gen(11), [3, 9], 1, heads=16)  # 16 heads: the mode takes 32/64/128
    out, _ = ascend.mla_decode(q, cache, table, seqlens, head_dim_v=512)
    assert torch_npu_emulation.calls == []
    assert_close(out, reference["mla_decode"](q, cache, table, seqlens, head_dim_v=512)[0], "mla_decode fallback")


# ---------------------------------------------------------------------------------------------------
# The tiny model through the emulated backend matches the cpu backend
# ---------------------------------------------------------------------------------------------------


def _run_model(backend: Backend, dtype: torch.dtype) -> torch.Tensor:
    cfg = tiny_config()
    model = DeepseekModel(cfg, backend, random_state_dict(cfg, seed=3), dtype=dtype)
    cache = model.new_cache(8)
    prompts = [[5, 17, 99, 3, 250, 7, 1], [42, 8, 600]]
    prefill = model.prefill(cache, ["a", "b"], prompts, all_logits=True)
    step = model.decode(cache, ["a", "b"], [11, 12])
    return torch.cat([prefill, step]).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_tiny_model_forward_matches_the_cpu_backend(
    registry: hal.Registry, torch_npu_emulation: ModuleType, dtype: torch.dtype
) -> None:
    got = _run_model(registry.get_backend("ascend"), dtype)
    want = _run_model(registry.get_backend("cpu"), dtype)
    for operator in ("npu_rms_norm", "npu_rotary_mul", "npu_swiglu", "npu_grouped_matmul", "npu_moe_gating_top_k"):
        assert operator in torch_npu_emulation.calls
    if dtype == torch.float32:
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-4, rel
    else:
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
        assert cos >= 0.99, cos


# ---------------------------------------------------------------------------------------------------
# The emulation rejects what the documents rule out
# ---------------------------------------------------------------------------------------------------


def _i8(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.int8)


def _bf(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.bfloat16)


def _mla_call(**overrides: Any) -> Callable[[ModuleType], Any]:
    def call(npu: ModuleType) -> Any:
        args: dict[str, Any] = {
            "query": _bf(1, 1, 32, 512),
            "key": _bf(1, 128, 512),
            "value": _bf(1, 128, 512),
            "query_rope": _bf(1, 1, 32, 64),
            "key_rope": _bf(1, 128, 64),
            "num_heads": 32,
            "num_key_value_heads": 1,
            "input_layout": "BSND",
            "block_table": torch.zeros(1, 1, dtype=torch.int32),
            "block_size": 128,
            "actual_seq_lengths_kv": [5],
        }
        args.update(overrides)
        return npu.npu_fused_infer_attention_score(args.pop("query"), args.pop("key"), args.pop("value"), **args)

    return call


def _gmm(x: torch.Tensor, w: torch.Tensor, group_list: Any, **kw: Any) -> Callable[[ModuleType], Any]:
    base = {"split_item": 2, "group_type": 0, "group_list_type": 0}
    return lambda npu: npu.npu_grouped_matmul([x], [w], group_list=group_list, **{**base, **kw})


INVALID: dict[str, tuple[Callable[[ModuleType], Any], str]] = {
    "dynamic_quant-float32": (lambda npu: npu.npu_dynamic_quant(torch.zeros(2, 8)), "x dtype must be one of"),
    "dynamic_quant-1d": (lambda npu: npu.npu_dynamic_quant(_bf(8)), "more than one dim"),
    "dynamic_quant-dst_type": (lambda npu: npu.npu_dynamic_quant(_bf(2, 8), dst_type=torch.int16), "dst_type"),
    "quant_matmul-weight-n-k": (
        lambda npu: npu.npu_quant_matmul(_i8(4, 32), _i8(16, 32), torch.ones(16)),
        r"x2 must be the weight in \(k, n\)",
    ),
    "quant_matmul-x1-float": (
        lambda npu: npu.npu_quant_matmul(_bf(4, 32), _i8(32, 16), torch.ones(16)),
        "x1 dtype",
    ),
    "quant_matmul-output-float32": (
        lambda npu: npu.npu_quant_matmul(_i8(4, 32), _i8(32, 16), torch.ones(16), output_dtype=torch.float32),
        "output_dtype must be",
    ),
    "quant_matmul-fp16-with-bf16-scale": (
        lambda npu: npu.npu_quant_matmul(
            _i8(4, 32), _i8(32, 16), torch.ones(16).bfloat16(), pertoken_scale=torch.ones(4), output_dtype=torch.float16
        ),
        "no supported combination",
    ),
    "grouped_matmul-weight-e-n-k": (
        _gmm(_bf(6, 32), _bf(2, 16, 32), torch.tensor([3, 6])),
        r"weight must be \[E, K, N\]",
    ),
    "grouped_matmul-group_list-end": (
        _gmm(_bf(6, 32), _bf(2, 32, 16), torch.tensor([3, 5])),
        "last value must equal x's rows",
    ),
    "grouped_matmul-group_list-int32": (
        _gmm(_bf(6, 32), _bf(2, 32, 16), torch.tensor([3, 6], dtype=torch.int32)),
        "group_list dtype",
    ),
    "grouped_matmul-group_type-n": (
        _gmm(_bf(6, 32), _bf(2, 32, 16), torch.tensor([3, 6]), group_type=1),
        "group_type must be",
    ),
    "grouped_matmul-split_item": (
        _gmm(_bf(6, 32), _bf(2, 32, 16), torch.tensor([3, 6]), split_item=0),
        "split_item 2 or 3",
    ),
    "grouped_matmul-int8-fp32-scale-to-bf16": (
        _gmm(
            _i8(6, 32),
            _i8(2, 32, 16),
            torch.tensor([3, 6]),
            scale=[torch.ones(2, 16)],
            per_token_scale=[torch.ones(6)],
            output_dtype=torch.bfloat16,
        ),
        "output_dtype must be torch.float16",
    ),
    "rms_norm-gamma-dtype": (lambda npu: npu.npu_rms_norm(_bf(2, 8), torch.ones(8)), "gamma's dtype"),
    "rms_norm-1d": (lambda npu: npu.npu_rms_norm(_bf(8), _bf(8)), "2-8 dims"),
    "swiglu-non-contiguous": (lambda npu: npu.npu_swiglu(_bf(8, 4).t()), "contiguous"),
    "swiglu-odd": (lambda npu: npu.npu_swiglu(_bf(4, 7)), "even"),
    "rotary_mul-mode": (
        lambda npu: npu.npu_rotary_mul(_bf(1, 4, 2, 8), _bf(1, 4, 1, 8), _bf(1, 4, 1, 8), rotary_mode="neox"),
        "rotary_mode must be",
    ),
    "rotary_mul-interleave-full-r1": (
        lambda npu: npu.npu_rotary_mul(_bf(1, 4, 2, 8), _bf(1, 4, 2, 8), _bf(1, 4, 2, 8), rotary_mode="interleave"),
        "fits no interleave layout",
    ),
    "rotary_mul-range": (
        lambda npu: npu.npu_rotary_mul(torch.zeros(1, 4, 2, 8), torch.full((1, 4, 1, 8), 1.5), torch.zeros(1, 4, 1, 8)),
        r"\[-1, 1\]",
    ),
    "moe_gating-renorm": (lambda npu: npu.npu_moe_gating_top_k(torch.zeros(2, 16), 2, renorm=1), "renorm"),
    "moe_gating-bias-dtype": (
        lambda npu: npu.npu_moe_gating_top_k(_bf(2, 16), 2, bias=torch.zeros(16)),
        "bias's dtype",
    ),
    "moe_gating-two-per-group": (
        lambda npu: npu.npu_moe_gating_top_k(torch.zeros(2, 16), 2, k_group=2, group_count=8),
        "greater than 2",
    ),
    "init_routing-expert_idx-int64": (
        lambda npu: npu.npu_moe_init_routing(
            _bf(2, 8), torch.zeros(2, 2, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int64), 2
        ),
        "expert_idx dtype",
    ),
    "init_routing-x-1d": (
        lambda npu: npu.npu_moe_init_routing(
            _bf(8), torch.zeros(2, 2, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32), 2
        ),
        "x must be 2-D",
    ),
    "finalize_routing-scales-dtype": (
        lambda npu: npu.npu_moe_finalize_routing(
            _bf(4, 8), None, None, None, torch.ones(2, 2), torch.arange(4, dtype=torch.int32), None
        ),
        "scales's dtype",
    ),
    "finalize_routing-index-int64": (
        lambda npu: npu.npu_moe_finalize_routing(
            torch.zeros(4, 8), None, None, None, torch.ones(2, 2), torch.arange(4), None
        ),
        "expanded_src_to_dst_row dtype",
    ),
    "finalize_routing-skip2-without-skip1": (
        lambda npu: npu.npu_moe_finalize_routing(
            torch.zeros(4, 8), None, torch.zeros(2, 8), None, torch.ones(2, 2), torch.arange(4, dtype=torch.int32), None
        ),
        "skip2 must be None",
    ),
    "fia-layout": (_mla_call(input_layout="BSHD"), "input_layout must be one of"),
    "fia-lse": (_mla_call(softmax_lse_flag=True), "softmax_lse_flag"),
    "fia-heads": (
        _mla_call(query=_bf(1, 1, 16, 512), query_rope=_bf(1, 1, 16, 64), num_heads=16),
        "32, 64 or 128",
    ),
    "fia-block-size": (
        _mla_call(key=_bf(2, 64, 512), value=_bf(2, 64, 512), key_rope=_bf(2, 64, 64), block_size=64),
        "block_size 16 or 128",
    ),
    "fia-non-contiguous-key": (_mla_call(key=_bf(1, 128, 576)[..., :512]), "key must be contiguous"),
    "fia-lengths-tensor": (_mla_call(actual_seq_lengths_kv=torch.tensor([5])), "list of ints"),
    "fia-query-float32": (
        _mla_call(query=torch.zeros(1, 1, 32, 512), query_rope=torch.zeros(1, 1, 32, 64)),
        "query dtype",
    ),
    "fia-decode-with-mask": (
        _mla_call(sparse_mode=3, atten_mask=torch.ones(2048, 2048, dtype=torch.bool)),
        "sparse_mode 0 and no atten_mask",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_emulation_rejects_what_the_documents_rule_out(emulation_module: ModuleType, case: str) -> None:
    call, message = INVALID[case]
    with pytest.raises(emulation_module.EmulationError, match=message):
        call(emulation_module)


def test_emulation_keeps_keyword_only_arguments_keyword_only(emulation_module: ModuleType) -> None:
    with pytest.raises(TypeError):
        emulation_module.npu_dynamic_quant(_bf(2, 8), None)  # smooth_scales is keyword-only
    with pytest.raises(TypeError):
        emulation_module.npu_quant_matmul(_i8(2, 8), _i8(8, 4), torch.ones(4), None)  # offset is keyword-only
    with pytest.raises(TypeError):
        emulation_module.npu_moe_gating_top_k(torch.zeros(2, 16), 2, None)  # bias is keyword-only


def test_emulation_accepts_a_transposed_weight_view(emulation_module: ModuleType) -> None:
    w = torch.randint(-3, 4, (16, 32), dtype=torch.int8)  # [n, k]
    x = torch.randint(-3, 4, (4, 32), dtype=torch.int8)
    out = emulation_module.npu_quant_matmul(x, w.t(), torch.ones(1), output_dtype=torch.int32)
    assert torch.equal(out, (x.int() @ w.int().t()))
    assert math.isclose(float(out.float().abs().sum()), float((x.long() @ w.long().t()).abs().sum()))
