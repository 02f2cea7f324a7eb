"""Plugin discovery, validation, selection, op resolution: with explicit registries, no globals."""

from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import hal
from hal.errors import (
    BackendLoadError,
    BackendNotFoundError,
    BackendUnavailableError,
    OpNotImplementedError,
    ShapeError,
)
from hal.testing import ConformanceFailure, run_case
from hal.testing.conformance import CASES


def backend_plugin(
    name: str,
    priority: int,
    *,
    available: bool = True,
    reason: str = "",
    ops: dict | None = None,
    reference: bool = False,
    device: str = "cpu",
    arch: str = "cpu",
) -> Any:
    """A plugin object declaring one backend whose load returns ``ops``."""

    def load() -> hal.BackendImpl:
        caps = hal.Capabilities(
            device, f"{name} device", arch, (torch.float32, torch.bfloat16), None, False, None, 1, "gloo"
        )
        return hal.BackendImpl(torch.device(device), caps, ops or {})

    @hal.hookimpl
    def hal_register_backends(register: Any) -> None:
        register(
            hal.BackendSpec(name, priority, lambda: hal.Availability(available, reason), load, reference=reference)
        )

    return SimpleNamespace(hal_register_backends=hal_register_backends)


def ops_plugin(*registrations: tuple[str, Any, dict]) -> Any:
    @hal.hookimpl
    def hal_register_ops(register: Any) -> None:
        for op, impl, kwargs in registrations:
            register(op, impl, **kwargs)

    return SimpleNamespace(hal_register_ops=hal_register_ops)


def cpu_registry(*plugins: tuple[str, Any], disabled: tuple[str, ...] = ()) -> hal.Registry:
    """The real cpu plugin (the reference) plus ``plugins``, nothing from entry points."""
    import hal_cpu

    return hal.Registry(entry_points=False, disabled=disabled, plugins=[("cpu", hal_cpu), *plugins])


