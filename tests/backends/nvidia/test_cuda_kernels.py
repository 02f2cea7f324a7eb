"""The CUDA C quantization kernel without a GPU: nvcc compiles it for sm_90a, its software fp8 rounding
matches torch bit for bit (run on the host), the launcher's contract with the kernel (through a fake
CuPy), the HAL_NVIDIA_QUANT_IMPL selection, the fallback to Triton, and the missing-CuPy error."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hal.backend import impl_name
from hal.errors import BackendLoadError, DeviceError
from hal.ops.catalogue import CATALOGUE
from hal.registry import check_impl_signature
from hal_nvidia import cuda_kernels
from hal_nvidia.cuda_kernels import (
    QUANT_IMPL_ENV,
    cuda_source,
    natively_supported,
    quantize_fp8,
    quantize_fp8_op,
    require_cupy,
    select_quantize_impl,
)

ROOT = Path(__file__).resolve().parents[3]
SOURCE = ROOT / "backends" / "nvidia" / "cuda" / "quant_fp8.cu"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH (install the CUDA toolkit)")
KERNELS = ("hal_quantize_fp8_e4m3_f32", "hal_quantize_fp8_e4m3_bf16", "hal_quantize_fp8_e4m3_f16")


# ---------------------------------------------------------------------------------------------------
# The source, compiled by nvcc
# ---------------------------------------------------------------------------------------------------


@needs_nvcc
def test_nvcc_compiles_the_kernel_for_sm90a_without_spills(tmp_path: Path) -> None:
    out = subprocess.run(
        [NVCC, "-arch=sm_90a", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "quant_fp8.cubin"), str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    for name in KERNELS:
        assert f"Compiling entry function '{name}' for 'sm_90a'" in log
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    assert len(registers) == 3 and max(registers) <= 64, log  # 8 warps per block: no occupancy cliff
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"] * 3, log


@needs_nvcc
def test_sm90a_converts_with_the_hardware_instruction(tmp_path: Path) -> None:
    ptx = tmp_path / "quant_fp8.ptx"
    out = subprocess.run(
        [NVCC, "-arch=sm_90a", "-ptx", "-o", str(ptx), str(SOURCE)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    text = ptx.read_text()
    assert text.count("cvt.rn.satfinite.e4m3x2.f32") == 6  # two per kernel: 4 values per lane
    assert "div.rn.f32" in text  # IEEE division, as torch's x / scale


@needs_nvcc
def test_the_software_rounding_matches_torch_bit_for_bit(tmp_path: Path) -> None:
    # The pre-sm89 conversion is __host__ __device__: a host program runs it here, on the CPU.
    harness = tmp_path / "harness.cu"
    harness.write_text(
        "#include <cstdio>\n"
        f'#include "{SOURCE}"\n'
        "int main(int argc, char** argv) {\n"
        '    FILE* in = fopen(argv[1], "rb"); FILE* out = fopen(argv[2], "wb");\n'
        "    float v;\n"
        "    while (fread(&v, sizeof v, 1, in) == 1) {\n"
        "        unsigned char b = hal_e4m3_from_f32_sw(v);\n"
        "        fwrite(&b, 1, 1, out);\n"
        "    }\n"
        "    fclose(in); fclose(out); return 0;\n"
        "}\n"
    )
    exe = tmp_path / "harness"
    out = subprocess.run(
        [NVCC, "-arch=sm_90a", "-o", str(exe), str(harness)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr

    # Every e4m3fn value, the midpoints between neighbours (ties to even) and one ulp either side,
    # plus random values over 15 decades, the edges of the range, zeros, infinities and NaN.
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[~codes.isnan()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    near = torch.cat([grid, mids, mids.nextafter(up), mids.nextafter(down), grid.nextafter(up), grid.nextafter(down)])
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(200_000, generator=gen) * torch.logspace(-12, 3, 200_000)
    edges = torch.tensor([0.0, -0.0, 448.0, 449.0, 464.0, 465.0, 1e9, float("inf"), float("-inf"), float("nan")])
    values = torch.cat([near, -near, spread, edges, 2.0 ** torch.arange(-12.0, 0.0) * 1.5])
    values.numpy().tofile(tmp_path / "in.bin")
    subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True, timeout=60)
    got = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.uint8)
    # The reference clamps to ±448 and casts (round to nearest even).
    expected = values.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    mismatches = (got != expected).nonzero().flatten()
    assert len(got) == len(values)
    assert len(mismatches) == 0, [(values[i].item(), int(got[i]), int(expected[i])) for i in mismatches[:5]]


def test_the_source_is_self_contained_and_declares_what_the_launcher_calls() -> None:
    text = cuda_source("quant_fp8.cu")
    assert text == SOURCE.read_text()
    # NVRTC through CuPy compiles it without a CUDA toolkit's headers.
    assert not re.search(r"^\s*#\s*include", text, re.MULTILINE)
    declared = dict(re.findall(r'extern "C" __global__ void __launch_bounds__\(\w+\)\s*(\w+)\(([^)]*)\)', text))
    assert sorted(declared) == sorted(KERNELS)
    assert sorted(name for name, _ in cuda_kernels._KERNELS.values()) == sorted(KERNELS)
    for params in declared.values():
        assert [p.split()[-1].lstrip("*") for p in params.split(",")] == [
            "x",
            "xq",
            "scales",
            "M",
            "K",
            "x_row_stride",
            "vec",
        ]


def test_the_cuda_sources_ship_as_package_data() -> None:
    # (tomllib is 3.11+; the project supports 3.10) the package-data line of hal_nvidia:
    line = re.search(r"^hal_nvidia = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert line is not None and '"cuda/*.cu"' in line.group(1)
    assert cuda_kernels.CUDA_SOURCES == tuple(sorted(p.name for p in SOURCE.parent.glob("*.cu")))


# ---------------------------------------------------------------------------------------------------
# HAL_NVIDIA_QUANT_IMPL
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "  ", "triton", "Triton ", "TRITON"], ids=repr)
def test_triton_is_the_default(value: str | None) -> None:
    env = {} if value is None else {QUANT_IMPL_ENV: value}
    assert select_quantize_impl(env, cupy_installed=False) == "triton"


@pytest.mark.parametrize("value", ["cuda", "CUDA", " cuda\n"], ids=repr)
def test_cuda_is_chosen_with_cupy(value: str) -> None:
    assert select_quantize_impl({QUANT_IMPL_ENV: value}, cupy_installed=True) == "cuda"


def test_cuda_without_cupy_is_a_load_error_with_the_remedy() -> None:
    with pytest.raises(BackendLoadError) as info:
        select_quantize_impl({QUANT_IMPL_ENV: "cuda"}, cupy_installed=False)
    message = str(info.value)
    assert "HAL_NVIDIA_QUANT_IMPL=cuda needs CuPy" in message
    assert "pip install hal-accel[nvidia]" in message and "unset HAL_NVIDIA_QUANT_IMPL" in message


def test_an_unknown_value_is_a_load_error_listing_the_choices() -> None:
    with pytest.raises(BackendLoadError, match=r"HAL_NVIDIA_QUANT_IMPL='cupy': expected one of triton, cuda"):
        select_quantize_impl({QUANT_IMPL_ENV: "cupy"})


def test_the_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(QUANT_IMPL_ENV, "cuda")
    assert select_quantize_impl(cupy_installed=True) == "cuda"
    monkeypatch.delenv(QUANT_IMPL_ENV)
    assert select_quantize_impl() == "triton"


def test_cupy_is_looked_up_without_being_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine has no CuPy in the test environment: asking for cuda says so.
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    if cuda_kernels._find_cupy():
        pytest.skip("CuPy is installed here")
    with pytest.raises(BackendLoadError, match="needs CuPy"):
        select_quantize_impl({QUANT_IMPL_ENV: "cuda"})
    assert "cupy" not in sys.modules


# ---------------------------------------------------------------------------------------------------
# Missing or broken CuPy
# ---------------------------------------------------------------------------------------------------


def test_missing_cupy_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` then raises ModuleNotFoundError
    with pytest.raises(BackendLoadError, match=r"need CuPy .* not installed: pip install hal-accel\[nvidia\]"):
        require_cupy()


class _Broken:
    """A finder whose cupy fails to import the way a CuPy without its CUDA runtime does."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == "cupy":
            raise OSError("libcudart.so.12: cannot open shared object file")
        return None


