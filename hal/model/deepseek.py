"""The DeepSeek-V3 model (MLA + MoE), written only against HAL ops.

One definition runs on whichever backend it is given: every matmul, norm, rotation, attention,
routing and expert computation is a call on ``backend`` (:mod:`hal.ops.catalogue`); plain torch only
reshapes, slices, concatenates, adds residuals and gathers embeddings.

- **Prefill** runs new sequences packed end to end (``[T, hidden]`` with cumulative lengths): queries,
  keys and values are expanded per head from the latent (``kv_b_proj``) and attention is
  ``attention_prefill``; the latent of every token (``c_kv`` normalized, then rotated ``k_pe``) is
  written to the paged cache.
- **Decode** is absorbed MLA: ``kv_b_proj`` is split into ``W_UK`` and ``W_UV``, the query's no-rope
  part is projected into the latent space (``q·W_UK``), ``mla_decode`` attends over the paged latent
  cache, and ``W_UV`` maps the latent output back to value space. ``absorbed=False`` computes the same
  step the expanded way (for checking).

**Parallelism** (``parallel``, :mod:`hal.model.parallel`): under tensor parallelism each rank holds
its heads of the MLA projections and its slice of the dense MLP, the shared experts and the LM head;
``o_proj`` and ``down_proj`` give partial sums that one ``all_reduce`` completes, and an
``all_gather`` assembles the logits. Under expert parallelism each rank holds its routed experts and
runs them on the tokens ``ep_dispatch`` sends it. With ``ParallelConfig()`` (one process, the default)
no collective runs and the computation is the single-process one, op for op.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from hal.backend import Backend
from hal.errors import HALError
from hal.kvcache import PagedKVCache
from hal.model.config import ModelConfig
from hal.model.parallel import ParallelConfig, local_shapes
from hal.model.rope import cos_sin_cache
from hal.model.weights import Fp8Weight, Int8Weight, Weight, checked_shapes, weight_nbytes
from hal.ops.catalogue import BLOCK

__all__ = ["DeepseekModel", "ModelError"]


#: Rows of the rotary table a model starts with; it doubles when a position passes its end.
ROPE_ROWS = 4096


class ModelError(HALError, ValueError):
    """The model cannot be built from these weights, or was called with input it cannot take."""


# ---------------------------------------------------------------------------------------------------
# Weight containers (built once from the checkpoint's flat dict)
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Attention:
    q: Weight | None  # q_proj, when there is no q LoRA
    q_a: Weight | None
    q_a_norm: torch.Tensor | None
    q_b: Weight | None
    kv_a: Weight
    kv_a_norm: torch.Tensor
    kv_b: Weight
    w_uk: torch.Tensor  # [h, kv_lora_rank, qk_nope]: q_nope @ W_UK^T per head -> latent
    w_uv: torch.Tensor  # [h, v_head_dim, kv_lora_rank]: latent -> value space per head
    o: Weight


@dataclass
class _Mlp:
    gate_up: Weight  # [2I, H]: gate then up rows, so silu_and_mul applies directly
    down: Weight  # [H, I]


@dataclass
class _Moe:
    gate: torch.Tensor  # fp32 [E, H]
    bias: torch.Tensor | None  # fp32 [E]
    gate_up: Weight  # [E, 2I, H]
    down: Weight  # [E, H, I]
    shared: _Mlp | None


@dataclass
class _Layer:
    input_norm: torch.Tensor
    attn: _Attention
    post_norm: torch.Tensor
    mlp: _Mlp | _Moe


def _check_distinct(seq_ids: Sequence[Hashable], what: str) -> None:
    repeated = [s for s, n in Counter(seq_ids).items() if n > 1]
    if repeated:
        raise ModelError(f"{what}: sequence ids must be distinct, {repeated[:8]} repeat")


class DeepseekModel:
    """A DeepSeek-V2/V3 model on a HAL backend.

    :param cfg: the architecture.
    :param backend: where every op runs (``hal.get_backend()``).
    :param weights: checkpoint-named weights (:func:`hal.model.weights.expected_shapes`), plain tensors,
        or :class:`~hal.model.weights.Fp8Weight` / :class:`~hal.model.weights.Int8Weight` for linear
        layers. They are moved to the backend's device; floating tensors are cast to ``dtype``; quantized
        weights stay quantized, except an ``Fp8Weight`` whose K is not a multiple of 128 (which no
        block-scaled GEMM takes), dequantized to ``dtype``.
    :param dtype: activation and weight dtype (``float32``, ``bfloat16``, ``float16``).
    :param parallel: this rank's share of a tensor- / expert-parallel model; ``weights`` are then the
        rank's own (:func:`hal.model.parallel.shard_state_dict`, or the loader's ``parallel``), checked
        against :func:`hal.model.parallel.local_shapes`. ``None`` is one process.
    :raises ModelError: missing, unexpected or mis-shaped weights, each listed by name.
    :raises hal.model.parallel.ParallelError: a layout the config does not divide into.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        backend: Backend,
        weights: Mapping[str, Weight],
        *,
        dtype: torch.dtype = torch.float32,
        parallel: ParallelConfig | None = None,
    ) -> None:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ModelError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")
        par = parallel if parallel is not None else ParallelConfig()
        par.check(cfg)
        shapes = local_shapes(cfg, par) if parallel is not None else None
        missing, unexpected, mismatched = checked_shapes(cfg, weights, shapes)
        problems = []
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if names:
                shown = ", ".join(names[:20]) + (f", … ({len(names) - 20} more)" if len(names) > 20 else "")
                problems.append(f"{len(names)} {title}: {shown}")
        if problems:
            raise ModelError("the weights do not fit the config:\n  " + "\n  ".join(problems))
        self.cfg = cfg
        self.par = par
        self.heads = cfg.num_attention_heads // par.tp  # this rank's attention heads
        self.backend = backend
        self.dtype = dtype
        self.device = backend.device
        self._w = weights
        self.embed = self._dense("model.embed_tokens.weight")
        self.norm = self._dense("model.norm.weight")
        if cfg.tie_word_embeddings:
            lo, hi = par.vocab_range(cfg)  # the whole vocabulary without tensor parallelism
            self.lm_head = self.embed if par.tp == 1 else self.embed[lo:hi].contiguous()
        else:
            self.lm_head = self._dense("lm_head.weight")
        self.layers = [self._layer(i) for i in range(cfg.num_hidden_layers)]
        del self._w  # the containers above hold what is needed; drop the checkpoint-named view
        # The rotary table covers the positions seen so far (grown on demand, up to max_position_embeddings),
        # not the whole context a config may declare (10^6 positions and more).
        self._cos_sin = cos_sin_cache(cfg, max_position=min(cfg.max_position_embeddings, ROPE_ROWS), device=self.device)
        self.softmax_scale = cfg.softmax_scale

    # -- building -----------------------------------------------------------------------------

    def _dense(self, name: str) -> torch.Tensor:
        w = self._w[name]
        if not isinstance(w, torch.Tensor):
            raise ModelError(f"{name}: expected a plain tensor, got a quantized weight ({type(w).__name__})")
        return w.to(device=self.device, dtype=self.dtype)

    def _linear(self, name: str) -> Weight:
        """A linear weight on the device: FP8 kept where ``gemm_fp8`` can take it (K a multiple of 128),
        else a ``dtype`` tensor."""
        w = self._w[name]
        if isinstance(w, Fp8Weight):
            if w.q.shape[-1] % BLOCK == 0:
                return Fp8Weight(w.q.to(self.device), w.scale.to(device=self.device, dtype=torch.float32))
            from hal.quant import dequantize_fp8_blocks

            return dequantize_fp8_blocks(w.q, w.scale).to(device=self.device, dtype=self.dtype)
        if isinstance(w, Int8Weight):
            return Int8Weight(w.q.to(self.device), w.scale.to(device=self.device, dtype=torch.float32))
        return w.to(device=self.device, dtype=self.dtype)

    def _float(self, w: Weight) -> torch.Tensor:
        """The fp32 value of a weight (FP8 or INT8 dequantized): for the absorbed MLA projections."""
        from hal.quant import dequantize_fp8_blocks, dequantize_int8_rows

        if isinstance(w, Fp8Weight):
            return dequantize_fp8_blocks(w.q, w.scale)
        if isinstance(w, Int8Weight):
            return dequantize_int8_rows(w.q, w.scale)
        return w.float()

    def _stack(self, ws: Sequence[Weight], dim: int) -> Weight:
        """Concatenate (``dim`` 0, fusing gate and up) or stack (``dim`` -1 meaning a new expert dim)."""
        join = torch.stack if dim < 0 else torch.cat
        axis = 0
        if all(isinstance(w, Fp8Weight) for w in ws):
            fp8 = [w for w in ws if isinstance(w, Fp8Weight)]
            rows_aligned = dim < 0 or all(w.q.shape[-2] % BLOCK == 0 for w in fp8)
            if rows_aligned:  # block scales concatenate only along whole 128-row blocks
                return Fp8Weight(join([w.q for w in fp8], axis), join([w.scale for w in fp8], axis))
        if all(isinstance(w, Int8Weight) for w in ws):
            int8 = [w for w in ws if isinstance(w, Int8Weight)]  # per-row scales join like the rows
            return Int8Weight(join([w.q for w in int8], axis), join([w.scale for w in int8], axis))
        plain = [w if isinstance(w, torch.Tensor) else self._float(w).to(self.dtype) for w in ws]
        return join(plain, axis)

    def _mlp(self, prefix: str) -> _Mlp:
        gate_up = self._stack([self._linear(prefix + "gate_proj.weight"), self._linear(prefix + "up_proj.weight")], 0)
        return _Mlp(gate_up, self._linear(prefix + "down_proj.weight"))

    def _layer(self, i: int) -> _Layer:
        cfg, p = self.cfg, f"model.layers.{i}."
        a = p + "self_attn."
        lora = cfg.q_lora_rank is not None
        kv_b = self._linear(a + "kv_b_proj.weight")
        w = self._float(kv_b).view(self.heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        attn = _Attention(
            q=None if lora else self._linear(a + "q_proj.weight"),
            q_a=self._linear(a + "q_a_proj.weight") if lora else None,
            q_a_norm=self._dense(a + "q_a_layernorm.weight") if lora else None,
            q_b=self._linear(a + "q_b_proj.weight") if lora else None,
            kv_a=self._linear(a + "kv_a_proj_with_mqa.weight"),
            kv_a_norm=self._dense(a + "kv_a_layernorm.weight"),
            kv_b=kv_b,
            w_uk=w[:, : cfg.qk_nope_head_dim].transpose(1, 2).contiguous().to(device=self.device, dtype=self.dtype),
            w_uv=w[:, cfg.qk_nope_head_dim :].contiguous().to(device=self.device, dtype=self.dtype),
            o=self._linear(a + "o_proj.weight"),
        )
        m = p + "mlp."
        mlp: _Mlp | _Moe
        if not cfg.is_moe_layer(i):
            mlp = self._mlp(m)
        else:
            experts = [self._mlp(f"{m}experts.{e}.") for e in self.par.local_experts(cfg)]
            bias = self._w.get(m + "gate.e_score_correction_bias")
            mlp = _Moe(
                gate=self._float(self._w[m + "gate.weight"]).to(self.device),
                bias=None if bias is None else self._float(bias).to(self.device),
                gate_up=self._stack([e.gate_up for e in experts], -1),
                down=self._stack([e.down for e in experts], -1),
                shared=self._mlp(m + "shared_experts.") if cfg.n_shared_experts else None,
            )
        return _Layer(
            self._dense(p + "input_layernorm.weight"), attn, self._dense(p + "post_attention_layernorm.weight"), mlp
        )

    # -- public API ---------------------------------------------------------------------------

    def new_cache(self, num_blocks: int) -> PagedKVCache:
        """A paged latent KV cache for this model: ``num_blocks`` blocks of 64 tokens, every layer."""
        return PagedKVCache(
            self.cfg.num_hidden_layers, num_blocks, self.cfg.kv_entry_dim, dtype=self.dtype, device=self.device
        )

    def prefill(
        self,
        cache: PagedKVCache,
        seq_ids: Sequence[Hashable],
        prompts: Sequence[Sequence[int]],
        *,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run new sequences' prompts, writing their latents into ``cache``.

        :param seq_ids: one new id per prompt (added to ``cache``).
        :param prompts: token ids, one list per sequence (lengths may differ; none empty).
        :param all_logits: return the logits of every prompt position, not only the last.
        :returns: float32 ``[b, vocab]`` (the last position of each prompt), or ``[sum(lengths), vocab]``
            in packed order with ``all_logits``.
        :raises ModelError: an id outside the vocabulary or a prompt longer than
            ``max_position_embeddings``. :raises hal.errors.KVCacheExhaustedError: not enough free blocks
            (nothing was written).
        """
        if len(seq_ids) != len(prompts) or not prompts:
            raise ModelError(
                f"prefill: expected one id per prompt and at least one prompt, got {len(seq_ids)} ids "
                f"and {len(prompts)} prompts"
            )
        _check_distinct(seq_ids, "prefill")
        present = [s for s in seq_ids if s in cache]
        if present:
            raise ModelError(f"prefill: sequences {present[:8]} are in the cache already; decode them or free them")
        lengths = [len(p) for p in prompts]
        for i, p in enumerate(prompts):
            self._check_ids(p, f"prompt {i}")
            if not p:
                raise ModelError(f"prefill: prompt {i} is empty")
            if len(p) > self.cfg.max_position_embeddings:
                raise ModelError(
                    f"prefill: prompt {i} has {len(p)} tokens, more than max_position_embeddings "
                    f"({self.cfg.max_position_embeddings})"
                )
        needed = sum(-(-n // cache.block_size) for n in lengths)
        if needed > cache.num_free_blocks:
            from hal.errors import KVCacheExhaustedError

            raise KVCacheExhaustedError(
                f"prefill: {len(prompts)} prompts need {needed} blocks of {cache.block_size} tokens, "
                f"{cache.num_free_blocks} are free; free finished sequences or make a larger cache"
            )
        slots = []
        for sid, n in zip(seq_ids, lengths, strict=True):
            cache.add_sequence(sid)
            slots.append(cache.reserve(sid, n))
        dev = self.device
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=dev)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(dev)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        slot = torch.cat(slots).to(dev)
        self._rope_table(max(lengths) - 1)
        h = self.embed[ids]
        for i, layer in enumerate(self.layers):
            x = self.backend.rms_norm(h, layer.input_norm, eps=self.cfg.rms_norm_eps)
            h = h + self._attention_prefill(layer.attn, x, positions, cu, cache, i, slot)
            x = self.backend.rms_norm(h, layer.post_norm, eps=self.cfg.rms_norm_eps)
            h = h + self._mlp_forward(layer.mlp, x)
        if not all_logits:
            h = h[cu[1:].long() - 1]
        return self._logits(h)

    def decode(
        self,
        cache: PagedKVCache,
        seq_ids: Sequence[Hashable],
        tokens: Sequence[int] | torch.Tensor,
        *,
        absorbed: bool = True,
    ) -> torch.Tensor:
        """One step for sequences already in ``cache``: append ``tokens`` (one per sequence) and return
        the next-token logits, float32 ``[b, vocab]``.

        :param absorbed: absorbed MLA over the paged latent cache (``mla_decode``, the default) or the
            expanded computation (keys and values per head from the cached latents, ``attention_prefill``).
        """
        token_list = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if len(token_list) != len(seq_ids) or not token_list:
            raise ModelError(f"decode: expected one token per sequence, got {len(token_list)} for {len(seq_ids)}")
        self._check_ids(token_list, "decode tokens")
        _check_distinct(seq_ids, "decode")
        positions_list = [cache.seq_len(s) for s in seq_ids]
        too_long = [s for s, p in zip(seq_ids, positions_list, strict=True) if p >= self.cfg.max_position_embeddings]
        if too_long:
            raise ModelError(
                f"decode: sequences {too_long} reached max_position_embeddings ({self.cfg.max_position_embeddings})"
            )
        free_needed = sum(1 for p in positions_list if p % cache.block_size == 0)
        if free_needed > cache.num_free_blocks:
            from hal.errors import KVCacheExhaustedError

            raise KVCacheExhaustedError(
                f"decode: {free_needed} sequences need a new block, {cache.num_free_blocks} are free"
            )
        dev = self.device
        slot = torch.cat([cache.reserve(s, 1) for s in seq_ids]).to(dev)
        positions = torch.tensor(positions_list, dtype=torch.int64, device=dev)
        block_table = cache.block_table(seq_ids).to(dev)
        seqlens = cache.seqlens(seq_ids).to(dev)
        self._rope_table(max(positions_list))
        h = self.embed[torch.tensor(token_list, dtype=torch.int64, device=dev)]
        for i, layer in enumerate(self.layers):
            x = self.backend.rms_norm(h, layer.input_norm, eps=self.cfg.rms_norm_eps)
            attend = self._attention_decode if absorbed else self._attention_decode_expanded
            h = h + attend(layer.attn, x, positions, cache, i, slot, block_table, seqlens)
            x = self.backend.rms_norm(h, layer.post_norm, eps=self.cfg.rms_norm_eps)
            h = h + self._mlp_forward(layer.mlp, x)
        return self._logits(h)

    @property
    def linear_weight_bytes(self) -> int:
        """Bytes held by the linear layers' weights (FP8 data plus scales where quantized)."""
        total = 0
        for layer in self.layers:
            a = layer.attn
            total += sum(weight_nbytes(w) for w in (a.q, a.q_a, a.q_b, a.kv_a, a.kv_b, a.o) if w is not None)
            mlps = [layer.mlp] if isinstance(layer.mlp, _Mlp) else [layer.mlp, layer.mlp.shared]
            for m in mlps:
                if m is not None:
                    total += weight_nbytes(m.gate_up) + weight_nbytes(m.down)
        return total

    # -- pieces -------------------------------------------------------------------------------

    def _rope_table(self, last_position: int) -> torch.Tensor:
        """The cos/sin table (:func:`~hal.model.rope.cos_sin_cache`) through ``last_position`` at least:
        doubled when a position passes its end (the rows are the same at every length)."""
        have = self._cos_sin.shape[0]
        if last_position >= have:
            rows = min(self.cfg.max_position_embeddings, max(2 * have, last_position + 1))
            self._cos_sin = cos_sin_cache(self.cfg, max_position=rows, device=self.device)
        return self._cos_sin

    def _check_ids(self, ids: Sequence[int], what: str) -> None:
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ModelError(f"{what}: token ids {bad[:8]} outside the vocabulary [0, {self.cfg.vocab_size})")

    def _gemm(self, x: torch.Tensor, w: Weight) -> torch.Tensor:
        be = self.backend
        if isinstance(w, Fp8Weight):
            xq, xs = be.quantize_fp8(x, fp8_dtype=w.q.dtype)
            return be.gemm_fp8(xq, xs, w.q, w.scale, out_dtype=x.dtype)
        if isinstance(w, Int8Weight):
            xq, xs = be.quantize_int8(x)
            return be.gemm_int8(xq, xs, w.q, w.scale, out_dtype=x.dtype)
        return be.gemm(x, w)

    def _grouped(self, x: torch.Tensor, w: Weight, offsets: torch.Tensor) -> torch.Tensor:
        be = self.backend
        if isinstance(w, Fp8Weight):
            xq, xs = be.quantize_fp8(x, fp8_dtype=w.q.dtype)
            return be.grouped_gemm_fp8(xq, xs, w.q, w.scale, offsets, out_dtype=x.dtype)
        if isinstance(w, Int8Weight):
            xq, xs = be.quantize_int8(x)
            return be.grouped_gemm_int8(xq, xs, w.q, w.scale, offsets, out_dtype=x.dtype)
        return be.grouped_gemm(x, w, offsets)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        x = self.backend.rms_norm(h, self.norm, eps=self.cfg.rms_norm_eps)
        logits = self.backend.gemm(x, self.lm_head, out_dtype=torch.float32)
        if self.par.tp == 1:
            return logits
        # Each rank has its vocabulary columns [b, V / tp]; gathered along dim 0 they are [tp * b, V / tp].
        parts = self.backend.all_gather(logits, group=self.par.group)
        b = logits.shape[0]
        return parts.view(self.par.tp, b, -1).transpose(0, 1).reshape(b, -1)

    def _tp_sum(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over the tensor-parallel ranks of a row-split GEMM's partial outputs (``o_proj``,
        ``down_proj``); the output itself without tensor parallelism."""
        if self.par.tp == 1:
            return partial
        return self.backend.all_reduce(partial, group=self.par.group)

    def _q_and_latent(
        self, a: _Attention, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q_nope [T, h, nope], q_pe [T, h, rope] rotated, latent [T, kv_lora + rope])``; the latent
        is what the cache holds: normalized ``c_kv`` then rotated ``k_pe``."""
        be, cfg = self.backend, self.cfg
        if a.q is not None:
            q = self._gemm(x, a.q)
        else:
            assert a.q_a is not None and a.q_a_norm is not None and a.q_b is not None  # built together
            q = self._gemm(be.rms_norm(self._gemm(x, a.q_a), a.q_a_norm, eps=cfg.rms_norm_eps), a.q_b)
        q = q.view(x.shape[0], self.heads, cfg.qk_head_dim)
        q_nope = q[..., : cfg.qk_nope_head_dim]
        cos_sin = self._cos_sin  # grown to these positions by prefill() / decode()
        q_pe = be.rotary(
            q[..., cfg.qk_nope_head_dim :].contiguous(), positions, cos_sin, interleaved=cfg.rope_interleave
        )
        kv = self._gemm(x, a.kv_a)
        c_kv = be.rms_norm(kv[:, : cfg.kv_lora_rank].contiguous(), a.kv_a_norm, eps=cfg.rms_norm_eps)
        k_pe = be.rotary(
            kv[:, cfg.kv_lora_rank :].contiguous(), positions, cos_sin, interleaved=cfg.rope_interleave
        )
        return q_nope, q_pe, torch.cat([c_kv, k_pe], dim=-1)

    def _expand(self, a: _Attention, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys' no-rope part and values from latents: ``(k [T, h, qk_head], v [T, h, v_dim])``."""
        cfg = self.cfg
        c_kv, k_pe = latent[:, : cfg.kv_lora_rank].contiguous(), latent[:, cfg.kv_lora_rank :]
        kv = self._gemm(c_kv, a.kv_b).view(latent.shape[0], self.heads, -1)
        k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim :]
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.heads, -1)], dim=-1)
        return k, v.contiguous()

    def _attention_prefill(
        self,
        a: _Attention,
        x: torch.Tensor,
        positions: torch.Tensor,
        cu: torch.Tensor,
        cache: PagedKVCache,
        layer: int,
        slot: torch.Tensor,
    ) -> torch.Tensor:
        q_nope, q_pe, latent = self._q_and_latent(a, x, positions)
        cache.write(layer, slot, latent.to(cache.dtype))
        k, v = self._expand(a, latent)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = self.backend.attention_prefill(q, k, v, cu, cu, softmax_scale=self.softmax_scale, causal=True)
        return self._tp_sum(self._gemm(out.reshape(x.shape[0], -1), a.o))

    def _attention_decode(
        self,
        a: _Attention,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        layer: int,
        slot: torch.Tensor,
        block_table: torch.Tensor,
        seqlens: torch.Tensor,
    ) -> torch.Tensor:
        be, cfg = self.backend, self.cfg
        b, heads = x.shape[0], self.heads
        q_nope, q_pe, latent = self._q_and_latent(a, x, positions)
        cache.write(layer, slot, latent.to(cache.dtype))
        every_row = torch.full((heads,), b, dtype=torch.int64, device=self.device)
        # Absorb W_UK into the query: per head, q_nope [b, nope] -> [b, kv_lora] (a batched GEMM over heads).
        q_latent = be.grouped_gemm_masked(q_nope.transpose(0, 1).contiguous(), a.w_uk, every_row)
        q = torch.cat([q_latent.transpose(0, 1), q_pe], dim=-1).unsqueeze(1)
        out, _ = be.mla_decode(
            q, cache.layer(layer), block_table, seqlens, head_dim_v=cfg.kv_lora_rank, softmax_scale=self.softmax_scale
        )
        # W_UV maps the attended latent back to value space, per head.
        o = be.grouped_gemm_masked(out[:, 0].transpose(0, 1).contiguous(), a.w_uv, every_row)
        return self._tp_sum(self._gemm(o.transpose(0, 1).reshape(b, -1), a.o))

    def _attention_decode_expanded(
        self,
        a: _Attention,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        layer: int,
        slot: torch.Tensor,
        block_table: torch.Tensor,
        seqlens: torch.Tensor,
    ) -> torch.Tensor:
        q_nope, q_pe, latent = self._q_and_latent(a, x, positions)
        cache.write(layer, slot, latent.to(cache.dtype))
        lens = seqlens.tolist()
        bs = cache.block_size
        # Every cached token's flat slot, sequence after sequence, read through the block table.
        slots = torch.cat(
            [
                block_table[s, torch.arange(n, device=self.device) // bs].long() * bs
                + torch.arange(n, device=self.device) % bs
                for s, n in enumerate(lens)
            ]
        )
        cached = cache.layer(layer).view(-1, self.cfg.kv_entry_dim)[slots].to(self.dtype)
        k, v = self._expand(a, cached)
        q = torch.cat([q_nope, q_pe], dim=-1)
        cu_q = torch.arange(len(lens) + 1, dtype=torch.int32, device=self.device)
        cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=self.device)
        out = self.backend.attention_prefill(q, k, v, cu_q, cu_k, softmax_scale=self.softmax_scale, causal=True)
        return self._tp_sum(self._gemm(out.reshape(x.shape[0], -1), a.o))

    def _dense_mlp(self, m: _Mlp, x: torch.Tensor) -> torch.Tensor:
        return self._gemm(self.backend.silu_and_mul(self._gemm(x, m.gate_up)), m.down)

    def _mlp_forward(self, m: _Mlp | _Moe, x: torch.Tensor) -> torch.Tensor:
        if isinstance(m, _Mlp):
            return self._tp_sum(self._dense_mlp(m, x))
        if self.par.ep > 1:
            return self._moe_expert_parallel(m, x)
        ids, weights = self._route(m, x)
        out = self._experts(m, x, ids, weights, self.cfg.n_routed_experts)
        if m.shared is not None:
            out = out + self._dense_mlp(m.shared, x)
        # Under tensor parallelism every expert holds a slice of its intermediate dimension: partial sums.
        return self._tp_sum(out)

    def _route(self, m: _Moe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's ``top_k`` experts and their weights (``[T, top_k]`` int64 ids, float32 weights); a
        token's routing depends on that token alone."""
        be, cfg = self.backend, self.cfg
        if x.shape[0] == 0:  # an expert-parallel rank's empty chunk
            k = cfg.num_experts_per_tok
            return (
                torch.empty(0, k, dtype=torch.int64, device=x.device),
                torch.empty(0, k, dtype=torch.float32, device=x.device),
            )
        logits = be.gemm(x.float(), m.gate)  # the router runs in fp32, as DeepSeek's and transformers' do
        grouped = cfg.topk_method != "greedy"
        route = be.moe_route(
            logits,
            m.bias,
            top_k=cfg.num_experts_per_tok,
            n_group=cfg.n_group if grouped else 1,
            topk_group=cfg.topk_group if grouped else 1,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            scoring_func=cfg.scoring_func,
        )
        return route.ids, route.weights

    def _experts(
        self, m: _Moe, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int
    ) -> torch.Tensor:
        """``Σ_j weights[t, j] · expert_{ids[t, j]}(x[t])`` over the experts in ``m`` (ids ``>= len`` of them
        sort past the last offset, where the grouped GEMMs leave zeros, and must carry weight 0)."""
        be = self.backend
        perm = be.moe_permute(x, ids, num_experts)
        offsets = perm.offsets[: m.gate_up.shape[0] + 1]
        y = self._grouped(be.silu_and_mul(self._grouped(perm.x, m.gate_up, offsets)), m.down, offsets)
        return be.moe_unpermute(y, perm.order, weights)

    def _moe_expert_parallel(self, m: _Moe, x: torch.Tensor) -> torch.Tensor:
        """The MoE of replicated tokens ``x`` with routed experts spread over the ranks.

        This rank routes its chunk of the tokens (routing is per token, so the other chunks' routing is
        the other ranks' business), sends them to the experts' ranks (``ep_dispatch``, in its low-latency
        mode for chunks of at most ``ParallelConfig.ep_low_latency_tokens``), runs its own
        experts on what it receives, gets its tokens' results back (``ep_combine``) and writes them into
        its rows of a zero ``[T, H]`` buffer; the shared experts add theirs (a partial sum under tensor
        parallelism, else this chunk's rows), and one ``all_reduce`` gives every rank every token.
        """
        be, par = self.backend, self.par
        lo, hi = par.token_range(x.shape[0])
        mine = x[lo:hi]
        ids, weights = self._route(m, mine)
        # Every rank knows every chunk's size (x is replicated): small chunks (decode) take the
        # low-latency mode's one fixed-size exchange, with the largest chunk as the cap.
        chunk = -(-x.shape[0] // par.ep)
        cap = chunk if 0 < chunk <= par.ep_low_latency_tokens else None
        d = be.ep_dispatch(
            mine, ids, weights, num_experts=self.cfg.n_routed_experts, max_tokens_per_rank=cap, group=par.group
        )
        n_local = m.gate_up.shape[0]
        if d.x.shape[0]:
            # An expert of another rank (-1) becomes the sink id n_local: past the last offset, weight 0.
            local_ids = torch.where(d.topk_ids < 0, n_local, d.topk_ids)
            y = self._experts(m, d.x, local_ids, d.topk_weights, n_local + 1)
        else:
            y = d.x.new_zeros(0, x.shape[1])
        out = torch.zeros_like(x)
        out[lo:hi] = be.ep_combine(y, d.handle, group=par.group)
        if m.shared is not None:
            if par.tp > 1:
                out = out + self._dense_mlp(m.shared, x)
            else:
                out[lo:hi] += self._dense_mlp(m.shared, mine)
        return be.all_reduce(out, group=par.group)
