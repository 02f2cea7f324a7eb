"""Kernel tuning as data: per-architecture launch configs read from JSON files a backend owns.

A backend keeps one directory of tuning files (``hal_nvidia/tuning``, ``hal_rocm/tuning``), one file
per catalogue op served by a kernel, named ``<op>.json`` (``gemm_fp8.json``). Other files may share the
directory (``gemm_choice.json``, a backend's own table): a file whose name is not a catalogue op is not
a kernel tuning file and is left alone, unless the name is a near miss of an op (``gemm_fp8s.json``),
which is an error. A kernel tuning file looks like::

    {
      "$comment": "why these values (free text, optional)",
      "default": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
      "sm_90":   {"BLOCK_M": 128, "num_warps": 8, "num_stages": 4},
      "gfx942":  {"num_stages": 2}
    }

- Top-level keys are architectures (``sm_80``, ``sm_90``, ``sm_100``, ``gfx942``, ``gfx950``, …),
  ``default``, or ``$comment``. NVIDIA archs are spelled ``sm_<major><minor>``; ``sm90``, ``sm_90a``
  and ``SM_90`` are read as ``sm_90`` (torch and the probes say ``sm90``, ptxas ``sm_90a``).
- Each architecture maps config keys to integers: the keys the op's launcher takes (block sizes,
  ``num_warps``, ``num_stages``, …; see each kernel module's ``DEFAULTS``). A key the launcher does not
  know is never dropped: :func:`kernel_ops` rejects it when it binds the config (so a backend whose
  tuning has a typo fails to build, for whichever architecture it is built), and ``hal compile-check``
  reports it for the kernel.
- Lookup for ``arch``: the ``default`` entry, overlaid by the ``arch`` entry when there is one (an
  arch entry may give only the keys it changes). A file with neither leaves the op on the kernel
  module's own defaults.

Reading is strict: a file that is not JSON, not an object, has an unknown top-level key or a value that
is not an integer raises :class:`TuningError` naming the file and the key.

:func:`kernel_ops` turns a tuning table into op implementations: every kernel module's ``OPS``
launchers with their ``config`` bound.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from hal.errors import DTypeError, HALError

__all__ = [
    "COMMENT_KEY",
    "DEFAULT_KEY",
    "FP8_DTYPES",
    "ArchPlan",
    "TuningError",
    "backend_kernel_ops",
    "fp8_format_guard",
    "kernel_ops",
    "load_tuning",
    "normalize_arch",
    "read_file",
]

DEFAULT_KEY = "default"
COMMENT_KEY = "$comment"

_SM = re.compile(r"^sm_?(\d+)a?$", re.IGNORECASE)
_GFX = re.compile(r"^gfx[0-9a-f]+$", re.IGNORECASE)


class TuningError(HALError, ValueError):
    """A tuning file or table cannot be used (the message names the file or the op, and the key)."""


def normalize_arch(arch: str) -> str:
    """The tuning key of an architecture name: ``sm90``/``sm_90a`` → ``sm_90``; ``gfx942:sramecc+:xnack-``
    → ``gfx942``.

    :raises TuningError: a name that is neither an NVIDIA ``sm_XY`` nor an AMD ``gfxNNN``.
    """
    name = str(arch).strip().split(":", 1)[0]
    m = _SM.match(name)
    if m:
        return f"sm_{m.group(1)}"
    if _GFX.match(name):
        return name.lower()
    raise TuningError(
        f"architecture {arch!r}: expected an NVIDIA 'sm_XY' (e.g. sm_90) or an AMD 'gfxNNN' (e.g. gfx942)"
    )


def read_file(path: str | Path) -> dict[str, dict[str, int]]:
    """One tuning file, validated: architecture (normalized) or ``default`` → config.

    :raises TuningError: naming ``path`` and what is wrong with it.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TuningError(f"tuning file {path}: not valid JSON: {exc}") from None
    except OSError as exc:
        raise TuningError(f"tuning file {path}: cannot read it: {exc}") from None
    if not isinstance(raw, dict):
        raise TuningError(
            f"tuning file {path}: expected a JSON object of architecture → config, got {type(raw).__name__}"
        )
    table: dict[str, dict[str, int]] = {}
    for key, config in raw.items():
        if key == COMMENT_KEY:
            continue
        if key == DEFAULT_KEY:
            arch = DEFAULT_KEY
        else:
            try:
                arch = normalize_arch(key)
            except TuningError:
                raise TuningError(
                    f"tuning file {path}: unknown top-level key {key!r}; expected an architecture "
                    f"(sm_90, gfx942, …), {DEFAULT_KEY!r} or {COMMENT_KEY!r}"
                ) from None
        if arch in table:
            raise TuningError(f"tuning file {path}: architecture {arch!r} is given twice (as {key!r})")
        if not isinstance(config, dict):
            raise TuningError(
                f"tuning file {path}: {key!r} must be an object of config key → integer, got {type(config).__name__}"
            )
        for name, value in config.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise TuningError(f"tuning file {path}: {key!r}.{name} must be an integer, got {value!r}")
        table[arch] = dict(config)
    return table


