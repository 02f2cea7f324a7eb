"""hal_kernels.prefill against hal_cpu.reference.attention.attention_prefill under the interpreter.

Kernel and oracle do the same fp32 math on the same inputs (the kernel upcasts right after each load
when interpreting); they differ in summation order and in exp2 with a folded log2(e) against exp
(measured: at most 5e-7 absolute on outputs of magnitude ~1). Tolerances by dtype (``TOL``): fp32
1e-5 (DESIGN.md's bound, an order of magnitude of margin); bf16 and fp16 one ulp of the output type
(2^-7, 2^-10 relative): the interpreter's fp32 -> bf16 store truncates where torch rounds to nearest,
so one ulp apart is the best agreement possible. The output is poisoned (conftest), so a query row
the kernel never writes (a tile it skips, a sequence it mis-locates) fails the comparison.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import pytest
import torch

from hal.errors import DTypeError, LayoutError, OpInputError
from hal_kernels import _common, prefill
from tests.kernels.conftest import reference

ATTENTION_PREFILL = reference(prefill, "attention_prefill")

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
}
#: small interpreter tiles: several query tiles and key steps per sequence at small lengths.
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16}


def _cu(lens: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@dataclass(frozen=True)
class Case:
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    h: int
    h_kv: int
    d_qk: int
    d_v: int
    causal: bool = True
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (
            f"Q{'.'.join(map(str, self.lens_q))}-K{'.'.join(map(str, self.lens_k))}-h{self.h}-hkv{self.h_kv}"
            f"-d{self.d_qk}-dv{self.d_v}-{'causal' if self.causal else 'full'}-{dt}"
        )


def _self(
    lens: tuple[int, ...],
    h: int,
    h_kv: int,
    d_qk: int,
    d_v: int,
    causal: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Case:
    """A prefill case: every sequence's queries are its keys."""
    return Case(lens, lens, h, h_kv, d_qk, d_v, causal, dtype)


