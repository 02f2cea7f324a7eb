"""The Ascend build against a stand-in for the torch_npu calls it makes at build (no NPU, no CANN here).

The real ``torch_npu`` is never imported: the build runs in a subprocess whose ``sys.path`` starts
with a stand-in ``torch_npu`` that registers an ``npu`` device type and a ``torch.npu`` module of
plain functions, as the real package does on import. The compute ops over the emulation of torch_npu's
operators are tested in ``test_ops_emulated.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hal.errors import BackendLoadError
from hal_ascend._backend import FP8_CHECKPOINTS, RUNTIME_OPS, build

#: The compute ops served through torch_npu's operators (hal_ascend.ops.COMPUTE_OPS).
COMPUTE = [
    "gemm_int8",
    "grouped_gemm",
    "grouped_gemm_int8",
    "mla_decode",
    "moe_permute",
    "moe_route",
    "moe_unpermute",
    "quantize_int8",
    "rms_norm",
    "rotary",
    "silu_and_mul",
]

#: The stand-in: what ``import torch_npu`` does, reduced to the calls the backend makes.
EMULATION = '''
"""CPU emulation of torch_npu for HAL's tests."""
import types
import torch

calls = []
torch.utils.rename_privateuse1_backend("npu")
npu = types.ModuleType("torch.npu")
npu.device_count = lambda: 8
npu.current_device = lambda: 0
npu.get_device_name = lambda device=None: "Ascend910B3"
npu.get_device_properties = lambda device=None: types.SimpleNamespace(name="Ascend910B3", total_memory=65_452_113_920)
npu.memory_allocated = lambda device=None: 1
npu.memory_reserved = lambda device=None: 2
npu.max_memory_allocated = lambda device=None: 3
npu.synchronize = lambda device=None: calls.append("synchronize")
npu.empty_cache = lambda: calls.append("empty_cache")
torch._register_device_module("npu", npu)
'''

RUN = """
import json, torch_npu
from hal.ops.catalogue import CATALOGUE
from hal.registry import check_impl_signature
from hal_ascend._backend import build
impl = build()
ops = impl.ops
ops["synchronize"]()
ops["empty_cache"]()
print(json.dumps({
    "device": str(impl.device),
    "caps": impl.capabilities.as_dict(),
    "ops": sorted(ops),
    "bad_signatures": [op for op, fn in ops.items() if check_impl_signature(CATALOGUE[op], fn)],
    "device_count": ops["device_count"](),
    "memory": list(ops["memory_stats"]()),
    "calls": torch_npu.calls,
}))
"""


def test_build_on_an_emulated_910b(tmp_path: Path) -> None:
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(EMULATION, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["device"] == "npu"
    caps = got["caps"]
    assert (caps["device_type"], caps["arch"], caps["fp8_format"], caps["int8"]) == ("npu", "ascend910b", None, True)
    assert (caps["dist_backend"], caps["device_count"], caps["memory_bytes"]) == ("hccl", 8, 65_452_113_920)
    assert caps["extra"]["fp8_checkpoints"] == FP8_CHECKPOINTS
    assert "W8A8 INT8" in FP8_CHECKPOINTS
    assert got["ops"] == sorted([*RUNTIME_OPS, *COMPUTE])
    assert got["bad_signatures"] == []
    assert got["device_count"] == 8
    assert got["memory"] == [1, 2, 3, 65_452_113_920]
    assert got["calls"] == ["synchronize", "empty_cache"]


def test_a_torch_npu_that_fails_to_import_is_a_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What import torch_npu does without CANN's libraries.
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(
        "raise ImportError('libascendcl.so: cannot open shared object file: No such file or directory')\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    with pytest.raises(BackendLoadError, match=r"import torch_npu failed \(ImportError: libascendcl.so.*set_env.sh"):
        build()
    assert "torch_npu" not in sys.modules
    assert "hal_ascend.ops" not in sys.modules  # the op module is imported only after torch_npu
