"""The planner: one device-memory budget, honestly counted, turned into a placement.

``--gpu-memory`` is the total device memory of BOTH processes. From the model's ``config.json`` and its
units the planner counts everything that is not the loader's pool (``budget_lines``):

* CUDA contexts: ``protocol.defaults.CUDA_CONTEXT_BYTES`` per process, two processes (not on ``device="cpu"``);
* the compute process's dense weights: the final norm, the per-layer norms, the q/k/v biases, and the bf16
  embedding when it is on the device: a tied lm_head shares it, so it is; an untied model's embedding stays in
  the compute process's pinned host memory (``compute.model.HostEmbedding``: one row per token crosses the bus),
  except on ``device="cpu"``, where host memory is the device memory;
* the KV cache (``quantizer.model_spec.kv_cache_nbytes``, what compute allocates): for one conversation
  (``kv_tokens`` None) a static cache of ``max_context`` tokens; for many sequences at once (``max_batch`` > 1,
  compute's paged pool) ``kv_tokens`` positions (at least ``max_context``, rounded up to whole pages of
  ``protocol.defaults.KV_PAGE_TOKENS``, plus one padding page no sequence holds) shared by all of them;
* activations for one forward pass of ``prefill_chunk`` tokens (a prefill chunk, or decode rows and prefill
  chunks of several sequences together): hidden states, q/k/v, MLP intermediates, the attention scores of one
  layer (chunk x max_context x heads, as SDPA's math path would hold them), with a paged pool one sequence's
  keys/values gathered from its pages and repeated for every query head, and one row's sampling (float32
  logits, with room for the sort), with a paged pool also the logits of ``max_batch`` rows (bf16, and float32
  for the batched argmax);
* a dequantization workspace: the largest decoder-layer Linear as a bf16 weight, for a prefill path that
  dequantizes one weight at a time (the lm_head is excluded: it only ever sees the last position, a GEMV);
* ``ALLOCATOR_MARGIN_BYTES`` for the caching allocator's rounding and fragmentation.

What is left bounds the pool; the policy (``loader.policies``) places the units in it. When even the
policy's minimum does not fit, ``plan_placement`` raises ``BudgetError`` naming every line, before anything
is allocated. On ``device="cpu"`` the same lines apply without the contexts, so CI runs the same planner.
The constants are estimates to be checked against NVML per-process usage on the GPU.

Nothing here reads a file or touches a device.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

from loader.layout import UnitLayout
from loader.policies import MIN_RING_SLOTS, Policy, Residency
from protocol.defaults import CUDA_CONTEXT_BYTES, CUDA_PROCESSES, DEFAULT_PREFILL_CHUNK, KV_PAGE_TOKENS
from protocol.sizes import MiB, format_size
from quantizer.model_spec import head_dim as config_head_dim
from quantizer.model_spec import kv_cache_nbytes
from quantizer.model_spec import kv_heads as config_kv_heads

ALLOCATOR_MARGIN_BYTES = 256 * MiB  # caching-allocator rounding and fragmentation, both processes
BF16 = 2
F32 = 4

class BudgetError(ValueError):
    """The budget cannot hold the chosen policy's minimum; the message lists what was counted."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Placement:
    """The planner's answer: where every unit lives, and how the budget was spent."""

    policy: str  # the policy's registered name
    resident: tuple[str, ...]  # unit names in execution order; fixed pool offsets
    streamed: tuple[str, ...]  # unit names in execution order; served cyclically by the ring
    ring_slots: int  # K; 0 when nothing streams
    prefetch_depth: int  # D, 1 <= D <= K; 0 when nothing streams
    slot_bytes: int  # bytes per ring slot (the largest streamed unit); 0 when nothing streams
    pool_bytes: int  # resident units + K x slot_bytes: the loader's device pool
    max_context: int  # tokens; the KV cache was counted for this many and compute must not exceed it
    prefill_chunk: int  # tokens per prefill forward pass the activations were counted for
    max_batch: int  # sequences per forward pass the logits were counted for (1: one conversation)
    kv_tokens: int  # positions of the paged KV pool (whole pages); 0: one static cache of max_context
    lines: tuple[tuple[str, int], ...]  # (what, bytes) for everything counted, the pool's lines last
    budget_bytes: int  # --gpu-memory

    @property
    def total_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.lines)

    def table(self) -> str:
        """A short table for people: the lines counted, the placement, and the total against the budget."""
        rows = [(what, format_size(nbytes)) for what, nbytes in self.lines]
        rows.append(("total", f"{format_size(self.total_bytes)} of {format_size(self.budget_bytes)} budget"))
        width = max(len(what) for what, _ in rows)
        batch = f", batch {self.max_batch}, KV pool {self.kv_tokens} tokens" if self.kv_tokens else ""
        out = [
            f"placement (policy {self.policy!r}, max context {self.max_context}, prefill chunk {self.prefill_chunk}"
            f"{batch}):"
        ]
        out += [f"  {what:<{width}}  {size}" for what, size in rows]
        out.append(f"  resident: {_name_ranges(self.resident)}")
        if self.streamed:
            out.append(
                f"  streamed: {_name_ranges(self.streamed)} through {self.ring_slots} × "
                f"{format_size(self.slot_bytes)} slots, prefetch depth {self.prefetch_depth}"
            )
        return "\n".join(out)


