"""cuBLAS or Triton per GEMM shape: the shipped table, lookups in synthetic ones, validation, the
block-scaled ``torch._scaled_mm`` helper against an emulation, and the measuring script's pure parts."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from hal.errors import BackendLoadError, OpInputError
from hal.quant import dequantize_fp8_blocks, dequantize_fp8_groups, quantize_fp8_blocks
from hal_nvidia.gemm_choice import (
    DEFAULT_IMPL,
    arch_key,
    choose_gemm_impl,
    gemm_chooser,
    load_gemm_choice,
    parse_gemm_choice,
    scaled_mm_blockwise,
    scaled_mm_blockwise_support,
)
from tests.file_modules import loaded_module

ROOT = Path(__file__).resolve().parents[3]


def _rows(*pairs: tuple[int, str]) -> list[dict[str, Any]]:
    return [{"m": m, "impl": impl, "us": {"cublas": 1.0, "triton": 2.0}} for m, impl in pairs]


MEASURED: dict[str, Any] = {
    "schema": 1,
    "op": "gemm",
    "measured": True,
    "note": "synthetic",
    "default": {"bf16": "cublas", "fp8": "triton"},
    "archs": {
        "sm_90": {
            "provenance": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0+cu128"},
            "bf16": [
                {"n": 2112, "k": 7168, "m": _rows((1, "triton"), (64, "triton"), (128, "cublas"), (4096, "cublas"))},
            ],
            "fp8": [{"n": 4096, "k": 7168, "m": _rows((64, "cublas"), (4096, "triton"))}],
        }
    },
}


@pytest.fixture
def table() -> Any:
    return parse_gemm_choice(MEASURED, "synthetic")


# ---------------------------------------------------------------------------------------------------
# The shipped table
# ---------------------------------------------------------------------------------------------------


def test_the_shipped_table_is_measured_on_an_h100_and_says_how() -> None:
    t = load_gemm_choice()
    assert t.measured is True and "measure_gemm_choice.py" in t.note
    assert set(t.archs) == {"sm_90"} and dict(t.default) == dict(DEFAULT_IMPL)
    prov = t.provenance["sm_90"]
    assert "H100" in prov["device"] and prov["torch"].startswith("2.11") and "measure_gemm_choice.py" in prov["command"]
    # DeepSeek-V3's q_a projection at decode and prefill sizes: cuBLAS's block-scaled GEMM won there.
    for m in (1, 64, 4096):
        assert choose_gemm_impl(t, "sm90", m, 2112, 7168) == "cublas"
        assert choose_gemm_impl(t, "sm90", m, 2112, 7168, kind="fp8", scaled_mm_blockwise=True) == "cublas"
        # without a block-scaling _scaled_mm, or on another arch, fp8 stays on Triton
        assert choose_gemm_impl(t, "sm90", m, 2112, 7168, kind="fp8") == "triton"
        assert choose_gemm_impl(t, "sm100", m, 2112, 7168, kind="fp8", scaled_mm_blockwise=True) == "triton"


def test_the_package_data_is_the_repositorys_file() -> None:
    shipped = ROOT / "backends" / "nvidia" / "tuning" / "gemm_choice.json"
    assert load_gemm_choice(shipped) == replace(load_gemm_choice(), source=str(shipped))


# ---------------------------------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "impl"),
    [
        (0, "triton"),
        (1, "triton"),
        (8, "triton"),
        (64, "triton"),
        (90, "triton"),
        (91, "cublas"),
        (128, "cublas"),
        (700, "cublas"),
        (100_000, "cublas"),
    ],
    ids=lambda v: str(v),
)
def test_m_is_bucketed_to_the_nearest_measured_m_on_a_log_scale(table: Any, m: int, impl: str) -> None:
    # Between 64 and 128 the log-midpoint is 90.5: 90 goes down, 91 up.
    assert choose_gemm_impl(table, "sm90", m, 2112, 7168) == impl


def test_a_tie_goes_to_the_smaller_m() -> None:
    data = copy.deepcopy(MEASURED)
    data["archs"]["sm_90"]["bf16"][0]["m"] = _rows((2, "triton"), (8, "cublas"))
    assert choose_gemm_impl(parse_gemm_choice(data), "sm90", 4, 2112, 7168) == "triton"


def test_unlisted_shapes_and_archs_get_the_default(table: Any) -> None:
    assert choose_gemm_impl(table, "sm90", 1, 2112, 7169) == "cublas"  # K differs: no entry
    assert choose_gemm_impl(table, "sm80", 1, 2112, 7168) == "cublas"  # no sm80 entries
    assert choose_gemm_impl(table, "sm90", 1, 2112, 7168, kind="fp8") == "triton"


def test_fp8_cublas_needs_block_scaled_scaled_mm(table: Any) -> None:
    assert choose_gemm_impl(table, "sm90", 64, 4096, 7168, kind="fp8", scaled_mm_blockwise=True) == "cublas"
    assert choose_gemm_impl(table, "sm90", 64, 4096, 7168, kind="fp8") == "triton"
    assert choose_gemm_impl(table, "sm90", 4096, 4096, 7168, kind="fp8", scaled_mm_blockwise=True) == "triton"


def test_an_unknown_kind_is_an_input_error(table: Any) -> None:
    with pytest.raises(OpInputError, match="gemm: kind: expected one of bf16, fp8, got 'int8'"):
        choose_gemm_impl(table, "sm90", 1, 2112, 7168, kind="int8")


def test_a_bound_chooser_answers_like_the_lookup_and_remembers(table: Any) -> None:
    bf16 = gemm_chooser(table, "sm90")
    fp8 = gemm_chooser(table, "sm90", kind="fp8", scaled_mm_blockwise=True)
    for m in (1, 90, 91, 5000):
        assert bf16(m, 2112, 7168) == choose_gemm_impl(table, "sm90", m, 2112, 7168)
    assert fp8(64, 4096, 7168) == "cublas"
    assert bf16.cache_info().currsize == 4  # type: ignore[attr-defined]
    with pytest.raises(OpInputError, match="kind"):
        gemm_chooser(table, "sm90", kind="fp16")


def test_provenance_is_kept(table: Any) -> None:
    assert table.provenance["sm_90"]["device"] == "NVIDIA H100 80GB HBM3"
    assert table.archs["sm_90"]["bf16"][0].ms == (1, 64, 128, 4096)


@pytest.mark.parametrize("spelling", ["sm90", "sm_90", "sm_90a", "SM_90", " sm90 "])
def test_architectures_are_spelled_as_in_the_tuning_files(table: Any, spelling: str) -> None:
    assert arch_key(spelling) == "sm_90"
    assert choose_gemm_impl(table, spelling, 1, 2112, 7168) == "triton"  # the sm_90 entry, found
    data = copy.deepcopy(MEASURED)
    data["archs"] = {spelling: data["archs"]["sm_90"]}
    assert list(parse_gemm_choice(data).archs) == ["sm_90"]


def test_one_architecture_under_two_spellings_is_rejected() -> None:
    data = copy.deepcopy(MEASURED)
    data["archs"]["sm90"] = data["archs"]["sm_90"]
    with pytest.raises(BackendLoadError, match=r"archs.sm90: the same architecture as another key \(sm_90\)"):
        parse_gemm_choice(data, "synthetic")


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def _broken(path: list[Any], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(MEASURED)
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["schema"], 2, "schema: expected 1, got 2"),
        (["op"], "gemm_fp8", "op: expected 'gemm'"),
        (["measured"], "yes", "measured: expected true or false"),
        (["default", "bf16"], "cutlass", "default.bf16: expected one of cublas, triton, got 'cutlass'"),
        (["archs", "sm_90", "bf16", 0, "m", 1, "impl"], "torch", r"archs.sm_90.bf16\[0\].m\[1\].impl: expected one of"),
        (["archs", "sm_90", "bf16", 0, "m", 1, "m"], 0, r"archs.sm_90.bf16\[0\].m\[1\].m: expected a positive integer"),
        (["archs", "sm_90", "bf16", 0, "m", 1, "m"], 4096, "distinct and ascending"),
        (
            ["archs", "sm_90", "bf16", 0, "n"],
            KeyError,
            r"archs.sm_90.bf16\[0\].n: expected a positive integer, got None",
        ),
        (["archs", "sm_90", "bf16", 0, "m"], [], "non-empty list"),
        (["archs", "sm_90", "int8"], [], "unknown keys \\['int8'\\]"),
        (["archs"], {}, "measured: true, but no architecture has entries"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_a_broken_table_names_the_file_and_the_field(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(BackendLoadError, match=f"GEMM choice table synthetic: .*{message}"):
        parse_gemm_choice(_broken(path, value), "synthetic")


def test_duplicate_shapes_are_rejected() -> None:
    data = copy.deepcopy(MEASURED)
    data["archs"]["sm_90"]["bf16"].append(copy.deepcopy(data["archs"]["sm_90"]["bf16"][0]))
    with pytest.raises(BackendLoadError, match=r"an \(n, k\) appears twice"):
        parse_gemm_choice(data, "synthetic")


def test_a_file_that_is_not_json_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "gemm_choice.json"
    bad.write_text('{\n  "schema": 1,\n  oops\n}\n')
    with pytest.raises(BackendLoadError, match=r"gemm_choice.json: line 3: not valid JSON"):
        load_gemm_choice(bad)


# ---------------------------------------------------------------------------------------------------
# torch._scaled_mm with block scaling
# ---------------------------------------------------------------------------------------------------


def test_scaled_mm_support_is_unknown_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the check would run for real")
    support = scaled_mm_blockwise_support()
    assert support.status == "unknown"
    assert "needs a CUDA GPU" in support.detail


def _emulated_scaled_mm(
    a: torch.Tensor, b: torch.Tensor, *, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """torch._scaled_mm's 1x128 x 128x128 recipe as torch 2.11 accepts it on an H100, checked strictly."""
    m, k = a.shape
    n = b.shape[1]
    kb = k // 128
    assert m % 4 == 0, "cuBLASLt wants M padded to a multiple of 4"
    assert a.stride(1) == 1 and b.stride(0) == 1, "TN layout: a row-major, b column-major"
    assert scale_a.shape == (m, kb) and scale_a.stride(0) == 1, "1x128 scales outer-dim-major"
    # torch 2.11 on an H100 refuses a K-block dimension padded to a multiple of 4 (measured there).
    assert scale_b.shape == (kb, -(-n // 128)) and scale_b.stride(0) == 1, "128x128 scales [K/128, N/128], K-major"
    x = dequantize_fp8_groups(a, scale_a.contiguous(), 128)
    w = dequantize_fp8_blocks(b.t(), scale_b.t().contiguous(), 128)
    return (x @ w.t()).to(out_dtype)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 256, 512), (6, 384, 1024), (128, 128, 512)], ids=str)
