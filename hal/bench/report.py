"""Reporting: the printed table, the JSON document, the roofline plot, and comparing two runs.

Everything here works on the JSON document (:meth:`hal.bench.runner.Run.as_dict`, schema
``hal-bench/1``), so a saved run can be printed, plotted or compared later. The ``format_*``
functions return text; only the CLI prints it.

**Comparing runs.** :func:`compare` matches results by ``(op, shape, dtype)`` and divides B's median
time by A's. A machine's speed drifts between runs as a whole (clock frequency, a neighbour on a
shared host), so when B is slower overall each ratio is divided by the run's drift, the median ratio;
the drift is itself a regression past ``1 + threshold`` (``--absolute`` judges raw ratios). A result
regresses when its ratio exceeds ``1 + max(threshold, spread)``, ``spread`` being the larger of the
two runs' measured spreads for it (interquartile range over median): a difference inside a run's own
scatter is noise, whatever the threshold.

The default threshold, 25%, comes from repeated clean ``hal bench --quick --backend cpu`` runs on the
2-core development VM (six runs, 30 ordered pairs, 20 results each): single medians moved by up to
1.37x between runs (p95 1.19x), and whole runs by up to 14%. Comparing two clean runs, a 15%
threshold flagged at least one false regression in 20% of the pairs (33% on raw ratios), 25% in 3%
(13% raw); every one of 600 injected 2x slowdowns was caught. (Before
:func:`hal.bench.timing.steady_cpu_allocator`, allocation-heavy cases moved 1.6x between processes
and any threshold below 0.6 failed 4 pairs in 10.) Where reruns scatter less (longer runs, quiet
hardware, GPU event timings), measure the scatter the same way and pass a lower ``--threshold``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hal.errors import BenchError

__all__ = [
    "DEFAULT_THRESHOLD",
    "Comparison",
    "ComparisonRow",
    "compare",
    "format_comparison",
    "format_table",
    "load_results",
    "plot_roofline",
    "write_json",
]

DEFAULT_THRESHOLD = 0.25
SCHEMA = "hal-bench/1"


# ---------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    mag = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - mag)
    return f"{value:,.{decimals}f}"


def _columns(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True)]
        out.append("  ".join(cells).rstrip())
    return out


def _baseline_cell(baselines: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for name, b in baselines.items():
        if b.get("unavailable"):
            parts.append(f"{name} n/a")
        else:
            flag = " (differs!)" if b.get("mismatch") else ""
            parts.append(f"{name} {b['ratio']:.2f}x{flag}")
    return " · ".join(parts) or "-"


def format_table(doc: Mapping[str, Any]) -> str:
    """The run as a table: op, shape, dtype, median µs, FLOP rate, GB/s, % of peak, ratio per baseline."""
    cpu = doc.get("device_type") == "cpu"
    peaks = doc["peaks"]
    rate_unit = "GFLOP/s" if cpu else "TFLOPS"
    scale = 1e3 if cpu else 1.0
    lines = [
        f"hal bench · backend {doc['backend']} on {doc['device']} ({peaks['device_name']}) · shapes {doc['shapes']}"
        f"{' (quick)' if doc.get('quick') else ''} · {doc['date']}",
        _peaks_line(peaks, cpu),
        f"timing: {doc['timing']}",
        "",
    ]
    graphs = any(r.get("graph_us") is not None for r in doc["results"])
    head = ["OP", "SHAPE", "DTYPE", "MEDIAN us", rate_unit, "GB/s", "% PEAK", "BOUND"]
    if graphs:
        head.insert(4, "GRAPH us")
    head.append("TIME RATIO HAL/BASELINE (<1: HAL faster)")
    rows = [head]
    for r in doc["results"]:
        row = [
            r["op"],
            r["shape"],
            r["dtype"],
            _num(r["median_us"]),
            _num(None if r["tflops"] is None else r["tflops"] * scale),
            _num(r["gbps"]),
            "-" if r["pct_peak"] is None else f"{r['pct_peak']:.1f}",
            "-" if r["bound"] == "unknown" else r["bound"],
        ]
        if graphs:
            row.insert(4, _num(r.get("graph_us")))
        row.append(_baseline_cell(r["baselines"]))
        rows.append(row)
    right = [False, False, False, True] + ([True] if graphs else []) + [True, True, True, False, False]
    lines += _columns(rows, right)
    notes = [
        "% PEAK: of the roof that bounds the case at its arithmetic intensity (compute: the dense peak; memory: "
        "the bandwidth); '-' FLOP rate: the op moves data only; '-' bound: the dense peak for the dtype is unknown",
    ]
    hot = [f"{r['op']}[{r['shape']}]" for r in doc["results"] if r["bound"] == "memory" and (r["pct_peak"] or 0) > 100]
    if hot:
        notes.append(
            "above 100% of the bandwidth roof (the working set stays in cache between calls): " + ", ".join(hot)
        )
    if not graphs:
        notes.append(f"CUDA-graph timing: n/a on {doc['device_type']}")
    others = doc.get("machine", {}).get("other_processes_cpu_share")
    if others is not None and others > 0.03:
        notes.append(
            f"the host was busy: other processes used {others:.0%} of its CPU time during the run, so times may "
            "be inflated (by factors when threads outnumber cores); rerun on an idle machine before comparing"
        )
    unavailable = {
        name: b["unavailable"] for r in doc["results"] for name, b in r["baselines"].items() if b.get("unavailable")
    }
    for name, why in unavailable.items():
        notes.append(f"{name} unavailable: {why}")
    for r in doc["results"]:
        for name, b in r["baselines"].items():
            if b.get("mismatch"):
                notes.append(f"{r['op']}[{r['shape']}] {name} differs from the op: {b['mismatch']}")
    for s in doc.get("skipped", []):
        notes.append(f"skipped {s['op']}[{s['shape']}-{s['dtype']}]: {s['reason']}")
    for e in doc.get("errors", []):
        notes.append(f"FAILED {e['op']}[{e['shape']}-{e['dtype']}]: {e['error']}")
    lines += ["", *notes]
    return "\n".join(lines)


def _peaks_line(peaks: Mapping[str, Any], cpu: bool) -> str:
    compute = peaks["compute_tflops"]
    bw = peaks["bandwidth_gbps"]
    if peaks["source"] == "measured" and cpu:
        return (
            f"peaks (measured at start): read bandwidth {_num(bw)} GB/s (fp32 GEMV), "
            f"compute {_num(compute['float32'] * 1e3)} GFLOP/s (fp32 GEMM)"
        )
    parts = ", ".join(f"{k} {_num(v)}" for k, v in compute.items())
    return f"peaks ({peaks['source']}): {parts} TFLOPS; bandwidth {_num(bw)} GB/s"


# ---------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------


def write_json(doc: Mapping[str, Any], path: str | Path) -> None:
    """Write the run's JSON document to ``path`` (parent folders are created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``hal bench --json`` document.

    :raises hal.errors.BenchError: the file is missing, not JSON, or not a ``hal-bench/1`` document.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchError(f"{p}: no such file (write one with hal bench --json {p})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"{p}: not a readable JSON document: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("results"), list):
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise BenchError(f"{p}: not a hal bench result (expected schema {SCHEMA!r}, found {found!r})")
    return doc