def _name_ranges(names: Sequence[str]) -> str:
    """``layers.0 … layers.9, lm_head`` rather than ten names; ``none`` for no names."""
    if not names:
        return "none"
    groups: list[list[str]] = []
    for name in names:
        prev = groups[-1][-1] if groups else None
        if prev and _layer_number(prev) is not None and _layer_number(name) == _layer_number(prev) + 1:
            groups[-1].append(name)
        else:
            groups.append([name])
    return ", ".join(g[0] if len(g) == 1 else f"{g[0]} … {g[-1]}" for g in groups) + f" ({len(names)} units)"


def _layer_number(name: str) -> int | None:
    match = re.fullmatch(r"layers\.(\d+)", name)
    return int(match.group(1)) if match else None


def _config_int(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json: {key!r} is {value!r}; the planner needs a positive integer")
    return value


def budget_lines(
    *,
    device: str,
    units: Sequence[UnitLayout],
    config: dict,
    max_context: int,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    max_batch: int = 1,
    kv_tokens: int | None = None,
) -> list[tuple[str, int]]:
    """Everything the budget must hold besides the loader's pool, as (what, bytes) lines."""
    if max_context <= 0 or prefill_chunk <= 0 or max_batch <= 0:
        raise ValueError(
            f"max_context ({max_context}), prefill_chunk ({prefill_chunk}) and max_batch ({max_batch}) must be positive"
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device {device!r} is neither 'cpu' nor 'cuda'")
    hidden = _config_int(config, "hidden_size")
    layers = _config_int(config, "num_hidden_layers")
    heads = _config_int(config, "num_attention_heads")
    kv_heads = config_kv_heads(config)
    head_dim = config_head_dim(config)
    intermediate = _config_int(config, "intermediate_size")
    vocab = _config_int(config, "vocab_size")
    chunk = min(prefill_chunk, max_context)

    # dense weights the compute process keeps on the device; a tied lm_head is the embedding itself, an untied
    # model's embedding stays in host memory (compute.model.HostEmbedding), which on CPU is the device's
    embedding_on_device = bool(config.get("tie_word_embeddings", False)) or device == "cpu"
    embedding = vocab * hidden * BF16 if embedding_on_device else 0
    norms = (2 * layers + 1) * hidden * BF16
    qkv_bias = layers * (heads + 2 * kv_heads) * head_dim * BF16

    pool_tokens = paged_kv_tokens(max_context, kv_tokens)
    # a paged pool has one page more, never given to a sequence: rows that pad a captured batch write there
    kv_cache = kv_cache_nbytes(config, pool_tokens + KV_PAGE_TOKENS if pool_tokens else max_context, BF16)

    # one prefill chunk: residual + normed + attention output + a spare hidden state, q/k/v, gate/up/product,
    # the scores of one layer over the whole context (plus the mask), and the last position's logits
    # (float32, plus the sort and indices top-p sampling makes)
    hidden_states = 4 * chunk * hidden * BF16
    qkv = chunk * (heads + 2 * kv_heads) * head_dim * BF16
    mlp = 3 * chunk * intermediate * BF16
    attention = chunk * max_context * (heads + 1) * BF16
    gathered = 2 * max_context * heads * head_dim * BF16 if pool_tokens else 0
    logits = vocab * (3 * F32 + 8) + (max_batch * vocab * (BF16 + F32) if pool_tokens else 0)
    activations = hidden_states + qkv + mlp + attention + gathered + logits

    # a qweight [out, in / 2] dequantizes to a bf16 [out, in]; the lm_head only ever multiplies one position
    layer_units = [u for u in units if _layer_number(u.name) is not None] or list(units)
    largest_linear = max(
        (math.prod(s.shape) * 2 * BF16 for u in layer_units for s in u.tensors if s.dtype == "U8"), default=0
    )

    lines = []
    if device.startswith("cuda"):
        contexts = f"CUDA contexts ({CUDA_PROCESSES} × {format_size(CUDA_CONTEXT_BYTES)})"
        lines.append((contexts, CUDA_PROCESSES * CUDA_CONTEXT_BYTES))
    lines += [
        (
            "embedding, norms, biases (bf16)" if embedding_on_device else "norms, biases (bf16; embedding in host memory)",
            embedding + norms + qkv_bias,
        ),
        (f"KV pool ({pool_tokens} tokens, paged)" if pool_tokens else f"KV cache ({max_context} tokens)", kv_cache),
        (f"activations (pass of {chunk} tokens, {max_batch} logit rows)" if pool_tokens else
         f"activations (prefill chunk {chunk})", activations),
        ("dequantization workspace", largest_linear),
        ("allocator margin", ALLOCATOR_MARGIN_BYTES),
    ]
    return lines


def paged_kv_tokens(max_context: int, kv_tokens: int | None) -> int:
    """Positions of the paged KV pool for ``kv_tokens`` asked (whole pages), or 0 for a static cache (None)."""
    if kv_tokens is None:
        return 0
    if kv_tokens < max_context:
        raise ValueError(
            f"--kv-tokens {kv_tokens} is less than --max-context {max_context}: the pool must hold one whole context"
        )
    return -(-kv_tokens // KV_PAGE_TOKENS) * KV_PAGE_TOKENS


def plan_placement(
    *,
    budget_bytes: int,
    device: str,
    units: Sequence[UnitLayout],
    config: dict,
    max_context: int,
    policy: Policy,
    ring_slots: int | None = None,
    prefetch_depth: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    max_batch: int = 1,
    kv_tokens: int | None = None,
) -> Placement:
    """Count the budget, let ``policy`` place the units in what is left; ``BudgetError`` if its minimum does not fit.

    ``max_batch`` > 1 serves many sequences per pass from a paged KV pool of ``kv_tokens`` positions (None:
    ``max_context``, the memory one conversation's cache takes); ``max_batch`` 1 with ``kv_tokens`` None is the
    one-conversation static cache."""
    if not units:
        raise ValueError("the model has no units to place (its manifest lists no quantized Linears)")
    if max_batch > 1 and kv_tokens is None:
        kv_tokens = max_context
    fixed = budget_lines(
        device=device, units=units, config=config, max_context=max_context, prefill_chunk=prefill_chunk,
        max_batch=max_batch, kv_tokens=kv_tokens,
    )  # fmt: skip
    pool_budget = budget_bytes - sum(nbytes for _, nbytes in fixed)
    minimum = policy.minimum(units, ring_slots=ring_slots, prefetch_depth=prefetch_depth)
    if minimum.pool_bytes > pool_budget:
        needed = sorted(fixed + _pool_lines(minimum), key=lambda line: -line[1])
        kv = " or --kv-tokens" if kv_tokens is not None else ""
        if not minimum.streamed:
            advice = "use --policy hybrid or stream, or raise --gpu-memory"
        elif minimum.ring_slots > MIN_RING_SLOTS:
            advice = f"lower --max-context{kv}, use --ring-slots {MIN_RING_SLOTS}, or raise --gpu-memory"
        else:
            advice = f"lower --max-context{kv} or raise --gpu-memory"
        raise BudgetError(
            f"--gpu-memory {format_size(budget_bytes)} is too small: "
            + " + ".join(f"{what} {format_size(nbytes)}" for what, nbytes in needed)
            + f" = {format_size(sum(n for _, n in needed))} needed for policy {policy.name!r}; {advice}"
        )
    residency = policy.place(units, pool_budget, ring_slots=ring_slots, prefetch_depth=prefetch_depth)
    return Placement(
        policy=policy.name,
        resident=residency.resident,
        streamed=residency.streamed,
        ring_slots=residency.ring_slots,
        prefetch_depth=residency.prefetch_depth,
        slot_bytes=residency.slot_bytes,
        pool_bytes=residency.pool_bytes,
        max_context=max_context,
        prefill_chunk=prefill_chunk,
        max_batch=max_batch,
        kv_tokens=paged_kv_tokens(max_context, kv_tokens),
        lines=tuple(fixed + _pool_lines(residency)),
        budget_bytes=budget_bytes,
    )


PREFILL_CHUNKS = (2048, 1024)  # longer prefill chunks tried, longest first, before DEFAULT_PREFILL_CHUNK


def choose_prefill_chunk(plan_for: Callable[..., Placement], **policy_options) -> int:
    """The longest prefill chunk that costs the placement nothing.

    Every prefill forward pass pays the per-layer launch costs once, so longer chunks prefill faster. But a chunk's activations
    come out of the same budget as resident layers: a longer chunk is taken only when the placement keeps
    exactly the residency it has with ``DEFAULT_PREFILL_CHUNK`` — in practice, when everything is resident
    with room to spare. ``plan_for`` is ``plan_placement`` with everything but ``prefill_chunk`` bound;
    a ``BudgetError`` at the default chunk propagates (the budget is refused as it would be anyway).
    """
    default = plan_for(prefill_chunk=DEFAULT_PREFILL_CHUNK, **policy_options)
    for chunk in PREFILL_CHUNKS:
        try:
            longer = plan_for(prefill_chunk=chunk, **policy_options)
        except BudgetError:
            continue
        if (longer.resident, longer.streamed, longer.ring_slots) == (default.resident, default.streamed, default.ring_slots):
            return chunk
    return DEFAULT_PREFILL_CHUNK


def _pool_lines(residency: Residency) -> list[tuple[str, int]]:
    lines = []
    if residency.resident:
        lines.append((f"resident weights ({len(residency.resident)} units)", residency.resident_bytes))
    if residency.streamed:
        label = f"ring ({residency.ring_slots} slots × {format_size(residency.slot_bytes)})"
        lines.append((label, residency.ring_bytes))
    return lines
