"""The example backend's op implementations (imported only once a backend is built).

Each function takes exactly the arguments of its catalogue op (see ``hal.ops.catalogue``) and is called
only with input HAL has already validated.
"""

from __future__ import annotations

import torch

import hal

TILE_K = 64


def gemm(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ w.T`` accumulated tile by tile over K in fp32: the shape a hand-written kernel has."""
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    for k0 in range(0, x.shape[1], TILE_K):
        acc += x[:, k0 : k0 + TILE_K].float() @ w[:, k0 : k0 + TILE_K].float().T
    return acc.to(out_dtype or x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm in one pass over fp32 values."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with gate and up the two halves of the last dim."""
    gate, up = x.float().chunk(2, dim=-1)
    return (gate * torch.sigmoid(gate) * up).to(x.dtype)


def build() -> hal.BackendImpl:
    caps = hal.Capabilities(
        device_type="cpu",
        device_name="example CPU backend",
        arch="cpu",
        dtypes=(torch.float32, torch.bfloat16),
        fp8_format=None,
        int8=False,
        memory_bytes=None,
        device_count=1,
        dist_backend="gloo",
    )
    # Runtime ops (memory_stats, ...) are left out on purpose: on a CPU device they fall back to the
    # reference backend's, which `hal info` shows.
    return hal.BackendImpl(
        device=torch.device("cpu"),
        capabilities=caps,
        ops={"gemm": gemm, "rms_norm": rms_norm, "silu_and_mul": silu_and_mul},
    )