def fake_gemm(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return (x.float() @ w.float().T).to(out_dtype or x.dtype)


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------


def test_highest_priority_available_backend_wins() -> None:
    reg = cpu_registry(
        ("fast", backend_plugin("fast", 50)), ("gone", backend_plugin("gone", 90, available=False, reason="no device"))
    )
    assert [b.name for b in reg.backends()] == ["gone", "fast", "cpu"]
    assert reg.select() == "fast"
    assert reg.get_backend().name == "fast"


def test_hal_backend_env_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = cpu_registry(("fast", backend_plugin("fast", 50)))
    monkeypatch.setenv("HAL_BACKEND", "cpu")
    assert reg.get_backend().name == "cpu"
    assert reg.get_backend("fast").name == "fast"  # an explicit name beats the environment


def test_unavailable_backend_error_names_every_reason() -> None:
    reg = cpu_registry(
        ("a", backend_plugin("a", 10, available=False, reason="driver missing")),
        ("b", backend_plugin("b", 20, available=False, reason="no devices")),
    )
    with pytest.raises(BackendUnavailableError) as info:
        reg.get_backend("a")
    msg = str(info.value)
    assert "backend 'a' is unavailable: driver missing" in msg
    assert "b: unavailable (no devices)" in msg and "cpu: available" in msg


def test_no_available_backend_lists_reasons() -> None:
    reg = hal.Registry(entry_points=False, plugins=[("x", backend_plugin("x", 1, available=False, reason="nope"))])
    with pytest.raises(BackendUnavailableError, match=r"no available backend(.|\n)*x: unavailable \(nope\)"):
        reg.get_backend()


def test_unknown_backend_is_not_found() -> None:
    reg = cpu_registry()
    with pytest.raises(BackendNotFoundError, match=r"no backend named 'tpu'(.|\n)*cpu: available"):
        reg.get_backend("tpu")


def test_probe_that_raises_is_reported_as_unavailable() -> None:
    def probe() -> hal.Availability:
        raise KeyError("libamd_smi.so")

    @hal.hookimpl
    def hal_register_backends(register: Any) -> None:
        register(hal.BackendSpec("odd", 5, probe, lambda: None))  # type: ignore[arg-type,return-value]

    reg = cpu_registry(("odd", SimpleNamespace(hal_register_backends=hal_register_backends)))
    info = {b.name: b for b in reg.backends()}["odd"]
    assert not info.available and info.reason == "probe raised KeyError: 'libamd_smi.so'"
    assert reg.select() == "cpu"


def test_load_failure_is_a_clear_error() -> None:
    def load() -> hal.BackendImpl:
        raise RuntimeError("CUDA driver version is insufficient")

    @hal.hookimpl
    def hal_register_backends(register: Any) -> None:
        register(hal.BackendSpec("broken", 5, hal.Availability.yes, load))

    reg = cpu_registry(("broken", SimpleNamespace(hal_register_backends=hal_register_backends)))
    with pytest.raises(BackendLoadError, match=r"'broken'.*failed to load: RuntimeError: CUDA driver"):
        reg.get_backend("broken")


def test_backend_impl_with_bad_op_signature_is_rejected() -> None:
    def gemm(x: torch.Tensor) -> torch.Tensor:
        return x

    reg = cpu_registry(("bad", backend_plugin("bad", 5, ops={"gemm": gemm, "gemmm": fake_gemm})))
    with pytest.raises(BackendLoadError) as info:
        reg.get_backend("bad")
    assert "op 'gemmm' is not in the catalogue" in str(info.value)
    assert "op 'gemm': implementation" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Op resolution: native, override, predicate, fallback, missing
# ------------------------------------------------------------------------------------------------


def test_missing_ops_fall_back_to_the_reference_and_say_so() -> None:
    reg = cpu_registry(("mini", backend_plugin("mini", 5, ops={"gemm": fake_gemm})))
    be = reg.get_backend("mini")
    assert be.table["gemm"].source == "native" and be.table["gemm"].impl is fake_gemm
    route = be.table["moe_route"]
    assert route.source == "fallback" and route.provider == "cpu"
    assert route.reason == "fallback to reference 'cpu': backend 'mini' does not implement it"
    # runtime ops fall back too, because mini's device is a CPU like the reference's
    assert be.table["memory_stats"].source == "fallback"
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(be.gemm(x, w), x @ w.T)


def test_runtime_ops_do_not_fall_back_across_device_types() -> None:
    reg = cpu_registry(("gpuish", backend_plugin("gpuish", 5, device="meta", arch="sm90")))
    with pytest.raises(BackendLoadError, match="does not implement the runtime op 'device_count'"):
        reg.get_backend("gpuish")


def test_override_with_higher_priority_wins_and_records_the_loser() -> None:
    reg = cpu_registry(("fast", ops_plugin(("gemm", fake_gemm, {"backend": "cpu", "priority": 5}))))
    entry = reg.get_backend("cpu").table["gemm"]
    assert entry.source == "override" and entry.provider == "fast" and entry.impl is fake_gemm
    assert "override from plugin 'fast' (priority 5)" in entry.reason
    assert "outranked: hal_cpu.reference.gemm:gemm (priority 0)" in entry.reason


def test_override_with_priority_zero_loses_to_native() -> None:
    reg = cpu_registry(("slow", ops_plugin(("gemm", fake_gemm, {"backend": "cpu", "priority": 0}))))
    entry = reg.get_backend("cpu").table["gemm"]
    assert entry.source == "native" and "outranked" in entry.reason


def test_highest_of_several_overrides_wins() -> None:
    def other(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return fake_gemm(x, w, out_dtype=out_dtype)

    reg = cpu_registry(
        (
            "p",
            ops_plugin(
                ("gemm", fake_gemm, {"backend": "cpu", "priority": 3, "name": "three"}),
                ("gemm", other, {"backend": "cpu", "priority": 7, "name": "seven"}),
            ),
        )
    )
    entry = reg.get_backend("cpu").table["gemm"]
    assert entry.impl_name == "seven" and "three (priority 3)" in entry.reason


def test_predicate_false_skips_the_override_and_says_why() -> None:
    reg = cpu_registry(
        (
            "h",
            ops_plugin(
                ("gemm", fake_gemm, {"backend": "cpu", "priority": 9, "when": lambda caps: caps.arch == "sm90"})
            ),
        )
    )
    entry = reg.get_backend("cpu").table["gemm"]
    assert entry.source == "native"
    assert "skipped hal_registry_test" not in entry.reason  # names the impl, not this module
    assert "its predicate is false on cpu" in entry.reason


def test_predicate_that_raises_skips_the_override() -> None:
    def when(caps: hal.Capabilities) -> bool:
        raise AttributeError("no attribute 'sm'")

    reg = cpu_registry(("h", ops_plugin(("gemm", fake_gemm, {"backend": "cpu", "priority": 9, "when": when}))))
    entry = reg.get_backend("cpu").table["gemm"]
    assert entry.source == "native" and "predicate raised AttributeError" in entry.reason


def test_override_for_a_backend_that_lacks_the_op_serves_it() -> None:
    reg = cpu_registry(
        ("mini", backend_plugin("mini", 5)), ("addon", ops_plugin(("gemm", fake_gemm, {"backend": "mini"})))
    )
    entry = reg.get_backend("mini").table["gemm"]
    assert entry.source == "override" and entry.provider == "addon"


def test_without_a_reference_missing_ops_raise_when_called() -> None:
    reg = cpu_registry(("mini", backend_plugin("mini", 5, ops={"gemm": fake_gemm})), disabled=("cpu",))
    be = reg.get_backend("mini")
    assert be.table["rms_norm"].source == "missing"
    with pytest.raises(OpNotImplementedError, match="rms_norm: no implementation"):
        be.rms_norm(torch.randn(2, 4), torch.ones(4))


def test_ops_are_plain_callables_that_validate() -> None:
    be = cpu_registry().get_backend("cpu")
    assert be.gemm is be.table["gemm"].fn
    assert be.op("gemm") is be.gemm
    assert "x @ w.T" in (be.gemm.__doc__ or "")
    with pytest.raises(ShapeError, match=r"gemm: w: expected \[N, K\] with K = 8"):
        be.gemm(torch.randn(2, 8), torch.randn(3, 7))


def test_backends_are_built_once() -> None:
    reg = cpu_registry()
    assert reg.get_backend("cpu") is reg.get_backend("cpu")


# ------------------------------------------------------------------------------------------------
# Broken and blocked plugins
# ------------------------------------------------------------------------------------------------


def test_spec_returns_the_registered_spec_without_probing_and_names_the_unknown() -> None:
    probed: list[str] = []

    def probe() -> hal.Availability:
        probed.append("fast")
        return hal.Availability.yes()

    spec = hal.BackendSpec("fast", 50, probe, lambda: None)  # type: ignore[arg-type,return-value]

    @hal.hookimpl
    def hal_register_backends(register: Any) -> None:
        register(spec)

    reg = cpu_registry(("fast", SimpleNamespace(hal_register_backends=hal_register_backends)))
    assert reg.spec("fast") is spec and probed == []
    assert reg.spec("cpu").reference
    with pytest.raises(BackendNotFoundError, match=r"no backend named 'tpu'(.|\n)*fast: available"):
        reg.spec("tpu")
    blocked = cpu_registry(("fast", backend_plugin("fast", 50)), disabled=("fast",))
    with pytest.raises(BackendNotFoundError, match="blocked by HAL_DISABLE_PLUGINS"):
        blocked.spec("fast")


def test_blocked_plugin_is_listed_and_ignored() -> None:
    reg = cpu_registry(("fast", backend_plugin("fast", 50)), disabled=("fast",))
    status = {p.name: p.status for p in reg.plugins()}
    assert status == {"cpu": "loaded", "fast": "blocked"}
    assert [b.name for b in reg.backends()] == ["cpu"]
    with pytest.raises(BackendNotFoundError, match="blocked by HAL_DISABLE_PLUGINS"):
        reg.get_backend("fast")


def test_disabled_plugins_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_DISABLE_PLUGINS", "fast, other")
    import hal_cpu

    reg = hal.Registry(entry_points=False, plugins=[("cpu", hal_cpu), ("fast", backend_plugin("fast", 50))])
    assert {p.name: p.status for p in reg.plugins()}["fast"] == "blocked"


def test_hook_that_raises_is_reported_and_the_rest_survive() -> None:
    @hal.hookimpl
    def hal_register_backends(register: Any) -> None:
        register(hal.BackendSpec("half", 1, hal.Availability.yes, lambda: None))  # type: ignore[arg-type,return-value]
        raise ZeroDivisionError("oops")

    reg = cpu_registry(
        ("bad", SimpleNamespace(hal_register_backends=hal_register_backends)), ("fast", backend_plugin("fast", 50))
    )
    info = {p.name: p for p in reg.plugins()}["bad"]
    assert info.status == "failed" and info.error == "plugin 'bad': a hook raised ZeroDivisionError: oops"
    assert [b.name for b in reg.backends()] == ["fast", "cpu"]  # all-or-nothing: 'half' was dropped


def test_unknown_hook_is_reported() -> None:
    @hal.hookimpl
    def hal_register_kernels(register: Any) -> None:
        pass

    reg = cpu_registry(("typo", SimpleNamespace(hal_register_kernels=hal_register_kernels)))
    info = {p.name: p for p in reg.plugins()}["typo"]
    assert info.status == "failed"
    assert "unknown hook 'hal_register_kernels'" in str(info.error)
    assert "hal_register_backends" in str(info.error)


@pytest.mark.parametrize(
    ("registration", "message"),
    [
        (("gemmm", fake_gemm, {"backend": "cpu"}), "op 'gemmm' is not in the catalogue (did you mean gemm"),
        (("gemm", 42, {"backend": "cpu"}), "op 'gemm': impl must be callable"),
        (("gemm", fake_gemm, {"backend": "cpu", "priority": "high"}), "priority must be an int"),
        (("gemm", lambda x: x, {"backend": "cpu"}), "op 'gemm': implementation"),
        (("gemm", fake_gemm, {"backend": "cpu", "when": True}), "when must be a predicate"),
    ],
    ids=["unknown-op", "not-callable", "bad-priority", "bad-signature", "bad-predicate"],
)
def test_invalid_op_registration_is_reported(registration: tuple, message: str) -> None:
    reg = cpu_registry(("bad", ops_plugin(registration)))
    info = {p.name: p for p in reg.plugins()}["bad"]
    assert info.status == "failed" and message in str(info.error)
    assert reg.get_backend("cpu").table["gemm"].source == "native"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            hal.BackendSpec("cpu", 1, hal.Availability.yes, lambda: None),
            "backend 'cpu' is already registered by plugin 'cpu'",
        ),  # type: ignore[arg-type,return-value]
        (hal.BackendSpec("Bad Name", 1, hal.Availability.yes, lambda: None), "must match"),  # type: ignore[arg-type,return-value]
        (hal.BackendSpec("ref2", 1, hal.Availability.yes, lambda: None, reference=True), "claims to be the reference"),  # type: ignore[arg-type,return-value]
        (
            hal.BackendSpec("sick", 1, hal.Availability.yes, lambda: None, health=[]),  # type: ignore[arg-type,return-value]
            "backend 'sick': health must be a callable returning hal.DeviceHealth rows, or None; got list",
        ),
        ("not a spec", "takes a hal.BackendSpec"),
    ],
    ids=["duplicate", "bad-name", "second-reference", "health-not-callable", "not-a-spec"],
)
def test_invalid_backend_registration_is_reported(spec: Any, message: str) -> None:
    @hal.hookimpl
    def hal_register_backends(register: Any) -> None:
        register(spec)

    reg = cpu_registry(("bad", SimpleNamespace(hal_register_backends=hal_register_backends)))
    info = {p.name: p for p in reg.plugins()}["bad"]
    assert info.status == "failed" and message in str(info.error)


