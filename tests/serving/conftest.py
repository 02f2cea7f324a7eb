"""Shared pieces of the serving tests: the tiny model on an explicit ``cpu`` registry, a model wrapper
that records every call the batcher makes, and the one-at-a-time greedy oracle."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import hal
import hal_cpu
from hal.kvcache import PagedKVCache
from hal.model import DeepseekModel, random_state_dict, tiny_config
from hal.model.config import ModelConfig
from hal.model.generate import generate
from hal.serving import FaultInjectionPlugin


def cpu_registry() -> hal.Registry:
    return hal.Registry(entry_points=False, plugins=[("cpu", hal_cpu)])


#: Failover candidates of the tests: ``flaky`` first, then ``cpu``, named (the reference backend is never a
#: default candidate).
FLAKY_THEN_CPU = ("flaky", "cpu")


def flaky_registry(fail_after: int | None) -> tuple[hal.Registry, FaultInjectionPlugin]:
    """``cpu`` plus ``flaky`` (priority 10, so selected first): cpu's ops, failing after ``fail_after``
    compute ops like a lost device. An explicit registry: nothing global is touched."""
    flaky = FaultInjectionPlugin(lambda: cpu_registry().get_backend("cpu"), fail_after=fail_after)
    return hal.Registry(entry_points=False, plugins=[("cpu", hal_cpu), ("flaky", flaky)]), flaky


@pytest.fixture(scope="session")
def cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def weights(cfg: ModelConfig) -> dict[str, Any]:
    return dict(random_state_dict(cfg, seed=0))


@pytest.fixture(scope="session")
def cpu() -> hal.Backend:
    return cpu_registry().get_backend("cpu")


@pytest.fixture(scope="session")
def model(cfg: ModelConfig, cpu: hal.Backend, weights: dict[str, Any]) -> DeepseekModel:
    return DeepseekModel(cfg, cpu, weights)


def prompts_for(n: int, vocab: int, *, seed: int = 1) -> list[list[int]]:
    """``n`` seeded prompts of 2 to 40 tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2 + (7 * i) % 39,), generator=g).tolist() for i in range(n)]


def one_at_a_time(model: Any, prompts: Sequence[Sequence[int]], new_tokens: Sequence[int], **kwargs: Any) -> list:
    """The oracle: each prompt through ``hal.model.generate.generate`` on its own."""
    return [
        generate(model, [p], max_new_tokens=n, **kwargs).tokens[0] for p, n in zip(prompts, new_tokens, strict=True)
    ]


@dataclass(frozen=True)
class Call:
    """One model call the batcher made: which sequences, and what the cache held just before."""

    kind: str  # "prefill" or "decode"
    seq_ids: tuple[Hashable, ...]
    in_cache: int  # sequences in the cache before the call
    used_blocks: int  # cache blocks in use before the call


class RecordingModel:
    """Wraps a model; records every ``prefill`` / ``decode`` call (thread-safe to read).

    :param fail_on_decode: raise a (non-device) RuntimeError on this decode call (1-based).
    :param nan_on_decode: return NaN logits from this decode call (1-based), as a model with broken
        weights would.
    :param gate: when given, every model call waits for it to be set (at most 60 s), so a test can hold
        the scheduler inside a call.
    """

    def __init__(
        self,
        inner: Any,
        *,
        fail_on_decode: int | None = None,
        nan_on_decode: int | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.inner = inner
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self.fail_on_decode = fail_on_decode
        self.nan_on_decode = nan_on_decode
        self.gate = gate
        self._decodes = 0
        self._seen: set[Hashable] = set()

    @property
    def cfg(self) -> ModelConfig:
        return self.inner.cfg

    @property
    def backend(self) -> hal.Backend:
        return self.inner.backend

    def new_cache(self, num_blocks: int) -> PagedKVCache:
        return self.inner.new_cache(num_blocks)

    def _record(self, kind: str, cache: PagedKVCache, seq_ids: Sequence[Hashable]) -> None:
        with self._lock:
            in_cache = sum(1 for s in self._seen if s in cache)
            self.calls.append(Call(kind, tuple(seq_ids), in_cache, cache.num_used_blocks))
            self._seen.update(seq_ids)
        if self.gate is not None and not self.gate.wait(60):
            raise RuntimeError("RecordingModel: the test never opened the gate")

    def prefill(self, cache: PagedKVCache, seq_ids: Sequence[Hashable], prompts: Sequence[Sequence[int]]) -> Any:
        self._record("prefill", cache, seq_ids)
        return self.inner.prefill(cache, seq_ids, prompts)

    def decode(self, cache: PagedKVCache, seq_ids: Sequence[Hashable], tokens: Sequence[int]) -> Any:
        self._record("decode", cache, seq_ids)
        self._decodes += 1
        if self.fail_on_decode is not None and self._decodes == self.fail_on_decode:
            raise RuntimeError("injected model bug (not a device error)")
        logits = self.inner.decode(cache, seq_ids, tokens)
        return logits * float("nan") if self._decodes == self.nan_on_decode else logits

    def of(self, kind: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.kind == kind]
