"""Tests of the reference expert-parallel ops (``ep_dispatch`` / ``ep_combine``) over gloo with 2 processes.

As in ``test_collectives.py``, one 2-process job runs every check (``_CHECKS``) and writes each rank's
verdicts to a file; each test asserts one check's verdict on both ranks. Every rank's tokens and routing
are a deterministic function of the rank, so each rank can compute the whole single-process MoE,
``out[t] = Σ_j w[t, j] · f_{ids[t, j]}(x[t])``, on its own and compare it with
dispatch → local experts → combine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import hal
from hal.errors import CollectiveError, LayoutError, OpInputError, ShapeError
from hal.ops import catalogue
from hal.testing.dist import assert_passed, checks_in, run_checks
from hal.types import Dispatched, DispatchHandle
from hal_cpu.reference import collectives as ref

WORLD = 2
JOIN_TIMEOUT_S = 120.0
FP8 = torch.float8_e4m3fn

#: The routing of one rank: (x [T, H], topk_ids [T, K], topk_weights [T, K]).
Routing = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _random_routing(rank: int, tokens: int, hidden: int, top_k: int, experts: int, seed: int = 0) -> Routing:
    """Rank ``rank``'s tokens and a random routing to ``top_k`` distinct of ``experts`` experts."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :top_k]
    w = torch.rand(tokens, top_k, generator=g)
    return x, ids, w


def _weights(experts: int, hidden: int) -> torch.Tensor:
    """Expert e's small matrix: f_e(x) = x @ W[e]."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(experts, hidden, hidden, generator=g) / hidden**0.5


def _moe(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, mats: torch.Tensor, first: int = 0) -> torch.Tensor:
    """``Σ_j w_j · (x @ mats[ids_j - first])`` per row, skipping ids outside ``[first, first + len(mats))``.

    Vectorized per expert: the weight each row gives expert e is ``Σ_j w_j · [ids_j == e]``.
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    for e in range(mats.shape[0]):
        coef = (w * (ids == first + e)).sum(dim=1)
        out += coef[:, None] * (x.float() @ mats[e])
    return out


def _check_moe(rank: int, routings: list[Routing], experts: int) -> Dispatched:
    """Dispatch this rank's routing, run the local experts, combine, and compare with one process."""
    x, ids, w = routings[rank]
    mats = _weights(experts, x.shape[1])
    local = experts // dist.get_world_size()
    d = ref.ep_dispatch(x, ids, w, num_experts=experts)
    # The local experts see local ids (-1: another rank's) and weights (0 there).
    y = _moe(d.x, d.topk_ids, d.topk_weights, mats[rank * local : (rank + 1) * local])
    out = ref.ep_combine(y, d.handle)
    want = _moe(x, ids, w, mats)
    assert out.dtype == x.dtype and out.shape == x.shape, (out.dtype, out.shape)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    _check_received(rank, routings, experts, d)
    return d


def _check_received(rank: int, routings: list[Routing], experts: int, d: Dispatched) -> None:
    """The received rows are exactly the tokens that selected this rank's experts, in (source rank, token)
    order, with local ids and the matching weights."""
    local = experts // dist.get_world_size()
    xs, idss, ws = [], [], []
    for x, ids, w in routings:
        mine = ids // local == rank
        sel = mine.any(dim=1)
        xs.append(x[sel])
        idss.append(torch.where(mine, ids - rank * local, -1)[sel])
        ws.append(torch.where(mine, w, 0.0)[sel])
    _same(d.x, torch.cat(xs))
    _same(d.topk_ids, torch.cat(idss).long())
    _same(d.topk_weights, torch.cat(ws))
    assert d.handle.recv_counts == [len(t) for t in xs], d.handle.recv_counts


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bitwise equality (fp8 compared as bytes)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"got {got.dtype} {list(got.shape)}, want {want.dtype} {list(want.shape)}")
    if want.dtype.itemsize == 1 and want.dtype.is_floating_point:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    if not torch.equal(got, want):
        raise AssertionError(f"values differ:\ngot  {got}\nwant {want}")


