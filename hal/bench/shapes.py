"""Shape sets: the sizes each op is benchmarked at, keyed by set name.

``deepseek-v3`` holds the published anchors' shapes (``shared/BENCHMARKS.md``): DeepGEMM's dense
(N, K) pairs at M = 64 / 128 / 4096, its grouped contiguous (4×8192 and 8×4096 rows) and masked
(1×1024, 2×512, 4×256 rows) layouts (the W8A8 INT8 GEMMs use the same), FlashMLA's decode
configurations (b = 128, h_q 16..128, s_q 1 or 2, mean s_k 4096..16384, pages of 64), DeepEP's
dispatch/combine sizes (4096 and 128 tokens, hidden 7168, top-8), and DeepSeek-V3's own sizes for the
small ops. Float ops run in bfloat16 there.

``cpu-small`` holds the same ops at sizes a 2-core CPU runs in well under a second per case, in
float32 (a CPU without bf16 matrix units computes bf16 through fp32 anyway).

Each :class:`Shape` carries op-specific parameters; ``quick`` marks the subset ``hal bench --quick``
runs (at least one shape of every op).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SHAPE_SETS", "Shape", "ShapeSet", "default_shape_set", "shape_set"]


@dataclass(frozen=True)
class Shape:
    """One benchmarked size of one op.

    :param id: readable id, unique within the op (``M64-N2112-K7168``); results are matched on it.
    :param params: the op's size parameters (see :mod:`hal.bench.cases` for each op's keys).
    :param quick: part of the ``--quick`` subset.
    """

    id: str
    params: Mapping[str, Any] = field(hash=False)
    quick: bool = False


@dataclass(frozen=True)
class ShapeSet:
    """A named set of shapes for every benchmarked op.

    :param name: the set's name (``--shapes NAME``).
    :param description: one line for ``--help`` and the JSON document.
    :param dtype: the float dtype of the float ops (``"bfloat16"``, ``"float32"``); FP8 ops use the
        backend's FP8 format whatever this says.
    :param shapes: op name → its shapes.
    """

    name: str
    description: str
    dtype: str
    shapes: Mapping[str, Sequence[Shape]]

    def for_op(self, op: str, quick: bool = False) -> list[Shape]:
        """The shapes of ``op`` (only the quick ones with ``quick``); ``[]`` when the set has none."""
        return [s for s in self.shapes.get(op, ()) if s.quick or not quick]


# ---------------------------------------------------------------------------------------------------
# Builders: each returns the Shapes of one op
# ---------------------------------------------------------------------------------------------------


def _gemm(mnk: Sequence[tuple[int, int, int]], quick: Sequence[tuple[int, int, int]]) -> list[Shape]:
    return [Shape(f"M{m}-N{n}-K{k}", {"m": m, "n": n, "k": k}, (m, n, k) in quick) for m, n, k in mnk]


def _quantize(mk: Sequence[tuple[int, int]], quick: Sequence[tuple[int, int]]) -> list[Shape]:
    return [Shape(f"M{m}-K{k}", {"m": m, "k": k}, (m, k) in quick) for m, k in mk]


def _contiguous(cfgs: Sequence[tuple[int, int, int, int]], quick: Sequence[int]) -> list[Shape]:
    """(experts, rows per expert, N, K): DeepGEMM's contiguous layout, every expert equally loaded."""
    return [
        Shape(f"E{e}x{rows}-N{n}-K{k}", {"groups": [rows] * e, "n": n, "k": k}, i in quick)
        for i, (e, rows, n, k) in enumerate(cfgs)
    ]


def _masked(cfgs: Sequence[tuple[int, int, int, int]], quick: Sequence[int]) -> list[Shape]:
    """(experts, max_m, N, K): DeepGEMM's masked layout with every row of every expert valid."""
    return [
        Shape(f"E{e}xM{m}-N{n}-K{k}", {"experts": e, "max_m": m, "masked_m": [m] * e, "n": n, "k": k}, i in quick)
        for i, (e, m, n, k) in enumerate(cfgs)
    ]


def _mla(cfgs: Sequence[tuple[int, int, int, int]], quick: Sequence[tuple[int, int, int, int]]) -> list[Shape]:
    """(b, s_q, h_q, mean s_k): FlashMLA's decode configuration, d = 576, d_v = 512, pages of 64."""
    return [
        Shape(
            f"B{b}-SQ{sq}-H{h}-SK{sk}",
            {"b": b, "s_q": sq, "h": h, "mean_sk": sk, "d": 576, "dv": 512, "causal": sq > 1},
            (b, sq, h, sk) in quick,
        )
        for b, sq, h, sk in cfgs
    ]


def _prefill(cfgs: Sequence[tuple[int, int, int]], quick: Sequence[int]) -> list[Shape]:
    """(sequences, tokens each, heads): MLA prefill with keys/values expanded per head (d_qk 192, d_v 128)."""
    return [
        Shape(
            f"B{b}xL{n}-H{h}-D192-DV128",
            {"lens_q": [n] * b, "lens_k": [n] * b, "h": h, "h_kv": h, "d_qk": 192, "d_v": 128, "causal": True},
            i in quick,
        )
        for i, (b, n, h) in enumerate(cfgs)
    ]


