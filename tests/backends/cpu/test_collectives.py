"""Tests of the reference collectives (:mod:`hal_cpu.reference.collectives`) over gloo with 2 processes.

Starting a process group takes seconds, so one 2-process job runs every check (``_CHECKS``) and
writes each rank's verdicts to a file; each test then asserts one check's verdict on both ranks.
Every input is a deterministic function of its rank, so each rank computes the expected result of a
collective on its own, in a single process, and compares.
"""

from __future__ import annotations

import inspect
import time

import pytest
import torch

import hal
from hal.errors import DTypeError, LayoutError, OpInputError, ShapeError
from hal.ops.catalogue import CATALOGUE
from hal.testing.dist import assert_passed, checks_in, run_checks
from hal_cpu.reference import collectives as ref

WORLD = 2
JOIN_TIMEOUT_S = 120.0
FP8 = torch.float8_e4m3fn


def _x(rank: int, *shape: int, seed: int = 0) -> torch.Tensor:
    """Rank ``rank``'s fp32 input: the same on every process that asks."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randn(*shape, generator=g)


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bitwise equality (fp8 compared as bytes, since fp8 has no equality kernel everywhere)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"got {got.dtype} {list(got.shape)}, want {want.dtype} {list(want.shape)}")
    if want.dtype.itemsize == 1 and want.dtype.is_floating_point:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    if not torch.equal(got, want):
        raise AssertionError(f"values differ:\ngot  {got}\nwant {want}")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _bits(rank: int, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """Rank ``rank``'s input of ``dtype``: random bytes, so every byte of every element is checked."""
    g = torch.Generator().manual_seed(rank)
    return torch.randint(0, 256, (*shape, dtype.itemsize), generator=g, dtype=torch.uint8).view(dtype).reshape(shape)


#: Dtypes gloo does not carry (it fails with "Invalid scalar type"): the reference sends them as bytes.
NOT_ON_GLOO = (torch.int16, torch.uint16, torch.uint32, torch.uint64)
#: What gloo carries as it is: the reference must not touch these.
ON_GLOO = (torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32)
ON_GLOO += (torch.float64, torch.complex64, torch.complex128)


# -- the checks: each runs on every rank, raises on a mismatch ---------------------------------------


def check_all_reduce_sum(rank: int) -> None:
    t = _x(rank, 5, 3)
    out = ref.all_reduce(t, op="sum")
    assert out is t, "all_reduce must work in place and return t"
    _close(t, _x(0, 5, 3) + _x(1, 5, 3))


def check_all_reduce_max(rank: int) -> None:
    t = _x(rank, 7)
    ref.all_reduce(t, op="max")
    _same(t, torch.maximum(_x(0, 7), _x(1, 7)))


def check_all_reduce_min_bf16(rank: int) -> None:
    t = _x(rank, 7).bfloat16()
    ref.all_reduce(t, op="min")
    _same(t, torch.minimum(_x(0, 7), _x(1, 7)).bfloat16())


def check_all_reduce_avg(rank: int) -> None:
    t = _x(rank, 4, 4)
    ref.all_reduce(t, op="avg")
    _close(t, (_x(0, 4, 4) + _x(1, 4, 4)) / WORLD)


def check_all_reduce_avg_int(rank: int) -> None:
    t = torch.tensor([3, -3, 4, 7]) + rank  # sums 7, -5, 9, 15
    ref.all_reduce(t, op="avg")
    _same(t, torch.tensor([3, -2, 4, 7]))  # truncated towards zero


def check_all_reduce_non_contiguous(rank: int) -> None:
    base = _x(rank, 3, 4)
    t = base.t()
    out = ref.all_reduce(t, op="sum")
    assert out is t
    _close(base, _x(0, 3, 4) + _x(1, 3, 4))


def check_all_gather_fp32(rank: int) -> None:
    out = ref.all_gather(_x(rank, 3, 2))
    _same(out, torch.cat([_x(r, 3, 2) for r in range(WORLD)]))


