"""An example third-party HAL plugin: the ``example`` backend, and an override of one ``cpu`` op.

This module is what the ``hal`` entry point names. It stays light: it imports HAL's plugin API and
nothing heavy; ``hal_example.ops`` is imported only when a backend is built.
"""

from __future__ import annotations

from typing import Any

import torch

import hal


def _probe() -> hal.Availability:
    # A real vendor plugin reads cheap facts here (a driver library's device count, a /sys file) and
    # never creates a device context. This one runs wherever torch does.
    return hal.Availability.yes("runs on any CPU (example plugin)")


def _load() -> hal.BackendImpl:
    from hal_example import ops

    return ops.build()


@hal.hookimpl
def hal_register_backends(register: Any) -> None:
    register(
        hal.BackendSpec(
            name="example",
            priority=-10,  # below cpu: an example must not become anyone's default
            probe=_probe,
            load=_load,
            description="example third-party backend (tiled fp32 GEMM, fused small ops)",
        )
    )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    from hal_example import ops

    return ops.rms_norm(x, weight, eps=eps)


@hal.hookimpl
def hal_register_ops(register: Any) -> None:
    # Override one op of another package's backend: cpu's rms_norm, where the device is a CPU.
    register(
        "rms_norm",
        _rms_norm,
        backend="cpu",
        priority=10,
        when=lambda caps: caps.device_type == "cpu",
        name="hal_example.ops:rms_norm",
    )
