"""The reference small ops against float64 oracles written differently: RMSNorm from the sum of squares,
interleaved rotary as complex multiplication (DeepSeek's ``torch.view_as_complex`` code), NeoX rotary
with ``rotate_half`` (transformers' code), and SiLU from its formula ``g / (1 + exp(-g))``.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import hal_cpu.reference.small as ref
from hal.ops.catalogue import op_spec

#: Max-norm relative error allowed, by dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _assert_matches(out: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype, f"dtype {out.dtype}, expected {dtype}"
    assert out.shape == oracle.shape, f"shape {list(out.shape)}, expected {list(oracle.shape)}"
    err = float((out.double() - oracle).abs().max() / oracle.abs().max())
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


def _shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@pytest.mark.parametrize("name", ref.__all__)
def test_signature_matches_catalogue(name: str) -> None:
    def shape(sig: inspect.Signature) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

    assert shape(inspect.signature(getattr(ref, name))) == shape(op_spec(name).signature)


# ---------------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------------

RMS_SHAPES = [(4, 64), (2, 3, 130), (5, 1), (3, 576)]


def _rms_norm_oracle(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    d = x.shape[-1]
    return x64 / torch.sqrt((x64 * x64).sum(dim=-1, keepdim=True) / d + eps) * weight.double()


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
@pytest.mark.parametrize("weight_fp32", [True, False], ids=["w_fp32", "w_same"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=_shape_id)
def test_rms_norm(shape: tuple[int, ...], dtype: torch.dtype, weight_fp32: bool, eps: float) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    # Values around 0.1 make mean(x²) comparable to eps = 1e-2, so a dropped or misplaced eps shows.
    x = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    weight = (1 + torch.randn(shape[-1], generator=gen)).to(torch.float32 if weight_fp32 else dtype)
    out = ref.rms_norm(x, weight, eps=eps)
    _assert_matches(out, _rms_norm_oracle(x, weight, eps), dtype)


def test_rms_norm_zero_row() -> None:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    x[1] = 0
    out = ref.rms_norm(x, torch.ones(16))
    assert out.isfinite().all() and (out[1] == 0).all()


# ---------------------------------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------------------------------

ROTARY_SHAPES = [(5, 64), (6, 3, 64), (4, 2, 3, 8), (1, 1, 2)]
MAX_POS = 37


def _rotary_oracle(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, interleaved: bool) -> torch.Tensor:
    d = x.shape[-1]
    x64 = x.double()
    rows = torch.stack([cache[int(p)] for p in positions]).double()  # [T, D], gathered one at a time
    bshape = (x.shape[0],) + (1,) * (x.dim() - 2) + (d // 2,)
    cos, sin = rows[:, : d // 2].reshape(bshape), rows[:, d // 2 :].reshape(bshape)
    if interleaved:
        # DeepSeek's apply_rotary_emb: adjacent pairs as complex numbers times freqs_cis.
        xc = torch.view_as_complex(x64.reshape(*x.shape[:-1], d // 2, 2).contiguous())
        return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2)
    # transformers' rotate_half form with cos / sin repeated over both halves.
    cos2, sin2 = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    rotated = torch.cat((-x64[..., d // 2 :], x64[..., : d // 2]), dim=-1)
    return x64 * cos2 + rotated * sin2


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=["pos64", "pos32"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ROTARY_SHAPES, ids=_shape_id)
def test_rotary(shape: tuple[int, ...], dtype: torch.dtype, interleaved: bool, pos_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + interleaved)
    d = shape[-1]
    x = torch.randn(shape, generator=gen).to(dtype)
    # Arbitrary cos / sin (not unit-norm pairs, as with YaRN's folded-in scaling) so swapped or
    # misplaced halves show; positions repeat and include the last cache row.
    cache = torch.randn(MAX_POS, d, generator=gen)
    positions = torch.randint(0, MAX_POS, (shape[0],), generator=gen, dtype=pos_dtype)
    positions[-1] = MAX_POS - 1
    out = ref.rotary(x, positions, cache, interleaved=interleaved)
    _assert_matches(out, _rotary_oracle(x, positions, cache, interleaved), dtype)


def test_rotary_real_angles_preserve_pair_norms() -> None:
    """With true angles a rotation keeps each pair's length, and position 0 (angle 0) is the identity."""
    d, t = 16, 5
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    angles = torch.outer(torch.arange(8).float(), inv_freq)
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1)
    x = torch.randn(t, 2, d, generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([0, 1, 7, 3, 0])
    out = ref.rotary(x, positions, cache, interleaved=True)

    def pair_norm(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(t, 2, d // 2, 2).norm(dim=-1)

    torch.testing.assert_close(pair_norm(out), pair_norm(x))
    torch.testing.assert_close(out[0], x[0])
    assert not torch.allclose(out[1], x[1])


# ---------------------------------------------------------------------------------------------------
# silu_and_mul
# ---------------------------------------------------------------------------------------------------

SILU_SHAPES = [(4, 256), (2, 3, 14), (1, 2), (7, 2 * 129)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SILU_SHAPES, ids=_shape_id)
def test_silu_and_mul(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    out = ref.silu_and_mul(x)
    gate, up = x.double().chunk(2, dim=-1)
    _assert_matches(out, gate / (1 + torch.exp(-gate)) * up, dtype)
