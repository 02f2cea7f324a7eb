"""Continuous batching of generation requests: :class:`AutoBatcher` (``hal.AutoBatcher``).

Callers on any thread :meth:`~AutoBatcher.submit` a prompt and get a ``concurrent.futures.Future``;
one background scheduler thread owns the model and a paged KV cache and runs it in steps:

1. **Admit.** Waiting requests join the running batch in arrival order while there is room: fewer
   than ``max_batch_size`` sequences, and enough KV-cache blocks for the request's whole sequence
   (prompt plus ``max_new_tokens - 1`` tokens, the last token never being fed back). Blocks are
   budgeted ahead, at admission, so a running sequence can never run out of cache half-way: a request
   that does not fit waits (back-pressure) and is admitted as soon as finished sequences free enough
   blocks. Admission is strictly first-come-first-served, so a large request is never starved by
   small ones behind it. A request larger than the whole cache fails at once with
   :class:`~hal.serving.errors.RequestTooLargeError`.
2. **Prefill** the admitted prompts as one packed batch and choose each one's first token.
3. **Decode** one token for every running sequence, as one batch.
4. **Retire** finished sequences (end-of-sequence token or ``max_new_tokens``): their blocks go back to
   the cache and their futures get their :class:`RequestResult` at once; a waiting request takes the
   freed room at the next step (continuous batching).

When nothing is running, the first request to arrive opens a batching window of ``timeout_ms``:
requests arriving within it (up to ``max_batch_size``) are prefilled together. While sequences are
running, new requests join at the next step without waiting: holding them back would stall the
running batch.

Token choice and input checks are :mod:`hal.model.generate`'s (greedy ``argmax``, or temperature and
top-p sampling from a per-request generator seeded by the request's ``seed``), so a greedy request
gives the tokens :func:`hal.model.generate.generate` gives for the same prompt run on its own, wherever
the model computes the same logits for a sequence whatever batch it is in: verified on the CPU in fp32.
On a GPU, kernels (and their reduction orders) chosen by batch size can change the arithmetic, and so
the argmax of a near-tie.

With a :class:`~hal.serving.failover.Failover`, a device error in any model call marks the device
unhealthy, rebuilds the model on the next backend and re-prefills every in-flight request with its
prompt plus the tokens it already has; the requests go on from there (:attr:`AutoBatcher.failovers`
reports each event and its recovery time). Any other error fails the requests in flight at that step
(their futures get the exception) and the batcher goes on with the rest. Every future ends: a request
in flight stays tracked until it is resumed, finished or failed, so even a bug in the scheduler fails
it rather than leaving it waiting.

Futures are resolved (result, exception, cancellation) only with the batcher's lock released, so a
done-callback may call back into the batcher.

One process only: a tensor- or expert-parallel model is refused, since batches depend on when
requests arrive and every rank would form different ones (mismatched collectives).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from hal.model.generate import (
    GenerationResult,
    GenerativeModel,
    Sampler,
    check_eos,
    check_logits,
    check_prompts,
    check_sampling,
    check_seed,
    default_num_blocks,
    greedy,
)
from hal.ops.catalogue import KV_BLOCK_SIZE
from hal.serving.errors import BatcherClosedError, FailoverError, RequestTooLargeError
from hal.serving.failover import Failover, FailoverEvent
from hal.serving.health import DeviceHealth, default_book, health
from hal.serving.metrics import ServingMetrics, _NoMetrics, _nothing  # prometheus-client is imported on use

if TYPE_CHECKING:
    from hal.backend import Backend
    from hal.kvcache import PagedKVCache

__all__ = ["AutoBatcher", "BatcherStats", "Request", "RequestResult", "generate_batched"]

log = logging.getLogger("hal.serving")

#: Tokens per sequence the default cache is sized for (``max_batch_size`` sequences of this length, or
#: of ``max_position_embeddings`` when that is shorter).
DEFAULT_TOKENS_PER_SEQUENCE = 2048


@dataclass(frozen=True)
class Request:
    """One generation request, for :meth:`AutoBatcher.process` (:meth:`AutoBatcher.submit` takes the same
    fields as arguments).

    :param prompt_ids: the prompt's token ids (not empty).
    :param max_new_tokens: the most tokens to generate (0 runs the prefill only).
    :param temperature: 0 is greedy; above 0 samples from ``softmax(logits / temperature)``.
    :param top_p: nucleus sampling mass, in ``(0, 1]``.
    :param seed: seeds this request's sampler (``None``: a fresh seed).
    :param eos_token_ids: ids that end the sequence; ``None`` takes the model config's.
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    eos_token_ids: Sequence[int] | None = None


