"""Load a DeepSeek model from a Hugging Face directory: ``config.json`` plus safetensors.

Safetensors only: ``.bin``/``.pt`` pickles are never opened, since unpickling can run code. Files are
memory-mapped and read tensor by tensor, and only the weights of
:func:`hal.model.weights.expected_shapes` are read; every key, shape and FP8 scale is checked against
the headers before any tensor data is touched, so a wrong checkpoint fails in seconds with every
problem listed by the name found in the files.

Checkpoint layouts: one ``model.safetensors``; shards listed by ``model.safetensors.index.json``
(``weight_map``: key → file); or, with neither, every ``*.safetensors`` in the directory.

FP8 (DeepSeek's format): a linear weight stored as float8 ``X.weight`` with a float32
``X.weight_scale_inv [ceil(N / 128), ceil(K / 128)]`` becomes an :class:`~hal.model.weights.Fp8Weight`
on a backend with FP8, a W8A8 :class:`~hal.model.weights.Int8Weight` on one with INT8 only, and a
dequantized tensor on one with neither (:func:`fp8_checkpoint_policy`). Multi-token-prediction layers (a
``model.layers.{i}`` past ``num_hidden_layers`` that has MTP's ``eh_proj``) are skipped with a log
line: HAL does not run MTP. Any other layer past ``num_hidden_layers`` is reported as unexpected.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hal.errors import HALError
from hal.model.config import ModelConfig
from hal.model.parallel import DROP, ParallelConfig, Split, shard_weight, split_for
from hal.model.weights import Fp8Weight, Int8Weight, Weight, checked_shapes, expected_shapes, is_linear
from hal.progress import Progress
from hal.quant import (
    dequantize_fp8_blocks,
    dequantize_int8_rows,
    e4m3fn_to_fnuz,
    quantize_fp8_blocks,
    quantize_int8_rows,
)

if TYPE_CHECKING:
    from hal.backend import Backend
    from hal.model.deepseek import DeepseekModel
    from hal.types import Capabilities

__all__ = [
    "ModelLoadError",
    "fp8_checkpoint_policy",
    "load_model",
    "load_weights",
    "quantize_linear",
    "save_fp8_checkpoint",
]

log = logging.getLogger(__name__)  # hal.model.loader: `hal run` shows hal.model's INFO lines

#: Edge of the square tiles DeepSeek's FP8 checkpoints scale by (``weight_block_size`` [128, 128]).
FP8_BLOCK = 128
QUANTIZE_CHOICES = (None, "fp8", "int8")


def quantize_linear(t: torch.Tensor, mode: str, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> Weight | None:
    """A linear weight ``[..., N, K]`` quantized at load, or ``None`` where ``mode`` cannot serve it.

    ``"fp8"``: DeepSeek's format (``fp8_dtype`` data, one fp32 scale per 128×128 block), only when K is a
    multiple of 128, which block-scaled FP8 GEMMs need. ``"int8"``: W8A8 (int8 data, one fp32 scale per
    output channel), any K.
    """
    if mode == "fp8":
        if t.shape[-1] % FP8_BLOCK:
            return None
        return Fp8Weight(*quantize_fp8_blocks(t.float(), block=FP8_BLOCK, fp8_dtype=fp8_dtype))
    if mode == "int8":
        return Int8Weight(*quantize_int8_rows(t.float()))
    raise ValueError(f"quantize: expected one of {list(QUANTIZE_CHOICES[1:])}, got {mode!r}")


def fp8_checkpoint_policy(caps: Capabilities, *, dequantize: bool = False) -> str:
    """What an FP8 checkpoint's linear weights become on a device with ``caps``.

    ``"fp8"`` (kept, in the device's E4M3 format) where the device has FP8 arithmetic; else ``"int8"``
    (converted to W8A8 from their exact fp32 values, as vllm-ascend runs DeepSeek FP8 checkpoints on
    Atlas A2/A3) where it has INT8 and ``dequantize`` is not asked; else ``"dequantize"`` (to the model's
    dtype).
    """
    if caps.fp8_format is not None:
        return "fp8"
    return "int8" if caps.int8 and not dequantize else "dequantize"


_SCALE_SUFFIX = "_scale_inv"  # "X.weight" + this = "X.weight_scale_inv"
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
#: safetensors header dtypes of a plain tensor and of an FP8 weight's scale: the float formats torch reads
#: and converts (float4/float6, integers and bool are refused from the headers, before any data is read).
_FLOAT_HEADER_DTYPES = ("F32", "BF16", "F16", "F64")
#: safetensors header dtypes of an FP8 weight: DeepSeek's E4M3, or AMD's E4M3 FNUZ.
_FP8_HEADER_DTYPES = ("F8_E4M3", "F8_E4M3FNUZ")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
#: A key only a DeepSeek multi-token-prediction layer has (it joins the embedding and the hidden state).
_MTP_KEY = re.compile(r"model\.layers\.(\d+)\.eh_proj\.weight$")
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT_KEY = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
_LIST_LIMIT = 20


class ModelLoadError(HALError, ValueError):
    """A model directory or checkpoint that cannot be loaded; the message names the directory, the file
    and the keys at fault."""


@dataclass(frozen=True)
class _Entry:
    """One tensor as a safetensors header describes it."""

    path: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "F32", "BF16", "F8_E4M3", ...

    @property
    def is_fp8(self) -> bool:
        return self.dtype.startswith("F8_")


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def load_weights(
    model_dir: str | Path,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    dequantize_fp8: bool = False,
    fp8_to_int8: bool = False,
    progress: bool = True,
    parallel: ParallelConfig | None = None,
) -> dict[str, Weight]:
    """Read every weight of ``cfg`` from the safetensors of ``model_dir``, checked and converted.

    :param model_dir: a Hugging Face model directory (``model.safetensors``, or shards with or without
        ``model.safetensors.index.json``).
    :param cfg: the architecture; its :func:`~hal.model.weights.expected_shapes` are the keys read.
    :param dtype: floating dtype of every non-FP8 weight (``e_score_correction_bias`` stays float32).
    :param quantize: ``None``; ``"fp8"`` to quantize every linear weight whose K (last dim) is a
        multiple of 128 to :class:`~hal.model.weights.Fp8Weight` (128×128 blocks), the others staying
        ``dtype``; or ``"int8"`` to quantize every linear weight (an FP8 checkpoint's included) to W8A8
        :class:`~hal.model.weights.Int8Weight` (one scale per output channel).
    :param fp8_dtype: float8_e4m3fn | float8_e4m3fnuz: the FP8 format of returned ``Fp8Weight`` s
        (a checkpoint's FP8 data in the other format is converted, scales adjusted).
    :param dequantize_fp8: return an FP8 checkpoint's linear weights dequantized to ``dtype`` (for a
        backend without FP8) instead of as ``Fp8Weight``.
    :param fp8_to_int8: return them as W8A8 ``Int8Weight`` instead, converted from their exact fp32
        values (for a backend with INT8 but no FP8).
    :param progress: show a progress line on stderr while reading tensors.
    :param parallel: read only this rank's share (:mod:`hal.model.parallel`): routed experts of other
        ranks are skipped, and a split weight is read as its slice straight from the memory-mapped file,
        except FP8 weights and weights quantized at load, which are converted whole (as in one process)
        and then cut (FP8 on 128-block boundaries only). The headers are checked against the full shapes.
    :returns: checkpoint-named weights, in :func:`~hal.model.weights.expected_shapes` order, on the CPU.
    :raises ModelLoadError: missing directory or files, corrupt files, missing, unexpected or mis-shaped
        keys, an FP8 weight without its scale (all problems found are listed together).
    :raises ValueError: ``quantize`` not one of ``None``/``"fp8"``/``"int8"``, or together with
        ``dequantize_fp8``.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"load_weights: quantize: expected one of {list(QUANTIZE_CHOICES)}, got {quantize!r}")
    if quantize is not None and dequantize_fp8:
        raise ValueError(f"load_weights: quantize={quantize!r} and dequantize_fp8=True contradict each other")
    if dequantize_fp8 and fp8_to_int8:
        raise ValueError("load_weights: dequantize_fp8 and fp8_to_int8 are alternatives; choose one")
    if fp8_dtype not in _FP8_DTYPES:
        raise ValueError(f"load_weights: fp8_dtype: expected float8_e4m3fn | float8_e4m3fnuz, got {fp8_dtype}")
    if not dtype.is_floating_point or dtype in _FP8_DTYPES:
        raise ValueError(f"load_weights: dtype: expected float32 | bfloat16 | float16, got {dtype}")
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: no such model directory")
    if parallel is not None:
        parallel.check(cfg)  # before any file is opened
    _check_fp8_blocks(root)
    files = _checkpoint_files(root)

    with ExitStack() as stack:
        handles = {path: _open(stack, path) for path in files}
        entries = _read_headers(root, handles, files)
        _check_counts(root, cfg, entries)
        expected = expected_shapes(cfg)
        scales = _check_entries(root, cfg, expected, entries)

        weights: dict[str, Weight] = {}
        n_quantized, unquantized = 0, []
        with Progress(len(expected), f"loading {root.name or root}", enabled=progress) as bar:
            for name in expected:
                entry = entries[name]
                split = None if parallel is None else split_for(name, entry.shape, cfg, parallel)
                if split == DROP:  # a routed expert another rank owns
                    bar.update()
                    continue
                # Plain weights are read as their slice; the others are converted whole, then cut below.
                read_slice = isinstance(split, Split) and not entry.is_fp8 and not (quantize and is_linear(name))
                t = _get(handles[entry.path], entry.path, name, split if read_slice else None)
                if entry.is_fp8:
                    w = _fp8(handles, entries, scales[name], t, dtype, fp8_dtype, dequantize_fp8)
                    if fp8_to_int8 and isinstance(w, Fp8Weight):
                        w = Int8Weight(*quantize_int8_rows(dequantize_fp8_blocks(w.q, w.scale, block=FP8_BLOCK)))
                        n_quantized += 1  # counted with the others under --quantize int8
                    weights[name] = w
                elif name.endswith("e_score_correction_bias"):
                    # The routing bias decides top-k ties between close scores: it is float32 in every
                    # DeepSeek checkpoint and the model routes in float32. It only steers the choice, so a
                    # NaN or inf in it changes the experts picked while every output stays finite: the one
                    # broken tensor no later check could catch.
                    if not bool(torch.isfinite(t).all()):
                        raise ModelLoadError(f"{entry.path}: {name}: holds NaN or inf; the routing bias must be finite")
                    weights[name] = t.float()
                elif quantize is not None and is_linear(name):
                    quantized = quantize_linear(t, quantize, fp8_dtype)
                    if quantized is not None:
                        weights[name] = quantized
                        n_quantized += 1
                    else:
                        weights[name] = t.to(dtype)
                        unquantized.append(name)
                else:
                    weights[name] = t.to(dtype)
                if isinstance(split, Split) and not read_slice:
                    weights[name] = shard_weight(name, weights[name], split)
                bar.update()

    if quantize == "int8":
        log.info("quantized %d linear weights to W8A8 INT8 (one scale per output channel)", n_quantized)
    if quantize == "fp8":
        log.info("quantized %d linear weights to FP8 (%s, 128x128 blocks)", n_quantized, _dtype_name(fp8_dtype))
        if unquantized:
            log.info(
                "left %d linear weights in %s: K (last dim) is not a multiple of %d, which block-scaled FP8 "
                "GEMMs need: %s",
                len(unquantized),
                _dtype_name(dtype),
                FP8_BLOCK,
                _listing(unquantized, limit=5),
            )
    return weights


def load_model(
    model_dir: str | Path,
    backend: Backend,
    *,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    dequantize_fp8: bool = False,
    progress: bool = True,
    parallel: ParallelConfig | None = None,
) -> DeepseekModel:
    """Build a :class:`~hal.model.deepseek.DeepseekModel` from a Hugging Face model directory.

    An FP8 checkpoint's linear weights follow :func:`fp8_checkpoint_policy`: kept FP8 (in the backend's
    format) with FP8 arithmetic; else converted to W8A8 INT8 with INT8 arithmetic (``dequantize_fp8``
    asks for ``dtype`` weights instead); else dequantized to ``dtype``.

    :param model_dir: holds ``config.json`` and the safetensors.
    :param backend: the backend the model runs on.
    :param dtype: activation and non-FP8 weight dtype.
    :param quantize: ``None``, ``"fp8"`` or ``"int8"``: quantize a bf16/fp32 checkpoint's linear weights
        on load (FP8 needs a backend with FP8 arithmetic, INT8 one with INT8).
    :param dequantize_fp8: on a backend without FP8, load an FP8 checkpoint as ``dtype`` weights rather
        than as W8A8 INT8.
    :param progress: show a progress line on stderr while reading tensors.
    :param parallel: this rank's share of a tensor- / expert-parallel model (only its slices are read);
        ``None`` is one process.
    :raises ModelLoadError: see :func:`load_weights`; also ``quantize="fp8"`` on a backend without FP8.
    :raises hal.model.config.ConfigError: a ``config.json`` the model cannot run with.
    """
    from hal.model.deepseek import DeepseekModel  # the model module is heavier than the loader needs

    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"{root}: no such model directory")
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"load_model: quantize: expected one of {list(QUANTIZE_CHOICES)}, got {quantize!r}")
    cfg = ModelConfig.from_file(root / "config.json")
    caps = backend.capabilities
    fp8 = caps.fp8_dtype
    if quantize == "fp8" and fp8 is None:
        raise ModelLoadError(
            f"{root}: quantize='fp8' needs FP8 arithmetic, which backend {backend.name!r} ({caps.arch}) lacks; "
            "load without quantize, or choose a backend with FP8"
        )
    if quantize == "int8" and not caps.int8:
        raise ModelLoadError(
            f"{root}: quantize='int8' needs INT8 arithmetic, which backend {backend.name!r} ({caps.arch}) lacks"
        )
    policy = fp8_checkpoint_policy(caps, dequantize=dequantize_fp8)
    if quantize == "int8":  # asked for INT8: an FP8 checkpoint's weights are converted too
        policy = "int8"
    if policy != "fp8" and _has_fp8_weights(root):
        why = "as asked" if quantize == "int8" else f"backend {backend.name!r} has no FP8 arithmetic"
        becomes = "converted to W8A8 INT8" if policy == "int8" else f"dequantized to {_dtype_name(dtype)}"
        log.info("%s: FP8 checkpoint, linear weights %s (%s)", root, becomes, why)
    weights = load_weights(
        root,
        cfg,
        dtype=dtype,
        quantize=quantize,
        fp8_dtype=fp8 if fp8 is not None else torch.float8_e4m3fn,
        dequantize_fp8=policy == "dequantize",
        fp8_to_int8=policy == "int8",
        progress=progress,
        parallel=parallel,
    )
    return DeepseekModel(cfg, backend, weights, dtype=dtype, parallel=parallel)


