"""Variable-length causal flash attention (prefill) with q/k head dim different from v's.

Contract: :func:`hal.ops.catalogue.attention_prefill` (FlashAttention's varlen layout, causal mask
aligned to the bottom-right). One kernel, grid ``(query tiles, h)``: a program takes ``BLOCK_M``
queries of one sequence and one head and runs an online softmax (base 2, fp32) over that sequence's
keys in ``BLOCK_N`` steps, reading the keys and values of kv head ``head // (h / h_kv)`` (GQA; MHA is
``h_kv == h``).

- **Tiles without a host synchronization.** Sequence lengths live on the device. The launcher counts
  each sequence's query tiles there (``cumsum(cdiv(Lq, BLOCK_M))``, three small torch ops) and
  launches ``min(total_q, cdiv(total_q, BLOCK_M) + b - 1)`` programs, a bound on the real count
  known from shapes alone; a program finds its sequence by binary search in that cumulative count,
  and programs past the last tile return at once.
- **Causal work only.** A tile reads keys only up to its last query's limit; the keys every query of
  the tile sees are processed without a mask, only the diagonal steps are masked.
- **Head dims.** ``d_qk`` is cut into a power-of-two part and a rest padded to a power of two
  (DeepSeek: 192 = 128 + 64, no padding), ``d_v`` is padded to a power of two; padding is masked.

A query that sees no key (``Lk == 0``, or causal with ``Lq > Lk``) gets zeros, as the contract says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from hal.errors import DTypeError, LayoutError, OpInputError
from hal_kernels import _common

__all__ = ["DEFAULTS", "DEFAULT_CONFIG", "OPS", "REFERENCE", "attention_prefill", "compile_specs"]

_OP = "attention_prefill"

#: Defaults for H100 with DeepSeek's 192/128 head dims: 128 queries x 32 keys, 8 warps, 2 stages; the
#: backends' tuning files override them per architecture. What a config compiles to (registers, shared
#: memory, spills) is what ``hal compile-check --target <arch>`` reports; the last recorded run is
#: bench/results/compile-check.json.
DEFAULT_CONFIG: dict[str, int] = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
#: op → its default config (what a tuning file's keys are checked against).
DEFAULTS: Mapping[str, Mapping[str, int]] = {_OP: DEFAULT_CONFIG}

_LOG2E = 1.0 / math.log(2.0)


def _block_n(cfg: Mapping[str, int], dtype: torch.dtype) -> int:
    """fp32 operands take twice the bytes per key, so fp32 runs step through half as many keys
    (``BLOCK_N // 2``, at least 16): the same shared memory, within MI300's 64 KiB of LDS."""
    return cfg["BLOCK_N"] if dtype.itemsize < 4 else max(16, cfg["BLOCK_N"] // 2)


_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _prefill_step(
    acc,
    m_i,
    l_i,
    qa,
    qb,
    k_head,
    v_head,
    n0,
    offs_m,
    lk,
    shift,
    stride_kt,
    stride_vt,
    d_a,
    d_qk,
    d_v,
    scale_log2,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_B: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """One step of ``BLOCK_N`` keys: scores, online-softmax update, values. ``MASKED``: the step
    crosses the end of the keys or the causal diagonal; otherwise every query sees every key."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < lk
    da = tl.arange(0, BLOCK_DA)
    k_rows = k_head + offs_n.to(tl.int64) * stride_kt
    ka = tl.load(k_rows[:, None] + da[None, :], mask=n_ok[:, None] & (da < d_a)[None, :], other=0.0)
    if UPCAST:
        ka = ka.to(tl.float32)
    s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
    if HAS_B:
        db = tl.arange(0, BLOCK_DB)
        kb = tl.load(k_rows[:, None] + d_a + db[None, :], mask=n_ok[:, None] & (d_a + db < d_qk)[None, :], other=0.0)
        if UPCAST:
            kb = kb.to(tl.float32)
        s += tl.dot(qb, tl.trans(kb), input_precision=PREC)
    s = s * scale_log2
    if MASKED:
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing visible yet keeps m = -inf; subtracting 0 instead keeps exp2 NaN-free.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    dv = tl.arange(0, BLOCK_DV)
    v = tl.load(
        v_head + offs_n.to(tl.int64)[:, None] * stride_vt + dv[None, :],
        mask=n_ok[:, None] & (dv < d_v)[None, :],
        other=0.0,
    )
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    cu_q_ptr,
    cu_k_ptr,
    tile_cu_ptr,
    b,
    search_steps,
    group,
    d_qk,
    d_v,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_B: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """One (query tile, head). ``tile_cu``: int32 [b + 1], cumulative query tiles per sequence."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    if tile < tl.load(tile_cu_ptr + b):
        # The sequence of this tile: the largest s with tile_cu[s] <= tile (empty sequences share
        # their tile_cu value with the next one, so the largest is the one that owns the tile).
        lo = tl.zeros([], dtype=tl.int32)
        hi = b - 1
        for _ in range(search_steps):
            mid = (lo + hi + 1) // 2
            go = tl.load(tile_cu_ptr + mid) <= tile
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        seq = lo
        q0 = tl.load(cu_q_ptr + seq)
        lq = tl.load(cu_q_ptr + seq + 1) - q0
        k0 = tl.load(cu_k_ptr + seq)
        lk = tl.load(cu_k_ptr + seq + 1) - k0
        m0 = (tile - tl.load(tile_cu_ptr + seq)) * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < lq
        kv_head = head // group
        # Causal, bottom-right aligned: query i sees keys j <= i + shift.
        shift = lk - lq

        d_a = tl.minimum(d_qk, BLOCK_DA)
        da = tl.arange(0, BLOCK_DA)
        q_rows = q_ptr + (q0 + offs_m).to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
        qa = tl.load(q_rows[:, None] + da[None, :], mask=m_ok[:, None] & (da < d_a)[None, :], other=0.0)
        if UPCAST:
            qa = qa.to(tl.float32)
        qb = qa  # unused unless HAS_B
        if HAS_B:
            db = tl.arange(0, BLOCK_DB)
            qb = tl.load(
                q_rows[:, None] + d_a + db[None, :], mask=m_ok[:, None] & (d_a + db < d_qk)[None, :], other=0.0
            )
            if UPCAST:
                qb = qb.to(tl.float32)

        if CAUSAL:
            kv_end = tl.maximum(tl.minimum(lk, m0 + BLOCK_M + shift), 0)
            # Keys < m0 + shift + 1 are seen by every query of the tile.
            full_end = tl.minimum(tl.maximum(m0 + shift + 1, 0), lk) // BLOCK_N * BLOCK_N
        else:
            kv_end = lk
            full_end = lk // BLOCK_N * BLOCK_N
        k_head = k_ptr + k0.to(tl.int64) * stride_kt + kv_head.to(tl.int64) * stride_kh
        v_head = v_ptr + k0.to(tl.int64) * stride_vt + kv_head.to(tl.int64) * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for n0 in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _prefill_step(
                acc, m_i, l_i, qa, qb, k_head, v_head, n0, offs_m, lk, shift, stride_kt, stride_vt,
                d_a, d_qk, d_v, scale_log2, False, BLOCK_N, BLOCK_DA, BLOCK_DB, BLOCK_DV, HAS_B, CAUSAL,
                UPCAST, PREC,
            )  # fmt: skip
        for n0 in range(full_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _prefill_step(
                acc, m_i, l_i, qa, qb, k_head, v_head, n0, offs_m, lk, shift, stride_kt, stride_vt,
                d_a, d_qk, d_v, scale_log2, True, BLOCK_N, BLOCK_DA, BLOCK_DB, BLOCK_DV, HAS_B, CAUSAL,
                UPCAST, PREC,
            )  # fmt: skip

        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that saw nothing have acc = 0
        dv = tl.arange(0, BLOCK_DV)
        o_rows = o_ptr + (q0 + offs_m).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
        tl.store(
            o_rows[:, None] + dv[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=m_ok[:, None] & (dv < d_v)[None, :],
        )


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    """The block that holds ``n`` values: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(max(n, 1)))


def _split_dims(d_qk: int) -> tuple[int, int]:
    """``(BLOCK_DA, BLOCK_DB)``: the largest power of two <= d_qk (at least 16), and the rest padded
    to a power of two (0 when nothing is left)."""
    block_a = max(16, 1 << (max(d_qk, 1).bit_length() - 1))
    rest = d_qk - block_a
    return block_a, (_pow2(rest) if rest > 0 else 0)


def _check_config(cfg: Mapping[str, int]) -> None:
    for key in ("BLOCK_M", "BLOCK_N"):
        v = cfg[key]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise OpInputError(_OP, "config", f"{key} must be a power of two >= 16 (tl.dot's minimum), got {v!r}")


def _launch(
    cfg: Mapping[str, int],
    dtype: torch.dtype,
    cu_q_dtype: torch.dtype,
    cu_k_dtype: torch.dtype,
    *,
    d_qk: int,
    d_v: int,
    causal: bool,
) -> _common.Launch:
    """The kernel launch for these dtypes, head dims and mask (the launcher's, and the compile specs')."""
    t = _common.ptr(dtype)
    block_a, block_b = _split_dims(d_qk)
    return _common.Launch(
        _prefill_kernel,
        pointers={
            "q_ptr": t,
            "k_ptr": t,
            "v_ptr": t,
            "o_ptr": t,
            "cu_q_ptr": _common.ptr(cu_q_dtype),
            "cu_k_ptr": _common.ptr(cu_k_dtype),
            "tile_cu_ptr": "*i32",  # the launcher's own cumulative tile count
        },
        constexprs={
            "BLOCK_M": cfg["BLOCK_M"],
            "BLOCK_N": _block_n(cfg, dtype),
            "BLOCK_DA": block_a,
            "BLOCK_DB": max(block_b, 16),
            "BLOCK_DV": _pow2(d_v),
            "HAS_B": block_b > 0,
            "CAUSAL": bool(causal),
            "UPCAST": _common.INTERPRETING,
            # input_precision matters only for fp32 operands, where 'ieee' keeps the 1e-5 bound; it is
            # also the one value every target accepts (gfx950 rejects tf32).
            "PREC": "ieee",
        },
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        scalars={"scale_log2": "fp32"},
    )


def attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
    config: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """Varlen flash attention (contract: :func:`hal.ops.catalogue.attention_prefill`).

    :param q: bfloat16 | float16 | float32 [total_q, h, d_qk], last dim contiguous.
    :param k: q's dtype, [total_k, h_kv, d_qk], last dim contiguous.
    :param v: q's dtype, [total_k, h_kv, d_v], last dim contiguous.
    :param cu_seqlens_q: int32 [b + 1], cumulative query lengths.
    :param cu_seqlens_k: int32 [b + 1], cumulative key lengths.
    :param softmax_scale: ``None`` means ``d_qk ** -0.5``.
    :param causal: bottom-right aligned: query ``i`` of ``Lq`` sees keys ``j <= i + Lk - Lq``.
    :param config: ``BLOCK_M`` (queries per program), ``BLOCK_N`` (keys per step; halved for fp32),
        ``num_warps``, ``num_stages``; ``None`` means :data:`DEFAULT_CONFIG`.
    :returns: q's dtype [total_q, h, d_v]; zeros for a query that sees no key.
    """
    cfg = _common.merge_config(DEFAULT_CONFIG, config, _OP)
    _check_config(cfg)
    _common.require_device(_OP, {"q": q, "k": k, "v": v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k})
    if q.dtype not in _TL_DTYPE:
        raise DTypeError(_OP, "q", f"expected float32 | bfloat16 | float16, got {q.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 and t.shape[2] > 1:
            raise LayoutError(
                _OP, name, f"the last dim must be contiguous (stride 1), got strides {t.stride()}; call .contiguous()"
            )
    total_q, h, d_qk = q.shape
    h_kv, d_v = v.shape[1], v.shape[2]
    # The kernel reads the offsets at ``cu_seqlens + i`` (no stride): a strided view would be read from
    # the wrong memory. They are b + 1 ints, so a copy costs nothing.
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    b = cu_seqlens_q.shape[0] - 1
    out = _common.empty((total_q, h, d_v), q.dtype, q.device)
    if out.numel() == 0:
        return out
    scale = d_qk**-0.5 if softmax_scale is None else float(softmax_scale)
    block_m = cfg["BLOCK_M"]
    # Query tiles per sequence, counted on the device: no synchronization, graph-capturable.
    lens_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    tile_cu = torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    tiles_per_seq = torch.div(lens_q + (block_m - 1), block_m, rounding_mode="floor")
    torch.cumsum(tiles_per_seq, 0, dtype=torch.int32, out=tile_cu[1:])
    tiles = min(total_q, triton.cdiv(total_q, block_m) + b - 1)
    _launch(cfg, q.dtype, cu_seqlens_q.dtype, cu_seqlens_k.dtype, d_qk=d_qk, d_v=d_v, causal=causal)(
        (tiles, h), q, k, v, out, cu_seqlens_q, cu_seqlens_k, tile_cu,
        b, (b - 1).bit_length(), h // h_kv, d_qk, d_v, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
    )  # fmt: skip
    return out


OPS = {"attention_prefill": attention_prefill}
REFERENCE = {"attention_prefill": "hal_cpu.reference.attention:attention_prefill"}


# ---------------------------------------------------------------------------------------------------
# Compile specs
# ---------------------------------------------------------------------------------------------------

_STRIDES = ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot", "stride_oh")


#: What Triton's JIT sees as multiples of 16 at a DeepSeek-V3 launch (h 128, d_qk 192, d_v 128):
#: pointers, head dims and every token and head stride; not b or the group size (any value).
_DIVISIBLE = ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "cu_q_ptr", "cu_k_ptr", "tile_cu_ptr", "d_qk", "d_v", *_STRIDES)


def compile_specs(fp8: str, tuning: Mapping[str, Mapping[str, int]]) -> list[_common.CompileSpec]:
    """DeepSeek-V3's MLA prefill (d_qk 192 = 128 + 64, d_v 128, int32 cumulative lengths), causal (the
    model's) for bf16, fp16 and fp32, and non-causal for bf16.

    :param fp8: the target's fp8 pointer type (unused: no fp8 path).
    :param tuning: op name → config; ``attention_prefill``'s overrides :data:`DEFAULT_CONFIG`.
    """
    del fp8
    cfg = _common.merge_config(DEFAULT_CONFIG, tuning.get(_OP), _OP)
    variants = [(torch.bfloat16, True), (torch.float16, True), (torch.float32, True), (torch.bfloat16, False)]
    return [
        _launch(cfg, dtype, torch.int32, torch.int32, d_qk=192, d_v=128, causal=causal).spec(
            f"attention_prefill[{_common.ptr(dtype)[1:]}{'' if causal else ', non-causal'}]", _DIVISIBLE
        )
        for dtype, causal in variants
    ]
