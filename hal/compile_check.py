"""``hal compile-check``: compile every kernel for a real GPU target on a machine without one.

For a target (``sm_80``, ``sm_90``, ``sm_100``, ``gfx942``, ``gfx950``; any ``sm_XY`` or ``gfxNNN`` is
tried) it

1. reads the owning backend's tuning for that arch (``hal_nvidia/tuning`` for ``sm_*``,
   ``hal_rocm/tuning`` for ``gfx*``; ``--tuning DIR`` reads another directory),
2. asks every kernel module of :data:`hal_kernels.MODULES` for its
   :class:`~hal_kernels._common.CompileSpec` list (``compile_specs(fp8, tuning)``, the target's fp8
   pointer type substituted for :data:`hal_kernels._common.FP8`),
3. compiles each with ``triton.compile(ASTSource(...), target=GPUTarget(...))`` (arguments specialized
   as a launch with torch tensors would be: pointers and the spec's ``divisible_by_16`` arguments
   multiples of 16, pointers under 2 GiB on AMD), and reads the
   resources the compiled code needs: registers and spills from ptxas' report and ``cuobjdump
   --dump-resource-usage`` (Triton's bundled tools) on CUDA, from the ``amdgcn`` metadata (VGPRs,
   SGPRs, AGPRs, spill counts, scratch) on HIP; shared memory from Triton's metadata,
4. marks ``error`` any kernel needing more shared memory (LDS) per program than the target has
   (:data:`SHARED_MEMORY_LIMITS`): it compiles, but cannot launch; a target without a known limit is
   not checked, and the report's notes say so,
5. on ``sm_*`` targets, compiles every CUDA C source ``hal_nvidia/cuda/*.cu`` with ``nvcc -cubin``
   for the target (``sm_90a`` for ``sm_90``), reporting ptxas' registers and spills per kernel; without
   nvcc those lines are ``skipped`` with the reason.

A target the installed Triton cannot compile for (a trivial probe kernel fails) gives ``unsupported``
lines, not an exception; a spec needing an fp8 type the target lacks (``sm_80`` has no e4m3) is
``skipped``. Any ``error`` makes :attr:`CheckReport.ok` false (``hal compile-check`` exits 1).

Compiling needs the kernels imported *without* ``TRITON_INTERPRET=1`` (the interpreter's functions
cannot be compiled); the command removes the variable before importing them. Heavy imports (Triton,
the kernels) happen inside the functions, so ``hal`` itself does not need Triton.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hal.errors import HALError
from hal.progress import Progress

__all__ = [
    "KNOWN_TARGETS",
    "SHARED_MEMORY_LIMITS",
    "CheckReport",
    "CompileCheckError",
    "KernelResult",
    "Target",
    "add_parser",
    "format_report",
    "parse_target",
    "run_check",
]

#: the targets CI checks; any other ``sm_XY`` / ``gfxNNN`` is tried too.
KNOWN_TARGETS = ("sm_80", "sm_90", "sm_100", "gfx942", "gfx950")

#: Shared memory (AMD: LDS) one program may use, in bytes, by target: on NVIDIA the opt-in maximum per
#: block (``cudaDevAttrMaxSharedMemoryPerBlockOptin``: 227 KiB on H100/B200, 163 KiB on A100, 99 KiB on
#: the consumer parts), on AMD the LDS of one workgroup (64 KiB on MI300, 160 KiB on MI350). More than
#: this compiles but cannot launch (Triton raises ``OutOfResources`` at the first call).
SHARED_MEMORY_LIMITS: Mapping[str, int] = {
    "sm_80": 163 * 1024,
    "sm_86": 99 * 1024,
    "sm_89": 99 * 1024,
    "sm_120": 99 * 1024,
    "sm_90": 227 * 1024,
    "sm_100": 227 * 1024,
    "gfx942": 64 * 1024,
    "gfx950": 160 * 1024,
}

Status = Literal["ok", "error", "skipped", "unsupported"]

#: how much of an error message a result keeps (MLIR dumps run to megabytes).
_MAX_DETAIL = 4000


class CompileCheckError(HALError, ValueError):
    """``hal compile-check`` cannot run as asked (unknown target, no such kernel, no Triton)."""


# ---------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A GPU target as Triton and the backends name it.

    :ivar name: ``sm_90``, ``gfx942``, … (also the tuning-file key).
    :ivar backend: Triton's backend name, ``cuda`` or ``hip``.
    :ivar arch: Triton's arch: the compute capability as an int (``90``) or the gfx name.
    :ivar warp_size: 32 on NVIDIA, 64 on AMD Instinct (wave64).
    :ivar fp8: the Triton pointer type standing for e4m3 on this target: ``*fp8e4nv`` (OCP e4m3fn:
        NVIDIA, gfx950) or ``*fp8e4b8`` (e4m3fnuz: gfx940-gfx942).
    :ivar package: the backend package owning this target's tuning (``hal_nvidia``, ``hal_rocm``).
    """

    name: str
    backend: Literal["cuda", "hip"]
    arch: int | str
    warp_size: int
    fp8: str
    package: str

    @property
    def shared_limit(self) -> int | None:
        """Bytes of shared memory (LDS) a program may use (:data:`SHARED_MEMORY_LIMITS`); ``None``: unknown."""
        return SHARED_MEMORY_LIMITS.get(self.name)

    @property
    def nvcc_arch(self) -> str:
        """nvcc's ``-arch`` for CUDA C: the arch-specific ``sm_90a`` / ``sm_100a`` from Hopper on."""
        return f"sm_{self.arch}{'a' if int(self.arch) >= 90 else ''}"


