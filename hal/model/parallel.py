"""Tensor and expert parallelism of the DeepSeek model: the layout, in one place.

One process group of ``W`` ranks (``torchrun --nproc-per-node W``) runs one model. Two degrees say how:

- ``tp`` ∈ {1, W}: **tensor parallelism**. MLA heads are split (``q_proj`` / ``q_b_proj`` and
  ``kv_b_proj`` by heads, i.e. by output rows; ``o_proj`` by its input columns, then ``all_reduce``);
  the dense MLP and the shared experts are split (``gate_proj`` / ``up_proj`` by output rows,
  ``down_proj`` by input columns, then ``all_reduce``); the LM head is split by vocabulary rows, then
  ``all_gather`` gives every rank the whole logits. The embedding, the norms, ``q_a_proj`` /
  ``kv_a_proj_with_mqa`` (the latent, so each rank's latent KV cache is the whole, replicated one) and
  the router stay replicated. With ``ep == 1`` the routed experts are split like the dense MLP.
- ``ep`` ∈ {1, W}: **expert parallelism**. Rank ``r`` owns the routed experts
  ``[r·E/W, (r+1)·E/W)`` and loads only those. Activations are replicated (every rank holds every
  token), so rank ``r`` takes the ``r``-th of ``W`` contiguous token chunks, sends each of its tokens to
  the ranks owning its experts (``ep_dispatch``), runs its local experts as one grouped GEMM, brings the
  results back (``ep_combine``), writes them into its rows of a zero ``[T, hidden]`` buffer, and one
  ``all_reduce`` of that buffer, together with the shared experts' output, gives every rank every token.
- ``W > 1`` needs ``tp`` or ``ep`` equal to ``W``; ``tp = ep = W`` is the usual DeepSeek deployment
  (attention and dense layers tensor-parallel, the MoE expert-parallel, over the same group). Any other
  combination is refused with the reason.

Weights keep their checkpoint names; a rank's dict holds its slice of each split weight under the
same name and omits the routed experts it does not own. :func:`split_for` says what a rank keeps of a
weight, :func:`shard_weight` cuts it (FP8 128×128 blocks and INT8 rows included: an FP8 weight splits
only on block boundaries, else :class:`ParallelError` names the weight and the dimension),
:func:`shard_state_dict` does it for a whole state dict, :func:`local_shapes` gives a rank's expected
shapes, and :func:`init_parallel` starts the process group from torchrun's environment.
:meth:`ParallelConfig.check` refuses, before any weight is built or read, a layout the config does not
divide into, ``--ep`` alone on a model without routed experts, and (given which weights are FP8) an FP8
weight ``tp`` cannot split on its 128-blocks.

``ParallelConfig()`` (``tp = ep = 1``) is one process: the model then runs exactly its single-process
code, without a collective.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from hal.errors import HALError
from hal.model.config import ModelConfig
from hal.model.weights import Fp8Weight, Int8Weight, Weight, expected_shapes, is_linear

if TYPE_CHECKING:
    from hal.backend import Backend

__all__ = [
    "DROP",
    "FP8_BLOCK",
    "ParallelConfig",
    "ParallelError",
    "Split",
    "init_parallel",
    "local_shapes",
    "quantized_to_fp8",
    "shard_state_dict",
    "shard_weight",
    "split_for",
]

#: Edge of the square tiles an FP8 weight is scaled by; an FP8 split must fall on a multiple of it.
FP8_BLOCK = 128


class ParallelError(HALError, ValueError):
    """A tp/ep layout that cannot run: a bad combination, a size that does not divide, an FP8 split off
    the 128-block grid, or a parallel run without torchrun's environment."""


