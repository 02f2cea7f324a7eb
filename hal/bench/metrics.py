"""Work per case (FLOPs and bytes) by the anchors' formulas, and the figures derived from a time.

The formulas are those of ``shared/BENCHMARKS.md``, so HAL's figures compare with the published ones:

- GEMM: ``2·M·N·K`` FLOPs; bytes ``M·K + K·N`` inputs at their element size plus ``M·N`` outputs at
  theirs (``M·K + K·N + 2·M·N`` for FP8 in, bf16 out; FP8 scales excluded).
- Grouped GEMM: ``2·(Σ rows)·N·K`` FLOPs; bytes: the valid rows in and out, and the weights of every
  expert that owns a row.
- MLA decode: ``2·s_q·Σs_k·h_q·(d + d_v)`` FLOPs; ``(Σs_k·d + b·s_q·h_q·(d + d_v))·2`` bytes for bf16,
  scaled by the element size for other dtypes.
- Prefill attention: ``2·(visible query-key pairs)·h·(d_qk + d_v)`` FLOPs; q, k, v and the output once.
- Small ops: the bytes a single pass reads and writes, and a nominal count of arithmetic per element
  (stated beside each formula in :mod:`hal.bench.cases`). Pure data movement (``moe_permute``) has no
  FLOPs: its TFLOPS is ``None``, and it is judged on bandwidth alone.

Derived figures: TFLOPS, GB/s (10⁹ bytes/s), arithmetic intensity (FLOPs/byte), and the percentage of
the device's peak (:mod:`hal.bench.peaks`). ``bound`` says which roof limits the case at its
intensity: ``compute`` when the intensity reaches the ridge point (peak FLOP/s ÷ peak bytes/s),
``memory`` below it; ``pct_peak`` is the achieved fraction of *that* roof, so 100% means the case runs
at the hardware's limit for its shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Derived",
    "Work",
    "attention_prefill_work",
    "derive",
    "gemm_work",
    "grouped_gemm_work",
    "mla_decode_work",
]


@dataclass(frozen=True)
class Work:
    """What one call of a case does.

    :param flops: floating-point operations (integer multiply-adds for INT8; 0 for pure data movement).
    :param bytes: bytes that must cross the memory interface at least once (reads + writes).
    :param peak_dtype: which compute peak applies: ``"float32"``, ``"bfloat16"``, ``"float16"``,
        ``"float8"`` or ``"int8"``.
    """

    flops: float
    bytes: float
    peak_dtype: str


@dataclass(frozen=True)
class Derived:
    """Figures derived from a case's :class:`Work` and its median time.

    ``tflops``, ``intensity`` and ``pct_peak_compute`` are ``None`` for a case without FLOPs; the
    percentages are ``None`` where the device's peak is unknown. ``bound`` is ``compute`` or ``memory``
    (the roof that bounds the case; ``memory`` for a case without FLOPs), or ``unknown`` when the case
    has FLOPs but the dense peak for its dtype is unknown (``pct_peak`` is then ``None``).
    """

    tflops: float | None
    gbps: float
    intensity: float | None
    pct_peak: float | None
    pct_peak_compute: float | None
    pct_peak_bandwidth: float | None
    bound: str


def gemm_work(m: int, n: int, k: int, in_bytes: int, out_bytes: int, peak_dtype: str) -> Work:
    """``x [M, K] @ w [N, K].T``: ``2·M·N·K`` FLOPs, ``(M·K + N·K)·in + M·N·out`` bytes."""
    return Work(2.0 * m * n * k, float((m * k + n * k) * in_bytes + m * n * out_bytes), peak_dtype)


def grouped_gemm_work(rows: Sequence[int], n: int, k: int, in_bytes: int, out_bytes: int, peak_dtype: str) -> Work:
    """Experts' GEMMs over ``rows[e]`` valid rows each: ``2·Σrows·N·K`` FLOPs; rows in and out, and the
    weights of every expert with at least one row."""
    total = sum(rows)
    used = sum(1 for r in rows if r > 0)
    return Work(
        2.0 * total * n * k, float(total * k * in_bytes + used * n * k * in_bytes + total * n * out_bytes), peak_dtype
    )


def mla_decode_work(b: int, s_q: int, h: int, sum_sk: int, d: int, dv: int, elem_bytes: int, peak_dtype: str) -> Work:
    """FlashMLA's formulas: ``2·s_q·Σs_k·h·(d + d_v)`` FLOPs, ``(Σs_k·d + b·s_q·h·(d + d_v))·elem`` bytes."""
    flops = 2.0 * s_q * sum_sk * h * (d + dv)
    return Work(flops, float((sum_sk * d + b * s_q * h * (d + dv)) * elem_bytes), peak_dtype)


def attention_prefill_work(
    lens_q: Sequence[int],
    lens_k: Sequence[int],
    h: int,
    h_kv: int,
    d_qk: int,
    d_v: int,
    causal: bool,
    elem_bytes: int,
    peak_dtype: str,
) -> Work:
    """Varlen attention: ``2·pairs·h·(d_qk + d_v)`` FLOPs over the visible (query, key) pairs (causal:
    bottom-right aligned); q, k, v and the output read or written once."""
    pairs = 0
    for lq, lk in zip(lens_q, lens_k, strict=True):
        if causal:
            # query i sees keys j <= i + lk - lq
            pairs += sum(min(lk, max(0, i + lk - lq + 1)) for i in range(lq))
        else:
            pairs += lq * lk
    tq, tk = sum(lens_q), sum(lens_k)
    moved = (tq * h * d_qk + tk * h_kv * (d_qk + d_v) + tq * h * d_v) * elem_bytes
    return Work(2.0 * pairs * h * (d_qk + d_v), float(moved), peak_dtype)


def derive(work: Work, seconds: float, peak_flops: float | None, peak_bandwidth: float | None) -> Derived:
    """TFLOPS, GB/s, intensity and percentages of the peaks for ``work`` done in ``seconds``.

    :param peak_flops: the device's dense peak in FLOP/s for ``work.peak_dtype`` (``None``: unknown).
    :param peak_bandwidth: the device's memory bandwidth in bytes/s (``None``: unknown).
    """
    if not seconds > 0:
        raise ValueError(f"derive: seconds must be > 0, got {seconds!r}")
    flop_rate = work.flops / seconds
    byte_rate = work.bytes / seconds
    has_flops = work.flops > 0
    intensity = work.flops / work.bytes if has_flops and work.bytes > 0 else None
    pct_c = 100.0 * flop_rate / peak_flops if has_flops and peak_flops else None
    pct_b = 100.0 * byte_rate / peak_bandwidth if peak_bandwidth else None
    bound = "memory"
    if intensity is not None and not peak_flops:
        # Without the compute roof the ridge is unknown: neither roof can be said to bound the case.
        bound = "unknown"
    elif intensity is not None and peak_flops and peak_bandwidth and intensity >= peak_flops / peak_bandwidth:
        bound = "compute"
    elif intensity is not None and not peak_bandwidth:
        bound = "compute"
    pct_peak = {"compute": pct_c, "memory": pct_b}.get(bound)
    return Derived(
        tflops=flop_rate / 1e12 if has_flops else None,
        gbps=byte_rate / 1e9,
        intensity=intensity,
        pct_peak=pct_peak,
        pct_peak_compute=pct_c,
        pct_peak_bandwidth=pct_b,
        bound=bound,
    )