def load_tuning(directory: str | Path, arch: str) -> dict[str, dict[str, int]]:
    """The launch configs for ``arch`` from every ``<op>.json`` in ``directory``: op → config.

    :param directory: a backend's tuning directory; only files named after a catalogue op are read.
    :param arch: the architecture (``sm_90``, ``sm90``, ``gfx942``, …); an op whose file has no entry for
        it gets its ``default`` entry; an op whose file has neither is left out (the kernel's defaults apply).
    :raises TuningError: the directory is missing, or a file is malformed (see :func:`read_file`).
    """
    from hal.ops.catalogue import CATALOGUE

    directory = Path(directory)
    if not directory.is_dir():
        raise TuningError(f"tuning directory {directory} does not exist")
    key = normalize_arch(arch)
    tuning: dict[str, dict[str, int]] = {}
    for path in sorted(directory.glob("*.json")):
        if path.stem not in CATALOGUE:
            near = difflib.get_close_matches(path.stem, list(CATALOGUE), n=1, cutoff=0.85)
            if near:
                raise TuningError(f"tuning file {path}: {path.stem!r} is not a catalogue op; did you mean {near[0]!r}?")
            continue  # another kind of data the backend keeps here
        table = read_file(path)
        if DEFAULT_KEY not in table and key not in table:
            continue
        tuning[path.stem] = {**table.get(DEFAULT_KEY, {}), **table.get(key, {})}
    return tuning


class ArchPlan(dict[str, str]):
    """A backend's op plan (op → ``"module:function"``, see ``hal.types.BackendSpec.plan``) that also
    says which architecture it was made for, so ``hal info`` can name it when none was asked."""

    def __init__(self, arch: str, table: Mapping[str, str]) -> None:
        super().__init__(table)
        self.arch = arch

    def __repr__(self) -> str:
        return f"ArchPlan({self.arch!r}, {dict(self)!r})"


def _modules(modules: Iterable[str | ModuleType] | None) -> list[ModuleType]:
    if modules is None:
        from hal_kernels import MODULES

        modules = MODULES
    return [m if isinstance(m, ModuleType) else importlib.import_module(f"hal_kernels.{m}") for m in modules]


