"""Absorbed MLA decode over the paged latent KV cache: split-K (flash-decoding) plus a combine step.

Contract: :func:`hal.ops.catalogue.mla_decode` (FlashMLA semantics). Every query head attends to the
one latent head, so the ``s_q * h`` query rows of a sequence are one matrix (MQA-style) and one tile
of ``BLOCK_H`` rows shares every key tile it loads. Each key is a whole cache entry (``d`` values);
its first ``head_dim_v`` values are also the value, so a key tile is loaded once and used for both
matmuls. ``d`` is cut in two parts, value dims and the rest (DeepSeek-V3: 512 latent + 64 rope), each
padded to a power of two with masks, so 576 costs no padding and tiny test dims work too.

Two kernels:

- ``_mla_decode_split_kernel``, grid ``(b, cdiv(s_q * h, BLOCK_H), num_splits)``: program ``(s, r, k)``
  runs an online softmax over the ``k``-th of ``num_splits`` equal chunks of sequence ``s``'s keys
  (chunks rounded to ``BLOCK_N``; a sequence's length is read on the device, so lengths vary per
  sequence without a host synchronization) and writes a partial: the chunk's normalized output and
  its log2-sum-exp. With ``num_splits == 1`` it writes ``out`` and ``lse`` directly and the combine
  kernel is not launched.
- ``_mla_decode_combine_kernel``, grid ``(s_q * h, b)``: merges the partials of one row by their
  log-sum-exp, ``out = sum_k 2^(lse_k - m) o_k / sum_k 2^(lse_k - m)``.

A row that sees no key (an empty sequence, or a causal query before the cache's start) gets a zero
output and ``lse = -inf``, as the contract says.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from hal.errors import DTypeError, LayoutError, OpInputError
from hal_kernels import _common

__all__ = ["DEFAULTS", "DEFAULT_CONFIG", "OPS", "REFERENCE", "compile_specs", "mla_decode"]

_OP = "mla_decode"

#: Defaults for H100: 16 query rows x 32 keys (vLLM's Triton MLA decode tile), 8 warps, 2 stages; the
#: backends' tuning files override them per architecture. What a config compiles to (registers, shared
#: memory, spills) is what ``hal compile-check --target <arch>`` reports; the last recorded run is
#: bench/results/compile-check.json.
#: ``num_splits`` 0 means: chosen from the batch, the row tiles and the device's SM count.
DEFAULT_CONFIG: dict[str, int] = {"BLOCK_H": 16, "BLOCK_N": 32, "num_splits": 0, "num_warps": 8, "num_stages": 2}
#: op → its default config (what a tuning file's keys are checked against).
DEFAULTS: Mapping[str, Mapping[str, int]] = {_OP: DEFAULT_CONFIG}


def _block_n(cfg: Mapping[str, int], dtype: torch.dtype) -> int:
    """fp32 operands take twice the bytes per key, so fp32 runs step through half as many keys
    (``BLOCK_N // 2``, at least 16): the same shared memory, within MI300's 64 KiB of LDS."""
    return cfg["BLOCK_N"] if dtype.itemsize < 4 else max(16, cfg["BLOCK_N"] // 2)


#: auto split count: aim at this many programs per SM, at most this many splits, and no split
#: shorter than this many keys (shorter splits cost more in the combine step than they save).
_PROGRAMS_PER_SM = 2
_MAX_SPLITS = 64
_MIN_KEYS_PER_SPLIT = 256

_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2

_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _mla_decode_split_kernel(
    q_ptr,
    kv_ptr,
    block_table_ptr,
    seqlens_ptr,
    o_ptr,
    lse_ptr,
    s_q,
    h,
    d_v,
    d_rest,
    num_splits,
    scale_log2,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kvb,
    stride_kvt,
    stride_btb,
    stride_btn,
    stride_ob,
    stride_os,
    stride_oh,
    stride_ok,
    stride_lb,
    stride_ls,
    stride_lh,
    stride_lk,
    PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    HAS_REST: tl.constexpr,
    CAUSAL: tl.constexpr,
    FINAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """One (sequence, row tile, split): online softmax over the split's keys.

    ``FINAL``: write the natural-log lse and q's dtype into ``out``/``lse``; otherwise write the fp32
    partial output and the log2-sum-exp into the scratch buffers (split index ``k`` along
    ``stride_ok``/``stride_lk``).
    """
    pid_b = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    seqlen = tl.load(seqlens_ptr + pid_b)

    rows = pid_r * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < s_q * h
    qi = rows // h
    head = rows % h
    # Keys a row may see: [0, limit). Causal query i of s_q sees keys < seqlen - s_q + i + 1.
    if CAUSAL:
        limit = seqlen - s_q + qi + 1
    else:
        limit = tl.zeros([BLOCK_H], dtype=tl.int32) + seqlen
    limit = tl.where(row_ok, limit, 0)

    chunk = tl.cdiv(tl.cdiv(seqlen, num_splits), BLOCK_N) * BLOCK_N
    start = pid_k * chunk
    end = tl.minimum(start + chunk, tl.max(limit, axis=0))

    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < d_v
    b64 = pid_b.to(tl.int64)
    q_rows = q_ptr + b64 * stride_qb + qi.to(tl.int64) * stride_qs + head.to(tl.int64) * stride_qh
    qa = tl.load(q_rows[:, None] + dv[None, :], mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    if UPCAST:
        qa = qa.to(tl.float32)
    if HAS_REST:
        dr = tl.arange(0, BLOCK_DR)
        dr_ok = dr < d_rest
        qb = tl.load(q_rows[:, None] + d_v + dr[None, :], mask=row_ok[:, None] & dr_ok[None, :], other=0.0)
        if UPCAST:
            qb = qb.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    table = block_table_ptr + b64 * stride_btb
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        tok_ok = tok < end
        # Table entries past the sequence are never read (they may hold anything).
        page = tl.load(table + (tok // PAGE) * stride_btn, mask=tok_ok, other=0)
        kv_rows = kv_ptr + page.to(tl.int64) * stride_kvb + (tok % PAGE).to(tl.int64) * stride_kvt
        ka = tl.load(kv_rows[:, None] + dv[None, :], mask=tok_ok[:, None] & dv_ok[None, :], other=0.0)
        if UPCAST:
            ka = ka.to(tl.float32)
        s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        if HAS_REST:
            kb = tl.load(kv_rows[:, None] + d_v + dr[None, :], mask=tok_ok[:, None] & dr_ok[None, :], other=0.0)
            if UPCAST:
                kb = kb.to(tl.float32)
            s += tl.dot(qb, tl.trans(kb), input_precision=PREC)
        s = tl.where(tok[None, :] < limit[:, None], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing visible yet keeps m = -inf; subtracting 0 instead keeps exp2 NaN-free.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(ka.dtype), ka, input_precision=PREC)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    o_rows = o_ptr + b64 * stride_ob + qi.to(tl.int64) * stride_os + head.to(tl.int64) * stride_oh + pid_k * stride_ok
    l_rows = lse_ptr + b64 * stride_lb + qi.to(tl.int64) * stride_ls + head.to(tl.int64) * stride_lh + pid_k * stride_lk
    if FINAL:
        lse2 = lse2 * 0.6931471805599453  # log2 -> natural log
    tl.store(o_rows[:, None] + dv[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(l_rows, lse2, mask=row_ok)


@triton.jit
def _mla_decode_combine_kernel(
    o_part_ptr,
    lse_part_ptr,
    out_ptr,
    lse_ptr,
    h,
    d_v,
    num_splits,
    stride_pb,
    stride_pr,
    stride_pk,
    stride_lpb,
    stride_lpr,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_ls,
    stride_lh,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One row (query, head) of one sequence: merge its ``num_splits`` partials by their log2-sum-exp.
    The rows are grid axis 0, which may be large (a CUDA grid's axes 1 and 2 stop at 65535)."""
    row = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    qi = (row // h).to(tl.int64)
    head = (row % h).to(tl.int64)
    ks = tl.arange(0, BLOCK_S)
    lse_row = lse_part_ptr + pid_b * stride_lpb + row * stride_lpr
    lse_k = tl.load(lse_row + ks, mask=ks < num_splits, other=float("-inf"))
    m = tl.max(lse_k, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp2(lse_k - m_safe), axis=0)

    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < d_v
    o_row = o_part_ptr + pid_b * stride_pb + row * stride_pr
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for k in range(0, num_splits):
        w = tl.exp2(tl.load(lse_row + k) - m_safe)
        acc += w * tl.load(o_row + k * stride_pk + dv, mask=dv_ok, other=0.0)

    seen = denom > 0.0
    out = tl.where(seen, acc / tl.where(seen, denom, 1.0), 0.0)
    lse = tl.where(seen, (m_safe + tl.log2(tl.where(seen, denom, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(
        out_ptr + pid_b * stride_ob + qi * stride_os + head * stride_oh + dv,
        out.to(out_ptr.dtype.element_ty),
        mask=dv_ok,
    )
    tl.store(lse_ptr + pid_b * stride_lb + qi * stride_ls + head * stride_lh, lse)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    """The block that holds ``n`` values: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(max(n, 1)))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _check_config(cfg: Mapping[str, int]) -> None:
    for key in ("BLOCK_H", "BLOCK_N"):
        v = cfg[key]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise OpInputError(_OP, "config", f"{key} must be a power of two >= 16 (tl.dot's minimum), got {v!r}")
    if not isinstance(cfg["num_splits"], int) or cfg["num_splits"] < 0:
        raise OpInputError(_OP, "config", f"num_splits must be an int >= 0 (0: automatic), got {cfg['num_splits']!r}")


def _num_splits(cfg: Mapping[str, int], q: torch.Tensor, row_tiles: int, capacity: int) -> int:
    """Splits per sequence: the config's, or enough programs to fill the device, bounded by what the
    block table can hold (a host-side bound: the real lengths live on the device)."""
    if cfg["num_splits"]:
        return cfg["num_splits"]
    base = q.shape[0] * row_tiles
    want = triton.cdiv(_PROGRAMS_PER_SM * _sm_count(q.device), base)
    return max(1, min(want, _MAX_SPLITS, triton.cdiv(capacity, _MIN_KEYS_PER_SPLIT)))


def _split_launch(
    cfg: Mapping[str, int],
    dtype: torch.dtype,
    table_dtype: torch.dtype,
    seqlens_dtype: torch.dtype,
    *,
    page: int,
    d_v: int,
    d_rest: int,
    causal: bool,
    final: bool,
) -> _common.Launch:
    """The split kernel's launch (the launcher's, and the compile specs'): ``final`` writes ``out``
    (q's dtype) and ``lse`` directly, otherwise the fp32 partials."""
    t = _common.ptr(dtype)
    return _common.Launch(
        _mla_decode_split_kernel,
        pointers={
            "q_ptr": t,
            "kv_ptr": t,
            "block_table_ptr": _common.ptr(table_dtype),
            "seqlens_ptr": _common.ptr(seqlens_dtype),
            "o_ptr": t if final else "*fp32",
            "lse_ptr": "*fp32",
        },
        constexprs={
            "PAGE": page,
            "BLOCK_H": cfg["BLOCK_H"],
            "BLOCK_N": _block_n(cfg, dtype),
            "BLOCK_DV": _pow2(d_v),
            "BLOCK_DR": _pow2(d_rest),
            "HAS_REST": d_rest > 0,
            "CAUSAL": bool(causal),
            "FINAL": final,
            "UPCAST": _common.INTERPRETING,
            # input_precision matters only for fp32 operands, where 'ieee' keeps the 1e-5 bound; it is
            # also the one value every target accepts (gfx950 rejects tf32).
            "PREC": "ieee",
        },
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        scalars={"scale_log2": "fp32"},
    )


#: The combine kernel's launch options: one row of ``d_v`` values per program, nothing to pipeline.
_COMBINE_WARPS = 4
_COMBINE_STAGES = 1


def _combine_launch(out_dtype: torch.dtype, splits: int, d_v: int) -> _common.Launch:
    """The combine kernel's launch (the launcher's, and the compile specs')."""
    return _common.Launch(
        _mla_decode_combine_kernel,
        pointers={
            "o_part_ptr": "*fp32",
            "lse_part_ptr": "*fp32",
            "out_ptr": _common.ptr(out_dtype),
            "lse_ptr": "*fp32",
        },
        constexprs={"BLOCK_S": max(2, triton.next_power_of_2(splits)), "BLOCK_DV": _pow2(d_v)},
        num_warps=_COMBINE_WARPS,
        num_stages=_COMBINE_STAGES,
    )


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    head_dim_v: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    config: Mapping[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode over the paged latent cache (contract: :func:`hal.ops.catalogue.mla_decode`).

    :param q: bfloat16 | float16 | float32 [b, s_q, h, d], last dim contiguous.
    :param kv_cache: q's dtype, [num_blocks, block_size, 1, d], last dim contiguous; the page size is
        read from its shape.
    :param block_table: int32 [b, max_blocks_per_seq].
    :param cache_seqlens: int32 [b].
    :param head_dim_v: value dims, ``<= d``.
    :param softmax_scale: ``None`` means ``d ** -0.5``.
    :param causal: query ``i`` of ``s_q`` sees keys ``< cache_seqlens - s_q + i + 1``.
    :param config: ``BLOCK_H`` (query rows per program), ``BLOCK_N`` (keys per step; halved for
        fp32), ``num_splits``
        (0: automatic), ``num_warps``, ``num_stages``; ``None`` means :data:`DEFAULT_CONFIG`.
    :returns: ``(out q's dtype [b, s_q, h, head_dim_v], lse float32 [b, h, s_q])``.
    """
    cfg = _common.merge_config(DEFAULT_CONFIG, config, _OP)
    _check_config(cfg)
    _common.require_device(
        _OP, {"q": q, "kv_cache": kv_cache, "block_table": block_table, "cache_seqlens": cache_seqlens}
    )
    if q.dtype not in _TL_DTYPE:
        raise DTypeError(_OP, "q", f"expected float32 | bfloat16 | float16, got {q.dtype}")
    if q.stride(3) != 1 and q.shape[3] > 1:
        raise LayoutError(
            _OP, "q", f"the last dim must be contiguous (stride 1), got strides {q.stride()}; call .contiguous()"
        )
    if kv_cache.stride(3) != 1 and kv_cache.shape[3] > 1:
        raise LayoutError(
            _OP, "kv_cache", f"the last dim must be contiguous (stride 1), got strides {kv_cache.stride()}"
        )
    b, s_q, h, d = q.shape
    page = kv_cache.shape[1]
    # The kernel reads one length per program at ``cache_seqlens + b`` (no stride): a strided view would
    # be read from the wrong memory. It is b ints, so a copy costs nothing.
    cache_seqlens = cache_seqlens.contiguous()
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    out = _common.empty((b, s_q, h, head_dim_v), q.dtype, q.device)
    lse = _common.empty((b, h, s_q), torch.float32, q.device)
    rows = s_q * h
    if b == 0 or rows == 0:
        return out, lse

    row_tiles = triton.cdiv(rows, cfg["BLOCK_H"])
    splits = _num_splits(cfg, q, row_tiles, block_table.shape[1] * page)
    d_rest = d - head_dim_v
    pointers = (q.dtype, block_table.dtype, cache_seqlens.dtype)
    args = (q, kv_cache, block_table, cache_seqlens)
    sizes = (s_q, h, head_dim_v, d_rest, splits, scale * _LOG2E)
    strides = (q.stride(0), q.stride(1), q.stride(2), kv_cache.stride(0), kv_cache.stride(1), *block_table.stride())
    if splits == 1:
        launch = _split_launch(cfg, *pointers, page=page, d_v=head_dim_v, d_rest=d_rest, causal=causal, final=True)
        launch(
            (b, row_tiles, 1), *args, out, lse, *sizes, *strides,
            *out.stride()[:3], 0, lse.stride(0), lse.stride(2), lse.stride(1), 0,
        )  # fmt: skip
        return out, lse

    # Scratch, one partial per split: o_part [b, s_q * h, splits, head_dim_v], lse_part [b, s_q * h, splits]
    # (poisonable too, so a split that forgets to write fails the tests).
    o_part = _common.empty((b, rows, splits, head_dim_v), torch.float32, q.device)
    lse_part = _common.empty((b, rows, splits), torch.float32, q.device)
    p_row, l_row = o_part.stride(1), lse_part.stride(1)
    launch = _split_launch(cfg, *pointers, page=page, d_v=head_dim_v, d_rest=d_rest, causal=causal, final=False)
    launch(
        (b, row_tiles, splits), *args, o_part, lse_part, *sizes, *strides,
        o_part.stride(0), h * p_row, p_row, o_part.stride(2),
        lse_part.stride(0), h * l_row, l_row, lse_part.stride(2),
    )  # fmt: skip
    _combine_launch(q.dtype, splits, head_dim_v)(
        (rows, b), o_part, lse_part, out, lse, h, head_dim_v, splits,
        o_part.stride(0), p_row, o_part.stride(2), lse_part.stride(0), l_row,
        *out.stride()[:3], lse.stride(0), lse.stride(2), lse.stride(1),
    )  # fmt: skip
    return out, lse


OPS = {"mla_decode": mla_decode}
REFERENCE = {"mla_decode": "hal_cpu.reference.attention:mla_decode"}


# ---------------------------------------------------------------------------------------------------
# Compile specs
# ---------------------------------------------------------------------------------------------------

#: What Triton's JIT sees as multiples of 16 at a DeepSeek-V3 launch (h 128, d 576 = 512 + 64): pointers,
#: the value and rest dims, and the row strides of q, the cache and the outputs; not s_q, the block
#: table's width or the split count (any value), nor the lse strides that depend on them.
_SPLIT_DIVISIBLE = (
    "q_ptr kv_ptr block_table_ptr seqlens_ptr o_ptr lse_ptr h d_v d_rest".split()
    + "stride_qb stride_qs stride_qh stride_kvb stride_kvt stride_ob stride_os stride_oh".split()
)
_COMBINE_DIVISIBLE = (
    "o_part_ptr lse_part_ptr out_ptr lse_ptr h d_v stride_pb stride_pr stride_pk stride_ob stride_os stride_oh".split()
)

#: DeepSeek-V3's cache: 64-token pages of 576 values, the first 512 the value.
_SPEC_SHAPE = {"page": 64, "d_v": 512, "d_rest": 64}


def compile_specs(fp8: str, tuning: Mapping[str, Mapping[str, int]]) -> list[_common.CompileSpec]:
    """DeepSeek-V3 shapes (576 = 512 + 64, page 64, int32 block table and lengths) for bf16, fp16 and fp32:
    the split kernel both as the partial pass and as the single-split final pass, non-causal (the model's
    decode) and, for bf16, causal; and the combine kernel (up to 64 splits).

    :param fp8: the target's fp8 pointer type (unused: no fp8 path).
    :param tuning: op name → config; ``mla_decode``'s overrides :data:`DEFAULT_CONFIG`.
    """
    del fp8
    cfg = _common.merge_config(DEFAULT_CONFIG, tuning.get(_OP), _OP)
    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = _common.ptr(dtype)[1:]
        for causal in (False, True) if dtype == torch.bfloat16 else (False,):
            for final in (False, True):
                launch = _split_launch(cfg, dtype, torch.int32, torch.int32, **_SPEC_SHAPE, causal=causal, final=final)
                flags = (", causal" if causal else "") + (", final" if final else "")
                divisible = (*_SPLIT_DIVISIBLE, *(() if final else ("stride_ok",)))
                specs.append(launch.spec(f"mla_decode_split[{t}{flags}]", divisible))
        combine = _combine_launch(dtype, _MAX_SPLITS, _SPEC_SHAPE["d_v"])
        specs.append(combine.spec(f"mla_decode_combine[{t}]", tuple(_COMBINE_DIVISIBLE)))
    return specs
