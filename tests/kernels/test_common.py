"""``hal_kernels._common``: the launch description shared by launchers and compile specs, and the
interpreter's e4m3fnuz patch.

The central check is :func:`test_what_the_launchers_launch_is_compiled`: the launchers are called as the
model calls them (its dtypes and flags, default configs), every kernel launch is recorded, and each must
match one of the compile specs ``hal compile-check`` compiles, in its pointer types, scalar types,
flags, warps and stages. A dtype or flag the model uses that no spec compiles fails it.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from hal.quant import quantize_fp8_blocks
from hal_kernels import MODULES, _common, fused, gemm, grouped_gemm, mla_decode, moe, prefill, quant
from hal_kernels._common import Launch
from tests.kernels.conftest import reference

# ---------------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------------


def test_launch_types_every_argument() -> None:
    launch = fused._rms_norm_launch(
        {"BLOCK_M": 2, "num_warps": 0, "num_stages": 1}, torch.bfloat16, torch.float32, 7168
    )
    assert launch.signature() == {
        "x_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*bf16", "M": "i32", "D": "i32", "stride_x": "i32",
        "eps": "fp32", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr",
    }  # fmt: skip
    spec = launch.spec("rms_norm[x]", ("x_ptr", "D", "not_an_argument"))
    assert spec.constexprs == {"BLOCK_M": 2, "BLOCK_D": 8192}
    assert (spec.num_warps, spec.num_stages) == (16, 1)  # 0 warps: chosen from the row length
    assert spec.divisible_by_16 == ("x_ptr", "D")


def test_launch_rejects_an_incomplete_description() -> None:
    kernel = fused._silu_and_mul_kernel
    ptrs = {"x_ptr": "*bf16", "out_ptr": "*bf16"}
    with pytest.raises(
        TypeError, match=r"constexprs given \['BLOCK_M'\], the kernel declares \['BLOCK_M', 'BLOCK_N'\]"
    ):
        Launch(kernel, ptrs, {"BLOCK_M": 4}, num_warps=4, num_stages=1)
    with pytest.raises(TypeError, match=r"pointer arguments without a type \['out_ptr'\]"):
        Launch(kernel, {"x_ptr": "*bf16"}, {"BLOCK_M": 4, "BLOCK_N": 64}, num_warps=4, num_stages=1)
    with pytest.raises(TypeError, match=r"no such arguments \['y_ptr'\]"):
        Launch(kernel, {**ptrs, "y_ptr": "*bf16"}, {"BLOCK_M": 4, "BLOCK_N": 64}, num_warps=4, num_stages=1)


def test_pointer_types() -> None:
    assert _common.ptr(torch.float8_e4m3fnuz) == "*fp8e4b8" and _common.ptr(torch.int64) == "*i64"
    assert _common.fp8_dtype("*fp8e4b8") == torch.float8_e4m3fnuz
    assert _common.fp8_dtype("*fp8e4nv") == _common.fp8_dtype(_common.FP8) == torch.float8_e4m3fn


def _flags(constexprs: Any) -> dict[str, bool]:
    """The boolean constexprs but UPCAST (on only under the interpreter, never in a compiled spec)."""
    return {k: v for k, v in constexprs.items() if isinstance(v, bool) and k != "UPCAST"}


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Launch]]:
    """Every :class:`Launch` the launchers make while the test runs (they still launch)."""
    seen: list[Launch] = []
    call = Launch.__call__

    def recording(self: Launch, grid: tuple[int, ...], *args: Any) -> None:
        seen.append(self)
        call(self, grid, *args)

    monkeypatch.setattr(Launch, "__call__", recording)
    yield seen


def _model_calls() -> None:
    """One call of every launcher with the model's dtypes and flags (bf16 activations, int64 offsets and
    masked_m, fp32 router logits, …), default configs, small shapes."""
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(6, 256, generator=g).to(bf)
    xq, xs = quant.quantize_fp8(x, fp8_dtype=torch.float8_e4m3fn)
    wq, ws = quantize_fp8_blocks(torch.randn(64, 256, generator=g))
    gemm.gemm_fp8(xq, xs, wq, ws, out_dtype=bf)
    offsets = torch.tensor([0, 2, 6], dtype=torch.int64)
    masked_m = torch.tensor([3, 3], dtype=torch.int64)
    w = torch.randn(2, 32, 256, generator=g).to(bf)
    grouped_gemm.grouped_gemm(x, w, offsets)
    grouped_gemm.grouped_gemm_masked(x.view(2, 3, 256), w, masked_m)
    ewq, ews = quantize_fp8_blocks(torch.randn(2, 32, 256, generator=g))
    grouped_gemm.grouped_gemm_fp8(xq, xs, ewq, ews, offsets, out_dtype=bf)
    grouped_gemm.grouped_gemm_fp8_masked(xq.view(2, 3, 256), xs.view(2, 3, 2), ewq, ews, masked_m, out_dtype=bf)

    kv = torch.randn(4, 64, 1, 40, generator=g).to(bf)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([70, 5], dtype=torch.int32)
    q = torch.randn(2, 1, 3, 40, generator=g).to(bf)
    for splits, causal in ((1, False), (2, False), (2, True)):
        mla_decode.mla_decode(q, kv, table, lens, head_dim_v=32, causal=causal, config={"num_splits": splits})
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    qp, kp, vp = (torch.randn(8, 2, d, generator=g).to(bf) for d in (24, 24, 16))
    for causal in (True, False):
        prefill.attention_prefill(qp, kp, vp, cu, cu, causal=causal)

    logits = torch.randn(5, 64, generator=g)
    bias = torch.randn(64, generator=g)
    weights, ids = moe.moe_route(logits, bias, top_k=6, n_group=8, topk_group=3)
    moe.moe_route(logits, None, top_k=6, scoring_func="softmax", norm_topk_prob=False)
    perm = moe.moe_permute(x[:5], ids, 64)
    moe.moe_unpermute(perm.x, perm.order, weights)

    fused.rms_norm(x, torch.ones(256, dtype=bf))
    cos_sin = torch.randn(16, 64, generator=g)
    fused.rotary(torch.randn(5, 2, 64, generator=g).to(bf), torch.arange(5), cos_sin)
    fused.silu_and_mul(x)


def test_what_the_launchers_launch_is_compiled(launches: list[Launch]) -> None:
    _model_calls()
    specs = [s for m in MODULES for s in importlib.import_module(f"hal_kernels.{m}").compile_specs("*fp8e4nv", {})]
    kernels = {id(launch.kernel) for launch in launches}
    assert kernels == {id(s.kernel) for s in specs}, "every kernel was launched"
    for launch in launches:
        name = launch.kernel.__name__ if hasattr(launch.kernel, "__name__") else launch.kernel
        matching = [
            s
            for s in specs
            if s.kernel is launch.kernel
            and dict(s.signature) == launch.signature()
            and (s.num_warps, s.num_stages) == (launch.num_warps, launch.num_stages)
            and _flags(s.constexprs) == _flags(launch.constexprs)
        ]
        assert matching, (
            f"{name} launched as {launch.signature()} with flags {_flags(launch.constexprs)}, "
            f"{launch.num_warps} warps, {launch.num_stages} stages: no compile spec compiles that"
        )


def test_the_combine_kernel_launches_with_its_specs_stages(launches: list[Launch]) -> None:
    """The combine step of a split mla_decode is launched with explicit warps and stages, the spec's."""
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(2, 16, 1, 24, generator=g)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    q = torch.randn(1, 1, 2, 24, generator=g)
    out, lse = mla_decode.mla_decode(q, kv, table, torch.tensor([20], dtype=torch.int32), head_dim_v=16,
                                     config={"num_splits": 3})  # fmt: skip
    want_out, want_lse = reference(mla_decode, "mla_decode")(q, kv, table, torch.tensor([20], dtype=torch.int32),
                                                            head_dim_v=16)  # fmt: skip
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    (combine,) = [x for x in launches if x.kernel is mla_decode._mla_decode_combine_kernel]
    (spec,) = [s for s in mla_decode.compile_specs("*fp8e4nv", {}) if s.name == "mla_decode_combine[fp32]"]
    assert (combine.num_warps, combine.num_stages) == (spec.num_warps, spec.num_stages)


