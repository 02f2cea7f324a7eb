"""Failover: a fault-injection backend (``cpu``'s ops, failing after N calls) loses its device mid-generation;
the batcher rebuilds the model on ``cpu`` and resumes every request with unchanged greedy tokens."""

from __future__ import annotations

import json
import logging
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
from tests.serving.conftest import cpu_registry, flaky_registry, one_at_a_time, prompts_for


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
    failover = Failover(lambda be: DeepseekModel(cfg, be, weights), registry=registry, book=book)
    start = failover.build()
    assert start.backend.name == "flaky"
    with caplog.at_level(logging.WARNING, logger="hal.serving"):
        with hal.AutoBatcher(start, failover=failover, metrics=True, **kwargs) as batcher:
            results = batcher.process(requests)
            events = batcher.failovers
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
    failover = Failover(lambda be: DeepseekModel(cfg, be, weights), registry=registry, book=HealthBook())
    prompts = prompts_for(3, cfg.vocab_size, seed=4)
    with hal.AutoBatcher(failover.build(), failover=failover, max_batch_size=4, num_blocks=4) as batcher:
        results = batcher.process(prompts, max_new_tokens=5)
        (event,) = batcher.failovers
    assert flaky.tripped and event.resumed_tokens == sum(len(p) for p in prompts)
    assert [r.tokens for r in results] == one_at_a_time(model, prompts, [5] * 3)


def test_sampled_requests_continue_their_draws_after_a_failover(cfg: ModelConfig, weights: dict[str, Any]) -> None:
    prompts = prompts_for(3, cfg.vocab_size, seed=6)
    requests = [Request(p, 10, temperature=1.0, top_p=0.95, seed=40 + i) for i, p in enumerate(prompts)]
    kwargs = {"max_batch_size": 4, "timeout_ms": 20, "num_blocks": 4}
    undisturbed, _ = flaky_registry(None)
    with hal.AutoBatcher(DeepseekModel(cfg, undisturbed.get_backend("flaky"), weights), **kwargs) as batcher:
        expected = [r.tokens for r in batcher.process(requests)]
    registry, flaky = flaky_registry(ops_per_run(cfg, weights, requests, **kwargs) // 2)
    failover = Failover(lambda be: DeepseekModel(cfg, be, weights), registry=registry, book=HealthBook())
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
    failover = Failover(tmp_path, registry=registry, book=HealthBook())
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
    assert not book.is_healthy("flaky")
    book.clear("flaky")
    assert book.is_healthy("flaky") and failover.candidates() == ["flaky"]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (DeviceFailure("lost"), True),
        (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("HIP error: hipErrorLaunchFailure"), True),
        (RuntimeError("NPU function error: aclrtSynchronizeStream, error code is 507035 EZ9999"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), False),  # a bug: another device hits it too
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),  # capacity, not a fault
        (GenerationError("generate: prompt 0 is empty"), False),
        (hal.errors.KVCacheExhaustedError("no free block"), False),
        (RuntimeError("shape mismatch"), False),
        (ValueError("CUDA error: in a message, but not a runtime error"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_what_counts_as_a_device_error(exc: BaseException, expected: bool) -> None:
    assert is_device_error(exc) is expected


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
