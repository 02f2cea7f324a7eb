"""Running HAL on several processes: the process group from torchrun's environment, and failure handling.

Typical use, in a script started by ``torchrun --nproc-per-node N script.py``::

    import hal
    import hal.distributed

    info = hal.distributed.init()          # HAL_BACKEND's (or the default) backend's dist_backend
    t = hal.get_backend().all_reduce(t)    # any collective op, over the default process group
    hal.distributed.shutdown()

:func:`init` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (which
torchrun sets), binds the process to device ``LOCAL_RANK`` for device backends (CUDA, NPU; never for
CPU/gloo) and starts the default process group with the backend's ``capabilities.dist_backend``
(``gloo``, ``nccl``, ``hccl``) and a timeout (``timeout_s``, else ``HAL_DIST_TIMEOUT`` seconds, else
120 s; at most one year). A launcher that builds its backend before :func:`init` calls
:func:`bind_local_device` first, so the backend's start-up (device queries, a probe run) happens on the
rank's own device, not device 0.

Failure: the timeout is what the transport waits for a peer before it fails the collective. A peer
that exits shows up on gloo at once as a connection reset; a peer that stalls shows up after the
timeout. :func:`collective_guard` turns either into a :class:`hal.errors.CollectiveError` naming the
collective, this rank and the timeout, so no rank hangs and every message says what happened. The
transports do not say which peer failed (gloo gives an address at most). A peer that exits is named by
torchrun, which then stops the other ranks; for a collective that timed out, every rank that
:func:`init` started beats a heartbeat into the process group's store (every :data:`HEARTBEAT_S`
seconds, with the collective it is in), and the failed collective watches the others' for
:data:`PEER_WATCH_S` seconds and names the ranks whose heartbeat stopped (exited, killed or hung) and
the live ones that are not in the same collective (stalled elsewhere, or in another collective).

Importing this module has no side effects: nothing touches ``torch.distributed`` or a device until
:func:`init` is called.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hal.errors import CollectiveError, OpInputError

if TYPE_CHECKING:
    from hal.backend import Backend

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ENV_VARS",
    "HEARTBEAT_S",
    "MAX_TIMEOUT_S",
    "PEER_WATCH_S",
    "TIMEOUT_ENV",
    "DistInfo",
    "bind_local_device",
    "collective_guard",
    "configured_timeout",
    "info",
    "init",
    "shutdown",
]

#: Seconds a collective waits for its peers when neither ``timeout_s`` nor ``HAL_DIST_TIMEOUT`` says.
DEFAULT_TIMEOUT_S = 120.0
#: The longest timeout accepted: one year. The transports turn the timeout into a deadline on a clock
#: counting nanoseconds in 64 bits, which overflows near 9.2e9 s: from there on gloo the first collective
#: hangs, start-up fails at once as "timed out", gloo refuses the timeout or Python's timedelta overflows,
#: so a larger value is refused here, naming its source, rather than passed on.
MAX_TIMEOUT_S = 31_536_000.0
#: The environment variable giving the collective timeout in seconds.
TIMEOUT_ENV = "HAL_DIST_TIMEOUT"
#: The variables torchrun sets that :func:`init` needs.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Seconds between two heartbeats of a rank in the process group's store.
HEARTBEAT_S = 0.5
#: Seconds a failed collective watches the other ranks' heartbeats before naming the ones that stopped.
PEER_WATCH_S = 4 * HEARTBEAT_S

# Errors a torch.distributed transport raises when a peer is gone or late. DistBackendError (and its
# subclasses) derive from RuntimeError; it is named for clarity where this torch has it.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    {RuntimeError, TimeoutError, *([dist.DistBackendError] if hasattr(dist, "DistBackendError") else [])}
)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job, as :func:`init` set it up.

    :param rank: this process's global rank.
    :param world_size: the number of processes.
    :param local_rank: this process's rank on its node (the device index it is bound to).
    :param backend: the HAL backend's name (``"cpu"``, ``"nvidia"``).
    :param dist_backend: the torch.distributed backend (``"gloo"``, ``"nccl"``, ``"hccl"``).
    :param timeout_s: seconds a collective waits for its peers before it fails.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    dist_backend: str
    timeout_s: float


_lock = threading.Lock()
_info: DistInfo | None = None


def _resolve_timeout(timeout_s: float | None) -> float:
    """``timeout_s``, else ``HAL_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`; positive and at most
    :data:`MAX_TIMEOUT_S`."""
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT_S
        try:
            timeout_s = float(raw)
        except ValueError:
            raise OpInputError("distributed.init", TIMEOUT_ENV, f"expected a number of seconds, got {raw!r}") from None
        arg = TIMEOUT_ENV
    else:
        arg = "timeout_s"
    if not timeout_s > 0:  # NaN too
        raise OpInputError("distributed.init", arg, f"expected a positive number of seconds, got {timeout_s!r}")
    if timeout_s > MAX_TIMEOUT_S:
        raise OpInputError(
            "distributed.init", arg, f"expected at most {MAX_TIMEOUT_S:.0f} seconds (one year), got {timeout_s!r}"
        )
    return float(timeout_s)


def configured_timeout() -> float:
    """The timeout :func:`init` uses without an argument: ``HAL_DIST_TIMEOUT``, else the default.

    :raises hal.errors.OpInputError: the variable is not a positive number of seconds up to
        :data:`MAX_TIMEOUT_S` (one year).
    """
    return _resolve_timeout(None)


def _read_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, checked."""
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        raise CollectiveError(
            f"distributed.init: the environment lacks {', '.join(missing)}; launch with torchrun "
            "(torchrun --nproc-per-node N script.py), which sets " + ", ".join(ENV_VARS)
        )
    values: dict[str, int] = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = os.environ[name]
        try:
            values[name] = int(raw)
        except ValueError:
            raise CollectiveError(f"distributed.init: {name} must be an integer, got {raw!r}") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise CollectiveError(
            f"distributed.init: inconsistent environment RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}"
        )
    return rank, world, local


def _bind_device(device_type: str, local_rank: int) -> None:
    """Make device ``local_rank`` current for CUDA/NPU backends; nothing for the CPU."""
    if device_type == "cpu":
        return
    module = getattr(torch, device_type, None)  # torch.cuda; torch.npu once torch_npu is imported
    set_device = getattr(module, "set_device", None)
    if set_device is None:
        raise CollectiveError(
            f"distributed.init: torch has no {device_type}.set_device to bind local rank {local_rank}"
        )
    set_device(local_rank)


def bind_local_device() -> str | None:
    """Make device ``LOCAL_RANK`` current on the accelerator torch sees, before a backend is built.

    A backend is built on torch's current device (NVIDIA and ROCm read its properties and may try an op
    there), so each rank of a multi-device job binds first. The accelerator is the one
    ``torch.accelerator`` knows: CUDA and ROCm always; an NPU only once ``torch_npu`` has been imported,
    which the Ascend backend does when it is built (:func:`init` binds it then, before any collective).

    :returns: the device type bound (``"cuda"``), or ``None``: ``LOCAL_RANK`` is unset (not under
        torchrun) or torch sees no accelerator.
    :raises hal.errors.CollectiveError: ``LOCAL_RANK`` is not an integer >= 0, or not below the number of
        devices this process sees.
    """
    raw = os.environ.get("LOCAL_RANK", "").strip()
    if not raw:
        return None
    try:
        local = int(raw)
    except ValueError:
        raise CollectiveError(f"bind_local_device: LOCAL_RANK must be an integer, got {raw!r}") from None
    if local < 0:
        raise CollectiveError(f"bind_local_device: LOCAL_RANK must be >= 0, got {local}")
    acc = getattr(torch, "accelerator", None)
    if acc is None or not acc.is_available():
        return None
    device = acc.current_accelerator()
    if device is None:
        return None
    count = acc.device_count()
    if local >= count:
        raise CollectiveError(
            f"bind_local_device: LOCAL_RANK {local} but this process sees {count} {device.type} device(s); launch "
            f"at most {count} processes per node (torchrun --nproc-per-node), or check the visible devices"
        )
    _bind_device(device.type, local)
    return device.type


def init(backend: Backend | None = None, *, timeout_s: float | None = None) -> DistInfo:
    """Start the default process group from torchrun's environment, once.

    :param backend: the HAL backend whose ``capabilities.dist_backend`` carries the collectives;
        ``None`` means :func:`hal.get_backend` (``HAL_BACKEND``, else the best available one).
    :param timeout_s: seconds a collective (and the start-up rendezvous) waits for its peers before
        failing, at most :data:`MAX_TIMEOUT_S` (one year); ``None`` means ``HAL_DIST_TIMEOUT``, else 120.
    :returns: this process's :class:`DistInfo`. A second call with the same settings returns the same one.
    :raises hal.errors.CollectiveError: torchrun's variables are missing or inconsistent, a process group
        exists already (made elsewhere, or by an earlier call with other settings), or the rendezvous failed.
    :raises hal.errors.OpInputError: the timeout is not a positive number of seconds up to one year.
    """
    global _info, _heartbeat
    if backend is None:
        import hal  # here, not at import: hal imports this module

        backend = hal.get_backend()
    timeout = _resolve_timeout(timeout_s)
    rank, world, local = _read_env()
    want = DistInfo(
        rank=rank,
        world_size=world,
        local_rank=local,
        backend=backend.name,
        dist_backend=backend.capabilities.dist_backend,
        timeout_s=timeout,
    )
    with _lock:
        if _info is not None and dist.is_initialized():
            if _info != want:
                raise CollectiveError(
                    f"distributed.init: already initialized as {_info}, now asked for {want}; "
                    "call hal.distributed.shutdown() first"
                )
            return _info
        if not dist.is_available():
            raise CollectiveError("distributed.init: this torch build has no torch.distributed")
        if dist.is_initialized():
            raise CollectiveError(
                "distributed.init: a torch.distributed process group exists that hal.distributed.init did not "
                "start; destroy it first (torch.distributed.destroy_process_group)"
            )
        _bind_device(backend.capabilities.device_type, local)
        with collective_guard("init_process_group", timeout_s=timeout):
            dist.init_process_group(
                want.dist_backend,
                init_method="env://",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout),
            )
        _info = want
        try:
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):  # a torch without it: failures name no peer
            store = None
        if store is not None and world > 1:
            _heartbeat = _Heartbeat(store, rank, world)
        return want


def info() -> DistInfo | None:
    """The :class:`DistInfo` of the running :func:`init`, or ``None`` when it has not run (or was shut down)."""
    return _info if _info is not None and dist.is_available() and dist.is_initialized() else None


def shutdown() -> None:
    """Destroy the default process group (whoever started it); does nothing when there is none."""
    global _info, _heartbeat
    with _lock:
        if _heartbeat is not None:
            _heartbeat.stop()
            _heartbeat = None
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        _info = None


class _Heartbeat:
    """This rank's heartbeat: a daemon thread writing ``<beat> <state>`` under ``hal/heartbeat/<rank>`` in
    the process group's store every :data:`HEARTBEAT_S` seconds, where ``state`` is what
    :func:`collective_guard` records (``in all_reduce #12``, ``after all_reduce #12``). It stops at
    :func:`shutdown`, or by itself when the store is gone."""

    PREFIX = "hal/heartbeat/"

    def __init__(self, store: Any, rank: int, world: int) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.state = "before any collective"
        self.entered = 0  # collectives entered (the outermost guard of each)
        self.depth = 0
        self._stop = threading.Event()
        self._beat(0)  # there before init returns: a peer that never beats is told from one not yet seen
        self._thread = threading.Thread(target=self._run, name=f"hal-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def _beat(self, n: int) -> None:
        self.store.set(f"{self.PREFIX}{self.rank}", f"{n} {self.state}")

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(HEARTBEAT_S):
            n += 1
            try:
                self._beat(n)
            except Exception:  # the store is gone (its host exited): nothing left to beat into
                return

    def stop(self) -> None:
        self._stop.set()

    def enter(self, op: str) -> None:
        self.depth += 1
        if self.depth == 1:
            self.entered += 1
            self.state = f"in {op} #{self.entered}"

    def leave(self, op: str) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.state = f"after {op} #{self.entered}"

    def _read(self) -> dict[int, tuple[int, str] | None]:
        """Every other rank's ``(beat, state)``; ``None`` for one that has none."""
        out: dict[int, tuple[int, str] | None] = {}
        for r in range(self.world):
            key = f"{self.PREFIX}{r}"
            if r != self.rank:
                beat, _, state = self.store.get(key).decode().partition(" ") if self.store.check([key]) else ("",) * 3
                out[r] = (int(beat), state) if beat else None
        return out

    def peers(self) -> str:
        """What the other ranks are doing, watched for :data:`PEER_WATCH_S` seconds: the ranks whose
        heartbeat stopped, and the live ones not in this rank's collective; ``""`` when nothing is known."""
        mine = self.state
        before = getattr(self.store, "timeout", None)
        try:
            self.store.set_timeout(datetime.timedelta(seconds=PEER_WATCH_S))  # a dead store must not hold us
            first = self._read()
            time.sleep(PEER_WATCH_S)
            last = self._read()
        except Exception:  # the store's host (torchrun's agent, or rank 0 outside torchrun) exited or froze
            return "the process group's store does not answer (the process hosting it exited or is frozen)"
        finally:
            if before is not None:
                try:
                    self.store.set_timeout(before)
                except Exception:  # a store that is gone keeps whatever timeout it had
                    pass
        stopped = [r for r in last if last[r] is None or first[r] is None or last[r] == first[r]]
        elsewhere = [f"rank {r} is {s[1]}" for r in last if r not in stopped and (s := last[r]) and s[1] != mine]
        said = []
        if stopped:
            ranks = ", ".join(str(r) for r in stopped)
            said.append(f"rank(s) {ranks} stopped (no heartbeat for {PEER_WATCH_S:g} s: exited, killed or hung)")
        if elsewhere:
            said.append(f"this rank is {mine}, but {', '.join(elsewhere)}")
        return "; ".join(said)


_heartbeat: _Heartbeat | None = None


def _where(group: Any) -> str:
    """``rank R of W`` for the current process in ``group``; before a group is up, torchrun's ``RANK`` and
    ``WORLD_SIZE`` (``?`` where unset)."""
    try:
        if dist.is_available() and dist.is_initialized():
            return f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"
    except (RuntimeError, ValueError):  # a group this process is not part of, or one already torn down
        pass
    if _info is not None:
        return f"rank {_info.rank} of {_info.world_size}"
    rank, world = os.environ.get("RANK", "?").strip(), os.environ.get("WORLD_SIZE", "?").strip()
    return f"rank {rank} of {world}"  # before the group is up (the rendezvous): torchrun's view


@contextmanager
def collective_guard(op: str, *, group: Any = None, timeout_s: float | None = None) -> Iterator[None]:
    """Turn a transport failure inside the block into a :class:`~hal.errors.CollectiveError`.

    Usable as ``with collective_guard("all_reduce"):`` or as a decorator ``@collective_guard("all_reduce")``.
    A ``RuntimeError`` (``torch.distributed.DistBackendError`` included) or ``TimeoutError`` raised in the
    block becomes ``CollectiveError("all_reduce: rank 0 of 2: <reason>; a peer may have exited or stalled
    (timeout 120 s)")``, chained from the original. A ``CollectiveError`` passes through unchanged, so
    guards nest. In a group :func:`init` started, the block is this rank's current collective in its
    heartbeat, and a timeout first watches the other ranks' heartbeats (:data:`PEER_WATCH_S` seconds) and
    names those that stopped and those in another collective or none: ``"all_reduce: rank 0 of 2: Timed
    out waiting 120000ms for recv operation to complete; this rank is in all_reduce #7, but rank 1 is
    after all_reduce #6 (timeout 120 s)"``.

    :param op: the collective's name, as the message should show it.
    :param group: the process group the collective runs on (for the rank shown); ``None`` means the world.
    :param timeout_s: the timeout to report; ``None`` means the one :func:`init` set, else the configured one.
    """
    beat = _heartbeat
    if beat is not None:
        beat.enter(op)
    try:
        yield
    except CollectiveError:
        raise
    except _TRANSPORT_ERRORS as e:
        if timeout_s is None:
            timeout_s = _info.timeout_s if _info is not None else _configured_timeout()
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # Only a timeout is worth PEER_WATCH_S more: a peer that exited fails the collective at once, and
        # torchrun, which stops the other ranks then, names it itself (a watch would lose this report).
        timed_out = isinstance(e, TimeoutError) or "timed out" in reason.lower() or "timeout" in reason.lower()
        peers = beat.peers() if beat is not None and timed_out else ""
        peers = peers or "a peer may have exited or stalled"
        raise CollectiveError(f"{op}: {_where(group)}: {reason}; {peers} (timeout {timeout_s:g} s)") from e
    finally:
        if beat is not None:
            beat.leave(op)


def _configured_timeout() -> float:
    """The timeout :func:`init` would use without an argument (the default when the variable is bad)."""
    try:
        return _resolve_timeout(None)
    except OpInputError:
        return DEFAULT_TIMEOUT_S
