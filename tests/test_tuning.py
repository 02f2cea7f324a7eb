"""Kernel tuning as data (``hal_kernels._tuning``) and the backends' tuning files.

Loading: arch lookup over ``default``, arch-name spellings, non-op files left alone, malformed files
rejected with the file's name. Binding: ``kernel_ops`` binds each launcher's ``config``, keeps the
launcher's name, and rejects a key the launcher does not take when it binds it. The shipped files: every
kernel op tuned for the backends' main archs, and every arch entry of every file (``sm_80``, ``sm_100``,
``gfx950``, … not only the archs CI compiles for) accepted by the kernel module it configures and bound
as the backend binds it.
"""

from __future__ import annotations

import importlib
import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from hal.backend import impl_name
from hal.errors import OpInputError
from hal.ops.catalogue import CATALOGUE
from hal.registry import check_impl_signature
from hal_kernels import MODULES
from hal_kernels._tuning import (
    ArchPlan,
    TuningError,
    backend_kernel_ops,
    kernel_ops,
    load_tuning,
    normalize_arch,
    read_file,
)

ROOT = Path(__file__).resolve().parents[1]
TUNING = {"nvidia": ROOT / "backends" / "nvidia" / "tuning", "rocm": ROOT / "backends" / "rocm" / "tuning"}
#: the architectures each backend must tune every kernel op for.
REQUIRED_ARCHS = {"nvidia": ("sm_90",), "rocm": ("gfx942", "gfx950")}
#: each backend's fp8 pointer type per arch, as compile-check substitutes it.
FP8 = {"gfx942": "*fp8e4b8"}


def _write(directory: Path, name: str, data: Any) -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _kernel_modules() -> dict[str, types.ModuleType]:
    return {name: importlib.import_module(f"hal_kernels.{name}") for name in MODULES}


def _kernel_op_owner() -> dict[str, types.ModuleType]:
    return {op: module for module in _kernel_modules().values() for op in module.OPS}


# ---------------------------------------------------------------------------------------------------
# load_tuning
# ---------------------------------------------------------------------------------------------------


def test_arch_entry_overlays_default_and_unknown_arch_falls_back(tmp_path: Path) -> None:
    _write(tmp_path, "gemm_fp8.json", {
        "$comment": "free text",
        "default": {"BLOCK_M": 64, "num_warps": 4},
        "sm_90": {"BLOCK_M": 128},
    })  # fmt: skip
    assert load_tuning(tmp_path, "sm_90") == {"gemm_fp8": {"BLOCK_M": 128, "num_warps": 4}}
    assert load_tuning(tmp_path, "sm_89") == {"gemm_fp8": {"BLOCK_M": 64, "num_warps": 4}}
    assert load_tuning(tmp_path, "gfx942") == {"gemm_fp8": {"BLOCK_M": 64, "num_warps": 4}}


def test_arch_spellings_are_one_key(tmp_path: Path) -> None:
    _write(tmp_path, "rms_norm.json", {"sm90": {"BLOCK_M": 2}})
    for spelling in ("sm_90", "sm90", "sm_90a", "SM_90"):
        assert load_tuning(tmp_path, spelling) == {"rms_norm": {"BLOCK_M": 2}}, spelling
    assert normalize_arch("gfx942:sramecc+:xnack-") == "gfx942"
    with pytest.raises(TuningError, match="expected an NVIDIA 'sm_XY'"):
        normalize_arch("hopper")


def test_op_without_entry_for_the_arch_nor_default_is_left_to_the_kernel(tmp_path: Path) -> None:
    _write(tmp_path, "rms_norm.json", {"gfx942": {"BLOCK_M": 2}})
    assert load_tuning(tmp_path, "sm_90") == {}