def save_fp8_checkpoint(weights: Mapping[str, Weight], cfg_dict: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write a DeepSeek-format FP8 checkpoint: ``config.json`` and one ``model.safetensors``.

    Every linear weight whose K is a multiple of 128 is stored as float8_e4m3fn ``X.weight`` with a
    float32 ``X.weight_scale_inv [ceil(N / 128), ceil(K / 128)]`` (plain tensors are quantized with
    :func:`hal.quant.quantize_fp8_blocks`; :class:`~hal.model.weights.Fp8Weight` s are written as
    they are, e4m3fnuz converted to e4m3fn); every other tensor is written as given.
    ``config.json`` is ``cfg_dict`` plus DeepSeek-V3's ``quantization_config``.

    :returns: ``out_dir`` as a :class:`~pathlib.Path`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if isinstance(w, Int8Weight):
            w = dequantize_int8_rows(w.q, w.scale)
        if isinstance(w, Fp8Weight):
            q, s = _to_fp8_format(w.q, w.scale, torch.float8_e4m3fn)
        elif is_linear(name) and w.shape[-1] % FP8_BLOCK == 0:
            q, s = quantize_fp8_blocks(w.detach().float(), block=FP8_BLOCK, fp8_dtype=torch.float8_e4m3fn)
        else:
            tensors[name] = w.detach().cpu().contiguous()
            continue
        tensors[name] = q.cpu().contiguous()
        tensors[name + _SCALE_SUFFIX] = s.float().cpu().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(cfg_dict)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------
# Finding and opening the files
# ---------------------------------------------------------------------------------------------------


def _checkpoint_files(root: Path) -> dict[Path, set[str] | None]:
    """The safetensors files to read, each with the keys the index places in it (``None``: no index)."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: not a safetensors index with a 'weight_map' ({exc!r})") from None
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: 'weight_map' must map keys to file names")
        if not weight_map:
            raise ModelLoadError(f"{index}: 'weight_map' is empty: it names no tensor")
        shards: dict[Path, set[str]] = {}
        for key, shard in weight_map.items():
            # A shard is a file of the model directory, named plainly: not null, "." or a path (which
            # could lead out of it). Symlinks are fine: a Hugging Face cache snapshot is made of them.
            plain = isinstance(shard, str) and shard.strip() not in ("", ".", "..") and Path(shard).name == shard
            if not plain or "\\" in shard:
                raise ModelLoadError(
                    f"{index}: {key} is placed in {json.dumps(shard)}, which is not a file name in {root}"
                )
            shards.setdefault(root / shard, set()).add(key)
        absent = sorted(p.name for p in shards if not p.is_file())
        if absent:
            raise ModelLoadError(f"{index}: {len(absent)} shard file(s) it names are missing: {_listing(absent)}")
        return dict(shards)
    single = root / "model.safetensors"
    if single.is_file():
        return {single: None}
    found = sorted(root.glob("*.safetensors"))
    if found:
        return dict.fromkeys(found)
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ModelLoadError(
            f"{root}: no *.safetensors files; found {_listing(pickles, limit=5)}. HAL loads safetensors only: "
            ".bin/.pt pickles are not loaded since they can run code (convert them to safetensors first)"
        )
    raise ModelLoadError(f"{root}: no *.safetensors files (is this a Hugging Face model directory?)")


def _open(stack: ExitStack, path: Path) -> Any:
    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _get(handle: Any, path: Path, key: str, split: Split | None = None) -> torch.Tensor:
    """Tensor ``key``, or only its slice ``split`` (read from the memory map, the rest untouched)."""
    try:
        if split is None:
            t: torch.Tensor = handle.get_tensor(key)
        elif split.dim == 0:
            t = handle.get_slice(key)[split.start : split.stop]
        else:
            t = handle.get_slice(key)[:, split.start : split.stop]
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path}: {key}: could not be read (truncated or corrupt file?): {exc}") from None
    return t


def _read_headers(root: Path, handles: Mapping[Path, Any], files: Mapping[Path, set[str] | None]) -> dict[str, _Entry]:
    """Every tensor's file, shape and dtype, from the headers alone (no data is read)."""
    entries: dict[str, _Entry] = {}
    duplicates: list[str] = []
    not_in_shard: list[str] = []
    for path, handle in handles.items():
        try:
            keys = list(handle.keys())
            for key in keys:
                sl = handle.get_slice(key)
                entry = _Entry(path, tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
                if key in entries:
                    duplicates.append(f"{key} ({entries[key].path.name} and {path.name})")
                entries[key] = entry
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{path}: bad safetensors header: {exc}") from None
        indexed = files[path]
        if indexed is not None:
            have = set(keys)
            not_in_shard += [f"{k} (index says {path.name})" for k in sorted(indexed - have)]
    if duplicates:
        raise ModelLoadError(f"{root}: keys stored in two files: {_listing(duplicates)}")
    if not_in_shard:
        raise ModelLoadError(
            f"{root / 'model.safetensors.index.json'}: keys missing from the shard the index names: "
            f"{_listing(not_in_shard)}"
        )
    return entries


# ---------------------------------------------------------------------------------------------------
# Checking the headers against the config
# ---------------------------------------------------------------------------------------------------


def _check_counts(root: Path, cfg: ModelConfig, entries: Mapping[str, _Entry]) -> None:
    """Raise if config.json has more layers or routed experts than the checkpoint holds, before the
    expected keys are listed: a config far larger than its checkpoint (a mistyped ``num_hidden_layers``)
    would otherwise be reported as millions of missing keys, or exhaust the memory listing them."""
    layers = {int(m.group(1)) for key in entries if (m := _LAYER_KEY.match(key))}
    problems = []
    if cfg.num_hidden_layers > len(layers):
        held = f"layers {min(layers)}..{max(layers)}" if layers else "no model.layers.* tensors"
        problems.append(f"num_hidden_layers is {cfg.num_hidden_layers}, but the checkpoint holds {held}")
    if cfg.n_routed_experts > 0 and cfg.first_k_dense_replace < cfg.num_hidden_layers:  # a MoE layer
        experts = {int(m.group(1)) for key in entries if (m := _EXPERT_KEY.match(key))}
        if cfg.n_routed_experts > len(experts):
            held = f"experts {min(experts)}..{max(experts)}" if experts else "no routed experts (mlp.experts.*)"
            problems.append(f"n_routed_experts is {cfg.n_routed_experts}, but the checkpoint holds {held}")
    if problems:
        raise ModelLoadError(f"{root}: config.json does not match the checkpoint: {'; '.join(problems)}")


def _check_entries(
    root: Path, cfg: ModelConfig, expected: Mapping[str, tuple[int, ...]], entries: Mapping[str, _Entry]
) -> dict[str, str]:
    """Raise one :class:`ModelLoadError` listing every problem; return FP8 weight name → scale key."""
    present: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    scale_keys: list[str] = []
    # A multi-token-prediction layer follows the model's layers and has MTP's own projection (eh_proj).
    # Any other layer past the config's is unexpected: a config with too few layers (or a checkpoint
    # with too many) must not run a truncated model.
    mtp = {int(m.group(1)) for key in entries if (m := _MTP_KEY.match(key))} - set(range(cfg.num_hidden_layers))
    mtp_layers: set[int] = set()
    mtp_tensors = 0
    for key, entry in entries.items():
        m = _LAYER.match(key)
        if m and int(m.group(1)) in mtp:
            mtp_layers.add(int(m.group(1)))
            mtp_tensors += 1
        elif key.endswith(".weight" + _SCALE_SUFFIX):
            scale_keys.append(key)
        elif key in expected:
            # Shape-only stand-ins let checked_shapes compare the headers without reading any data.
            present[key] = torch.empty(entry.shape, device="meta")
        else:
            unexpected.append(key)
    if mtp_tensors:
        layers = ", ".join(str(i) for i in sorted(mtp_layers))
        log.info(
            "skipped %d tensors of %d multi-token-prediction layer(s) (model.layers.%s): HAL does not run MTP",
            mtp_tensors,
            len(mtp_layers),
            layers,
        )

    problems: list[str] = []
    missing, _, mismatched = checked_shapes(cfg, present)
    scales: dict[str, str] = {}
    for key in scale_keys:
        base = key[: -len(_SCALE_SUFFIX)]
        if base not in present:
            unexpected.append(key)  # a scale with no weight of this model beside it
        elif not entries[base].is_fp8:
            problems.append(f"{key}: an FP8 scale, but {base} is stored as {entries[base].dtype}, not as F8_E4M3")
        elif entries[key].dtype not in _FLOAT_HEADER_DTYPES:
            problems.append(f"{key}: stored as {entries[key].dtype}; a scale must be F32 (or BF16, F16, F64)")
        else:
            scales[base] = key
    for name in present:
        entry = entries[name]
        if not entry.is_fp8:
            if entry.dtype not in _FLOAT_HEADER_DTYPES:
                problems.append(f"{name}: stored as {entry.dtype}; expected F32, BF16, F16 or F64 ({entry.path.name})")
            continue
        if entry.dtype not in _FP8_HEADER_DTYPES:
            problems.append(f"{name}: stored as {entry.dtype}; FP8 weights must be F8_E4M3 or F8_E4M3FNUZ")
        elif not is_linear(name):
            problems.append(f"{name}: stored as {entry.dtype}, but only linear weights may be FP8 ({entry.path.name})")
        elif name not in scales:
            problems.append(f"{name}: FP8 weight without its {name + _SCALE_SUFFIX} ({entry.path.name})")
        elif len(entry.shape) == 2:
            n, k = entry.shape
            want = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
            got = entries[scales[name]].shape
            if got != want:
                problems.append(
                    f"{scales[name]}: expected {list(want)} (128x128 blocks of {list(entry.shape)}), got {list(got)}"
                )
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected (not part of this config's model): {_listing(sorted(unexpected))}"
        )
    if mismatched:
        problems.append(f"{len(mismatched)} with the wrong shape:\n    " + "\n    ".join(mismatched))
    if problems:
        raise ModelLoadError(
            f"{root}: the checkpoint does not match config.json "
            f"({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}):\n  " + "\n  ".join(problems)
        )
    return scales


# ---------------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------------


def _fp8(
    handles: Mapping[Path, Any],
    entries: Mapping[str, _Entry],
    scale_key: str,
    q: torch.Tensor,
    dtype: torch.dtype,
    fp8_dtype: torch.dtype,
    dequantize: bool,
) -> Weight:
    scale_path = entries[scale_key].path
    s = _get(handles[scale_path], scale_path, scale_key).float()  # dtypes were checked from the headers
    # A block's scale multiplies every value in it: a negative one flips the block's signs (finite
    # garbage no later check could trace back here), NaN or inf poisons it. Zero is a block of zeros
    # (a quantizer without an amax floor writes it for an all-zero block). They are tiny: check them all.
    bad = int((~((s >= 0) & torch.isfinite(s))).sum())
    if bad:
        raise ModelLoadError(
            f"{scale_path}: {scale_key}: {bad} of {s.numel()} scales are negative, NaN or inf; "
            "FP8 block scales must be finite and >= 0"
        )
    if dequantize:
        return dequantize_fp8_blocks(q, s, block=FP8_BLOCK).to(dtype)
    q, s = _to_fp8_format(q, s, fp8_dtype)
    return Fp8Weight(q, s)


def _quantization_config(root: Path) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` (``{}`` when there is none or the file is unreadable:
    the config itself is checked, with a clear error, by :meth:`ModelConfig.from_file`)."""
    try:
        raw = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    q = raw.get("quantization_config") if isinstance(raw, dict) else None
    return q if isinstance(q, dict) else {}


def _has_fp8_weights(root: Path) -> bool:
    """Whether ``config.json`` declares DeepSeek's FP8 quantization (what the log line is about)."""
    return _quantization_config(root).get("quant_method") == "fp8"


def _check_fp8_blocks(root: Path) -> None:
    """An FP8 checkpoint must use DeepSeek's 128×128 scale blocks, the only ones HAL's FP8 GEMMs take."""
    quantization = _quantization_config(root)
    blocks = quantization.get("weight_block_size") if quantization.get("quant_method") == "fp8" else None
    if blocks is not None and (not isinstance(blocks, list) or blocks != [FP8_BLOCK, FP8_BLOCK]):
        raise ModelLoadError(
            f"{root / 'config.json'}: quantization_config.weight_block_size: only [{FP8_BLOCK}, {FP8_BLOCK}] "
            f"(DeepSeek's FP8 format) is supported, got {blocks!r}"
        )


def _to_fp8_format(q: torch.Tensor, s: torch.Tensor, target: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The same block-scaled values with the data in the ``target`` E4M3 format.

    e4m3fn → e4m3fnuz is exact (:func:`hal.quant.e4m3fn_to_fnuz`): e4m3fnuz's exponent bias is one
    larger, so the same bits are worth half as much; the bits are kept and the scale doubled, -0 (FNUZ's
    NaN pattern) becomes +0 and e4m3fn's NaNs become FNUZ's NaN. The other way the bits cannot be kept
    (0x7F is e4m3fnuz's 240 but e4m3fn's NaN), so values are converted with the scale unchanged: every
    e4m3fnuz value is an e4m3fn value except the smallest subnormal (2^-10), which rounds.
    """
    if q.dtype == target:
        return q, s
    if target == torch.float8_e4m3fnuz:
        return e4m3fn_to_fnuz(q, s)
    return q.float().to(target), s


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def _listing(items: list[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