@dataclass(frozen=True)
class ParallelConfig:
    """How one model is spread over the ranks of a process group.

    :param tp: tensor-parallel degree (1 or the world size).
    :param ep: expert-parallel degree (1 or the world size).
    :param rank: this process's rank in ``group``.
    :param group: the ``torch.distributed`` process group of the collectives; ``None`` is the world. A
        group given must be started, hold ``max(tp, ep)`` ranks and have this process as ``rank``.
    :param ep_low_latency_tokens: an expert-parallel MoE layer whose per-rank chunk has at most this many
        tokens (decode) dispatches in ``ep_dispatch``'s low-latency mode (one fixed-size exchange, as
        DeepEP does for decode); larger chunks (prefill) use the normal mode. ``0``: always normal.
    """

    tp: int = 1
    ep: int = 1
    rank: int = 0
    group: Any = None
    ep_low_latency_tokens: int = 128

    def __post_init__(self) -> None:
        for name in ("tp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParallelError(f"--{name}: expected a positive int, got {value!r}")
        ll = self.ep_low_latency_tokens
        if isinstance(ll, bool) or not isinstance(ll, int) or ll < 0:
            raise ParallelError(f"ep_low_latency_tokens: expected a non-negative int, got {ll!r}")
        if self.tp > 1 and self.ep > 1 and self.tp != self.ep:
            raise ParallelError(
                f"--tp {self.tp} --ep {self.ep}: tensor and expert parallelism share one group, so when both are "
                "above 1 they must be equal (e.g. --tp 2 --ep 2 on 2 processes)"
            )
        if not 0 <= self.rank < self.world_size:
            raise ParallelError(
                f"rank {self.rank} is outside the {self.world_size} ranks of --tp {self.tp} --ep {self.ep}"
            )
        if self.group is not None:
            self._check_group()

    def _check_group(self) -> None:
        """The collectives run on ``group``: its size must be the layout's and this process must be ``rank``."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ParallelError("ParallelConfig: a group was given, but torch.distributed is not initialized")
        try:
            size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        except (RuntimeError, ValueError) as exc:
            raise ParallelError(f"ParallelConfig: cannot read the group given ({exc})") from None
        if (size, rank) != (self.world_size, self.rank):
            member = f"is its rank {rank}" if rank >= 0 else "is not in it"
            raise ParallelError(
                f"ParallelConfig: --tp {self.tp} --ep {self.ep} needs a group of {self.world_size} ranks in which this "
                f"process is rank {self.rank}; the group given has {size} ranks and this process {member}"
            )

    @classmethod
    def create(cls, tp: int, ep: int, *, rank: int, world_size: int, group: Any = None) -> ParallelConfig:
        """A layout for ``world_size`` processes, checked: ``tp`` and ``ep`` are 1 or ``world_size``, and at
        least one of them is ``world_size`` when it is above 1.

        :raises ParallelError: naming the rule broken and a combination that works.
        """
        if world_size < 1:
            raise ParallelError(f"world size must be positive, got {world_size}")
        if tp > 1 and ep > 1 and tp != ep:
            raise ParallelError(
                f"--tp {tp} --ep {ep}: each is 1 or the world size, so two above 1 must be equal; "
                f"give --tp {tp} --ep {tp}, --tp {ep} --ep {ep}, or one of them alone"
            )
        for name, value in (("tp", tp), ("ep", ep)):
            if value not in (1, world_size):
                raise ParallelError(
                    f"--{name} {value} on {world_size} process(es): --{name} must be 1 or the world size "
                    f"({world_size}); launch with torchrun --nproc-per-node {value}, or give --{name} {world_size}"
                )
        if world_size > 1 and tp == ep == 1:
            raise ParallelError(
                f"{world_size} processes but --tp 1 --ep 1: every rank would run the whole model; give "
                f"--tp {world_size} and/or --ep {world_size}, or run one process"
            )
        return cls(tp=tp, ep=ep, rank=rank, group=group)

    @property
    def world_size(self) -> int:
        return max(self.tp, self.ep)

    @property
    def tp_rank(self) -> int:
        return self.rank if self.tp > 1 else 0

    @property
    def ep_rank(self) -> int:
        return self.rank if self.ep > 1 else 0

    def check(self, cfg: ModelConfig, *, fp8: Callable[[str, tuple[int, ...]], bool] | None = None) -> None:
        """Raise :class:`ParallelError` when this layout cannot run ``cfg``: a config size ``tp`` / ``ep``
        does not divide (each one named); ``--ep`` without ``--tp`` on a model with no routed-expert layer
        (every rank would run the whole model, as with ``tp = ep = 1`` on several processes); with ``fp8``,
        an FP8 weight whose ``tp`` slices would cut its 128×128 scale blocks.

        It needs only the config, so a launcher calls it before any rendezvous or weight.

        :param fp8: which weights will be FP8, as ``fp8(name, full_shape)``: :func:`quantized_to_fp8` for
            ``--quantize fp8``, membership in the checkpoint's FP8 weights for an FP8 checkpoint kept FP8.
            ``None`` skips this check (:func:`shard_weight` still refuses a misaligned cut).
        """
        need: list[tuple[str, int, int]] = []
        if self.tp > 1:
            need += [("num_attention_heads", cfg.num_attention_heads, self.tp), ("vocab_size", cfg.vocab_size, self.tp)]
            if cfg.first_k_dense_replace > 0 or cfg.n_routed_experts == 0:
                need.append(("intermediate_size", cfg.intermediate_size, self.tp))
            if cfg.n_routed_experts and cfg.n_shared_experts:
                shared = cfg.moe_intermediate_size * cfg.n_shared_experts
                need.append(("moe_intermediate_size * n_shared_experts", shared, self.tp))
            if cfg.n_routed_experts and self.ep == 1:
                need.append(("moe_intermediate_size", cfg.moe_intermediate_size, self.tp))
        if self.ep > 1 and cfg.n_routed_experts:
            need.append(("n_routed_experts", cfg.n_routed_experts, self.ep))
        bad = [f"{name} ({size}) is not a multiple of {by}" for name, size, by in need if size % by]
        if bad:
            raise ParallelError(f"--tp {self.tp} --ep {self.ep} does not fit the model: " + "; ".join(bad))
        if self.ep > 1 and self.tp == 1 and not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
            why = (
                "the model has no routed experts (n_routed_experts 0)"
                if cfg.n_routed_experts == 0
                else f"every layer is dense (first_k_dense_replace {cfg.first_k_dense_replace} >= "
                f"num_hidden_layers {cfg.num_hidden_layers})"
            )
            raise ParallelError(
                f"--ep {self.ep}: {why}, so expert parallelism has nothing to split and every rank would run the "
                f"whole model; give --tp {self.ep}, or run one process"
            )
        if fp8 is not None and self.tp > 1:
            self._check_fp8(cfg, fp8)

    def _check_fp8(self, cfg: ModelConfig, fp8: Callable[[str, tuple[int, ...]], bool]) -> None:
        cuts: dict[str, int] = {}  # weight kind (layers and experts shown as *) → the size cut off the grid
        for name, shape in expected_shapes(cfg).items():
            split = split_for(name, shape, cfg, self)
            if isinstance(split, Split) and split.size % FP8_BLOCK and fp8(name, shape):
                kind = re.sub(r"\.\d+\.", ".*.", name) + f" {_DIM_NAMES[split.dim].split()[0]}"
                cuts.setdefault(kind, shape[split.dim])
        if cuts:
            listed = ", ".join(f"{kind} ({full})" for kind, full in cuts.items())
            sizes = "; ".join(_fp8_fits(full) for full in dict.fromkeys(cuts.values()))
            raise ParallelError(
                f"--tp {self.tp} with FP8 weights: an FP8 weight splits only on its {FP8_BLOCK}x{FP8_BLOCK} scale "
                f"blocks, and --tp {self.tp} would cut these off them: {listed}. {sizes[0].upper()}{sizes[1:]}. "
                f"{_FP8_REMEDY}"
            )

    def local_experts(self, cfg: ModelConfig) -> range:
        """The global ids of the routed experts this rank holds (all of them without expert parallelism)."""
        n = cfg.n_routed_experts // self.ep
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    def token_range(self, num_tokens: int) -> tuple[int, int]:
        """``[lo, hi)``: the contiguous chunk of ``num_tokens`` replicated tokens this rank dispatches to the
        experts (the ``ep_rank``-th of ``ep`` chunks of ``ceil(T / ep)``; the last ones may be short or empty)."""
        chunk = -(-num_tokens // self.ep)
        lo = min(num_tokens, self.ep_rank * chunk)
        return lo, min(num_tokens, lo + chunk)

    def vocab_range(self, cfg: ModelConfig) -> tuple[int, int]:
        """``[lo, hi)``: the vocabulary rows of the LM head this rank holds."""
        n = cfg.vocab_size // self.tp
        return self.tp_rank * n, (self.tp_rank + 1) * n


# ---------------------------------------------------------------------------------------------------
# What each rank keeps of each weight
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """The slice of a 2-D weight ``[N, K]`` a rank keeps: ``[start, stop)`` along ``dim``.

    :ivar dim: 0 splits the rows (output features), 1 the columns (input features).
    :ivar start: first kept row or column.
    :ivar stop: one past the last.
    :ivar parts: into how many equal slices the dimension is cut (for messages).
    """

    dim: int
    start: int
    stop: int
    parts: int

    @property
    def size(self) -> int:
        return self.stop - self.start


#: :func:`split_for`'s answer for a routed expert another rank owns: the rank does not hold it at all.
DROP: Final = "drop"

_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
_ROWS = ("gate_proj.weight", "up_proj.weight")  # output features: the intermediate dimension
_COLS = ("down_proj.weight",)  # input features: the intermediate dimension


def split_for(
    name: str, shape: tuple[int, ...], cfg: ModelConfig, par: ParallelConfig
) -> Split | Literal["drop"] | None:
    """What rank ``par.rank`` keeps of the checkpoint weight ``name`` of (full) ``shape``.

    :returns: a :class:`Split` (a slice of rows or columns), :data:`DROP` (a routed expert another rank
        owns), or ``None`` (the whole weight: replicated).
    """
    expert = _EXPERT.match(name)
    if expert is not None and par.ep > 1:
        return None if int(expert.group(1)) in par.local_experts(cfg) else DROP
    if par.tp == 1:
        return None
    if len(shape) != 2:
        return None
    n, k = shape
    if name == "lm_head.weight":
        return _part(0, n, par)
    if ".self_attn." in name:
        if name.endswith(("q_proj.weight", "q_b_proj.weight", "kv_b_proj.weight")):
            return _part(0, n, par)  # whole heads: rows are head-major
        if name.endswith("o_proj.weight"):
            return _part(1, k, par)
        return None
    if ".mlp." in name and not name.endswith("mlp.gate.weight"):
        if name.endswith(_ROWS):
            return _part(0, n, par)
        if name.endswith(_COLS):
            return _part(1, k, par)
    return None


def _part(dim: int, size: int, par: ParallelConfig) -> Split:
    step = size // par.tp
    return Split(dim, par.tp_rank * step, (par.tp_rank + 1) * step, par.tp)


def local_shapes(cfg: ModelConfig, par: ParallelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight rank ``par.rank`` holds, by checkpoint name, with its local shape."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in expected_shapes(cfg).items():
        split = split_for(name, shape, cfg, par)
        if split == DROP:
            continue
        if isinstance(split, Split):
            shape = tuple(split.size if d == split.dim else s for d, s in enumerate(shape))
        out[name] = shape
    return out


_DIM_NAMES = ("rows (output features)", "columns (input features)")
_FP8_REMEDY = (
    "Run with --tp 1 (--ep N alone keeps every weight whole), or without FP8 weights (no --quantize fp8; an FP8 "
    "checkpoint on a backend without FP8 arithmetic is converted at load and splits freely)"
)


def _fp8_fits(full: int) -> str:
    """Which ``--tp`` split a dimension of ``full`` on FP8 block boundaries, in words (none, often)."""
    blocks, rest = divmod(full, FP8_BLOCK)
    if rest:
        return f"{full} is not a multiple of {FP8_BLOCK}, so no --tp above 1 splits it on block boundaries"
    fits = [d for d in range(2, blocks + 1) if blocks % d == 0]
    if not fits:
        return f"{full} is a single {FP8_BLOCK}-block, so no --tp above 1 splits it on block boundaries"
    shown = ", ".join(map(str, fits[:6])) + (", ..." if len(fits) > 6 else "")
    return f"{full} is {blocks} blocks of {FP8_BLOCK}: only a --tp that divides {blocks} ({shown}) splits it"


def quantized_to_fp8(name: str, shape: tuple[int, ...]) -> bool:
    """Whether ``--quantize fp8`` makes the weight ``name`` of ``shape`` FP8: a linear weight whose K (last
    dimension) is a multiple of 128 (:func:`hal.model.loader.quantize_linear`); for :meth:`ParallelConfig.check`."""
    return is_linear(name) and len(shape) >= 2 and shape[-1] % FP8_BLOCK == 0


def shard_weight(name: str, w: Weight, split: Split) -> Weight:
    """``w``'s slice ``split``: a plain tensor, or an FP8 / INT8 weight with its scales cut to match.

    An :class:`~hal.model.weights.Fp8Weight` holds one scale per 128×128 block, so its slice must start
    on a block boundary and end on one (or at the end of the dimension); an
    :class:`~hal.model.weights.Int8Weight` has one scale per row, so rows take their scales along and
    column slices keep every row's scale.

    :raises ParallelError: an FP8 slice off the block grid, naming the weight, the dimension, the sizes
        and the remedy.
    """
    full = w.shape[split.dim]
    if isinstance(w, Fp8Weight):
        aligned = split.start % FP8_BLOCK == 0 and (split.stop % FP8_BLOCK == 0 or split.stop == full)
        if not aligned:
            raise ParallelError(
                f"{name}: splitting its {_DIM_NAMES[split.dim]} ({full}) into {split.parts} parts of {split.size} "
                f"cuts FP8 {FP8_BLOCK}x{FP8_BLOCK} scale blocks (slice [{split.start}, {split.stop})); "
                f"{_fp8_fits(full)}. {_FP8_REMEDY}"
            )
        lo, hi = split.start // FP8_BLOCK, -(-split.stop // FP8_BLOCK)
        return Fp8Weight(
            w.q.narrow(split.dim, split.start, split.size).contiguous(),
            w.scale.narrow(split.dim, lo, hi - lo).contiguous(),
        )
    if isinstance(w, Int8Weight):
        q = w.q.narrow(split.dim, split.start, split.size).contiguous()
        scale = w.scale.narrow(0, split.start, split.size).contiguous() if split.dim == 0 else w.scale
        return Int8Weight(q, scale)
    return w.narrow(split.dim, split.start, split.size).contiguous()


def shard_state_dict(weights: Mapping[str, Weight], cfg: ModelConfig, par: ParallelConfig) -> dict[str, Weight]:
    """The weights rank ``par.rank`` holds, from the whole (checkpoint-named) state dict.

    Every rank that builds the same full weights (the same seed) and calls this gets its own slice of
    them, which is how ``hal run --tp/--ep`` builds the tiny model; a checkpoint is better read slice by
    slice (:func:`hal.model.loader.load_weights` with ``parallel``).
    """
    par.check(cfg)
    out: dict[str, Weight] = {}
    for name, w in weights.items():
        split = split_for(name, tuple(w.shape), cfg, par)
        if split == DROP:
            continue
        out[name] = shard_weight(name, w, split) if isinstance(split, Split) else w
    return out


# ---------------------------------------------------------------------------------------------------
# Starting the group
# ---------------------------------------------------------------------------------------------------


def init_parallel(tp: int, ep: int, backend: Backend, *, timeout_s: float | None = None) -> ParallelConfig | None:
    """The layout of ``hal run --tp TP --ep EP``: ``None`` for one process, else a started process group.

    Reads torchrun's ``WORLD_SIZE`` first, so a bad combination or a missing launcher fails before any
    rendezvous, then starts the default group with :func:`hal.distributed.init`.

    :raises ParallelError: ``tp`` / ``ep`` above 1 without torchrun's environment, or a combination
        :meth:`ParallelConfig.create` refuses (several processes with ``tp = ep = 1`` included).
    :raises hal.errors.CollectiveError: the rendezvous failed.
    """
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        if tp == ep == 1:
            return None
        n = max(tp, ep)
        ParallelConfig.create(tp, ep, rank=0, world_size=n)  # a combination no launch can run is said first
        raise ParallelError(
            f"--tp {tp} --ep {ep} runs on {n} processes started by torchrun, and torchrun's environment "
            f"(WORLD_SIZE, RANK, ...) is not set: launch with torchrun --nproc-per-node {n} -m hal.cli run "
            f"--tp {tp} --ep {ep} ..."
        )
    try:
        world = int(raw)
    except ValueError:
        raise ParallelError(f"WORLD_SIZE must be an integer, got {raw!r}") from None
    if world == 1 and tp == ep == 1:
        return None
    ParallelConfig.create(tp, ep, rank=0, world_size=world)  # checked before the rendezvous
    import hal.distributed

    info = hal.distributed.init(backend, timeout_s=timeout_s)
    return ParallelConfig.create(tp, ep, rank=info.rank, world_size=info.world_size)