def parse_target(name: str) -> Target:
    """``"sm_90"`` (or ``sm90``, ``sm_90a``) → the CUDA target; ``"gfx942"`` → the HIP target.

    :raises CompileCheckError: a name that is neither.
    """
    text = str(name).strip().lower()
    m = re.fullmatch(r"sm_?(\d+)a?", text)
    if m:
        cc = int(m.group(1))
        return Target(f"sm_{cc}", "cuda", cc, 32, "*fp8e4nv", "hal_nvidia")
    if re.fullmatch(r"gfx[0-9a-f]+", text):
        # CDNA3 (gfx940-942) implements the FNUZ e4m3 variant; gfx950 and later OCP e4m3fn.
        fnuz = text in ("gfx940", "gfx941", "gfx942")
        wave = 32 if text.startswith(("gfx10", "gfx11", "gfx12")) else 64  # RDNA runs wave32
        return Target(text, "hip", text, wave, "*fp8e4b8" if fnuz else "*fp8e4nv", "hal_rocm")
    raise CompileCheckError(
        f"--target {name!r}: expected an NVIDIA 'sm_XY' or an AMD 'gfxNNN' target, e.g. {', '.join(KNOWN_TARGETS)}"
    )


def _package_dir(package: str) -> Path:
    """A backend package's directory, found without importing it (the core imports no backend)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CompileCheckError(f"package {package!r} is not installed; its tuning and sources are needed")
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------


@dataclass
class KernelResult:
    """One line of the report.

    :ivar kernel: the compile spec's name (``gemm_fp8[bf16 out]``), or ``file.cu:function`` for CUDA C.
    :ivar module: the kernel module (``gemm``), or ``cuda`` for CUDA C sources.
    :ivar kind: ``triton`` or ``cuda-c``.
    :ivar status: ``ok``, ``error`` (fails the check: it does not compile, or needs more shared memory
        than the target has), ``skipped`` (with the reason in ``detail``) or ``unsupported`` (the
        installed Triton cannot target this arch).
    :ivar registers: per thread: ptxas' count on CUDA, VGPRs (AGPRs included) on HIP.
    :ivar shared: shared memory (LDS) per program in bytes.
    :ivar spills: bytes of spill stores on CUDA; VGPRs spilled to scratch on HIP (``spill_unit`` says
        which; HIP's SGPR spills, mostly into VGPR lanes, are ``resources["sgpr_spill"]``).
    :ivar resources: every figure read, by the tool's name (``stack``, ``spill_loads``, ``sgpr``, …).
    """

    kernel: str
    module: str
    target: str
    kind: Literal["triton", "cuda-c"] = "triton"
    status: Status = "ok"
    registers: int | None = None
    shared: int | None = None
    spills: int | None = None
    spill_unit: str | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    seconds: float = 0.0
    detail: str = ""
    resources: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "module": self.module,
            "target": self.target,
            "kind": self.kind,
            "status": self.status,
            "registers": self.registers,
            "shared": self.shared,
            "spills": self.spills,
            "spill_unit": self.spill_unit,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
            "resources": dict(self.resources),
        }


@dataclass
class CheckReport:
    """What :func:`run_check` found; :meth:`as_dict` is what ``--json`` prints.

    :ivar shared_limit: the target's shared memory per program in bytes (:data:`SHARED_MEMORY_LIMITS`),
        ``None`` when unknown (then unchecked, and a note says so).
    """

    target: str
    triton_version: str | None
    tuning_dir: str
    results: list[KernelResult]
    seconds: float
    notes: list[str] = field(default_factory=list)
    shared_limit: int | None = None

    @property
    def ok(self) -> bool:
        return not any(r.status == "error" for r in self.results)

    def counts(self) -> dict[str, int]:
        counts = {"ok": 0, "error": 0, "skipped": 0, "unsupported": 0}
        for r in self.results:
            counts[r.status] += 1
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "triton_version": self.triton_version,
            "tuning_dir": self.tuning_dir,
            "ok": self.ok,
            "counts": self.counts(),
            "seconds": round(self.seconds, 2),
            "shared_limit": self.shared_limit,
            "notes": list(self.notes),
            "results": [r.as_dict() for r in self.results],
        }


def _trim(text: str, limit: int = _MAX_DETAIL) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + f"\n… ({len(text) - limit} more characters)"


# ---------------------------------------------------------------------------------------------------
# Capturing what compilers print
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (MLIR and LLVM print diagnostics there from C++) into a buffer; the
    text is appended to the yielded list on exit."""
    box: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (an embedding host): nothing to capture
        yield box
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield box
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box.append(tmp.read().decode("utf-8", errors="replace"))


def _error_text(exc: BaseException, stderr: str) -> str:
    """The root cause first (Triton wraps it in one CompilationError per call level, each showing only
    its source line), then the innermost source context, then what MLIR printed."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and all(cause is not c for c in chain):
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    root = chain[-1]
    message = f"{type(root).__name__}: {root}".strip()
    if len(chain) > 1:
        message += f"\n{type(chain[-2]).__name__}: {chain[-2]}".rstrip()
    # MLIR reports the failing op on stderr; the exception alone says only "PassManager::run failed".
    lines = [ln for ln in stderr.splitlines() if "error:" in ln or "Error" in ln]
    if lines:
        message += "\n" + "\n".join(lines[:10])
    return _trim(message)


# ---------------------------------------------------------------------------------------------------
# Resource usage
# ---------------------------------------------------------------------------------------------------


def _nvidia_tool(name: str) -> str | None:
    """Path of a CUDA tool bundled with Triton (``ptxas``, ``ptxas-blackwell``, ``cuobjdump``)."""
    try:
        from triton import knobs

        tool = getattr(knobs.nvidia, name.replace("-", "_")).get()
        if tool is not None and Path(tool.path).is_file():
            return str(tool.path)
    except Exception:  # older Triton without knobs, or the tool is absent: look on disk
        pass
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.is_file() else shutil.which(name)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")


def _parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """``ptxas -v``'s report: function → registers, stack, spill_stores, spill_loads, smem."""
    functions: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = functions.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _PTXAS_USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            smem = _PTXAS_SMEM.search(line)
            if smem:
                current["smem"] = int(smem.group(1))
    return functions


_CUOBJDUMP = re.compile(r"Function ([^\s:]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump_resources(cubin: bytes, function: str) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` of one function of a cubin: REG, STACK, SHARED, LOCAL."""
    tool = _nvidia_tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, timeout=60)
    for m in _CUOBJDUMP.finditer(proc.stdout):
        if m.group(1) == function:
            return {"registers": int(m.group(2)), "stack": int(m.group(3)), "static_shared": int(m.group(4)),
                    "local": int(m.group(5))}  # fmt: skip
    return {}


def _ptxas_report(ptx: str, target: Target, function: str) -> dict[str, int]:
    """Re-assemble ``ptx`` with ``ptxas -v`` (when Triton's cache served the cubin, its log is gone)."""
    tool = _nvidia_tool("ptxas-blackwell" if int(target.arch) >= 100 else "ptxas")
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [tool, "-v", f"--gpu-name={target.nvcc_arch}", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            timeout=300,
        )
    return _parse_ptxas(proc.stdout + proc.stderr).get(function, {})


def _cuda_resources(compiled: Any, target: Target, ptxas_log: str, result: KernelResult) -> None:
    name = compiled.metadata.name
    facts = _parse_ptxas(ptxas_log).get(name) or _ptxas_report(compiled.asm["ptx"], target, name)
    dump = _cuobjdump_resources(compiled.asm["cubin"], name)
    resources = {**facts, **{f"cuobjdump_{k}": v for k, v in dump.items()}}
    result.resources = resources
    # cuobjdump reads the cubin itself; ptxas' own count is the same number when both are there.
    result.registers = dump.get("registers", facts.get("registers"))
    result.spills = facts.get("spill_stores")
    result.spill_unit = "bytes"


_AMDGCN_FIELDS = {
    ".vgpr_count": "vgpr",
    ".agpr_count": "agpr",
    ".sgpr_count": "sgpr",
    ".vgpr_spill_count": "vgpr_spill",
    ".sgpr_spill_count": "sgpr_spill",
    ".private_segment_fixed_size": "scratch",
    ".group_segment_fixed_size": "lds_static",
}


def _parse_amdgcn(asm: str) -> dict[str, int]:
    """Register, spill and scratch figures from an ``amdgcn`` listing's kernel metadata (and occupancy
    from the assembler's comment)."""
    facts: dict[str, int] = {}
    start = asm.find("amdhsa.kernels:")
    block = asm[start:] if start >= 0 else asm
    for line in block.splitlines():
        key, _, value = line.strip().removeprefix("- ").partition(":")  # "  - .agpr_count: 0" opens a kernel
        if key in _AMDGCN_FIELDS and value.strip().isdigit():
            facts.setdefault(_AMDGCN_FIELDS[key], int(value))
    m = re.search(r"; Occupancy: (\d+)", asm)
    if m:
        facts["occupancy"] = int(m.group(1))
    return facts


def _hip_resources(compiled: Any, result: KernelResult) -> None:
    facts = _parse_amdgcn(compiled.asm.get("amdgcn", ""))
    result.resources = facts
    result.registers = facts.get("vgpr")
    # VGPR spills go to scratch memory; SGPR spills mostly land in VGPR lanes (cheap): reported apart.
    if "vgpr_spill" in facts:
        result.spills = facts["vgpr_spill"]
        result.spill_unit = "vgprs"


# ---------------------------------------------------------------------------------------------------
# Triton compilation
# ---------------------------------------------------------------------------------------------------


def _headline(error: str) -> str:
    """The line of a compiler error that says why: ptxas' fatal line ("Value 'sm_130a' is not defined for
    option 'gpu-name'"), MLIR's ("unsupported target: 'gfx999'"), else the first line."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    for pattern in ("fatal", "unsupported target", " error: "):
        for line in lines:
            if pattern in line:
                return line.split(" error: ", 1)[-1]
    return lines[0] if lines else "unknown error"


def _probe_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _hal_compile_probe(x_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # Triton reads annotations
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2.0)

    return _hal_compile_probe


class _Compiler:
    """Compiles specs for one target; knows what the installed Triton supports there."""

    def __init__(self, target: Target) -> None:
        import triton
        from triton.backends.compiler import GPUTarget

        self.target = target
        self.triton = triton
        self.gpu_target = GPUTarget(target.backend, target.arch, target.warp_size)
        self.backend: Any = None
        self.fp8_types: frozenset[str] | None = None
        self.unsupported: str | None = None
        try:
            from triton.compiler.compiler import make_backend

            self.backend = make_backend(self.gpu_target)
            self.fp8_types = frozenset(self.backend.parse_options({}).supported_fp8_dtypes)
        except Exception as exc:  # this Triton has no backend for the target at all
            self.unsupported = f"{type(exc).__name__}: {exc}"
            return
        probe = self.compile(_probe_kernel(), {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 64}, 4, 1)
        if isinstance(probe, str):
            self.unsupported = _headline(probe)

    def _attrs(self, kernel: Any, signature: Mapping[str, str], divisible: Iterable[str]) -> dict[tuple[int, ...], Any]:
        """Argument specialization as a launch with torch tensors gets it: pointers (from the caching
        allocator) and the spec's ``divisible_by_16`` arguments are multiples of 16 ("D"); on AMD a
        pointer also lies within 2 GiB ("S", buffer loads) when Triton uses buffer ops. Without it loads
        are not vectorized and K loops not pipelined: the registers and shared memory would not be
        those of the code that runs."""
        if self.backend is None:
            return {}
        buffer_ops = False
        if self.target.backend == "hip":
            with contextlib.suppress(Exception):
                from triton import knobs

                buffer_ops = bool(knobs.amd.use_buffer_ops)
        div = set(divisible) | {name for name, ty in signature.items() if ty.startswith("*")}
        names = list(getattr(kernel, "arg_names", None) or signature)
        attrs: dict[tuple[int, ...], Any] = {}
        try:
            for name, ty in signature.items():
                desc = ("D" if name in div else "") + ("S" if buffer_ops and ty.startswith("*") else "")
                if desc and name in names:
                    attrs[(names.index(name),)] = self.backend.parse_attr(desc)
        except Exception:  # an older Triton without string specializations: compile unspecialized
            return {}
        return attrs

    def compile(
        self,
        kernel: Any,
        signature: Mapping[str, str],
        constexprs: Mapping[str, Any],
        num_warps: int,
        num_stages: int,
        divisible: Iterable[str] = (),
    ) -> Any:
        """``(compiled kernel, ptxas' report)`` (the report is empty when Triton's cache served the
        kernel), or the error as text. Captures what the compilers print."""
        from triton.compiler import ASTSource

        capture_ptxas = self.target.backend == "cuda"
        stdout = io.StringIO()
        with contextlib.ExitStack() as stack:
            if capture_ptxas:
                with contextlib.suppress(Exception):  # knob absent in older Triton: ptxas is re-run later
                    from triton import knobs

                    stack.enter_context(knobs.nvidia.scope())
                    knobs.nvidia.dump_ptxas_log = True
            stack.enter_context(contextlib.redirect_stdout(stdout))
            stderr = stack.enter_context(_captured_stderr())
            try:
                src = ASTSource(kernel, dict(signature), dict(constexprs), self._attrs(kernel, signature, divisible))
                compiled = self.triton.compile(
                    src, target=self.gpu_target, options={"num_warps": num_warps, "num_stages": num_stages}
                )
            except Exception as exc:  # compile errors come as many types (CompilationError, RuntimeError, …)
                failure: BaseException | None = exc
            else:
                failure = None
        if failure is not None:
            return _error_text(failure, "".join(stderr))
        return compiled, stdout.getvalue()


@dataclass
class _Job:
    module: str
    spec: Any = None
    result: KernelResult | None = None  # set when there is nothing to compile (an import error, a skip)


def _substitute_fp8(signature: Mapping[str, str], fp8: str) -> dict[str, str]:
    from hal_kernels._common import FP8

    return {k: (fp8 if v == FP8 else v) for k, v in signature.items()}


def _collect(target: Target, tuning: Mapping[str, Mapping[str, int]], modules: Iterable[str]) -> list[_Job]:
    """Every module's compile specs (a module that fails to import or to list them is one error line)."""
    jobs: list[_Job] = []
    for name in modules:
        try:
            module = importlib.import_module(f"hal_kernels.{name}")
            specs = list(module.compile_specs(target.fp8, tuning))
        except Exception as exc:  # a broken kernel module is a failed check, not a crash of the tool
            detail = _trim(f"hal_kernels.{name}: cannot list compile specs: {type(exc).__name__}: {exc}")
            jobs.append(_Job(name, result=KernelResult(name, name, target.name, status="error", detail=detail)))
            continue
        if not specs:
            detail = "compile_specs returned no spec"
            jobs.append(_Job(name, result=KernelResult(name, name, target.name, status="error", detail=detail)))
        for spec in specs:
            if not hasattr(spec.kernel, "cache_key"):
                raise CompileCheckError(
                    f"{spec.name}: the kernels were imported under TRITON_INTERPRET=1, whose functions cannot be "
                    "compiled; run `hal compile-check` in a process without TRITON_INTERPRET"
                )
            jobs.append(_Job(name, spec=spec))
    return jobs


def _compile_job(compiler: _Compiler, job: _Job) -> KernelResult:
    spec, target = job.spec, compiler.target
    result = KernelResult(spec.name, job.module, target.name, num_warps=spec.num_warps, num_stages=spec.num_stages)
    if compiler.unsupported is not None:
        result.status = "unsupported"
        result.detail = f"unsupported by triton {compiler.triton.__version__}: {compiler.unsupported}"
        return result
    signature = _substitute_fp8(spec.signature, target.fp8)
    missing = sorted({t[1:] for t in signature.values() if t.startswith("*fp8")} - (compiler.fp8_types or frozenset()))
    if compiler.fp8_types is not None and missing:
        result.status = "skipped"
        result.detail = (
            f"{target.name} has no {', '.join(missing)} in triton {compiler.triton.__version__} "
            f"(its fp8 types: {', '.join(sorted(compiler.fp8_types))})"
        )
        return result
    start = time.perf_counter()
    divisible = getattr(spec, "divisible_by_16", ())
    outcome = compiler.compile(spec.kernel, signature, spec.constexprs, spec.num_warps, spec.num_stages, divisible)
    if isinstance(outcome, str):
        result.status, result.detail = "error", outcome
    else:
        compiled, ptxas_log = outcome
        result.shared = int(compiled.metadata.shared)
        try:
            if target.backend == "cuda":
                _cuda_resources(compiled, target, ptxas_log, result)
            else:
                _hip_resources(compiled, result)
        except (OSError, subprocess.SubprocessError) as exc:  # compiled fine; only the figures are missing
            result.detail = f"resource usage unavailable: {type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


def _check_shared(result: KernelResult, target: Target) -> None:
    """An ``ok`` result needing more shared memory than ``target`` has becomes an ``error`` saying so."""
    limit = target.shared_limit
    if result.status != "ok" or result.shared is None or limit is None or result.shared <= limit:
        return
    remedy = (
        "shrink its shared arrays"
        if result.kind == "cuda-c"
        else f"lower num_stages or the block sizes for {target.name} in its tuning file"
    )
    result.status = "error"
    result.detail = (
        f"needs {_size(result.shared)} ({result.shared} bytes) of shared memory per program; {target.name} has "
        f"{_size(limit)} ({limit} bytes): it compiles but cannot launch; {remedy}"
        + (f"\n{result.detail}" if result.detail else "")
    )


# ---------------------------------------------------------------------------------------------------
# CUDA C sources
# ---------------------------------------------------------------------------------------------------


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")):
        candidate = Path(root) / "bin" / "nvcc"
        if candidate.is_file():
            return str(candidate)
    return None


def _check_cuda_source(path: Path, target: Target, nvcc: str | None) -> list[KernelResult]:
    """``nvcc -cubin`` one source for the target; one result per kernel ptxas reports."""
    if nvcc is None:
        return [KernelResult(path.name, "cuda", target.name, kind="cuda-c", status="skipped",
                             detail="nvcc not found (put it on PATH or set CUDA_HOME)")]  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.cubin")
        cmd = [nvcc, f"-arch={target.nvcc_arch}", "-cubin", "-Xptxas", "-v", "-o", out, str(path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            return [KernelResult(path.name, "cuda", target.name, kind="cuda-c", status="error",
                                 detail=f"{' '.join(cmd)}: {type(exc).__name__}: {exc}")]  # fmt: skip
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return [KernelResult(path.name, "cuda", target.name, kind="cuda-c", status="error", seconds=seconds,
                             detail=_trim(f"nvcc exited with {proc.returncode}:\n{log}"))]  # fmt: skip
    functions = _parse_ptxas(log)
    if not functions:
        return [KernelResult(path.name, "cuda", target.name, kind="cuda-c", seconds=seconds,
                             detail="compiled; ptxas reported no kernel")]  # fmt: skip
    return [
        KernelResult(
            f"{path.name}:{name}",
            "cuda",
            target.name,
            kind="cuda-c",
            registers=facts.get("registers"),
            shared=facts.get("smem", 0),
            spills=facts.get("spill_stores"),
            spill_unit="bytes",
            seconds=seconds / len(functions),
            resources=facts,
            detail=f"nvcc -arch={target.nvcc_arch}",
        )
        for name, facts in functions.items()
    ]


# ---------------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------------


def _matches(pattern: str, name: str, module: str) -> bool:
    base = name.split("[", 1)[0]
    return pattern in (name, base, module) or fnmatch.fnmatchcase(name, pattern)


def run_check(
    target: str | Target,
    *,
    kernel: str | None = None,
    tuning_dir: str | Path | None = None,
    modules: Sequence[str] | None = None,
    cuda_dir: str | Path | None = None,
    progress: bool = True,
) -> CheckReport:
    """Compile every kernel (or those matching ``kernel``) for ``target``; see the module docstring.

    :param kernel: a spec name (``rms_norm[bf16, D=7168]``), its base (``rms_norm``), a module
        (``fused``), a CUDA C file or kernel, or a glob (``gemm*``).
    :param tuning_dir: tuning directory to read instead of the owning backend's.
    :param modules: kernel module names to check (default: :data:`hal_kernels.MODULES`).
    :param cuda_dir: where the ``*.cu`` sources are (default: ``hal_nvidia/cuda``).
    :param progress: show a progress line on stderr.
    :raises CompileCheckError: Triton is not installed, the target name is invalid, or ``kernel``
        matches nothing.
    """
    start = time.perf_counter()
    tgt = target if isinstance(target, Target) else parse_target(target)
    if importlib.util.find_spec("triton") is None:
        raise CompileCheckError("triton is not installed; pip install 'hal-accel[nvidia]' (or [rocm], or [test])")
    import triton

    from hal_kernels import MODULES
    from hal_kernels._tuning import load_tuning

    directory = Path(tuning_dir) if tuning_dir is not None else _package_dir(tgt.package) / "tuning"
    tuning = load_tuning(directory, tgt.name)
    jobs = _collect(tgt, tuning, MODULES if modules is None else modules)
    sources: list[Path] = []
    if tgt.backend == "cuda":
        src_dir = Path(cuda_dir) if cuda_dir is not None else _package_dir("hal_nvidia") / "cuda"
        sources = sorted(src_dir.glob("*.cu")) if src_dir.is_dir() else []
    if kernel is not None:
        jobs = [j for j in jobs if _matches(kernel, j.spec.name if j.spec else j.module, j.module)]
        picked = [p for p in sources if kernel in (p.name, p.stem) or fnmatch.fnmatchcase(p.name, kernel)]
        if not jobs and not picked and not any(kernel.startswith(f"{p.name}:") for p in sources):
            raise CompileCheckError(
                f"--kernel {kernel!r} matches no kernel; see `hal compile-check --target {tgt.name}` for the names"
            )
        sources = picked or [p for p in sources if kernel.startswith(f"{p.name}:")]

    results: list[KernelResult] = []
    notes: list[str] = []
    with Progress(len(jobs) + len(sources), f"compile-check {tgt.name}", unit="kernels", enabled=progress) as bar:
        compiler = _Compiler(tgt)
        if compiler.unsupported is not None:
            notes.append(f"unsupported by triton {triton.__version__}: {compiler.unsupported}")
        for job in jobs:
            results.append(job.result if job.result is not None else _compile_job(compiler, job))
            bar.update()
        nvcc = _find_nvcc() if sources else None
        for path in sources:
            produced = _check_cuda_source(path, tgt, nvcc)
            if kernel is not None and ":" in kernel:
                produced = [r for r in produced if fnmatch.fnmatchcase(r.kernel, kernel)] or produced
            results.extend(produced)
            bar.update()
    for result in results:
        _check_shared(result, tgt)
    if tgt.shared_limit is None:
        notes.append(
            f"no shared-memory limit known for {tgt.name} (known: {', '.join(SHARED_MEMORY_LIMITS)}): "
            "shared memory per program is reported but not checked"
        )
    if tgt.backend == "cuda" and not sources and kernel is None:
        notes.append("no CUDA C sources found (hal_nvidia/cuda/*.cu)")
    seconds = time.perf_counter() - start
    return CheckReport(tgt.name, triton.__version__, str(directory), results, seconds, notes, tgt.shared_limit)


# ---------------------------------------------------------------------------------------------------
# Output and command line
# ---------------------------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def _spills(r: Mapping[str, Any]) -> str:
    if r["spills"] is None:
        return "-"
    if r["spill_unit"] == "bytes":
        return f"{r['spills']} B"
    sgpr = r["resources"].get("sgpr_spill", 0)
    return f"{r['spills']}" + (f" (+{sgpr} sgpr)" if sgpr else "")


def _registers(r: Mapping[str, Any]) -> str:
    if r["registers"] is None:
        return "-"
    res = r["resources"]
    if "sgpr" in res:  # HIP: VGPRs (with AGPRs) and SGPRs
        return f"{r['registers']}v/{res['sgpr']}s"
    return str(r["registers"])


def format_report(data: Mapping[str, Any]) -> str:
    """The human form of :meth:`CheckReport.as_dict`."""
    rows = [["KERNEL", "TARGET", "STATUS", "REGS", "SHARED", "SPILLS", "WARPS/STAGES", "TIME"]]
    details: list[str] = []
    for r in data["results"]:
        shape = "-" if r["num_warps"] is None else f"{r['num_warps']}/{r['num_stages']}"
        rows.append([
            r["kernel"], r["target"], r["status"], _registers(r), _size(r["shared"]),
            _spills(r), shape, f"{r['seconds']:.1f}s",
        ])  # fmt: skip
        if r["status"] not in ("ok", "unsupported") and r["detail"]:  # unsupported: said once, in a note
            first, *rest = r["detail"].splitlines()
            details.append(f"  {r['kernel']}: {r['status']}: {first}")
            if len(rest) > 6:  # the innermost source lines and MLIR's errors are at the end; --json has all
                details.append("      …")
            details.extend(f"      {line}" for line in rest[-6:])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    counts = data["counts"]
    spilling = sum(1 for r in data["results"] if r["status"] == "ok" and r["spills"])
    limit = data.get("shared_limit")
    shared = f"shared ≤ {_size(limit)}" if limit else "shared not checked"
    summary = (
        f"{data['target']} · triton {data['triton_version']} · {counts['ok']} ok, {counts['error']} error, "
        f"{counts['skipped']} skipped, {counts['unsupported']} unsupported · {spilling} spilling · {shared} · "
        f"{data['seconds']:.1f} s · tuning {data['tuning_dir']}"
    )
    out = [*lines, "", summary]
    out += [f"note: {n}" for n in data["notes"]]
    if details:
        out += ["", "Problems:", *details]
    return "\n".join(out)


def add_parser(sub: Any, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Add ``compile-check`` to the ``hal`` sub-command parsers; ``func`` runs it."""
    parser = sub.add_parser(
        "compile-check",
        help="compile every Triton and CUDA C kernel for a GPU target without a GPU; registers, shared memory, spills",
        description="Compile every kernel of hal_kernels for a GPU target with the owning backend's tuning for "
        "that arch (hal_nvidia/tuning for sm_*, hal_rocm/tuning for gfx*), and the CUDA C sources "
        "(hal_nvidia/cuda/*.cu) with nvcc on sm_* targets. Prints each kernel's status (ok, error, skipped, "
        "unsupported), registers per thread (HIP: VGPRs/SGPRs), shared memory per program and spills (CUDA: bytes "
        "of spill stores; HIP: VGPRs spilled to scratch, SGPR spills in parentheses). Exit status 1 when any "
        "kernel fails to compile or needs more shared memory per program than the target has.",
        epilog="Examples: hal compile-check --target sm_90 · hal compile-check --target gfx942 --json · "
        "hal compile-check --target sm_90 --kernel mla_decode",
    )
    parser.add_argument(
        "--target",
        required=True,
        metavar="ARCH",
        help=f"the GPU target: {', '.join(KNOWN_TARGETS)} (any sm_XY or gfxNNN is tried)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument(
        "--kernel", metavar="NAME", help="only kernels matching NAME: a spec name, an op, a module, or a glob"
    )
    parser.add_argument("--tuning", metavar="DIR", help="read tuning files from DIR instead of the backend's")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line on stderr")
    parser.set_defaults(func=func)
    return parser


def prepare_process() -> None:
    """Make this process able to compile: the kernels must not be imported under the interpreter.

    Removes ``TRITON_INTERPRET`` from the environment when no kernel module has been imported yet
    (Triton reads it when ``@triton.jit`` runs); otherwise :func:`run_check` says what to do.
    """
    from hal_kernels import MODULES

    if not any(f"hal_kernels.{name}" in sys.modules for name in MODULES):
        os.environ.pop("TRITON_INTERPRET", None)
