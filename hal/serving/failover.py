"""Failover: when a device fails mid-generation, rebuild the model on the next backend and carry on.

**What counts as a device error** (:func:`is_device_error`), looked for along the exception's
``__cause__`` / ``__context__`` chain:

- :class:`~hal.serving.errors.DeviceFailure`, which backends (and the fault injector) raise on purpose;
- a ``RuntimeError`` (``torch.AcceleratorError``, which torch >= 2.8 raises for CUDA/HIP runtime
  errors, is one) whose message names a condition after which the device, or its context, cannot go
  on (:data:`FATAL_DEVICE_CONDITIONS`):

  - CUDA / HIP: ``an illegal memory access was encountered`` (``hipErrorIllegalAddress``),
    ``unspecified launch failure`` (``hipErrorLaunchFailure``), ``an illegal instruction was
    encountered``, ``the launch timed out and was terminated`` (``hipErrorLaunchTimeOut``),
    ``hardware stack error``, ``uncorrectable ECC error encountered`` and other ECC errors
    (``hipErrorECCNotCorrectable``), ``GPU is lost`` / ``fallen off the bus``, ``no CUDA-capable
    device is detected`` (``hipErrorNoDevice``), ``CUDA-capable device(s) is/are busy or
    unavailable``;
  - NCCL / RCCL: ``unhandled system error``, ``unhandled cuda error``, ``remote process exited``,
    ``communicator was aborted``;
  - Ascend (torch_npu raises plain RuntimeErrors): ``NPU function error``, ``ACL stream synchronize
    failed``, ``EZ9999``.

  Any other CUDA/HIP/NCCL error is not: ``invalid argument``, ``invalid device function``, NCCL
  ``invalid usage`` and the like are bugs or set-up problems that another device would hit again.

Never device errors: HAL's own errors (bad input, an exhausted KV cache, a missing op), out-of-memory
(``torch.OutOfMemoryError``: a capacity problem, not a broken device) and device-side asserts (a bug
in the inputs or a kernel, which another device would hit again), even though a device-side assert
leaves the CUDA context unusable too. Pass your own predicate to :class:`Failover` to change this.

**Candidates.** By default failover goes to the other available backends of the registry, highest
priority first, *except the reference backend* (``cpu``): on an accelerator box it would try to load
the whole model into host memory and run it on the CPU. Name it in ``backends`` to allow it
(``Failover(..., backends=["nvidia", "cpu"])``).

**What failover does** (:class:`Failover`, driven by :class:`~hal.serving.AutoBatcher`): mark the failed
device unhealthy in a :class:`~hal.serving.health.HealthBook`, take the next available backend of the
registry that is not marked (highest priority first, the reference one left out, or the order given),
rebuild the model there from the checkpoint (a factory callable, or a checkpoint directory read by
:func:`hal.model.loader.load_model`), and hand it back; the batcher then re-prefills every in-flight
request with its prompt and the tokens it already generated and goes on decoding, so nothing is lost.
Greedy continuations are those an undisturbed run gives where both backends compute the same logits
(verified on the CPU in fp32); another backend, dtype or kernel choice can change the arithmetic, and so
a near-tie's argmax. A candidate that fails to build is marked too and the next one is tried; when none
is left, :class:`~hal.serving.errors.FailoverError` lists every candidate's reason.

Failover moves between backends, each bound to the device it was built on. Moving between devices of
one backend (``cuda:0`` to ``cuda:1``) needs a backend built per device, which the registry does not do
yet.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from hal.errors import HALError
from hal.serving.errors import DeviceFailure, FailoverError
from hal.serving.health import HealthBook, default_book

if TYPE_CHECKING:
    from hal.backend import Backend
    from hal.model.generate import GenerativeModel
    from hal.registry import Registry

__all__ = ["FATAL_DEVICE_CONDITIONS", "Failover", "FailoverEvent", "ModelSource", "is_device_error"]

log = logging.getLogger("hal.serving")

#: A model factory (``backend -> model``) or a checkpoint directory.
ModelSource: TypeAlias = "Callable[[Backend], GenerativeModel] | str | os.PathLike[str]"

#: The error-message fragments that mean the device (or its context) cannot go on; see the module docs.
FATAL_DEVICE_CONDITIONS: tuple[str, ...] = (
    # CUDA runtime / driver (HIP gives the same texts, or the hipError names)
    "an illegal memory access was encountered",
    "hipErrorIllegalAddress",
    "unspecified launch failure",
    "hipErrorLaunchFailure",
    "an illegal instruction was encountered",
    "the launch timed out and was terminated",
    "hipErrorLaunchTimeOut",
    "hardware stack error",
    "ECC error",
    "hipErrorECCNotCorrectable",
    "GPU is lost",
    "fallen off the bus",
    "no CUDA-capable device is detected",
    "hipErrorNoDevice",
    "CUDA-capable device(s) is/are busy or unavailable",
    # NCCL / RCCL
    "unhandled system error",
    "unhandled cuda error",
    "remote process exited",
    "communicator was aborted",
    # Ascend (torch_npu)
    "NPU function error",
    "ACL stream synchronize failed",
    "EZ9999",
)
_FATAL = re.compile("|".join(re.escape(c) for c in FATAL_DEVICE_CONDITIONS), re.IGNORECASE)
_NOT_THE_DEVICE = re.compile(r"device-side assert|out of memory", re.IGNORECASE)


def _one(exc: BaseException) -> bool | None:
    """True/False when ``exc`` alone decides, ``None`` when its causes should be looked at."""
    if isinstance(exc, DeviceFailure):
        return True
    if isinstance(exc, HALError):
        return False
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if not isinstance(exc, RuntimeError):  # torch.AcceleratorError (torch >= 2.8) is a RuntimeError
        return None
    message = str(exc)
    if _NOT_THE_DEVICE.search(message):
        return False
    if _FATAL.search(message):
        return True
    return None


def is_device_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the device failed; see the module docs."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        verdict = _one(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class FailoverEvent:
    """One failover, as the batcher reports it (``AutoBatcher.failovers``, logs, metrics).

    :ivar from_backend: / :ivar from_device: where the error happened.
    :ivar to_backend: / :ivar to_device: where generation went on.
    :ivar error: the device error, ``Type: message``.
    :ivar rebuild_seconds: choosing the next backend and rebuilding the model there.
    :ivar resume_seconds: re-prefilling the in-flight requests on the new device.
    :ivar recovery_seconds: from catching the error to every in-flight request being ready to decode
        again (rebuild + resume + bookkeeping): the time to recover.
    :ivar resumed_requests: in-flight requests carried over.
    :ivar resumed_tokens: prompt and generated tokens re-prefilled for them.
    :ivar skipped: candidates passed over, each ``"name: why"``.
    """

    from_backend: str
    from_device: str
    to_backend: str
    to_device: str
    error: str
    rebuild_seconds: float
    resume_seconds: float
    recovery_seconds: float
    resumed_requests: int
    resumed_tokens: int
    skipped: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = list(self.skipped)
        return data


class Failover:
    """Where to go when a device fails, and how to rebuild the model there.

    :param model: a factory ``backend -> model`` (anything :func:`hal.model.generate.generate` takes), or
        a checkpoint directory for :func:`hal.model.loader.load_model` (``load_kwargs`` are passed on).
    :param registry: where backends come from (``None``: :func:`hal.default_registry`); tests pass an
        explicit ``hal.Registry(plugins=[...])``.
    :param backends: the candidates in order (``None``: every available backend but the reference
        one, ``cpu``, highest priority first; name ``cpu`` here to fail over to it). The backend that
        failed and backends with a device marked in ``book`` are skipped.
    :param book: where failed devices are marked (``None``: :func:`~hal.serving.health.default_book`,
        which ``hal.health()`` reads).
    :param is_device_error: the predicate that decides which errors fail over (default
        :func:`is_device_error`).
    :param load_kwargs: keyword arguments for ``load_model`` (``dtype``, ``quantize``, ...).

    Example::

        failover = hal.serving.Failover("/models/DeepSeek-V3")
        model = failover.build()                       # on the best healthy backend
        with hal.AutoBatcher(model, failover=failover) as batcher:
            ...
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        registry: Registry | None = None,
        backends: Sequence[str] | None = None,
        book: HealthBook | None = None,
        is_device_error: Callable[[BaseException], bool] = is_device_error,
        load_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            kwargs = {"progress": False, **(load_kwargs or {})}

            def factory(backend: Backend) -> GenerativeModel:
                from hal.model.loader import load_model

                return load_model(path, backend, **kwargs)

            self._factory: Callable[[Backend], GenerativeModel] = factory
            self.source = path
        elif callable(model):
            if load_kwargs:
                raise TypeError("Failover: load_kwargs only applies to a checkpoint directory, not to a factory")
            self._factory = model
            self.source = getattr(model, "__qualname__", repr(model))
        else:
            raise TypeError(
                f"Failover: model must be a factory (backend -> model) or a checkpoint directory, got {model!r}"
            )
        if registry is None:
            import hal

            registry = hal.default_registry()
        self.registry = registry
        self.backends = None if backends is None else list(backends)
        self.book = default_book() if book is None else book
        self.is_device_error = is_device_error
        self._lock = threading.Lock()

    def candidates(self, exclude: Sequence[str] = ()) -> list[str]:
        """The backends failover would try now, in order (marked and excluded ones left out; the reference
        backend only when named in ``backends``)."""
        if self.backends is not None:
            names = list(self.backends)
        else:
            # Never the reference (cpu) unless named: a GPU box would load the whole model on the host.
            names = [b.name for b in self.registry.backends() if b.available and not b.reference]
        return [n for n in names if n not in exclude and self.book.is_healthy(n)]

    def build(self, name: str | None = None) -> GenerativeModel:
        """The model on ``name``, or on the first healthy candidate (what to start serving with).

        :raises FailoverError: no candidate (see :meth:`candidates`) could build it.
        """
        if name is not None:
            return self._factory(self.registry.get_backend(name))
        model, _ = self._next([], [])
        return model

    def replace(self, failed: Backend, error: BaseException) -> tuple[GenerativeModel, tuple[str, ...]]:
        """Mark ``failed``'s device unhealthy and rebuild the model on the next healthy backend.

        :returns: the new model and the candidates skipped on the way (``"name: why"``).
        :raises FailoverError: no candidate is left, or every one failed to build.
        """
        self.book.mark_unhealthy(failed.name, str(failed.device), f"{type(error).__name__}: {error}")
        return self._next([failed.name], [f"{failed.name}: {type(error).__name__}: {error}"])

    def _next(self, exclude: list[str], tried: list[str]) -> tuple[GenerativeModel, tuple[str, ...]]:
        skipped: list[str] = []
        with self._lock:  # two batchers failing over at once must not build on the same dead backend
            for name in self.candidates(exclude):
                try:
                    backend = self.registry.get_backend(name)
                    model = self._factory(backend)
                except Exception as exc:  # a candidate that cannot build is skipped, with its reason
                    why = f"{name}: {type(exc).__name__}: {exc}"
                    skipped.append(why)
                    if self.is_device_error(exc):
                        self.book.mark_unhealthy(name, "-", f"{type(exc).__name__}: {exc}")
                    log.warning("failover: candidate %s", why)
                    continue
                return model, tuple(skipped)
        reasons = "\n  ".join([*tried, *skipped]) or "(none)"
        unhealthy = ", ".join(f"{b} {d}" for b, d in self.book.marks()) or "none"
        remedy = "Bring a device back and clear its mark (HealthBook.clear), or add a backend"
        if self.backends is None:
            reference = [b.name for b in self.registry.backends() if b.reference and b.available]
            if reference:
                remedy += (
                    f"; the reference backend {reference[0]!r} is a candidate only when named: "
                    f"Failover(..., backends=[..., {reference[0]!r}])"
                )
        raise FailoverError(
            f"no backend left to fail over to (devices marked unhealthy: {unhealthy}). Candidates and reasons:\n"
            f"  {reasons}\n{remedy}."
        )