# ---------------------------------------------------------------------------------------------------
# The interpreter's e4m3fnuz patch
# ---------------------------------------------------------------------------------------------------


def test_fnuz_patch_says_why_when_the_private_hook_is_gone() -> None:
    old_triton = types.SimpleNamespace()  # an interpreter module without _patch_lang_core
    assert "no _patch_lang_core" in str(_common._interpreter_knows_fp8e4b8(old_triton))


def test_fnuz_patch_wraps_the_hook_once() -> None:
    calls: list[str] = []

    def patch_lang_core(lang: Any, scope: Any) -> None:
        calls.append("original")

    fake = types.SimpleNamespace(_patch_lang_core=patch_lang_core)
    assert _common._interpreter_knows_fp8e4b8(fake) is None
    wrapped = fake._patch_lang_core
    assert wrapped is not patch_lang_core and wrapped._hal_fp8e4b8
    assert _common._interpreter_knows_fp8e4b8(fake) is None and fake._patch_lang_core is wrapped  # idempotent


def test_the_installed_interpreter_is_patched_or_says_why() -> None:
    from triton.runtime import interpreter

    hook = getattr(interpreter, "_patch_lang_core", None)
    if hook is None:
        assert _common.FNUZ_PATCH_PROBLEM and "no _patch_lang_core" in _common.FNUZ_PATCH_PROBLEM
    else:
        assert _common.FNUZ_PATCH_PROBLEM is None and hook._hal_fp8e4b8
