"""The batch-1 decode step of a Qwen2 decoder layer in ten or eleven kernel launches, for CUDA bf16.

At batch 1 the weights are read once per token and everything else is small; HF's decoder layer launches about
forty kernels per token (the Linears, each with its split-K sum, rotary in ten pieces, the cache update, eight for
attention, the adds), and at 1-5 µs each in a replayed graph they cost as much as reading the weights
(docs/performance.md). ``FusedDecodeLayer`` runs the same layer as:

    rms_norm(hidden)                                     input_layernorm
    int4_gemv(q|k|v, partials)                           the three projections as one [(H + 2 KVH) D, hidden] GEMV
    rotary_cache_write                                   sum + bias, rotary on q and k, k and v into the cache
    decode_attention (two launches)                      over positions 0 … position, each KV row read once
    int4_gemv(o, partials)
    add_partials(+ rms_norm)                             residual add, post_attention_layernorm
    int4_gemv(gate|up)                                   gate and up as one [2 I, hidden] GEMV
    silu_mul
    int4_gemv(down, partials)
    add_partials                                         residual add (+ the next layer's input_layernorm)

The q/k/v and gate/up weights are one matrix each because the loader's layout packs a unit's qweights back to
back and its scales back to back (``loader.layout``): ``stacked`` views them as one tensor when they are adjacent
(always, in a unit laid out by the loader) and concatenates them otherwise (test doubles). The split-K partial
sums of the GEMVs whose outputs are small are added by the kernel that consumes them, so no Linear needs a second
launch, and the kernel before each GEMV writes the GEMV's row operand (``compute.kernels.gemv.RowOperand``). When
the next layer runs right after (the decode step passes its norm), the last add also applies that layer's
input_layernorm, which then needs no launch of its own: ten launches a layer.

The arithmetic is HF's, rounding for rounding, except attention, which keeps scores and probabilities in fp32
(flash decoding) where HF's eager attention rounds them to bf16: the logits agree with transformers' to bf16
noise (tests/test_decode.py). The position lives on the device (``DecodeStep.position``): nothing synchronises
with the host, and the layer captures in a CUDA graph.

The same layer takes up to ``gemv_mma.MAX_ROWS`` rows of one conversation at once: the rows a speculative pass
verifies (the token the last pass chose and the drafted tokens after it). Every kernel above takes rows, the GEMVs
read each weight once for all of them, and attention follows the drafted tree's shape (``tree``), so a pass over
16 rows costs little more than one.

``fused_decode_unsupported(config)`` says why a model cannot take this path (None when it can); the decode step
then keeps HF's modules, as it does on CPU.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from compute.int4_linear import Int4Linear
from compute.kernels.activation import silu_mul
from compute.kernels.attention import decode_attention, rotary_cache_write
from compute.kernels.gemv import RowOperand, int4_gemv
from compute.kernels.norm import add_partials, add_partials_workspace, rms_norm
from quantizer.model_spec import head_dim as config_head_dim


def fused_decode_unsupported(config: PretrainedConfig, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why the decode step of ``config``'s model, run in ``dtype``, cannot run ``FusedDecodeLayer``; None if it can.
    (The kernels are Triton's: on CUDA, or on CPU tensors under the Triton interpreter, which only tests use.)"""
    if dtype != torch.bfloat16:
        return f"the fused decode layer's kernels are bf16's (the model runs in {dtype})"
    head_dim = config_head_dim(config)
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"the fused decode layer's attention takes head sizes 16, 32, … 256 (the model's is {head_dim})"
    if config.hidden_act != "silu":
        return f"the fused decode layer's MLP is SiLU's (the model's activation is {config.hidden_act!r})"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types) or getattr(config, "use_sliding_window", False):
        return "the fused decode layer attends over the whole cache (the model uses sliding-window attention)"
    return None


