"""The paged KV cache: one pool of fixed-size pages shared by every sequence, a page table per sequence.

A sequence holds only the pages its positions need (``ceil(length / page_tokens)``), not ``max_context``
positions, so many sequences of different lengths share a pool the planner counted once (the vLLM PagedAttention
idea). Position ``p`` of a sequence lives in page ``pages[p // P]`` at offset ``p % P``; its *slot* is
``page * P + offset``, an index into the pool's flat view.

Layout (L layers, N pages of P positions, KVH KV heads of D):

    keys, values   [L, N + 1, P, KVH, D]   bf16 (the model's dtype), contiguous, allocated once at construction;
                                           page N (``padding_page``) is never reserved: rows that only pad a
                                           batch to a captured size write and read there
    layer view     [(N + 1) * P, KVH, D]   ``flat_keys(layer)``: a slot's row of every KV head

``KVPagePool`` promises:

* ``reserve(seq, length)`` gives ``seq`` (created on first use) pages for positions ``0 .. length - 1``; it takes
  all it needs or nothing, returning False when the pool cannot hold it. ``release(seq)`` returns its pages.
* ``free_tokens`` / ``total_tokens``: positions in pages nobody holds / in the N pages sequences can hold.
* ``slots(seq, start, stop)``: the slots of positions ``start .. stop - 1`` (int64, on the pool's device);
  ``page_table(seqs)``: the sequences' pages as an int32 ``[B, max pages]`` tensor (rows padded with the
  padding page).
* ``write(layer, slots, k, v)`` stores ``k``/``v`` ``[T, KVH, D]`` at ``slots``; ``gather(layer, seq, length)``
  returns a sequence's first ``length`` keys and values ``[length, KVH, D]``, in position order.

Pages are host-side bookkeeping: nothing here synchronises with the device. It knows nothing about models,
requests or sampling.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from protocol.defaults import KV_PAGE_TOKENS


class KVPagePool:
    """Keys and values of every layer for ``capacity_tokens`` positions (rounded up to whole pages)."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity_tokens: int,
        device: torch.device | str,
        dtype: torch.dtype = torch.bfloat16,
        page_tokens: int = KV_PAGE_TOKENS,
    ):
        if capacity_tokens < 1 or page_tokens < 1:
            raise ValueError(f"capacity_tokens ({capacity_tokens}) and page_tokens ({page_tokens}) must be positive")
        self.page_tokens = page_tokens
        self.num_pages = math.ceil(capacity_tokens / page_tokens)
        self.device = torch.device(device)
        # One more page that no sequence gets: the rows that pad a captured batch write there and read only it.
        self.padding_page = self.num_pages
        shape = (num_layers, self.num_pages + 1, page_tokens, num_kv_heads, head_dim)  # (L, N + 1, P, KVH, D)
        self.keys = torch.zeros(shape, dtype=dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=dtype, device=self.device)
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))  # a stack: page 0 is handed out first
        self._pages: dict[Hashable, list[int]] = {}

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def total_tokens(self) -> int:
        return self.num_pages * self.page_tokens

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.page_tokens

    def pages_for(self, length: int) -> int:
        """Pages a sequence of ``length`` positions holds."""
        return -(-length // self.page_tokens)

    def can_reserve(self, seq: Hashable, length: int) -> bool:
        held = len(self._pages.get(seq, ()))
        return self.pages_for(length) - held <= len(self._free)

    def reserve(self, seq: Hashable, length: int) -> bool:
        """Pages for ``seq``'s positions ``0 .. length - 1``: True when it holds them now, False (and no change)
        when the pool has too few free pages."""
        pages = self._pages.setdefault(seq, [])
        missing = self.pages_for(length) - len(pages)
        if missing > len(self._free):
            if not pages:
                del self._pages[seq]
            return False
        for _ in range(missing):
            pages.append(self._free.pop())
        return True

    def release(self, seq: Hashable) -> None:
        """Return ``seq``'s pages to the pool (nothing if it holds none)."""
        self._free.extend(reversed(self._pages.pop(seq, [])))

    def pages(self, seq: Hashable) -> tuple[int, ...]:
        return tuple(self._pages.get(seq, ()))

    def slot(self, seq: Hashable, position: int) -> int:
        """The slot of ``seq``'s (reserved) ``position``."""
        return self._pages[seq][position // self.page_tokens] * self.page_tokens + position % self.page_tokens

    def slots(self, seq: Hashable, start: int, stop: int) -> torch.Tensor:
        """Slots of ``seq``'s positions ``start .. stop - 1`` (they must be reserved): int64 [stop - start]."""
        pages = self._pages.get(seq, [])
        if stop > len(pages) * self.page_tokens or start < 0:
            raise IndexError(f"positions {start}..{stop - 1} of sequence {seq!r} are not reserved ({len(pages)} pages)")
        positions = torch.arange(start, stop)
        table = torch.tensor(pages, dtype=torch.long)
        return (table[positions // self.page_tokens] * self.page_tokens + positions % self.page_tokens).to(self.device)

    def page_table(self, seqs: Sequence[Hashable], width: int | None = None, *, device=None) -> torch.Tensor:
        """The pages of each of ``seqs``, a row each: int32 [len(seqs), width] (default: the longest), padded with
        the padding page, on ``device`` (default: the pool's)."""
        rows = [self._pages.get(seq, []) for seq in seqs]
        width = max([len(r) for r in rows] + [1]) if width is None else width
        table = torch.full((len(rows), width), self.padding_page, dtype=torch.int32)
        for i, row in enumerate(rows):
            table[i, : len(row)] = torch.tensor(row[:width], dtype=torch.int32)
        return table.to(self.device if device is None else device)

    def flat_keys(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys by slot: [N * P, KVH, D], a view."""
        return self.keys[layer].view(-1, *self.keys.shape[-2:])

    def flat_values(self, layer: int) -> torch.Tensor:
        return self.values[layer].view(-1, *self.values.shape[-2:])

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` [T, KVH, D] at ``slots`` [T] of layer ``layer``."""
        self.flat_keys(layer).index_copy_(0, slots, k.to(self.keys.dtype))
        self.flat_values(layer).index_copy_(0, slots, v.to(self.values.dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` (a sequence's, in position order): each [len(slots), KVH, D]."""
        return self.flat_keys(layer).index_select(0, slots), self.flat_values(layer).index_select(0, slots)