# -- the checks: each runs on every rank, raises on a mismatch ---------------------------------------


def check_random_routings(rank: int) -> None:
    world = dist.get_world_size()
    for seed, (tokens, top_k, per_rank) in enumerate([(13, 2, 2), (32, 4, 4), (7, 1, 1), (20, 3, 3)]):
        routings = [_random_routing(r, tokens + 5 * r, 16, top_k, per_rank * world, seed) for r in range(world)]
        _check_moe(rank, routings, per_rank * world)


def check_top_1_routing_as_a_transposed_view(rank: int) -> None:
    # [T, 1] ids and weights made by transposing [1, T] ones: contiguous, but with stride T on the size-1
    # dim, which the packed rows' byte views must not trip over (both modes).
    world = dist.get_world_size()
    routings = []
    for r in range(world):
        x, ids, w = _random_routing(r, 9 + r, 16, 1, 4, seed=11)
        routings.append((x, ids.reshape(1, -1).clone().t(), w.reshape(1, -1).clone().t()))
    x, ids, w = routings[rank]
    assert ids.is_contiguous() and ids.stride() == (1, ids.shape[0]), ids.stride()
    _check_moe(rank, routings, 4)  # normal mode
    ll = ref.ep_dispatch(x, ids, w, num_experts=4, max_tokens_per_rank=16)
    mats, local = _weights(4, x.shape[1]), 4 // world
    y = _moe(ll.x, ll.topk_ids, ll.topk_weights, mats[rank * local : (rank + 1) * local])
    torch.testing.assert_close(ref.ep_combine(y, ll.handle), _moe(x, ids, w, mats), rtol=1e-5, atol=1e-5)


def check_int32_ids_and_bf16(rank: int) -> None:
    routings = []
    for r in range(WORLD):
        x, ids, w = _random_routing(r, 11, 16, 2, 4, seed=9)
        routings.append((x, ids.int(), w))
    x, ids, w = routings[rank]
    d = ref.ep_dispatch(x.bfloat16(), ids, w, num_experts=4)
    assert d.x.dtype == torch.bfloat16 and d.topk_ids.dtype == torch.int64
    y = d.x * 3  # f = 3·x for every expert, weight ignored: each token comes back once per rank it went to
    out = ref.ep_combine(y, d.handle)
    ranks = ids.long() // 2
    n_ranks = torch.stack([(ranks == r).any(dim=1) for r in range(WORLD)]).sum(dim=0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (x.bfloat16().float() * 3).bfloat16().float() * n_ranks[:, None])


def check_all_tokens_to_one_rank(rank: int) -> None:
    # Every token of both ranks selects experts of rank 0 only: rank 1 receives nothing.
    experts = 8
    routings = []
    for r in range(WORLD):
        x, _, w = _random_routing(r, 9, 16, 3, experts, seed=3)
        ids = torch.rand(9, 4, generator=torch.Generator().manual_seed(r)).argsort(dim=1)[:, :3]  # experts 0..3
        routings.append((x, ids, w))
    d = _check_moe(rank, routings, experts)
    if rank == 1:
        assert d.x.shape == (0, 16) and d.topk_ids.shape == (0, 3) and d.handle.recv_counts == [0, 0]
        assert d.handle.send_counts == [9, 0]


def check_rank_without_tokens(rank: int) -> None:
    # Rank 1 has no tokens (T = 0); it still receives rank 0's tokens for its experts.
    experts = 4
    routings = [_random_routing(0, 10, 16, 2, experts, seed=4), _random_routing(1, 0, 16, 2, experts, seed=4)]
    d = _check_moe(rank, routings, experts)
    if rank == 1:
        assert d.handle.num_tokens == 0 and d.handle.send_counts == [0, 0]