def test_files_that_are_not_ops_are_left_alone_but_near_misses_are_errors(tmp_path: Path) -> None:
    _write(tmp_path, "gemm_choice.json", {"schema": 1, "archs": {}})  # another table the backend keeps there
    _write(tmp_path, "notes.txt", "not json at all")
    assert load_tuning(tmp_path, "sm_90") == {}
    _write(tmp_path, "gemm_fp8s.json", {"default": {}})
    with pytest.raises(TuningError, match=r"gemm_fp8s\.json.*did you mean 'gemm_fp8'"):
        load_tuning(tmp_path, "sm_90")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"sm_90": [128]}, "'sm_90' must be an object"),
        ({"sm_90": {"BLOCK_M": "128"}}, r"'sm_90'\.BLOCK_M must be an integer, got '128'"),
        ({"sm_90": {"BLOCK_M": 1.5}}, "must be an integer"),
        ({"default": {"GROUP_M": True}}, "must be an integer, got True"),
        ({"hopper": {"BLOCK_M": 128}}, "unknown top-level key 'hopper'"),
        ({"sm_90": {}, "sm90": {}}, "'sm_90' is given twice"),
    ],
)
def test_malformed_file_is_an_error_naming_it(tmp_path: Path, content: Any, match: str) -> None:
    path = _write(tmp_path, "gemm_fp8.json", content)
    with pytest.raises(TuningError, match=match) as info:
        load_tuning(tmp_path, "sm_90")
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TuningError, match="does not exist"):
        load_tuning(tmp_path / "nope", "sm_90")


# ---------------------------------------------------------------------------------------------------
# kernel_ops
# ---------------------------------------------------------------------------------------------------


def _launcher(x: torch.Tensor, *, config: Mapping[str, int] | None = None) -> tuple[torch.Tensor, Any]:
    """A fake launcher: returns its config so the test can see what was bound."""
    return x, config


def _fake_module(name: str, ops: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.OPS = dict(ops)  # type: ignore[attr-defined]
    if defaults is None:  # every op takes the keys the tests bind
        defaults = {op: {"BLOCK_M": 1, "num_warps": 4} for op in ops}
    module.DEFAULTS = dict(defaults)  # type: ignore[attr-defined]
    return module


def test_kernel_ops_binds_config_and_keeps_the_launchers_name() -> None:
    fake = _fake_module("fake_kernels", {"rms_norm": _launcher, "silu_and_mul": _launcher})
    ops = kernel_ops({"rms_norm": {"BLOCK_M": 4}}, modules=[fake])
    x = torch.ones(2)
    assert ops["rms_norm"](x)[1] == {"BLOCK_M": 4}
    assert ops["silu_and_mul"] is _launcher  # no tuning: the launcher itself, its defaults apply
    assert impl_name(ops["rms_norm"]) == impl_name(_launcher) == f"{__name__}:_launcher"
    assert ops["rms_norm"].__doc__ == _launcher.__doc__
    # A caller may still pass its own config: the bound one is only the default.
    assert ops["rms_norm"](x, config={"BLOCK_M": 8})[1] == {"BLOCK_M": 8}


def test_kernel_ops_rejects_tuning_for_an_op_no_kernel_serves() -> None:
    fake = _fake_module("fake_kernels", {"rms_norm": _launcher})
    with pytest.raises(TuningError, match=r"tuning for \['gemm_fp8'\]: no kernel serves"):
        kernel_ops({"gemm_fp8": {"BLOCK_M": 4}}, modules=[fake])


def test_kernel_ops_rejects_an_op_served_twice() -> None:
    a, b = _fake_module("a", {"rms_norm": _launcher}), _fake_module("b", {"rms_norm": _launcher})
    with pytest.raises(TuningError, match="served by two kernel modules: a and b"):
        kernel_ops({}, modules=[a, b])


def test_kernel_ops_covers_every_module_and_fits_the_catalogue() -> None:
    tuning = load_tuning(TUNING["nvidia"], "sm_90")
    ops = kernel_ops(tuning)
    owners = _kernel_op_owner()
    assert set(ops) == set(owners)
    for op, fn in ops.items():
        assert op in CATALOGUE
        assert check_impl_signature(CATALOGUE[op], fn) is None, op
        assert impl_name(fn) == impl_name(owners[op].OPS[op])
        if op in tuning:
            assert fn.keywords == {"config": tuning[op]}, op


def test_unknown_config_key_fails_when_it_is_bound(tmp_path: Path) -> None:
    """A misspelt key fails when the backend binds its tuning, with the launcher's own message, not at
    the op's first call."""
    _write(tmp_path, "rms_norm.json", {"default": {"BLOCK_X": 4}})
    with pytest.raises(TuningError, match=r"tuning for 'rms_norm': rms_norm: config: unknown keys \['BLOCK_X'\]"):
        kernel_ops(load_tuning(tmp_path, "sm_90"))


def test_a_bad_config_value_fails_when_it_is_bound(tmp_path: Path) -> None:
    """GROUP_M 0 would leave the GEMM's output unwritten: refused as the tuning is bound."""
    _write(tmp_path, "gemm_fp8.json", {"default": {"GROUP_M": 0}})
    with pytest.raises(TuningError, match=r"tuning for 'gemm_fp8': .*GROUP_M must be a positive int, got 0"):
        kernel_ops(load_tuning(tmp_path, "sm_90"))


def test_a_typo_in_any_arch_entry_fails_the_backend_build_for_that_arch(tmp_path: Path) -> None:
    _write(tmp_path, "gemm_fp8.json", {"default": {"BLOCK_M": 64}, "sm_100": {"num_stage": 3}})
    # fp8 ops come inside the device format guard (fp8_format_guard)
    guarded = backend_kernel_ops(tmp_path, "sm_90", "e4m3fn")["gemm_fp8"]
    assert guarded.__wrapped__.keywords == {"config": {"BLOCK_M": 64}}
    with pytest.raises(TuningError, match=r"tuning directory .*, architecture sm_100: .*unknown keys \['num_stage'\]"):
        backend_kernel_ops(tmp_path, "sm_100", "e4m3fn")


def test_kernel_ops_needs_defaults_to_check_a_config_against() -> None:
    fake = _fake_module("fake_kernels", {"rms_norm": _launcher}, defaults={})
    assert kernel_ops({}, modules=[fake])["rms_norm"] is _launcher  # nothing to bind, nothing to check
    with pytest.raises(TuningError, match=r"fake_kernels declares no DEFAULTS\['rms_norm'\]"):
        kernel_ops({"rms_norm": {"BLOCK_M": 4}}, modules=[fake])


def test_arch_plan_is_a_mapping_that_names_its_arch() -> None:
    plan = ArchPlan("sm_90", {"gemm_fp8": "hal_kernels.gemm:gemm_fp8"})
    assert dict(plan) == {"gemm_fp8": "hal_kernels.gemm:gemm_fp8"} and plan.arch == "sm_90"


# ---------------------------------------------------------------------------------------------------
# The shipped tuning files
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(TUNING))
def test_every_kernel_op_is_tuned_for_the_backends_archs(backend: str) -> None:
    for op in _kernel_op_owner():
        path = TUNING[backend] / f"{op}.json"
        assert path.is_file(), f"{backend}: no tuning file for kernel op {op!r} ({path})"
        table = read_file(path)
        for arch in REQUIRED_ARCHS[backend]:
            assert arch in table, f"{path}: no {arch!r} entry"


