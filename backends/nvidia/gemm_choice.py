"""cuBLAS or Triton for each GEMM shape, from a measured table (``tuning/gemm_choice.json``).

The NVIDIA backend serves ``gemm`` (bf16) through cuBLAS (``torch.nn.functional.linear``) or the
Triton kernel, and ``gemm_fp8`` (DeepSeek-V3 block scaling) through the Triton kernel or, where the
installed torch has it, cuBLAS's block-scaled ``torch._scaled_mm``. Which is faster depends on the
GPU and the shape, so the choice is data: for each architecture and kind, the (N, K) pairs of the
model's projections and, for each, the winner at a set of measured M. ``bench/nvidia/measure_gemm_choice.py``
writes it on a GPU.

The file, schema 1::

    {
      "schema": 1,
      "op": "gemm",
      "measured": false,                       # true once some architecture was measured
      "note": "why the table is what it is",
      "default": {"bf16": "cublas", "fp8": "triton"},
      "archs": {
        "sm_90": {
          "provenance": {"device": ..., "torch": ..., "triton": ..., "cuda": ..., "date": ..., "command": ...},
          "bf16": [
            {"n": 2112, "k": 7168,
             "m": [{"m": 64, "impl": "cublas", "us": {"cublas": 9.8, "triton": 12.1}}, ...]},
            ...
          ],
          "fp8":  [...]
        }
      }
    }

A row's ``us`` (median microseconds per implementation) and ``problems`` (why an implementation was
left out: an error, or a wrong result) are the measurement's record; only ``m`` and ``impl`` are read.

Architectures are spelled as in the backend's kernel tuning files, ``sm_90`` (:func:`arch_key`; ``sm90``
and ``sm_90a`` are read as ``sm_90``, in the file and in a lookup).

Lookup (:func:`choose_gemm_impl`): the architecture's entry with exactly (N, K), then the measured M
nearest to the call's M on a log scale (ties go to the smaller); no entry means the default: cuBLAS
for bf16, Triton for fp8. An fp8 "cublas" is only returned when the caller says the installed torch's
``torch._scaled_mm`` does block scaling (:func:`scaled_mm_blockwise_support` finds out on a GPU).

Importing this module touches no GPU; :func:`scaled_mm_blockwise_support` runs a small GEMM on one.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from hal.errors import BackendLoadError, OpInputError

__all__ = [
    "DEFAULT_IMPL",
    "IMPLS",
    "KINDS",
    "SCALED_MM_K_MULTIPLE",
    "SCHEMA",
    "GemmChoiceTable",
    "MeasuredShape",
    "ScaledMmSupport",
    "arch_key",
    "choose_gemm_impl",
    "gemm_chooser",
    "load_gemm_choice",
    "parse_gemm_choice",
    "scaled_mm_blockwise",
    "scaled_mm_blockwise_support",
]

SCHEMA = 1
#: The implementations a table may name.
IMPLS = ("cublas", "triton")
#: The kinds of GEMM: ``gemm`` in bf16, ``gemm_fp8`` with DeepSeek-V3 block scaling.
KINDS = ("bf16", "fp8")
#: ``torch._scaled_mm`` block-scales correctly only when K is a multiple of this (4 blocks of 128).
SCALED_MM_K_MULTIPLE = 512
#: Without a measurement: cuBLAS for bf16; Triton for fp8, which torch._scaled_mm often cannot block-scale.
DEFAULT_IMPL: Mapping[str, str] = {"bf16": "cublas", "fp8": "triton"}

Impl = Literal["cublas", "triton"]

_SM = re.compile(r"^sm_?(\d+)a?$", re.IGNORECASE)


def arch_key(arch: str) -> str:
    """The table's spelling of an NVIDIA architecture, the tuning files' one: ``sm90``, ``sm_90a`` and
    ``SM_90`` are all ``"sm_90"``; anything else is kept as it is."""
    match = _SM.match(arch.strip())
    return f"sm_{match.group(1)}" if match else arch


@dataclass(frozen=True)
class MeasuredShape:
    """The winners for one (N, K) at each measured M.

    :param n: output features (w's rows).
    :param k: reduction length.
    :param ms: the measured M, ascending.
    :param impls: the winner at each of ``ms``.
    """

    n: int
    k: int
    ms: tuple[int, ...]
    impls: tuple[str, ...]

    def at(self, m: int) -> str:
        """The winner at the measured M nearest to ``m`` on a log scale (ties: the smaller)."""
        target = math.log2(max(m, 1))
        best = min(range(len(self.ms)), key=lambda i: (abs(math.log2(self.ms[i]) - target), self.ms[i]))
        return self.impls[best]


@dataclass(frozen=True)
class GemmChoiceTable:
    """A parsed ``gemm_choice.json``.

    :param measured: whether any architecture's entries come from a measurement.
    :param note: the file's note (why it is what it is).
    :param default: kind → implementation when no entry matches.
    :param archs: arch (``"sm_90"``) → kind → its measured shapes.
    :param provenance: arch → how it was measured (device, versions, date, command).
    :param source: where it was read from, for messages.
    """

    measured: bool
    note: str
    default: Mapping[str, str]
    archs: Mapping[str, Mapping[str, tuple[MeasuredShape, ...]]]
    provenance: Mapping[str, Mapping[str, Any]]
    source: str = "<data>"


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def _fail(source: str, where: str, message: str) -> BackendLoadError:
    return BackendLoadError(f"GEMM choice table {source}: {where}: {message}")


def _positive_int(source: str, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(source, where, f"expected a positive integer, got {value!r}")
    return value


def _impl(source: str, where: str, value: Any) -> str:
    if value not in IMPLS:
        raise _fail(source, where, f"expected one of {', '.join(IMPLS)}, got {value!r}")
    return str(value)


def _shape(source: str, where: str, entry: Any) -> MeasuredShape:
    if not isinstance(entry, Mapping):
        raise _fail(source, where, f"expected an object with n, k and m, got {type(entry).__name__}")
    n = _positive_int(source, f"{where}.n", entry.get("n"))
    k = _positive_int(source, f"{where}.k", entry.get("k"))
    rows = entry.get("m")
    if not isinstance(rows, Sequence) or isinstance(rows, str) or not rows:
        raise _fail(source, f"{where}.m", f"expected a non-empty list of {{m, impl}}, got {rows!r}")
    ms: list[int] = []
    impls: list[str] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise _fail(source, f"{where}.m[{i}]", f"expected {{m, impl}}, got {row!r}")
        ms.append(_positive_int(source, f"{where}.m[{i}].m", row.get("m")))
        impls.append(_impl(source, f"{where}.m[{i}].impl", row.get("impl")))
    if ms != sorted(set(ms)):
        raise _fail(source, f"{where}.m", f"M values must be distinct and ascending, got {ms}")
    return MeasuredShape(n, k, tuple(ms), tuple(impls))


def parse_gemm_choice(data: Any, source: str = "<data>") -> GemmChoiceTable:
    """Validate a decoded ``gemm_choice.json``.

    :raises BackendLoadError: naming the file, the field and what was wrong.
    """
    if not isinstance(data, Mapping):
        raise _fail(source, "top level", f"expected an object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise _fail(source, "schema", f"expected {SCHEMA}, got {data.get('schema')!r}")
    if data.get("op") != "gemm":
        raise _fail(source, "op", f"expected 'gemm', got {data.get('op')!r}")
    measured = data.get("measured")
    if not isinstance(measured, bool):
        raise _fail(source, "measured", f"expected true or false, got {measured!r}")
    note = data.get("note", "")
    if not isinstance(note, str):
        raise _fail(source, "note", f"expected a string, got {note!r}")
    raw_default = data.get("default", DEFAULT_IMPL)
    if not isinstance(raw_default, Mapping) or set(raw_default) - set(KINDS):
        raise _fail(source, "default", f"expected an object with keys among {', '.join(KINDS)}, got {raw_default!r}")
    default = {kind: _impl(source, f"default.{kind}", raw_default.get(kind, DEFAULT_IMPL[kind])) for kind in KINDS}
    raw_archs = data.get("archs", {})
    if not isinstance(raw_archs, Mapping):
        raise _fail(source, "archs", f"expected an object keyed by arch, got {type(raw_archs).__name__}")
    archs: dict[str, dict[str, tuple[MeasuredShape, ...]]] = {}
    provenance: dict[str, Mapping[str, Any]] = {}
    for raw_arch, body in raw_archs.items():
        arch = arch_key(str(raw_arch))
        if arch in archs:
            raise _fail(source, f"archs.{raw_arch}", f"the same architecture as another key ({arch})")
        if not isinstance(body, Mapping):
            raise _fail(source, f"archs.{arch}", f"expected an object, got {type(body).__name__}")
        unknown = sorted(set(body) - {*KINDS, "provenance"})
        if unknown:
            raise _fail(source, f"archs.{arch}", f"unknown keys {unknown}; expected {', '.join(KINDS)}, provenance")
        kinds: dict[str, tuple[MeasuredShape, ...]] = {}
        for kind in KINDS:
            entries = body.get(kind, [])
            if not isinstance(entries, Sequence) or isinstance(entries, str):
                raise _fail(source, f"archs.{arch}.{kind}", f"expected a list, got {type(entries).__name__}")
            shapes = tuple(_shape(source, f"archs.{arch}.{kind}[{i}]", e) for i, e in enumerate(entries))
            seen = [(s.n, s.k) for s in shapes]
            if len(seen) != len(set(seen)):
                raise _fail(source, f"archs.{arch}.{kind}", f"an (n, k) appears twice: {seen}")
            kinds[kind] = shapes
        archs[arch] = kinds
        if "provenance" in body:
            provenance[arch] = dict(body["provenance"])
    if measured and not archs:
        raise _fail(source, "measured", "true, but no architecture has entries")
    return GemmChoiceTable(measured, note, default, archs, provenance, source)


def load_gemm_choice(path: str | Path | None = None) -> GemmChoiceTable:
    """Read and validate a table: ``path``, or the one shipped in ``hal_nvidia/tuning/``."""
    if path is None:
        source = "hal_nvidia/tuning/gemm_choice.json"
        text = (resources.files("hal_nvidia") / "tuning" / "gemm_choice.json").read_text(encoding="utf-8")
    else:
        source = str(path)
        text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(source, f"line {exc.lineno}", f"not valid JSON: {exc.msg}") from exc
    return parse_gemm_choice(data, source)


# ---------------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------------


def choose_gemm_impl(
    table: GemmChoiceTable,
    arch: str,
    M: int,
    N: int,
    K: int,
    *,
    kind: str = "bf16",
    scaled_mm_blockwise: bool = False,
) -> Impl:
    """``"cublas"`` or ``"triton"`` for ``[M, K] @ [N, K].T`` on ``arch``.

    :param table: from :func:`load_gemm_choice`.
    :param arch: ``"sm_90"``, or any spelling :func:`arch_key` reads (``Capabilities.arch``'s ``"sm90"``).
    :param M: rows of x (tokens); bucketed to the nearest measured M.
    :param N: output features; must match a measured entry exactly, with K.
    :param K: reduction length.
    :param kind: ``"bf16"`` (``gemm``) or ``"fp8"`` (``gemm_fp8``).
    :param scaled_mm_blockwise: whether this torch's ``torch._scaled_mm`` does DeepSeek block scaling
        here; without it an fp8 "cublas" in the table gives way to Triton, as it does for a K that is not
        a multiple of :data:`SCALED_MM_K_MULTIPLE`.
    """
    if kind not in KINDS:
        raise OpInputError("gemm", "kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    choice = table.default[kind]
    for shape in table.archs.get(arch_key(arch), {}).get(kind, ()):
        if (shape.n, shape.k) == (N, K):
            choice = shape.at(M)
            break
    if kind == "fp8" and choice == "cublas" and (not scaled_mm_blockwise or K % SCALED_MM_K_MULTIPLE):
        choice = "triton"
    return "cublas" if choice == "cublas" else "triton"


def gemm_chooser(
    table: GemmChoiceTable, arch: str, *, kind: str = "bf16", scaled_mm_blockwise: bool = False
) -> Callable[[int, int, int], Impl]:
    """:func:`choose_gemm_impl` bound to one table, arch and kind, memoized per (M, N, K): what a
    backend's ``gemm`` calls on every call (a dictionary lookup once a shape has been seen)."""
    if kind not in KINDS:
        raise OpInputError("gemm", "kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")

    @functools.lru_cache(maxsize=4096)
    def choose(m: int, n: int, k: int) -> Impl:
        return choose_gemm_impl(table, arch, m, n, k, kind=kind, scaled_mm_blockwise=scaled_mm_blockwise)

    return choose


# ---------------------------------------------------------------------------------------------------
# torch._scaled_mm with DeepSeek-V3 block scaling (1x128 activations, 128x128 weights)
# ---------------------------------------------------------------------------------------------------


def scaled_mm_blockwise(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``gemm_fp8`` through cuBLAS's block-scaled ``torch._scaled_mm`` (torch built with CUDA ≥ 12.9, sm90).

    Operands as the catalogue's ``gemm_fp8``: xq e4m3fn [M, K], xs float32 [M, K / 128], wq e4m3fn
    [N, K], ws float32 [ceil(N / 128), K / 128]. Rearranged for cuBLASLt: M padded to a multiple of 4,
    xs made outer-dim-major, ws transposed to [K / 128, ceil(N / 128)] (a view), wq passed column-major
    (``wq.t()``). Trust it only where :func:`scaled_mm_blockwise_support` said ``"yes"``: the layout
    rules have changed between torch releases, and that check compares against a dequantized
    reference. Measured on an H100 with torch 2.11 / CUDA 13.0 (``bench/nvidia/scaled_mm_layouts.py``,
    bench/results/nvidia-h100/README.md): this layout is accepted and right when K / 128 is a multiple of 4;
    padding ws's K-block dimension to a multiple of 4 is refused ("Invalid scaling configuration");
    M not padded fails for M = 1; and with K / 128 not a multiple of 4 cuBLAS answers without an error
    but wrongly, so such a K raises :class:`~hal.errors.OpInputError` here.
    """
    m, k = xq.shape
    if k % SCALED_MM_K_MULTIPLE:
        raise OpInputError(
            "gemm_fp8",
            "xq",
            f"torch._scaled_mm's block scaling needs K a multiple of {SCALED_MM_K_MULTIPLE} (4 scale blocks), "
            f"got K = {k}: other K gave wrong products without an error (H100, torch 2.11); use the Triton kernel",
        )
    pad = -m % 4
    if pad:
        xq = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(xq.dtype)
        xs = torch.nn.functional.pad(xs, (0, 0, 0, pad), value=1.0)
    scale_a = xs.t().contiguous().t()
    scale_b = ws.t()
    out = torch._scaled_mm(xq, wq.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return out[:m]


class ScaledMmSupport(NamedTuple):
    """Whether ``torch._scaled_mm`` block-scales here: ``status`` ``"yes"``, ``"no"`` or ``"unknown"``
    (no GPU to try on), and ``detail`` saying why."""

    status: str
    detail: str


def scaled_mm_blockwise_support(device: torch.device | str | None = None) -> ScaledMmSupport:
    """Find out by trying: a 128 x 256 x 256 block-scaled GEMM on ``device`` (the current CUDA device
    when ``None``), compared with the dequantized product. Without a CUDA GPU the answer is
    ``"unknown"``; no CUDA work is done then. Cached per device."""
    if not hasattr(torch, "_scaled_mm"):
        return ScaledMmSupport("no", f"torch {torch.__version__} has no torch._scaled_mm")
    if torch.version.cuda is None or not torch.cuda.is_available():
        return ScaledMmSupport("unknown", "trying it needs a CUDA GPU and there is none here")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        return ScaledMmSupport("unknown", f"trying it needs a CUDA device, got {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _try_scaled_mm(dev)


@functools.cache
def _try_scaled_mm(device: torch.device) -> ScaledMmSupport:
    from hal.quant import dequantize_fp8_blocks, dequantize_fp8_groups, fp8_max, quantize_fp8_blocks

    # K = 512: four K blocks, so the check does not hinge on how a torch wants a K-block count that
    # is not a multiple of 4 laid out (DeepSeek-V3's K are all multiples of 512).
    m, n, k, block = 128, 256, 512, 128
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=gen)
    w = torch.randn(n, k, device=device, generator=gen)
    # 1x128 activation groups: the catalogue's quantize_fp8, written out (x has whole groups).
    groups = x.view(m, k // block, block)
    xs = groups.abs().amax(-1).clamp(min=1e-4) / fp8_max(torch.float8_e4m3fn)
    xq = (groups / xs[..., None]).to(torch.float8_e4m3fn).view(m, k)
    wq, ws = quantize_fp8_blocks(w, block)
    reference = dequantize_fp8_groups(xq, xs, block) @ dequantize_fp8_blocks(wq, ws, block).t()
    try:
        out = scaled_mm_blockwise(xq, xs, wq, ws, out_dtype=torch.float32)
        torch.cuda.synchronize(device)
    except Exception as exc:  # unsupported recipe, arch or cuBLAS: the message is the answer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return ScaledMmSupport(
            "no", f"torch {torch.__version__} (CUDA {torch.version.cuda}): {type(exc).__name__}: {first}"
        )
    err = float((out.float() - reference).norm() / reference.norm())
    if not err < 1e-2:
        return ScaledMmSupport("no", f"torch._scaled_mm ran but its result is off (relative error {err:.2e})")
    return ScaledMmSupport("yes", f"torch {torch.__version__} (CUDA {torch.version.cuda}), relative error {err:.1e}")