def kernel_ops(
    tuning: Mapping[str, Mapping[str, int]], *, modules: Iterable[str | ModuleType] | None = None
) -> dict[str, Callable[..., Any]]:
    """Every kernel module's ``OPS`` as op implementations, each launcher with its tuned ``config`` bound.

    A launcher whose op has a config is wrapped in :func:`functools.partial` (``config=`` bound, name and
    docstring copied from the launcher, so ``hal info`` shows ``hal_kernels.gemm:gemm_fp8``); an op
    without one is the launcher itself (its module's defaults apply).

    Each config is checked against its module's ``DEFAULTS[op]`` (the keys the launcher takes) as it is
    bound, with the launcher's own check (:func:`hal_kernels._common.merge_config`), so a misspelt key
    or a value that is not a positive int fails here rather than at the op's first call.

    :param tuning: op → config, as :func:`load_tuning` returns it.
    :param modules: kernel module names (under ``hal_kernels``) or modules; default
        :data:`hal_kernels.MODULES`. Importing them imports Triton.
    :raises TuningError: ``tuning`` names an op that no kernel serves (a misnamed file), two modules
        serve the same op, or a config has a key its launcher does not take or a bad value (or its module declares no
        ``DEFAULTS`` for the op to check it against).
    """
    from hal.errors import OpInputError
    from hal_kernels._common import merge_config

    ops: dict[str, Callable[..., Any]] = {}
    owner: dict[str, str] = {}
    for module in _modules(modules):
        for op, launcher in module.OPS.items():
            if op in ops:
                raise TuningError(f"op {op!r} is served by two kernel modules: {owner[op]} and {module.__name__}")
            owner[op] = module.__name__
            config = tuning.get(op)
            if config is None:
                ops[op] = launcher
                continue
            defaults = getattr(module, "DEFAULTS", {}).get(op)
            if defaults is None:
                raise TuningError(
                    f"tuning for {op!r}: {module.__name__} declares no DEFAULTS[{op!r}] to check its config against"
                )
            try:
                merge_config(defaults, config, op)
            except OpInputError as exc:
                raise TuningError(f"tuning for {op!r}: {exc}") from None
            bound = functools.partial(launcher, config=dict(config))
            functools.update_wrapper(bound, launcher)
            ops[op] = bound
    unknown = sorted(set(tuning) - set(ops))
    if unknown:
        raise TuningError(f"tuning for {unknown}: no kernel serves these ops; kernel ops are {sorted(ops)}")
    return ops


def backend_kernel_ops(tuning_dir: str | Path, arch: str, fp8_format: str | None) -> dict[str, Callable[..., Any]]:
    """What a GPU backend registers: :func:`kernel_ops` with ``arch``'s tuning from ``tuning_dir``; on a
    device without fp8 arithmetic (``fp8_format`` ``None``: sm_80, gfx90a) the FP8 ops are left out, so
    they fall back to the reference.

    :raises TuningError: a malformed tuning file, or a config key a launcher does not take (the message
        names the directory and the architecture).
    """
    tuning = load_tuning(tuning_dir, arch)  # its errors name the file
    try:
        ops = kernel_ops(tuning)
    except TuningError as exc:
        raise TuningError(f"tuning directory {tuning_dir}, architecture {normalize_arch(arch)}: {exc}") from None
    if fp8_format is None:
        return {op: fn for op, fn in ops.items() if "fp8" not in op}
    return {op: fp8_format_guard(op, fn, fp8_format) if "fp8" in op else fn for op, fn in ops.items()}


#: the fp8 dtype of each ``Capabilities.fp8_format``.
FP8_DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}


def fp8_format_guard(op: str, fn: Callable[..., Any], fp8_format: str) -> Callable[..., Any]:
    """``fn``, refusing an fp8 tensor or ``fp8_dtype`` of the other format with a :class:`DTypeError`.

    The catalogue admits both e4m3fn and e4m3fnuz, but a device computes in one (NVIDIA and gfx950:
    e4m3fn; gfx942: e4m3fnuz) and Triton cannot compile the other for it: the call says so instead of
    failing inside Triton's compiler. Costs a dtype check per argument."""
    own = FP8_DTYPES[fp8_format]
    other = next(dt for dt in FP8_DTYPES.values() if dt is not own)

    def call(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if value is other or getattr(value, "dtype", None) is other:
                raise DTypeError(
                    op, None, f"this device computes in {own} (backend.capabilities.fp8_dtype), not {other}"
                )
        return fn(*args, **kwargs)

    functools.update_wrapper(call, fn)  # hal info shows the implementation's own name
    return call