def test_a_broken_cupy_reports_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Broken(), *sys.meta_path])
    with pytest.raises(BackendLoadError, match=r"importing it failed \(OSError: libcudart.so.12"):
        require_cupy()


# ---------------------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------------------


def test_the_launcher_takes_the_catalogue_signature() -> None:
    assert check_impl_signature(CATALOGUE["quantize_fp8"], quantize_fp8) is None
    assert quantize_fp8_op() is quantize_fp8


def test_the_backend_binds_its_tuned_triton_op_as_the_fallback(fake_triton: list[dict[str, Any]]) -> None:
    handed: list[tuple[int, torch.dtype]] = []

    def tuned(x: torch.Tensor, *, group_size: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> Any:
        handed.append((group_size, fp8_dtype))
        return "tuned triton"

    op = quantize_fp8_op(fallback=tuned)
    assert check_impl_signature(CATALOGUE["quantize_fp8"], op) is None
    assert impl_name(op) == "hal_nvidia.cuda_kernels:quantize_fp8"  # what hal info shows
    assert op(torch.zeros(2, 256), group_size=32) == "tuned triton"
    assert handed == [(32, torch.float8_e4m3fn)] and fake_triton == []


@pytest.fixture
def fake_triton(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A stand-in ``hal_kernels.quant`` that records what it is handed."""
    calls: list[dict[str, Any]] = []
    module = types.ModuleType("hal_kernels.quant")

    def triton_quantize_fp8(x: torch.Tensor, *, group_size: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn):
        calls.append({"x": x, "group_size": group_size, "fp8_dtype": fp8_dtype})
        return "from triton"

    module.quantize_fp8 = triton_quantize_fp8  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hal_kernels.quant", module)
    return calls


@pytest.mark.parametrize(
    ("dtype", "group_size", "fp8_dtype"),
    [
        (torch.bfloat16, 64, torch.float8_e4m3fn),
        (torch.bfloat16, 128, torch.float8_e4m3fnuz),
        (torch.float64, 128, torch.float8_e4m3fn),
    ],
    ids=["group-64", "e4m3fnuz", "float64"],
)
def test_what_the_kernel_does_not_serve_goes_to_triton(
    fake_triton: list[dict[str, Any]], dtype: torch.dtype, group_size: int, fp8_dtype: torch.dtype
) -> None:
    x = torch.zeros(2, 256, dtype=dtype)
    assert not natively_supported(x, group_size, fp8_dtype)
    assert quantize_fp8(x, group_size=group_size, fp8_dtype=fp8_dtype) == "from triton"
    assert fake_triton == [{"x": x, "group_size": group_size, "fp8_dtype": fp8_dtype}]


def test_a_cpu_tensor_is_a_device_error(fake_triton: list[dict[str, Any]]) -> None:
    with pytest.raises(DeviceError, match=r"quantize_fp8: x: is on cpu; .* needs a CUDA tensor"):
        quantize_fp8(torch.zeros(2, 256, dtype=torch.bfloat16))
    assert fake_triton == []


@pytest.mark.parametrize(
    ("shape", "view", "vec", "row_stride"),
    [
        ((4096, 7168), None, 1, 7168),
        ((5, 102), None, 0, 102),  # K not a multiple of 4: element-wise access
        ((3, 260), (slice(None), slice(0, 256)), 1, 260),  # a column slice: rows 260 apart, still aligned
        ((3, 260), (slice(None), slice(1, 257)), 0, 260),  # starts one element in: misaligned
        ((1, 256), None, 1, 256),
        ((0, 256), None, 1, 256),
    ],
    ids=["ds-v3", "k102", "sliced", "offset", "one-row", "empty"],
)
def test_the_launch_plan(shape: tuple[int, int], view: Any, vec: int, row_stride: int) -> None:
    x = torch.zeros(shape, dtype=torch.bfloat16)
    if view is not None:
        x = x[view]
    plan = cuda_kernels._plan(x)
    m, k = x.shape
    groups = -(-k // 128)
    assert (plan.kernel, plan.view_dtype) == ("hal_quantize_fp8_e4m3_bf16", torch.int16)
    assert (plan.m, plan.k, plan.groups, plan.block) == (m, k, groups, 256)
    assert plan.grid == -(-m * groups // 8)  # one warp per group, 8 warps per block
    assert (plan.vec, plan.row_stride) == (vec, row_stride)


class _FakeCupy(types.ModuleType):
    """Just enough of CuPy to watch the launcher: compiles nothing, records every launch."""

    def __init__(self) -> None:
        super().__init__("cupy")
        self.modules: list[dict[str, Any]] = []
        self.launches: list[dict[str, Any]] = []
        self.streams: list[tuple[int, int]] = []
        self.devices: list[int] = []
        fake = self

        class _Context:
            def __init__(self, record: Any) -> None:
                self.record = record

            def __enter__(self) -> None:
                self.record()

            def __exit__(self, *exc: object) -> None:
                return None

        class RawModule:
            def __init__(self, code: str, options: tuple[str, ...] = ()) -> None:
                fake.modules.append({"code": code, "options": options})

            def get_function(self, name: str) -> Any:
                def kernel(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
                    fake.launches.append({"name": name, "grid": grid, "block": block, "args": args})

                return kernel

        self.RawModule = RawModule
        self.from_dlpack = lambda t: t  # the torch view itself: its dtype shows what crossed
        self.cuda = SimpleNamespace(
            Device=lambda index: _Context(lambda: fake.devices.append(index)),
            ExternalStream=lambda ptr, index: _Context(lambda: fake.streams.append((ptr, index))),
        )


def test_the_launch_hands_the_kernel_its_arguments_on_torchs_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    np = pytest.importorskip("numpy")
    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0xBEEF))
    cuda_kernels._kernel.cache_clear()
    cuda_kernels._module.cache_clear()
    try:
        x = torch.randn(3, 300).bfloat16()
        plan = cuda_kernels._plan(x)
        xq = torch.empty(3, 300, dtype=torch.float8_e4m3fn)
        scales = torch.empty(3, 3)
        cuda_kernels._launch(plan, x, xq, scales)
        cuda_kernels._launch(plan, x, xq, scales)
    finally:
        cuda_kernels._kernel.cache_clear()
        cuda_kernels._module.cache_clear()
    assert len(fake.modules) == 1  # compiled once, then cached
    assert fake.modules[0]["code"] == SOURCE.read_text()
    assert fake.streams == [(0xBEEF, 0)] * 2 and 0 in fake.devices
    launch = fake.launches[0]
    assert (launch["name"], launch["grid"], launch["block"]) == ("hal_quantize_fp8_e4m3_bf16", (2,), (256,))
    x_arg, xq_arg, scales_arg, m, k, stride, vec = launch["args"]
    # bfloat16 and fp8 cross DLPack as raw bits (CuPy has neither dtype), sharing memory.
    assert x_arg.dtype == torch.int16 and x_arg.data_ptr() == x.data_ptr()
    assert xq_arg.dtype == torch.uint8 and xq_arg.data_ptr() == xq.data_ptr()
    assert scales_arg is scales
    assert (type(m), type(k), type(stride), type(vec)) == (np.int32, np.int32, np.int64, np.int32)
    assert (int(m), int(k), int(stride), int(vec)) == (3, 300, 300, 1)


def test_importing_the_module_imports_no_cupy() -> None:
    code = (
        "import sys\n"
        "import hal_nvidia.cuda_kernels\n"
        "print(sorted(m for m in ('cupy', 'numpy', 'triton', 'hal_kernels.quant') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "cupy" not in out.stdout and "triton" not in out.stdout and "hal_kernels" not in out.stdout