def check_all_gather_fp8(rank: int) -> None:
    out = ref.all_gather(_x(rank, 4, 16).to(FP8))
    _same(out, torch.cat([_x(r, 4, 16).to(FP8) for r in range(WORLD)]))


def check_reduce_scatter_sum(rank: int) -> None:
    t = _x(rank, 6, 3)
    before = t.clone()
    out = ref.reduce_scatter(t, op="sum")
    _close(out, (_x(0, 6, 3) + _x(1, 6, 3)).chunk(WORLD)[rank])
    _same(t, before)  # the input is not clobbered


def check_reduce_scatter_avg(rank: int) -> None:
    out = ref.reduce_scatter(_x(rank, 4, 5), op="avg")
    _close(out, ((_x(0, 4, 5) + _x(1, 4, 5)) / WORLD).chunk(WORLD)[rank])


def check_reduce_scatter_max(rank: int) -> None:
    out = ref.reduce_scatter(_x(rank, 4), op="max")
    _same(out, torch.maximum(_x(0, 4), _x(1, 4)).chunk(WORLD)[rank])


# SPLITS[src][dst]: rows rank src sends to rank dst. Rank 0 sends itself nothing (a zero split).
SPLITS = [[0, 3], [2, 1]]


def _all_to_all_expected(rank: int, dtype: torch.dtype) -> torch.Tensor:
    parts = []
    for src in range(WORLD):
        start = sum(SPLITS[src][:rank])
        parts.append(_x(src, sum(SPLITS[src]), 16)[start : start + SPLITS[src][rank]])
    return torch.cat(parts).to(dtype)


def _check_all_to_all_uneven(rank: int, dtype: torch.dtype) -> None:
    t = _x(rank, sum(SPLITS[rank]), 16).to(dtype)
    out = ref.all_to_all(
        t,
        output_split_sizes=[SPLITS[src][rank] for src in range(WORLD)],
        input_split_sizes=SPLITS[rank],
    )
    _same(out, _all_to_all_expected(rank, dtype))


def check_all_to_all_uneven_fp32(rank: int) -> None:
    _check_all_to_all_uneven(rank, torch.float32)


def check_all_to_all_uneven_fp8(rank: int) -> None:
    _check_all_to_all_uneven(rank, FP8)


def check_all_to_all_equal(rank: int) -> None:
    out = ref.all_to_all(_x(rank, 4, 3))
    _same(out, torch.cat([_x(src, 4, 3).chunk(WORLD)[rank] for src in range(WORLD)]))


def check_broadcast_fp32(rank: int) -> None:
    t = _x(rank, 2, 3)
    out = ref.broadcast(t, src=1)
    assert out is t, "broadcast must work in place and return t"
    _same(t, _x(1, 2, 3))


def check_broadcast_fp8(rank: int) -> None:
    t = _x(rank, 5, 8).to(FP8)
    ref.broadcast(t, src=0)
    _same(t, _x(0, 5, 8).to(FP8))


def check_broadcast_non_contiguous(rank: int) -> None:
    base = _x(rank, 4, 2)
    ref.broadcast(base.t(), src=0)
    _same(base, _x(0, 4, 2))