def _route(tokens: Sequence[int], quick: Sequence[int]) -> list[Shape]:
    """DeepSeek-V3 routing: 256 experts in 8 groups, top 4 groups, top-8, bias, scaling 2.5."""
    return [
        Shape(
            f"T{t}-E256-K8-G8-TG4",
            {"t": t, "e": 256, "top_k": 8, "n_group": 8, "topk_group": 4, "scaling": 2.5},
            t in quick,
        )
        for t in tokens
    ]


def _permute(cfgs: Sequence[tuple[int, int]], quick: Sequence[int], e: int = 256, top_k: int = 8) -> list[Shape]:
    """(tokens, hidden) with DeepEP's top-8 of 256 experts."""
    return [Shape(f"T{t}-H{h}-E{e}-K{top_k}", {"t": t, "h": h, "e": e, "top_k": top_k}, t in quick) for t, h in cfgs]


def _rows(cfgs: Sequence[tuple[int, int]], quick: Sequence[tuple[int, int]], label: str = "D") -> list[Shape]:
    return [Shape(f"T{t}-{label}{d}", {"t": t, "d": d}, (t, d) in quick) for t, d in cfgs]


def _rotary(cfgs: Sequence[tuple[int, int, int]], quick: Sequence[int]) -> list[Shape]:
    """(tokens, heads, rope dim 64): DeepSeek's interleaved layout."""
    return [
        Shape(f"T{t}-H{h}-D{d}", {"t": t, "h": h, "d": d, "interleaved": True}, i in quick)
        for i, (t, h, d) in enumerate(cfgs)
    ]


def _collective(cfgs: Sequence[tuple[str, int, int, int]]) -> dict[str, list[Shape]]:
    """DeepEP-style payloads: (kind, tokens, hidden, top_k); all_reduce of [tokens, hidden] activations."""
    out: dict[str, list[Shape]] = {"all_reduce": [], "all_to_all": []}
    for kind, t, h, k in cfgs:
        if kind == "all_reduce":
            out["all_reduce"].append(Shape(f"T{t}-H{h}", {"t": t, "h": h}, True))
        else:
            # FP8 dispatch: hidden fp8 values + one fp32 scale per 128 + 16 bytes of routing metadata per
            # (token, expert) row; bf16 combine: 2 * hidden bytes per row.
            row = h + h // 128 * 4 + 16 if kind == "dispatch" else 2 * h
            out["all_to_all"].append(
                Shape(f"{kind}-T{t}-H{h}-K{k}", {"kind": kind, "t": t, "h": h, "top_k": k, "row_bytes": row}, True)
            )
    return out


# ---------------------------------------------------------------------------------------------------
# The sets
# ---------------------------------------------------------------------------------------------------

# DeepGEMM's dense FP8 (N, K) pairs (DeepSeek-V3's projections), timed at M = 64, 128, 4096.
_DEEPGEMM_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
_DS_GEMM = [(m, n, k) for m in (64, 128, 4096) for n, k in _DEEPGEMM_NK]
_DS_GEMM_QUICK = [(128, 2112, 7168), (4096, 4096, 7168)]

DEEPSEEK_V3 = ShapeSet(
    name="deepseek-v3",
    description="DeepSeek-V3 sizes of the published anchors (DeepGEMM, FlashMLA, DeepEP), bfloat16 and FP8",
    dtype="bfloat16",
    shapes={
        "gemm": _gemm(_DS_GEMM, _DS_GEMM_QUICK),
        "quantize_fp8": _quantize([(128, 7168), (4096, 7168), (4096, 2048)], [(4096, 7168)]),
        "gemm_fp8": _gemm(_DS_GEMM, _DS_GEMM_QUICK),
        "grouped_gemm": _contiguous([(4, 8192, 4096, 7168), (8, 4096, 4096, 7168), (4, 8192, 7168, 2048),
                                     (8, 4096, 7168, 2048)], [0]),
        "grouped_gemm_masked": _masked([(1, 1024, 4096, 7168), (2, 512, 4096, 7168), (4, 256, 4096, 7168)], [2]),
        "grouped_gemm_fp8": _contiguous([(4, 8192, 4096, 7168), (8, 4096, 4096, 7168), (4, 8192, 7168, 2048),
                                         (8, 4096, 7168, 2048)], [0]),
        "grouped_gemm_fp8_masked": _masked([(1, 1024, 4096, 7168), (2, 512, 4096, 7168), (4, 256, 4096, 7168)],
                                           [2]),
        # W8A8 (Ascend's and vllm-ascend's DeepSeek path): the FP8 GEMMs' shapes.
        "quantize_int8": _quantize([(128, 7168), (4096, 7168), (4096, 2048)], [(4096, 7168)]),
        "gemm_int8": _gemm(_DS_GEMM, _DS_GEMM_QUICK),
        "grouped_gemm_int8": _contiguous([(4, 8192, 4096, 7168), (8, 4096, 4096, 7168), (4, 8192, 7168, 2048),
                                          (8, 4096, 7168, 2048)], [0]),
        "mla_decode": _mla(
            [(128, sq, h, sk) for sq in (1, 2) for h in (16, 32, 64, 128) for sk in (4096, 8192, 16384)],
            [(128, 1, 128, 4096), (128, 2, 16, 8192)],
        ),
        "attention_prefill": _prefill([(2, 4096, 128), (8, 1024, 128)], [1]),
        "moe_route": _route([128, 4096], [4096]),
        "moe_permute": _permute([(128, 7168), (4096, 7168)], [4096]),
        "moe_unpermute": _permute([(128, 7168), (4096, 7168)], [4096]),
        # hidden 7168, q LoRA 1536, kv LoRA 512: the three norms of a DeepSeek-V3 layer.
        "rms_norm": _rows([(4096, 7168), (4096, 1536), (4096, 512), (128, 7168)], [(4096, 7168)]),
        "rotary": _rotary([(4096, 128, 64), (128, 128, 64)], [0]),
        # the MoE experts' and the dense layers' intermediate sizes (SwiGLU input is 2N wide).
        "silu_and_mul": _rows([(4096, 2048), (128, 18432), (4096, 18432)], [(4096, 2048)], label="N"),
        **_collective([("all_reduce", 4096, 7168, 0), ("all_reduce", 128, 7168, 0), ("dispatch", 4096, 7168, 8),
                       ("combine", 4096, 7168, 8), ("dispatch", 128, 7168, 8), ("combine", 128, 7168, 8)]),
    },
)

