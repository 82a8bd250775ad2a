"""Attention for the decode step's one query position that reads each KV head once, registered with transformers.

``register_grouped_attention()`` registers ``grouped_decode_attention`` under ``GROUPED_ATTENTION`` in
transformers' ``AttentionInterface``; ``grouped_attention(config)`` switches a model's attention modules to it
inside a block. Only the decode step does; prefill keeps transformers' own attention.

Why: with an explicit mask, transformers' SDPA path first copies every KV head once per query head sharing it
(``repeat_kv``); for the 32B model (40 query heads on 8 KV heads) at a 4096-token cache that adds ~11 GB of memory
traffic per token, two thirds of the weights' 16.5 GB. Where the fused decode layer runs (``compute.decode``), its
own kernel (``compute.kernels.attention``) does this instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

GROUPED_ATTENTION = "spillover_grouped_decode"  # the name it is registered under in transformers


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
    Plain batched matmuls rather than SDPA: cuDNN's SDPA runs this shape as one program per KV head, slower than
    reading the layer's weights; matmuls spread the cache over the GPU like any other product.

    On the CPU (never captured in a graph, so shapes may change per step) only the cache positions the mask opens
    are read: the static cache is ``max_context`` long, and scoring its empty tail took 14% of a decode step's CPU
    time at a 2048-token cache (docs/performance.md).
    """
    if not query.is_cuda and query.shape[2] == 1 and attention_mask is not None and attention_mask.dtype == torch.bool:
        open_positions = attention_mask[0, 0, 0].nonzero()
        if len(open_positions):
            visible = int(open_positions[-1]) + 1  # past the last open position, all is masked
            key, value, attention_mask = key[:, :, :visible], value[:, :, :visible], attention_mask[..., :visible]
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


def register_grouped_attention() -> None:
    """Make ``GROUPED_ATTENTION`` a name transformers' attention modules can look up (idempotent)."""
    AttentionInterface.register(GROUPED_ATTENTION, grouped_decode_attention)


@contextlib.contextmanager
def grouped_attention(config: PretrainedConfig) -> Iterator[None]:
    """Attention modules of ``config``'s model use ``grouped_decode_attention`` inside the block: they look their
    attention function up by ``config._attn_implementation`` at every call, so switching the name switches them.
    Only the decode step does; prefill, which needs transformers' mask building for that name, keeps its own.
    ``register_grouped_attention()`` must have run."""
    previous = config._attn_implementation
    config._attn_implementation = GROUPED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
