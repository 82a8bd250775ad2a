"""The decode step written out over static buffers, and its capture as a CUDA graph.

At batch 1 a 64-layer model launches over a thousand small kernels per token; eager PyTorch and HF transformers
spend more time issuing them (Python, hooks, mask building) than the GPU spends reading the weights. When every
unit is resident its weights sit at fixed addresses in the pool, the KV cache is static, and one token's forward
is the same sequence of kernels every time: captured once, it replays with one launch per token.

This module promises:

* ``DecodeInputs``: the static input buffers of one decode step (token id, position); the caller writes them in
  place before each step, and they are the only inputs a captured graph reads besides weights and cache.
* ``decode_forward(model, cache, inputs)``: one token through the model's own HF modules (embedding, decoder
  layers, norm, lm_head) without the parts of ``Qwen2ForCausalLM.forward`` that cannot be captured: the causal
  mask is computed on the device from the position buffer instead of by ``create_causal_mask`` (which asks the
  cache for its length on the host), and nothing depends on a value read back from the device. Calling the
  decoder layers and the lm_head as modules keeps the unit hooks (``compute.model.UnitBinder``) running, so at
  capture they bind the resident views the graph then keeps using.
* Attention in the decode step reads each KV head once (``grouped_decode_attention``): with an explicit mask,
  transformers' SDPA path first copies every KV head once per query head sharing it (``repeat_kv``), which for
  the 32B model (40 query heads on 8 KV heads) at a 4096-token cache adds ~11 GB of memory traffic per token,
  two thirds of the weights' 16.5 GB. Prefill keeps transformers' own attention.
* ``DecodeGraph.capture(step)``: warm-up on a side stream, then capture; ``replay()`` returns the static logits.
* ``unit_addresses_fixed(weights)``: None when every unit's views keep their addresses, else the reason not.

It knows nothing about sampling, tokens or the loader's protocol beyond the ``plan`` the client exposes.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

log = logging.getLogger(__name__)

DECODE_ATTENTION = "spillover_grouped_decode"  # the name the decode attention is registered under in transformers
WARMUP_STEPS = 2  # eager runs on the side stream before capture (lazy inits, Triton compiles, cuBLAS workspaces)


def keyword_of(module: nn.Module, *candidates: str) -> str | None:
    """The first of ``candidates`` that ``module.forward`` takes by name, or None: the decoder layer's keywords
    differ between transformers versions (``cache`` in 5.24, ``past_key_values`` and ``cache_position`` in 5.17)."""
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in candidates if name in parameters), None)


def grouped_decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for one query position that reads each KV head once: ``query`` (B, H, 1, D) is regrouped as
    (B, KVH, H / KVH, D), the query heads sharing a KV head becoming rows of one product with ``key`` and
    ``value`` (B, KVH, KV, D); ``attention_mask`` is boolean (B, 1, 1, KV), True where to attend. Returns
    (B, 1, H, D) as transformers' attention functions do. More than one query position, or dropout, goes to
    transformers' SDPA unchanged.

    The arithmetic is transformers' eager attention (bf16 scores, softmax in fp32) without its ``repeat_kv``.
    Plain batched matmuls rather than SDPA: on the H200 (2026-11-29, 4096-token cache, 8 KV heads) cuDNN's SDPA
    took 83 µs per layer for this shape, one program per KV head, while the whole layer's weights take ~60 µs to
    read; matmuls spread the cache over the GPU like any other product.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or dropout or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = dim**-0.5 if scaling is None else scaling
    # repeat_kv makes query head h read KV head h // (H / KVH): the same grouping as this view.
    grouped = query.view(batch, kv_heads, heads // kv_heads, dim)  # (B, KVH, G, D)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale  # (B, KVH, G, KV)
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probabilities, value)  # (B, KVH, G, D)
    return out.view(batch, heads, 1, dim).transpose(1, 2), None  # (B, T, H, D)


AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)


@contextlib.contextmanager
def decode_attention(config: PretrainedConfig) -> Iterator[None]:
    """Attention modules of ``config``'s model use ``grouped_decode_attention`` inside the block: they look their
    attention function up by ``config._attn_implementation`` at every call, so switching the name switches them.
    Only the decode step does; prefill, which needs transformers' mask building for that name, keeps its own."""
    previous = config._attn_implementation
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


