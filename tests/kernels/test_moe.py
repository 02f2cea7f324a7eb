"""hal_kernels.moe against hal_cpu.reference.moe under the Triton interpreter.

Routing ids and permutations are compared exactly (tie-free random inputs; a separate test checks
that a tied input still gets a valid top-k). Weights and unpermuted sums differ from the oracle only
by summation order, hence the tolerances below.
"""

from __future__ import annotations

import pytest
import torch

from hal.errors import OpInputError
from hal_kernels import _common, moe
from tests.kernels.conftest import reference

ROUTE = reference(moe, "moe_route")
PERMUTE = reference(moe, "moe_permute")
UNPERMUTE = reference(moe, "moe_unpermute")

# Interpreter speed: large blocks, few programs.
ROUTE_CFG = {"BLOCK_T": 16}
PERM_CFG = {"BLOCK_N": 64, "BLOCK_R": 64, "BLOCK_H": 128}  # N > BLOCK_N below: the scan crosses blocks
UNPERM_CFG = {"BLOCK_T": 16, "BLOCK_N": 128}


def _sorted_by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids_sorted, perm = ids.sort(dim=1)
    return weights.gather(1, perm), ids_sorted


# ---------------------------------------------------------------------------------------------------
# moe_route
# ---------------------------------------------------------------------------------------------------

