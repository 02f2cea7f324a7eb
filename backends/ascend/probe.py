"""Is the Ascend backend usable here? Cheap facts only: ``torch_npu`` is looked up, never imported.

Importing ``torch_npu`` loads Huawei's CANN libraries and fails without them, so the probe only asks
``importlib.util.find_spec("torch_npu")`` and reads the installed version from package metadata.
Devices are counted with the driver's ``npu-smi info -l`` (a subprocess with a timeout: no device
context in this process), or, when ``npu-smi`` is not on ``PATH``, from the ``/dev/davinciN``
device nodes the driver creates.

Two steps, so tests can feed simulated machines: :func:`gather` reads the facts and :func:`decide`
turns them into an :class:`~hal.types.Availability`, pure and deterministic. Every failure of a
vendor tool becomes the reason a user reads in ``hal info``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hal.types import Availability

__all__ = ["NPU_SMI_TIMEOUT_S", "AscendFacts", "decide", "gather", "parse_npu_smi_list", "probe"]

#: Seconds ``npu-smi info -l`` may take before the probe gives up on it.
NPU_SMI_TIMEOUT_S = 5.0

_NO_TORCH_NPU = "torch_npu is not installed (pip install hal-accel[ascend]; needs Huawei CANN)"


@dataclass(frozen=True)
class AscendFacts:
    """The cheap facts :func:`decide` needs.

    :param torch_version: ``torch.__version__``.
    :param torch_npu_found: whether ``torch_npu`` is importable (found without importing it).
    :param torch_npu_version: its installed distribution's version, ``None`` when unknown.
    :param torch_npu_error: why looking ``torch_npu`` up failed, if it did.
    :param npu_smi: path of ``npu-smi``, ``None`` when it is not on ``PATH``.
    :param npu_smi_output: stdout of ``npu-smi info -l`` when it succeeded.
    :param npu_smi_error: why ``npu-smi info -l`` failed, if it did.
    :param davinci_devices: number of ``/dev/davinciN`` device nodes.
    :param notes: non-fatal oddities, shown in ``details``.
    """

    torch_version: str
    torch_npu_found: bool
    torch_npu_version: str | None = None
    torch_npu_error: str | None = None
    npu_smi: str | None = None
    npu_smi_output: str | None = None
    npu_smi_error: str | None = None
    davinci_devices: int = 0
    notes: tuple[str, ...] = ()


def parse_npu_smi_list(text: str) -> tuple[int, ...] | None:
    """The NPU ids in ``npu-smi info -l`` output, or ``None`` when it is not that output.

    The output starts with ``Total Count : N`` and lists one ``NPU ID : i`` line per NPU. The ids are
    taken from the ``NPU ID`` lines; when only the total is there, ids ``0..N-1`` are assumed.
    """
    ids = tuple(int(m) for m in re.findall(r"^\s*NPU ID\s*:\s*(\d+)\s*$", text, flags=re.MULTILINE))
    total = re.search(r"^\s*Total Count\s*:\s*(\d+)\s*$", text, flags=re.MULTILINE)
    if total is not None and not ids:
        return tuple(range(int(total.group(1))))
    if total is None and not ids:
        return None
    return ids


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no output"


def _run_npu_smi(path: str, timeout_s: float) -> tuple[str | None, str | None]:
    """(stdout, None) when ``npu-smi info -l`` succeeds, else (None, why)."""
    try:
        done = subprocess.run([path, "info", "-l"], capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return None, f"`npu-smi info -l` did not answer within {timeout_s:g} s"
    except Exception as exc:  # OSError, a broken binary: whatever it is becomes the reason
        return None, f"`npu-smi info -l` could not run: {type(exc).__name__}: {exc}"
    if done.returncode != 0:
        return None, f"`npu-smi info -l` exited with {done.returncode}: {_first_line(done.stderr or done.stdout)}"
    return done.stdout, None


def _count_davinci(dev_root: Path, notes: list[str]) -> int:
    try:
        return sum(1 for p in dev_root.glob("davinci*") if p.name[len("davinci") :].isdigit())
    except OSError as exc:  # npu-smi is the primary source; say why the fallback saw nothing
        notes.append(f"cannot list {dev_root}: {type(exc).__name__}: {exc}")
        return 0


def gather(
    *, npu_smi: str | None = None, dev_root: Path | str = "/dev", timeout_s: float = NPU_SMI_TIMEOUT_S
) -> AscendFacts:
    """Read this machine's facts. Never imports ``torch_npu``; creates no device context.

    :param npu_smi: the ``npu-smi`` to run; ``None`` looks it up on ``PATH``.
    :param dev_root: where to count ``davinciN`` device nodes (tests point it at a temporary dir).
    :param timeout_s: how long ``npu-smi`` may take.
    """
    notes: list[str] = []
    lookup_error: str | None = None
    try:
        found = importlib.util.find_spec("torch_npu") is not None
    except Exception as exc:  # find_spec raises for a broken or half-imported package
        found, lookup_error = False, f"cannot look up torch_npu: {type(exc).__name__}: {exc}"
    version: str | None = None
    if found:
        try:
            version = importlib.metadata.version("torch-npu")
        except importlib.metadata.PackageNotFoundError:
            notes.append("torch_npu has no package metadata (a source checkout?): its version is not checked")
    path = npu_smi if npu_smi is not None else shutil.which("npu-smi")
    output: str | None = None
    error: str | None = None
    if path is not None:
        output, error = _run_npu_smi(path, timeout_s)
    return AscendFacts(
        torch_version=str(torch.__version__),
        torch_npu_found=found,
        torch_npu_version=version,
        torch_npu_error=lookup_error,
        npu_smi=path,
        npu_smi_output=output,
        npu_smi_error=error,
        davinci_devices=_count_davinci(Path(dev_root), notes),
        notes=tuple(notes),
    )


def _major_minor(version: str) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def decide(facts: AscendFacts) -> Availability:
    """The availability the facts imply; the reason, when unavailable, names the remedy."""
    details: dict[str, Any] = {"torch": facts.torch_version, "torch_npu": facts.torch_npu_version}
    if facts.npu_smi is not None:
        details["npu_smi"] = facts.npu_smi
    if facts.davinci_devices:
        details["davinci_devices"] = facts.davinci_devices
    # Parsed up front so hal info shows the NPUs even when torch_npu is what is missing.
    ids = parse_npu_smi_list(facts.npu_smi_output) if facts.npu_smi_output is not None else None
    if ids is not None:
        details["npu_ids"] = list(ids)
    if facts.npu_smi_error is not None:
        details["npu_smi_error"] = facts.npu_smi_error
    if facts.notes:
        details["notes"] = list(facts.notes)

    if facts.torch_npu_error is not None:
        return Availability.no(
            f"{facts.torch_npu_error}; reinstall torch-npu (pip install hal-accel[ascend])", **details
        )
    if not facts.torch_npu_found:
        return Availability.no(_NO_TORCH_NPU, **details)
    if facts.torch_npu_version is not None:
        want, have = _major_minor(facts.torch_version), _major_minor(facts.torch_npu_version)
        if want is not None and have is not None and want != have:
            return Availability.no(
                f"torch_npu {facts.torch_npu_version} does not match torch {facts.torch_version}; install the "
                f"torch-npu release for torch {want[0]}.{want[1]}",
                **details,
            )

    if facts.npu_smi is None:
        if facts.davinci_devices:
            n = facts.davinci_devices
            return Availability.yes(f"{n} NPU{'' if n == 1 else 's'} (/dev/davinci*; npu-smi not on PATH)", **details)
        return Availability.no(
            "npu-smi not found on PATH and no /dev/davinci* device; install the Ascend driver (npu-smi ships "
            "with it, usually in /usr/local/sbin) or pass the NPUs to this container",
            **details,
        )
    if facts.npu_smi_error is not None:
        return Availability.no(f"{facts.npu_smi_error}; check the Ascend driver (npu-smi info)", **details)
    if ids is None:
        return Availability.no(
            f"cannot read `npu-smi info -l` output ({_first_line(facts.npu_smi_output or '')!r}); "
            "check the Ascend driver (npu-smi info)",
            **details,
        )
    if not ids:
        return Availability.no(
            "npu-smi reports 0 NPUs; check the Ascend driver and that the NPUs are passed to this container "
            "(--device=/dev/davinciN)",
            **details,
        )
    return Availability.yes(f"{len(ids)} NPU{'' if len(ids) == 1 else 's'} (npu-smi)", **details)


def probe(facts: AscendFacts | None = None) -> Availability:
    """The Ascend backend's probe: :func:`decide` on ``facts``, or on :func:`gather`'s when ``None``."""
    return decide(gather() if facts is None else facts)
