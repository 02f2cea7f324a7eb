"""The device's limits: a table of accelerators' published peaks, and the CPU measured at start.

Accelerators are looked up by a normalized device name (:func:`device_key`); the figures are the
vendors' dense (no sparsity) peaks as ``shared/BENCHMARKS.md`` quotes them (H200 and the INT8 and
FP32 figures from the vendors' datasheets; the Ascend 910B's bandwidth is approximate). A CPU has no
meaningful datasheet peak for this purpose, so it is measured when the run starts:

- **read bandwidth**: fp32 GEMV (``torch.mv``) over a 256 MB matrix, the median of a few calls (a
  decode step that reads B bytes of weights cannot be faster than B / this);
- **GEMM rate**: a float32 1024×1024×1024 matmul, the median of a few calls.

These measured values are the CPU's "peaks" (every dtype uses the fp32 rate: a CPU without bf16,
FP8 or INT8 matrix units computes those through fp32 or wider) and are recorded in the results. An
accelerator missing from the table is measured likewise, with device timing, a 1 GiB GEMV and
8192³ fp32 and bf16 matmuls, and labelled ``measured``: achieved figures, not datasheet peaks.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hal.bench.timing import Timer, Timing

__all__ = ["PEAKS_TABLE", "Peaks", "device_key", "measure", "peaks_for"]

TERA = 1e12


@dataclass(frozen=True)
class Peaks:
    """A device's compute and bandwidth limits.

    :param device_name: as the backend reports it.
    :param source: where the figures come from (``table: <key>`` or ``measured``).
    :param compute: dense peak FLOP/s (OP/s for int8) by dtype class (``float32``, ``bfloat16``,
        ``float16``, ``float8``, ``int8``).
    :param bandwidth: memory bandwidth in bytes/s (``None``: unknown).
    :param measured: the raw measurements, when measured (GB/s, GFLOP/s, sizes, samples).
    :param note: provenance and caveats, in words.
    """

    device_name: str
    source: str
    compute: Mapping[str, float]
    bandwidth: float | None
    measured: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    def compute_peak(self, dtype_class: str) -> float | None:
        """Peak FLOP/s for ``dtype_class`` (``None`` when the device's table has none for it)."""
        return self.compute.get(dtype_class)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_name": self.device_name,
            "source": self.source,
            "compute_tflops": {k: v / TERA for k, v in self.compute.items()},
            "bandwidth_gbps": None if self.bandwidth is None else self.bandwidth / 1e9,
            "measured": dict(self.measured),
            "note": self.note,
        }


#: Dense peaks by :func:`device_key`: FLOP/s by dtype class, bandwidth in bytes/s, provenance.
PEAKS_TABLE: Mapping[str, Mapping[str, Any]] = {
    "nvidia-h100-sxm": {
        "compute": {
            "float32": 67 * TERA,
            "bfloat16": 989 * TERA,
            "float16": 989 * TERA,
            "float8": 1979 * TERA,
            "int8": 1979 * TERA,
        },
        "bandwidth": 3.35e12,
        "note": "NVIDIA H100 SXM datasheet (BENCHMARKS.md): BF16 989, FP8 1979 TFLOPS dense, HBM3 3.35 TB/s; "
        "INT8 1979 TOPS and FP32 67 TFLOPS (no tensor cores) from the datasheet",
    },
    "nvidia-h200": {
        "compute": {
            "float32": 67 * TERA,
            "bfloat16": 989 * TERA,
            "float16": 989 * TERA,
            "float8": 1979 * TERA,
            "int8": 1979 * TERA,
        },
        "bandwidth": 4.8e12,
        "note": "NVIDIA H200 SXM datasheet: the H100's compute (BF16 989, FP8 1979 TFLOPS dense), HBM3e 4.8 TB/s",
    },
    "amd-mi300x": {
        "compute": {
            "float32": 163.4 * TERA,
            "bfloat16": 1307.4 * TERA,
            "float16": 1307.4 * TERA,
            "float8": 2614.9 * TERA,
            "int8": 2614.9 * TERA,
        },
        "bandwidth": 5.3e12,
        "note": "AMD MI300X datasheet (BENCHMARKS.md): BF16 1307, FP8 2615 TFLOPS dense (e4m3fnuz), 5.3 TB/s",
    },
    "huawei-ascend-910b": {
        "compute": {"bfloat16": 313 * TERA, "float16": 313 * TERA},
        "bandwidth": 1.6e12,
        "note": "Ascend 910B: FP16 ~313-376 TFLOPS (BENCHMARKS.md; the lower figure used), HBM2e ~1.6 TB/s "
        "(approximate); no FP8 (Atlas A2/A3 have INT8)",
    },
}