CPU_SMALL = ShapeSet(
    name="cpu-small",
    description="the same ops at sizes a 2-core CPU runs in well under a second per case, float32",
    dtype="float32",
    shapes={
        "gemm": _gemm([(1, 1024, 1024), (16, 1024, 1024), (64, 1024, 1024), (64, 512, 256)],
                      [(1, 1024, 1024), (64, 1024, 1024)]),
        "quantize_fp8": _quantize([(64, 1024), (256, 1024)], [(256, 1024)]),
        "gemm_fp8": _gemm([(1, 1024, 1024), (64, 1024, 1024), (64, 512, 256)], [(64, 1024, 1024)]),
        "grouped_gemm": _contiguous([(4, 64, 512, 256), (8, 16, 256, 512)], [0]),
        "grouped_gemm_masked": _masked([(1, 64, 512, 256), (4, 16, 512, 256)], [1]),
        "grouped_gemm_fp8": _contiguous([(4, 64, 512, 256), (8, 16, 256, 512)], [0]),
        "grouped_gemm_fp8_masked": _masked([(1, 64, 512, 256), (4, 16, 512, 256)], [1]),
        "quantize_int8": _quantize([(64, 1024), (256, 1024)], [(256, 1024)]),
        "gemm_int8": _gemm([(1, 1024, 1024), (64, 1024, 1024), (64, 512, 256)], [(64, 1024, 1024)]),
        "grouped_gemm_int8": _contiguous([(4, 64, 512, 256), (8, 16, 256, 512)], [0]),
        "mla_decode": _mla([(4, 1, 16, 512), (2, 2, 8, 128), (4, 2, 16, 256)], [(4, 1, 16, 512), (2, 2, 8, 128)]),
        "attention_prefill": _prefill([(2, 128, 8), (2, 256, 16)], [0]),
        "moe_route": _route([16, 256], [256]),
        # Working sets of 8 MB and more, past the 2-4 MB L2: memory-bound ops then meet the DRAM roof.
        "moe_permute": _permute([(64, 1024), (1024, 1024)], [1024]),
        "moe_unpermute": _permute([(64, 1024), (512, 1024)], [512]),
        "rms_norm": _rows([(2048, 1024), (64, 512)], [(2048, 1024)]),
        "rotary": _rotary([(2048, 16, 64), (64, 8, 64)], [0]),
        "silu_and_mul": _rows([(1024, 2048), (64, 512)], [(1024, 2048)], label="N"),
        **_collective([("all_reduce", 256, 1024, 0), ("dispatch", 256, 1024, 8), ("combine", 256, 1024, 8)]),
    },
)

#: Every shape set by name.
SHAPE_SETS: Mapping[str, ShapeSet] = {s.name: s for s in (DEEPSEEK_V3, CPU_SMALL)}


def shape_set(name: str) -> ShapeSet:
    """The set ``name``; raises :class:`hal.errors.BenchError` naming the known sets."""
    from hal.errors import BenchError

    try:
        return SHAPE_SETS[name]
    except KeyError:
        raise BenchError(f"--shapes: no shape set {name!r}; known sets: {', '.join(SHAPE_SETS)}") from None


def default_shape_set(device_type: str) -> ShapeSet:
    """``cpu-small`` on a CPU, ``deepseek-v3`` on an accelerator."""
    return CPU_SMALL if device_type == "cpu" else DEEPSEEK_V3
