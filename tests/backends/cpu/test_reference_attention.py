"""The reference attention ops against independent float64 oracles.

``mla_decode`` is checked against a per-sequence, per-head, per-query softmax over a contiguous copy of
each sequence's keys; the paged cache is built from those keys with a shuffled block assignment, NaN in
the unused page rows and ``-1`` in unused block-table slots, so a paging bug cannot go unnoticed, for
ragged batches (padded and masked) and batches of one length (neither).
``attention_prefill`` is checked against ``torch.nn.functional.scaled_dot_product_attention`` run per
sequence in float64 with an explicit bottom-right boolean mask.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from hal_cpu.reference.attention import attention_prefill, mla_decode

BLOCK_SIZE = 64
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------
# mla_decode
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeCase:
    seqlens: tuple[int, ...]
    s_q: int
    h: int
    d: int
    dv: int
    causal: bool
    dtype: torch.dtype = torch.float32
    softmax_scale: float | None = None

    @property
    def id(self) -> str:
        mask = "causal" if self.causal else "full"
        scale = "" if self.softmax_scale is None else f"-scale{self.softmax_scale}"
        dtype = str(self.dtype).removeprefix("torch.")
        return f"B{len(self.seqlens)}-SQ{self.s_q}-H{self.h}-D{self.d}-DV{self.dv}-{mask}-{dtype}{scale}"


RAGGED = (1, 63, 64, 65, 200)
DECODE_CASES = [
    DecodeCase(RAGGED, s_q=1, h=16, d=576, dv=512, causal=False),
    DecodeCase(RAGGED, s_q=1, h=16, d=576, dv=512, causal=True),
    DecodeCase(RAGGED, s_q=2, h=16, d=576, dv=512, causal=True),
    DecodeCase(RAGGED, s_q=2, h=16, d=576, dv=512, causal=True, dtype=torch.bfloat16),
    DecodeCase(RAGGED, s_q=2, h=4, d=96, dv=64, causal=False),
    # A zero-length sequence, and seqlen 1 with s_q 2 causal: query 0 sees no key.
    DecodeCase((0, 1, 65, 130), s_q=2, h=4, d=96, dv=64, causal=True),
    DecodeCase((0, 1, 65, 130), s_q=2, h=4, d=96, dv=64, causal=False),
    DecodeCase((3, 64, 129), s_q=3, h=2, d=96, dv=64, causal=True, softmax_scale=0.05),
    # Sequences all of one length take the unmasked path: the NaN rows past them must stay unread.
    DecodeCase((65,), s_q=1, h=16, d=576, dv=512, causal=False),
    DecodeCase((130, 130), s_q=1, h=4, d=96, dv=64, causal=True),
    DecodeCase((130, 130), s_q=2, h=4, d=96, dv=64, causal=True, dtype=torch.bfloat16),
    DecodeCase((64, 64, 64), s_q=3, h=2, d=96, dv=64, causal=False),
]


def _paged_cache(
    keys: list[torch.Tensor], d: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter contiguous per-sequence keys ``[L, d]`` into pages in a shuffled block order.

    :returns: ``(kv_cache [num_blocks, 64, 1, d], block_table int32 [b, max_blocks])``; rows past a
        sequence's end hold NaN, table slots past it hold -1, and spare blocks are never referenced.
    """
    need = [math.ceil(k.shape[0] / BLOCK_SIZE) for k in keys]
    num_blocks = sum(need) + 3  # spare blocks that no sequence owns
    cache = torch.full((num_blocks, BLOCK_SIZE, 1, d), float("nan"), dtype=dtype)
    cache[-3:] = torch.randn(3, BLOCK_SIZE, 1, d, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(keys), max([*need, 1]) + 1), -1, dtype=torch.int32)
    for s, k in enumerate(keys):
        for p in range(need[s]):
            block = perm.pop()
            table[s, p] = block
            chunk = k[p * BLOCK_SIZE : (p + 1) * BLOCK_SIZE]
            cache[block, : chunk.shape[0], 0] = chunk
    return cache, table