def check_move_only_ops_send_what_gloo_lacks_as_bytes(rank: int) -> None:
    recv = [SPLITS[src][rank] for src in range(WORLD)]
    for dt in NOT_ON_GLOO:
        for shape in ((3, 2), (3,)):
            _same(ref.all_gather(_bits(rank, dt, *shape)), torch.cat([_bits(r, dt, *shape) for r in range(WORLD)]))
        odd = _bits(rank, dt, 1, 5).t()  # contiguous, last dim of size 1 with stride 5
        _same(ref.all_gather(odd), torch.cat([_bits(r, dt, 1, 5).t() for r in range(WORLD)]))
        one = _bits(rank, dt, 2, 4)[:1, 1]  # one element, contiguous, stride 4
        _same(ref.all_gather(one), torch.cat([_bits(r, dt, 2, 4)[:1, 1] for r in range(WORLD)]))
        one = _bits(rank, dt, 2, 4)[:1, 1:2].t()  # [1, 1], strides (1, 4)
        _same(ref.all_gather(one), torch.cat([_bits(r, dt, 2, 4)[:1, 1:2].t() for r in range(WORLD)]))
        base = _bits(rank, dt, 2, 4)
        ref.broadcast(base[:1, 1], src=1)
        _same(base[:1, 1], _bits(1, dt, 2, 4)[:1, 1])
        t = _bits(rank, dt)  # a scalar
        assert ref.broadcast(t, src=1) is t
        _same(t, _bits(1, dt))
        base = _bits(rank, dt, 4, 2)
        ref.broadcast(base.t(), src=0)
        _same(base, _bits(0, dt, 4, 2))
        for cols in ((), (5,)):  # rows of a 1-D tensor are elements: the splits count them, not bytes
            t = _bits(rank, dt, sum(SPLITS[rank]), *cols)
            out = ref.all_to_all(t, output_split_sizes=recv, input_split_sizes=SPLITS[rank])
            sent = [_bits(src, dt, sum(SPLITS[src]), *cols).split(SPLITS[src])[rank] for src in range(WORLD)]
            _same(out, torch.cat(sent))


def check_what_gloo_cannot_do_is_refused_before_any_exchange(rank: int) -> None:
    be = hal.get_backend("cpu")  # the validated ops
    for name in ("all_reduce", "reduce_scatter"):
        for dt in (torch.float8_e5m2, torch.float8_e4m3fnuz):
            with pytest.raises(OpInputError, match=rf"^{name}: t: cannot reduce {dt}; reduce in bfloat16 or float32"):
                getattr(be, name)(torch.zeros(4).to(dt))
        with pytest.raises(DTypeError, match=rf"^{name}: t: cannot reduce torch.int16; reduce in int32 or int64"):
            getattr(be, name)(torch.zeros(4, dtype=torch.int16))
        flags = torch.tensor([True, False, rank == 0, False])
        with pytest.raises(OpInputError, match=rf'^{name}: op: expected "sum", "max" or "min" for a bool tensor'):
            getattr(be, name)(flags, op="avg")
        _same(flags, torch.tensor([True, False, rank == 0, False]))  # refused before the sum was written into it
        for op in ("max", "min"):
            with pytest.raises(OpInputError, match=rf'^{name}: op: expected "sum" or "avg" for torch.complex64'):
                getattr(be, name)(torch.zeros(4, dtype=torch.complex64), op=op)
    for name in ("all_reduce", "broadcast"):
        with pytest.raises(LayoutError, match=rf"^{name}: t: expected no overlapping memory .*strides \[0\]"):
            getattr(be, name)(torch.zeros(1).expand(4))
    # Nothing was sent: the group is intact, and bool reductions with a bool result work.
    flags = torch.tensor([True, False, rank == 0, False])
    _same(be.all_reduce(flags.clone(), op="max"), torch.tensor([True, False, True, False]))
    _same(be.all_reduce(flags.clone(), op="min"), torch.tensor([True, False, False, False]))
    _same(be.all_reduce(flags.clone(), op="sum"), torch.tensor([True, False, True, False]))


def check_barrier(rank: int) -> None:
    # Rank 1 arrives late: rank 0 must wait for it.
    if rank == 1:
        time.sleep(0.5)
    start = time.monotonic()
    assert ref.barrier() is None
    waited = time.monotonic() - start
    if rank == 0 and waited < 0.3:
        raise AssertionError(f"rank 0 left the barrier after {waited:.3f} s, before rank 1 arrived")


