"""``hal compile-check``: every kernel of every module compiles for H100 (sm_90) and MI300 (gfx942).

The end-to-end checks run ``hal compile-check`` in a subprocess without ``TRITON_INTERPRET`` (the
interpreter's functions cannot be compiled), and compare what it compiled with every module's
``compile_specs`` listed here: a kernel added to a module and failing to compile fails this test, and
so does a module that lists no kernel. Every spec but the fp32 ones (whose tiles are twice the bytes)
must compile without spills on both targets, and a config needing more shared memory than the target
has must be an error. A cold Triton cache makes each target take tens of seconds on two cores (73 specs
for sm_90 in about 25 s, 70 for gfx942 in about 24 s, triton 3.7.1); a warm one a few.
The parsers of ptxas', cuobjdump's and the AMDGPU assembler's reports are tested on recorded text.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hal.compile_check import (
    SHARED_MEMORY_LIMITS,
    CompileCheckError,
    KernelResult,
    _parse_amdgcn,
    _parse_ptxas,
    format_report,
    parse_target,
)
from hal_kernels import MODULES
from hal_kernels._tuning import load_tuning

pytest.importorskip("triton", reason="triton is not installed (it is in the test extras: pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[1]
HAL = [sys.executable, "-m", "hal.cli", "compile-check"]
TUNING = {"sm_90": ROOT / "backends" / "nvidia" / "tuning", "gfx942": ROOT / "backends" / "rocm" / "tuning"}
CUDA_SOURCES = sorted((ROOT / "backends" / "nvidia" / "cuda").glob("*.cu"))


def compile_check(*args: str, interpret: bool = False, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([*HAL, *args], capture_output=True, text=True, timeout=timeout, env=env)


def expected_specs(target: str) -> dict[str, list[str]]:
    """module → the names of its compile specs for ``target`` (listing needs no compiler)."""
    tgt = parse_target(target)
    tuning = load_tuning(TUNING[target], target)
    return {
        name: [s.name for s in importlib.import_module(f"hal_kernels.{name}").compile_specs(tgt.fp8, tuning)]
        for name in MODULES
    }


@pytest.fixture(scope="module", params=["sm_90", "gfx942"])
def report(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    target = request.param
    proc = compile_check("--target", target, "--json", "--quiet")
    assert proc.stdout, f"no output; stderr:\n{proc.stderr[-4000:]}"
    data = json.loads(proc.stdout)
    failed = [f"{r['kernel']}: {r['detail']}" for r in data["results"] if r["status"] == "error"]
    assert proc.returncode == (1 if failed else 0), proc.stderr[-4000:]
    return target, data


def test_every_kernel_of_every_module_compiles(report: tuple[str, dict[str, Any]]) -> None:
    target, data = report
    expected = expected_specs(target)
    for module, names in expected.items():
        assert names, f"hal_kernels.{module}.compile_specs lists no kernel"
    got: dict[str, list[str]] = {}
    for r in data["results"]:
        if r["kind"] == "triton":
            got.setdefault(r["module"], []).append(r["kernel"])
    assert got == expected
    problems = [
        f"{r['kernel']}: {r['status']}: {r['detail']}"
        for r in data["results"]
        if r["kind"] == "triton" and r["status"] != "ok"
    ]
    assert not problems, "\n\n".join(problems)
    assert data["ok"] and data["target"] == target


def test_every_kernel_reports_its_resources(report: tuple[str, dict[str, Any]]) -> None:
    target, data = report
    for r in data["results"]:
        if r["kind"] != "triton":
            continue
        assert r["registers"] and r["registers"] > 0, r
        assert r["shared"] is not None and r["spills"] is not None, r
        assert r["spill_unit"] == ("bytes" if target.startswith("sm_") else "vgprs"), r
        if target.startswith("gfx"):
            assert {"vgpr", "sgpr", "scratch"} <= set(r["resources"]), r


def test_no_spills_but_in_fp32_kernels(report: tuple[str, dict[str, Any]]) -> None:
    """bf16, fp16, fp8 and integer kernels keep everything in registers with the shipped tuning (fp32
    attention tiles may spill: they are the reference-precision path, not the model's)."""
    target, data = report
    spilling = [
        f"{r['kernel']}: {r['spills']} {r['spill_unit']}"
        for r in data["results"]
        if r["kind"] == "triton" and "fp32" not in r["kernel"] and r["spills"] != 0
    ]
    assert not spilling, f"{target}: spilling\n" + "\n".join(spilling)


def test_shipped_tuning_fits_the_targets_shared_memory(report: tuple[str, dict[str, Any]]) -> None:
    target, data = report
    assert data["shared_limit"] == SHARED_MEMORY_LIMITS[target]
    assert all(r["shared"] <= data["shared_limit"] for r in data["results"] if r["status"] == "ok")


@pytest.mark.parametrize("target", ["sm_90", "gfx942"])
def test_a_config_over_the_shared_memory_limit_is_an_error(target: str, tmp_path: Path) -> None:
    """8 stages of 128x128x128 fp8 tiles: 256 KiB on sm_90 (227 KiB there), 224 KiB of LDS on gfx942 (64 KiB):
    it compiles, but could never launch."""
    (tmp_path / "gemm_fp8.json").write_text(json.dumps({"default": {"num_stages": 8}}))
    proc = compile_check(
        "--target", target, "--kernel", "gemm_fp8[bf16 out]", "--tuning", str(tmp_path), "--json", "-q"
    )
    assert proc.returncode == 1, proc.stderr[-4000:]
    (line,) = json.loads(proc.stdout)["results"]
    limit = SHARED_MEMORY_LIMITS[target]
    assert line["status"] == "error" and line["shared"] > limit, line
    assert f"{target} has {limit / 1024:.1f} KiB ({limit} bytes)" in line["detail"]
    assert "cannot launch; lower num_stages or the block sizes" in line["detail"]


def test_shared_memory_limits() -> None:
    assert parse_target("sm_90").shared_limit == parse_target("sm_100a").shared_limit == 232448
    assert parse_target("sm_80").shared_limit == 163 * 1024 and parse_target("sm_89").shared_limit == 99 * 1024
    assert parse_target("gfx942").shared_limit == 65536 and parse_target("gfx950").shared_limit == 160 * 1024
    assert parse_target("sm_75").shared_limit is None


def test_cuda_c_sources_compile_with_nvcc_on_nvidia_targets(report: tuple[str, dict[str, Any]]) -> None:
    target, data = report
    cuda = [r for r in data["results"] if r["kind"] == "cuda-c"]
    if target.startswith("gfx"):
        assert cuda == []
        return
    if not CUDA_SOURCES:
        pytest.skip("no CUDA C source under backends/nvidia/cuda")
    for source in CUDA_SOURCES:
        lines = [r for r in cuda if r["kernel"].split(":")[0] == source.name]
        assert lines, f"{source.name} was not compiled"
        for r in lines:
            if r["status"] == "skipped":  # no nvcc on this machine: said, not silently passed
                assert "nvcc not found" in r["detail"]
            else:
                assert r["status"] == "ok", r["detail"]
                assert ":" in r["kernel"] and r["registers"], r


def test_human_table_and_filter_under_the_interpreter_variable() -> None:
    # TRITON_INTERPRET=1 in the environment (as in this test process) is removed by the command itself.
    proc = compile_check("--target", "sm_90", "--kernel", "rms_norm", interpret=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "KERNEL" in out and "REGS" in out and "SPILLS" in out
    rows = [line for line in out.splitlines() if line.startswith("  rms_norm[")]
    assert rows and all(" sm_90 " in r and " ok " in r for r in rows)
    assert "silu_and_mul" not in out
    assert "compile-check sm_90:" in proc.stderr  # the progress line


def test_a_target_triton_cannot_compile_for_is_reported_not_a_crash() -> None:
    proc = compile_check("--target", "gfx999", "--kernel", "fused", "--json", "-q")
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(proc.stdout)
    assert data["results"] and {r["status"] for r in data["results"]} == {"unsupported"}
    assert all(r["detail"].startswith("unsupported by triton ") for r in data["results"])
    # No shared-memory limit is known for it either: said, not silently skipped.
    assert data["shared_limit"] is None
    assert any(n.startswith("no shared-memory limit known for gfx999") for n in data["notes"])


def test_a_kernel_that_fails_makes_the_exit_status_1(tmp_path: Path) -> None:
    (tmp_path / "rms_norm.json").write_text(json.dumps({"default": {"BLOCK_X": 4}}))
    proc = compile_check("--target", "gfx942", "--kernel", "fused", "--tuning", str(tmp_path), "--json", "-q")
    assert proc.returncode == 1, proc.stderr[-4000:]
    data = json.loads(proc.stdout)
    assert not data["ok"]
    (line,) = [r for r in data["results"] if r["status"] == "error"]
    assert line["module"] == "fused" and "unknown keys ['BLOCK_X']" in line["detail"]


def test_unknown_kernel_and_bad_target_are_clear_errors() -> None:
    proc = compile_check("--target", "sm_90", "--kernel", "no_such_kernel")
    assert proc.returncode == 1 and "--kernel 'no_such_kernel' matches no kernel" in proc.stderr
    with pytest.raises(CompileCheckError, match="expected an NVIDIA 'sm_XY' or an AMD 'gfxNNN'"):
        parse_target("hopper")


# ---------------------------------------------------------------------------------------------------
# Targets and parsers (no compiler)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "backend", "arch", "warp", "fp8", "package"),
    [
        ("sm_90", "cuda", 90, 32, "*fp8e4nv", "hal_nvidia"),
        ("sm90a", "cuda", 90, 32, "*fp8e4nv", "hal_nvidia"),
        ("sm_100", "cuda", 100, 32, "*fp8e4nv", "hal_nvidia"),
        ("gfx942", "hip", "gfx942", 64, "*fp8e4b8", "hal_rocm"),
        ("gfx950", "hip", "gfx950", 64, "*fp8e4nv", "hal_rocm"),
    ],
)
def test_parse_target(name: str, backend: str, arch: Any, warp: int, fp8: str, package: str) -> None:
    t = parse_target(name)
    assert (t.backend, t.arch, t.warp_size, t.fp8, t.package) == (backend, arch, warp, fp8, package)
    if backend == "cuda":
        assert t.nvcc_arch == f"sm_{arch}a"
    assert parse_target("sm_80").nvcc_arch == "sm_80"


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'hal_quantize_fp8_e4m3_bf16' for 'sm_90a'
ptxas info    : Function properties for hal_quantize_fp8_e4m3_bf16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 28 registers, used 0 barriers, 1024 bytes smem, 392 bytes cmem[0]
ptxas info    : Compiling entry function '_gemm_fp8_kernel' for 'sm_90a'
ptxas info    : Function properties for _gemm_fp8_kernel
    4352 bytes stack frame, 5168 bytes spill stores, 4688 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4352 bytes cumulative stack size
"""


def test_parse_ptxas_report() -> None:
    functions = _parse_ptxas(PTXAS_LOG)
    assert functions["hal_quantize_fp8_e4m3_bf16"] == {
        "stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 28, "smem": 1024,
    }  # fmt: skip
    assert functions["_gemm_fp8_kernel"] == {"stack": 4352, "spill_stores": 5168, "spill_loads": 4688, "registers": 255}


AMDGCN = """\
; NumVgprs: 256
; ScratchSize: 408
; Occupancy: 1
	.amdgpu_metadata
---
amdhsa.kernels:
  - .agpr_count:     256
    .group_segment_fixed_size: 0
    .name:           mm
    .private_segment_fixed_size: 408
    .sgpr_count:     106
    .sgpr_spill_count: 628
    .vgpr_count:     512
    .vgpr_spill_count: 629
    .wavefront_size: 64
"""


def test_parse_amdgcn_metadata() -> None:
    assert _parse_amdgcn(AMDGCN) == {
        "agpr": 256, "lds_static": 0, "scratch": 408, "sgpr": 106, "sgpr_spill": 628, "vgpr": 512,
        "vgpr_spill": 629, "occupancy": 1,
    }  # fmt: skip


def test_format_report_lists_problems_under_the_table() -> None:
    ok = KernelResult("gemm_fp8[bf16 out]", "gemm", "gfx942", registers=217, shared=16384, spills=0,
                      spill_unit="vgprs", num_warps=8, num_stages=2, resources={"vgpr": 217, "sgpr": 73})  # fmt: skip
    bad = KernelResult("rotary[bf16]", "fused", "gfx942", status="error", detail="CompilationError: boom\nline 2")
    data = {
        "target": "gfx942", "triton_version": "3.7.1", "tuning_dir": "t", "seconds": 1.0, "notes": ["n"],
        "shared_limit": 65536, "counts": {"ok": 1, "error": 1, "skipped": 0, "unsupported": 0},
        "results": [ok.as_dict(), bad.as_dict()],
    }  # fmt: skip
    text = format_report(data)
    assert "gemm_fp8[bf16 out]" in text and "217v/73s" in text and "16.0 KiB" in text and "8/2" in text
    assert "1 ok, 1 error" in text and "note: n" in text and "shared ≤ 64.0 KiB" in text
    assert "rotary[bf16]: error: CompilationError: boom" in text and "      line 2" in text