# (T, E, n_group, topk_group, top_k, bias, scoring_func, norm, scale)
ROUTES = [
    (1, 16, 1, 1, 4, False, "sigmoid", True, 1.0),  # one token, no groups, no bias
    (37, 64, 8, 3, 6, True, "sigmoid", True, 2.5),  # T not a multiple of BLOCK_T
    (20, 256, 8, 4, 8, True, "sigmoid", True, 2.5),  # DeepSeek-V3
    (13, 160, 8, 3, 6, False, "softmax", False, 16.0),  # DeepSeek-V2: groups of 20 (not a power of 2)
    (9, 24, 3, 2, 5, True, "sigmoid", False, 1.0),  # 3 groups (padded to 4), no normalization
    (5, 48, 4, 4, 7, True, "softmax", True, 1.0),  # every group kept, softmax with a bias
    (17, 64, 1, 1, 6, True, "sigmoid", True, 1.0),  # V2-Lite-like: 64 experts, one group
    # Groups of 3 (padded to 4) under sigmoid: a padding lane aliases the next group's first expert.
    (6, 6, 2, 2, 2, True, "sigmoid", False, 1.0),
    (11, 30, 5, 2, 4, False, "sigmoid", True, 1.0),  # groups of 6, no bias
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("t", "e", "n_group", "topk_group", "top_k", "bias", "scoring", "norm", "scale"),
    ROUTES,
    ids=[f"T{r[0]}-E{r[1]}-G{r[2]}/{r[3]}-K{r[4]}-{'bias' if r[5] else 'nobias'}-{r[6]}" for r in ROUTES],
)
def test_moe_route(
    t: int,
    e: int,
    n_group: int,
    topk_group: int,
    top_k: int,
    bias: bool,
    scoring: str,
    norm: bool,
    scale: float,
    dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(t * 1009 + e * 7 + n_group * 3 + top_k + 100_000 * dtype.itemsize)
    logits = (torch.randn(t, e, generator=gen) * 2).to(dtype)
    correction = torch.randn(e, generator=gen) * 0.5 if bias else None
    kwargs = dict(
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        scoring_func=scoring,
    )
    weights, ids = moe.moe_route(logits, correction, **kwargs, config=ROUTE_CFG)
    ref_weights, ref_ids = ROUTE(logits, correction, **kwargs)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (t, top_k)
    weights, ids = _sorted_by_id(weights, ids)
    ref_weights, ref_ids = _sorted_by_id(ref_weights, ref_ids)
    assert torch.equal(ids, ref_ids)
    # Same fp32 scores; the normalizing sum is taken in another order (and sigmoid / exp may differ
    # by an ulp): a few fp32 ulps.
    torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("block_t", [1, 4])
def test_moe_route_small_blocks(block_t: int) -> None:
    """The tuned default's block sizes (one token, or a few, per program) give the same routing."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 64, generator=gen)
    bias = torch.randn(64, generator=gen) * 0.1
    kwargs = dict(top_k=6, n_group=8, topk_group=3, routed_scaling_factor=2.5)
    weights, ids = _sorted_by_id(*moe.moe_route(logits, bias, **kwargs, config={"BLOCK_T": block_t}))
    ref_weights, ref_ids = _sorted_by_id(*ROUTE(logits, bias, **kwargs))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("n_group", [1, 4])
def test_moe_route_ties_give_a_valid_top_k(n_group: int) -> None:
    """With many equal scores (the contract leaves ties open) the choice is still a valid group-limited
    top-k: distinct ids from at most ``topk_group`` best groups, each beating every expert left out."""
    t, e, top_k = 24, 32, 5
    topk_group = min(2, n_group)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 2, (t, e), generator=gen).float()  # 4 distinct values: ties everywhere
    weights, ids = moe.moe_route(logits, None, top_k=top_k, n_group=n_group, topk_group=topk_group, config=ROUTE_CFG)
    scores = logits.sigmoid()
    size = e // n_group
    group_scores = scores.view(t, n_group, size).amax(-1)
    for row in range(t):
        chosen = ids[row].tolist()
        assert len(set(chosen)) == top_k and all(0 <= i < e for i in chosen)
        groups = {i // size for i in chosen}
        assert len(groups) <= topk_group
        nth_group = group_scores[row].topk(topk_group).values[-1]
        assert all(group_scores[row, g] >= nth_group for g in groups)
        # Every expert of a kept group that was not chosen scores no more than the worst chosen one.
        kept = torch.zeros(e, dtype=torch.bool)
        for g in groups:
            kept[g * size : (g + 1) * size] = True
        kept[chosen] = False
        assert scores[row, kept].max() <= scores[row, chosen].min()
        expected = scores[row, chosen] / scores[row, chosen].sum()
        torch.testing.assert_close(weights[row], expected, rtol=2e-6, atol=1e-7)


def test_moe_route_strided_logits_and_no_tokens() -> None:
    gen = torch.Generator().manual_seed(11)
    wide = torch.randn(9, 80, generator=gen)
    logits = wide[:, :64]  # row stride 80
    weights, ids = _sorted_by_id(*moe.moe_route(logits, None, top_k=4, config=ROUTE_CFG))
    ref_weights, ref_ids = _sorted_by_id(*ROUTE(logits, None, top_k=4))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7)

    empty_w, empty_ids = moe.moe_route(torch.randn(0, 64), None, top_k=4)
    assert empty_w.shape == empty_ids.shape == (0, 4)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf - inf, as meant
@pytest.mark.parametrize(
    ("e", "n_group", "topk_group", "top_k", "bias", "scoring"),
    [
        (64, 8, 3, 6, True, "sigmoid"),  # V3-like: groups and a bias
        (48, 1, 1, 6, False, "softmax"),  # V2-Lite-like: no groups
        (24, 4, 2, 3, False, "sigmoid"),
    ],
    ids=["grouped-bias-sigmoid", "ungrouped-softmax", "grouped-sigmoid"],
)
def test_moe_route_nan_rows_give_valid_ids(
    e: int, n_group: int, topk_group: int, top_k: int, bias: bool, scoring: str, bounds_checked: list[str]
) -> None:
    """A router row of NaN (and one with a single NaN, and one with +inf) still gets ``top_k`` distinct ids
    in ``[0, E)``, never the ``1 << 30`` a NaN comparison used to leave, and ``moe_permute`` of those ids
    stays within its buffers. A NaN score counts as -inf: the rest of the row routes as the reference
    does."""
    gen = torch.Generator().manual_seed(e + top_k)
    logits = torch.randn(4, e, generator=gen)
    logits[0] = float("nan")
    logits[1, 5] = float("nan")
    logits[2, 7] = float("inf")
    correction = torch.randn(e, generator=gen) * 0.1 if bias else None
    kwargs = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, scoring_func=scoring)
    weights, ids = moe.moe_route(logits, correction, **kwargs, config=ROUTE_CFG)
    assert bool(((ids >= 0) & (ids < e)).all()), ids
    assert all(len(set(row.tolist())) == top_k for row in ids)
    assert torch.isnan(weights[0]).all()
    # Row 3 is untouched: exactly the reference's routing.
    ref_w, ref_ids = _sorted_by_id(*ROUTE(logits[3:], correction, **kwargs))
    got_w, got_ids = _sorted_by_id(weights[3:], ids[3:])
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_w, ref_w, rtol=2e-6, atol=1e-7)
    x = torch.randn(4, 16, generator=gen)
    perm = moe.moe_permute(x, ids, e, config=PERM_CFG)
    assert not bounds_checked
    assert int(perm.offsets[-1]) == ids.numel()
    assert torch.equal(perm.order.sort().values, torch.arange(ids.numel()))


# ---------------------------------------------------------------------------------------------------
# moe_permute
# ---------------------------------------------------------------------------------------------------

# (T, top_k, E, H): N = T * top_k crosses BLOCK_N = 64 in most; experts with no token in all but one.
# The ids' dtype alternates between rows rather than multiplying the cases (interpreter time).
PERMUTES = [
    (1, 1, 4, 8, torch.int64),
    (37, 4, 20, 100, torch.int32),  # ids drawn from 16 of 20 experts: 4 empty experts
    (16, 8, 64, 72, torch.int64),
    (9, 6, 256, 130, torch.int32),  # E = 256, most experts empty; H crosses BLOCK_H
    (0, 4, 8, 16, torch.int64),  # no tokens
]


def _ids(t: int, top_k: int, e: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Distinct experts per token, drawn from the first ``e - e // 5`` experts (the rest stay empty)."""
    pool = max(top_k, e - e // 5)
    return torch.rand(t, pool, generator=gen).argsort(dim=1)[:, :top_k].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e4m3fnuz], ids=str)