def check_bad_arguments_are_refused_on_every_rank_before_any_exchange(rank: int) -> None:
    be = hal.get_backend("cpu")  # the validated ops
    t = _x(rank, 4, 3)
    for src in (2, -1, True, 1.0):
        with pytest.raises(OpInputError, match=r"broadcast: src: expected a global rank in \[0, 2\)"):
            be.broadcast(t, src=src)
    with pytest.raises(OpInputError, match="all_to_all: output_split_sizes: expected 2 non-negative row counts"):
        be.all_to_all(t, output_split_sizes=[2.0, 2.0], input_split_sizes=[2.0, 2.0])
    with pytest.raises(ShapeError, match="all_to_all: t:"):
        be.all_to_all(torch.tensor(1.0))
    with pytest.raises(DTypeError, match=r"all_reduce: t: cannot reduce torch\.uint16"):
        be.all_reduce(torch.zeros(4, dtype=torch.uint16))
    got = be.all_to_all(t, output_split_sizes=[torch.tensor(2), 2], input_split_sizes=[2, torch.tensor(2)])
    assert got.shape == (4, 3)  # the group is intact, and 0-d integer tensors count as row counts


_CHECKS = checks_in(globals())


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str | None]]:
    """Run every check in one 2-process gloo job; one dict of check name → traceback (None: passed) per rank."""
    out_dir = tmp_path_factory.mktemp("collectives")
    try:
        return run_checks(_CHECKS, out_dir=out_dir, world=WORLD, timeout_s=JOIN_TIMEOUT_S)
    except TimeoutError as e:
        pytest.fail(f"the 2-process gloo job did not finish: {e}")


def test_wire_sends_as_bytes_only_what_the_transport_lacks() -> None:
    for dt in ON_GLOO:
        t = torch.zeros(2, 3, dtype=dt)
        assert ref._wire(t) is t, dt
    for dt in (*NOT_ON_GLOO, FP8, torch.float8_e5m2):
        n = dt.itemsize
        for shape, wire in (((2, 3), (2, 3 * n)), ((3,), (3, n) if n > 1 else (3,)), ((), (1, n) if n > 1 else ())):
            t = torch.zeros(shape, dtype=dt)
            got = ref._wire(t)
            assert got.dtype == torch.uint8 and got.shape == wire and got.data_ptr() == t.data_ptr(), (dt, shape)
        # Contiguous, but with a stride of 5 on its size-1 last dim; and empty with odd strides.
        t = torch.zeros(1, 5, dtype=dt).t()
        got = ref._wire(t)
        assert got.shape == ((5, n) if n > 1 else (5, 1)) and got.data_ptr() == t.data_ptr(), dt
        got.fill_(0xFF)  # the bytes written land in t
        assert bool((t.view(torch.uint8 if n == 1 else dt) != 0).all()), dt
        assert ref._wire(torch.zeros(6, dtype=dt).as_strided((2, 0), (3, 5))).numel() == 0
        # One element with a stride on its size-1 dims (contiguous; clone() and view(-1) keep the stride).
        for t in (torch.zeros(2, 4, dtype=dt)[:1, 1], torch.zeros(2, 4, dtype=dt)[:1, 1:2].t()):
            got = ref._wire(t)
            assert got.shape == ((1, n) if n > 1 else t.shape) and got.data_ptr() == t.data_ptr(), (dt, t.stride())


def test_signatures_match_the_catalogue() -> None:
    expected = {name for name, spec in CATALOGUE.items() if spec.kind == "collective"}
    assert set(ref.__all__) == expected
    for name in ref.__all__:
        want = [(p.name, p.kind, p.default) for p in CATALOGUE[name].signature.parameters.values()]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(ref, name)).parameters.values()]
        assert got == want, name


@pytest.mark.distributed
@pytest.mark.parametrize("check", list(_CHECKS))
def test_collective(check: str, verdicts: list[dict[str, str | None]]) -> None:
    assert_passed(verdicts, check)