def _decode_oracle(
    q: torch.Tensor, keys: list[torch.Tensor], dv: int, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention, one sequence, head and query at a time, over un-paged keys."""
    b, s_q, h, _ = q.shape
    out = torch.zeros(b, s_q, h, dv, dtype=torch.float64)
    lse = torch.full((b, h, s_q), float("-inf"), dtype=torch.float64)
    for s in range(b):
        seqlen = keys[s].shape[0]
        kk = keys[s].double()
        for i in range(s_q):
            seen = seqlen - s_q + i + 1 if causal else seqlen
            if seen <= 0:
                continue
            kv = kk[:seen]
            for head in range(h):
                scores = [float(x) for x in kv @ q[s, i, head].double() * scale]
                m = max(scores)
                exps = [math.exp(x - m) for x in scores]
                total = sum(exps)
                lse[s, head, i] = m + math.log(total)
                probs = torch.tensor([x / total for x in exps], dtype=torch.float64)
                out[s, i, head] = probs @ kv[:, :dv]
    return out, lse


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.id)
def test_mla_decode_matches_unpaged_oracle(case: DecodeCase) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    b = len(case.seqlens)
    keys = [torch.randn(n, case.d, generator=gen).to(case.dtype) for n in case.seqlens]
    q = torch.randn(b, case.s_q, case.h, case.d, generator=gen).to(case.dtype)
    cache, table = _paged_cache(keys, case.d, case.dtype, gen)
    seqlens = torch.tensor(case.seqlens, dtype=torch.int32)

    out, lse = mla_decode(
        q, cache, table, seqlens, head_dim_v=case.dv, softmax_scale=case.softmax_scale, causal=case.causal
    )

    scale = case.d**-0.5 if case.softmax_scale is None else case.softmax_scale
    want_out, want_lse = _decode_oracle(q, keys, case.dv, scale, case.causal)
    assert out.shape == (b, case.s_q, case.h, case.dv) and out.dtype == case.dtype
    assert lse.shape == (b, case.h, case.s_q) and lse.dtype == torch.float32
    assert not out.isnan().any()
    assert _rel_err(out, want_out) <= TOL[case.dtype]
    blind = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse), blind) and (lse[blind] < 0).all()
    assert (out.permute(0, 2, 1, 3)[blind] == 0).all()  # no key seen: zero output
    if (~blind).any():
        torch.testing.assert_close(lse[~blind].double(), want_lse[~blind], rtol=1e-5, atol=1e-5)


def test_mla_decode_causal_equals_full_for_one_query() -> None:
    gen = torch.Generator().manual_seed(0)
    keys = [torch.randn(n, 96, generator=gen) for n in (5, 70)]
    cache, table = _paged_cache(keys, 96, torch.float32, gen)
    q = torch.randn(2, 1, 3, 96, generator=gen)
    seqlens = torch.tensor([5, 70], dtype=torch.int32)
    causal = mla_decode(q, cache, table, seqlens, head_dim_v=64, causal=True)
    full = mla_decode(q, cache, table, seqlens, head_dim_v=64, causal=False)
    assert torch.equal(causal[0], full[0]) and torch.equal(causal[1], full[1])


# ---------------------------------------------------------------------------------------------------
# attention_prefill
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillCase:
    lens: tuple[tuple[int, int], ...]  # (Lq, Lk) per sequence
    h: int
    h_kv: int
    d_qk: int
    d_v: int
    causal: bool = True
    dtype: torch.dtype = torch.float32
    softmax_scale: float | None = None

    @property
    def id(self) -> str:
        lq = "_".join(str(q) for q, _ in self.lens)
        lk = "_".join(str(k) for _, k in self.lens)
        mask = "causal" if self.causal else "full"
        scale = "" if self.softmax_scale is None else f"-scale{self.softmax_scale}"
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"B{len(self.lens)}-LQ{lq}-LK{lk}-H{self.h}-HKV{self.h_kv}-D{self.d_qk}-DV{self.d_v}-{mask}-{dtype}{scale}"
        )


PREFILL_CASES = [
    PrefillCase(((5, 5), (17, 17), (1, 1)), h=4, h_kv=4, d_qk=192, d_v=128),
    PrefillCase(((3, 10), (8, 40), (1, 64)), h=8, h_kv=2, d_qk=192, d_v=128),  # chunked prefill, GQA
    PrefillCase(((0, 0), (4, 4), (0, 7), (6, 6)), h=4, h_kv=1, d_qk=64, d_v=32),  # empty sequences
    PrefillCase(((6, 3), (2, 0), (4, 9)), h=2, h_kv=2, d_qk=32, d_v=48),  # Lq > Lk: early queries see nothing
    PrefillCase(((3, 10), (7, 5)), h=6, h_kv=3, d_qk=64, d_v=32, causal=False),
    PrefillCase(((3, 10), (33, 33)), h=8, h_kv=2, d_qk=192, d_v=128, dtype=torch.bfloat16),
    PrefillCase(((9, 12),), h=2, h_kv=1, d_qk=32, d_v=16, softmax_scale=0.3),
]


def _prefill_oracle(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: PrefillCase, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence float64 SDPA with an explicit bottom-right mask.

    :returns: ``(out float64 [total_q, h, d_v], blind bool [total_q])``, ``blind`` marking the queries
        that see no key (their expected output is zero).
    """
    out = torch.zeros(q.shape[0], case.h, case.d_v, dtype=torch.float64)
    blind = torch.ones(q.shape[0], dtype=torch.bool)
    q0 = k0 = 0
    for lq, lk in case.lens:
        if lq and lk:
            qs = q[q0 : q0 + lq].double().transpose(0, 1)
            ks = k[k0 : k0 + lk].double().repeat_interleave(case.h // case.h_kv, dim=1).transpose(0, 1)
            vs = v[k0 : k0 + lk].double().repeat_interleave(case.h // case.h_kv, dim=1).transpose(0, 1)
            i = torch.arange(lq).unsqueeze(1)
            j = torch.arange(lk).unsqueeze(0)
            mask = j <= i + lk - lq if case.causal else torch.ones(lq, lk, dtype=torch.bool)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1)
            sees = mask.any(-1)
            out[q0 : q0 + lq] = torch.where(sees[:, None, None], o, 0.0)
            blind[q0 : q0 + lq] = ~sees
        q0, k0 = q0 + lq, k0 + lk
    return out, blind


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: c.id)
def test_attention_prefill_matches_sdpa(case: PrefillCase) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    total_q = sum(lq for lq, _ in case.lens)
    total_k = sum(lk for _, lk in case.lens)
    q = torch.randn(total_q, case.h, case.d_qk, generator=gen).to(case.dtype)
    k = torch.randn(total_k, case.h_kv, case.d_qk, generator=gen).to(case.dtype)
    v = torch.randn(total_k, case.h_kv, case.d_v, generator=gen).to(case.dtype)
    cu_q = torch.tensor([0, *torch.tensor([lq for lq, _ in case.lens]).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor([lk for _, lk in case.lens]).cumsum(0).tolist()], dtype=torch.int32)

    out = attention_prefill(q, k, v, cu_q, cu_k, softmax_scale=case.softmax_scale, causal=case.causal)

    scale = case.d_qk**-0.5 if case.softmax_scale is None else case.softmax_scale
    want, blind = _prefill_oracle(q, k, v, case, scale)
    assert out.shape == (total_q, case.h, case.d_v) and out.dtype == case.dtype
    assert not out.isnan().any()
    assert _rel_err(out, want) <= TOL[case.dtype]
    assert (out[blind] == 0).all()


def test_attention_prefill_gqa_head_mapping() -> None:
    """Query head i reads kv head i // (h / h_kv): with one-hot values, the output names the kv head."""
    h, h_kv, lq = 6, 3, 4
    q = torch.randn(lq, h, 16)
    k = torch.randn(lq, h_kv, 16)
    v = torch.zeros(lq, h_kv, h_kv)
    for g in range(h_kv):
        v[:, g, g] = 1.0
    cu = torch.tensor([0, lq], dtype=torch.int32)
    out = attention_prefill(q, k, v, cu, cu)
    for head in range(h):
        expected = torch.zeros(h_kv)
        expected[head // (h // h_kv)] = 1.0
        torch.testing.assert_close(out[:, head], expected.expand(lq, h_kv))
