"""``hal bench``: the quick CPU run end to end (JSON schema, every op, finite figures, the roofline PNG),
``hal bench compare`` on an injected slowdown, and the pieces behind them (formulas, peaks, options).

The quick run is a subprocess, as a user would start it (``python -m hal.cli bench --quick --backend cpu
--json OUT --plot PNG``), made once for the module; it takes about ten seconds on a 2-core CPU.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hal.bench import BENCH_OPS, SHAPE_SETS, compare, format_comparison, format_table, load_results, run_suite
from hal.bench.cases import BASELINES, check_ops
from hal.bench.metrics import Work, derive, gemm_work, grouped_gemm_work, mla_decode_work
from hal.bench.peaks import Peaks, device_key
from hal.errors import BenchError
from hal.registry import Registry

HAL = [sys.executable, "-m", "hal.cli"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESULT_KEYS = {"op", "shape", "dtype", "median_us", "tflops", "gbps", "pct_peak", "bound", "baselines"}
TOP_KEYS = {"schema", "date", "command", "machine", "versions", "backend", "device", "peaks", "results"}


def hal_cmd(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HAL, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "quick.json", out / "quick.png"
    proc = hal_cmd("bench", "--quick", "--backend", "cpu", "--json", str(json_path), "--plot", str(png_path))
    assert proc.returncode == 0, f"hal bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(json_path.read_text()), png_path


# ---------------------------------------------------------------------------------------------------
# The quick run
# ---------------------------------------------------------------------------------------------------


def test_quick_run_prints_the_table_and_progress(quick: Any) -> None:
    proc, doc, _ = quick
    assert "hal bench · backend cpu" in proc.stdout
    for header in ("OP", "SHAPE", "DTYPE", "MEDIAN us", "GFLOP/s", "GB/s", "% PEAK", "TIME RATIO"):
        assert header in proc.stdout
    for r in doc["results"]:
        assert r["op"] in proc.stdout and r["shape"] in proc.stdout
    # progress and the peak measurement go to stderr, keeping stdout the report
    assert "hal bench cpu cpu-small" in proc.stderr and "cases" in proc.stderr


def test_json_matches_the_schema(quick: Any) -> None:
    _, doc, _ = quick
    assert TOP_KEYS <= set(doc)
    assert doc["schema"] == "hal-bench/1"
    assert doc["backend"] == "cpu" and doc["device"] == "cpu" and doc["shapes"] == "cpu-small" and doc["quick"]
    assert "bench" in doc["command"] and "--quick" in doc["command"]
    assert isinstance(doc["machine"], dict) and doc["machine"]["cores"] >= 1
    assert doc["versions"]["torch"] and doc["versions"]["python"]
    peaks = doc["peaks"]
    assert peaks["source"] == "measured"
    assert peaks["bandwidth_gbps"] > 0 and peaks["compute_tflops"]["float32"] > 0
    assert peaks["measured"]["gemv_read_gbps"] > 0 and peaks["measured"]["gemm_float32_gflops"] > 0
    assert doc["errors"] == [] and doc["skipped"] == []
    for r in doc["results"]:
        assert RESULT_KEYS <= set(r), r["op"]
        assert r["bound"] in ("compute", "memory")
        assert isinstance(r["baselines"], dict) and "reference" in r["baselines"]
        assert set(r["baselines"]) == set(BASELINES[r["op"]])
        for b in r["baselines"].values():
            assert {"median_us", "ratio"} <= set(b)
        assert r["graph_us"] is None and r["graph_note"].startswith("n/a")  # no CUDA graphs on a CPU


def test_every_op_appears(quick: Any) -> None:
    _, doc, _ = quick
    assert {r["op"] for r in doc["results"]} == set(BENCH_OPS)


def _finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_every_figure_is_finite_and_positive(quick: Any) -> None:
    _, doc, _ = quick
    for r in doc["results"]:
        where = f"{r['op']}[{r['shape']}]"
        for key in ("median_us", "gbps", "pct_peak", "pct_peak_bandwidth", "bytes"):
            assert _finite_positive(r[key]), f"{where}: {key} = {r[key]!r}"
        if r["op"] == "moe_permute":
            # Moving data only: no FLOPs, so no FLOP rate and no point on the roofline (documented).
            assert r["flops"] == 0 and r["tflops"] is None and r["intensity"] is None
        else:
            for key in ("flops", "tflops", "intensity", "pct_peak_compute"):
                assert _finite_positive(r[key]), f"{where}: {key} = {r[key]!r}"
        for name, b in r["baselines"].items():
            if b.get("unavailable"):
                assert b["median_us"] is None and b["ratio"] is None and b["unavailable"]
                continue
            assert _finite_positive(b["median_us"]) and _finite_positive(b["ratio"]), f"{where} vs {name}: {b}"
            assert "mismatch" not in b, f"{where}: baseline {name} computes something else: {b['mismatch']}"


def test_scaled_mm_is_listed_as_unavailable_with_a_reason(quick: Any) -> None:
    _, doc, _ = quick
    fp8 = next(r for r in doc["results"] if r["op"] == "gemm_fp8")
    why = fp8["baselines"]["torch._scaled_mm"].get("unavailable")
    if why is None:  # a torch with a CPU block-scaled form: then it must have been timed
        assert _finite_positive(fp8["baselines"]["torch._scaled_mm"]["ratio"])
    else:
        assert "block-scaled" in why and "cpu" in why


def test_plot_is_a_valid_png(quick: Any) -> None:
    _, _, png = quick
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 20_000  # axes, roofs, a point per result and their labels
    image = pytest.importorskip("matplotlib.image").imread(str(png))
    assert image.ndim == 3 and image.shape[0] >= 400 and image.shape[1] >= 600
    assert image.std() > 0.01  # not a blank canvas


def test_table_can_be_printed_again_from_the_json(quick: Any) -> None:
    _, doc, _ = quick
    assert format_table(doc).splitlines()[0] == quick[0].stdout.splitlines()[0]


# ---------------------------------------------------------------------------------------------------
# hal bench compare
# ---------------------------------------------------------------------------------------------------


def test_compare_flags_an_injected_2x_slowdown(quick: Any, tmp_path: Path) -> None:
    _, doc, _ = quick
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(doc))
    slow = copy.deepcopy(doc)
    target = slow["results"][3]
    target["median_us"] *= 2
    b.write_text(json.dumps(slow))
    proc = hal_cmd("bench", "compare", str(a), str(b))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    regression_lines = [line for line in proc.stdout.splitlines() if "REGRESSION" in line]
    assert len(regression_lines) == 1
    assert target["op"] in regression_lines[0] and target["shape"] in regression_lines[0]
    assert "1 regression(s): " in proc.stdout and "2.00x" in proc.stdout


def test_compare_passes_a_rerun_of_the_same_file(quick: Any, tmp_path: Path) -> None:
    _, doc, _ = quick
    a = tmp_path / "a.json"
    a.write_text(json.dumps(doc))
    proc = hal_cmd("bench", "compare", str(a), str(a))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REGRESSION" not in proc.stdout and "no regression" in proc.stdout


def _doc(*results: tuple[str, float, float]) -> dict[str, Any]:
    return {
        "schema": "hal-bench/1",
        "backend": "cpu",
        "device": "cpu",
        "shapes": "cpu-small",
        "peaks": {"device_name": "x"},
        "results": [
            {"op": op, "shape": "S", "dtype": "float32", "median_us": us, "spread": spread}
            for op, us, spread in results
        ],
    }


def test_compare_tolerates_slowdowns_within_threshold_or_measured_spread() -> None:
    a = _doc(("gemm", 100.0, 0.02), ("rotary", 100.0, 0.30), ("rms_norm", 100.0, 0.02), ("silu_and_mul", 100.0, 0.0))
    b = _doc(("gemm", 110.0, 0.02), ("rotary", 125.0, 0.02), ("rms_norm", 120.0, 0.02), ("silu_and_mul", 50.0, 0.0))
    c = compare(a, b, threshold=0.15)
    status = {r.op: r.status for r in c.rows}
    # +10% within the 15% threshold; +25% within rotary's own 30% spread; +20% beyond both; 2x faster
    assert status == {"gemm": "same", "rotary": "same", "rms_norm": "regression", "silu_and_mul": "improvement"}
    assert [r.op for r in c.regressions] == ["rms_norm"]


def test_compare_divides_out_a_whole_run_slowdown_but_flags_it_past_the_threshold() -> None:
    ops = ["gemm", "rotary", "rms_norm", "silu_and_mul", "moe_route", "mla_decode"]
    a = _doc(*((op, 100.0, 0.0) for op in ops))
    drifted = _doc(*((op, 200.0 if op == "rotary" else 112.0, 0.0) for op in ops))
    c = compare(a, drifted)  # the machine got 12% slower, rotary 2x on top of that
    assert c.drift == pytest.approx(1.12) and not c.whole_run_regression
    assert [r.op for r in c.regressions] == ["rotary"] and c.failed
    assert [r.op for r in compare(a, drifted, absolute=True).regressions] == ["rotary"]
    slower = _doc(*((op, 150.0, 0.0) for op in ops))  # every op 1.5x: no single outlier, the run regressed
    c = compare(a, slower)
    assert not c.regressions and c.whole_run_regression and c.failed
    faster = _doc(*((op, 50.0 if op in ops[:4] else 100.0, 0.0) for op in ops))  # new kernels for most ops
    c = compare(a, faster)
    assert c.drift == 1.0 and not c.failed  # the unchanged ops are not judged slower for the others' gain
    assert {r.op for r in c.rows if r.status == "improvement"} == set(ops[:4])


def test_compare_reports_unmatched_results_and_different_devices() -> None:
    a = _doc(("gemm", 100.0, 0.0), ("rotary", 10.0, 0.0))
    b = _doc(("gemm", 100.0, 0.0), ("rms_norm", 10.0, 0.0))
    b["peaks"] = {"device_name": "y"}
    c = compare(a, b)
    assert c.only_a == ["rotary[S-float32]"] and c.only_b == ["rms_norm[S-float32]"]
    assert any("different devices" in n for n in c.notes)
    assert not c.regressions


def test_compare_refuses_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something-else", "results": []}')
    with pytest.raises(BenchError, match="not a hal bench result"):
        load_results(bad)
    with pytest.raises(BenchError, match="no such file"):
        load_results(tmp_path / "missing.json")
    proc = hal_cmd("bench", "compare", str(bad), str(bad))
    assert proc.returncode == 1 and "hal bench: error:" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# Options, shape sets, formulas, peaks
# ---------------------------------------------------------------------------------------------------


def test_ops_subset_runs_only_those_ops(tmp_path: Path) -> None:
    out = tmp_path / "sub.json"
    proc = hal_cmd("bench", "--quick", "--backend", "cpu", "--ops", "rms_norm,silu_and_mul", "-q", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert {r["op"] for r in json.loads(out.read_text())["results"]} == {"rms_norm", "silu_and_mul"}
    assert proc.stderr == ""  # -q: no progress


@pytest.mark.parametrize(
    ("ops", "message"),
    [("gemm,bogus", "not a benchmarked op"), ("all_to_all", "bench/collectives"), (",", "no op named")],
)
def test_bad_ops_are_clear_errors(ops: str, message: str) -> None:
    proc = hal_cmd("bench", "--ops", ops, "--backend", "cpu")
    assert proc.returncode == 1 and message in proc.stderr


def test_unknown_shape_set_is_a_clear_error() -> None:
    proc = hal_cmd("bench", "--shapes", "nope", "--backend", "cpu")
    assert proc.returncode == 1 and "known sets: deepseek-v3, cpu-small" in proc.stderr


def test_help_names_the_collectives_bench_and_the_compare_command() -> None:
    proc = hal_cmd("bench", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for word in ("--quick", "--shapes", "--ops", "--json", "--plot", "bench/collectives", "compare", "deepseek-v3"):
        assert word in text


def test_every_shape_set_covers_every_op_and_collectives_with_quick_shapes() -> None:
    for s in SHAPE_SETS.values():
        for op in (*BENCH_OPS, "all_reduce", "all_to_all"):
            assert s.for_op(op, quick=True), f"{s.name}: no quick shape for {op}"
            ids = [sh.id for sh in s.for_op(op)]
            assert len(ids) == len(set(ids)), f"{s.name}: duplicate shape ids for {op}"


def test_deepseek_shapes_hold_the_anchor_configurations() -> None:
    ds = SHAPE_SETS["deepseek-v3"]
    ids = {sh.id for sh in ds.for_op("gemm_fp8")}
    for m in (64, 128, 4096):
        for n, k in [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]:
            assert f"M{m}-N{n}-K{k}" in ids
    mla = ds.for_op("mla_decode")
    assert len(mla) == 24 and all(sh.params["b"] == 128 and sh.params["d"] == 576 for sh in mla)
    assert {sh.id for sh in ds.for_op("grouped_gemm_fp8_masked")} >= {"E1xM1024-N4096-K7168", "E4xM256-N4096-K7168"}


def test_the_pytest_benchmark_files_cover_every_op() -> None:
    bench = Path(__file__).resolve().parents[2] / "bench"
    covered: list[str] = []
    for path in sorted(bench.glob("*/test_*_ops.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "OPS" for t in node.targets):
                covered += ast.literal_eval(node.value)
    assert sorted(covered) == sorted(BENCH_OPS)


def test_check_ops_orders_by_catalogue() -> None:
    assert check_ops(["silu_and_mul", "gemm", "gemm"]) == ["gemm", "silu_and_mul"]


def test_formulas_are_the_anchors() -> None:
    # GEMM, FP8 in and bf16 out: 2MNK FLOPs and MK + KN + 2MN bytes.
    w = gemm_work(64, 2112, 7168, 1, 2, "float8")
    assert w.flops == 2 * 64 * 2112 * 7168 and w.bytes == 64 * 7168 + 7168 * 2112 + 2 * 64 * 2112
    # grouped: 2 * sum(rows) * N * K
    assert grouped_gemm_work([8192] * 4, 4096, 7168, 1, 2, "float8").flops == 2 * 4 * 8192 * 4096 * 7168
    # MLA decode: FLOPs 2 s_q sum(s_k) h (d + d_v); bytes (sum(s_k) d + b s_q h (d + d_v)) * 2 in bf16
    m = mla_decode_work(128, 1, 128, 128 * 4096, 576, 512, 2, "bfloat16")
    assert m.flops == 2 * 1 * 128 * 4096 * 128 * 1088
    assert m.bytes == (128 * 4096 * 576 + 128 * 1 * 128 * 1088) * 2


def test_derive_picks_the_bounding_roof() -> None:
    peak, bw = 100e12, 1e12  # ridge at 100 FLOP/byte
    compute = derive(Work(1e12, 1e9, "bfloat16"), 0.02, peak, bw)  # 1000 FLOP/byte, 50 TFLOPS
    assert compute.bound == "compute" and compute.tflops == pytest.approx(50) and compute.pct_peak == pytest.approx(50)
    memory = derive(Work(1e9, 1e9, "bfloat16"), 0.002, peak, bw)  # 1 FLOP/byte, 500 GB/s
    assert memory.bound == "memory" and memory.gbps == pytest.approx(500) and memory.pct_peak == pytest.approx(50)
    moved = derive(Work(0.0, 1e9, "float32"), 0.01, peak, bw)
    assert moved.tflops is None and moved.intensity is None and moved.bound == "memory"


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-sxm"),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H200", "nvidia-h200"),
        ("AMD Instinct MI300X", "amd-mi300x"),
        ("Ascend910B3", "huawei-ascend-910b"),
        ("Intel(R) Xeon(R) Processor", None),
    ],
)
def test_device_names_map_to_the_peaks_table(name: str, key: str | None) -> None:
    assert device_key(name) == key


def test_a_backend_without_fp8_or_int8_skips_those_cases_with_the_reason() -> None:
    registry = Registry()
    be = registry.get_backend("example")  # the example plugin: float32/bfloat16 only, no FP8, no INT8
    assert be.capabilities.fp8_format is None and not be.capabilities.int8
    peaks = Peaks("example CPU backend", "test", {"float32": 1e11}, 1e10)
    run = run_suite(
        be,
        registry.reference_ops(),
        SHAPE_SETS["cpu-small"],
        ops=["rms_norm", "gemm_fp8", "gemm_int8"],
        quick=True,
        progress=False,
        peaks=peaks,
        steady_allocator=False,  # process-wide; leave the test process's allocator alone
    )
    doc = run.as_dict()
    assert [r["op"] for r in doc["results"]] == ["rms_norm"]
    assert {s["op"]: s["reason"] for s in doc["skipped"]} == {
        "gemm_fp8": "backend 'example' (cpu) has no FP8 format",
        "gemm_int8": "backend 'example' (cpu) has no INT8 matmul",
    }
    assert "skipped gemm_fp8[" in format_table(doc)


def test_a_backend_with_nothing_to_run_is_a_clear_error() -> None:
    registry = Registry()
    be = registry.get_backend("example")  # no FP8, no INT8: every selected case is skipped
    with pytest.raises(BenchError, match=r"nothing to run on backend example: .*no FP8 format.*no INT8 matmul"):
        run_suite(
            be,
            registry.reference_ops(),
            SHAPE_SETS["cpu-small"],
            ops=["gemm_fp8", "gemm_int8"],
            quick=True,
            progress=False,
            peaks=Peaks("example CPU backend", "test", {"float32": 1e11}, 1e10),
            steady_allocator=False,
        )


def test_derive_with_an_unknown_compute_peak_names_no_roof() -> None:
    d = derive(Work(1e9, 1e9, "float8"), 0.002, None, 1e12)  # FLOPs, but no peak for the dtype
    assert d.bound == "unknown" and d.pct_peak is None and d.pct_peak_compute is None
    assert d.pct_peak_bandwidth == pytest.approx(50)
    moved = derive(Work(0.0, 1e9, "float32"), 0.01, None, 1e12)  # no FLOPs: the bandwidth roof still bounds it
    assert moved.bound == "memory" and moved.pct_peak == pytest.approx(10)


def test_compare_fails_when_a_case_failed_in_b() -> None:
    a = _doc(("gemm", 100.0, 0.0), ("rotary", 10.0, 0.0))
    b = _doc(("gemm", 100.0, 0.0))
    b["errors"] = [{"op": "rotary", "shape": "S", "dtype": "float32", "error": "RuntimeError: boom"}]
    c = compare(a, b)
    assert not c.regressions and c.only_a == [] and c.failed
    assert c.failed_b == ["rotary[S-float32] (RuntimeError: boom)"]
    assert "failed in B: rotary[S-float32] (RuntimeError: boom)" in format_comparison(c)


def test_compare_fails_when_no_result_is_in_both_runs(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_doc(("gemm", 100.0, 0.0))))
    b.write_text(json.dumps(_doc(("rotary", 10.0, 0.0))))
    assert compare(load_results(a), load_results(b)).failed
    proc = hal_cmd("bench", "compare", str(a), str(b))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no result compared" in proc.stdout and "no regression" not in proc.stdout


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_unwritable_output_paths_are_refused_before_measuring(flag: str, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    for path, message in ((tmp_path, "is a directory"), (not_a_folder / "out", "cannot write")):
        proc = hal_cmd("bench", "--quick", "--backend", "cpu", "--ops", "rms_norm", flag, str(path))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"hal bench: error: {flag}: " in proc.stderr and message in proc.stderr
        assert "Traceback" not in proc.stderr and "hal bench ·" not in proc.stdout  # nothing was measured
