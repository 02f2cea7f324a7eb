"""Which operand layouts this torch's block-scaled ``torch._scaled_mm`` (1x128 activations, 128x128
weights) accepts on this GPU, and whether its answers are right. Run on an NVIDIA GPU::

    python bench/nvidia/scaled_mm_layouts.py

Four layouts of the same product, each at shapes where K / 128 is and is not a multiple of 4 and M is
and is not: with or without M padded to a multiple of 4, and with the weights' scales exactly
[K/128, N/128] or with their K-block dimension padded to a multiple of 4. Each prints ``ok`` with its
relative error against the dequantized fp32 product, or torch's error. ``hal_nvidia.gemm_choice.
scaled_mm_blockwise`` uses the layout this found accepted; its docstring records the finding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hal.quant import dequantize_fp8_blocks, dequantize_fp8_groups, quantize_fp8_blocks

SHAPES = ((1, 256, 256), (6, 384, 640), (128, 256, 256), (128, 128, 512), (1, 2112, 7168), (64, 4096, 7168))


def _layout(xq, xs, wq, ws, *, pad_m: bool, pad_k: bool):  # type: ignore[no-untyped-def]
    m = xq.shape[0]
    if pad_m and m % 4:
        xq = F.pad(xq.view(torch.uint8), (0, 0, 0, -m % 4)).view(xq.dtype)
        xs = F.pad(xs, (0, 0, 0, -m % 4), value=1.0)
    sb = F.pad(ws, (0, -ws.shape[1] % 4), value=1.0).t() if pad_k else ws.t()
    out = torch._scaled_mm(xq, wq.t(), scale_a=xs.t().contiguous().t(), scale_b=sb, out_dtype=torch.float32)
    return out[:m]


def main() -> None:
    dev = torch.device("cuda")
    print(f"torch {torch.__version__} CUDA {torch.version.cuda} on {torch.cuda.get_device_name()}")
    for m, n, k in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        x, w = torch.randn(m, k, device=dev, generator=g), torch.randn(n, k, device=dev, generator=g)
        groups = x.view(m, k // 128, 128)
        xs = groups.abs().amax(-1).clamp(min=1e-4) / 448.0
        xq = (groups / xs[..., None]).to(torch.float8_e4m3fn).view(m, k)
        wq, ws = quantize_fp8_blocks(w, 128)
        ref = dequantize_fp8_groups(xq, xs, 128) @ dequantize_fp8_blocks(wq, ws, 128).t()
        for pad_m in (False, True):
            for pad_k in (False, True):
                try:
                    out = _layout(xq, xs, wq, ws, pad_m=pad_m, pad_k=pad_k)
                    torch.cuda.synchronize()
                    res = f"ok, relative error {float((out - ref).norm() / ref.norm()):.1e}"
                except Exception as exc:
                    res = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:90]}"
                print(f"M={m:<4} N={n:<5} K={k:<5} pad_m={pad_m!s:<5} pad_k={pad_k!s:<5} {res}")


if __name__ == "__main__":
    main()
