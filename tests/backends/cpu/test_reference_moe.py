"""The reference MoE ops against independent oracles.

``moe_route`` is checked against a per-token pure-Python routing (float64 scores, sorted lists, no
``torch.topk``), comparing each token's experts as a set and the weight of each expert. ``moe_permute``
is checked against a Python sort of flat indices and its offsets against a Python count;
``moe_unpermute`` against a per-token Python sum.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch

from hal_cpu.reference.moe import moe_permute, moe_route, moe_unpermute

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _gen(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------
# moe_route
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteCase:
    t: int
    e: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    bias: bool = True
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        return (
            f"T{self.t}-E{self.e}-K{self.top_k}-G{self.n_group}-KG{self.topk_group}-{self.scoring_func}"
            f"-{'bias' if self.bias else 'nobias'}-{'norm' if self.norm_topk_prob else 'nonorm'}"
            f"-S{self.routed_scaling_factor}-{str(self.dtype).removeprefix('torch.')}"
        )


ROUTE_CASES = [
    # DeepSeek-V3: 256 experts in 8 groups, 4 groups kept, 8 experts, scaling 2.5.
    RouteCase(t=7, e=256, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5),
    RouteCase(t=5, e=256, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, dtype=torch.bfloat16),
    RouteCase(t=6, e=64, top_k=6, n_group=1, topk_group=1),
    RouteCase(t=6, e=64, top_k=6, n_group=1, topk_group=1, bias=False),
    # DeepSeek-V2: softmax, no bias, group max, no normalization, large scaling.
    RouteCase(
        t=6,
        e=64,
        top_k=6,
        n_group=8,
        topk_group=3,
        bias=False,
        norm_topk_prob=False,
        routed_scaling_factor=16.0,
        scoring_func="softmax",
    ),
    RouteCase(t=6, e=64, top_k=6, scoring_func="softmax", bias=False),
    RouteCase(t=6, e=32, top_k=4, n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=2.5),
    RouteCase(t=4, e=16, top_k=8, n_group=4, topk_group=2),  # every expert of the kept groups is chosen
    RouteCase(t=0, e=16, top_k=2, n_group=4, topk_group=2),
]


def _route_oracle(logits: list[float], bias: list[float] | None, case: RouteCase) -> dict[int, float]:
    """One token's routing in plain Python: expert id → combine weight."""
    if case.scoring_func == "sigmoid":
        scores = [1.0 / (1.0 + math.exp(-x)) for x in logits]
    else:
        m = max(logits)
        exps = [math.exp(x - m) for x in logits]
        scores = [x / sum(exps) for x in exps]
    choice = [s + b for s, b in zip(scores, bias, strict=True)] if bias is not None else scores
    size = case.e // case.n_group
    experts = list(range(case.e))
    if case.n_group > 1:
        group_score = []
        for g in range(case.n_group):
            best = sorted(choice[g * size : (g + 1) * size], reverse=True)
            group_score.append(best[0] + best[1] if bias is not None else best[0])
        kept = sorted(range(case.n_group), key=lambda g: group_score[g], reverse=True)[: case.topk_group]
        experts = [x for x in experts if x // size in kept]
    chosen = sorted(experts, key=lambda x: choice[x], reverse=True)[: case.top_k]
    total = sum(scores[x] for x in chosen) + 1e-20 if case.norm_topk_prob else 1.0
    return {x: scores[x] / total * case.routed_scaling_factor for x in chosen}


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: c.id)
def test_moe_route_matches_python_oracle(case: RouteCase) -> None:
    gen = _gen(case.id)
    logits = (torch.randn(case.t, case.e, generator=gen) * 2).to(case.dtype)
    bias = torch.randn(case.e, generator=gen) * 0.1 if case.bias else None

    weights, ids = moe_route(
        logits,
        bias,
        top_k=case.top_k,
        n_group=case.n_group,
        topk_group=case.topk_group,
        norm_topk_prob=case.norm_topk_prob,
        routed_scaling_factor=case.routed_scaling_factor,
        scoring_func=case.scoring_func,
    )

    assert weights.shape == (case.t, case.top_k) and weights.dtype == torch.float32
    assert ids.shape == (case.t, case.top_k) and ids.dtype == torch.int64
    rows = logits.float().tolist()
    bias_list = bias.tolist() if bias is not None else None
    size = case.e // case.n_group
    for t in range(case.t):
        want = _route_oracle(rows[t], bias_list, case)
        got_ids = ids[t].tolist()
        assert len(set(got_ids)) == case.top_k, f"token {t}: repeated experts {got_ids}"
        assert set(got_ids) == set(want), f"token {t}"
        assert len({x // size for x in got_ids}) <= case.topk_group
        for j, x in enumerate(got_ids):
            assert math.isclose(weights[t, j].item(), want[x], rel_tol=1e-5), f"token {t}, expert {x}"


def test_moe_route_chosen_experts_lie_in_kept_groups() -> None:
    """A large bias on four groups forces the choice there, yet the weights stay unbiased."""
    e, n_group, size = 256, 8, 32
    favoured = [1, 3, 4, 6]
    logits = torch.randn(16, e, generator=_gen("kept-groups")) * 3
    bias = torch.zeros(e)
    for g in favoured:
        bias[g * size : (g + 1) * size] = 10.0
    weights, ids = moe_route(logits, bias, top_k=8, n_group=n_group, topk_group=4, norm_topk_prob=False)
    assert set((ids // size).flatten().tolist()) <= set(favoured)
    torch.testing.assert_close(weights, logits.sigmoid().gather(1, ids))


def test_moe_route_groups_scored_by_top2_sum_with_bias_and_by_max_without() -> None:
    """Group 0 holds the best single expert; group 1 the best pair. With a bias (V3) group 1 wins."""
    logits = torch.full((1, 8), -6.0)
    logits[0, 0] = 4.0  # group 0: one strong expert
    logits[0, 4] = logits[0, 5] = 2.0  # group 1: two good experts
    kwargs = {"top_k": 2, "n_group": 2, "topk_group": 1, "norm_topk_prob": False}
    _, ids = moe_route(logits, torch.zeros(8), **kwargs)
    assert sorted(ids[0].tolist()) == [4, 5]
    _, ids = moe_route(logits, None, **kwargs)
    assert 0 in ids[0].tolist() and all(x < 4 for x in ids[0].tolist())


# ---------------------------------------------------------------------------------------------------
# moe_permute / moe_unpermute
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PermuteCase:
    t: int
    top_k: int
    e: int
    hidden: int
    experts_used: tuple[int, ...] | None = None  # None: any expert
    dtype: torch.dtype = torch.float32
    ids_dtype: torch.dtype = torch.int64

    @property
    def id(self) -> str:
        used = "" if self.experts_used is None else f"-used{'_'.join(map(str, self.experts_used))}"
        dtype = str(self.dtype).removeprefix("torch.")
        ids_dtype = str(self.ids_dtype).removeprefix("torch.")
        return f"T{self.t}-K{self.top_k}-E{self.e}-H{self.hidden}-{dtype}-{ids_dtype}{used}"


PERMUTE_CASES = [
    PermuteCase(t=13, top_k=8, e=32, hidden=64),
    PermuteCase(t=9, top_k=1, e=8, hidden=16),
    PermuteCase(t=11, top_k=3, e=16, hidden=32, experts_used=(2, 5, 7)),  # most experts get nothing
    PermuteCase(t=11, top_k=3, e=16, hidden=32, ids_dtype=torch.int32),
    PermuteCase(t=10, top_k=4, e=8, hidden=128, dtype=torch.bfloat16),
    PermuteCase(t=10, top_k=4, e=8, hidden=128, dtype=torch.float8_e4m3fn),
    PermuteCase(t=0, top_k=2, e=4, hidden=8),
]


def _topk_ids(case: PermuteCase, gen: torch.Generator) -> torch.Tensor:
    """Distinct experts per token, drawn from ``experts_used`` when given."""
    pool = torch.tensor(case.experts_used if case.experts_used is not None else range(case.e))
    rows = [pool[torch.randperm(len(pool), generator=gen)[: case.top_k]] for _ in range(case.t)]
    ids = torch.stack(rows) if rows else torch.empty(0, case.top_k, dtype=torch.int64)
    return ids.to(case.ids_dtype)


@pytest.mark.parametrize("case", PERMUTE_CASES, ids=lambda c: c.id)
def test_moe_permute_sorts_by_expert_stably(case: PermuteCase) -> None:
    gen = _gen(case.id)
    x = torch.randn(case.t, case.hidden, generator=gen).to(case.dtype)
    ids = _topk_ids(case, gen)

    x_sorted, offsets, order = moe_permute(x, ids, case.e)

    flat = ids.flatten().tolist()
    want_order = sorted(range(len(flat)), key=lambda f: (flat[f], f))
    assert order.dtype == torch.int64 and order.tolist() == want_order
    assert offsets.dtype == torch.int64 and offsets.shape == (case.e + 1,)
    counts = [flat.count(ex) for ex in range(case.e)]
    assert offsets.tolist() == [sum(counts[:ex]) for ex in range(case.e + 1)]
    for ex in range(case.e):
        rows = order[offsets[ex] : offsets[ex + 1]].tolist()
        assert all(flat[f] == ex for f in rows)
    assert x_sorted.dtype == case.dtype and x_sorted.shape == (case.t * case.top_k, case.hidden)
    want_x = torch.stack([x[f // case.top_k] for f in want_order]) if want_order else x[:0]
    # Bit-exact copy: compare the bytes, which also works for fp8.
    assert torch.equal(x_sorted.view(torch.uint8), want_x.view(torch.uint8))


@pytest.mark.parametrize("case", [c for c in PERMUTE_CASES if c.dtype != torch.float8_e4m3fn], ids=lambda c: c.id)
def test_moe_unpermute_weights_each_expert_output(case: PermuteCase) -> None:
    """Expert ``e`` scales its rows by ``e + 1``: ``out[t] = sum_j w[t, j] * (ids[t, j] + 1) * x[t]``."""
    gen = _gen(case.id)
    x = torch.randn(case.t, case.hidden, generator=gen).to(case.dtype)
    ids = _topk_ids(case, gen)
    weights = torch.rand(case.t, case.top_k, generator=gen)
    x_sorted, _, order = moe_permute(x, ids, case.e)
    expert_of_row = ids.flatten().long()[order]
    y = (x_sorted.float() * (expert_of_row + 1).unsqueeze(1).float()).to(case.dtype)

    out = moe_unpermute(y, order, weights)

    assert out.shape == (case.t, case.hidden) and out.dtype == case.dtype
    want = torch.zeros(case.t, case.hidden, dtype=torch.float64)
    xd = x.double()
    for t in range(case.t):
        for j in range(case.top_k):
            want[t] += weights[t, j].item() * (ids[t, j].item() + 1) * xd[t]
    if case.t:
        assert _rel_err(out, want) <= TOL[case.dtype]


def test_moe_unpermute_roundtrip_with_int32_order() -> None:
    """Unpermuting permute's own rows gives ``x[t] * sum_j w[t, j]``."""
    gen = _gen("roundtrip")
    t, top_k, e = 12, 4, 16
    x = torch.randn(t, 64, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:top_k] for _ in range(t)])
    weights = torch.rand(t, top_k, generator=gen)
    x_sorted, _, order = moe_permute(x, ids, e)
    out = moe_unpermute(x_sorted, order.to(torch.int32), weights)
    assert _rel_err(out, x.double() * weights.double().sum(1, keepdim=True)) <= 1e-5
