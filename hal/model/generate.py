"""Batched generation over the paged latent KV cache: greedy or seeded sampling, stop on EOS or length.

:func:`generate` takes prompts of different lengths, runs them through one ``prefill`` (packed end to
end, ``attention_prefill``), then one ``decode`` step (absorbed ``mla_decode``) per new token for the
sequences still running. A sequence that emits an end-of-sequence token stops there (the EOS token is
part of its output, as in transformers) and its cache blocks go back to the pool at once, so the
remaining sequences decode as a smaller batch.

Token choice is greedy at ``temperature == 0`` (``argmax``; ties go to the lowest id) and otherwise
samples from ``softmax(logits / temperature)`` restricted to the top-p nucleus, with a
``torch.Generator`` seeded by ``seed``: the same seed, prompts and model give the same tokens.

Every input is checked before any compute, so bad input raises :class:`GenerationError` and never
leaves partial output behind. A model whose logits hold NaN or inf (NaN weights, a broken scale) raises
:class:`NonFiniteLogitsError` at that step instead of choosing tokens from them.

The checks (:func:`check_prompts`, :func:`check_sampling`, :func:`check_eos`) and the token choice
(:class:`Sampler`, :func:`greedy`) are public so that :class:`hal.serving.AutoBatcher`, which schedules
the same model calls per request, checks and chooses exactly as :func:`generate` does.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from hal.backend import Backend
from hal.errors import HALError, KVCacheExhaustedError
from hal.kvcache import PagedKVCache
from hal.model.config import ModelConfig
from hal.ops.catalogue import KV_BLOCK_SIZE

__all__ = [
    "GenerationError",
    "GenerationResult",
    "GenerativeModel",
    "NonFiniteLogitsError",
    "Sampler",
    "check_eos",
    "check_logits",
    "check_prompts",
    "check_sampling",
    "check_seed",
    "default_num_blocks",
    "generate",
    "greedy",
]

log = logging.getLogger(__name__)

# Seconds between two progress lines during decode.
_PROGRESS_EVERY_S = 2.0


class GenerationError(HALError, ValueError):
    """:func:`generate` was called with arguments it cannot run (the message names the argument)."""


class NonFiniteLogitsError(HALError, RuntimeError):
    """The model's logits hold NaN or inf: its weights or config are broken; no token is chosen from them."""


def check_logits(logits: torch.Tensor, seqs: Sequence[Hashable], what: str) -> torch.Tensor:
    """``logits [b, vocab]`` (row ``i`` of sequence ``seqs[i]``) if every value is finite.

    :raises NonFiniteLogitsError: naming ``what`` and the sequences whose rows are not.
    """
    if bool(torch.isfinite(logits).all()):
        return logits
    bad = [seqs[i] for i in (~torch.isfinite(logits)).any(dim=-1).nonzero().flatten().tolist()]
    raise NonFiniteLogitsError(
        f"{what}: the model's logits hold NaN or inf (sequences {bad[:8]}{' …' if len(bad) > 8 else ''}); "
        "its weights or config values are broken (NaN or inf weights or FP8 scales, values that overflow, …)"
    )