def check_top_k_spanning_and_within_ranks(rank: int) -> None:
    # 8 experts, 4 per rank. Token 0 spans both ranks; token 1 both on rank 0; token 2 both on rank 1;
    # token 3 spans both in the other order.
    experts = 8
    ids = torch.tensor([[0, 5], [1, 2], [6, 7], [4, 3]])
    routings = []
    for r in range(WORLD):
        x, _, w = _random_routing(r, 4, 8, 2, experts, seed=5)
        routings.append((x, ids + 0, w))
    d = _check_moe(rank, routings, experts)
    # Each rank gets tokens 0, 1, 3 (rank 0) or 0, 2, 3 (rank 1) from each source.
    want_ids = (
        torch.tensor([[0, -1], [1, 2], [-1, 3]]) if rank == 0 else torch.tensor([[-1, 1], [2, 3], [0, -1]])
    ).repeat(WORLD, 1)
    _same(d.topk_ids, want_ids)
    assert d.handle.recv_counts == [3, 3] and d.handle.send_counts == [3, 3]
    _same(d.handle.send_index, torch.tensor([0, 1, 3, 0, 2, 3]))


def check_fp8_payload_bit_exact(rank: int) -> None:
    experts, hidden = 4, 256
    routings = [_random_routing(r, 12, hidden, 2, experts, seed=6) for r in range(WORLD)]

    def fp8(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (routings[r][0] * 50).to(FP8)
        scales = torch.rand(x.shape[0], hidden // 128, generator=torch.Generator().manual_seed(r)) + 0.5
        return x, scales

    x, scales = fp8(rank)
    _, ids, w = routings[rank]
    d = ref.ep_dispatch(x, ids, w, num_experts=experts, x_scales=scales)
    local = experts // WORLD
    want_x, want_s = [], []
    for r in range(WORLD):
        sel = (routings[r][1] // local == rank).any(dim=1)
        xr, sr = fp8(r)
        want_x.append(xr[sel])
        want_s.append(sr[sel])
    _same(d.x, torch.cat(want_x))
    assert d.x_scales is not None
    _same(d.x_scales, torch.cat(want_s))
    # The same routing without scales gives no scales back.
    plain = ref.ep_dispatch(routings[rank][0], ids, w, num_experts=experts)
    assert plain.x_scales is None


def check_identity(rank: int) -> None:
    # f = identity and weights summing to 1 per token: each rank returns (Σ its local w) · x_t, and the
    # combine sums over ranks to (Σ_all w) · x_t = x_t. With dyadic weights and x of few mantissa bits
    # every product and partial sum is exact, so the result is x bit for bit.
    experts, top_k = 8, 4
    routings = []
    for r in range(WORLD):
        g = torch.Generator().manual_seed(100 + r)
        x = torch.randint(-64, 64, (15 + r, 32), generator=g).float() / 8
        ids = torch.rand(x.shape[0], experts, generator=g).argsort(dim=1)[:, :top_k]
        perm = torch.rand(x.shape[0], top_k, generator=g).argsort(dim=1)
        w = torch.tensor([0.5, 0.25, 0.125, 0.125])[perm]
        routings.append((x, ids, w))
    x, ids, w = routings[rank]
    for dtype in (torch.float32, torch.bfloat16):
        d = ref.ep_dispatch(x.to(dtype), ids, w, num_experts=experts)
        y = (d.topk_weights.sum(dim=1, keepdim=True) * d.x.float()).to(dtype)
        _same(ref.ep_combine(y, d.handle), x.to(dtype))


# -- the low-latency mode (max_tokens_per_rank): fixed slots, one exchange ---------------------------


def _slots_in_rank_order(world: int, rank: int, m: int) -> torch.Tensor:
    """The low-latency slot of every (source rank, token) in rank order: this rank's block comes first."""
    order = [rank] + [r for r in range(world) if r != rank]
    return torch.cat([torch.arange(m) + order.index(src) * m for src in range(world)])


def _check_low_latency_like_normal(rank: int, routings: list[Routing], experts: int, m: int) -> None:
    """Both modes receive the same routed rows (the low-latency slots of the tokens that skipped this
    rank carry ids -1 and weight 0, those past a source's T zeros), and the combines agree bit for bit
    in fp32 and bf16, whatever the ignored slots' results hold."""
    world = dist.get_world_size()
    x, ids, w = routings[rank]
    for dtype in (torch.float32, torch.bfloat16):
        normal = ref.ep_dispatch(x.to(dtype), ids, w, num_experts=experts)
        ll = ref.ep_dispatch(x.to(dtype), ids, w, num_experts=experts, max_tokens_per_rank=m)
        assert ll.x.shape == (world * m, x.shape[1]) and ll.handle.max_tokens_per_rank == m
        slots = _slots_in_rank_order(world, rank, m)
        got_x, got_ids, got_w = ll.x[slots], ll.topk_ids[slots], ll.topk_weights[slots]
        routed = (got_ids >= 0).any(dim=1)
        _same(got_x[routed], normal.x)
        _same(got_ids[routed], normal.topk_ids)
        _same(got_w[routed], normal.topk_weights)
        assert bool((got_ids[~routed] == -1).all()) and bool((got_w[~routed] == 0).all())
        for src, (xs, _, _) in enumerate(routings):  # slots past the source's T: zeros
            pad = got_x[src * m + xs.shape[0] : (src + 1) * m]
            _same(pad, torch.zeros_like(pad))
        # The local experts' results: f = 1.5·x weighted; NaN where no local expert (must be ignored).
        y_normal = (normal.x.float() * normal.topk_weights.sum(dim=1, keepdim=True) * 1.5).to(dtype)
        y_ll = (ll.x.float() * ll.topk_weights.sum(dim=1, keepdim=True) * 1.5).to(dtype)
        y_ll[~(ll.topk_ids >= 0).any(dim=1)] = float("nan")
        out = ref.ep_combine(y_ll, ll.handle)
        assert not out.isnan().any(), "an ignored slot's result was added"
        _same(out, ref.ep_combine(y_normal, normal.handle))


def _ll_routings(world: int, seed: int, tokens: list[int], top_k: int, experts: int) -> list[Routing]:
    return [_random_routing(r, tokens[r], 16, top_k, experts, seed) for r in range(world)]


def check_low_latency_like_normal(rank: int) -> None:
    # Both ways of carrying the routing: every rank's local ids in each row (few ranks, the default
    # here), and the global ids mapped on arrival (what more ranks than PER_RANK_ROUTING_MAX_WORLD take).
    limit = ref.PER_RANK_ROUTING_MAX_WORLD
    try:
        for max_world in (limit, 1):
            ref.PER_RANK_ROUTING_MAX_WORLD = max_world
            _low_latency_like_normal_cases(rank)
    finally:
        ref.PER_RANK_ROUTING_MAX_WORLD = limit


def _low_latency_like_normal_cases(rank: int) -> None:
    world = dist.get_world_size()
    cases = [  # (tokens per rank, top_k, experts per rank, max_tokens_per_rank)
        ([13] * world, 2, 2, 13),  # every slot used
        ([32, 20, 7, 1][:world], 4, 4, 40),  # uneven T, slots past T
        ([0] + [9] * (world - 1), 2, 2, 9),  # a rank without tokens
        ([7] * world, 1, 1, 9),  # top-1: one rank per token
        ([30] * world, 8, 4, 30),  # top-8 over every rank's experts
        ([1] * world, 2, 2, 1),  # one slot per rank (a decode step with no more tokens than ranks)
        ([1] + [0] * (world - 1), 1, 1, 1),
    ]
    for seed, (tokens, top_k, per_rank, m) in enumerate(cases):
        routings = _ll_routings(world, seed, tokens, top_k, per_rank * world)
        _check_low_latency_like_normal(rank, routings, per_rank * world, m)
    int32 = [(x, ids.int(), w) for x, ids, w in _ll_routings(world, 9, [11] * world, 3, 3 * world)]
    _check_low_latency_like_normal(rank, int32, 3 * world, 12)


def check_low_latency_fp8_payload(rank: int) -> None:
    experts, hidden, m = 4, 256, 16

    def payload(r: int) -> Routing:
        g = torch.Generator().manual_seed(40 + r)
        return (torch.randn(12, hidden, generator=g) * 50).to(FP8), torch.rand(12, hidden // 128, generator=g) + 0.5

    x, scales = payload(rank)
    ids = torch.randint(0, experts, (12, 2), generator=torch.Generator().manual_seed(rank))
    w = torch.rand(12, 2)
    d = ref.ep_dispatch(x, ids, w, num_experts=experts, x_scales=scales, max_tokens_per_rank=m)
    assert d.x.dtype == FP8 and d.x_scales is not None
    other_x, other_scales = payload(1 - rank)
    # The own block, then the other rank's: every token bit for bit whatever its routing, zeros past T.
    pad = torch.zeros(m - 12, hidden, dtype=FP8)
    _same(d.x, torch.cat([x, pad, other_x, pad]))
    _same(d.x_scales, torch.cat([scales, torch.zeros(m - 12, 2), other_scales, torch.zeros(m - 12, 2)]))


def check_low_latency_refusals(rank: int) -> None:
    be = hal.get_backend("cpu")  # the validated ops
    x, ids, w = _random_routing(rank, 6, 16, 2, 4)
    with pytest.raises(ShapeError, match="more than max_tokens_per_rank"):
        be.ep_dispatch(x, ids, w, num_experts=4, max_tokens_per_rank=5)
    with pytest.raises(OpInputError, match="max_tokens_per_rank"):
        be.ep_dispatch(x, ids, w, num_experts=4, max_tokens_per_rank=0)
    d = be.ep_dispatch(x, ids, w, num_experts=4, max_tokens_per_rank=8)
    assert d.x.shape == (16, 16)
    with pytest.raises(ShapeError, match="rows received"):
        be.ep_combine(torch.zeros(6, 16), d.handle)


def check_ranks_that_disagree_on_the_layout_all_raise_before_the_rows_travel(rank: int) -> None:
    """A normal-mode dispatch whose ranks disagree on x's width or dtype, top_k or num_experts raises a
    LayoutError on every rank (no abort, no garbage), and the group still works afterwards."""
    be = hal.get_backend("cpu")
    x, ids, w = _random_routing(rank, 5, 16, 2, 4)
    zero = rank == 0  # rank 0 differs from rank 1 in each case: (what, rank 0's value, rank 1's value, args)
    cases = [
        ("x's hidden size", "8", "16", (x[:, :8] if zero else x, ids, w, 4)),
        ("x's dtype", "bfloat16", "float32", (x.bfloat16() if zero else x, ids, w, 4)),
        ("top_k", "1", "2", (x, ids[:, :1] if zero else ids, w[:, :1] if zero else w, 4)),
        ("num_experts", "8", "4", (x, ids, w, 8 if zero else 4)),
    ]
    for what, on_0, on_1, (xr, idr, wr, experts) in cases:
        theirs, mine = (on_1, on_0) if zero else (on_0, on_1)
        want = f"same layout, but {what} is {theirs} on rank {1 - rank} and {mine} on this rank \\({rank}\\)"
        with pytest.raises(LayoutError, match=want):
            be.ep_dispatch(xr, idr, wr, num_experts=experts)
    _check_moe(rank, [_random_routing(r, 5, 16, 2, 4) for r in range(WORLD)], 4)  # the group is intact


_CHECKS = checks_in(globals())
_WIDE_CHECKS = {"random_routings": check_random_routings, "low_latency_like_normal": check_low_latency_like_normal}


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str | None]]:
    """Run every check in one 2-process gloo job; one dict of check name → traceback (None: passed) per rank."""
    out_dir = tmp_path_factory.mktemp("ep")
    try:
        return run_checks(_CHECKS, out_dir=out_dir, world=WORLD, timeout_s=JOIN_TIMEOUT_S)
    except TimeoutError as e:
        pytest.fail(f"the 2-process gloo job did not finish: {e}")


@pytest.mark.distributed
@pytest.mark.parametrize("check", list(_CHECKS))
def test_ep(check: str, verdicts: list[dict[str, str | None]]) -> None:
    assert_passed(verdicts, check)


@pytest.mark.distributed
def test_three_ranks(tmp_path: Path) -> None:
    # Three ranks: the own block sits between the other two in rank order (the normal mode's exchange
    # moves the later ranks' rows past it; the low-latency send is repeated), and a token can take three
    # terms (accumulated in fp32 for bf16).
    try:
        verdicts = run_checks(_WIDE_CHECKS, out_dir=tmp_path, world=3, timeout_s=JOIN_TIMEOUT_S)
    except TimeoutError as e:
        pytest.fail(f"the 3-process gloo job did not finish: {e}")
    for check in _WIDE_CHECKS:
        assert_passed(verdicts, check)


def test_no_process_group_raises() -> None:
    assert not dist.is_initialized()
    x, ids, w = _random_routing(0, 4, 16, 2, 4)
    with pytest.raises(CollectiveError, match="ep_dispatch"):
        catalogue.ep_dispatch(x, ids, w, num_experts=4)
    handle = DispatchHandle(
        send_index=torch.zeros(0, dtype=torch.int64), send_counts=[0], recv_counts=[0], num_tokens=0
    )
    with pytest.raises(CollectiveError, match="ep_combine"):
        catalogue.ep_combine(torch.zeros(0, 16), handle)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("world", [2, 4])
def test_combine_sum_is_an_fp32_accumulation(dtype: torch.dtype, world: int) -> None:
    # The combine's per-token sum (no process group needed): up to `world` terms per token, tokens with
    # none, rows in source-rank order, against an fp32 index_add_ rounded once to the dtype.
    g = torch.Generator().manual_seed(world)
    tokens = 9
    segments = [torch.nonzero(torch.rand(tokens, generator=g) < 0.7).flatten() for _ in range(world)]
    token = torch.cat(segments)
    rows = torch.randn(len(token), 16, generator=g).to(dtype)
    want = torch.zeros(tokens, 16).index_add_(0, token, rows.float()).to(dtype)
    got = ref._sum_by_token(list(rows.split([len(s) for s in segments])), token, tokens)
    assert got.dtype == dtype
    _same(got, want)  # the same terms in the same order, in fp32, rounded once
    _same(ref._sum_by_token([rows[:0]] * world, token[:0], tokens), torch.zeros(tokens, 16, dtype=dtype))


def test_low_latency_handle_lists_the_ignored_slots() -> None:
    # Rank 1 of 3, 4 tokens in 6 slots per rank: skipped[r, t] = token t chose none of rank r's experts.
    skipped = torch.tensor(
        [
            [True, False, False, True],  # rank 0
            [False, True, False, False],  # this rank
            [False, False, True, True],  # rank 2
        ]
    )
    handle = DispatchHandle.low_latency(skipped, 1, 6)
    assert handle.send_index.tolist() == [1]  # the own results to ignore: token 1's
    assert handle.send_counts == handle.recv_counts == [6, 6, 6]
    assert (handle.num_tokens, handle.max_tokens_per_rank) == (4, 6)
    assert handle.remote_ignored is not None
    # Rank 0's block first (slots 0-5), then rank 2's (6-11); slots past the 4 tokens are not ignored.
    assert handle.remote_ignored.tolist() == [0, 3, 6 + 2, 6 + 3]