def stacked(linears: tuple[Int4Linear, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The bound weights of ``linears`` (one input size) as one ``[sum of N, K / 2]`` qweight and one scale
    matrix: views when they lie back to back in memory, as the loader's layout puts them, else copies."""
    return _stack([linear.qweight for linear in linears]), _stack([linear.scales for linear in linears])


def stacked_bias(linears: tuple[Int4Linear, ...]) -> torch.Tensor | None:
    """The biases of ``linears`` as one (zeros for a Linear without one, bf16), for their ``stacked`` weight; None
    when none has one."""
    if all(linear.bias is None for linear in linears):
        return None
    device = next(linear.bias.device for linear in linears if linear.bias is not None)
    return torch.cat([
        linear.bias if linear.bias is not None else torch.zeros(linear.out_features, dtype=torch.bfloat16, device=device)
        for linear in linears
    ])  # fmt: skip


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr() + first.nbytes
    for t in tensors[1:]:
        # Adjacent addresses in separate storages (two allocations the caching allocator put side by side) are
        # not one tensor: a view must stay inside the first tensor's storage.
        adjacent = t.data_ptr() == end and t.untyped_storage().data_ptr() == storage
        if not adjacent or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]:
            return torch.cat(tensors)
        end += t.nbytes
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


class FusedDecodeLayer:
    """One Qwen2 decoder layer's forward for a single token, over the layer's own modules and cache layer.

    Its weights must be bound (the caller holds the unit); ``position``, ``cos`` and ``sin`` are the decode
    step's device buffers, read at every call.
    """

    def __init__(self, layer: nn.Module, cache_layer: object, config: PretrainedConfig):
        attention = layer.self_attn
        self.layer = layer
        self.cache_layer = cache_layer  # a StaticCache layer: keys/values exist once prefill has run
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = attention.scaling
        self.eps = layer.input_layernorm.variance_epsilon
        self.qkv = (attention.q_proj, attention.k_proj, attention.v_proj)
        self.gate_up = (layer.mlp.gate_proj, layer.mlp.up_proj)
        self.qkv_bias = stacked_bias(self.qkv)  # Qwen2's q/k/v have biases
        if any(linear.bias is not None for linear in self.gate_up):
            raise ValueError("the fused decode layer's gate/up projections take no bias (Qwen2's have none)")
        self.intermediate = layer.mlp.gate_proj.out_features
        # the residual adds' norms meet there (one call at a time); made now, before any graph captures the layer
        self.norm_workspace = add_partials_workspace(layer.input_layernorm.weight.device)

    def __call__(
        self,
        hidden: torch.Tensor,
        position: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        tree: torch.Tensor | None = None,
        normed: RowOperand | None = None,
        next_norm: nn.Module | None = None,
    ) -> tuple[torch.Tensor, RowOperand | None]:
        """``hidden`` bf16 [1, T, hidden] -> the layer's output, the token's keys and values written at ``position``.

        T rows (at most ``gemv_mma.MAX_ROWS``: a speculative pass verifying drafted tokens) are written at cache
        slots ``position … position + T - 1``, each row at its own rotary angle (``cos``/``sin`` [1, T, D]); row t
        attends the cache before ``position`` and the rows whose bits are set in ``tree[t]`` (int32 [T] on the
        device; None: rows 0 … t, a chain), as ``compute.kernels.attention.decode_attention`` says.

        ``normed`` is this layer's input_layernorm of ``hidden`` as the q|k|v GEMV's operand, when the layer before
        made it; ``next_norm`` an RMSNorm (the next layer's input_layernorm) to apply to the output, fused into the
        last residual add: one launch fewer per layer. Returns (output, ``next_norm`` of it as an operand, or None).
        """
        layer = self.layer
        attention = layer.self_attn
        cache = self.cache_layer
        rows, size = hidden.shape[1], hidden.shape[2]
        # Each GEMV directly follows the kernel that writes its operand, and may start before it ends, reading its
        # weight first (compute.kernels.pdl): a stacked weight that must be copied is copied earlier.
        qkv_weight, qkv_scales = stacked(self.qkv)
        gate_up_weight, gate_up_scales = stacked(self.gate_up)
        if normed is None:
            normed = rms_norm(hidden.view(rows, size), layer.input_layernorm.weight, self.eps, operand=True)
        qkv = int4_gemv(normed, qkv_weight, qkv_scales, partials=True)
        query = rotary_cache_write(
            qkv, self.qkv_bias, cos, sin, cache.keys, cache.values, position, cache.cumulative_length,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
        )  # fmt: skip
        attended = decode_attention(query, cache.keys, cache.values, position, self.scaling, tree=tree, operand=True)
        o_proj = attention.o_proj
        out = int4_gemv(attended, o_proj.qweight, o_proj.scales, partials=True)
        hidden, normed = add_partials(
            hidden, out, o_proj.bias, layer.post_attention_layernorm.weight, self.eps, operand=True,
            workspace=self.norm_workspace,
        )
        gate_up = int4_gemv(normed, gate_up_weight, gate_up_scales)  # [T, 2 I] bf16
        act = silu_mul(gate_up[:, : self.intermediate], gate_up[:, self.intermediate :], operand=True)
        down = layer.mlp.down_proj
        out = int4_gemv(act, down.qweight, down.scales, partials=True)
        if next_norm is None:
            return add_partials(hidden, out, down.bias)
        return add_partials(
            hidden, out, down.bias, next_norm.weight, next_norm.variance_epsilon, operand=True,
            workspace=self.norm_workspace,
        )
