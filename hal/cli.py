"""The ``hal`` command line.

``hal info`` shows what HAL discovered: plugins (distribution, version, status), backends
(availability and reason, priority), the selected backend, and for every available backend its device,
capabilities and op table (op → implementation → why); for an unavailable backend with a plan, the op
table it would have on its main target (``--arch`` picks another). ``--json`` prints the same as one
JSON document.

``hal run`` generates with the DeepSeek-V3 model on the selected backend: a built-in tiny model with
seeded random weights by default, or a Hugging Face model directory (``--model DIR``); it prints the
generated ids (and text, with ``--prompt``), prefill and decode tokens/s and peak memory. Progress goes
to stderr, so ``--json`` leaves stdout one JSON document.

``hal bench`` benchmarks every compute op of a backend at a shape set against baselines and the
device's peaks (:mod:`hal.bench`), prints a table, and writes JSON (``--json``) and a roofline plot
(``--plot``); ``hal bench compare A.json B.json`` flags regressions between two runs (exit status 1).

``hal compile-check --target sm_90`` compiles every kernel for a GPU target without a GPU and reports
registers, shared memory and spills (:mod:`hal.compile_check`; exit status 1 when one fails).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import hal
from hal.errors import BenchError, HALError
from hal.registry import Registry

if TYPE_CHECKING:
    from hal.model import DeepseekModel, ModelConfig
    from hal.model.parallel import ParallelConfig
    from hal.serving.metrics import ServingMetrics

__all__ = ["RunError", "info_data", "main", "parse_prompt_ids"]

#: ``--dtype`` choices: torch's names.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_MODEL = "tiny (random weights)"

log = logging.getLogger("hal.cli")  # not __name__: that is "__main__" under `python -m hal.cli`


class RunError(HALError, ValueError):
    """A ``hal run`` option that cannot be used as given (the message names the option)."""


_FP8_POLICY_TEXT = {
    "fp8": "kept in FP8",
    "int8": "converted to W8A8 INT8 at load (no FP8 arithmetic; hal run --dequantize-fp8 for bf16)",
    "dequantize": "dequantized to the model's dtype at load (no FP8 or INT8 arithmetic)",
}


def _emit(data: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    """Print a command's result: one JSON document (``--json``), or its human form."""
    if as_json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(human(data))


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def info_data(registry: Registry, backend: str | None = None, arch: str | None = None) -> dict[str, Any]:
    """Everything ``hal info`` shows, as plain data (what ``--json`` prints).

    :param backend: show only this backend's table (``None``: every available backend).
    :param arch: the architecture of the op plans shown for unavailable backends (``None``: each
        backend's main target).
    """
    try:
        selected: str | None = registry.select(backend)
        selection_error = None
    except HALError as exc:
        selected, selection_error = None, str(exc)
    backends = []
    for info in registry.backends():
        item: dict[str, Any] = {
            "name": info.name,
            "priority": info.priority,
            "plugin": info.plugin,
            "description": info.description,
            "reference": info.reference,
            "available": info.available,
            "reason": info.reason,
            "details": {k: _jsonable(v) for k, v in info.details.items()},
            "selected": info.name == selected,
        }
        if info.available and (backend is None or info.name == backend):
            try:
                be = registry.get_backend(info.name)
            except HALError as exc:
                item["error"] = str(exc)
            else:
                item["device"] = str(be.device)
                item["validate"] = be.validate
                from hal.model.loader import fp8_checkpoint_policy  # only for built backends: keep import light

                item["fp8_checkpoints"] = _FP8_POLICY_TEXT[fp8_checkpoint_policy(be.capabilities)]
                item["capabilities"] = be.capabilities.as_dict()
                item["ops"] = {op: entry.as_dict() for op, entry in be.table.items()}
        elif not info.available and backend is None:
            plan = _plan_data(registry, info.name, arch)
            if plan is not None:
                item["plan"] = plan
        backends.append(item)
    return {
        "hal_version": hal.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "plugins": [p.as_dict() for p in registry.plugins()],
        "backends": backends,
        "selected": selected,
        "selection_error": selection_error,
        "catalogue": list(hal.OPS),
        "health": [h.as_dict() for h in hal.health(registry)],
    }


def _plan_data(registry: Registry, name: str, arch: str | None) -> dict[str, Any] | None:
    """An unavailable backend's op table from its ``BackendSpec.plan`` (no device): op → implementation
    and source (``kernel``: a hal_kernels launcher, ``runtime``, ``native``, or ``fallback`` to the
    reference). ``None`` when the backend has no plan."""
    from hal.backend import impl_name
    from hal.ops.catalogue import CATALOGUE

    spec = registry.spec(name)
    if spec.plan is None:
        return None
    try:
        plan = spec.plan(arch)
        table = dict(plan)
    except Exception as exc:  # a plugin's plan may fail in any way; show why instead of the table
        return {"arch": arch or "default", "error": f"{type(exc).__name__}: {exc}"}
    try:
        reference = registry.reference_ops()
    except HALError:
        reference = {}
    ops: dict[str, dict[str, str]] = {}
    for op, op_spec in CATALOGUE.items():
        if op in table:
            impl = str(table[op])
            source = "kernel" if impl.startswith("hal_kernels.") else "native"
            if op_spec.kind == "runtime":
                source = "runtime"
        elif op in reference:
            impl, source = impl_name(reference[op]), "fallback"
        else:
            impl, source = "-", "missing"
        ops[op] = {"impl": impl, "source": source}
    # A plan may say which arch it was made for (the backend's main target when none was asked).
    return {"arch": str(getattr(plan, "arch", None) or arch or "default"), "ops": ops}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines)