def test_duplicate_plugin_name_is_reported() -> None:
    reg = cpu_registry(("cpu", backend_plugin("another", 1)))
    assert [p.status for p in reg.plugins()] == ["loaded"]
    assert [b.name for b in reg.backends()] == ["cpu"]


# ------------------------------------------------------------------------------------------------
# The conformance kit catches a wrong implementation
# ------------------------------------------------------------------------------------------------


def test_conformance_kit_catches_a_wrong_override() -> None:
    def off_by_a_bit(x: torch.Tensor, w: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return (fake_gemm(x, w, out_dtype=torch.float32) * 1.001).to(out_dtype or x.dtype)

    reg = cpu_registry(("bad", ops_plugin(("gemm", off_by_a_bit, {"backend": "cpu", "priority": 1}))))
    case = next(c for c in CASES if c.op == "gemm" and c.dtype == torch.float32)
    with pytest.raises(ConformanceFailure, match=r"relative error .* > 1e-05"):
        run_case(reg.get_backend("cpu"), case, reg.reference_ops())


def test_conformance_kit_catches_wrong_routing() -> None:
    from hal_cpu.reference.moe import moe_route

    def shifted(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, **kwargs: Any) -> Any:
        w, ids = moe_route(router_logits, correction_bias, **kwargs)
        return hal.RouteResult(w, (ids + 1) % router_logits.shape[1])

    reg = cpu_registry(("bad", ops_plugin(("moe_route", shifted, {"backend": "cpu", "priority": 1}))))
    case = next(c for c in CASES if c.op == "moe_route")
    with pytest.raises(ConformanceFailure, match="chose other experts"):
        run_case(reg.get_backend("cpu"), case, reg.reference_ops())


def test_conformance_kit_catches_nan_fp8_values() -> None:
    from hal_cpu.reference.gemm import quantize_fp8

    def nan_values(x: torch.Tensor, **kwargs: Any) -> Any:
        xq, xs = quantize_fp8(x, **kwargs)
        # Right scales, every value NaN (0x7f in e4m3fn): NaN compares False with any bound.
        return torch.full_like(xq.view(torch.uint8), 0x7F).view(xq.dtype), xs

    reg = cpu_registry(("bad", ops_plugin(("quantize_fp8", nan_values, {"backend": "cpu", "priority": 1}))))
    case = next(c for c in CASES if c.op == "quantize_fp8" and c.fp8 == torch.float8_e4m3fn)
    with pytest.raises(ConformanceFailure, match="off by more than fp8 rounding"):
        run_case(reg.get_backend("cpu"), case, reg.reference_ops())


# ------------------------------------------------------------------------------------------------
# Robustness: odd plugins, entry points, re-entry, threads
# ------------------------------------------------------------------------------------------------


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, *extra: tuple[str, str]) -> None:
    """Make the ``hal`` entry-point group hold only ``extra`` (``(name, "module")`` pairs)."""
    import importlib.metadata as md

    eps = [md.EntryPoint(name, value, "hal") for name, value in extra]
    monkeypatch.setattr(md, "entry_points", lambda **kw: list(eps) if kw.get("group") == "hal" else [])


