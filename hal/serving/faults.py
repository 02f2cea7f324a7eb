"""Fault injection: a backend plugin that serves another backend's ops and then fails like a lost device.

For testing failover without breaking hardware. Register it on an explicit registry beside the backend
it wraps; it has a higher priority, so it is the one selected first::

    cpu = hal.Registry(entry_points=False, plugins=[("cpu", hal_cpu)]).get_backend("cpu")
    flaky = FaultInjectionPlugin(cpu, fail_after=200)            # the 201st compute op raises
    registry = hal.Registry(entry_points=False, plugins=[("cpu", hal_cpu), ("flaky", flaky)])
    registry.get_backend()                                       # -> "flaky", on cpu's device

Only compute and collective ops are counted and failed; runtime ops (``synchronize``,
``memory_stats``, ...) pass through, so metrics can still read memory. Once tripped it stays failed
(a lost device does not come back) until :meth:`FaultInjectionPlugin.arm` is called again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hal.hookspecs import hookimpl
from hal.ops.catalogue import CATALOGUE
from hal.serving.errors import DeviceFailure
from hal.types import Availability, BackendImpl, BackendSpec

if TYPE_CHECKING:
    from hal.backend import Backend
    from hal.registry import RegisterBackend

__all__ = ["FaultInjectionPlugin"]


class FaultInjectionPlugin:
    """A plugin registering backend ``name``: ``inner``'s ops, failing after ``fail_after`` op calls.

    :param inner: the backend whose ops are served (or a callable returning it, called at load).
    :param fail_after: compute/collective op calls that succeed before every later one raises;
        ``None`` never fails (until :meth:`arm`).
    :param name: the backend's name. :param priority: its priority (above ``inner``'s to be selected).
    :param error: builds the exception from the op name and the call number (default: a
        :class:`~hal.serving.errors.DeviceFailure`).
    """

    def __init__(
        self,
        inner: Backend | Callable[[], Backend],
        *,
        fail_after: int | None,
        name: str = "flaky",
        priority: int = 10,
        error: Callable[[str, int], BaseException] | None = None,
    ) -> None:
        self._inner = inner
        self.name = name
        self.priority = priority
        self._error = error
        self._lock = threading.Lock()
        self.calls = 0
        self.failed_calls = 0
        self.fail_after = fail_after
        self.device = "-"

    def arm(self, fail_after: int | None) -> None:
        """Fail after ``fail_after`` more op calls (``None``: never), and reset the counters."""
        with self._lock:
            self.calls = 0
            self.failed_calls = 0
            self.fail_after = fail_after

    @property
    def tripped(self) -> bool:
        """Whether an op call has failed since the last :meth:`arm`."""
        return self.failed_calls > 0

    @hookimpl
    def hal_register_backends(self, register: RegisterBackend) -> None:
        register(
            BackendSpec(
                name=self.name,
                priority=self.priority,
                probe=lambda: Availability.yes("fault injection (test backend)"),
                load=self._load,
                description="fault injection: another backend's ops, failing after N calls",
            )
        )

    def _load(self) -> BackendImpl:
        backend = self._inner() if callable(self._inner) else self._inner
        self.device = str(backend.device)
        ops: dict[str, Callable[..., Any]] = {}
        for op, entry in backend.table.items():
            if entry.source == "missing":
                continue
            ops[op] = entry.impl if CATALOGUE[op].kind == "runtime" else self._wrap(op, entry.impl)
        return BackendImpl(backend.device, backend.capabilities, ops)

    def _wrap(self, op: str, impl: Callable[..., Any]) -> Callable[..., Any]:
        def faulty(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls += 1
                n = self.calls
                fail = self.fail_after is not None and n > self.fail_after
                if fail:
                    self.failed_calls += 1
            if fail:
                if self._error is not None:
                    raise self._error(op, n)
                raise DeviceFailure(
                    f"{op}: injected device failure at op call {n} (fail_after={self.fail_after})",
                    backend=self.name,
                    device=self.device,
                )
            return impl(*args, **kwargs)

        faulty.__name__ = faulty.__qualname__ = f"faulty_{op}"
        faulty.__module__ = __name__
        return faulty
