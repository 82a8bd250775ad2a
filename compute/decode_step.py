"""The decode step written out over static buffers, one segment at a time (``compute.segments``).

``DecodeStep`` holds the static buffers of one decode step (token id, position, mask, hidden state, cos/sin, and the
token's embedding row when the embedding is in host memory) and ``run(segment)``, the segment's pieces over those
buffers: each decoder layer as a ``compute.decode.FusedDecodeLayer`` on CUDA where the model allows (its unit bound
through ``UnitBinder.bound``), else through the model's own HF modules with ``compute.grouped_attention``. Whatever
crosses a segment boundary goes through the buffers, so captured and eager segments can alternate. The causal mask
is computed on the device from the position buffer instead of by ``create_causal_mask`` (which asks the cache for
its length on the host), and nothing depends on a value read back from the device. Binding each unit around its
piece (the hooks of ``compute.model.UnitBinder`` for modules, ``UnitBinder.bound`` for fused layers) keeps the
binder in step: at capture it binds the resident views the graph keeps using, and in eager segments it acquires
and releases streamed units through the ring.

A step of ``rows`` rows (up to ``gemv_mma.MAX_ROWS``, fused layers only) runs the rows of one speculative pass:
``set_rows`` writes their tokens, rotary positions, the cache slot of the first (the rest follow it) and the drafted
tree's shape as one bit mask a row (``compute.decode.FusedDecodeLayer``), and ``run`` returns every row's logits.

It knows nothing about sampling, tokens, CUDA graphs or the loader's protocol.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import StaticCache

from compute.decode import FusedDecodeLayer, fused_decode_unsupported
from compute.grouped_attention import grouped_attention, register_grouped_attention
from compute.kernels.gemv_mma import MAX_ROWS
from compute.model import HostEmbedding
from compute.segments import Segment


def keyword_of(module: nn.Module, *candidates: str) -> str | None:
    """The first of ``candidates`` that ``module.forward`` takes by name, or None: the decoder layer's keywords
    differ between transformers versions (``cache`` in 5.24, ``past_key_values`` and ``cache_position`` in 5.17)."""
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in candidates if name in parameters), None)


class DecodeStep:
    """The static buffers of one decode step on ``device`` (a cache of ``max_context`` positions), and its pieces.

    The caller writes the token and position with ``set`` before each step. Between segments the hidden state
    lives in ``hidden`` (a segment that does not start with the prologue reads it there, one that does not end with
    the head writes it there), and every layer reads cos/sin and the mask from the buffers the prologue writes: all
    a captured segment exchanges with the rest of the step has a fixed address, so graphs and eager segments can
    alternate in any order the plan asks for.
    """

    def __init__(
        self, model: nn.Module, cache: StaticCache, device: torch.device, max_context: int, *,
        fused: bool | None = None, rows: int = 1,
    ):  # fmt: skip
        self.model = model
        self.cache = cache
        inner = model.model
        self.layers = inner.layers[: model.config.num_hidden_layers]
        # The decoder layers as FusedDecodeLayers (compute.decode): by default on CUDA where the model allows;
        # fused=True runs them anywhere (on CPU, under the Triton interpreter: tests), fused=False never.
        if fused is False:
            self.fused_unsupported = "switched off"
        elif fused is None and device.type != "cuda":
            self.fused_unsupported = f"the fused decode layer runs Triton kernels on CUDA (decode runs on {device})"
        else:
            self.fused_unsupported = fused_decode_unsupported(model.config, inner.embed_tokens.weight.dtype)
        if fused and self.fused_unsupported is not None:
            raise ValueError(f"fused decode layers were asked for, but {self.fused_unsupported}")
        if rows != 1 and (self.fused_unsupported is not None or not 1 <= rows <= MAX_ROWS):
            raise ValueError(
                f"a step of {rows} rows needs fused decode layers and 1 … {MAX_ROWS} rows "
                f"({self.fused_unsupported or 'fused layers run'})"
            )
        self.rows = rows
        self.fused_layers = None
        if self.fused_unsupported is None:
            self.fused_layers = [
                FusedDecodeLayer(layer, cache_layer, model.config) for layer, cache_layer in zip(self.layers, cache.layers)
            ]
        self._binder = model.unit_binder
        register_grouped_attention()
        dtype = inner.embed_tokens.weight.dtype
        self.ids = torch.zeros((1, rows), dtype=torch.long, device=device)  # (B, T): the tokens fed
        self.position = torch.zeros((1, rows), dtype=torch.long, device=device)  # (B, T): their rotary positions
        # the cache slot of the first row (the others follow it): one row's is its position
        self.slot = self.position.view(1) if rows == 1 else torch.zeros(1, dtype=torch.long, device=device)
        # row t attends the rows whose bits are set in tree[t] (None: one row, itself)
        self.tree = None if rows == 1 else torch.zeros(rows, dtype=torch.int32, device=device)
        self.cache_index = torch.arange(max_context, device=device).view(1, 1, 1, max_context)  # (B, 1, T, KV)
        self.mask = torch.zeros((1, 1, 1, max_context), dtype=torch.bool, device=device)  # (B, 1, T, KV): attend
        self.hidden = torch.zeros((1, rows, model.config.hidden_size), dtype=dtype, device=device)  # (B, T, hidden)
        # With the embedding in host memory, ``set`` copies the token's row here (the prologue reads it): a graph
        # cannot look a row up on the host, and the row is all a step needs.
        embedding = inner.embed_tokens
        self.host_embedding = embedding if isinstance(embedding, HostEmbedding) else None
        self.embedded = torch.zeros_like(self.hidden) if self.host_embedding is not None else None  # (B, T, hidden)
        self._staging = None  # pinned rows of the host embedding, for set_rows
        if self.host_embedding is not None and rows > 1:
            self._staging = torch.empty(self.hidden.shape[1:], dtype=dtype, pin_memory=device.type == "cuda")
        cos, sin = inner.rotary_emb(self.hidden, self.position)  # only their shapes and dtypes are wanted here
        self.cos = torch.empty_like(cos)  # (B, T, head_dim)
        self.sin = torch.empty_like(sin)
        self._layer_arguments = {
            "attention_mask": self.mask,
            "position_ids": self.position,
            "position_embeddings": (self.cos, self.sin),
            "use_cache": True,
            keyword_of(self.layers[0], "cache", "past_key_values"): cache,
        }
        if keyword_of(self.layers[0], "cache_position"):
            # Releases whose layers take cache_position (5.17) hand it to the cache's update, which may write there.
            self._layer_arguments["cache_position"] = self.position[0]

    def set(self, token: int, position: int) -> None:
        """Write the next step's token and position in place (small copies on the current stream, no host sync;
        with the embedding in host memory, the token's row from pinned memory)."""
        self.ids.fill_(token)
        self.position.fill_(position)
        if self.host_embedding is not None:
            self.embedded[0, 0].copy_(self.host_embedding.weight[token], non_blocking=True)

    def set_rows(self, tokens: list[int], positions: list[int], slot: int, tree: list[int]) -> None:
        """Write a pass of ``rows`` rows: their tokens and rotary positions, the first row's cache slot, and each
        row's bit mask of the rows it attends (bit j: row j). In place, by copies on the current stream."""
        if not len(tokens) == len(positions) == len(tree) == self.rows:
            raise ValueError(f"a step of {self.rows} rows got {len(tokens)} tokens, {len(positions)} positions and "
                             f"{len(tree)} masks")  # fmt: skip
        host = torch.tensor([tokens, positions], dtype=torch.long)
        self.ids.copy_(host[0].view(1, -1), non_blocking=True)
        self.position.copy_(host[1].view(1, -1), non_blocking=True)
        self.slot.fill_(slot)
        self.tree.copy_(torch.tensor(tree, dtype=torch.int32), non_blocking=True)
        if self.host_embedding is not None:
            torch.index_select(self.host_embedding.weight, 0, host[0], out=self._staging)
            self.embedded[0].copy_(self._staging, non_blocking=True)

    def run(self, segment: Segment) -> torch.Tensor | None:
        """Run ``segment``'s pieces (eagerly, or into a graph being captured); the logits ([vocab]; [rows, vocab]
        for a step of several rows) when it ends with the head, else None. The keys/values of its layers go into the
        cache at each layer's ``cumulative_length`` (a device tensor the layer advances), which the caller keeps
        equal to the position; the fused layers write at ``slot`` (the position, for one row) and on.
        """
        inner = self.model.model
        with grouped_attention(self.model.config):
            if segment.embeds:
                if self.fused_layers is None:  # HF's layers take the mask; the fused ones read the position
                    torch.le(self.cache_index, self.position.view(1, 1, 1, 1), out=self.mask)
                # (B, T, hidden); the host embedding's row is already in ``embedded`` (``set``)
                hidden = self.embedded if self.host_embedding is not None else inner.embed_tokens(self.ids)
                cos, sin = inner.rotary_emb(hidden, self.position)
                self.cos.copy_(cos)
                self.sin.copy_(sin)
            else:
                hidden = self.hidden
            normed = None  # the next fused layer's input norm, made by the layer before it in this segment
            for n, index in enumerate(segment.layers):
                if self.fused_layers is not None:
                    following = segment.layers[n + 1] if n + 1 < len(segment.layers) else None
                    next_norm = None if following is None else self.layers[following].input_layernorm
                    with self._binder.bound(index):  # layer i is unit i (plan_segments checks the order)
                        hidden, normed = self.fused_layers[index](
                            hidden, self.slot, self.cos, self.sin, tree=self.tree, normed=normed, next_norm=next_norm
                        )
                    continue
                hidden = self.layers[index](hidden, **self._layer_arguments)
                if isinstance(hidden, tuple):  # decoder layers of some 5.x releases return (hidden_states,)
                    hidden = hidden[0]
            if segment.head:
                logits = self.model.lm_head(inner.norm(hidden))[0]  # (T, vocab)
                return logits[-1] if self.rows == 1 else logits
        self.hidden.copy_(hidden)
        return None

    def cache_lengths(self) -> list[torch.Tensor]:
        """A copy of every cache layer's write position, for ``restore_cache_lengths``."""
        return [layer.cumulative_length.clone() for layer in self.cache.layers]

    def restore_cache_lengths(self, lengths: list[torch.Tensor]) -> None:
        """Move the write positions back in place (a captured graph holds those very tensors)."""
        for layer, length in zip(self.cache.layers, lengths):
            layer.cumulative_length.copy_(length)
