"""Tests of :class:`hal.kvcache.PagedKVCache`: allocation, addressing, reuse, exhaustion and misuse."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import pytest
import torch

from hal.errors import KVCacheError, KVCacheExhaustedError
from hal.kvcache import PagedKVCache

BS = 64
D = 8  # small entry_dim keeps tests fast; addressing does not depend on it


def _cache(num_blocks: int = 8, num_layers: int = 2, dtype: torch.dtype = torch.float32) -> PagedKVCache:
    return PagedKVCache(num_layers, num_blocks, D, dtype=dtype)


def _entries(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g).to(dtype)


def _read_back(cache: PagedKVCache, layer: int, seq_id: Hashable) -> torch.Tensor:
    """Gather a sequence's entries token by token through its block table, as a decode kernel does."""
    table = cache.block_table([seq_id])[0]
    n = int(cache.seqlens([seq_id])[0])
    storage = cache.layer(layer)
    rows = [storage[int(table[p // cache.block_size]), p % cache.block_size, 0] for p in range(n)]
    return torch.stack(rows) if rows else storage.new_empty((0, cache.entry_dim))


def test_layer_is_flashmla_layout_view() -> None:
    cache = PagedKVCache(3, 5, 576)
    layer = cache.layer(1)
    assert layer.shape == (5, BS, 1, 576)
    assert layer.dtype == torch.bfloat16
    layer[0, 0, 0, 0] = 1.0
    assert cache.layer(1)[0, 0, 0, 0] == 1.0  # a view, not a copy


@pytest.mark.parametrize("n", [1, 63, 64, 65, 128, 129])
def test_blocks_allocated_across_boundaries(n: int) -> None:
    cache = _cache()
    cache.add_sequence(0)
    slots = cache.reserve(0, n)
    blocks = -(-n // BS)
    assert slots.dtype == torch.int64 and slots.shape == (n,)
    assert cache.num_used_blocks == blocks
    assert cache.num_free_blocks == 8 - blocks
    assert cache.seq_len(0) == n
    assert cache.block_table([0]).shape == (1, blocks)
    assert slots.unique().numel() == n


@pytest.mark.parametrize(
    "chunks",
    [[63, 1, 1], [64, 1], [1] * 70, [0, 65, 0], [100, 28, 1]],
    ids=["63+1+1", "64+1", "70x1", "0+65+0", "100+28+1"],
)
def test_incremental_reserve_allocates_only_when_a_block_fills(chunks: list[int]) -> None:
    cache = _cache()
    cache.add_sequence("s")
    total = 0
    for c in chunks:
        cache.reserve("s", c)
        total += c
        assert cache.num_used_blocks == -(-total // BS)
    assert cache.seq_len("s") == total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("n", [63, 64, 65])
def test_write_then_read_back_through_block_table(n: int, dtype: torch.dtype) -> None:
    cache = _cache(dtype=dtype)
    cache.add_sequence(7)
    first = cache.reserve(7, n - 5)
    rest = cache.reserve(7, 5)
    written = {}
    for layer in range(cache.num_layers):
        e = _entries(n, seed=layer, dtype=dtype)
        cache.write(layer, first, e[: n - 5])
        cache.write(layer, rest, e[n - 5 :])
        written[layer] = e
    for layer, e in written.items():
        got = _read_back(cache, layer, 7)
        assert torch.equal(got.view(torch.uint8), e.view(torch.uint8)) if dtype.itemsize == 1 else torch.equal(got, e)


def test_write_accepts_int32_slots() -> None:
    cache = _cache()
    cache.add_sequence(0)
    slots = cache.reserve(0, 10)
    e = _entries(10, seed=0)
    cache.write(0, slots.int(), e)
    assert torch.equal(_read_back(cache, 0, 0), e)


def test_interleaved_sequences_never_share_a_block() -> None:
    cache = _cache(num_blocks=16)
    for s in ("a", "b", "c"):
        cache.add_sequence(s)
    expected: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "c": []}
    for step, (s, n) in enumerate([("a", 30), ("b", 70), ("a", 40), ("c", 1), ("b", 64), ("a", 1), ("c", 63)]):
        slots = cache.reserve(s, n)
        e = _entries(n, seed=step)
        cache.write(0, slots, e)
        expected[s].append(e)
    tables = {s: cache.block_table([s])[0].tolist() for s in expected}
    owned = [b for t in tables.values() for b in t]
    assert len(owned) == len(set(owned)) == cache.num_used_blocks
    for s, parts in expected.items():
        assert torch.equal(_read_back(cache, 0, s), torch.cat(parts))


def test_batch_block_table_and_seqlens() -> None:
    cache = _cache()
    cache.add_sequence("long")
    cache.add_sequence("short")
    cache.add_sequence("empty")
    cache.reserve("long", 130)
    cache.reserve("short", 3)
    ids = ["short", "long", "empty"]
    table = cache.block_table(ids)
    assert table.dtype == torch.int32 and table.shape == (3, 3)
    assert table[0, 1:].tolist() == [0, 0] and table[2].tolist() == [0, 0, 0]  # zero padding
    lens = cache.seqlens(ids)
    assert lens.dtype == torch.int32 and lens.tolist() == [3, 130, 0]
    assert cache.block_table([]).shape == (0, 0)


def test_free_then_reuse() -> None:
    cache = _cache(num_blocks=4)
    cache.add_sequence(1)
    cache.reserve(1, 4 * BS)
    assert cache.num_free_blocks == 0
    blocks = set(cache.block_table([1])[0].tolist())
    cache.free(1)
    assert 1 not in cache
    assert cache.num_free_blocks == 4 and cache.num_used_blocks == 0
    cache.add_sequence(1)  # the id may be reused once freed
    cache.add_sequence(2)
    cache.reserve(1, 2 * BS)
    cache.reserve(2, 2 * BS)
    assert set(cache.block_table([1, 2]).flatten().tolist()) == blocks
    assert cache.num_free_blocks == 0


def test_exhaustion_raises_and_changes_nothing() -> None:
    cache = _cache(num_blocks=3)
    cache.add_sequence("a")
    cache.add_sequence("b")
    slots = cache.reserve("a", 100)  # 2 blocks
    e = _entries(100, seed=3)
    cache.write(0, slots, e)
    before = (cache.num_used_blocks, cache.num_free_blocks, cache.seq_len("a"), cache.block_table(["a"]).clone())
    storage = cache.layer(0).clone()

    with pytest.raises(KVCacheExhaustedError, match=r"'b' needs 2 more block.*only 1 of 3 are free"):
        cache.reserve("b", 65)
    with pytest.raises(KVCacheExhaustedError, match=r"'a' needs 2 more block.*only 1 of 3"):
        cache.reserve("a", 29 + BS + 1)  # fills a's 2nd block, then needs a 3rd and a 4th

    assert cache.seq_len("b") == 0 and cache.block_table(["b"]).shape == (1, 0)
    after = (cache.num_used_blocks, cache.num_free_blocks, cache.seq_len("a"), cache.block_table(["a"]))
    assert after[:3] == before[:3] and torch.equal(after[3], before[3])
    assert torch.equal(cache.layer(0), storage)
    assert torch.equal(_read_back(cache, 0, "a"), e)
    # What fits still works after a refusal.
    assert cache.reserve("b", BS).shape == (BS,)
    assert cache.num_free_blocks == 0
    assert isinstance(KVCacheExhaustedError("x"), KVCacheError)


def test_reserve_zero_tokens_allocates_nothing() -> None:
    cache = _cache()
    cache.add_sequence(0)
    assert cache.reserve(0, 0).shape == (0,)
    assert cache.num_used_blocks == 0


_Z = torch.zeros
_I64 = torch.int64


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(lambda c: c.add_sequence("x"), r"sequence 'x' already exists", id="duplicate-add"),
        pytest.param(lambda c: c.reserve("nope", 1), r"unknown sequence 'nope'", id="reserve-unknown"),
        pytest.param(lambda c: c.free("nope"), r"unknown sequence 'nope'", id="free-unknown"),
        pytest.param(lambda c: c.seq_len("nope"), r"unknown sequence 'nope'", id="seq_len-unknown"),
        pytest.param(lambda c: c.block_table(["x", "nope"]), r"unknown sequence 'nope'", id="block_table-unknown"),
        pytest.param(lambda c: c.seqlens(["nope"]), r"unknown sequence 'nope'", id="seqlens-unknown"),
        pytest.param(
            lambda c: c.reserve("x", -1),
            r"sequence 'x': num_new_tokens must be a non-negative int, got -1",
            id="negative",
        ),
        pytest.param(lambda c: c.reserve("x", 1.5), r"non-negative int, got 1.5", id="non-int-count"),
        pytest.param(lambda c: c.add_sequence([1]), r"must be hashable", id="unhashable-id"),
        pytest.param(lambda c: c.layer(2), r"layer must be an int in \[0, 2\), got 2", id="layer-range"),
        pytest.param(lambda c: c.write(-1, _Z(1, dtype=_I64), _Z(1, D)), r"layer must be", id="write-layer"),
        pytest.param(lambda c: c.write(0, _Z(2, dtype=_I64), _Z(3, D)), r"entries must be \[2, 8\]", id="entries-rows"),
        pytest.param(
            lambda c: c.write(0, _Z(2, dtype=_I64), _Z(2, D + 1)), r"entries must be \[2, 8\]", id="entries-dim"
        ),
        pytest.param(
            lambda c: c.write(0, _Z(2), _Z(2, D)), r"slots must be an int64 \| int32 tensor", id="slots-dtype"
        ),
        pytest.param(lambda c: c.write(0, _Z(2, 1, dtype=_I64), _Z(2, D)), r"slots must be", id="slots-rank"),
        pytest.param(
            lambda c: c.write(0, _Z(2, dtype=_I64), _Z(2, D, dtype=torch.bfloat16)),
            r"entries must be torch.float32 \(the cache's dtype\), got torch.bfloat16",
            id="entries-dtype",
        ),
        pytest.param(
            lambda c: c.write(0, torch.tensor([0, 8 * BS]), _Z(2, D)),
            r"slots must lie in \[0, 512\), got values in \[0, 512\]",
            id="slot-past-end",
        ),
        pytest.param(lambda c: c.write(0, torch.tensor([-1]), _Z(1, D)), r"slots must lie in", id="slot-negative"),
        pytest.param(
            lambda c: c.write(0, torch.tensor([0], device="meta"), _Z(1, D)), r"slots is on meta", id="slots-device"
        ),
    ],
)
def test_misuse_is_a_named_error(call: Callable[[PagedKVCache], object], match: str) -> None:
    cache = _cache()
    cache.add_sequence("x")
    storage = cache.layer(0).clone()
    with pytest.raises(KVCacheError, match=match):
        call(cache)
    assert torch.equal(cache.layer(0), storage)
    assert cache.num_used_blocks == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_layers": 0},
        {"num_blocks": -1},
        {"entry_dim": 1.0},
        {"block_size": 0},
        {"num_layers": True},
        {"dtype": "bfloat16"},
    ],
    ids=str,
)
def test_bad_construction_is_a_named_error(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"num_layers": 1, "num_blocks": 1, "entry_dim": D, **kwargs}
    with pytest.raises(KVCacheError, match=next(iter(kwargs))):
        PagedKVCache(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("num_blocks", "reason"), [(2**40, "can't allocate"), (2**60, "overflow")])
def test_a_cache_too_big_to_allocate_is_a_named_error(num_blocks: int, reason: str) -> None:
    # 64 PiB (past any address space: malloc fails whatever the overcommit policy) and a size past int64.
    with pytest.raises(KVCacheError, match=rf"cannot allocate [\d,.]+ GiB on cpu for {num_blocks} blocks.*{reason}"):
        PagedKVCache(1, num_blocks, 512, dtype=torch.float16)


def test_custom_block_size_and_repr() -> None:
    cache = PagedKVCache(1, 4, D, block_size=16, dtype=torch.float32)
    cache.add_sequence(0)
    slots = cache.reserve(0, 17)
    assert cache.num_used_blocks == 2
    assert slots.tolist() == list(range(17))  # blocks 0 and 1, handed out in order
    assert "num_blocks=4" in repr(cache) and "used_blocks=2" in repr(cache)