def test_scaled_mm_blockwise_lays_out_the_operands_for_cublas(
    monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int
) -> None:
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    xq, xs = _activation_groups(x)
    wq, ws = quantize_fp8_blocks(w, 128)
    out = scaled_mm_blockwise(xq, xs, wq, ws, out_dtype=torch.float32)
    expected = dequantize_fp8_groups(xq, xs, 128) @ dequantize_fp8_blocks(wq, ws, 128).t()
    assert out.shape == (m, n)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [256, 640])
def test_scaled_mm_blockwise_refuses_a_k_cublas_gets_wrong(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    # On an H100 (torch 2.11) K / 128 = 2 or 5 gave relative errors of 89 and 160, with no error raised.
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm)
    x, w = torch.randn(4, k), torch.randn(256, k)
    xq, xs = _activation_groups(x)
    wq, ws = quantize_fp8_blocks(w, 128)
    with pytest.raises(OpInputError, match=f"multiple of 512.*K = {k}"):
        scaled_mm_blockwise(xq, xs, wq, ws)


def test_an_fp8_k_cublas_gets_wrong_goes_to_triton_whatever_the_table_says() -> None:
    data = copy.deepcopy(MEASURED)
    data["archs"]["sm_90"]["fp8"] = [{"n": 256, "k": 640, "m": _rows((1, "cublas"))}]
    table = parse_gemm_choice(data)
    assert choose_gemm_impl(table, "sm90", 1, 256, 640, kind="fp8", scaled_mm_blockwise=True) == "triton"