def test_same_plugin_object_under_a_second_name_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    mod = types.ModuleType("hal_test_dup_plugin")
    mod.hal_register_backends = backend_plugin("dup", 5).hal_register_backends  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hal_test_dup_plugin", mod)
    fake_entry_points(monkeypatch, ("one", "hal_test_dup_plugin"), ("two", "hal_test_dup_plugin"))
    reg = hal.Registry()
    status = {p.name: (p.status, p.error) for p in reg.plugins()}
    assert status["one"] == ("loaded", None)
    assert status["two"] == ("failed", "plugin 'two': this plugin object is already registered as 'one'")
    info = reg.register(mod, "three")  # by hand too: never raises
    assert info.status == "failed" and "already registered as 'one'" in str(info.error)


def test_plugin_raising_system_exit_is_reported_as_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    mod = types.ModuleType("hal_test_exit_plugin")

    @hal.hookimpl
    def hal_register_backends(register: Any) -> None:
        raise SystemExit("torch_npu missing")

    mod.hal_register_backends = hal_register_backends  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hal_test_exit_plugin", mod)
    fake_entry_points(monkeypatch, ("atimport", "hal_test_exit_plugin_missing"), ("inhook", "hal_test_exit_plugin"))

    def exit_at_import(self: Any) -> Any:
        if self.value == "hal_test_exit_plugin_missing":
            raise SystemExit("no device library")
        return sys.modules[self.value]

    import importlib.metadata as md

    monkeypatch.setattr(md.EntryPoint, "load", exit_at_import)
    reg = hal.Registry(plugins=[("fast", backend_plugin("fast", 50))])
    status = {p.name: (p.status, p.error) for p in reg.plugins()}
    assert status["atimport"][0] == "failed" and "raised SystemExit: no device library" in str(status["atimport"][1])
    assert status["inhook"] == ("failed", "plugin 'inhook': a hook raised SystemExit: torch_npu missing")
    assert reg.get_backend().name == "fast"

    @hal.hookimpl
    def interrupted(register: Any) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C is not a plugin failure: it still propagates
        cpu_registry(("ctrlc", SimpleNamespace(hal_register_backends=interrupted)))


