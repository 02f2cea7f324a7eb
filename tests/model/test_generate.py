"""Generation: token choice, stopping and cache bookkeeping on a fake model, then on the real one.

The fake model's logits are a function of the last token only, so every expected continuation can be
written down by hand; the real :class:`~hal.model.DeepseekModel` then checks that batching prompts of
different lengths changes nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Sequence

import pytest
import torch

import hal
import hal_cpu
from hal.errors import HALError
from hal.kvcache import PagedKVCache
from hal.model import tiny_config
from hal.model.config import ModelConfig
from hal.model.generate import GenerationError, NonFiniteLogitsError, Sampler, generate

LogitsFn = Callable[[int], torch.Tensor]


@pytest.fixture(scope="module")
def cpu() -> hal.Backend:
    return hal.Registry(entry_points=False, plugins=[("cpu", hal_cpu)]).get_backend("cpu")


def next_token(vocab: int) -> LogitsFn:
    """Logits whose argmax is ``(last + 1) % vocab``."""

    def fn(last: int) -> torch.Tensor:
        logits = torch.zeros(vocab)
        logits[(last + 1) % vocab] = 1.0
        return logits

    return fn


class FakeModel:
    """What ``generate`` needs of a model, with logits from ``logits_fn(last token)``, recording its calls."""

    def __init__(
        self,
        backend: hal.Backend,
        *,
        vocab: int = 16,
        eos: int | None = None,
        max_pos: int = 512,
        logits_fn: LogitsFn | None = None,
    ) -> None:
        self.cfg: ModelConfig = tiny_config(vocab_size=vocab, eos_token_id=eos, max_position_embeddings=max_pos)
        self.backend = backend
        self.logits_fn = logits_fn or next_token(vocab)
        self.cache: PagedKVCache | None = None
        self.num_blocks: int | None = None
        self.prefills: list[list[list[int]]] = []
        self.decodes: list[list[Hashable]] = []  # the sequence ids of each decode step
        self.in_cache: list[list[Hashable]] = []  # the sequences the cache held at each decode step
        self.used_blocks: list[int] = []

    def new_cache(self, num_blocks: int) -> PagedKVCache:
        self.num_blocks = num_blocks
        self.cache = PagedKVCache(1, num_blocks, 4, dtype=torch.float32)
        return self.cache

    def prefill(
        self, cache: PagedKVCache, seq_ids: Sequence[Hashable], prompts: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        self.prefills.append([list(p) for p in prompts])
        for sid, p in zip(seq_ids, prompts, strict=True):
            cache.add_sequence(sid)
            cache.reserve(sid, len(p))
        return torch.stack([self.logits_fn(p[-1]) for p in prompts])

    def decode(self, cache: PagedKVCache, seq_ids: Sequence[Hashable], tokens: Sequence[int]) -> torch.Tensor:
        self.decodes.append(list(seq_ids))
        self.in_cache.append([s for s in range(64) if s in cache])
        self.used_blocks.append(cache.num_used_blocks)
        for sid in seq_ids:
            cache.reserve(sid, 1)
        return torch.stack([self.logits_fn(t) for t in tokens])


# ---------------------------------------------------------------------------------------------------
# Greedy, stopping, bookkeeping
# ---------------------------------------------------------------------------------------------------


def test_greedy_continues_each_prompt_and_counts_tokens(cpu: hal.Backend) -> None:
    model = FakeModel(cpu)
    result = generate(model, [[1, 2, 3], [5]], max_new_tokens=4)
    assert result.tokens == [[4, 5, 6, 7], [6, 7, 8, 9]]
    assert result.prompt_lengths == [3, 1]
    assert result.finish_reasons == ["length", "length"]
    assert model.prefills == [[[1, 2, 3], [5]]]  # one prefill for the whole batch
    assert model.decodes == [[0, 1]] * 3  # the last token is returned, never fed back
    assert result.prefill_tokens == 4 and result.decode_tokens == 6
    assert model.cache is not None and model.cache.num_used_blocks == 0  # everything freed at the end


def test_eos_stops_each_sequence_on_its_own_and_frees_its_blocks(cpu: hal.Backend) -> None:
    model = FakeModel(cpu, eos=5)
    result = generate(model, [[1], [3], [10]], max_new_tokens=6)
    # The EOS token is part of the output (as in transformers); the third sequence never meets it.
    assert result.tokens == [[2, 3, 4, 5], [4, 5], [11, 12, 13, 14, 15, 0]]
    assert result.finish_reasons == ["eos", "eos", "length"]
    assert model.decodes == [[0, 1, 2], [0, 2], [0, 2], [2], [2]]
    assert model.in_cache == model.decodes  # a finished sequence is out of the cache at the next step
    assert model.used_blocks == [3, 2, 2, 1, 1]  # one 64-token block per running sequence
    assert result.decode_tokens == 9
    assert model.cache is not None and model.cache.num_used_blocks == 0


def test_a_sequence_can_stop_at_its_first_token(cpu: hal.Backend) -> None:
    model = FakeModel(cpu)
    result = generate(model, [[4], [8]], max_new_tokens=3, eos_token_ids=[5])
    assert result.tokens == [[5], [9, 10, 11]]
    assert result.finish_reasons == ["eos", "length"]
    assert model.decodes == [[1], [1]]


def test_eos_defaults_to_the_config_and_an_empty_tuple_never_stops(cpu: hal.Backend) -> None:
    model = FakeModel(cpu, eos=3)
    assert model.cfg.eos_token_id == (3,)
    assert generate(model, [[1]], max_new_tokens=5).tokens == [[2, 3]]
    assert generate(model, [[1]], max_new_tokens=5, eos_token_ids=()).tokens == [[2, 3, 4, 5, 6]]
    # A config whose eos_token_id is null never stops early.
    assert generate(FakeModel(cpu), [[1]], max_new_tokens=5).finish_reasons == ["length"]


def test_zero_new_tokens_runs_the_prefill_only(cpu: hal.Backend) -> None:
    model = FakeModel(cpu)
    result = generate(model, [[1, 2], [3]], max_new_tokens=0)
    assert result.tokens == [[], []] and result.finish_reasons == ["length", "length"]
    assert len(model.prefills) == 1 and model.decodes == []
    assert result.decode_tokens == 0 and result.decode_tokens_per_s is None
    assert model.cache is not None and model.cache.num_used_blocks == 0


def test_one_new_token_needs_no_decode_step(cpu: hal.Backend) -> None:
    model = FakeModel(cpu)
    result = generate(model, [[1], [2]], max_new_tokens=1)
    assert result.tokens == [[2], [3]] and model.decodes == []
    assert result.decode_tokens_per_s is None and result.prefill_tokens_per_s is not None


def test_default_cache_fits_every_prompt_plus_new_tokens_in_64_token_blocks(cpu: hal.Backend) -> None:
    model = FakeModel(cpu)
    generate(model, [[1] * 3, [1] * 70, [1] * 54], max_new_tokens=10)
    assert model.num_blocks == 1 + 2 + 1  # ceil(12/64) + ceil(79/64) + ceil(63/64): the last token is not kept
    generate(model, [[1] * 64], max_new_tokens=1)
    assert model.num_blocks == 1  # the prompt alone
    generate(model, [[1]], max_new_tokens=2, num_blocks=7)
    assert model.num_blocks == 7


def test_too_few_blocks_for_the_decode_raise_the_cache_error_naming_num_blocks(cpu: hal.Backend) -> None:
    with pytest.raises(hal.errors.KVCacheExhaustedError, match=r"decode step 5: num_blocks=1 ran out; .* use 2 blocks"):
        generate(FakeModel(cpu), [[1] * 60], max_new_tokens=10, num_blocks=1)  # the 65th token needs block 2


def test_eos_ids_may_be_one_int_or_a_tensor(cpu: hal.Backend) -> None:
    for eos in (3, torch.tensor(3), [3]):
        result = generate(FakeModel(cpu), [[1]], max_new_tokens=5, eos_token_ids=eos)  # type: ignore[arg-type]
        assert result.tokens == [[2, 3]] and result.finish_reasons == ["eos"]


def test_a_top_p_below_float32_keeps_the_most_likely_token(cpu: hal.Backend) -> None:
    sampled = generate(FakeModel(cpu), [[1]], max_new_tokens=4, temperature=1.0, top_p=1e-46, seed=0).tokens
    assert sampled == generate(FakeModel(cpu), [[1]], max_new_tokens=4).tokens  # the nucleus is the argmax


def test_non_finite_logits_stop_generation_with_the_step_and_sequence_named(cpu: hal.Backend) -> None:
    """NaN weights give NaN logits, whose argmax would be a token like any other: generation stops there."""

    def nan_after(bad: int) -> LogitsFn:
        def fn(last: int) -> torch.Tensor:
            logits = next_token(16)(last)
            return logits * math.nan if last == bad else logits

        return fn

    with pytest.raises(NonFiniteLogitsError, match=r"decode step 2: .*NaN or inf \(sequences \[1\]\)"):
        generate(FakeModel(cpu, logits_fn=nan_after(6)), [[1], [4]], max_new_tokens=5)  # 4 -> 5 -> 6 -> NaN
    with pytest.raises(NonFiniteLogitsError, match=r"prefill: .*\(sequences \[0\]\)"):
        generate(FakeModel(cpu, logits_fn=nan_after(3)), [[3], [1]], max_new_tokens=5, temperature=1.0)


def test_greedy_ties_go_to_the_lowest_id(cpu: hal.Backend) -> None:
    def tie(last: int) -> torch.Tensor:
        logits = torch.zeros(16)
        logits[[11, 7, 9]] = 2.0
        return logits

    assert generate(FakeModel(cpu, logits_fn=tie), [[1]], max_new_tokens=3).tokens == [[7, 7, 7]]


def test_result_to_dict_is_json_ready_with_positive_rates(cpu: hal.Backend) -> None:
    result = generate(FakeModel(cpu), [[1, 2], [3]], max_new_tokens=3)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["tokens"] == result.tokens
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    assert data["decode_tokens"] == 4 and data["prefill_tokens"] == 3
    assert data["peak_memory_bytes"] is None or data["peak_memory_bytes"] > 0


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


def uniform(vocab: int) -> LogitsFn:
    return lambda last: torch.zeros(vocab)


def fixed_probs(probs: list[float]) -> LogitsFn:
    logits = torch.tensor(probs).log()
    return lambda last: logits.clone()


def test_sampling_is_reproducible_with_a_seed_and_differs_with_another(cpu: hal.Backend) -> None:
    def run(seed: int | None) -> list[list[int]]:
        model = FakeModel(cpu, vocab=64, logits_fn=uniform(64))
        return generate(model, [[1], [2, 3]], max_new_tokens=16, temperature=1.0, seed=seed).tokens

    first = run(1)
    assert first == run(1)
    assert first != run(2)
    assert len(set(first[0])) > 4  # actually sampling, not a fixed choice
    assert run(None) != run(None)  # no seed: a fresh one each time


def test_a_sequence_samples_the_same_tokens_whatever_the_others_do(cpu: hal.Backend) -> None:
    # With an EOS, sequences stop at different steps; each one's tokens must be what it drew without the
    # EOS, cut at its first EOS: the others stopping changes nothing for it.
    def run(eos: list[int]) -> list[list[int]]:
        model = FakeModel(cpu, vocab=64, logits_fn=uniform(64))
        return generate(
            model, [[1], [2], [3], [4]], max_new_tokens=24, temperature=1.0, seed=5, eos_token_ids=eos
        ).tokens

    free = run([])
    eos = free[0][3]  # sequence 0 stops at step 4 at the latest
    stopped = run([eos])
    for got, drawn in zip(stopped, free, strict=True):
        cut = drawn.index(eos) + 1 if eos in drawn else len(drawn)
        assert got == drawn[:cut]
    assert sum(len(t) for t in stopped) < sum(len(t) for t in free)  # some did stop early


def test_sampler_draws_from_the_distribution() -> None:
    # One call over 20000 rows with the same logits: the frequencies are softmax(logits / temperature).
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0])
    for temperature in (0.5, 1.0, 2.0):
        sampler = Sampler(temperature, 1.0, seed=0, rows=20000)
        drawn = torch.tensor(sampler(logits.expand(20000, -1)))
        freq = torch.bincount(drawn, minlength=5).double() / 20000
        torch.testing.assert_close(freq, torch.softmax(logits.double() / temperature, -1), atol=0.015, rtol=0)


def test_sampler_rows_must_be_places_in_its_batch() -> None:
    sampler = Sampler(1.0, 1.0, seed=0, rows=2)
    assert len(sampler(torch.zeros(2, 8), [1, 0])) == 2
    assert sampler(torch.zeros(0, 8), []) == []  # an empty batch draws and picks nothing
    for rows in ([0], [0, 2], [-1, 0], [1, 1], [True, 0]):
        with pytest.raises(GenerationError, match=r"rows must give each of the 2 logit rows its own place in 0\.\.1"):
            sampler(torch.zeros(2, 8), rows)
    # Without rows, each call's logit rows are the batch: one request, or one fixed batch.
    assert len(Sampler(1.0, 1.0, seed=0)(torch.zeros(3, 8))) == 3


def test_small_top_p_keeps_only_the_most_likely_token(cpu: hal.Backend) -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(16, 16, generator=g)  # logits depend on the last token; unique maxima
    model = FakeModel(cpu, logits_fn=lambda last: table[last])
    sampled = generate(model, [[1], [5]], max_new_tokens=12, temperature=2.0, top_p=1e-6, seed=3).tokens
    greedy = generate(FakeModel(cpu, logits_fn=lambda last: table[last]), [[1], [5]], max_new_tokens=12).tokens
    assert sampled == greedy


def test_top_p_samples_only_inside_the_nucleus(cpu: hal.Backend) -> None:
    probs = [0.5, 0.3, 0.15] + [0.01] * 5

    def drawn(top_p: float) -> set[int]:
        model = FakeModel(cpu, vocab=8, logits_fn=fixed_probs(probs))
        result = generate(model, [[0]] * 8, max_new_tokens=40, temperature=1.0, top_p=top_p, seed=0)
        return {t for seq in result.tokens for t in seq}

    assert drawn(0.6) == {0, 1}  # 0.5 < 0.6: the second token is needed to reach 0.6
    assert drawn(0.9) == {0, 1, 2}
    assert drawn(1.0) > {0, 1, 2}  # the tail is reachable without top-p


def test_low_temperature_sampling_is_greedy_and_does_not_overflow(cpu: hal.Backend) -> None:
    table = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) * 1e4
    model = FakeModel(cpu, logits_fn=lambda last: table[last])
    greedy = generate(FakeModel(cpu, logits_fn=lambda last: table[last]), [[1]], max_new_tokens=8).tokens
    # 1e-300 and the smallest double are 0 in float32, where (z - max) / temperature would be 0 / 0.
    for temperature in (1e-6, 1e-40, 1e-300, 5e-324):
        model = FakeModel(cpu, logits_fn=lambda last: table[last])
        assert generate(model, [[1]], max_new_tokens=8, temperature=temperature, seed=0).tokens == greedy, temperature


# ---------------------------------------------------------------------------------------------------
# Bad input: an error before any compute
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompts", "kwargs", "match"),
    [
        ([], {}, "prompts is empty"),
        ([[1], []], {}, "prompt 1 is empty"),
        ([[1, 16]], {}, r"prompt 0: token ids must lie in \[0, 16\).*16 at position 1"),
        ([[-1]], {}, r"\[0, 16\)"),
        ([[1, 2.5]], {}, "prompt 0: token 1 must be an int"),
        ([["a"]], {}, "must be an int"),
        ("abc", {}, "list of token-id lists"),
        ([[1] * 33], {}, "more than max_position_embeddings"),
        ([[1] * 30], {"max_new_tokens": 5}, "lower max_new_tokens to at most 3"),
        # The limit given holds for the whole batch: the longest prompt's, whichever comes first.
        ([[1] * 20, [1] * 25], {"max_new_tokens": 20}, r"prompt 1 has 25 tokens.*at most 8 \(the longest"),
        ([[1]], {"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
        ([[1]], {"temperature": -0.5}, "temperature must be finite and >= 0"),
        ([[1]], {"top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
        ([[1]], {"top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
        ([[1]], {"num_blocks": 0}, "num_blocks must be a positive int"),
        ([[1]], {"eos_token_ids": "3"}, "eos_token_ids must be an id, a sequence of ids or None"),
        ([[1]], {"eos_token_ids": [3, 16]}, r"eos_token_ids \[16\] outside the vocabulary \[0, 16\)"),
        ([[1]], {"seed": 2**64}, r"seed must lie in \[-2\*\*63, 2\*\*64\)"),
        ([[1] * 10, [1]], {"num_blocks": 1}, "num_blocks=1 cannot hold the prompts, which take 2 blocks"),
    ],
    ids=lambda v: None if isinstance(v, (list, str)) else str(v),
)
def test_bad_input_raises_before_any_compute(cpu: hal.Backend, prompts: object, kwargs: dict, match: str) -> None:
    model = FakeModel(cpu, max_pos=32)
    kwargs = {"max_new_tokens": 1, **kwargs}
    with pytest.raises(GenerationError, match=match) as info:
        generate(model, prompts, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, HALError) and isinstance(info.value, ValueError)
    assert model.cache is None and model.prefills == []


def test_a_prompt_that_exactly_fills_the_positions_is_accepted(cpu: hal.Backend) -> None:
    model = FakeModel(cpu, max_pos=32)
    assert len(generate(model, [[1] * 30], max_new_tokens=3).tokens[0]) == 3  # positions 0..31


# ---------------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(cpu: hal.Backend) -> object:
    from hal.model import DeepseekModel, random_state_dict

    cfg = tiny_config()
    return DeepseekModel(cfg, cpu, random_state_dict(cfg, seed=0))


PROMPTS = [[5, 17, 300, 42, 9, 1000, 3], [7, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]


def test_real_model_batched_greedy_equals_one_prompt_at_a_time(tiny_model: object) -> None:
    batched = generate(tiny_model, PROMPTS, max_new_tokens=6)  # type: ignore[arg-type]
    alone = [generate(tiny_model, [p], max_new_tokens=6).tokens[0] for p in PROMPTS]  # type: ignore[arg-type]
    assert batched.tokens == alone
    assert all(0 <= t < 1024 for seq in batched.tokens for t in seq)
    assert batched.decode_tokens == 3 * 5 and batched.decode_tokens_per_s is not None


def test_real_model_stops_on_eos_and_sampling_is_seeded(tiny_model: object) -> None:
    greedy = generate(tiny_model, PROMPTS, max_new_tokens=5)  # type: ignore[arg-type]
    eos = greedy.tokens[1][2]
    stopped = generate(tiny_model, PROMPTS, max_new_tokens=5, eos_token_ids=[eos])  # type: ignore[arg-type]
    assert stopped.tokens[1] == greedy.tokens[1][: greedy.tokens[1].index(eos) + 1]
    assert stopped.finish_reasons[1] == "eos"
    kwargs = {"max_new_tokens": 5, "temperature": 1.0, "top_p": 0.9}
    a = generate(tiny_model, PROMPTS, seed=7, **kwargs).tokens  # type: ignore[arg-type]
    assert a == generate(tiny_model, PROMPTS, seed=7, **kwargs).tokens  # type: ignore[arg-type]
    assert a != generate(tiny_model, PROMPTS, seed=8, **kwargs).tokens  # type: ignore[arg-type]


def test_real_model_rejects_out_of_vocabulary_ids_before_compute(tiny_model: object) -> None:
    with pytest.raises(GenerationError, match=r"\[0, 1024\)"):
        generate(tiny_model, [[1, 2], [1024]], max_new_tokens=2)  # type: ignore[arg-type]