# ---------------------------------------------------------------------------------------------------
# Roofline plot
# ---------------------------------------------------------------------------------------------------


def plot_roofline(doc: Mapping[str, Any], path: str | Path) -> None:
    """A log-log roofline PNG: each result a labelled point (arithmetic intensity, achieved FLOP rate)
    under the device's bandwidth roof and compute roof(s).

    :raises hal.errors.BenchError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BenchError(
            "--plot needs matplotlib: pip install 'hal-accel[bench]' (or pip install matplotlib)"
        ) from None
    cpu = doc.get("device_type") == "cpu"
    unit, scale = ("GFLOP/s", 1e3) if cpu else ("TFLOPS", 1.0)
    peaks = doc["peaks"]
    points = [r for r in doc["results"] if r.get("intensity") and r.get("tflops")]
    unplotted = sorted({r["op"] for r in doc["results"] if not (r.get("intensity") and r.get("tflops"))})
    fig = Figure(figsize=(13, 7), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    xs = [r["intensity"] for r in points]
    bw = peaks.get("bandwidth_gbps")
    roofs = {k: v * scale for k, v in peaks["compute_tflops"].items() if v}
    if cpu and roofs:
        roofs = {"fp32 GEMM (measured)": max(roofs.values())}
    lo = min([*xs, 0.1]) / 2
    ridges = [r / (bw * 1e9 / 1e12 * scale) for r in roofs.values()] if bw else []
    hi = max([*xs, *ridges, 10.0]) * 8  # room right of the last point for its label
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    bw_rate = bw * 1e9 / 1e12 * scale if bw else None  # bytes/s → the plot's FLOP-rate unit per FLOP/byte
    if bw_rate:
        top = max(roofs.values()) if roofs else None
        ax.plot(
            grid,
            [bw_rate * x if top is None else min(bw_rate * x, top) for x in grid],
            color="black",
            linewidth=1.6,
            label=f"bandwidth roof {_num(bw)} GB/s",
        )
    styles = ["-", "--", ":", "-."]
    for i, (name, peak) in enumerate(sorted(roofs.items(), key=lambda kv: kv[1])):
        # A compute roof starts where the bandwidth roof reaches it (its ridge point).
        xs_roof = [x for x in grid if not bw_rate or bw_rate * x >= peak]
        ax.plot(
            xs_roof,
            [peak] * len(xs_roof),
            color="dimgray",
            linestyle=styles[i % 4],
            linewidth=1.2,
            label=f"compute roof {name} {_num(peak)} {unit}",
        )
    ops = list(dict.fromkeys(r["op"] for r in points))
    by_op = dict(zip(ops, _palette(len(ops)), strict=True))
    for i, r in enumerate(points):
        color = by_op[r["op"]]
        y = r["tflops"] * scale
        ax.scatter(
            [r["intensity"]],
            [y],
            color=color,
            marker=_marker(r["op"]),
            s=38,
            zorder=3,
            label=r["op"] if r["op"] not in ax.get_legend_handles_labels()[1] else None,
        )
        # Alternate labels above and below their points: neighbours' labels then rarely overlap.
        ax.annotate(
            f"{r['op']} {r['shape']}",
            (r["intensity"], y),
            textcoords="offset points",
            xytext=(5, 4 if i % 2 == 0 else -10),
            fontsize=6,
            color="#333333",
        )
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel(f"achieved {unit}")
    title = f"Roofline · {doc['backend']} on {peaks['device_name']} · shapes {doc['shapes']}"
    ax.set_title(title + ("  (quick)" if doc.get("quick") else ""), fontsize=10)
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    foot = f"{doc['date']} · peaks: {peaks['source']}"
    if unplotted:
        foot += f" · not plotted (no FLOPs): {', '.join(unplotted)}"
    fig.text(0.01, 0.01, foot, fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png")


def _palette(n: int) -> list[str]:
    # matplotlib's tab20, dark shades first: 20 colours that stay apart on white.
    dark = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    light = [
        "#aec7e8",
        "#ffbb78",
        "#98df8a",
        "#ff9896",
        "#c5b0d5",
        "#c49c94",
        "#f7b6d2",
        "#c7c7c7",
        "#dbdb8d",
        "#9edae5",
    ]
    base = dark + light
    return [base[i % len(base)] for i in range(max(n, 1))]


def _marker(op: str) -> str:
    """One marker per family of ops (GEMMs, attention, MoE, small ops), so colours may repeat across them."""
    if "gemm" in op or op.startswith("quantize"):
        return "o"
    if op in ("mla_decode", "attention_prefill"):
        return "s"
    if op.startswith("moe_"):
        return "^"
    return "D"


# ---------------------------------------------------------------------------------------------------
# Comparing two runs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparisonRow:
    """One result present in both runs.

    :param ratio: B's median time / A's (above 1: B is slower).
    :param relative: ``ratio`` divided by the whole run's drift (the median ratio, when above 1): how
        this result moved against the others. Equal to ``ratio`` with ``absolute=True``.
    :param allowed: the relative slowdown tolerated before it is a regression: ``max(threshold, spread)``.
    :param status: ``regression``, ``improvement`` or ``same``, judged on ``relative``.
    """

    op: str
    shape: str
    dtype: str
    a_us: float
    b_us: float
    ratio: float
    relative: float
    allowed: float
    status: str


@dataclass
class Comparison:
    """:func:`compare`'s outcome.

    :ivar drift: the median of every result's ratio when above 1 (else 1, and 1 when not normalized): a
        slowdown of the whole run.
    :ivar whole_run_regression: the drift itself exceeds ``1 + threshold`` (every op got slower).
    """

    threshold: float
    absolute: bool = False
    drift: float = 1.0
    whole_run_regression: bool = False
    rows: list[ComparisonRow] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    failed_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[ComparisonRow]:
        return [r for r in self.rows if r.status == "regression"]

    @property
    def failed(self) -> bool:
        """A result regressed, the whole run did, a case measured in A failed in B, or no result was
        compared (``hal bench compare`` then exits with status 1)."""
        return bool(self.regressions) or self.whole_run_regression or bool(self.failed_b) or not self.rows


def _key(r: Mapping[str, Any]) -> tuple[str, str, str]:
    return (r["op"], r["shape"], r["dtype"])


#: Fewest matched results for the median ratio to say something about the whole run.
_MIN_FOR_DRIFT = 5


def compare(
    a: Mapping[str, Any], b: Mapping[str, Any], threshold: float = DEFAULT_THRESHOLD, *, absolute: bool = False
) -> Comparison:
    """Match results of runs ``a`` (before) and ``b`` (after) by (op, shape, dtype); flag slowdowns beyond noise.

    Each result's ratio ``b / a`` is divided by the run's drift (the median ratio over all matched
    results when there are at least five, and only when above 1) and regresses when that exceeds ``1 + max(threshold,
    spread)`` (``spread``: the larger of its two measured spreads); it improves when the inverse does.
    The drift itself is a whole-run regression when it exceeds ``1 + threshold``.

    :param absolute: judge the raw ratios (no drift normalization).
    """
    if not threshold >= 0:
        raise BenchError(f"--threshold: must be >= 0, got {threshold!r}")
    out = Comparison(threshold, absolute)
    for field_name in ("backend", "device", "shapes"):
        if a.get(field_name) != b.get(field_name):
            out.notes.append(f"the runs differ in {field_name}: {a.get(field_name)!r} vs {b.get(field_name)!r}")
    name_a = a.get("peaks", {}).get("device_name")
    name_b = b.get("peaks", {}).get("device_name")
    if name_a != name_b:
        out.notes.append(f"the runs were on different devices: {name_a!r} vs {name_b!r}")
    index_b = {_key(r): r for r in b["results"]}
    errors_b = {_key(e): e for e in b.get("errors", [])}
    matched = []
    for ra in a["results"]:
        k = _key(ra)
        rb = index_b.get(k)
        if rb is None and k in errors_b:
            out.failed_b.append(f"{k[0]}[{k[1]}-{k[2]}] ({errors_b[k].get('error', 'failed')})")
        elif rb is None:
            out.only_a.append(f"{k[0]}[{k[1]}-{k[2]}]")
        else:
            matched.append((k, ra, rb))
    seen = {k for k, _, _ in matched}
    out.only_b = [f"{k[0]}[{k[1]}-{k[2]}]" for k in index_b if k not in seen]
    ratios = [rb["median_us"] / ra["median_us"] for _, ra, rb in matched]
    if not absolute and len(ratios) >= _MIN_FOR_DRIFT:
        # Only a slowdown is divided out: when B is faster overall (new kernels), the unchanged results
        # must not look slower for it.
        out.drift = max(1.0, statistics.median(ratios))
        out.whole_run_regression = out.drift > 1 + threshold
    for (k, ra, rb), ratio in zip(matched, ratios, strict=True):
        relative = ratio / out.drift
        allowed = max(threshold, ra.get("spread") or 0.0, rb.get("spread") or 0.0)
        status = "same"
        if relative > 1 + allowed:
            status = "regression"
        elif 1 / relative > 1 + allowed:
            status = "improvement"
        out.rows.append(
            ComparisonRow(k[0], k[1], k[2], ra["median_us"], rb["median_us"], ratio, relative, allowed, status)
        )
    if out.drift != 1.0 and abs(math.log(out.drift)) > math.log(1 + threshold / 2):
        out.notes.append(
            f"the whole run moved by {out.drift:.2f}x (the median ratio): results are judged against that; "
            "a machine-wide shift (another process, clock frequency) moves every op alike"
        )
    for label, doc in (("A", a), ("B", b)):
        others = doc.get("machine", {}).get("other_processes_cpu_share")
        if others is not None and others > 0.03:
            out.notes.append(f"run {label} shared the host: other processes used {others:.0%} of its CPU time")
    return out


def format_comparison(c: Comparison, a_name: str = "A", b_name: str = "B") -> str:
    """The comparison as a table, regressions marked, then a one-line verdict."""
    rows = [["OP", "SHAPE", "DTYPE", f"{a_name} us", f"{b_name} us", "B/A", "VS RUN", "ALLOWED", "STATUS"]]
    for r in c.rows:
        mark = {"regression": "REGRESSION", "improvement": "faster", "same": "ok"}[r.status]
        rows.append(
            [
                r.op,
                r.shape,
                r.dtype,
                _num(r.a_us),
                _num(r.b_us),
                f"{r.ratio:.3f}",
                f"{r.relative:.3f}",
                f"<= {1 + r.allowed:.2f}",
                mark,
            ]
        )
    lines = _columns(rows, [False, False, False, True, True, True, True, True, False])
    lines.append("")
    how = "raw ratios (--absolute)" if c.absolute else f"ratios over the run's drift {c.drift:.3f}x (VS RUN)"
    lines.append(f"judged on {how}; allowed: 1 + max(threshold {c.threshold:g}, the result's measured spread)")
    lines += [f"note: {n}" for n in c.notes]
    if c.only_a:
        lines.append(f"only in {a_name} (not compared): {', '.join(c.only_a)}")
    if c.only_b:
        lines.append(f"only in {b_name} (not compared): {', '.join(c.only_b)}")
    if c.failed_b:
        lines.append(f"failed in {b_name}: {', '.join(c.failed_b)}")
    if not c.rows:
        lines.append(f"FAILED: no result compared: {a_name} and {b_name} have no (op, shape, dtype) result in common")
    regs = c.regressions
    if c.whole_run_regression:
        lines.append(
            f"REGRESSION of the whole run: the median result is {c.drift:.2f}x slower (> {1 + c.threshold:.2f})"
        )
    if regs:
        names = ", ".join(f"{r.op}[{r.shape}-{r.dtype}] {r.relative:.2f}x" for r in regs)
        lines.append(f"{len(regs)} regression(s): {names}")
    elif not c.whole_run_regression and c.rows:
        lines.append(f"no regression: {len(c.rows)} result(s) compared")
    return "\n".join(lines)