@pytest.mark.parametrize("ops", [None, [("gemm", fake_gemm)]], ids=["none", "list"])
def test_backend_impl_whose_ops_is_not_a_mapping_is_rejected(ops: Any) -> None:
    reg = cpu_registry(("bad", backend_plugin("bad", 5)))
    spec = reg.spec("bad")
    caps = spec.load().capabilities
    bad = hal.BackendImpl(torch.device("cpu"), caps, ops)
    reg._specs["bad"] = (hal.BackendSpec("bad", 5, hal.Availability.yes, lambda: bad), "bad")
    with pytest.raises(BackendLoadError, match=rf"ops must be a Mapping\[str, callable\], got {type(ops).__name__}"):
        reg.get_backend("bad")


def test_not_found_names_hal_backend_and_failed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    @hal.hookimpl
    def hal_register_backends(register: Any) -> None:
        raise ImportError("libmychip.so not found")

    reg = cpu_registry(("mychip", SimpleNamespace(hal_register_backends=hal_register_backends)))
    monkeypatch.setenv("HAL_BACKEND", " cpu \n")
    assert reg.get_backend().name == "cpu"  # whitespace around the name is ignored
    monkeypatch.setenv("HAL_BACKEND", "mychip")
    with pytest.raises(BackendNotFoundError) as info:
        reg.get_backend()
    msg = str(info.value)
    assert "no backend named 'mychip' (from HAL_BACKEND)" in msg
    assert "Plugins that failed to load:\n  mychip: plugin 'mychip': a hook raised ImportError: libmychip.so" in msg
    with pytest.raises(BackendNotFoundError) as info:
        reg.get_backend("mychip")
    assert "(from HAL_BACKEND)" not in str(info.value)


