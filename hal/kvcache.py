"""The paged latent KV cache of MLA: fixed-size blocks of tokens, a block table per sequence.

MLA caches one latent vector per token and layer (``kv_lora_rank + qk_rope_head_dim`` values, 576 for
DeepSeek-V3) instead of per-head keys and values. The cache stores them in pages of ``block_size``
tokens (64, FlashMLA's page size) in the layout ``mla_decode`` reads, ``[num_blocks, block_size, 1, d]``
per layer. Sequences own blocks through a block table; blocks return to a free list when a sequence
is freed. Running out of blocks raises :class:`~hal.errors.KVCacheExhaustedError` and changes nothing.

Plain, device-agnostic torch: the bookkeeping lives on the host, the storage on any device.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from hal.errors import KVCacheError, KVCacheExhaustedError
from hal.ops.catalogue import KV_BLOCK_SIZE

__all__ = ["PagedKVCache"]


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0


def _positive_int(name: str, value: object) -> int:
    # bool is an int subclass; PagedKVCache(True, ...) is a mistake, not one layer.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise KVCacheError(f"PagedKVCache: {name} must be a positive int, got {value!r}")
    return value


class PagedKVCache:
    """A paged latent KV cache for ``num_layers`` layers sharing one block allocator.

    Every layer has the same block table: a sequence's token ``p`` lives, in every layer, at block
    ``block_table[p // block_size]``, row ``p % block_size``. Storage is zero-initialized; rows past a
    sequence's length (and the zero padding of :meth:`block_table`) are never meant to be read, since
    ``mla_decode`` bounds reads with :meth:`seqlens`.

    :param num_layers: layers that cache latents.
    :param num_blocks: blocks in the pool, shared by all sequences.
    :param entry_dim: values per token, ``kv_lora_rank + qk_rope_head_dim`` (576 for DeepSeek-V3).
    :param block_size: tokens per block (64, FlashMLA's page size).
    :param dtype: the entries' dtype.
    :param device: where the storage lives.

    Example::

        cache = PagedKVCache(num_layers=2, num_blocks=16, entry_dim=576)
        cache.add_sequence("a")
        slots = cache.reserve("a", 70)            # 2 blocks; int64 [70]
        for i in range(2):
            cache.write(i, slots, latents[i])     # latents[i]: bfloat16 [70, 576]
        out = backend.mla_decode(q, cache.layer(0), cache.block_table(["a"]), cache.seqlens(["a"]), ...)
        cache.free("a")                           # its blocks go back to the pool
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        entry_dim: int,
        *,
        block_size: int = KV_BLOCK_SIZE,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_layers = _positive_int("num_layers", num_layers)
        self.num_blocks = _positive_int("num_blocks", num_blocks)
        self.entry_dim = _positive_int("entry_dim", entry_dim)
        self.block_size = _positive_int("block_size", block_size)
        if not isinstance(dtype, torch.dtype):
            raise KVCacheError(f"PagedKVCache: dtype must be a torch.dtype, got {dtype!r}")
        self.dtype = dtype
        shape = (num_layers, num_blocks, block_size, 1, entry_dim)
        try:
            self._data = torch.zeros(shape, dtype=dtype, device=device)
        except RuntimeError as exc:  # torch.OutOfMemoryError included; a size past int64 fails the same way
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not isinstance(exc, torch.OutOfMemoryError) and not ("alloc" in reason or "overflow" in reason):
                raise
            need = math.prod(shape) * dtype.itemsize
            raise KVCacheError(
                f"PagedKVCache: cannot allocate {need / 2**30:,.1f} GiB on {device} for {num_blocks} blocks of "
                f"{block_size} tokens x {num_layers} layers x {entry_dim} {str(dtype).removeprefix('torch.')} "
                f"values ({reason}); ask for fewer blocks: fewer or shorter sequences, or fewer new tokens"
            ) from None
        # The storage's device, not torch.device(device): "cuda" becomes "cuda:0", which is what input
        # tensors report and what write() compares against.
        self.device = self._data.device
        # A stack: pop() hands out the lowest-numbered block first, which keeps fresh caches easy to read.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._seqs: dict[Hashable, _Sequence] = {}

    # -- storage ----------------------------------------------------------------------------------

    def layer(self, i: int) -> torch.Tensor:
        """Layer ``i``'s storage, ``[num_blocks, block_size, 1, entry_dim]``, a view (what ``mla_decode`` takes)."""
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_layers:
            raise KVCacheError(f"PagedKVCache: layer must be an int in [0, {self.num_layers}), got {i!r}")
        return self._data[i]

    def write(self, layer: int, slots: torch.Tensor, entries: torch.Tensor) -> None:
        """Store ``entries[j]`` at flat slot ``slots[j]`` of layer ``layer``.

        :param layer: the layer, ``0 <= layer < num_layers``.
        :param slots: int64 | int32 [n], from :meth:`reserve`, on the cache's device.
        :param entries: the cache's dtype [n, entry_dim], on the cache's device.
        """
        storage = self.layer(layer)
        if not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype not in (torch.int64, torch.int32):
            raise KVCacheError(f"PagedKVCache.write: slots must be an int64 | int32 tensor [n], got {_describe(slots)}")
        n = slots.shape[0]
        if not isinstance(entries, torch.Tensor) or tuple(entries.shape) != (n, self.entry_dim):
            raise KVCacheError(
                f"PagedKVCache.write: entries must be [{n}, {self.entry_dim}] (one row per slot), "
                f"got {_describe(entries)}"
            )
        if entries.dtype != self.dtype:
            raise KVCacheError(
                f"PagedKVCache.write: entries must be {self.dtype} (the cache's dtype), got {entries.dtype}; "
                "convert them with .to(cache.dtype)"
            )
        for name, t in (("slots", slots), ("entries", entries)):
            if t.device != self.device:
                raise KVCacheError(
                    f"PagedKVCache.write: {name} is on {t.device}, the cache on {self.device}; move it there"
                )
        capacity = self.num_blocks * self.block_size
        # Range-check only host tensors: on an accelerator the check would cost a host sync per layer
        # per step, and slots from reserve() are in range by construction.
        if self.device.type == "cpu" and n and (int(slots.min()) < 0 or int(slots.max()) >= capacity):
            raise KVCacheError(
                f"PagedKVCache.write: slots must lie in [0, {capacity}), got values in "
                f"[{int(slots.min())}, {int(slots.max())}]"
            )
        # index_put_, not index_copy_: index_copy_ has no fp8 kernel on the CPU.
        storage.view(capacity, self.entry_dim).index_put_((slots.long(),), entries)

    # -- sequences --------------------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable) -> None:
        """Start an empty sequence ``seq_id`` (owning no block yet)."""
        if seq_id in self:
            raise KVCacheError(f"PagedKVCache: sequence {seq_id!r} already exists; free it first or use a new id")
        self._seqs[seq_id] = _Sequence()

    def reserve(self, seq_id: Hashable, num_new_tokens: int) -> torch.Tensor:
        """Append ``num_new_tokens`` tokens to ``seq_id``, allocating blocks as needed.

        All or nothing: when the pool lacks the blocks, raises :class:`~hal.errors.KVCacheExhaustedError`
        and leaves every sequence and the free list as they were.

        :returns: int64 [num_new_tokens] on the cache's device, the flat slot of each new token
            (``block * block_size + row``), for :meth:`write`.
        """
        seq = self._get(seq_id)
        if not isinstance(num_new_tokens, int) or isinstance(num_new_tokens, bool) or num_new_tokens < 0:
            raise KVCacheError(
                f"PagedKVCache.reserve: sequence {seq_id!r}: num_new_tokens must be a non-negative int, "
                f"got {num_new_tokens!r}"
            )
        start = seq.length
        end = start + num_new_tokens
        needed = -(-end // self.block_size) - len(seq.blocks)
        if needed > len(self._free):
            raise KVCacheExhaustedError(
                f"PagedKVCache.reserve: sequence {seq_id!r} needs {needed} more block(s) of {self.block_size} "
                f"tokens for {num_new_tokens} new token(s), but only {len(self._free)} of {self.num_blocks} "
                "are free; free finished sequences or build the cache with more blocks"
            )
        for _ in range(needed):
            seq.blocks.append(self._free.pop())
        seq.length = end
        positions = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.tensor(seq.blocks, dtype=torch.int64)
        slots = blocks[positions // self.block_size] * self.block_size + positions % self.block_size
        return slots.to(self.device)

    def free(self, seq_id: Hashable) -> None:
        """Forget ``seq_id`` and return its blocks to the pool (their contents are left as they are)."""
        seq = self._get(seq_id)
        del self._seqs[seq_id]
        self._free.extend(reversed(seq.blocks))

    def seq_len(self, seq_id: Hashable) -> int:
        """Tokens reserved so far for ``seq_id``."""
        return self._get(seq_id).length

    def block_table(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """The block table of a batch: int32 [b, max_blocks] on the cache's device.

        Row ``i`` lists the blocks of ``seq_ids[i]`` in order, padded with 0 to the longest row. The
        padding is never read: :meth:`seqlens` bounds every read.
        """
        seqs = [self._get(s) for s in seq_ids]
        width = max((len(s.blocks) for s in seqs), default=0)
        table = torch.zeros((len(seqs), width), dtype=torch.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        return table.to(self.device)

    def seqlens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """The length of each sequence of a batch: int32 [b] on the cache's device (``cache_seqlens``)."""
        return torch.tensor([self._get(s).length for s in seq_ids], dtype=torch.int32).to(self.device)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence owns."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks owned by some sequence."""
        return self.num_blocks - len(self._free)

    def __contains__(self, seq_id: object) -> bool:
        try:
            return seq_id in self._seqs
        except TypeError:
            raise KVCacheError(f"PagedKVCache: sequence id must be hashable, got {seq_id!r}") from None

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(num_layers={self.num_layers}, num_blocks={self.num_blocks}, entry_dim={self.entry_dim}, "
            f"block_size={self.block_size}, dtype={self.dtype}, device={self.device}, "
            f"sequences={len(self._seqs)}, used_blocks={self.num_used_blocks})"
        )

    def _get(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KVCacheError(f"PagedKVCache: unknown sequence {seq_id!r}; call add_sequence first") from None
        except TypeError:
            raise KVCacheError(f"PagedKVCache: sequence id must be hashable, got {seq_id!r}") from None


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)}"
    return type(x).__name__