class GenerativeModel(Protocol):
    """What :func:`generate` needs from a model (:class:`~hal.model.deepseek.DeepseekModel` has it)."""

    @property
    def cfg(self) -> ModelConfig: ...

    @property
    def backend(self) -> Backend: ...

    def new_cache(self, num_blocks: int) -> PagedKVCache: ...

    def prefill(
        self, cache: PagedKVCache, seq_ids: Sequence[Hashable], prompts: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """float32 ``[b, vocab]``: the next-token logits after each prompt."""
        ...

    def decode(self, cache: PagedKVCache, seq_ids: Sequence[Hashable], tokens: Sequence[int]) -> torch.Tensor:
        """float32 ``[b, vocab]``: append one token per sequence, return the next-token logits."""
        ...


@dataclass
class GenerationResult:
    """What :func:`generate` produced, and how fast.

    :ivar tokens: the generated ids of each sequence, prompt excluded (an EOS token that stopped a
        sequence is its last element).
    :ivar prompt_lengths: tokens in each prompt.
    :ivar finish_reasons: per sequence, ``"eos"`` (emitted an end-of-sequence token) or ``"length"``
        (reached ``max_new_tokens``).
    :ivar prefill_seconds: wall time of the prefill and the choice of each sequence's first token.
    :ivar decode_seconds: wall time of the decode steps and their token choices.
    :ivar prefill_tokens: prompt tokens processed by the prefill.
    :ivar decode_tokens: tokens produced by decode steps (one per running sequence per step; the first
        token of each sequence comes from the prefill and is not counted).
    :ivar peak_memory_bytes: the backend's peak memory after the run (``memory_stats().peak``: the
        accelerator's allocator peak, the process's peak resident set on the CPU); ``None`` where the
        backend cannot tell.
    """

    tokens: list[list[int]]
    prompt_lengths: list[int]
    finish_reasons: list[str]
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens: int
    decode_tokens: int
    peak_memory_bytes: int | None

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """Prompt tokens per second of prefill; ``None`` when nothing was timed."""
        return _rate(self.prefill_tokens, self.prefill_seconds)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Generated tokens per second over the decode steps, all sequences together; ``None`` when no
        decode step ran (``max_new_tokens <= 1``, or every sequence stopped at its first token)."""
        return _rate(self.decode_tokens, self.decode_seconds)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready data: every field plus the two rates."""
        data = asdict(self)
        data["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        data["decode_tokens_per_s"] = self.decode_tokens_per_s
        return data


def _rate(tokens: int, seconds: float) -> float | None:
    return tokens / seconds if tokens > 0 and seconds > 0 else None


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------


def _int(value: object, what: str, where: str = "generate") -> int:
    # operator.index accepts int, numpy and 0-d torch integers, and refuses floats and strings;
    # bool is an int subclass but True as a token id is a mistake.
    if isinstance(value, bool):
        raise GenerationError(f"{where}: {what} must be an int, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise GenerationError(f"{where}: {what} must be an int, got {value!r}") from None


def check_prompts(
    prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int, *, where: str = "generate"
) -> list[list[int]]:
    """Prompts as lists of ints, each checked against the vocabulary and ``max_position_embeddings``.

    :param where: the caller's name, which starts every error message.
    :raises GenerationError: an empty batch or prompt, a non-integer or out-of-vocabulary id, or a
        prompt that with ``max_new_tokens`` outgrows ``max_position_embeddings``.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence | torch.Tensor):
        raise GenerationError(f"{where}: prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise GenerationError(f"{where}: prompts is empty; give at least one prompt (a list of token ids)")
    vocab, max_pos = cfg.vocab_size, cfg.max_position_embeddings
    checked: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                shape = list(prompt.shape)
                raise GenerationError(f"{where}: prompt {i}: expected a 1-d tensor of ids, got shape {shape}")
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise GenerationError(f"{where}: prompt {i}: expected a list of token ids, got {type(prompt).__name__}")
        ids = [_int(t, f"prompt {i}: token {j}", where) for j, t in enumerate(prompt)]
        if not ids:
            raise GenerationError(f"{where}: prompt {i} is empty; every prompt needs at least one token")
        bad = [(j, t) for j, t in enumerate(ids) if not 0 <= t < vocab]
        if bad:
            shown = ", ".join(f"{t} at position {j}" for j, t in bad[:5]) + (" …" if len(bad) > 5 else "")
            raise GenerationError(
                f"{where}: prompt {i}: token ids must lie in [0, {vocab}) (the vocabulary), got {shown}"
            )
        if len(ids) > max_pos:
            raise GenerationError(
                f"{where}: prompt {i} has {len(ids)} tokens, more than max_position_embeddings ({max_pos}); shorten it"
            )
        checked.append(ids)
    # The last new token is returned, never fed back: positions run up to len + max_new_tokens - 2. The
    # longest prompt is named, and the limit given is the whole batch's.
    longest = max(range(len(checked)), key=lambda i: len(checked[i]))
    n = len(checked[longest])
    if n + max_new_tokens - 1 > max_pos:
        raise GenerationError(
            f"{where}: prompt {longest} has {n} tokens; with max_new_tokens={max_new_tokens} the sequence "
            f"would outgrow max_position_embeddings ({max_pos}); lower max_new_tokens to at most {max_pos - n + 1}"
            + (" (the longest prompt's limit)" if len(checked) > 1 else "")
        )
    return checked


def check_sampling(
    max_new_tokens: object, temperature: object, top_p: object, *, where: str = "generate"
) -> tuple[int, float, float]:
    """``(max_new_tokens, temperature, top_p)`` checked and normalized (int, float, float).

    :raises GenerationError: ``max_new_tokens`` not an int >= 0, ``temperature`` not a finite number
        >= 0, ``top_p`` outside ``(0, 1]``.
    """
    steps = _int(max_new_tokens, "max_new_tokens", where)
    if steps < 0:
        raise GenerationError(f"{where}: max_new_tokens must be >= 0, got {steps}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise GenerationError(f"{where}: temperature must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"{where}: temperature must be finite and >= 0 (0 is greedy), got {temperature}")
    if isinstance(top_p, bool) or not isinstance(top_p, int | float):
        raise GenerationError(f"{where}: top_p must be a number, got {top_p!r}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"{where}: top_p must lie in (0, 1] (1 keeps every token), got {top_p}")
    return steps, float(temperature), float(top_p)


def check_eos(eos_token_ids: Sequence[int] | None, cfg: ModelConfig, *, where: str = "generate") -> frozenset[int]:
    """The end-of-sequence ids: ``eos_token_ids`` (one id or a sequence of them), or the config's when
    ``None`` (empty: never stop early).

    :raises GenerationError: not ids, or ids outside the vocabulary.
    """
    eos_source: object = cfg.eos_token_id if eos_token_ids is None else eos_token_ids
    if isinstance(eos_source, torch.Tensor):
        eos_source = eos_source.reshape(-1).tolist()  # a 0-d tensor is one id
    elif not isinstance(eos_source, (str, bytes, Sequence)) and not isinstance(eos_source, bool):
        try:
            eos_source = [operator.index(eos_source)]  # type: ignore[arg-type]  # one id, as configs write it
        except TypeError:
            pass
    if isinstance(eos_source, (str, bytes)) or not isinstance(eos_source, Sequence):
        raise GenerationError(f"{where}: eos_token_ids must be an id, a sequence of ids or None, got {eos_source!r}")
    ids = frozenset(_int(t, "eos_token_ids", where) for t in eos_source)
    bad = sorted(t for t in ids if not 0 <= t < cfg.vocab_size)
    if bad:
        raise GenerationError(f"{where}: eos_token_ids {bad[:8]} outside the vocabulary [0, {cfg.vocab_size})")
    return ids


def check_seed(seed: object, *, where: str = "generate") -> int | None:
    """``seed`` as an int, or ``None`` (draw a fresh seed).

    :raises GenerationError: not an int, or outside what ``torch.Generator.manual_seed`` takes,
        ``[-2**63, 2**64)``.
    """
    if seed is None:
        return None
    value = _int(seed, "seed", where)
    if not -(2**63) <= value < 2**64:
        raise GenerationError(f"{where}: seed must lie in [-2**63, 2**64) (torch's generator seeds), got {value}")
    return value


def default_num_blocks(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """The KV-cache blocks :func:`generate` reserves by default, the most it can use: every prompt plus
    ``max_new_tokens - 1`` tokens (the last new token is never fed back), rounded up to whole blocks per
    sequence (inputs already checked)."""
    return sum(-(-(len(p) + max(max_new_tokens - 1, 0)) // KV_BLOCK_SIZE) for p in prompts)


# ---------------------------------------------------------------------------------------------------
# Token choice
# ---------------------------------------------------------------------------------------------------


#: Temperatures below float32's smallest normal number choose greedily: dividing the logits by one in
#: float32 could divide by 0 (0 / 0 is NaN for the most likely token), and greedy is sampling's limit.
_TINY = torch.finfo(torch.float32).tiny


def greedy(logits: torch.Tensor) -> list[int]:
    """The ``argmax`` of each row of ``[b, vocab]`` logits (ties go to the lowest id)."""
    return [int(t) for t in torch.argmax(logits, dim=-1).tolist()]


class Sampler:
    """Chooses one token per row of logits: greedy, or temperature + top-p sampling from one generator.

    The sampler serves a batch of ``rows`` sequences. Every sampling call draws one uniform number per
    sequence of that batch, running or not, and a sequence's token is the one its number picks by
    inverse transform (the first token whose cumulative probability exceeds it). So the numbers a
    sequence gets depend on the seed and its place in the batch alone: another sequence stopping early
    (at an EOS) changes nothing for the others.

    :param temperature: 0 is greedy (:func:`greedy`), and so is anything below float32's smallest normal
        number (about 1.2e-38); above, samples from ``softmax(logits / temperature)``.
    :param top_p: keep the smallest set of most likely tokens whose mass reaches ``top_p``.
    :param seed: seeds the generator (made on first use, on the logits' device); ``None`` draws a seed.
    :param rows: the sequences of the batch the sampler serves; ``None``: each call's logit rows are
        the batch (one number per row), as for one request or one fixed batch.
    """

    def __init__(self, temperature: float, top_p: float, seed: int | None, *, rows: int | None = None) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.rows = rows
        self.draws = 0  # calls that sampled (greedy calls draw nothing)
        self._generator: torch.Generator | None = None

    def _rng(self, device: torch.device) -> torch.Generator:
        # Made on first use, on the logits' device: torch.rand draws on its generator's device.
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            if self.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.seed)
        return self._generator

    def to(self, device: torch.device | str) -> None:
        """Draw on ``device`` from now on (a model moved there, after a failover).

        Within one device type the generator's state moves along, so the draws go on exactly as they
        would have; across types (whose generators differ) a generator seeded from ``seed`` and the
        number of draws so far takes over: reproducible, but not the draws an undisturbed run makes.
        """
        old = self._generator
        device = torch.device(device)
        if old is None or old.device == device:
            return
        new = torch.Generator(device=device)
        if old.device.type == device.type:
            new.set_state(old.get_state())
        elif self.seed is None:
            new.seed()
        else:
            new.manual_seed((self.seed * 1_000_003 + self.draws) % 2**63)
        self._generator = new

    def __call__(self, logits: torch.Tensor, rows: Sequence[int] | None = None) -> list[int]:
        """:param logits: ``[b, vocab]``.
        :param rows: each logit row's sequence: its place in the sampler's batch (``None``: ``0..b-1``).
        :returns: b token ids."""
        if self.temperature < _TINY:  # 0, or so small that float32 would divide by 0: greedy, the limit
            return greedy(logits)
        batch = logits.shape[0] if self.rows is None else self.rows
        places = list(range(logits.shape[0])) if rows is None else list(rows)
        valid = all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < batch for r in places)
        if len(places) != logits.shape[0] or not valid or len(set(places)) != len(places):
            raise GenerationError(
                f"Sampler: rows must give each of the {logits.shape[0]} logit rows its own place in "
                f"0..{batch - 1}, got {places}"
            )
        self.draws += 1
        # Subtract the row maximum before dividing: a small temperature would overflow raw logits to inf.
        # In float32, on the logits' device (some accelerators lack float64).
        z = logits.float()
        z = (z - z.max(dim=-1, keepdim=True).values) / self.temperature
        probs = torch.softmax(z, dim=-1)
        if self.top_p < 1:
            # Stable sort: among equal probabilities the lowest id ranks first, as argmax would pick it.
            sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            # Keep the smallest prefix whose mass reaches top_p: a token stays while the mass before it
            # is below top_p, so the most likely token is always kept.
            before = torch.cumsum(sorted_p, dim=-1) - sorted_p
            dropped = before >= self.top_p
            dropped[..., 0] = False  # even when top_p rounds to 0 in float32
            sorted_p = sorted_p.masked_fill(dropped, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        # One number per sequence of the batch, whichever are running; each row takes its sequence's.
        u = torch.rand(batch, generator=self._rng(probs.device), device=probs.device)
        u = u[torch.tensor(places, dtype=torch.long, device=probs.device)]
        cdf = torch.cumsum(probs, dim=-1)
        choice = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        # u * total may round up to the total: never past the last token with any probability.
        last = probs.shape[-1] - 1 - torch.argmax((probs.flip(-1) > 0).to(torch.int8), dim=-1)
        return [int(t) for t in torch.minimum(choice, last).tolist()]


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------


def generate(
    model: GenerativeModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    eos_token_ids: Sequence[int] | None = None,
    num_blocks: int | None = None,
    progress: bool = False,
) -> GenerationResult:
    """Continue each prompt by up to ``max_new_tokens`` tokens, all prompts as one batch.

    :param model: a :class:`~hal.model.deepseek.DeepseekModel` (anything with its ``cfg``, ``backend``,
        ``new_cache``, ``prefill`` and ``decode``).
    :param prompts: token ids, one list per sequence; lengths may differ, none may be empty.
    :param max_new_tokens: the most tokens to generate per sequence (0 runs the prefill only).
    :param temperature: 0 is greedy (``argmax``, ties to the lowest id); above 0 samples from
        ``softmax(logits / temperature)``.
    :param top_p: nucleus sampling: sample only among the most likely tokens whose probabilities add up
        to ``top_p``, in ``(0, 1]`` (1 keeps every token; ignored when greedy).
    :param seed: seeds the sampler's ``torch.Generator``: the same seed gives the same tokens. ``None``
        draws a fresh seed.
    :param eos_token_ids: ids that end a sequence. ``None`` takes ``model.cfg.eos_token_id``; an empty
        sequence never stops early.
    :param num_blocks: KV cache blocks of 64 tokens. ``None`` reserves all that generation can use (every
        prompt plus ``max_new_tokens - 1`` tokens, rounded up per sequence); fewer can run out during
        decode (:class:`~hal.errors.KVCacheExhaustedError`, naming the step), too few for the prompts
        alone is refused before any compute.
    :param progress: log progress (prefill done, decode steps every few seconds) at INFO, not DEBUG.
    :raises GenerationError: an empty batch or prompt, an id outside the vocabulary, a prompt that with
        ``max_new_tokens`` outgrows ``max_position_embeddings``, ``max_new_tokens < 0``,
        ``temperature < 0``, ``top_p`` outside ``(0, 1]``, or a bad ``eos_token_ids`` / ``num_blocks``.
    :raises NonFiniteLogitsError: the model's logits hold NaN or inf.
    """
    steps, temperature, top_p = check_sampling(max_new_tokens, temperature, top_p)
    cfg = model.cfg
    ids = check_prompts(prompts, cfg, steps)
    eos = check_eos(eos_token_ids, cfg)
    seed = check_seed(seed)
    if num_blocks is None:
        num_blocks = default_num_blocks(ids, steps)
    else:
        num_blocks = _int(num_blocks, "num_blocks")
        if num_blocks <= 0:
            raise GenerationError(f"generate: num_blocks must be a positive int, got {num_blocks}")
        prompt_blocks = default_num_blocks(ids, 1)  # the prompts alone
        if num_blocks < prompt_blocks:
            raise GenerationError(
                f"generate: num_blocks={num_blocks} cannot hold the prompts, which take {prompt_blocks} blocks of "
                f"{KV_BLOCK_SIZE} tokens (num_blocks=None reserves all that generation can use)"
            )
    level = logging.INFO if progress else logging.DEBUG
    sampler = Sampler(temperature, top_p, seed, rows=len(ids))
    backend = model.backend
    batch = len(ids)
    tokens: list[list[int]] = [[] for _ in ids]
    reasons = ["length"] * batch

    cache = model.new_cache(num_blocks)
    seq_ids = list(range(batch))
    prefill_tokens = sum(len(p) for p in ids)
    log.log(level, "prefill: %d sequence(s), %d prompt tokens", batch, prefill_tokens)
    backend.synchronize()
    t0 = time.perf_counter()
    logits = check_logits(model.prefill(cache, seq_ids, ids), seq_ids, "prefill")
    active: list[int] = []
    if steps > 0:
        active = _advance(sampler(logits), seq_ids, tokens, reasons, eos, steps, cache)
    backend.synchronize()
    prefill_seconds = time.perf_counter() - t0
    log.log(level, "prefill: %.3f s (%.1f tok/s)", prefill_seconds, prefill_tokens / max(prefill_seconds, 1e-9))
    if steps == 0:  # prefill only: nothing is generated
        for sid in seq_ids:
            cache.free(sid)

    decode_tokens = 0
    t0 = last_log = time.perf_counter()
    while active:
        last = [tokens[s][-1] for s in active]
        step = f"decode step {len(tokens[active[0]])}"
        try:
            logits = check_logits(model.decode(cache, active, last), active, step)
        except KVCacheExhaustedError as exc:  # only with a num_blocks given: the default never runs out
            need = default_num_blocks(ids, steps)
            raise KVCacheExhaustedError(
                f"generate: {step}: num_blocks={num_blocks} ran out; these prompts with max_new_tokens={steps} "
                f"can use {need} blocks of {KV_BLOCK_SIZE} tokens (num_blocks=None reserves them)"
            ) from exc
        decode_tokens += len(active)
        active = _advance(sampler(logits, active), active, tokens, reasons, eos, steps, cache)
        if time.perf_counter() - last_log >= _PROGRESS_EVERY_S:
            last_log = time.perf_counter()
            done = max(len(t) for t in tokens)
            log.log(level, "decode: %d/%d tokens, %d sequence(s) running", done, steps, len(active))
    backend.synchronize()
    decode_seconds = time.perf_counter() - t0 if decode_tokens else 0.0
    if decode_tokens:
        rate = decode_tokens / max(decode_seconds, 1e-9)
        log.log(level, "decode: %d tokens in %.3f s (%.1f tok/s)", decode_tokens, decode_seconds, rate)

    return GenerationResult(
        tokens=tokens,
        prompt_lengths=[len(p) for p in ids],
        finish_reasons=reasons,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        prefill_tokens=prefill_tokens,
        decode_tokens=decode_tokens,
        peak_memory_bytes=backend.memory_stats().peak,
    )


def _advance(
    chosen: list[int],
    running: list[int],
    tokens: list[list[int]],
    reasons: list[str],
    eos: frozenset[int],
    steps: int,
    cache: PagedKVCache,
) -> list[int]:
    """Append each running sequence's chosen token; free and drop the sequences that are done.

    :returns: the sequences still running, in order.
    """
    still: list[int] = []
    for sid, tok in zip(running, chosen, strict=True):
        tokens[sid].append(tok)
        if tok in eos:
            reasons[sid] = "eos"
        elif len(tokens[sid]) < steps:
            still.append(sid)
            continue
        cache.free(sid)  # finished: its blocks serve the sequences still running
    return still