@dataclass(frozen=True)
class RequestResult:
    """What one request produced, and its timings (seconds, from :meth:`AutoBatcher.submit`).

    :ivar tokens: the generated ids (an end-of-sequence token that stopped it is the last one).
    :ivar prompt_length: tokens in the prompt.
    :ivar finish_reason: ``"eos"`` or ``"length"``.
    :ivar queue_seconds: until its prefill started (waiting for a batch, or for KV-cache room).
    :ivar time_to_first_token_seconds: until its first token was chosen (``None`` without one).
    :ivar latency_seconds: until it finished.
    :ivar failovers: failovers it lived through (and was resumed after).
    :ivar backend: the backend that produced its last token.
    """

    tokens: list[int]
    prompt_length: int
    finish_reason: str
    queue_seconds: float
    time_to_first_token_seconds: float | None
    latency_seconds: float
    failovers: int
    backend: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BatcherStats:
    """Counters since the batcher started (:meth:`AutoBatcher.stats`).

    :ivar prefill_seconds: / :ivar decode_seconds: wall time inside the model's prefill / decode calls,
        token choice included.
    :ivar prefill_calls: / :ivar prefill_tokens: prefills of admitted requests and their prompt tokens
        (re-prefills after a failover are not among them: see ``reprefill_tokens``).
    :ivar decode_tokens: tokens produced by decode steps (one per sequence per step).
    :ivar generated_tokens: every token returned to requests (decode tokens plus first tokens).
    :ivar largest_batch: the most sequences one decode step ran.
    :ivar reprefill_tokens: prompt and generated tokens prefilled again on a new backend to resume the
        in-flight requests after failovers (the ``resumed_tokens`` of every :attr:`AutoBatcher.failovers`).
    """

    submitted: int
    finished: int
    failed: int
    rejected: int
    cancelled: int
    running: int
    waiting: int
    prefill_calls: int
    decode_steps: int
    prefill_tokens: int
    decode_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    largest_batch: int
    kv_blocks_used: int
    kv_blocks_reserved: int
    kv_blocks_total: int
    failovers: int
    reprefill_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Job:
    """One request inside the scheduler."""

    __slots__ = (
        "blocks",
        "done",
        "eos",
        "failovers",
        "first_token_at",
        "future",
        "id",
        "prompt",
        "row",
        "sampler",
        "started_at",
        "steps",
        "submitted_at",
        "tokens",
    )

    def __init__(
        self,
        job_id: int,
        prompt: list[int],
        steps: int,
        eos: frozenset[int],
        sampler: Sampler | None,
        blocks: int,
        row: int = 0,
    ) -> None:
        self.id = job_id
        self.prompt = prompt
        self.steps = steps
        self.eos = eos
        # None: greedy, chosen for the whole batch at once. Jobs may share one sampler
        # (generate_batched): it then draws once per step for all of its rows, as generate() does;
        # ``row`` is the job's place in the sampler's batch (0 for a request's own sampler).
        self.sampler = sampler
        self.row = row
        self.blocks = blocks
        self.future: Future[RequestResult] = Future()
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.tokens: list[int] = []
        self.failovers = 0
        self.done = False


def _check_single_process(model: GenerativeModel) -> None:
    """Refuse a tensor- or expert-parallel model (one whose ``par`` has ``tp`` or ``ep`` above 1).

    Its ranks must make the same model calls in the same order, but an AutoBatcher's batches depend on
    when requests arrive: each rank's batcher would form different ones and the collectives would
    mismatch (a hang, or wrong results).
    """
    par = getattr(model, "par", None)
    tp, ep = getattr(par, "tp", 1), getattr(par, "ep", 1)
    if tp > 1 or ep > 1:
        raise ValueError(
            f"AutoBatcher: the model is tensor/expert parallel (tp={tp}, ep={ep}); batches depend on when "
            "requests arrive, so every rank would form different batches and their collectives would not "
            "match. Serve a single-process model (tp = ep = 1), or run the parallel model through "
            "hal.model.generate.generate, which every rank calls with the same prompts"
        )