def format_info(data: dict[str, Any]) -> str:
    """The human form of :func:`info_data`."""
    out = [f"HAL {data['hal_version']} · torch {data['torch_version']} · Python {data['python_version']}", ""]
    out.append("Plugins (entry-point group 'hal')")
    rows = [["NAME", "DISTRIBUTION", "VERSION", "STATUS", "PROVIDES / ERROR"]]
    for p in data["plugins"]:
        provides = ", ".join([f"backend {b}" for b in p["backends"]] + [f"op {o}" for o in p["ops"]])
        rows.append(
            [
                p["name"],
                p["distribution"] or "-",
                p["version"] or "-",
                p["status"],
                p["error"] if p["status"] == "failed" else (provides or "-"),
            ]
        )
    out += [_table(rows), ""]
    out.append("Backends")
    rows = [["NAME", "PRIORITY", "AVAILABLE", "REASON"]]
    for b in data["backends"]:
        mark = "*" if b["selected"] else " "
        rows.append([f"{mark}{b['name']}", str(b["priority"]), "yes" if b["available"] else "no", b["reason"] or "-"])
    out += [_table(rows), ""]
    facts = [b for b in data["backends"] if b.get("details")]
    if facts:
        # What each probe read (versions, NVML/amdsmi/npu-smi facts, NVLink/XGMI topology, telemetry).
        out.append("Probe facts")
        for b in facts:
            out.append(f"  {b['name']}")
            for key, value in b["details"].items():
                values = value if isinstance(value, list) else [value]
                for v in values:
                    text = "-" if v is None else v if isinstance(v, str) else json.dumps(v, default=str)
                    out.append(f"    {key}: {text}")
        out.append("")
    if data["selected"]:
        out.append(f"Selected: {data['selected']}  (HAL_BACKEND or --backend picks another; * above)")
    else:
        out.append(f"Selected: none\n{data['selection_error']}")
    if "health" in data:
        from hal.serving.health import format_health

        out += ["", *format_health(data["health"])]
    for b in data["backends"]:
        if "error" in b:
            out += ["", f"Backend {b['name']}: failed to build: {b['error']}"]
        if "plan" in b:
            plan = b["plan"]
            if "error" in plan:
                out += ["", f"Backend {b['name']} (unavailable): no op plan for {plan['arch']}: {plan['error']}"]
            else:
                out += ["", f"Backend {b['name']} (unavailable): ops it would serve on {plan['arch']} (see --arch)"]
                rows = [["OP", "IMPLEMENTATION", "SOURCE"]]
                rows += [[op, e["impl"], e["source"]] for op, e in plan["ops"].items()]
                out.append(_table(rows))
        if "ops" not in b:
            continue
        caps = b["capabilities"]
        out += ["", f"Backend {b['name']} on {b['device']}: {caps['device_name']}"]
        out.append(
            f"  arch {caps['arch']} · dtypes {', '.join(caps['dtypes'])} · fp8 {caps['fp8_format'] or 'none'} · "
            f"int8 {'yes' if caps['int8'] else 'no'} · memory {_gib(caps['memory_bytes'])} · "
            f"devices {caps['device_count']} · collectives {caps['dist_backend']} · "
            f"input validation {'on' if b['validate'] else 'off (HAL_VALIDATE=0)'}"
        )
        out.append(f"  DeepSeek FP8 checkpoints: {b['fp8_checkpoints']}")
        rows = [["OP", "IMPLEMENTATION", "SOURCE", "WHY"]]
        for op, entry in b["ops"].items():
            rows.append([op, entry["impl"], entry["source"], entry["reason"]])
        out.append(_table(rows))
    return "\n".join(out)


def _cmd_info(args: argparse.Namespace) -> int:
    registry = hal.default_registry()
    if args.backend is not None:
        registry.select(args.backend)  # an unknown or unavailable name is an error, with every reason
    _emit(info_data(registry, args.backend, args.arch), args.json, format_info)
    return 0


# ---------------------------------------------------------------------------------------------------
# hal run
# ---------------------------------------------------------------------------------------------------


_ID = re.compile(r"-?[0-9]+")  # a negative id parses, and is refused as outside the vocabulary