@pytest.mark.parametrize(
    ("t", "top_k", "e", "h", "ids_dtype"),
    PERMUTES,
    ids=[f"T{t}-K{k}-E{e}-H{h}-{str(i)[6:]}" for t, k, e, h, i in PERMUTES],
)
def test_moe_permute(t: int, top_k: int, e: int, h: int, dtype: torch.dtype, ids_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(t * 1000 + e)
    x = torch.randn(t, h, generator=gen).to(dtype)
    topk_ids = _ids(t, top_k, e, gen, ids_dtype)
    got = moe.moe_permute(x, topk_ids, e, config=PERM_CFG)
    want = PERMUTE(x, topk_ids, e)
    assert got.x.dtype == dtype and got.offsets.dtype == torch.int64 and got.order.dtype == torch.int64
    assert torch.equal(got.offsets, want.offsets)
    assert torch.equal(got.order, want.order)
    # Bitwise: the rows are copied, never converted.
    assert torch.equal(got.x.view(torch.uint8), want.x.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int16, torch.bool, torch.int8], ids=str)
def test_moe_permute_rows_of_any_dtype(dtype: torch.dtype) -> None:
    """The contract takes x of any dtype: rows the kernel has no type for are copied as bytes, bit for
    bit, from a strided x too."""
    gen = torch.Generator().manual_seed(6)
    wide = (torch.randn(11, 40, generator=gen) * 50).to(dtype)
    x = wide[:, 3:33]  # row stride 40, a byte offset that is not a multiple of the row
    topk_ids = _ids(11, 3, 8, gen, torch.int64)
    got = moe.moe_permute(x, topk_ids, 8, config=PERM_CFG)
    want = PERMUTE(x, topk_ids, 8)
    assert got.x.dtype == dtype and torch.equal(got.order, want.order) and torch.equal(got.offsets, want.offsets)
    assert torch.equal(got.x, want.x)