class DecodeInputs:
    """Static inputs of one decode step on ``device``, for a cache of ``max_context`` positions."""

    def __init__(self, device: torch.device, max_context: int):
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=device)  # (B, T): the token fed back
        self.position = torch.zeros((1, 1), dtype=torch.long, device=device)  # (B, T): its position
        self.cache_index = torch.arange(max_context, device=device).view(1, 1, 1, max_context)  # (B, 1, T, KV)

    def set(self, token: int, position: int) -> None:
        """Write the next step's token and position in place (two small copies, no host sync)."""
        self.ids.fill_(token)
        self.position.fill_(position)


def decode_forward(model: nn.Module, cache: StaticCache, inputs: DecodeInputs) -> torch.Tensor:
    """The logits ([vocab]) of ``inputs.ids`` at ``inputs.position``, its keys/values written into ``cache``.

    The same computation as ``model(input_ids, position_ids, cache, logits_to_keep=1)`` for one token, with the
    causal mask built here: a boolean ``(1, 1, 1, max_context)`` mask (True: attend) that admits every cache
    position up to the token's own, computed from the position buffer on the device. The static cache writes at
    its ``cumulative_length`` (a device tensor moved in place), which the caller keeps equal to the position.
    """
    inner = model.model
    layers = inner.layers[: model.config.num_hidden_layers]
    mask = inputs.cache_index <= inputs.position.view(1, 1, 1, 1)  # (B, 1, T, KV)
    cache_keyword = keyword_of(layers[0], "cache", "past_key_values")
    extra = {cache_keyword: cache}
    if keyword_of(layers[0], "cache_position"):
        # Releases whose layers take cache_position (5.17) hand it to the cache's update, which may write there.
        extra["cache_position"] = inputs.position[0]
    hidden = inner.embed_tokens(inputs.ids)  # (B, T, hidden)
    position_embeddings = inner.rotary_emb(hidden, inputs.position)
    with decode_attention(model.config):
        for layer in layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=inputs.position,
                position_embeddings=position_embeddings,
                use_cache=True,
                **extra,
            )
            if isinstance(hidden, tuple):  # decoder layers of some 5.x releases return (hidden_states,)
                hidden = hidden[0]
    hidden = inner.norm(hidden)
    return model.lm_head(hidden)[0, -1]  # (vocab,)


def unit_addresses_fixed(weights: object) -> str | None:
    """None when the views ``weights.acquire`` hands out keep their addresses until the plan changes, else why not.

    The loader client exposes its ``plan``: fixed exactly when no unit streams (every unit has a ``pool_offset``).
    Weights without a plan (in-process sources in tests) serve the same tensors every time.
    """
    plan = getattr(weights, "plan", None)
    if plan is None:
        return None
    streamed = [unit.name for unit in plan.units if unit.pool_offset is None]
    if streamed:
        return f"policy {plan.policy!r} streams {len(streamed)} units (the ring needs host-side waits)"
    return None


def plan_generation(weights: object) -> int | None:
    """The generation of the plan in force (it changes with every policy switch), or None without a plan."""
    plan = getattr(weights, "plan", None)
    return None if plan is None else plan.generation


class DecodeGraph:
    """One decode step captured as a CUDA graph; ``replay()`` reruns it on whatever the input buffers hold.

    The graph keeps the addresses it saw at capture: the input buffers, the KV cache, the weights the unit hooks
    bound, and its own private memory pool for everything in between (the returned logits included, so read them
    before the next replay).
    """

    def __init__(self, graph: torch.cuda.CUDAGraph, logits: torch.Tensor):
        self._graph = graph
        self._logits = logits

    @classmethod
    def capture(cls, step: Callable[[], torch.Tensor], restore: Callable[[], None]) -> DecodeGraph:
        """Warm ``step`` up on a side stream, then capture it; ``restore()`` undoes a step's side effects on state
        kept between steps (the cache's write position), and is called after each warm-up run.

        ``step`` runs eagerly ``WARMUP_STEPS`` times first, as torch.cuda.graphs asks: lazy initialisation, Triton
        compilation and cuBLAS workspace allocation must not happen during capture. Capture itself runs no kernel,
        so it leaves the cache as it was.
        """
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step()
                restore()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        return cls(graph, logits)

    def replay(self) -> torch.Tensor:
        """Run the captured step on the current stream; the logits ([vocab]) stay valid until the next replay."""
        self._graph.replay()
        return self._logits