def _activation_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    groups = x.view(m, k // 128, 128)
    xs = groups.abs().amax(-1).clamp(min=1e-4) / 448.0
    return (groups / xs[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(m, k), xs


# ---------------------------------------------------------------------------------------------------
# The measuring script's pure parts
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measure() -> Any:
    with loaded_module(ROOT / "bench" / "nvidia" / "measure_gemm_choice.py", "measure_gemm_choice") as module:
        yield module


def test_the_default_keeps_a_shape_unless_the_other_is_clearly_faster(measure: Any) -> None:
    assert measure.winner("bf16", {"cublas": 10.0, "triton": 9.6}) == "cublas"  # 4%: noise
    assert measure.winner("bf16", {"cublas": 10.0, "triton": 9.0}) == "triton"
    assert measure.winner("bf16", {"cublas": None, "triton": 50.0}) == "triton"  # cuBLAS failed
    assert measure.winner("fp8", {"cublas": 9.0, "triton": 10.0}) == "cublas"
    assert measure.winner("fp8", {"cublas": None, "triton": 10.0}) == "triton"
    assert measure.winner("fp8", {"cublas": None, "triton": None}) == "triton"


def test_merging_replaces_one_arch_and_writes_a_loadable_table(measure: Any, tmp_path: Path) -> None:
    shipped = json.loads((ROOT / "backends" / "nvidia" / "tuning" / "gemm_choice.json").read_text())
    results = {"bf16": [{"n": 2112, "k": 7168, "m": _rows((64, "triton"), (4096, "cublas"))}], "fp8": []}
    merged = measure.merge(shipped, "sm90", results, {"device": "NVIDIA H100 80GB HBM3"})
    merged = measure.merge(merged, "sm100", {"bf16": [], "fp8": []}, {"device": "NVIDIA B200"})
    merged = measure.merge(merged, "sm_90", results, {"device": "NVIDIA H100 80GB HBM3 (again)"})
    assert merged["measured"] is True and sorted(merged["archs"]) == ["sm_100", "sm_90"]
    assert "sm_100, sm_90" in merged["note"]
    out = tmp_path / "gemm_choice.json"
    out.write_text(json.dumps(merged))
    t = load_gemm_choice(out)
    assert choose_gemm_impl(t, "sm90", 50, 2112, 7168) == "triton"
    assert t.provenance["sm_100"]["device"] == "NVIDIA B200"
    assert t.provenance["sm_90"]["device"] == "NVIDIA H100 80GB HBM3 (again)"


def test_shapes_parse_and_the_script_refuses_to_run_without_a_gpu(measure: Any, capsys: Any) -> None:
    assert measure.parse_shapes("2112x7168, 4096X7168") == [(2112, 7168), (4096, 7168)]
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    assert measure.main([]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