def test_moe_permute_repeated_experts_is_stable() -> None:
    """Many copies per expert across scan blocks: within an expert, rows follow the flat index."""
    gen = torch.Generator().manual_seed(5)
    t, top_k, e = 50, 3, 3
    topk_ids = torch.randint(0, e, (t, top_k), generator=gen)  # repeats within a token, too
    x = torch.randn(t, 24, generator=gen)
    got = moe.moe_permute(x, topk_ids, e, config={"BLOCK_N": 16, "BLOCK_R": 32, "BLOCK_H": 16})
    want = PERMUTE(x, topk_ids, e)
    assert torch.equal(got.order, want.order) and torch.equal(got.offsets, want.offsets)
    assert torch.equal(got.x, want.x)


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32], ids=str)
def test_moe_permute_ids_out_of_range_go_to_the_padding(ids_dtype: torch.dtype, bounds_checked: list[str]) -> None:
    """Ids outside ``[0, E)`` (E, far past it, negative) never index the offsets: those copies are no
    expert's, they come after every expert's rows (from ``offsets[E]`` on, where grouped_gemm writes
    zeros) in flat order, and ``order`` is still a permutation, so ``moe_unpermute`` stays in bounds too."""
    e = 4
    topk_ids = torch.tensor([[0, 4], [2, 1 << 20], [-1, 2], [3, 0]], dtype=ids_dtype)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 20, generator=gen)
    got = moe.moe_permute(x, topk_ids, e, config=PERM_CFG)
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < e)
    by_expert = torch.nonzero(valid).flatten()[torch.sort(flat[valid], stable=True).indices]
    want_order = torch.cat([by_expert, torch.nonzero(~valid).flatten()])
    assert torch.equal(got.order, want_order)
    counts = torch.bincount(flat[valid], minlength=e)
    assert torch.equal(got.offsets, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
    assert torch.equal(got.x, x[want_order // 2])
    back = moe.moe_unpermute(got.x, got.order, torch.ones(4, 2), config=UNPERM_CFG)
    assert not bounds_checked
    torch.testing.assert_close(back, 2 * x)


def test_moe_permute_default_config_and_strided_rows() -> None:
    gen = torch.Generator().manual_seed(9)
    wide = torch.randn(21, 96, generator=gen)
    x = wide[:, 8:72]  # row stride 96
    topk_ids = _ids(21, 2, 10, gen, torch.int64)
    got = moe.moe_permute(x, topk_ids, 10)
    want = PERMUTE(x, topk_ids, 10)
    assert torch.equal(got.order, want.order) and torch.equal(got.offsets, want.offsets)
    assert torch.equal(got.x, want.x)


# ---------------------------------------------------------------------------------------------------
# moe_unpermute
# ---------------------------------------------------------------------------------------------------

# Result tolerances by dtype. fp32: the kernel sums each token's top_k products in j order, the oracle
# in permuted-row order; the sums differ by a few ulps of the largest term (|y| < 5, w < 1, top_k <= 8:
# measured 1e-6, bounded by atol). bf16 / fp16: at most one ulp of the output type (2^-7, 2^-10
# relative), from fp32 sums straddling a rounding boundary and, for bf16, from the interpreter's
# fp32 -> bf16 store, which truncates where torch (and the GPU) rounds to nearest even.
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
}

# (T, top_k, E, N)
UNPERMUTES = [
    (1, 1, 4, 8, torch.int64),
    (37, 4, 20, 100, torch.int32),
    (16, 8, 64, 300, torch.int64),  # N crosses BLOCK_N twice
    (5, 6, 256, 64, torch.int32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("t", "top_k", "e", "n", "order_dtype"),
    UNPERMUTES,
    ids=[f"T{t}-K{k}-E{e}-N{n}-{str(i)[6:]}" for t, k, e, n, i in UNPERMUTES],
)
def test_moe_unpermute(t: int, top_k: int, e: int, n: int, dtype: torch.dtype, order_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(t * 31 + n)
    topk_ids = _ids(t, top_k, e, gen, torch.int64)
    order = PERMUTE(torch.zeros(t, 1), topk_ids, e).order.to(order_dtype)
    y = torch.randn(t * top_k, n, generator=gen).to(dtype)
    weights = torch.rand(t, top_k, generator=gen)
    got = moe.moe_unpermute(y, order, weights, config=UNPERM_CFG)
    want = UNPERMUTE(y, order, weights)
    assert got.dtype == dtype and got.shape == (t, n)
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_moe_unpermute_edge_shapes() -> None:
    y = torch.randn(0, 8)
    assert moe.moe_unpermute(y, torch.zeros(0, dtype=torch.int64), torch.rand(0, 2)).shape == (0, 8)
    # top_k = 0: every token's sum is empty, so zero (and written, despite the poisoned output).
    out = moe.moe_unpermute(torch.randn(0, 8), torch.zeros(0, dtype=torch.int64), torch.rand(3, 0))
    assert torch.equal(out, torch.zeros(3, 8))


def test_route_permute_unpermute_round_trip() -> None:
    """Route, permute, apply an identity 'expert', unpermute: with normalized weights scaled by s,
    every token comes back as s * x, through the kernels' own permutation."""
    gen = torch.Generator().manual_seed(21)
    t, e, h, top_k, scale = 29, 64, 48, 6, 2.5
    x = torch.randn(t, h, generator=gen)
    logits = torch.randn(t, e, generator=gen)
    bias = torch.randn(e, generator=gen) * 0.1
    weights, ids = moe.moe_route(
        logits, bias, top_k=top_k, n_group=8, topk_group=3, routed_scaling_factor=scale, config=ROUTE_CFG
    )
    perm = moe.moe_permute(x, ids, e, config=PERM_CFG)
    back = moe.moe_unpermute(perm.x, perm.order, weights, config=UNPERM_CFG)
    torch.testing.assert_close(back, x * scale, rtol=1e-5, atol=1e-5)
    for expert in range(e):  # each expert's slice holds exactly the tokens that chose it
        rows = perm.order[perm.offsets[expert] : perm.offsets[expert + 1]]
        assert bool((ids.reshape(-1)[rows] == expert).all())


# ---------------------------------------------------------------------------------------------------
# Launcher errors
# ---------------------------------------------------------------------------------------------------


def test_unknown_config_key_is_an_error() -> None:
    logits = torch.randn(2, 8)
    with pytest.raises(OpInputError, match=r"moe_route: config: unknown keys \['BLOCK_X'\]"):
        moe.moe_route(logits, None, top_k=2, config={"BLOCK_X": 4})
    with pytest.raises(OpInputError, match="moe_permute: config"):
        moe.moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64), 2, config={"BLOCK_T": 4})
    with pytest.raises(OpInputError, match="moe_unpermute: config"):
        moe.moe_unpermute(torch.randn(2, 4), torch.arange(2), torch.rand(2, 1), config={"BLOCK_R": 4})


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "INTERPRETING", False)
    with pytest.raises(OpInputError, match="moe_route: router_logits: is on the CPU"):
        moe.moe_route(torch.randn(2, 8), None, top_k=2)
    with pytest.raises(OpInputError, match="moe_permute: x: is on the CPU"):
        moe.moe_permute(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64), 2)
    with pytest.raises(OpInputError, match="moe_unpermute: y: is on the CPU"):
        moe.moe_unpermute(torch.randn(2, 4), torch.arange(2), torch.rand(2, 1))


