"""hal_kernels.mla_decode against hal_cpu.reference.attention.mla_decode under the interpreter.

Kernel and oracle do the same fp32 math on the same inputs (the kernel upcasts right after each load
when interpreting); they differ in summation order, in exp2 with a folded log2(e) against exp, and in
the split-K merge (measured: at most 5e-7 absolute on outputs of magnitude ~1). Tolerances by dtype
(``TOL``): fp32 1e-5 (DESIGN.md's bound, an order of magnitude of margin); bf16 and fp16 one ulp of
the output type (2^-7, 2^-10 relative): the interpreter's fp32 -> bf16 store truncates where torch
rounds to nearest, so one ulp apart is the best agreement possible. ``lse`` is fp32 in every case.
Unused cache rows and table entries hold NaN / wild ids, so a read past a sequence fails the test;
outputs and the split scratch are poisoned (conftest), so an element never written fails too.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import pytest
import torch

from hal.errors import DTypeError, LayoutError, OpInputError
from hal.kvcache import PagedKVCache
from hal_kernels import _common, mla_decode
from tests.kernels.conftest import reference

MLA_DECODE = reference(mla_decode, "mla_decode")

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
}
LSE_TOL = {"rtol": 1e-5, "atol": 1e-5}
#: small interpreter tiles: fewer masked lanes to emulate (BLOCK_N 16 exercises several steps per page).
SMALL = {"BLOCK_H": 16, "BLOCK_N": 16}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _paged(
    lens: list[int], d: int, page: int, dtype: torch.dtype, gen: torch.Generator, slack: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A cache holding ``lens`` tokens per sequence in shuffled pages; everything unused is NaN and
    table entries past a sequence are ids far out of range (the contract says they are not read)."""
    need = [-(-n // page) for n in lens]
    width = max([*need, 1]) + 1
    num_blocks = sum(need) + slack
    kv = torch.full((num_blocks, page, 1, d), float("nan"), dtype=dtype)
    table = torch.full((len(lens), width), 1 << 30, dtype=torch.int32)
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    for s, n in enumerate(lens):
        for j in range(need[s]):
            blk = ids.pop()
            table[s, j] = blk
            rows = min(page, n - j * page)
            kv[blk, :rows] = torch.randn(rows, 1, d, generator=gen).to(dtype)
    return kv, table, torch.tensor(lens, dtype=torch.int32)


@dataclass(frozen=True)
class Case:
    lens: tuple[int, ...]
    s_q: int
    h: int
    d: int
    dv: int
    page: int = 64
    causal: bool = False
    splits: int = 1
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (
            f"L{'.'.join(map(str, self.lens))}-sq{self.s_q}-h{self.h}-d{self.d}-dv{self.dv}-p{self.page}"
            f"-{'causal' if self.causal else 'full'}-k{self.splits}-{dt}"
        )


CASES = [
    # DeepSeek-V3 dims (576 = 512 + 64, page 64): lengths crossing a page, length 1; one split and several.
    Case((65, 1), 1, 16, 576, 512, splits=1, dtype=torch.bfloat16),
    Case((130, 7), 1, 16, 576, 512, splits=3, dtype=torch.bfloat16),
    # The tiny model's dims (128 + 32), ragged lengths including an empty sequence, fp32 and fp16.
    Case((0, 1, 64, 129), 1, 4, 160, 128, splits=2),
    Case((0, 1, 64, 129), 1, 4, 160, 128, splits=1, dtype=torch.float16),
    # Non-power-of-two dims everywhere (d 40 = 24 + 16, 3 heads), a 16-token page, causal s_q = 3 with a
    # sequence shorter than s_q (its first queries see no key: -inf and zeros), more splits than steps.
    Case((17, 2, 33, 5), 3, 3, 40, 24, page=16, causal=True, splits=4),
    Case((17, 2, 33, 5), 3, 3, 40, 24, page=16, causal=False, splits=1, dtype=torch.bfloat16),
    # The parity test's dims (16 + 8): s_q * h rows spanning several row tiles, causal, splits 2.
    Case((70, 1, 2), 2, 12, 24, 16, causal=True, splits=2),
    # Values are the whole entry (no rope part), and 8 splits of a 5-token sequence (most are empty).
    Case((5, 100), 1, 2, 32, 32, page=32, splits=8),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_mla_decode(case: Case) -> None:
    gen = _gen(zlib.crc32(str(case).encode()))
    kv, table, seqlens = _paged(list(case.lens), case.d, case.page, case.dtype, gen)
    q = torch.randn(len(case.lens), case.s_q, case.h, case.d, generator=gen).to(case.dtype)
    kwargs = {"head_dim_v": case.dv, "causal": case.causal}
    out, lse = mla_decode.mla_decode(q, kv, table, seqlens, **kwargs, config={**SMALL, "num_splits": case.splits})
    want_out, want_lse = MLA_DECODE(q, kv, table, seqlens, **kwargs)
    assert out.dtype == case.dtype and out.shape == (len(case.lens), case.s_q, case.h, case.dv)
    assert lse.dtype == torch.float32 and lse.shape == (len(case.lens), case.h, case.s_q)
    torch.testing.assert_close(out, want_out, **TOL[case.dtype])
    # -inf (no key seen) must match exactly; assert_close treats equal infinities as equal.
    torch.testing.assert_close(lse, want_lse, **LSE_TOL)


def test_mla_decode_default_config_scale_and_strided_q() -> None:
    """The default config (automatic splits, 16 x 32 tiles), an explicit softmax scale, and q a view
    with strides (the last dim contiguous, as the launcher requires)."""
    gen = _gen(7)
    kv, table, seqlens = _paged([300, 64, 3], 48, 64, torch.float32, gen)
    q = torch.randn(3, 2, 5, 56, generator=gen)[..., 4:52]
    kwargs = {"head_dim_v": 32, "softmax_scale": 0.3, "causal": True}
    out, lse = mla_decode.mla_decode(q, kv, table, seqlens, **kwargs)
    want_out, want_lse = MLA_DECODE(q, kv, table, seqlens, **kwargs)
    torch.testing.assert_close(out, want_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, want_lse, **LSE_TOL)


def test_mla_decode_reads_the_paged_kv_cache() -> None:
    """Through hal.kvcache.PagedKVCache, as the model calls it: its layout, table and lengths."""
    gen = _gen(11)
    cache = PagedKVCache(num_layers=1, num_blocks=8, entry_dim=40, dtype=torch.float32)
    for name, n in (("a", 70), ("b", 1), ("c", 128)):
        cache.add_sequence(name)
        cache.write(0, cache.reserve(name, n), torch.randn(n, 40, generator=gen))
    table, seqlens = cache.block_table(["a", "b", "c"]), cache.seqlens(["a", "b", "c"])
    q = torch.randn(3, 1, 4, 40, generator=gen)
    got = mla_decode.mla_decode(q, cache.layer(0), table, seqlens, head_dim_v=32, config={"num_splits": 2})
    want = MLA_DECODE(q, cache.layer(0), table, seqlens, head_dim_v=32)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_mla_decode_strided_seqlens() -> None:
    """Lengths given as a strided view are read by value (the kernel reads them without a stride: it
    used to read the memory behind the view, here 64 keys for the second sequence instead of 20, and
    with a larger value there, past the cache)."""
    gen = _gen(12)
    kv = torch.randn(8, 16, 1, 32, generator=gen)
    table = torch.arange(8, dtype=torch.int32).reshape(2, 4)
    q = torch.randn(2, 1, 2, 32, generator=gen)
    seqlens = torch.tensor([40, 64, 20, 64], dtype=torch.int32)[::2]
    got = mla_decode.mla_decode(q, kv, table, seqlens, head_dim_v=16)
    want = MLA_DECODE(q, kv, table, seqlens, head_dim_v=16)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_mla_decode_empty_batch() -> None:
    kv = torch.zeros(2, 64, 1, 24)
    out, lse = mla_decode.mla_decode(
        torch.zeros(0, 1, 4, 24), kv, torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
        head_dim_v=16,
    )  # fmt: skip
    assert out.shape == (0, 1, 4, 16) and lse.shape == (0, 4, 1)


# ---------------------------------------------------------------------------------------------------
# Launcher errors
# ---------------------------------------------------------------------------------------------------


def _args(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    q = torch.zeros(1, 1, 2, 24, dtype=dtype)
    kv = torch.zeros(1, 64, 1, 24, dtype=dtype)
    return q, kv, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"BLOCK_K": 16}, "unknown keys"),
        ({"BLOCK_H": 24}, "BLOCK_H must be a power of two >= 16"),
        ({"BLOCK_N": 8}, "BLOCK_N must be a power of two >= 16"),
        ({"num_splits": -1}, "num_splits"),
    ],
)
def test_mla_decode_rejects_bad_config(config: dict[str, int], match: str) -> None:
    with pytest.raises(OpInputError, match=match) as info:
        mla_decode.mla_decode(*_args(), head_dim_v=16, config=config)
    assert info.value.op == "mla_decode" and info.value.arg == "config"


def test_mla_decode_rejects_what_the_kernel_cannot_read(monkeypatch: pytest.MonkeyPatch) -> None:
    q, kv, table, seqlens = _args()
    with pytest.raises(LayoutError, match="q: the last dim must be contiguous"):
        mla_decode.mla_decode(q.transpose(2, 3).contiguous().transpose(2, 3), kv, table, seqlens, head_dim_v=16)
    with pytest.raises(LayoutError, match="kv_cache: the last dim must be contiguous"):
        mla_decode.mla_decode(q, kv.transpose(1, 3).contiguous().transpose(1, 3), table, seqlens, head_dim_v=16)
    with pytest.raises(DTypeError, match=re.escape("q: expected float32 | bfloat16 | float16, got torch.float64")):
        mla_decode.mla_decode(*_args(torch.float64), head_dim_v=16)
    monkeypatch.setattr(_common, "INTERPRETING", False)
    with pytest.raises(OpInputError, match="q: is on the CPU"):
        mla_decode.mla_decode(q, kv, table, seqlens, head_dim_v=16)
