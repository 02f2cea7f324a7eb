"""Reference attention: absorbed MLA decode over the paged latent cache, and varlen prefill.

Both compute scores and softmax in fp32 and return q's dtype. ``mla_decode`` gathers every
sequence's pages into one batch, zero-padded and masked where lengths differ (decode runs once per
token, so it must not loop in Python); ``attention_prefill`` loops over sequences, the plainest statement of the
variable-length contract. They read ``cu_seqlens_*`` and lengths on the host: a reference may
synchronize.
Contracts: :func:`hal.ops.catalogue.mla_decode`, :func:`hal.ops.catalogue.attention_prefill`.
"""

from __future__ import annotations

import torch

__all__ = ["attention_prefill", "mla_decode"]


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the visible keys, in place.

    :param scores: float32 [..., Lq, Lk], already scaled; overwritten by the probabilities.
    :param visible: bool, broadcastable to scores (e.g. [Lq, Lk]), True where a query may see a key;
        ``None`` when every query sees every key.
    :returns: ``(probs, lse float32 [..., Lq])``; a query that sees no key gets zero probabilities
        and ``lse = -inf`` (a plain softmax would give NaN there).
    """
    if visible is None:
        lse = torch.logsumexp(scores, dim=-1)
        return scores.sub_(lse.unsqueeze(-1)).exp_(), lse
    scores.masked_fill_(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows with no visible key
    # Subtracting 0 instead of -inf on those rows leaves exp(-inf) = 0 on each of their keys.
    probs = scores.sub_(torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1)).exp_()
    return probs, lse


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    head_dim_v: int,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode over the paged latent KV cache (FlashMLA semantics).

    :param q: [b, s_q, h, d].
    :param kv_cache: q's dtype, [num_blocks, block_size, 1, d]; keys are whole entries, values their
        first ``head_dim_v`` values.
    :param block_table: int32 [b, max_blocks_per_seq].
    :param cache_seqlens: int32 [b], tokens per sequence including the s_q new ones.
    :param head_dim_v: value dims, ``<= d``.
    :param softmax_scale: ``None`` means ``d ** -0.5``.
    :param causal: query ``i`` sees keys ``< cache_seqlens - s_q + i + 1``; else all keys.
    :returns: ``(out q's dtype [b, s_q, h, head_dim_v], lse float32 [b, h, s_q])``; zero output and
        ``lse = -inf`` for a query that sees no key.
    """
    b, s_q, h, d = q.shape
    block_size = kv_cache.shape[1]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    seqlens = cache_seqlens.long()
    shortest, longest = (int(v) for v in torch.aminmax(seqlens)) if b else (0, 0)
    length = max(longest, 1)  # keys per sequence: the longest sequence's, the others padded
    n_blocks = -(-length // block_size)
    # Each sequence's pages in table order, cut at `length`. Table entries past a sequence's length may
    # hold anything (even invalid ids), and so may cache rows past it: when a sequence is shorter than
    # `length` (ragged), its unused entries become block 0 before gathering and its padded keys are
    # zeroed (0 * NaN would leak into the sum) and masked. Sequences all of one length need neither.
    ragged = shortest < length
    table = block_table[:, :n_blocks].long()
    if ragged:
        pos = torch.arange(n_blocks * block_size, device=q.device)
        valid = pos < seqlens.unsqueeze(1)  # [b, n_blocks * block_size]
        table = torch.where(valid[:, ::block_size], table, 0)  # a block is used when its first row is
    keys = kv_cache[:, :, 0][table].reshape(b, n_blocks * block_size, d)[:, :length].float()  # a gathered copy
    if ragged:
        keys.masked_fill_(~valid[:, :length, None], 0.0)
    # Every (query, head) pair of a sequence is one row: [b, s_q * h, d] against the single latent head,
    # so scores and the value sum are each one batched matmul (no per-head copy of the keys).
    scores = torch.bmm(q.float().reshape(b, s_q * h, d), keys.transpose(1, 2)).mul_(scale)  # [b, s_q * h, L]
    # Query i of s_q sees keys < seqlen - s_q + i + 1 (causal) or < seqlen; every head alike.
    visible = None
    if causal and s_q > 1:
        limit = seqlens.view(b, 1) - (s_q - 1 - torch.arange(s_q, device=q.device))  # [b, s_q]
        visible = (torch.arange(length, device=q.device) < limit.unsqueeze(-1)).unsqueeze(2)  # [b, s_q, 1, L]
    elif ragged:
        visible = valid[:, :length].view(b, 1, 1, length)
    probs, lse = _masked_softmax(scores.view(b, s_q, h, length), visible)
    out = torch.bmm(probs.view(b, s_q * h, length), keys[..., :head_dim_v])  # [b, s_q * h, d_v]
    return out.view(b, s_q, h, head_dim_v).to(q.dtype), lse.transpose(1, 2)  # lse [b, h, s_q]


def attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Variable-length attention over packed sequences (FlashAttention's varlen layout).

    :param q: [total_q, h, d_qk].
    :param k: q's dtype, [total_k, h_kv, d_qk]; query head ``i`` uses kv head ``i // (h / h_kv)``.
    :param v: q's dtype, [total_k, h_kv, d_v].
    :param cu_seqlens_q: int32 [b + 1], cumulative query lengths.
    :param cu_seqlens_k: int32 [b + 1], cumulative key lengths.
    :param softmax_scale: ``None`` means ``d_qk ** -0.5``.
    :param causal: bottom-right aligned: query ``i`` of ``Lq`` sees keys ``j <= i + Lk - Lq``.
    :returns: q's dtype [total_q, h, d_v]; zeros for a query that sees no key.
    """
    total_q, h, d_qk = q.shape
    h_kv, d_v = v.shape[1], v.shape[2]
    group = h // h_kv
    scale = d_qk**-0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(total_q, h, d_v, dtype=torch.float32, device=q.device)
    starts_q = cu_seqlens_q.tolist()
    starts_k = cu_seqlens_k.tolist()
    for s in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[s], starts_q[s + 1], starts_k[s], starts_k[s + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq <= 0:
            continue
        qs = q[q0:q1].float().transpose(0, 1)  # [h, Lq, d_qk]
        # GQA: kv head g serves query heads g * group .. (g + 1) * group - 1.
        ks = k[k0:k1].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [h, Lk, d_qk]
        vs = v[k0:k1].float().repeat_interleave(group, dim=1).transpose(0, 1)  # [h, Lk, d_v]
        scores = (qs @ ks.transpose(1, 2)) * scale  # [h, Lq, Lk]
        if causal:
            rows = torch.arange(lq, device=q.device).unsqueeze(1)
            cols = torch.arange(lk, device=q.device).unsqueeze(0)
            visible = cols <= rows + (lk - lq)
        else:
            visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        probs, _ = _masked_softmax(scores, visible)
        out[q0:q1] = (probs @ vs).transpose(0, 1)
    return out.to(q.dtype)