@pytest.mark.parametrize("backend", sorted(TUNING))
def test_every_key_of_every_tuning_file_is_one_the_kernel_takes(backend: str) -> None:
    owners = _kernel_op_owner()
    files = [p for p in sorted(TUNING[backend].glob("*.json")) if p.stem in CATALOGUE]
    assert files, f"{backend}: no kernel tuning files"
    for path in files:
        assert path.stem in owners, f"{path}: {path.stem!r} is an op no kernel serves"
        module = owners[path.stem]
        for arch, config in read_file(path).items():
            # compile_specs merges the config with the module's defaults: an unknown key raises there.
            try:
                module.compile_specs(FP8.get(arch, "*fp8e4nv"), {path.stem: config})
            except OpInputError as exc:
                pytest.fail(f"{path}: {arch!r}: {exc}")


def _archs(directory: Path) -> list[str]:
    """Every architecture some kernel tuning file of ``directory`` has an entry for."""
    files = [p for p in sorted(directory.glob("*.json")) if p.stem in CATALOGUE]
    return sorted({arch for path in files for arch in read_file(path) if arch != "default"})


@pytest.mark.parametrize("backend", sorted(TUNING))
def test_every_arch_of_every_shipped_file_binds(backend: str) -> None:
    """What each backend does when it is built for an arch, for every arch its files name: load, bind and
    check every config (a typo in, say, the sm_100 entry fails here, not on the first sm_100 machine)."""
    archs = _archs(TUNING[backend])
    assert set(REQUIRED_ARCHS[backend]) <= set(archs)
    for arch in archs:
        ops = backend_kernel_ops(TUNING[backend], arch, "e4m3fn")
        assert set(ops) == set(_kernel_op_owner()), arch
