"""hal.AutoBatcher: concurrent submissions equal one-at-a-time greedy runs; batching windows; continuous
batching; back-pressure on a full KV cache; errors, cancellation and closing; generate_batched."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, wait

import pytest

import hal
from hal.model import DeepseekModel
from hal.model.generate import GenerationError, NonFiniteLogitsError, generate
from hal.model.parallel import ParallelConfig
from hal.serving import BatcherClosedError, Request, RequestResult, RequestTooLargeError, generate_batched
from tests.serving.conftest import RecordingModel, one_at_a_time, prompts_for


def test_concurrent_submissions_from_threads_equal_sequential_greedy_runs(model: DeepseekModel) -> None:
    prompts = prompts_for(24, model.cfg.vocab_size)
    new_tokens = [1 + (5 * i) % 12 for i in range(24)]
    expected = one_at_a_time(model, prompts, new_tokens)
    futures: list[Future[RequestResult] | None] = [None] * 24
    start = threading.Barrier(4)

    def client(k: int) -> None:
        start.wait()
        for i in range(k, 24, 4):
            futures[i] = batcher.submit(prompts[i], new_tokens[i])
            time.sleep(0.002 * k)  # the clients interleave differently from run to run

    with hal.AutoBatcher(model, max_batch_size=8, timeout_ms=5, num_blocks=16) as batcher:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [f.result(timeout=60) for f in futures if f is not None]
        stats = batcher.stats()
    assert [r.tokens for r in results] == expected
    assert [r.finish_reason for r in results] == ["length"] * 24
    assert [r.prompt_length for r in results] == [len(p) for p in prompts]
    assert stats.finished == 24 and stats.failed == 0 and stats.kv_blocks_used == 0 and stats.kv_blocks_reserved == 0
    assert 1 < stats.largest_batch <= 8  # batched, never beyond the limit
    assert stats.generated_tokens == sum(new_tokens)
    assert all(r.latency_seconds >= r.queue_seconds >= 0 for r in results)


def test_eos_and_sampling_match_generate_for_each_request(model: DeepseekModel) -> None:
    prompts = prompts_for(4, model.cfg.vocab_size, seed=3)
    greedy = one_at_a_time(model, prompts, [8] * 4)
    eos = greedy[1][3]
    with hal.AutoBatcher(model, max_batch_size=4, timeout_ms=20, num_blocks=8) as batcher:
        stopped = batcher.submit(prompts[1], 8, eos_token_ids=[eos]).result(timeout=30)
        sampled = batcher.process(
            [Request(p, 6, temperature=0.8, top_p=0.9, seed=11 + i) for i, p in enumerate(prompts)]
        )
    assert stopped.tokens == greedy[1][: greedy[1].index(eos) + 1] and stopped.finish_reason == "eos"
    with hal.AutoBatcher(model, max_batch_size=4, timeout_ms=20, num_blocks=8) as batcher:
        only_prefill = batcher.process([Request(prompts[0], 0), Request(prompts[1], 0)])
        one = batcher.process([Request(prompts[2], 1), Request(prompts[3], 0)])
        stats = batcher.stats()
    assert stats.failed == 0 and stats.decode_steps == 0 and stats.kv_blocks_reserved == 0
    assert [r.tokens for r in only_prefill] == [[], []] and [r.finish_reason for r in only_prefill] == ["length"] * 2
    assert [r.tokens for r in one] == [greedy[2][:1], []]
    # One generator per request, seeded by the request: generate() on that prompt alone draws the same.
    alone = [
        generate(model, [p], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=11 + i).tokens[0]
        for i, p in enumerate(prompts)
    ]
    assert [r.tokens for r in sampled] == alone


def test_requests_arriving_within_the_window_share_one_prefill(model: DeepseekModel) -> None:
    rec = RecordingModel(model)
    prompts = prompts_for(5, model.cfg.vocab_size)
    start = threading.Barrier(5)
    futures: list[Future[RequestResult] | None] = [None] * 5

    def client(i: int) -> None:
        start.wait()
        time.sleep(0.01 * i)  # spread over 40 ms, well inside the 500 ms window
        futures[i] = batcher.submit(prompts[i], 3)

    with hal.AutoBatcher(rec, max_batch_size=8, timeout_ms=500, num_blocks=8) as batcher:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [len(f.result(timeout=30).tokens) for f in futures if f is not None] == [3] * 5
    assert [len(c.seq_ids) for c in rec.of("prefill")] == [5]
    assert [len(c.seq_ids) for c in rec.of("decode")] == [5, 5]


def test_a_full_batch_does_not_wait_for_the_window(model: DeepseekModel) -> None:
    rec = RecordingModel(model)
    with hal.AutoBatcher(rec, max_batch_size=3, timeout_ms=60_000, num_blocks=8) as batcher:
        t0 = time.perf_counter()
        batcher.process(prompts_for(3, model.cfg.vocab_size), max_new_tokens=2)
        assert time.perf_counter() - t0 < 30  # the 60 s window ended as soon as 3 requests were in
    assert [len(c.seq_ids) for c in rec.of("prefill")] == [3]


def test_continuous_batching_a_finished_sequence_makes_room_for_a_waiting_one(model: DeepseekModel) -> None:
    rec = RecordingModel(model)
    prompts = prompts_for(3, model.cfg.vocab_size, seed=5)
    new_tokens = [2, 10, 3]  # A finishes first; C waits for its seat; B runs throughout
    with hal.AutoBatcher(rec, max_batch_size=2, timeout_ms=1000, num_blocks=8) as batcher:
        results = batcher.process([Request(p, n) for p, n in zip(prompts, new_tokens, strict=True)])
    assert [r.tokens for r in results] == one_at_a_time(model, prompts, new_tokens)

    first, second = rec.of("prefill")
    assert len(first.seq_ids) == 2 and len(second.seq_ids) == 1  # A and B, then C alone
    (c,) = second.seq_ids
    # C was prefilled once A had finished and freed its blocks, while B was still running ...
    assert second.in_cache == 1 and second.used_blocks == 1
    # ... and decodes side by side with B from the very next step.
    after = rec.calls[rec.calls.index(second) + 1]
    assert after.kind == "decode" and c in after.seq_ids and len(after.seq_ids) == 2
    assert max(len(call.seq_ids) for call in rec.of("decode")) == 2
    assert results[2].queue_seconds > results[0].queue_seconds


def test_a_full_kv_cache_queues_requests_instead_of_failing_them(model: DeepseekModel) -> None:
    rec = RecordingModel(model)
    prompts = prompts_for(6, model.cfg.vocab_size, seed=7)
    new_tokens = [12] * 6  # each request needs one 64-token block; the cache has two
    with hal.AutoBatcher(rec, max_batch_size=8, timeout_ms=5, num_blocks=2) as batcher:
        futures = [batcher.submit(p, n) for p, n in zip(prompts, new_tokens, strict=True)]
        results = [f.result(timeout=60) for f in futures]
        stats = batcher.stats()
    assert [r.tokens for r in results] == one_at_a_time(model, prompts, new_tokens)
    assert max(call.in_cache for call in rec.calls) <= 2  # never more sequences than the blocks hold
    assert len(rec.of("prefill")) >= 3  # admitted as blocks came free
    assert stats.failed == 0 and stats.rejected == 0 and stats.finished == 6
    # Requests that waited for room say so in their queueing time.
    assert max(r.queue_seconds for r in results[2:]) > max(r.queue_seconds for r in results[:2])


def test_a_request_larger_than_the_whole_cache_fails_clearly_and_alone(model: DeepseekModel) -> None:
    prompts = prompts_for(2, model.cfg.vocab_size)
    with hal.AutoBatcher(model, max_batch_size=4, timeout_ms=5, num_blocks=2) as batcher:
        big = batcher.submit(list(range(100)), 60)  # 100 + 59 cached tokens: 3 blocks of 64
        small = [batcher.submit(p, 4) for p in prompts]
        with pytest.raises(RequestTooLargeError, match=r"needs 3 KV-cache blocks .* the cache has 2 in all"):
            big.result(timeout=30)
        assert [f.result(timeout=30).tokens for f in small] == one_at_a_time(model, prompts, [4, 4])
        assert batcher.stats().rejected == 1


def test_bad_input_raises_at_submit_and_queues_nothing(model: DeepseekModel) -> None:
    with hal.AutoBatcher(model, max_batch_size=2, timeout_ms=5, num_blocks=4) as batcher:
        with pytest.raises(GenerationError, match=r"AutoBatcher.submit: prompt 0: token ids must lie in \[0, 1024\)"):
            batcher.submit([1, 5000], 4)
        with pytest.raises(GenerationError, match=r"AutoBatcher\.submit: max_new_tokens must be >= 0"):
            batcher.submit([1, 2], -1)
        with pytest.raises(GenerationError, match=r"AutoBatcher\.process: request 1: prompt 0 is empty"):
            batcher.process([Request([3, 4], 2), Request([], 2)])  # checked before any is queued
        with pytest.raises(GenerationError, match=r"AutoBatcher\.process: request 2: prompt 0: token ids must"):
            batcher.process([Request([3, 4], 2), Request([1, 2], 2), Request([1, 5000], 2)])
        assert batcher.stats().submitted == 0
        with pytest.raises(TypeError, match="pass max_new_tokens"):
            batcher.process([[1, 2]])
    with pytest.raises(ValueError, match="max_batch_size must be an int >= 1"):
        hal.AutoBatcher(model, max_batch_size=0)


@pytest.mark.parametrize(
    ("fault", "error", "match"),
    [
        ({"fail_on_decode": 2}, RuntimeError, "injected model bug"),
        # NaN logits would give tokens like any others: the requests fail instead.
        ({"nan_on_decode": 2}, NonFiniteLogitsError, "decode: the model's logits hold NaN or inf"),
    ],
    ids=["exception", "nan-logits"],
)
def test_a_failed_decode_fails_the_requests_in_flight_and_the_batcher_goes_on(
    model: DeepseekModel, fault: dict[str, int], error: type[Exception], match: str
) -> None:
    rec = RecordingModel(model, **fault)
    prompts = prompts_for(4, model.cfg.vocab_size, seed=9)
    with hal.AutoBatcher(rec, max_batch_size=4, timeout_ms=50, num_blocks=8) as batcher:
        futures = [batcher.submit(p, 6) for p in prompts[:3]]
        for f in futures:
            with pytest.raises(error, match=match):
                f.result(timeout=30)
        later = batcher.submit(prompts[3], 6).result(timeout=30)
        stats = batcher.stats()
    assert later.tokens == one_at_a_time(model, prompts[3:], [6])[0]
    assert stats.failed == 3 and stats.finished == 1 and stats.kv_blocks_used == 0 and stats.kv_blocks_reserved == 0


def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll ``condition`` every millisecond until it holds or ``timeout_s`` passes (the test's asserts
    then say what did not happen)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_close_drains_then_refuses_and_can_cancel_queued_requests(model: DeepseekModel) -> None:
    prompts = prompts_for(4, model.cfg.vocab_size)
    batcher = hal.AutoBatcher(model, max_batch_size=1, timeout_ms=0, num_blocks=4)
    futures = [batcher.submit(p, 3) for p in prompts[:2]]
    batcher.close()  # finishes what was queued
    assert [f.result(timeout=0).tokens for f in futures] == one_at_a_time(model, prompts[:2], [3, 3])
    with pytest.raises(BatcherClosedError):
        batcher.submit(prompts[2], 3)

    gate = threading.Event()  # holds the scheduler inside request 0's prefill until the queue is cancelled
    batcher = hal.AutoBatcher(RecordingModel(model, gate=gate), max_batch_size=1, timeout_ms=0, num_blocks=4)
    futures = [batcher.submit(p, 20) for p in prompts]
    _until(lambda: batcher.stats().running > 0)
    assert batcher.stats().running == 1 and batcher.stats().waiting == 3
    batcher.close(wait=False, cancel_pending=True)  # the queued ones are cancelled ...
    assert all(f.cancelled() for f in futures[1:])
    assert not wait(futures[1:], timeout=5).not_done  # ... and waiters see them done (cancel() alone: never)
    gate.set()
    batcher.close()  # ... and the running one finishes
    assert futures[0].result(timeout=0).tokens == one_at_a_time(model, prompts[:1], [20])[0]
    assert batcher.stats().cancelled == 3 and batcher.stats().finished == 1


def test_process_raises_cancelled_when_its_queued_requests_are_cancelled(model: DeepseekModel) -> None:
    gate = threading.Event()
    batcher = hal.AutoBatcher(RecordingModel(model, gate=gate), max_batch_size=1, timeout_ms=0, num_blocks=4)
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            batcher.process([Request([1, 2, 3], 4), Request([4, 5, 6], 4)])  # the second one waits
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    _until(lambda: batcher.stats().waiting > 0)
    batcher.close(wait=False, cancel_pending=True)
    gate.set()
    batcher.close()
    caller.join(timeout=30)
    assert not caller.is_alive(), "process() never returned"
    assert len(outcome) == 1 and isinstance(outcome[0], CancelledError)


def test_failing_a_queued_job_claims_its_future_in_one_step(model: DeepseekModel) -> None:
    # A caller may cancel a queued request at any moment, also while the batcher fails it (a give-up, a
    # crash): the batcher claims the future first, so a cancelled one is notified and counted, and a
    # pending one can no longer be cancelled between a check and set_exception (InvalidStateError).
    from hal.serving.batcher import _Job

    class CancelledOnClaim(Future[RequestResult]):
        def set_running_or_notify_cancel(self) -> bool:
            self.cancel()  # the caller's cancel lands just before the claim
            return super().set_running_or_notify_cancel()

    with hal.AutoBatcher(model, max_batch_size=1, num_blocks=4) as batcher:
        late, plain = _Job(10_000, [1], 2, frozenset(), None, 1), _Job(10_001, [1], 2, frozenset(), None, 1)
        late.future = CancelledOnClaim()
        batcher._fail(late, RuntimeError("gone"))
        batcher._fail(plain, RuntimeError("gone"))
        assert not wait([late.future, plain.future], timeout=5).not_done
        assert late.future.cancelled() and isinstance(plain.future.exception(), RuntimeError)
        stats = batcher.stats()
    assert stats.cancelled == 1 and stats.failed == 1


def test_futures_are_resolved_with_the_batcher_lock_released(model: DeepseekModel) -> None:
    gate = threading.Event()
    batcher = hal.AutoBatcher(RecordingModel(model, gate=gate), max_batch_size=1, timeout_ms=0, num_blocks=4)
    running, queued = batcher.submit([1, 2, 3], 2), batcher.submit([4, 5, 6], 2)
    seen: list[bool] = []

    def from_another_thread(_: Future[RequestResult]) -> None:
        # A done-callback that needs the batcher from another thread (a web server's event loop, say): it
        # only gets it if the future was resolved with the batcher's lock released.
        t = threading.Thread(target=batcher.stats)
        t.start()
        t.join(timeout=5)
        seen.append(not t.is_alive())

    queued.add_done_callback(from_another_thread)
    running.add_done_callback(from_another_thread)
    _until(lambda: batcher.stats().running > 0)
    batcher.close(wait=False, cancel_pending=True)
    gate.set()
    batcher.close()
    assert queued.cancelled() and len(running.result(timeout=0).tokens) == 2
    assert seen == [True, True]


def test_process_raises_the_first_error_only_once_every_request_has_ended(model: DeepseekModel) -> None:
    prompt = prompts_for(1, model.cfg.vocab_size)[0]
    with hal.AutoBatcher(model, max_batch_size=4, timeout_ms=0, num_blocks=2) as batcher:
        with pytest.raises(RequestTooLargeError):  # request 0 fails at once; request 1 runs 40 steps
            batcher.process([Request(list(range(100)), 60), Request(prompt, 40)])
        stats = batcher.stats()
        assert stats.running == 0 and stats.waiting == 0 and stats.finished == 1 and stats.rejected == 1


def test_a_tensor_or_expert_parallel_model_is_refused(model: DeepseekModel) -> None:
    for par in (ParallelConfig(tp=2), ParallelConfig(ep=2), ParallelConfig(tp=2, ep=2, rank=1)):
        parallel = RecordingModel(model)
        parallel.par = par  # type: ignore[attr-defined]  # what DeepseekModel(parallel=...) carries
        with pytest.raises(ValueError, match=r"tensor/expert parallel \(tp=\d, ep=\d\).*different batches"):
            hal.AutoBatcher(parallel, num_blocks=2)
    one = RecordingModel(model)
    one.par = ParallelConfig()  # type: ignore[attr-defined]  # tp = ep = 1: one process, served
    with hal.AutoBatcher(one, num_blocks=2) as batcher:
        assert len(batcher.submit([1, 2], 2).result(timeout=30).tokens) == 2


def test_generate_batched_gives_generate_s_tokens_greedy_and_sampled(model: DeepseekModel) -> None:
    prompts = prompts_for(5, model.cfg.vocab_size, seed=12)
    greedy = generate(model, prompts, max_new_tokens=7)
    eos = greedy.tokens[2][3]  # one sequence stops early, so the batch shrinks mid-way
    for kwargs in (
        {"eos_token_ids": [eos]},
        {"temperature": 0.9, "top_p": 0.8, "seed": 5, "eos_token_ids": [eos]},
    ):
        expected = generate(model, prompts, max_new_tokens=7, **kwargs)
        batched = generate_batched(model, prompts, max_new_tokens=7, **kwargs)
        assert batched.tokens == expected.tokens, kwargs
        assert batched.finish_reasons == expected.finish_reasons
        assert batched.prefill_tokens == expected.prefill_tokens and batched.decode_tokens == expected.decode_tokens