def parse_prompt_ids(text: str) -> list[list[int]]:
    """``"1,2,3;7,8"`` → ``[[1, 2, 3], [7, 8]]``: prompts separated by ``;``, ids by ``,`` (spaces allowed).

    :raises RunError: an empty prompt or an item that is not an integer, with its position.
    """
    prompts: list[list[int]] = []
    for i, part in enumerate(text.split(";")):
        items = [item.strip() for item in part.split(",")]
        if items == [""]:
            raise RunError(f"--prompt-ids: prompt {i} is empty in {text!r}; separate prompts with ';' and ids with ','")
        ids = []
        for j, item in enumerate(items):
            try:
                if not _ID.fullmatch(item):  # int() would also take '1_0', '+1' and non-ASCII digits
                    raise ValueError(item)
                ids.append(int(item))
            except ValueError:
                raise RunError(
                    f"--prompt-ids: prompt {i} ({part.strip()!r}): item {j} is {item!r}, not an integer; "
                    "expected ids like '1,2,3;7,8'"
                ) from None
        prompts.append(ids)
    return prompts


def random_prompts(batch: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``batch`` seeded random prompts with lengths spread over 8..32 tokens (different lengths, so the
    batch exercises the packed prefill and ragged decode)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [8 + (24 * i) // max(batch - 1, 1) for i in range(batch)]
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def _tokenizer(model_dir: str | None) -> Any:
    if model_dir is None:
        raise RunError("--prompt: text needs a tokenizer; give --model DIR with a tokenizer.json (or use --prompt-ids)")
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise RunError(f"--prompt: {path} not found; the model directory has no tokenizer.json (use --prompt-ids)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise RunError("--prompt: needs the tokenizers package: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type for unreadable files
        raise RunError(f"--prompt: cannot read {path}: {exc}") from None


def _tiny_model(
    args: argparse.Namespace, backend: hal.Backend, dtype: torch.dtype, parallel: ParallelConfig | None = None
) -> DeepseekModel:
    from hal.model import DeepseekModel, random_state_dict, tiny_config
    from hal.model.loader import quantize_linear
    from hal.model.weights import Weight, is_linear

    cfg = tiny_config()
    weights: dict[str, Weight] = dict(random_state_dict(cfg, seed=args.seed))
    if args.quantize is not None:
        # What --model DIR --quantize does at load, on the built-in model's weights (_check_quantize ran).
        fp8 = backend.capabilities.fp8_dtype or torch.float8_e4m3fn
        for name, w in list(weights.items()):
            quantized = (
                quantize_linear(w, args.quantize, fp8) if is_linear(name) and isinstance(w, torch.Tensor) else None
            )
            if quantized is not None:
                weights[name] = quantized
    if parallel is not None:  # every rank drew the same full weights from the seed; each keeps its share
        from hal.model.parallel import shard_state_dict

        weights = shard_state_dict(weights, cfg, parallel)
    return DeepseekModel(cfg, backend, weights, dtype=dtype, parallel=parallel)


def _check_quantize(args: argparse.Namespace, backend: hal.Backend) -> None:
    """``--quantize`` needs the arithmetic on ``backend``; ``--dequantize-fp8`` contradicts it."""
    if args.quantize is None:
        return
    if args.dequantize_fp8:
        raise RunError(
            "--dequantize-fp8: loads an FP8 checkpoint as --dtype weights; it cannot be combined with --quantize"
        )
    caps = backend.capabilities
    if (args.quantize == "fp8" and caps.fp8_dtype is None) or (args.quantize == "int8" and not caps.int8):
        raise RunError(
            f"--quantize {args.quantize}: backend {backend.name!r} ({caps.arch}) has no "
            f"{args.quantize.upper()} arithmetic; run without --quantize or choose another backend"
        )


def _checkpoint_fp8_names(model_dir: str) -> set[str] | None:
    """The weights a checkpoint stores in FP8 (those with a ``_scale_inv``), from its index or its
    safetensors headers alone; ``None`` when they cannot be read (the loader then says why)."""
    from safetensors import safe_open

    root = Path(model_dir)
    suffix = "_scale_inv"
    try:
        index = root / "model.safetensors.index.json"
        if index.is_file():
            keys = list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        else:
            keys = []
            for path in sorted(root.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    keys += list(f.keys())
    except Exception:  # unreadable or malformed: load_weights reports it with the file and the reason
        return None
    return {k[: -len(suffix)] for k in keys if k.endswith(suffix)}


def _run_config(args: argparse.Namespace) -> ModelConfig:
    """The config ``hal run`` builds: the built-in tiny one, or ``--model``'s config.json."""
    from hal.model import tiny_config
    from hal.model.config import ModelConfig

    return tiny_config() if args.model is None else ModelConfig.from_file(Path(args.model) / "config.json")


def _checked_prompts(args: argparse.Namespace, cfg: ModelConfig, prompts: list[list[int]] | None) -> list[list[int]]:
    """The prompts (``None``: ``--batch`` seeded random ones, drawn from config.json's vocabulary), refused
    before any weight is built or read (and before the rendezvous) where the model cannot take them: ids
    outside the vocabulary, too long for ``max_position_embeddings`` with --max-new-tokens."""
    from hal.model.generate import check_prompts

    # Each source is named: ids a tokenizer produced as its, random ones as such, or the user hunts for
    # them in what they typed.
    if prompts is None:
        batch = 4 if args.batch is None else args.batch
        prompts = random_prompts(batch, cfg.vocab_size, args.seed)
        where = f"{batch} random prompt(s) of 8-32 tokens (no --prompt-ids or --prompt)"
    elif args.prompt is None:
        where = "--prompt-ids"
    else:
        where = f"--prompt (ids from {Path(args.model) / 'tokenizer.json'})"
    return check_prompts(prompts, cfg, args.max_new_tokens, where=where)


def _check_layout(args: argparse.Namespace, cfg: ModelConfig, backend: hal.Backend, world: int) -> None:
    """Refuse, before the rendezvous and before any weight is built or read, a --tp/--ep run that cannot
    go: a combination the world size refuses, sizes the config does not divide, --ep on a model without
    routed experts, or FP8 weights that --tp would cut off their 128-blocks."""
    from hal.model.loader import fp8_checkpoint_policy
    from hal.model.parallel import ParallelConfig, quantized_to_fp8

    par = ParallelConfig.create(args.tp, args.ep, rank=0, world_size=world)
    in_fp8: set[str] = set()
    if args.model is not None and fp8_checkpoint_policy(backend.capabilities, dequantize=args.dequantize_fp8) == "fp8":
        in_fp8 = _checkpoint_fp8_names(args.model) or set()
    quantize_fp8 = args.quantize == "fp8"

    def is_fp8(name: str, shape: tuple[int, ...]) -> bool:
        return name in in_fp8 or (quantize_fp8 and quantized_to_fp8(name, shape))

    par.check(cfg, fp8=is_fp8 if in_fp8 or quantize_fp8 else None)


def _launch_position() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` as torchrun set them; ``(0, 1)`` outside torchrun (or when they do not parse,
    which :func:`hal.model.parallel.init_parallel` then reports)."""
    import os

    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _cmd_run(args: argparse.Namespace) -> int:
    """``hal run``: check everything the command line and the config decide, then (under torchrun) start
    the process group, build the model, generate and report (rank 0 alone reports).

    On several processes an error is printed as ``rank R/W: ...``, except one that the command line and
    the config decide, which every rank meets alike before the rendezvous and rank 0 alone prints; the
    process group is shut down however the run ends."""
    from hal.model.generate import GenerationError
    from hal.model.parallel import ParallelError, init_parallel

    rank, world = _launch_position()
    if world > 1 and rank != 0:  # rank 0 alone reports: progress, logs and output
        args.quiet = True
        logging.getLogger("hal").setLevel(logging.WARNING)
    if not args.quiet:
        for name in ("hal.cli", "hal.model"):
            logging.getLogger(name).setLevel(logging.INFO)

    def fail(exc: HALError) -> int:
        where = f"rank {rank}/{world}: " if world > 1 else ""
        sys.stderr.write(f"hal {args.command}: error: {where}{exc}\n")  # one write: ranks share the terminal
        sys.stderr.flush()
        return 1

    try:
        backend, prompts, tokenizer = _prepare_run(args, world)
    except (RunError, ParallelError, GenerationError) as exc:
        return fail(exc) if rank == 0 else 1  # the same on every rank: said once
    except HALError as exc:  # a backend or a file that may fail on one rank only
        return fail(exc)
    try:
        parallel = init_parallel(args.tp, args.ep, backend)  # None: one process
        return _execute_run(args, backend, prompts, tokenizer, parallel)
    except HALError as exc:
        return fail(exc)
    finally:
        if world > 1:
            from hal.distributed import info, shutdown

            if info() is not None:  # the group this run started, whatever happened since
                shutdown()


def _prepare_run(args: argparse.Namespace, world: int) -> tuple[hal.Backend, list[list[int]], Any]:
    """Everything ``hal run`` checks and reads before a process group or a model: the options together,
    the sampling values, the prompts, the backend (on this rank's device) and the parallel layout.

    :returns: the backend, the prompts (given, or ``--batch`` random ones) and the tokenizer (``None``
        without ``--prompt``).
    """
    from hal.model.generate import check_sampling, check_seed

    if args.batch is not None and (args.prompt_ids is not None or args.prompt is not None):
        raise RunError("--batch: draws random prompts; it cannot be combined with --prompt-ids or --prompt")
    if args.metrics_port is not None and (args.tp > 1 or args.ep > 1 or world > 1):
        raise RunError("--metrics-port: serving metrics run in one process; drop --tp/--ep and torchrun")
    if args.metrics_port is None and (args.op_metrics or args.metrics_linger):
        raise RunError("--op-metrics and --metrics-linger go with --metrics-port [ADDR:]PORT")
    if not 0 <= args.metrics_linger < math.inf:
        raise RunError(f"--metrics-linger: expected a finite number of seconds >= 0, got {args.metrics_linger}")
    check_sampling(args.max_new_tokens, 0.0, 1.0, where="--max-new-tokens")  # each error names its flag
    check_sampling(0, args.temperature, 1.0, where="--temperature")
    check_sampling(0, 0.0, args.top_p, where="--top-p")
    check_seed(args.seed, where="--seed")  # it seeds the random prompts and weights too, before any sampling
    prompts: list[list[int]] | None = None
    tokenizer = None
    # Read every input before loading a model, which can take minutes.
    if args.prompt_ids is not None:
        prompts = parse_prompt_ids(args.prompt_ids)
    elif args.prompt is not None:
        tokenizer = _tokenizer(args.model)
        try:
            prompts = [tokenizer.encode(text).ids for text in args.prompt]
        except Exception as exc:  # tokenizers raises plain Exceptions
            raise RunError(f"--prompt: {args.model}/tokenizer.json cannot encode the prompt: {exc}") from None
        for i, p in enumerate(prompts):
            if not p:
                raise RunError(f"--prompt: prompt {i} ({args.prompt[i]!r}) encodes to no tokens")
    registry = hal.default_registry()
    if world > 1 and not registry.spec(registry.select(args.backend)).reference:
        from hal.distributed import bind_local_device

        bind_local_device()  # build the backend on this rank's device, not device 0
    backend = hal.get_backend(args.backend)
    _check_quantize(args, backend)
    cfg = _run_config(args)  # config.json, read once for the checks below
    prompts = _checked_prompts(args, cfg, prompts)
    size = world if world > 1 else max(args.tp, args.ep)  # one process: the world --tp/--ep ask for
    if world > 1 or (size > 1 and {args.tp, args.ep} <= {1, size}):
        # In one process too (when --tp/--ep name a world size): a layout the config cannot take is
        # refused before "launch with torchrun" is suggested.
        _check_layout(args, cfg, backend, size)
    if world > 1:
        from hal.distributed import configured_timeout

        try:
            configured_timeout()  # the same on every rank: refused once, by rank 0, before the rendezvous
        except HALError as exc:
            raise RunError(str(exc)) from None
    return backend, prompts, tokenizer


def _execute_run(
    args: argparse.Namespace,
    backend: hal.Backend,
    prompts: list[list[int]],
    tokenizer: Any,
    parallel: ParallelConfig | None,
) -> int:
    metrics = None
    if args.metrics_port is not None:
        # Served from before the model is built to after the report (+ --metrics-linger seconds), so a
        # scrape sees the whole run and its final values. (_prepare_run refused it with --tp/--ep.)
        from hal.serving.metrics import ServingMetrics

        addr, port = args.metrics_port
        metrics = ServingMetrics(op_metrics=args.op_metrics)
        try:
            port = metrics.serve(port, addr)  # the port bound: the one asked for, or a free one for 0
        except OSError as exc:
            raise RunError(f"--metrics-port: cannot listen on {addr}:{port}: {exc}; pick another port") from None
        log.info("serving Prometheus metrics on http://%s:%d/metrics", addr, port)
    try:
        _generate_and_report(args, backend, prompts, tokenizer, parallel, metrics)
        if metrics is not None:
            metrics.close(linger_s=args.metrics_linger)
    finally:
        if metrics is not None:
            metrics.close()  # at once when the run failed
    return 0


def _generate_and_report(
    args: argparse.Namespace,
    backend: hal.Backend,
    prompts: list[list[int]],
    tokenizer: Any,
    parallel: ParallelConfig | None,
    metrics: ServingMetrics | None,
) -> None:
    from hal.model.generate import generate

    dtype = DTYPES[args.dtype]
    label = TINY_MODEL if args.model is None else str(args.model)
    log.info("building %s on %s (%s, %s)", label, backend.name, backend.device, args.dtype)
    if args.model is None:
        model = _tiny_model(args, backend, dtype, parallel)
    else:
        from hal.model.loader import load_model

        model = load_model(
            args.model,
            backend,
            dtype=dtype,
            quantize=args.quantize,
            dequantize_fp8=args.dequantize_fp8,
            progress=not args.quiet,
            parallel=parallel,
        )
    if args.warmup:
        # The first calls pay one-time costs (kernel selection, allocator growth, lazy initialization) that
        # would otherwise be charged to the reported rates: run one short sequence first, untimed.
        log.info("warm-up: one sequence, %d new token(s)", min(2, args.max_new_tokens))
        generate(model, [prompts[0][:8]], max_new_tokens=min(2, args.max_new_tokens))
    sampling: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    if metrics is not None:
        # Through hal.AutoBatcher, which records into the metrics; the tokens, sampled ones included, are
        # generate()'s (all prompts run as one batch, drawing from one generator seeded --seed).
        from hal.serving import generate_batched

        result = generate_batched(model, prompts, **sampling, metrics=metrics)
    else:
        result = generate(model, prompts, **sampling, progress=not args.quiet)
    texts = None if tokenizer is None else [tokenizer.decode(t) for t in result.tokens]
    data: dict[str, Any] = {
        "backend": backend.name,
        "device": str(backend.device),
        "model": label,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "tp": args.tp,
        "ep": args.ep,
        "prompts": prompts,
        **result.to_dict(),
    }
    if texts is not None:
        data["prompt_texts"] = list(args.prompt)
        data["texts"] = texts
    if metrics is not None:
        data["metrics_port"] = metrics.port
    if parallel is None or parallel.rank == 0:
        _emit(data, args.json, format_run)


def _per_s(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:,.1f} tok/s"


def format_run(data: dict[str, Any]) -> str:
    """The human form of ``hal run --json``."""
    quant = f" · weights {data['quantize']}" if data["quantize"] else ""
    sampling = "greedy"
    if data["temperature"] != 0:
        sampling = f"temperature {data['temperature']:g}, top-p {data['top_p']:g}, seed {data['seed']}"
    out = [
        f"backend: {data['backend']} ({data['device']})",
        f"model: {data['model']} · {data['dtype']}{quant}",
        f"sampling: {sampling}",
        "",
    ]
    for i, (tokens, n, reason) in enumerate(
        zip(data["tokens"], data["prompt_lengths"], data["finish_reasons"], strict=True)
    ):
        out.append(f"sequence {i}: prompt {n} tokens → {len(tokens)} new ({reason})")
        if "texts" in data:
            out.append(f"  prompt: {data['prompt_texts'][i]!r}")
            out.append(f"  text:   {data['texts'][i]!r}")
        out.append("  ids:    " + (" ".join(map(str, tokens)) or "-"))
    peak = data["peak_memory_bytes"]
    memory = "unknown" if peak is None else f"{peak / 2**20:,.1f} MiB"
    out += [
        "",
        f"prefill: {_per_s(data['prefill_tokens_per_s'])} · decode: {_per_s(data['decode_tokens_per_s'])} · "
        f"peak memory {memory}",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# hal bench
# ---------------------------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    from hal.bench import (
        default_shape_set,
        format_table,
        plot_roofline,
        run_suite,
        shape_set,
        write_json,
    )
    from hal.bench.cases import check_ops

    if args.bench_command == "compare":
        return _cmd_bench_compare(args)
    # Check every option before measuring anything (a full run takes minutes).
    ops = check_ops(args.ops.split(",")) if args.ops is not None else None
    if ops == []:
        raise BenchError("--ops: no op named; give a comma-separated list such as gemm,mla_decode")
    shapes = shape_set(args.shapes) if args.shapes is not None else None
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            _check_output_path(flag, path)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError(
                "--plot needs matplotlib: pip install 'hal-accel[bench]' (or pip install matplotlib)"
            ) from None
    registry = hal.default_registry()
    backend = registry.get_backend(args.backend)
    reference = registry.reference_ops()
    if shapes is None:
        shapes = default_shape_set(backend.device.type)
    run = run_suite(
        backend,
        reference,
        shapes,
        ops=ops,
        quick=args.quick,
        progress=not args.quiet,
        command=" ".join(["hal", *(args.argv or [])]),
        graphs=not args.no_graphs,
    )
    doc = run.as_dict()
    print(format_table(doc))
    if args.json is not None:
        try:
            write_json(doc, args.json)
        except OSError as exc:
            raise BenchError(f"--json: cannot write {args.json}: {exc.strerror or exc}") from None
        print(f"\nwrote {args.json}")
    if args.plot is not None:
        try:
            plot_roofline(doc, args.plot)
        except OSError as exc:
            raise BenchError(f"--plot: cannot write {args.plot}: {exc.strerror or exc}") from None
        print(f"wrote {args.plot}")
    return 1 if run.errors else 0


def _check_output_path(flag: str, path: str) -> None:
    """Refuse an output path that cannot be written, before a run of minutes: a directory, or a parent
    folder that cannot be created or written to (the folder is created now; the write would create it)."""
    import tempfile

    p = Path(path)
    if p.is_dir():
        raise BenchError(f"{flag}: {path} is a directory; give a file path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p.parent):
            pass
    except OSError as exc:
        raise BenchError(f"{flag}: cannot write {path}: {exc.strerror or exc}") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise BenchError(f"{flag}: cannot write {path}: permission denied")


def _cmd_bench_compare(args: argparse.Namespace) -> int:
    from hal.bench import compare, format_comparison, load_results

    a, b = load_results(args.a), load_results(args.b)
    result = compare(a, b, args.threshold, absolute=args.absolute)
    print(format_comparison(result, Path(args.a).name, Path(args.b).name))
    return 1 if result.failed else 0


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _listen_address(text: str) -> tuple[str, int]:
    from hal.serving.metrics import parse_listen_address

    try:
        return parse_listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hal",
        description="HAL: one DeepSeek-style MoE+MLA model on any accelerator vendor.",
        epilog="Environment: HAL_BACKEND picks a backend by name; HAL_DISABLE_PLUGINS=a,b blocks plugins; "
        "HAL_VALIDATE=0 turns off op input validation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log plugin discovery and fallbacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser(
        "info",
        help="show plugins, backends, the selected backend and each backend's op table",
        description="Show discovered plugins and backends (available or not, with the reason), the selected "
        "backend, and for every available backend its device, capabilities and op table: which "
        "implementation serves each op, and why (native, plugin override, or fallback to the reference).",
    )
    info.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    info.add_argument("--backend", metavar="NAME", help="show only this backend (an error if it is unavailable)")
    info.add_argument(
        "--arch", metavar="ARCH", help="arch of the op plans shown for unavailable backends (sm_90, gfx942, …)"
    )
    info.set_defaults(func=_cmd_info)

    run = sub.add_parser(
        "run",
        help="generate with the DeepSeek-V3 model (default: a tiny model with random weights) and print tokens/s",
        description="Generate tokens with the DeepSeek-V3 architecture on the selected backend and report prefill "
        "and decode throughput and peak memory. Without --model it builds a built-in tiny config (6.6M "
        "parameters) with weights drawn from --seed; without --prompt-ids or --prompt it generates from --batch "
        "seeded random prompts of 8 to 32 tokens. Prompts of different lengths run as one batch: one prefill, then "
        "one decode step per token; a sequence stops at an end-of-sequence id (config.json's eos_token_id; null "
        "never stops early) or after --max-new-tokens.",
        epilog="Examples: hal run · hal run --json · hal run --model DIR --prompt-ids '1,2,3;7,8' --max-new-tokens 16 "
        "· hal run --model DIR --prompt 'Hello' --temperature 0.7 --top-p 0.9 --seed 1",
    )
    run.add_argument(
        "--model",
        metavar="DIR",
        help="a Hugging Face model directory (config.json and safetensors, bf16/fp32 or DeepSeek FP8); "
        "default: the built-in tiny model with seeded random weights",
    )
    prompt = run.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt-ids",
        metavar="IDS",
        help="token ids, ',' between ids and ';' between prompts ('1,2,3;7,8': a batch of two sequences)",
    )
    prompt.add_argument(
        "--prompt",
        metavar="TEXT",
        action="append",
        help="a text prompt, tokenized with DIR/tokenizer.json (needs --model); repeat for a batch",
    )
    run.add_argument(
        "--batch",
        type=_positive_int,
        metavar="N",
        help="draw N seeded random prompts of different lengths (default 4; only without a prompt)",
    )
    run.add_argument(
        "--max-new-tokens",
        type=_non_negative_int,
        default=32,
        metavar="N",
        help="the most tokens to generate per sequence (default 32; 0 runs the prefill only)",
    )
    run.add_argument(
        "--backend", metavar="NAME", help="run on this backend (default: HAL_BACKEND, else the best available)"
    )
    run.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="activation and weight dtype (default float32); FP8 weights stay FP8",
    )
    run.add_argument(
        "--quantize",
        choices=["fp8", "int8"],
        help="quantize the linear layers' weights at load: fp8 is DeepSeek's format (e4m3 with one fp32 scale "
        "per 128x128 block, needs a backend with FP8), int8 is W8A8 (one fp32 scale per output channel, "
        "activations quantized per token)",
    )
    run.add_argument(
        "--dequantize-fp8",
        action="store_true",
        help="on a backend without FP8 arithmetic, load a DeepSeek FP8 checkpoint as --dtype weights instead "
        "of converting it to W8A8 INT8",
    )
    run.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        default=0.0,
        help="0 (default) is greedy; above 0 samples from softmax(logits / temperature)",
    )
    run.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        default=1.0,
        help="sample only among the most likely tokens covering this probability mass, in (0, 1] (default 1: all)",
    )
    run.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=0,
        help="seeds the tiny model's weights, the random prompts and the sampler (default 0)",
    )
    run.add_argument(
        "--tp",
        type=_positive_int,
        default=1,
        metavar="N",
        help="tensor parallelism over N processes: MLA heads, dense MLP, shared experts and LM head split "
        "(run under torchrun --nproc-per-node N; default 1)",
    )
    run.add_argument(
        "--ep",
        type=_positive_int,
        default=1,
        metavar="N",
        help="expert parallelism over N processes: routed experts split, tokens sent to them with "
        "ep_dispatch/ep_combine (under torchrun --nproc-per-node N; 1 or the same N as --tp; default 1)",
    )
    run.add_argument("--json", action="store_true", help="print one JSON document (progress still goes to stderr)")
    run.add_argument(
        "--metrics-port",
        type=_listen_address,
        metavar="[ADDR:]PORT",
        help="serve Prometheus metrics (tokens/s, latencies, batch sizes, KV-cache blocks, device memory and "
        "health) on PORT (0: a free one, logged and in --json as metrics_port) from start-up to the end of the "
        "run, the prompts going through hal.AutoBatcher (same tokens as without it); ADDR defaults to "
        "127.0.0.1 (0.0.0.0 for a remote Prometheus). Needs prometheus-client (pip install 'hal-accel[metrics]')",
    )
    run.add_argument(
        "--metrics-linger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --metrics-port: keep serving this long after the report, so a Prometheus scraping at least "
        "that often gets the final values (default 0: exit at once)",
    )
    run.add_argument(
        "--op-metrics",
        action="store_true",
        help="with --metrics-port: also time every op (hal_op_latency_seconds); wrapping the ops adds host "
        "time, so the reported rates drop a little",
    )
    run.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the short untimed warm-up generation that keeps one-time start-up costs out of the rates",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="do not log progress to stderr")
    run.set_defaults(func=_cmd_run)

    _add_bench_parser(sub)
    from hal.compile_check import add_parser as add_compile_check_parser

    add_compile_check_parser(sub, _cmd_compile_check)
    return parser


def _cmd_compile_check(args: argparse.Namespace) -> int:
    from hal.compile_check import format_report, prepare_process, run_check

    prepare_process()  # the kernels must be imported without TRITON_INTERPRET to be compiled
    report = run_check(args.target, kernel=args.kernel, tuning_dir=args.tuning, progress=not args.quiet)
    _emit(report.as_dict(), args.json, format_report)
    return 0 if report.ok else 1


def _add_bench_parser(sub: Any) -> None:
    from hal.bench.cases import BASELINES, BENCH_OPS
    from hal.bench.report import DEFAULT_THRESHOLD
    from hal.bench.shapes import SHAPE_SETS

    sets = "; ".join(f"{s.name}: {s.description}" for s in SHAPE_SETS.values())
    bench = sub.add_parser(
        "bench",
        help="benchmark every compute op against baselines and the device's peaks; compare two runs",
        description="Benchmark the compute ops of a backend at a shape set. Each case runs the backend's op and, "
        "side by side in the same run, its baselines (the reference implementation; F.linear, torch._scaled_mm, "
        "torch._grouped_mm, torch.bmm, SDPA, F.rms_norm where they apply), reports the median time, TFLOPS "
        "(GFLOP/s on a CPU) and GB/s by the published anchors' formulas, the percentage of the device's peak "
        "(a peaks table for H100, H200, MI300X and Ascend 910B; a CPU's bandwidth and GEMM rate are measured at "
        "start) and HAL's time divided by each baseline's. On CUDA devices kernels are timed with device "
        "events and an L2 flush, and again captured in a CUDA graph. Progress goes to stderr.",
        epilog="Ops: " + ", ".join(f"{op} (vs {', '.join(BASELINES[op])})" for op in BENCH_OPS) + ". "
        "Collectives (all_reduce, all_to_all) need several processes and are not run here: "
        "`pytest bench/collectives` measures them over a 2-process gloo group; `pytest bench` (make bench) runs "
        "the same cases under pytest-benchmark (HAL_BENCH_SHAPES=NAME picks the set, HAL_BENCH_QUICK=1 the quick "
        "shapes), and bench/model the model's decode against transformers. "
        "Examples: hal bench --quick · hal bench --ops gemm,mla_decode --json out.json --plot roofline.png · "
        "hal bench compare before.json after.json",
    )
    bench.add_argument(
        "--quick", action="store_true", help="a minute-scale smoke run: fewer shapes per op, shorter timing"
    )
    bench.add_argument(
        "--shapes",
        metavar="NAME",
        help=f"the shape set (default: cpu-small on a CPU, deepseek-v3 on an accelerator). {sets}",
    )
    bench.add_argument(
        "--backend", metavar="NAME", help="benchmark this backend (default: HAL_BACKEND, else the best available)"
    )
    bench.add_argument("--ops", metavar="A,B", help="only these ops, comma-separated (default: every op listed below)")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON (schema hal-bench/1)")
    bench.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw a roofline PNG: each case a point (FLOP/byte, achieved FLOP rate) under the device's "
        "bandwidth and compute roofs (needs matplotlib: pip install 'hal-accel[bench]')",
    )
    bench.add_argument(
        "--no-graphs", action="store_true", help="skip the CUDA-graph timing (CUDA devices; never done on a CPU)"
    )
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    bench.set_defaults(func=_cmd_bench, bench_command=None)
    bench_sub = bench.add_subparsers(dest="bench_command", title="subcommand", metavar="compare")
    cmp = bench_sub.add_parser(
        "compare",
        help="compare two hal bench --json runs; exit status 1 when a result regressed or failed, or none matched",
        description="Match the results of two runs by (op, shape, dtype) and print B's median time over A's. When B "
        "is slower overall, each ratio is divided by that drift (the median ratio: a machine-wide shift moves every "
        "op alike), and the drift itself is a regression past 1 + threshold. A result has regressed when its ratio "
        "exceeds 1 + max(threshold, spread), spread being the larger of its two measured spreads (interquartile "
        "range / median): a difference within a run's own scatter is noise. Exit status: 0 without regression, 1 "
        "with one, when a result of A failed in B, when no result is in both runs, or when a file cannot be read.",
    )
    cmp.add_argument("a", metavar="A.json", help="the baseline run (before)")
    cmp.add_argument("b", metavar="B.json", help="the run to check (after)")
    cmp.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        metavar="X",
        help=f"relative slowdown tolerated beyond noise (default {DEFAULT_THRESHOLD}: above the run-to-run scatter "
        "of --quick runs on a small shared CPU; lower it where reruns scatter less)",
    )
    cmp.add_argument(
        "--absolute", action="store_true", help="judge raw ratios, without dividing out a whole-run slowdown"
    )
    cmp.set_defaults(func=_cmd_bench)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        rc = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return rc
    except HALError as exc:
        print(f"hal {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of stdout went away (``hal run --json | head``): no traceback, and no second error
        # when Python flushes stdout at exit (the recipe of Python's signal docs).
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor (embedded, captured)
            pass
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