def test_hook_calling_get_backend_during_discovery_fails_the_plugin_not_deadlocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    mod = types.ModuleType("hal_test_peek_plugin")

    @hal.hookimpl
    def hal_register_ops(register: Any) -> None:
        hal.backends()

    mod.hal_register_ops = hal_register_ops  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hal_test_peek_plugin", mod)
    import hal_cpu

    monkeypatch.setitem(sys.modules, "hal_test_cpu_plugin", hal_cpu)
    fake_entry_points(monkeypatch, ("cpu", "hal_test_cpu_plugin"), ("peek", "hal_test_peek_plugin"))
    monkeypatch.setattr(hal, "_default", None)
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(hal.default_registry()), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "default_registry() deadlocked on a re-entrant hook"
    info = {p.name: p for p in result[0].plugins()}["peek"]
    assert info.status == "failed"
    assert "hooks must not call get_backend/backends during discovery" in str(info.error)
    assert result[0].get_backend().name == "cpu"


def test_concurrent_get_backend_probes_loads_and_builds_once() -> None:
    calls = {"probe": 0, "load": 0}
    impl = cpu_registry().reference_ops()

    def probe() -> hal.Availability:
        calls["probe"] += 1
        time.sleep(0.05)
        return hal.Availability.yes()

    def load() -> hal.BackendImpl:
        calls["load"] += 1
        time.sleep(0.1)
        caps = hal.Capabilities("cpu", "slow", "cpu", (torch.float32,), None, False, None, 1, "gloo")
        return hal.BackendImpl(torch.device("cpu"), caps, dict(impl))

    @hal.hookimpl
    def hal_register_backends(register: Any) -> None:
        register(hal.BackendSpec("slow", 50, probe, load))

    reg = cpu_registry(("slow", SimpleNamespace(hal_register_backends=hal_register_backends)))
    start = threading.Barrier(4)
    out: list[hal.Backend] = []

    def worker() -> None:
        start.wait()
        out.append(reg.get_backend())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == {"probe": 1, "load": 1}
    assert len({id(b) for b in out}) == 1 and out[0].name == "slow"