def device_key(name: str) -> str | None:
    """Normalize a device name to a :data:`PEAKS_TABLE` key (``"NVIDIA H100 80GB HBM3"`` → ``"nvidia-h100-sxm"``).

    ``None`` when the device is not in the table (H100 PCIe and NVL parts have other peaks).
    """
    n = re.sub(r"[^a-z0-9]+", " ", name.lower())
    words = set(n.split())
    if "h200" in words:
        return "nvidia-h200"
    if "h100" in words or "h800" in words:
        return None if words & {"pcie", "nvl"} else "nvidia-h100-sxm"
    if "mi300x" in words or "mi300x" in n.replace(" ", ""):
        return "amd-mi300x"
    if re.search(r"910\s?b", n):
        return "huawei-ascend-910b"
    return None


def measure(
    device: torch.device,
    timer: Timer,
    *,
    bandwidth_bytes: int = 256 * 2**20,
    gemm_n: int = 1024,
    gemm_dtypes: tuple[torch.dtype, ...] = (torch.float32,),
) -> dict[str, Any]:
    """Measure read bandwidth (fp32 GEMV over ``bandwidth_bytes``) and GEMM rates (``gemm_n``³ per dtype).

    :returns: ``{"gemv_read_gbps", "gemm_float32_gflops", ...}`` with the sizes and timings used.
    """
    rows = 8192
    cols = max(1, bandwidth_bytes // 4 // rows)
    gemv = _time_gemv(timer, rows, cols, device)
    read = (rows * cols + cols + rows) * 4
    out: dict[str, Any] = {
        "gemv_read_gbps": read / gemv.median_s / 1e9,
        "gemv": f"fp32 torch.mv over a {rows}x{cols} matrix ({read / 2**20:.0f} MiB read), "
        f"median of {gemv.samples} samples, spread {gemv.spread:.1%}",
    }
    g = torch.Generator(device="cpu").manual_seed(0)
    for dt in gemm_dtypes:
        name = str(dt).removeprefix("torch.")
        x = torch.randn(gemm_n, gemm_n, generator=g).to(device=device, dtype=dt)
        w = torch.randn(gemm_n, gemm_n, generator=g).to(device=device, dtype=dt)
        mm = timer(functools.partial(torch.mm, x, w))
        out[f"gemm_{name}_gflops"] = 2.0 * gemm_n**3 / mm.median_s / 1e9
        out[f"gemm_{name}"] = (
            f"{name} torch.mm {gemm_n}x{gemm_n}x{gemm_n}, median of {mm.samples} samples, spread {mm.spread:.1%}"
        )
    if device.type == "cpu":
        out["threads"] = torch.get_num_threads()
    return out


def _time_gemv(timer: Timer, rows: int, cols: int, device: torch.device) -> Timing:
    # Any finite values do; ones are cheap to write (randn of 64M values takes seconds on a small CPU).
    a = torch.ones(rows, cols, device=device)
    v = torch.ones(cols, device=device)
    return timer(functools.partial(torch.mv, a, v))


def peaks_for(
    device: torch.device, device_name: str, timer: Timer, *, log: Callable[[str], Any] | None = None
) -> Peaks:
    """The peaks of the device a backend runs on: from the table, else measured now.

    :param log: called with a line before a measurement starts (progress for the user).
    """
    key = device_key(device_name) if device.type != "cpu" else None
    if key is not None:
        entry = PEAKS_TABLE[key]
        return Peaks(device_name, f"table: {key}", dict(entry["compute"]), entry["bandwidth"], {}, entry["note"])
    if log is not None:
        log(f"measuring {device_name}: fp32 GEMV read bandwidth and fp32 GEMM rate")
    if device.type == "cpu":
        m = measure(device, timer)
        rate = m["gemm_float32_gflops"] * 1e9
        compute = dict.fromkeys(("float32", "bfloat16", "float16", "float8", "int8"), rate)
        note = (
            "measured at start: bandwidth = fp32 GEMV read rate, compute = fp32 1024^3 GEMM rate (used for every "
            "dtype: no bf16/fp8/int8 matrix units)"
        )
    else:
        m = measure(device, timer, bandwidth_bytes=2**30, gemm_n=8192, gemm_dtypes=(torch.float32, torch.bfloat16))
        half = m["gemm_bfloat16_gflops"] * 1e9
        compute = {
            "float32": m["gemm_float32_gflops"] * 1e9,
            "bfloat16": half,
            "float16": half,
            "float8": half,
            "int8": half,
        }
        note = (
            f"{device_name} is not in the peaks table; measured at start (achieved, not datasheet, figures: "
            "fp32 GEMV read rate, fp32 and bf16 8192^3 GEMM rates; fp8 and int8 use the bf16 rate)"
        )
    return Peaks(device_name, "measured", compute, m["gemv_read_gbps"] * 1e9, m, note)
