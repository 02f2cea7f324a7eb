"""The hook specifications every HAL plugin implements a subset of.

A plugin is any module or object exposed through the ``hal`` entry-point group (or registered on a
:class:`hal.Registry` by hand) with functions marked ``@hal.hookimpl``. HAL calls each hook once per
registry, at discovery, with a ``register`` callback; it never calls a hook on the hot path. Hooks are
called with keyword arguments, and an implementation may accept only the arguments it uses.

Hooks must not call :func:`hal.get_backend` or :func:`hal.backends` (nor use the default registry
any other way): they run while that registry is being created, so such a call raises
:class:`hal.errors.BackendError` and the plugin is reported as failed. Decide what depends on other
backends in a backend's ``probe``/``load`` or in an op registration's ``when`` predicate instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from hal.registry import RegisterBackend, RegisterOp

__all__ = ["hal_register_backends", "hal_register_ops", "hookimpl", "hookspec"]

PROJECT = "hal"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------


@hookspec
def hal_register_backends(register: RegisterBackend) -> None:
    """Declare backends: call ``register(spec)`` once per :class:`hal.BackendSpec`.

    Keep this cheap: it runs when HAL discovers plugins (``hal info``, the first ``get_backend``). The
    spec's ``probe`` decides availability later and must import no vendor SDK's heavy modules and
    create no device context; its ``load`` runs only once the backend has been selected.

    :param register: ``register(spec: BackendSpec) -> None``. Raises
        :class:`hal.errors.PluginValidationError` for a malformed spec or a name already taken; the
        plugin is then reported as failed and ignored as a whole.
    :returns: nothing; return values are ignored.
    """


# ---------------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------------


@hookspec
def hal_register_ops(register: RegisterOp) -> None:
    """Add or override single op implementations of existing backends.

    Call ``register(op, impl, backend=..., priority=..., when=..., name=...)`` once per
    implementation:

    - ``op``: a catalogue name (``"gemm_fp8"``); see :mod:`hal.ops.catalogue` for each op's signature,
      shapes, dtypes and layouts. ``impl`` must accept the same arguments; it is called after
      validation, never with input that breaks the contract.
    - ``backend``: the backend's name (``"cpu"``, ``"nvidia"``, or one a plugin adds).
    - ``priority``: an int; a backend's own implementations have priority 0, so an override needs
      ``priority >= 1`` to win. Highest wins; on a tie the backend's own one wins.
    - ``when``: ``None`` (always) or a predicate ``(Capabilities) -> bool`` evaluated once, when the
      backend is built (for instance ``lambda caps: caps.arch == "sm90"``). False means this
      implementation is skipped there, and ``hal info`` says so.
    - ``name``: shown in ``hal info``; ``None`` means ``module:qualname`` of ``impl``.

    Registrations for a backend that is never built are kept and ignored.

    :param register: the callback above. Raises :class:`hal.errors.PluginValidationError` for an
        unknown op or a non-callable ``impl``; the plugin is then reported as failed and ignored.
    :returns: nothing; return values are ignored.
    """