def test_layout_errors() -> None:
    with pytest.raises(OpInputError, match="moe_route: router_logits: needs unit stride"):
        moe.moe_route(torch.randn(8, 4).t(), None, top_k=2)
    with pytest.raises(OpInputError, match="moe_route: correction_bias: must be contiguous"):
        moe.moe_route(torch.randn(2, 8), torch.randn(16)[::2], top_k=2)
    with pytest.raises(OpInputError, match="moe_permute: x: needs unit stride"):
        moe.moe_permute(torch.randn(4, 2).t(), torch.zeros(2, 1, dtype=torch.int64), 2)
    with pytest.raises(OpInputError, match="moe_unpermute: y: needs unit stride"):
        moe.moe_unpermute(torch.randn(4, 2).t(), torch.arange(2), torch.rand(2, 1))


def test_compile_specs_cover_every_kernel() -> None:
    specs = moe.compile_specs("*fp8e4nv", {"moe_route": {"BLOCK_T": 4}})
    kernels = {s.kernel for s in specs}
    assert kernels == {
        moe._moe_route_kernel,
        moe._moe_count_kernel,
        moe._moe_scatter_kernel,
        moe._invert_kernel,
        moe._moe_unpermute_kernel,
    }
    assert {s.constexprs["BLOCK_T"] for s in specs if s.kernel is moe._moe_route_kernel} == {4}
    for s in specs:  # every kernel argument typed, every constexpr given a value
        assert list(s.signature) == s.kernel.arg_names
        assert {k for k, v in s.signature.items() if v == "constexpr"} == set(s.constexprs)
    by_name = {s.name: s for s in specs}
    # The routers DeepSeek V3, V2 and V2-Lite configure, and both index dtypes of every index pointer.
    assert not by_name["moe_route[fp32 logits, softmax, no groups]"].constexprs["GROUPED"]
    assert by_name["moe_route[fp32 logits, softmax, 8 groups of 20]"].constexprs["SOFTMAX"]
    assert by_name["moe_permute.scatter[bf16 rows, i32 ids]"].signature["ids_ptr"] == "*i32"
    assert by_name["moe_unpermute.invert[i32 order]"].signature["inv_ptr"] == "*i32"
    assert by_name["moe_unpermute[bf16, i32 order]"].signature["inv_ptr"] == "*i32"
