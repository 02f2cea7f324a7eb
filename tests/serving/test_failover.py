"""Failover: a fault-injection backend (``cpu``'s ops, failing after N calls) loses its device mid-generation;
the batcher rebuilds the model on ``cpu`` (named as a candidate) and resumes every request with unchanged
greedy tokens; no future is ever left waiting; which errors count as device errors."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import hal
from hal.model import DeepseekModel
from hal.model.config import ModelConfig
from hal.model.generate import GenerationError
from hal.serving import (
    DeviceFailure,
    Failover,
    FailoverError,
    HealthBook,
    Request,
    is_device_error,
)
from tests.serving.conftest import (
    FLAKY_THEN_CPU,
    RecordingModel,
    cpu_registry,
    flaky_registry,
    one_at_a_time,
    prompts_for,
)


def ops_per_run(cfg: ModelConfig, weights: dict[str, Any], requests: list[Request], **kwargs: Any) -> int:
    """Compute ops the requests cost on an untripped flaky backend (to aim a fault at mid-run)."""
    registry, flaky = flaky_registry(None)
    model = DeepseekModel(cfg, registry.get_backend("flaky"), weights)
    with hal.AutoBatcher(model, **kwargs) as batcher:
        batcher.process(requests)
    return flaky.calls


def test_a_device_failure_mid_decode_fails_over_and_greedy_tokens_are_unchanged(
    cfg: ModelConfig, weights: dict[str, Any], model: DeepseekModel, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = prompts_for(6, cfg.vocab_size, seed=2)
    new_tokens = [4, 16, 9, 16, 12, 7]
    requests = [Request(p, n) for p, n in zip(prompts, new_tokens, strict=True)]
    kwargs = {"max_batch_size": 4, "timeout_ms": 20, "num_blocks": 8}
    total = ops_per_run(cfg, weights, requests, **kwargs)

    registry, flaky = flaky_registry(total // 2)  # the device dies half-way through the work
    book = HealthBook()
    failover = Failover(
        lambda be: DeepseekModel(cfg, be, weights), registry=registry, backends=FLAKY_THEN_CPU, book=book
    )
    start = failover.build()
    assert start.backend.name == "flaky"
    with caplog.at_level(logging.WARNING, logger="hal.serving"):
        with hal.AutoBatcher(start, failover=failover, metrics=True, **kwargs) as batcher:
            results = batcher.process(requests)
            events = batcher.failovers
            stats = batcher.stats()
            exposition = batcher.metrics.exposition() if batcher.metrics else ""
            assert batcher.backend.name == "cpu"

    assert flaky.tripped
    assert [r.tokens for r in results] == one_at_a_time(model, prompts, new_tokens)  # nothing lost or changed
    # Every request in flight at the failure was resumed and finished on cpu (others finished on flaky
    # before it, or were admitted on cpu after it).
    moved = [r for r in results if r.failovers]
    assert moved and all(r.backend == "cpu" and r.failovers == 1 for r in moved)
    (event,) = events
    assert (event.from_backend, event.to_backend) == ("flaky", "cpu")
    assert "DeviceFailure" in event.error and "injected device failure" in event.error
    assert event.resumed_requests == len(moved) and event.resumed_tokens > 0
    # Re-prefilled tokens are counted apart: prefill_tokens stays the prompts' (each prefilled once).
    assert stats.reprefill_tokens == event.resumed_tokens and stats.prefill_tokens == sum(len(p) for p in prompts)
    assert f"hal_failover_reprefill_tokens_total {float(event.resumed_tokens)}" in exposition
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_reserved == 0
    # The time to recover is measured, logged and exported.
    assert 0 < event.rebuild_seconds < event.recovery_seconds < 30
    assert event.recovery_seconds == pytest.approx(event.rebuild_seconds + event.resume_seconds)
    assert f"recovered in {event.recovery_seconds:.3f} s" in caplog.text
    assert 'hal_failovers_total{from_backend="flaky",to_backend="cpu"} 1.0' in exposition
    assert "hal_failover_recovery_seconds_count 1.0" in exposition
    # The failed device is marked, hal.health() reports it, and failover will not pick it again.
    rows = {(h.backend, h.device): h for h in hal.health(registry, book=book)}
    assert not rows[("flaky", "cpu")].healthy and "injected device failure" in rows[("flaky", "cpu")].reason
    assert rows[("cpu", "cpu")].healthy
    assert failover.candidates() == ["cpu"]


def test_a_failure_during_the_first_prefill_is_resumed_too(
    cfg: ModelConfig, weights: dict[str, Any], model: DeepseekModel
) -> None:
    registry, flaky = flaky_registry(5)  # inside the very first prefill: no request has a token yet
    failover = Failover(
        lambda be: DeepseekModel(cfg, be, weights), registry=registry, backends=FLAKY_THEN_CPU, book=HealthBook()
    )
    prompts = prompts_for(3, cfg.vocab_size, seed=4)
    with hal.AutoBatcher(failover.build(), failover=failover, max_batch_size=4, num_blocks=4) as batcher:
        results = batcher.process(prompts, max_new_tokens=5)
        (event,) = batcher.failovers
    assert flaky.tripped and event.resumed_tokens == sum(len(p) for p in prompts)
    assert [r.tokens for r in results] == one_at_a_time(model, prompts, [5] * 3)


def test_a_prefill_only_request_caught_in_a_failover_gets_no_token(
    cfg: ModelConfig, weights: dict[str, Any], model: DeepseekModel
) -> None:
    registry, flaky = flaky_registry(5)  # inside the first prefill, which holds both requests
    failover = Failover(
        lambda be: DeepseekModel(cfg, be, weights), registry=registry, backends=FLAKY_THEN_CPU, book=HealthBook()
    )
    prompts = prompts_for(2, cfg.vocab_size)
    with hal.AutoBatcher(failover.build(), failover=failover, max_batch_size=4, num_blocks=4) as batcher:
        only_prefill, going = batcher.process([Request(prompts[0], 0), Request(prompts[1], 3)])
        (event,) = batcher.failovers
        stats = batcher.stats()
    assert flaky.tripped
    # max_new_tokens=0 stays 0 tokens; it is finished, not re-prefilled.
    assert only_prefill.tokens == [] and only_prefill.finish_reason == "length" and only_prefill.failovers == 1
    assert going.tokens == one_at_a_time(model, prompts[1:], [3])[0] and going.failovers == 1
    assert event.resumed_tokens == len(prompts[1]) == stats.reprefill_tokens
    assert stats.finished == 2 and stats.kv_blocks_used == 0 and stats.kv_blocks_reserved == 0


def test_sampled_requests_continue_their_draws_after_a_failover(cfg: ModelConfig, weights: dict[str, Any]) -> None:
    prompts = prompts_for(3, cfg.vocab_size, seed=6)
    requests = [Request(p, 10, temperature=1.0, top_p=0.95, seed=40 + i) for i, p in enumerate(prompts)]
    kwargs = {"max_batch_size": 4, "timeout_ms": 20, "num_blocks": 4}
    undisturbed, _ = flaky_registry(None)
    with hal.AutoBatcher(DeepseekModel(cfg, undisturbed.get_backend("flaky"), weights), **kwargs) as batcher:
        expected = [r.tokens for r in batcher.process(requests)]
    registry, flaky = flaky_registry(ops_per_run(cfg, weights, requests, **kwargs) // 2)
    failover = Failover(
        lambda be: DeepseekModel(cfg, be, weights), registry=registry, backends=FLAKY_THEN_CPU, book=HealthBook()
    )
    with hal.AutoBatcher(failover.build(), failover=failover, **kwargs) as batcher:
        results = batcher.process(requests)
    # Same device type (cpu to cpu): each request's generator state moved along with it.
    assert flaky.tripped and [r.tokens for r in results] == expected


def test_failover_rebuilds_from_a_checkpoint_directory(
    cfg: ModelConfig, weights: dict[str, Any], model: DeepseekModel, tmp_path: Path
) -> None:
    raw = cfg.to_dict()
    raw["rope_scaling"] = raw.pop("rope")
    raw["eos_token_id"] = None
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    registry, flaky = flaky_registry(400)
    failover = Failover(tmp_path, registry=registry, backends=FLAKY_THEN_CPU, book=HealthBook())
    prompts = prompts_for(4, cfg.vocab_size, seed=8)
    with hal.AutoBatcher(failover.build(), failover=failover, max_batch_size=4, num_blocks=4) as batcher:
        results = batcher.process(prompts, max_new_tokens=8)
        assert batcher.backend.name == "cpu" and len(batcher.failovers) == 1
    assert flaky.tripped
    assert [r.tokens for r in results] == one_at_a_time(model, prompts, [8] * 4)


def test_with_no_backend_left_every_request_fails_with_each_reason(cfg: ModelConfig, weights: dict[str, Any]) -> None:
    registry, _ = flaky_registry(50)
    book = HealthBook()
    failover = Failover(lambda be: DeepseekModel(cfg, be, weights), registry=registry, backends=["flaky"], book=book)
    with hal.AutoBatcher(failover.build(), failover=failover, max_batch_size=4, num_blocks=4) as batcher:
        futures = [batcher.submit(p, 6) for p in prompts_for(3, cfg.vocab_size)]
        for f in futures:
            with pytest.raises(FailoverError, match=r"(?s)no backend left to fail over to .*flaky: DeviceFailure"):
                f.result(timeout=30)
        with pytest.raises(FailoverError):  # and later requests fail at once, with the same reason
            batcher.submit([1, 2, 3], 2).result(timeout=30)
        stats = batcher.stats()
    assert stats.failed == 4 and stats.kv_blocks_used == 0 and stats.kv_blocks_reserved == 0  # the cache let go
    assert not book.is_healthy("flaky")
    book.clear("flaky")
    assert book.is_healthy("flaky") and failover.candidates() == ["flaky"]


def test_a_queued_request_cancelled_before_the_give_up_is_seen_done(cfg: ModelConfig, weights: dict[str, Any]) -> None:
    # The give-up takes it off the queue: wait() must see it done (cancel() alone wakes no waiter), and it
    # counts as cancelled, so every submitted request has one outcome.
    registry, _ = flaky_registry(50)
    gate = threading.Event()  # holds every model call until the queued request is cancelled
    failover = Failover(
        lambda be: RecordingModel(DeepseekModel(cfg, be, weights), gate=gate),
        registry=registry,
        backends=["flaky"],
        book=HealthBook(),
    )
    with hal.AutoBatcher(failover.build(), failover=failover, max_batch_size=2, num_blocks=4) as batcher:
        running = [batcher.submit(p, 6) for p in prompts_for(2, cfg.vocab_size)]
        queued = batcher.submit([1, 2, 3], 6)  # the batch is full: it waits
        assert queued.cancel()
        gate.set()
        assert not wait([queued, *running], timeout=30).not_done
        stats = batcher.stats()
    assert stats.cancelled == 1 and stats.failed == 2 and stats.submitted == 3


# torch.AcceleratorError exists from torch 2.8 on: built when the parameters are, never at collection.
_ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", None)
_NEEDS_ACCELERATOR_ERROR = pytest.mark.skipif(_ACCELERATOR_ERROR is None, reason="torch < 2.8: no AcceleratorError")


def _accelerator_error(message: str) -> BaseException:
    assert _ACCELERATOR_ERROR is not None
    return _ACCELERATOR_ERROR(message)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda: DeviceFailure("lost"), True, id="DeviceFailure"),
        pytest.param(
            lambda: _accelerator_error("CUDA error: an illegal memory access was encountered"),
            True,
            id="AcceleratorError-illegal-address",
            marks=_NEEDS_ACCELERATOR_ERROR,
        ),
        pytest.param(
            lambda: _accelerator_error("CUDA error: invalid argument"),
            False,  # a bad call, not a dead device
            id="AcceleratorError-invalid-argument",
            marks=_NEEDS_ACCELERATOR_ERROR,
        ),
        pytest.param(lambda: RuntimeError("CUDA error: unspecified launch failure"), True, id="launch-failure"),
        pytest.param(lambda: RuntimeError("CUDA error: uncorrectable ECC error encountered"), True, id="ecc"),
        pytest.param(lambda: RuntimeError("CUDA error: no CUDA-capable device is detected"), True, id="no-device"),
        pytest.param(lambda: RuntimeError("NVML: GPU is lost"), True, id="gpu-lost"),
        pytest.param(lambda: RuntimeError("HIP error: hipErrorLaunchFailure"), True, id="hip-launch-failure"),
        pytest.param(
            lambda: RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1269, unhandled system error"),
            True,
            id="nccl-system-error",
        ),
        pytest.param(
            lambda: RuntimeError("NCCL error: remote process exited or there was a network error"),
            True,
            id="nccl-remote-exited",
        ),
        pytest.param(
            lambda: RuntimeError("NPU function error: aclrtSynchronizeStream, error code is 507035 EZ9999"),
            True,
            id="npu",
        ),
        # A bug in the inputs or a kernel: another device would hit it too.
        pytest.param(lambda: RuntimeError("CUDA error: device-side assert triggered"), False, id="device-side-assert"),
        pytest.param(lambda: RuntimeError("CUDA error: invalid configuration argument"), False, id="cuda-invalid-cfg"),
        pytest.param(lambda: RuntimeError("HIP error: invalid device function"), False, id="hip-invalid-function"),
        pytest.param(lambda: RuntimeError("NCCL error: invalid usage"), False, id="nccl-invalid-usage"),
        pytest.param(
            lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            False,  # capacity, not a fault
            id="OutOfMemoryError",
        ),
        pytest.param(lambda: GenerationError("generate: prompt 0 is empty"), False, id="GenerationError"),
        pytest.param(lambda: hal.errors.KVCacheExhaustedError("no free block"), False, id="KVCacheExhaustedError"),
        pytest.param(lambda: RuntimeError("shape mismatch"), False, id="shape-mismatch"),
        pytest.param(
            lambda: ValueError("CUDA error: an illegal memory access was encountered"),
            False,  # in a message, but not a runtime error
            id="ValueError",
        ),
    ],
)
def test_what_counts_as_a_device_error(make: Callable[[], BaseException], expected: bool) -> None:
    assert is_device_error(make()) is expected


def test_a_device_error_is_found_along_the_exception_chain() -> None:
    try:
        try:
            raise DeviceFailure("gone")
        except DeviceFailure as inner:
            raise RuntimeError("moe_route failed") from inner
    except RuntimeError as outer:
        assert is_device_error(outer)


def test_failover_refuses_a_model_that_is_neither_factory_nor_directory() -> None:
    with pytest.raises(TypeError, match=r"factory .* or a checkpoint directory"):
        Failover(42, registry=cpu_registry())  # type: ignore[arg-type]


def test_the_reference_backend_is_a_candidate_only_when_named(cfg: ModelConfig, weights: dict[str, Any]) -> None:
    registry, _ = flaky_registry(None)
    factory = lambda be: DeepseekModel(cfg, be, weights)  # noqa: E731
    assert Failover(factory, registry=registry, book=HealthBook()).candidates() == ["flaky"]
    assert Failover(factory, registry=registry, backends=FLAKY_THEN_CPU, book=HealthBook()).candidates() == [
        "flaky",
        "cpu",
    ]
    only_cpu = Failover(factory, registry=cpu_registry(), book=HealthBook())
    assert only_cpu.candidates() == []
    with pytest.raises(FailoverError, match=r"reference backend 'cpu' is a candidate only when named"):
        only_cpu.build()
    assert only_cpu.build("cpu").backend.name == "cpu"  # asking for it by name always works


def test_a_failing_device_error_predicate_fails_the_requests_in_flight(
    cfg: ModelConfig, weights: dict[str, Any]
) -> None:
    def predicate(exc: BaseException) -> bool:
        raise KeyError("a bug in the predicate")

    registry, _ = flaky_registry(50)
    failover = Failover(
        lambda be: DeepseekModel(cfg, be, weights), registry=registry, book=HealthBook(), is_device_error=predicate
    )
    with hal.AutoBatcher(failover.build(), failover=failover, max_batch_size=4, num_blocks=4) as batcher:
        futures = [batcher.submit(p, 6) for p in prompts_for(2, cfg.vocab_size)]
        for f in futures:
            with pytest.raises(KeyError, match="a bug in the predicate"):
                f.result(timeout=30)  # never left waiting
        stats = batcher.stats()
    assert stats.failed == 2 and stats.running == 0 and stats.kv_blocks_used == 0 and stats.kv_blocks_reserved == 0


class _Fatal(BaseException):
    """Escapes every ``except Exception``: what a scheduler bug looks like."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_scheduler_crash_during_failover_still_fails_the_requests_in_flight(
    cfg: ModelConfig, weights: dict[str, Any]
) -> None:
    def predicate(exc: BaseException) -> bool:
        raise _Fatal("the scheduler crashed")

    registry, _ = flaky_registry(50)
    failover = Failover(
        lambda be: DeepseekModel(cfg, be, weights), registry=registry, book=HealthBook(), is_device_error=predicate
    )
    batcher = hal.AutoBatcher(failover.build(), failover=failover, max_batch_size=4, num_blocks=4)
    futures = [batcher.submit(p, 6) for p in prompts_for(2, cfg.vocab_size)]
    for f in futures:
        assert isinstance(f.exception(timeout=30), _Fatal)  # never left waiting
    batcher.close()