class AutoBatcher:
    """Serve generation requests from many threads through one model, batched continuously.

    :param model: a :class:`~hal.model.deepseek.DeepseekModel` (anything
        :func:`hal.model.generate.generate` takes). Only the scheduler thread calls it.
    :param max_batch_size: the most sequences running at once.
    :param timeout_ms: the batching window when idle: how long the first request of a batch waits for
        others to join its prefill.
    :param num_blocks: KV-cache blocks of 64 tokens. ``None``: room for ``max_batch_size`` sequences of
        ``min(max_position_embeddings, 2048)`` tokens.
    :param failover: what to do when a device fails (``None``: fail the in-flight requests).
    :param metrics: ``True`` for Prometheus metrics in a registry of their own
        (:attr:`metrics`), or a :class:`~hal.serving.metrics.ServingMetrics` to record into (whose
        HTTP server, if it serves, stays the caller's: it outlives the batcher).
    :param metrics_port: serve the metrics over HTTP on this port (0: a free one; the port bound is
        :attr:`metrics_port`) until the batcher is closed; implies ``metrics``.
    :param metrics_addr: the address to bind (default loopback only; ``"0.0.0.0"`` for a Prometheus
        elsewhere).
    :param op_metrics: also time every op (implies ``metrics``; off by default, and then it costs
        nothing). With a ``ServingMetrics`` passed as ``metrics``, that object's own ``op_metrics``
        decides, and ``op_metrics=True`` requires it to be on.
    :raises ValueError: a bad size or timeout; ``op_metrics=True`` with a ``ServingMetrics`` built
        without it; a tensor- or expert-parallel model (``model.par`` with ``tp`` or ``ep`` above 1).
    :raises hal.serving.errors.MetricsUnavailableError: metrics asked for without prometheus-client.

    Example::

        with hal.AutoBatcher(model, max_batch_size=32, timeout_ms=50) as batcher:
            future = batcher.submit([1, 2, 3], max_new_tokens=16)     # from any thread
            print(future.result().tokens)
            results = batcher.process([Request([4, 5], 8), Request([6], 8)])
    """

    def __init__(
        self,
        model: GenerativeModel,
        max_batch_size: int = 32,
        timeout_ms: float = 50.0,
        *,
        num_blocks: int | None = None,
        failover: Failover | None = None,
        metrics: bool | ServingMetrics = False,
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
        op_metrics: bool = False,
    ) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"AutoBatcher: max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int | float) or not timeout_ms >= 0:
            raise ValueError(f"AutoBatcher: timeout_ms must be a number >= 0, got {timeout_ms!r}")
        cfg = model.cfg
        if num_blocks is None:
            tokens = min(cfg.max_position_embeddings, DEFAULT_TOKENS_PER_SEQUENCE)
            num_blocks = max_batch_size * -(-tokens // KV_BLOCK_SIZE)
        elif isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"AutoBatcher: num_blocks must be an int >= 1, got {num_blocks!r}")
        if failover is not None and not isinstance(failover, Failover):
            raise TypeError(f"AutoBatcher: failover must be a hal.serving.Failover, got {type(failover).__name__}")
        _check_single_process(model)
        if op_metrics and not isinstance(metrics, bool) and not metrics.op_metrics:
            raise ValueError(
                "AutoBatcher: op_metrics=True, but the ServingMetrics passed as metrics was built without "
                "per-op metrics; build it with ServingMetrics(op_metrics=True), or drop op_metrics"
            )
        self.max_batch_size = max_batch_size
        self.timeout_s = float(timeout_ms) / 1000.0
        self.num_blocks = num_blocks
        self._failover = failover
        self._model = model
        self._cache: PagedKVCache = model.new_cache(num_blocks)
        self._block_size = self._cache.block_size

        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._reserved = 0  # blocks promised to running sequences (admission budget)
        self._next_id = 0
        self._closing = False
        self._fatal: BaseException | None = None
        self._events: list[FailoverEvent] = []
        self._counts = dict.fromkeys(
            (
                "submitted",
                "finished",
                "failed",
                "rejected",
                "cancelled",
                "prefill_calls",
                "decode_steps",
                "prefill_tokens",
                "decode_tokens",
                "generated_tokens",
                "largest_batch",
                "reprefill_tokens",
            ),
            0,
        )
        self._seconds = {"prefill": 0.0, "decode": 0.0}

        self._metrics: ServingMetrics | _NoMetrics = _NoMetrics()
        #: The port the metrics are served on (the one bound when ``metrics_port`` is 0); ``None`` when
        #: this batcher serves none.
        self.metrics_port: int | None = None
        self._owns_server = False
        self._unwrap_ops: Callable[[], None] = _nothing
        try:
            # Ops are wrapped before the server starts, and both are undone on any failure below: a
            # constructor that raises leaves no server bound and no backend wrapped.
            if metrics is not False or metrics_port is not None or op_metrics:
                m = self._make_metrics(metrics, op_metrics, failover)
                self._metrics = m
                self._unwrap_ops = m.instrument(model.backend)
                m.set_load(0, 0, 0, 0, num_blocks)
                if metrics_port is not None:
                    self.metrics_port = m.serve(metrics_port, metrics_addr)
                    self._owns_server = True
                    log.info("AutoBatcher: metrics on http://%s:%d/metrics", metrics_addr, self.metrics_port)
            self._thread = threading.Thread(target=self._run, name="hal-autobatcher", daemon=True)
            self._thread.start()
        except BaseException:
            self._unwrap_ops()
            if self._owns_server:
                self._metrics.close()
            raise

    def _make_metrics(
        self, metrics: bool | ServingMetrics, op_metrics: bool, failover: Failover | None
    ) -> ServingMetrics:
        m = metrics if isinstance(metrics, ServingMetrics) else ServingMetrics(op_metrics=op_metrics)
        registry = failover.registry if failover is not None else None
        book = failover.book if failover is not None else default_book()

        def read_health() -> list[DeviceHealth]:
            return health(registry, book=book)

        m.bind(lambda: self._model.backend, read_health)
        return m

    # ------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------

    @property
    def model(self) -> GenerativeModel:
        """The model serving now (another one after a failover)."""
        return self._model

    @property
    def backend(self) -> Backend:
        """The backend serving now."""
        return self._model.backend

    @property
    def metrics(self) -> ServingMetrics | None:
        """The Prometheus metrics, ``None`` when off."""
        return None if isinstance(self._metrics, _NoMetrics) else self._metrics

    @property
    def failovers(self) -> list[FailoverEvent]:
        """Every failover so far, oldest first, each with its recovery time."""
        with self._cond:
            return list(self._events)

    def submit(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        eos_token_ids: Sequence[int] | None = None,
    ) -> Future[RequestResult]:
        """Queue one request; thread-safe. See :class:`Request` for the arguments.

        :returns: a future for its :class:`RequestResult`. It fails with
            :class:`~hal.serving.errors.RequestTooLargeError` when the request needs more KV-cache blocks
            than the cache has, with the model's error when a model call fails, with
            :class:`~hal.serving.errors.FailoverError` when a device failed and no backend could take
            over. A queued request can be cancelled with ``future.cancel()``.
        :raises hal.model.generate.GenerationError: bad input (checked here, before queueing).
        :raises hal.serving.errors.BatcherClosedError: the batcher is closed.
        """
        job = self._job(Request(prompt_ids, max_new_tokens, temperature, top_p, seed, eos_token_ids))
        self._enqueue([job])
        return job.future

    def process(self, requests: Sequence[Request | Sequence[int]], **defaults: Any) -> list[RequestResult]:
        """Run ``requests`` (all queued at once, so they can share batches) and wait for their results.

        :param requests: :class:`Request` objects, or bare prompts (token-id lists) that take their other
            fields from ``defaults`` (``max_new_tokens`` is required for them).
        :returns: one :class:`RequestResult` per request, in order, once every request has finished.
        :raises: the first failed request's error (in request order, e.g.
            :class:`~hal.serving.errors.RequestTooLargeError`), only after every request has ended, so
            none is still running when it raises; the others' results are then not returned (submit
            them one by one to get each request's own outcome). ``concurrent.futures.CancelledError``
            when a request was cancelled (``close(cancel_pending=True)`` from another thread).
        :raises hal.model.generate.GenerationError: bad input in any request (nothing is queued then).
        """
        checked = []
        for i, r in enumerate(requests):
            if not isinstance(r, Request):
                if "max_new_tokens" not in defaults:
                    raise TypeError(
                        f"AutoBatcher.process: request {i} is a bare prompt; pass max_new_tokens=N "
                        "(or hal.serving.Request objects)"
                    )
                r = Request(r, **defaults)
            checked.append(r)
        return self._process(checked)

    def _process(
        self, requests: Sequence[Request], sampler: Sampler | None = None, where: str = "AutoBatcher.process"
    ) -> list[RequestResult]:
        """:meth:`process` of checked-to-be :class:`Request` objects; ``sampler``: one sampler shared by
        every sampled request (:func:`generate_batched`)."""
        # Every request is checked before any is queued; an error names the request.
        jobs = [self._job(r, sampler, i, f"{where}: request {i}") for i, r in enumerate(requests)]
        self._enqueue(jobs)
        futures = [job.future for job in jobs]
        wait(futures)  # all of them, failed ones included: nothing of this call is left running
        for future in futures:
            exc = future.exception()  # raises CancelledError for a cancelled one
            if exc is not None:
                raise exc
        return [future.result() for future in futures]

    def stats(self) -> BatcherStats:
        """A consistent snapshot of the counters."""
        with self._cond:
            c = self._counts
            return BatcherStats(
                submitted=c["submitted"],
                finished=c["finished"],
                failed=c["failed"],
                rejected=c["rejected"],
                cancelled=c["cancelled"],
                running=len(self._running),
                waiting=len(self._waiting),
                prefill_calls=c["prefill_calls"],
                decode_steps=c["decode_steps"],
                prefill_tokens=c["prefill_tokens"],
                decode_tokens=c["decode_tokens"],
                generated_tokens=c["generated_tokens"],
                prefill_seconds=self._seconds["prefill"],
                decode_seconds=self._seconds["decode"],
                largest_batch=c["largest_batch"],
                kv_blocks_used=self._cache.num_used_blocks,
                kv_blocks_reserved=self._reserved,
                kv_blocks_total=self.num_blocks,
                failovers=len(self._events),
                reprefill_tokens=c["reprefill_tokens"],
            )

    def close(self, *, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop accepting requests; finish the queued and running ones (or cancel the queued ones).

        :param wait: block until the scheduler has stopped.
        :param cancel_pending: cancel requests not yet admitted instead of running them.
        """
        cancelled: list[_Job] = []
        with self._cond:
            self._closing = True
            if cancel_pending:
                # Waiting jobs are never running, so each cancel below succeeds; taken off the queue here,
                # they are cancelled once the lock is released (their done-callbacks may use the batcher).
                cancelled = list(self._waiting)
                self._waiting.clear()
                self._counts["cancelled"] += len(cancelled)
                self._metrics.set_load(
                    len(self._running), 0, self._cache.num_used_blocks, self._reserved, self.num_blocks
                )
            self._cond.notify_all()
        for job in cancelled:
            job.future.cancel()
            # cancel() alone wakes no waiter: concurrent.futures.wait() (and process()) would never
            # count the future as done. This does, once, for a future no one else will touch.
            job.future.set_running_or_notify_cancel()
        if cancelled:
            self._metrics.observe_outcome("cancelled", len(cancelled))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> AutoBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<hal.AutoBatcher on {self.backend.name} ({self.backend.device}): {s.running} running, "
            f"{s.waiting} waiting, KV blocks {s.kv_blocks_used}/{s.kv_blocks_total}, {s.failovers} failovers>"
        )

    # ------------------------------------------------------------------------------------------
    # Submission (caller threads)
    # ------------------------------------------------------------------------------------------

    def _job(self, r: Request, shared: Sampler | None = None, row: int = 0, where: str = "AutoBatcher.submit") -> _Job:
        """``r`` checked, as a job; ``shared``: the sampler of a batch of requests, ``row`` ``r``'s place in
        it; ``where`` starts the error messages."""
        cfg = self._model.cfg
        steps, temperature, top_p = check_sampling(r.max_new_tokens, r.temperature, r.top_p, where=where)
        prompt = check_prompts([r.prompt_ids], cfg, steps, where=where)[0]
        eos = check_eos(r.eos_token_ids, cfg, where=where)
        seed = check_seed(r.seed, where=where)
        if temperature == 0:
            sampler = None
        else:
            sampler = shared if shared is not None else Sampler(temperature, top_p, seed)
        # Tokens the cache holds at the end: the prompt, then one per decode step (the last token is
        # returned, never fed back).
        cached = len(prompt) + max(steps - 1, 0)
        blocks = -(-cached // self._block_size)
        with self._cond:
            job_id = self._next_id
            self._next_id += 1
        return _Job(job_id, prompt, steps, eos, sampler, blocks, row if sampler is shared else 0)

    def _enqueue(self, jobs: list[_Job]) -> None:
        failed: list[tuple[_Job, BaseException]] = []
        rejected: list[_Job] = []
        with self._cond:
            if self._closing:
                raise BatcherClosedError("AutoBatcher is closed; create a new one to submit requests")
            for job in jobs:
                self._counts["submitted"] += 1
                if self._fatal is not None:
                    failed.append((job, self._fatal))
                elif job.blocks > self.num_blocks:
                    self._counts["rejected"] += 1
                    rejected.append(job)
                else:
                    self._waiting.append(job)
            self._metrics.set_load(
                len(self._running), len(self._waiting), self._cache.num_used_blocks, self._reserved, self.num_blocks
            )
            self._cond.notify_all()
        # Resolved with the lock released: a done-callback may call back into the batcher.
        for job, exc in failed:
            self._fail(job, exc)
        for job in rejected:
            self._metrics.observe_outcome("rejected")
            job.future.set_exception(
                RequestTooLargeError(
                    f"AutoBatcher.submit: the request needs {job.blocks} KV-cache blocks of "
                    f"{self._block_size} tokens ({len(job.prompt)} prompt tokens + {job.steps} new), "
                    f"but the cache has {self.num_blocks} in all, so it could never run; shorten it, "
                    "lower max_new_tokens, or build the AutoBatcher with more num_blocks"
                )
            )

    # ------------------------------------------------------------------------------------------
    # The scheduler (its own thread)
    # ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                admitted = self._next_admissions()
                if admitted is None:
                    break
                self._step(admitted)
        except BaseException as exc:  # a bug in the scheduler itself: no caller may wait forever
            log.exception("AutoBatcher scheduler crashed")
            with self._cond:
                self._fatal = exc
                doomed = list(self._running) + list(self._waiting)
                self._running.clear()
                self._waiting.clear()
                self._closing = True
            for job in doomed:
                self._fail(job, exc)
            raise
        finally:
            self._unwrap_ops()
            if self._owns_server:
                self._metrics.close()

    def _next_admissions(self) -> list[_Job] | None:
        """Wait for work; admit what fits. ``None`` when closed and drained."""
        with self._cond:
            while True:
                if not self._running:
                    if not self._waiting:
                        if self._closing:
                            return None
                        self._cond.wait()
                        continue
                    # Idle: the first waiting request opens the batching window.
                    deadline = self._waiting[0].submitted_at + self.timeout_s
                    while len(self._waiting) < self.max_batch_size and not self._closing:
                        remaining = deadline - time.perf_counter()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                admitted = self._admit()
                if admitted or self._running:
                    return admitted

    def _admit(self) -> list[_Job]:
        """Waiting requests that fit now, in arrival order (called with the lock held)."""
        admitted: list[_Job] = []
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            job = self._waiting[0]
            if not job.future.cancelled() and self._reserved + job.blocks > self.num_blocks:
                break  # back-pressure: it waits for blocks; nobody overtakes it
            self._waiting.popleft()
            if not job.future.set_running_or_notify_cancel():
                self._counts["cancelled"] += 1
                self._metrics.observe_outcome("cancelled")
                continue
            self._reserved += job.blocks
            job.started_at = time.perf_counter()
            admitted.append(job)
        return admitted

    def _step(self, admitted: list[_Job]) -> None:
        try:
            if admitted:
                self._running.extend(admitted)
                self._prefill(admitted)
            if self._running:
                self._decode(list(self._running))
        except Exception as exc:  # a model call failed: fail over or fail the requests it touched
            self._on_error(exc)
        with self._cond:
            self._metrics.set_load(
                len(self._running), len(self._waiting), self._cache.num_used_blocks, self._reserved, self.num_blocks
            )

    def _prefill(self, jobs: list[_Job]) -> None:
        t0 = time.perf_counter()
        ids = [j.id for j in jobs]
        logits = check_logits(self._model.prefill(self._cache, ids, [j.prompt for j in jobs]), ids, "prefill")
        going = [j for j in jobs if j.steps > 0]
        for j in jobs:
            if j.steps == 0:  # prefill only
                self._finish(j, "length")
        if going:
            rows = [i for i, j in enumerate(jobs) if j.steps > 0]
            self._advance(going, self._choose(logits[rows] if len(rows) < len(jobs) else logits, going))
        else:
            self._running = [j for j in self._running if not j.done]
        seconds = time.perf_counter() - t0
        prompt_tokens = sum(len(j.prompt) for j in jobs)
        with self._cond:
            self._counts["prefill_calls"] += 1
            self._counts["prefill_tokens"] += prompt_tokens
            self._seconds["prefill"] += seconds
        self._metrics.observe_prefill(len(jobs), prompt_tokens, seconds)

    def _decode(self, jobs: list[_Job]) -> None:
        t0 = time.perf_counter()
        ids = [j.id for j in jobs]
        logits = check_logits(self._model.decode(self._cache, ids, [j.tokens[-1] for j in jobs]), ids, "decode")
        self._advance(jobs, self._choose(logits, jobs))
        seconds = time.perf_counter() - t0
        with self._cond:
            self._counts["decode_steps"] += 1
            self._counts["decode_tokens"] += len(jobs)
            self._counts["largest_batch"] = max(self._counts["largest_batch"], len(jobs))
            self._seconds["decode"] += seconds
        self._metrics.observe_decode(len(jobs), seconds)

    @staticmethod
    def _choose(logits: torch.Tensor, jobs: list[_Job]) -> list[int]:
        """One token per row: greedy rows in one ``argmax``; sampled rows with their sampler, one call per
        sampler over all of its rows in order (a request's own sampler: its row alone)."""
        if all(j.sampler is None for j in jobs):
            return greedy(logits)
        groups: dict[int, tuple[Sampler | None, list[int]]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(id(job.sampler), (job.sampler, []))[1].append(i)
        chosen = [0] * len(jobs)
        for sampler, rows in groups.values():
            part = logits if len(rows) == len(jobs) else logits[rows]
            chosen_part = greedy(part) if sampler is None else sampler(part, [jobs[i].row for i in rows])
            for i, t in zip(rows, chosen_part, strict=True):
                chosen[i] = t
        return chosen

    def _advance(self, jobs: list[_Job], chosen: list[int]) -> None:
        """Append each sequence's token; retire those that are done."""
        now = time.perf_counter()
        for job, token in zip(jobs, chosen, strict=True):
            job.tokens.append(token)
            if job.first_token_at is None:
                job.first_token_at = now
            if token in job.eos:
                self._finish(job, "eos")
            elif len(job.tokens) >= job.steps:
                self._finish(job, "length")
        with self._cond:
            self._counts["generated_tokens"] += len(jobs)
        self._metrics.observe_tokens(len(jobs))
        self._running = [j for j in self._running if not j.done]

    def _finish(self, job: _Job, reason: str) -> None:
        job.done = True
        if job.id in self._cache:  # not after a failover that finished it before any re-prefill
            self._cache.free(job.id)  # its blocks serve the next admissions at once
        now = time.perf_counter()
        started = job.started_at if job.started_at is not None else now
        result = RequestResult(
            tokens=list(job.tokens),
            prompt_length=len(job.prompt),
            finish_reason=reason,
            queue_seconds=started - job.submitted_at,
            time_to_first_token_seconds=None if job.first_token_at is None else job.first_token_at - job.submitted_at,
            latency_seconds=now - job.submitted_at,
            failovers=job.failovers,
            backend=self._model.backend.name,
        )
        with self._cond:
            self._reserved -= job.blocks
            self._counts["finished"] += 1
            self._cond.notify_all()
        self._metrics.observe_finished(result.queue_seconds, result.time_to_first_token_seconds, result.latency_seconds)
        job.future.set_result(result)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        job.done = True
        # A job never admitted may be cancelled by its caller at any moment: claim its future in one step
        # (a cancelled one is then notified, as cancel() alone wakes no waiter; a pending one can no
        # longer be cancelled between a check and set_exception).
        if job.started_at is None and not job.future.set_running_or_notify_cancel():
            with self._cond:
                self._counts["cancelled"] += 1
            self._metrics.observe_outcome("cancelled")
            return
        if job.future.done():
            return
        with self._cond:
            self._counts["failed"] += 1
        self._metrics.observe_outcome("failed")
        job.future.set_exception(exc)

    # ------------------------------------------------------------------------------------------
    # Errors and failover (scheduler thread)
    # ------------------------------------------------------------------------------------------

    def _on_error(self, exc: Exception) -> None:
        # The jobs in flight stay in self._running until each is resumed, finished or failed: should
        # anything escape from here, the scheduler's crash handler still finds (and fails) them.
        inflight = [j for j in self._running if not j.done]
        failover = self._failover
        try:
            if failover is not None and failover.is_device_error(exc):
                self._recover(failover, exc, inflight)
                return
        except FailoverError as fatal:
            log.error("AutoBatcher: %s", fatal)
            self._give_up(fatal, inflight)
            return
        except Exception as other:  # the new backend failed otherwise, or the predicate itself raised
            log.error("AutoBatcher: while handling %s: %s", type(exc).__name__, exc, exc_info=other)
            exc = other
        doomed = [j for j in inflight if not j.done]
        log.warning("AutoBatcher: %d in-flight request(s) failed: %s: %s", len(doomed), type(exc).__name__, exc)
        for job in doomed:
            if job.id in self._cache:
                self._cache.free(job.id)
            with self._cond:
                self._reserved -= job.blocks
            self._fail(job, exc)
        self._running = [j for j in self._running if not j.done]

    def _give_up(self, fatal: FailoverError, inflight: list[_Job]) -> None:
        """No backend left: fail everything, now and later; the cache keeps no block."""
        with self._cond:
            self._fatal = fatal
            doomed = inflight + list(self._waiting)
            self._waiting.clear()
            for job in inflight:
                if job.id in self._cache:
                    self._cache.free(job.id)
            self._reserved = 0
        for job in doomed:
            self._fail(job, fatal)
        self._running = []

    def _recover(self, failover: Failover, exc: Exception, inflight: list[_Job]) -> None:
        t0 = time.perf_counter()
        first = self._model.backend
        failed, error = first, exc
        skipped: list[str] = []
        while True:
            self._unwrap_ops()
            self._unwrap_ops = _nothing
            model, passed = failover.replace(failed, error)  # raises FailoverError when none is left
            skipped += passed
            rebuilt = time.perf_counter()
            cache = model.new_cache(self.num_blocks)
            with self._cond:
                self._model, self._cache = model, cache
            self._unwrap_ops = self._metrics.instrument(model.backend)
            try:
                resumed_tokens = self._resume(inflight)
            except Exception as again:
                if not failover.is_device_error(again):
                    raise
                skipped.append(f"{model.backend.name}: {type(again).__name__}: {again} (while resuming)")
                failed, error = model.backend, again
                continue
            break
        done = time.perf_counter()
        event = FailoverEvent(
            from_backend=first.name,
            from_device=str(first.device),
            to_backend=model.backend.name,
            to_device=str(model.backend.device),
            error=f"{type(exc).__name__}: {exc}",
            rebuild_seconds=rebuilt - t0,
            resume_seconds=done - rebuilt,
            recovery_seconds=done - t0,
            resumed_requests=len(inflight),
            resumed_tokens=resumed_tokens,
            skipped=tuple(skipped),
        )
        with self._cond:
            self._events.append(event)
        self._metrics.observe_failover(event)
        log.warning(
            "AutoBatcher: failed over from %s (%s) to %s (%s) after %s; %d request(s) resumed, recovered in %.3f s",
            event.from_backend,
            event.from_device,
            event.to_backend,
            event.to_device,
            event.error,
            event.resumed_requests,
            event.recovery_seconds,
        )

    def _resume(self, jobs: list[_Job]) -> int:
        """Carry ``jobs`` over to the new model: a prefill-only job (``max_new_tokens=0``) caught in its
        prefill is finished at once, with no token; every other one gets its prompt and generated tokens
        (all but the last, which the next decode step feeds) re-prefilled into the new cache, and those
        that had no token yet get their first one from that prefill.

        :returns: tokens re-prefilled.
        """
        for j in jobs:
            if j.steps == 0 and not j.done:
                j.failovers += 1
                self._finish(j, "length")
        going = [j for j in jobs if not j.done]
        if not going:
            self._running = []
            return 0
        contexts = [j.prompt + j.tokens[:-1] for j in going]
        logits = self._model.prefill(self._cache, [j.id for j in going], contexts)
        # Only once the prefill succeeded: a failure above leaves every job as it was.
        device = self._model.backend.device
        for j in going:
            j.failovers += 1
            if j.sampler is not None:
                j.sampler.to(device)  # a shared sampler moves once; the next calls find it there
        self._running = list(going)
        fresh = [i for i, j in enumerate(going) if not j.tokens]
        if fresh:
            part = logits if len(fresh) == len(going) else logits[fresh]
            self._advance([going[i] for i in fresh], self._choose(part, [going[i] for i in fresh]))
        tokens = sum(len(c) for c in contexts)
        with self._cond:
            self._counts["reprefill_tokens"] += tokens
        return tokens


def generate_batched(
    model: GenerativeModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    eos_token_ids: Sequence[int] | None = None,
    **batcher_kwargs: Any,
) -> GenerationResult:
    """:func:`hal.model.generate.generate`'s job done through an :class:`AutoBatcher` (with its metrics,
    failover and so on, per ``batcher_kwargs``), returned as a
    :class:`~hal.model.generate.GenerationResult`.

    The tokens are :func:`~hal.model.generate.generate`'s, sampled ones included: every prompt runs in
    one batch (by default ``max_batch_size`` is the number of prompts and ``num_blocks`` the cache
    ``generate`` makes) and the sampled requests share one sampler seeded ``seed``, which draws one number
    per prompt at each step, as ``generate``'s does. A smaller
    ``max_batch_size`` or ``num_blocks`` in ``batcher_kwargs`` splits the batch: greedy tokens stay the
    same, sampled ones are then reproducible but not ``generate``'s.
    """
    steps, temperature, top_p = check_sampling(max_new_tokens, temperature, top_p, where="generate_batched")
    checked = check_prompts(prompts, model.cfg, steps, where="generate_batched")
    seed = check_seed(seed, where="generate_batched")
    sampler = None if temperature == 0 else Sampler(temperature, top_p, seed, rows=len(checked))
    batcher_kwargs.setdefault("max_batch_size", len(checked))
    batcher_kwargs.setdefault("num_blocks", default_num_blocks(checked, steps))
    with AutoBatcher(model, **batcher_kwargs) as batcher:
        requests = [Request(p, max_new_tokens, temperature, top_p, seed, eos_token_ids) for p in checked]
        results = batcher._process(requests, sampler, "generate_batched")
        stats = batcher.stats()
        backend = batcher.backend
    return GenerationResult(
        tokens=[r.tokens for r in results],
        prompt_lengths=[r.prompt_length for r in results],
        finish_reasons=[r.finish_reason for r in results],
        prefill_seconds=stats.prefill_seconds,
        decode_seconds=stats.decode_seconds,
        prefill_tokens=stats.prefill_tokens,
        decode_tokens=stats.decode_tokens,
        peak_memory_bytes=backend.memory_stats().peak,
    )