CASES = [
    # DeepSeek-V3's MLA prefill dims (192 = 128 + 64 against 128), lengths crossing tiles, bf16 and fp16.
    _self((37, 1), 2, 2, 192, 128, dtype=torch.bfloat16),
    _self((20,), 2, 2, 192, 128, dtype=torch.float16),
    # Ragged batch with an empty sequence and a length-1 one, GQA (2 query heads per kv head), d_qk
    # 24 = 16 + 8 and d_v 16.
    _self((5, 0, 40, 1), 4, 2, 24, 16),
    _self((5, 0, 40, 1), 4, 2, 24, 16, causal=False),
    # The tiny model (d_qk 64, a power of two: no second part; d_v 32), MQA (one kv head).
    _self((33, 16, 17), 4, 1, 64, 32, dtype=torch.bfloat16),
    # Fewer queries than keys (the expanded decode path: one query per sequence over its whole cache),
    # bottom-right aligned; nine sequences, so the tile search takes several steps.
    Case((1, 1, 1, 2, 1, 1, 3, 1, 1), (9, 3, 70, 2, 1, 16, 40, 5, 33), 2, 1, 24, 16),
    # More queries than keys, causal: the first queries see no key (zeros); a sequence without keys.
    Case((10, 4), (4, 0), 2, 2, 40, 20),
    Case((10, 4), (4, 0), 2, 2, 40, 20, causal=False),
    # Head dims below 16 (padded to tl.dot's minimum) and non-power-of-two (d_qk 40 = 32 + 8, d_v 20);
    # Lk - Lq = 14 puts the diagonal one key short of a 16-key step: the unmasked steps must stop before it.
    _self((18, 3), 3, 3, 8, 8),
    Case((7, 30), (21, 31), 3, 1, 40, 20, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_prefill(case: Case) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    cu_q, cu_k = _cu(case.lens_q), _cu(case.lens_k)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q = torch.randn(tq, case.h, case.d_qk, generator=gen).to(case.dtype)
    k = torch.randn(tk, case.h_kv, case.d_qk, generator=gen).to(case.dtype)
    v = torch.randn(tk, case.h_kv, case.d_v, generator=gen).to(case.dtype)
    got = prefill.attention_prefill(q, k, v, cu_q, cu_k, causal=case.causal, config=SMALL)
    want = ATTENTION_PREFILL(q, k, v, cu_q, cu_k, causal=case.causal)
    assert got.dtype == case.dtype and got.shape == (tq, case.h, case.d_v)
    torch.testing.assert_close(got, want, **TOL[case.dtype])


def test_attention_prefill_default_config_scale_and_strides() -> None:
    """The default config (128-query tiles, 16-key steps in fp32), an explicit scale, and q, k, v as
    views with strides (as the model's k is a slice of a concatenation); last dims contiguous."""
    gen = torch.Generator().manual_seed(3)
    lens = (150, 9)
    cu = _cu(lens)
    q = torch.randn(159, 2, 30, generator=gen)[..., 3:27]
    kv = torch.randn(159, 1, 24 + 16, generator=gen)
    k, v = kv[..., :24], kv[..., 24:]
    got = prefill.attention_prefill(q, k, v, cu, cu, softmax_scale=0.2)
    torch.testing.assert_close(got, ATTENTION_PREFILL(q, k, v, cu, cu, softmax_scale=0.2), **TOL[torch.float32])


def test_attention_prefill_strided_cu_seqlens() -> None:
    """Offsets given as a strided view (a column of a table) are read by value, not from the memory
    behind them (the kernel reads them without a stride)."""
    gen = torch.Generator().manual_seed(4)
    table = torch.tensor([[0, 0], [5, 3], [12, 9]], dtype=torch.int32)
    cu = table[:, 0]  # [0, 5, 12], stride 2
    q, k, v = (torch.randn(12, 2, 16, generator=gen) for _ in range(3))
    got = prefill.attention_prefill(q, k, v, cu, cu, causal=True)
    torch.testing.assert_close(got, ATTENTION_PREFILL(q, k, v, cu, cu, causal=True), **TOL[torch.float32])


def test_attention_prefill_empty() -> None:
    cu = torch.zeros(2, dtype=torch.int32)
    got = prefill.attention_prefill(torch.zeros(0, 2, 24), torch.zeros(0, 1, 24), torch.zeros(0, 1, 16), cu, cu)
    assert got.shape == (0, 2, 16)


# ---------------------------------------------------------------------------------------------------
# Launcher errors
# ---------------------------------------------------------------------------------------------------


def _args(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    cu = torch.tensor([0, 4], dtype=torch.int32)
    return (
        torch.zeros(4, 2, 24, dtype=dtype),
        torch.zeros(4, 2, 24, dtype=dtype),
        torch.zeros(4, 2, 16, dtype=dtype),
        cu,
        cu,
    )


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"BLOCK_H": 16}, "unknown keys"),
        ({"BLOCK_M": 48}, "BLOCK_M must be a power of two >= 16"),
        ({"BLOCK_N": 8}, "BLOCK_N must be a power of two >= 16"),
    ],
)
def test_attention_prefill_rejects_bad_config(config: dict[str, int], match: str) -> None:
    with pytest.raises(OpInputError, match=match) as info:
        prefill.attention_prefill(*_args(), config=config)
    assert info.value.op == "attention_prefill" and info.value.arg == "config"


def test_attention_prefill_rejects_what_the_kernel_cannot_read(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, cu_q, cu_k = _args()
    transposed = v.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(LayoutError, match="v: the last dim must be contiguous"):
        prefill.attention_prefill(q, k, transposed, cu_q, cu_k)
    with pytest.raises(DTypeError, match=re.escape("q: expected float32 | bfloat16 | float16, got torch.float64")):
        prefill.attention_prefill(*_args(torch.float64))
    monkeypatch.setattr(_common, "INTERPRETING", False)
    with pytest.raises(OpInputError, match="q: is on the CPU"):
        prefill.attention_prefill(q, k, v, cu_q, cu_k)
