"""Reference MoE token handling: DeepSeek routing, and the permute / unpermute around ``grouped_gemm``.

Routing follows DeepSeek-V3's own inference code (``Gate`` in ``inference/model.py``) and transformers'
``DeepseekV3TopkRouter``, in fp32. Permute produces DeepGEMM's contiguous layout (token copies sorted
by expert, with offsets); unpermute is its weighted inverse with fp32 accumulation.
Contracts: :func:`hal.ops.catalogue.moe_route`, :func:`~hal.ops.catalogue.moe_permute`,
:func:`~hal.ops.catalogue.moe_unpermute`.
"""

from __future__ import annotations

import torch

from hal.types import Permutation, RouteResult

__all__ = ["moe_permute", "moe_route", "moe_unpermute"]


def moe_route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    scoring_func: str = "sigmoid",
) -> RouteResult:
    """DeepSeek routing: scores, group-limited top-k, normalization and scaling.

    :param router_logits: [T, E].
    :param correction_bias: float32 [E] or ``None``; it steers the choice only, never the weights.
    :param top_k: experts per token.
    :param n_group: expert groups (E / n_group experts each).
    :param topk_group: groups kept per token.
    :param norm_topk_prob: divide the chosen weights by their sum (+1e-20, as transformers does).
    :param routed_scaling_factor: multiplies the final weights.
    :param scoring_func: ``"sigmoid"`` or ``"softmax"`` (over E).
    :returns: ``RouteResult(weights float32 [T, top_k], ids int64 [T, top_k])``.
    """
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)  # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        # With a bias (V3) a group is judged by its top-2 sum; without (V2) by its best expert.
        if correction_bias is not None:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)  # [T, n_group]
        kept = group_scores.topk(topk_group, dim=-1).indices
        dropped = torch.ones(t, n_group, dtype=torch.bool, device=choice.device).scatter_(1, kept, False)
        choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(t, e)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return RouteResult(weights.float(), ids.long())


def moe_permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> Permutation:
    """Sort token copies by expert into the contiguous layout ``grouped_gemm`` takes.

    :param x: any dtype (float or fp8) [T, H].
    :param topk_ids: int32 | int64 [T, top_k], values in ``[0, num_experts)``.
    :param num_experts: E.
    :returns: ``Permutation(x [T * top_k, H], offsets int64 [E + 1], order int64 [T * top_k])``; rows
        ordered by expert, then by flat index ``t * top_k + j``.
    """
    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # stable: ties keep flat-index order
    tokens = order // top_k if top_k else order
    # fp8 tensors go through a byte view: row gathers on fp8 dtypes are not supported on every device.
    if x.is_floating_point() and x.element_size() == 1:
        x_sorted = x.view(torch.uint8).index_select(0, tokens).view(x.dtype)
    else:
        x_sorted = x.index_select(0, tokens)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = counts.cumsum(0)
    return Permutation(x_sorted, offsets, order)


def moe_unpermute(y: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs back in token order (inverse of ``moe_permute``).

    :param y: [T * top_k, N], expert outputs in permuted order.
    :param order: int64 | int32 [T * top_k], ``moe_permute``'s ``order``.
    :param topk_weights: float32 [T, top_k].
    :returns: y's dtype [T, N], ``out[t] = sum_j topk_weights[t, j] * y[r]`` where
        ``order[r] == t * top_k + j``, accumulated in fp32.
    """
    t, top_k = topk_weights.shape
    out = torch.zeros(t, y.shape[1], dtype=torch.float32, device=y.device)
    if top_k == 0:
        return out.to(y.dtype)
    flat = order.long()
    contrib = y.float() * topk_weights.float().reshape(-1).index_select(0, flat).unsqueeze(1)  # [T*top_k, N]
    out.index_add_(0, flat // top_k, contrib)
    return out.to(y.dtype)
