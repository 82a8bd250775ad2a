"""The decode step written out over static buffers, split into segments, and the resident segments captured as
CUDA graphs.

At batch 1 a 64-layer model launches over a thousand small kernels per token; eager PyTorch and HF transformers
spend more time issuing them (~2 ms of CPU per layer on the H200) than the GPU spends reading the weights. A
resident unit's weights sit at fixed addresses in the pool and the KV cache is static, so the part of a token's
forward that touches only resident units is the same sequence of kernels every time: captured once, it replays
with one launch. A streamed unit sits in whichever ring slot the loader filled, behind host-side waits, so its
layer must run eagerly; while it copies (~4.5 ms for a 32B layer) the CPU has time to spare anyway.

This module promises:

* ``plan_segments(units, streamed, num_layers)``: the decode step's pieces (the prologue: embedding, rotary cos/sin
  and mask; decoder layers 0 … L-1; the head: final norm and lm_head) cut into ``Segment``s: every maximal run of
  resident pieces that holds a resident unit is one captured segment, everything else runs eagerly, adjacent eager
  pieces in one segment. With nothing streamed that is ONE captured segment (the whole step); with everything
  streamed, one eager segment. Pure: no device, no model.
* ``DecodeStep``: the static buffers of one decode step (token id, position, mask, hidden state, cos/sin, and the
  token's embedding row when the embedding is in host memory) and ``run(segment)``, the segment's pieces over those
  buffers: each decoder layer as a ``compute.decode.FusedDecodeLayer`` on CUDA where the model allows (its unit
  bound through ``UnitBinder.bound``), else through the model's own HF modules. Whatever crosses
  a segment boundary goes through them, so captured and eager segments can alternate. The causal mask is computed
  on the device from the position buffer instead of by ``create_causal_mask`` (which asks the cache for its length
  on the host), and nothing depends on a value read back from the device. Binding each unit around its piece (the
  hooks of ``compute.model.UnitBinder`` for modules, ``UnitBinder.bound`` for fused layers) keeps the binder in
  step: at capture it binds the resident views the graph keeps using, and in eager segments it acquires and
  releases streamed units through the ring.
* Where HF's layers run, attention in the decode step reads each KV head once (``grouped_decode_attention``; the
  fused layer has its own kernel, ``compute.kernels.attention``): with an explicit mask,
  transformers' SDPA path first copies every KV head once per query head sharing it (``repeat_kv``), which for
  the 32B model (40 query heads on 8 KV heads) at a 4096-token cache adds ~11 GB of memory traffic per token,
  two thirds of the weights' 16.5 GB. Prefill keeps transformers' own attention.
* ``DecodeGraphs.capture(step, segments, binder)``: warm-up, then one pass that captures the captured segments and
  runs the eager ones; ``run()`` is one decode step: replays and eager segments in order, the logits returned.
* ``Decoder``: what the engine calls per decode step; decides per plan generation whether to capture, drops the
  graphs of an older plan, falls back to eager decode (reason logged) when capture fails; ``mode`` says how it runs.
* ``streamed_units(weights)``: the units the loader's plan streams (none for weights without a plan).

It knows nothing about sampling, tokens or the loader's protocol beyond the ``plan`` the client exposes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from compute.decode import FusedDecodeLayer, fused_decode_unsupported
from compute.model import HostEmbedding, UnitBinder

log = logging.getLogger(__name__)

DECODE_ATTENTION = "spillover_grouped_decode"  # the name the decode attention is registered under in transformers
WARMUP_STEPS = 2  # eager runs on the side stream before capture (lazy inits, Triton compiles, cuBLAS workspaces)
LM_HEAD_UNIT = "lm_head"  # the unit name of an untied lm_head (a tied one is the embedding: no unit)


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

    On the CPU (never captured in a graph, so shapes may change per step) only the cache positions the mask opens
    are read: the static cache is ``max_context`` long, and scoring its empty tail cost more than the layer's
    INT4 weights did (docs/performance.md).
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Segment:
    """Consecutive pieces of the decode step run together: replayed from one CUDA graph, or eagerly every step.

    The pieces, in order: the prologue (embedding, rotary cos/sin, mask), decoder layers 0 … L-1, the head
    (final norm, lm_head). A segment is a contiguous run of them.
    """

    embeds: bool  # starts with the prologue (the step's first segment)
    layers: range  # the decoder layers it runs, in order
    head: bool  # ends with the head and returns the logits (the step's last segment)
    units: tuple[str, ...]  # the units it visits, in execution order: what the unit binder sees
    captured: bool  # True: captured as a CUDA graph (all its units resident); False: eager every step


def plan_segments(units: Sequence[str], streamed: Collection[str], num_layers: int) -> tuple[Segment, ...]:
    """The decode step cut into segments for a plan that streams ``streamed`` out of ``units``.

    ``units`` is the execution order the model's unit binder uses: ``layers.0`` … ``layers.{L-1}``, then
    ``lm_head`` when it is untied (a tied head uses the embedding, always at hand). A run of resident pieces is
    captured only when it holds a unit: the prologue alone or a tied head alone is a handful of kernels that a
    graph of its own would not make faster, so they join the eager segment beside them.
    """
    layer_units = [f"layers.{i}" for i in range(num_layers)]
    if list(units) not in (layer_units, [*layer_units, LM_HEAD_UNIT]):
        raise ValueError(
            f"units {list(units)} are not the decode step's order layers.0 … layers.{num_layers - 1} [, lm_head]"
        )
    unknown = set(streamed) - set(units)
    if unknown:
        raise ValueError(f"the plan streams {sorted(unknown)}, which are not units of this model")
    head_unit = LM_HEAD_UNIT if LM_HEAD_UNIT in units else None
    pieces = [None, *layer_units, head_unit]  # the unit each piece visits, if any
    spans: list[list] = []  # [first piece, past the last piece, captured]
    for resident, group in itertools.groupby(range(len(pieces)), key=lambda k: pieces[k] not in streamed):
        indices = list(group)
        captured = resident and any(pieces[k] is not None for k in indices)
        if spans and not captured and not spans[-1][2]:
            spans[-1][1] = indices[-1] + 1
        else:
            spans.append([indices[0], indices[-1] + 1, captured])
    # Piece k (1 <= k <= L) is layer k - 1; piece 0 is the prologue and piece L + 1 the head.
    return tuple(
        Segment(
            embeds=first == 0,
            layers=range(max(first, 1) - 1, min(stop, num_layers + 1) - 1),
            head=stop == len(pieces),
            units=tuple(unit for unit in pieces[first:stop] if unit is not None),
            captured=captured,
        )
        for first, stop, captured in spans
    )


def eager_segment(units: Sequence[str], num_layers: int) -> Segment:
    """The whole decode step as one eager segment."""
    return Segment(embeds=True, layers=range(num_layers), head=True, units=tuple(units), captured=False)


def describe(segments: Sequence[Segment]) -> str:
    """"graph" when the step is one captured segment, else "piecewise (N graphs, M eager units)" for segments
    with at least one captured; "eager" for a step without any."""
    captured = sum(segment.captured for segment in segments)
    if not captured:
        return "eager"
    if len(segments) == 1:
        return "graph"
    eager = sum(len(segment.units) for segment in segments if not segment.captured)
    return f"piecewise ({captured} graphs, {eager} eager units)"


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
        fused: bool | None = None,
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
        self.fused_layers = None
        if self.fused_unsupported is None:
            self.fused_layers = [
                FusedDecodeLayer(layer, cache_layer, model.config) for layer, cache_layer in zip(self.layers, cache.layers)
            ]
        self._binder = model.unit_binder
        dtype = inner.embed_tokens.weight.dtype
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=device)  # (B, T): the token fed back
        self.position = torch.zeros((1, 1), dtype=torch.long, device=device)  # (B, T): its position
        self.cache_index = torch.arange(max_context, device=device).view(1, 1, 1, max_context)  # (B, 1, T, KV)
        self.mask = torch.zeros((1, 1, 1, max_context), dtype=torch.bool, device=device)  # (B, 1, T, KV): attend
        self.hidden = torch.zeros((1, 1, model.config.hidden_size), dtype=dtype, device=device)  # (B, T, hidden)
        # With the embedding in host memory, ``set`` copies the token's row here (the prologue reads it): a graph
        # cannot look a row up on the host, and the row is all a step needs.
        embedding = inner.embed_tokens
        self.host_embedding = embedding if isinstance(embedding, HostEmbedding) else None
        self.embedded = torch.zeros_like(self.hidden) if self.host_embedding is not None else None  # (B, T, hidden)
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

    def run(self, segment: Segment) -> torch.Tensor | None:
        """Run ``segment``'s pieces (eagerly, or into a graph being captured); the logits ([vocab]) when it ends
        with the head, else None. The keys/values of its layers go into the cache at each layer's
        ``cumulative_length`` (a device tensor the layer advances), which the caller keeps equal to the position.
        """
        inner = self.model.model
        with decode_attention(self.model.config):
            if segment.embeds:
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
                            hidden, self.position, self.cos, self.sin, normed=normed, next_norm=next_norm
                        )
                    continue
                hidden = self.layers[index](hidden, **self._layer_arguments)
                if isinstance(hidden, tuple):  # decoder layers of some 5.x releases return (hidden_states,)
                    hidden = hidden[0]
            if segment.head:
                return self.model.lm_head(inner.norm(hidden))[0, -1]  # (vocab,)
        self.hidden.copy_(hidden)
        return None

    def cache_lengths(self) -> list[torch.Tensor]:
        """A copy of every cache layer's write position, for ``restore_cache_lengths``."""
        return [layer.cumulative_length.clone() for layer in self.cache.layers]

    def restore_cache_lengths(self, lengths: list[torch.Tensor]) -> None:
        """Move the write positions back in place (a captured graph holds those very tensors)."""
        for layer, length in zip(self.cache.layers, lengths):
            layer.cumulative_length.copy_(length)


class SegmentGraph:
    """One segment captured as a CUDA graph. It keeps the addresses it saw at capture: the step's buffers, the KV
    cache, the weights the unit hooks bound, and its own private memory pool for everything in between (the logits
    included, so read them before the next replay)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, output: torch.Tensor | None):
        self._graph = graph
        self._output = output

    @classmethod
    def capture(cls, run: Callable[[], torch.Tensor | None]) -> SegmentGraph:
        """Capture ``run`` (already warmed up: capture must not compile, initialise or allocate workspaces)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = run()
        return cls(graph, output)

    def replay(self) -> torch.Tensor | None:
        """Run the captured kernels on the current stream; what the segment returned at capture, refreshed."""
        self._graph.replay()
        return self._output


class DecodeGraphs:
    """The decode step of one plan as segments, the captured ones replayed; ``run()`` is one step."""

    def __init__(self, step: DecodeStep, segments: Sequence[Segment], graphs: Sequence[SegmentGraph | None],
                 binder: UnitBinder) -> None:  # fmt: skip
        self.step = step
        self.segments = tuple(segments)
        self.graphs = tuple(graphs)  # one per segment: its graph, or None for an eager segment
        self._binder = binder

    @classmethod
    def capture(cls, step: DecodeStep, segments: Sequence[Segment], binder: UnitBinder) -> DecodeGraphs:
        """Warm the segments up on a side stream, then capture the captured ones in one pass over the step.

        ``step`` runs eagerly ``WARMUP_STEPS`` times first, as torch.cuda.graphs asks: lazy initialisation, Triton
        compilation and cuBLAS workspace allocation must not happen during capture. The capture pass runs the eager
        segments for real between the captures, so the unit binder and the loader's ring see every unit of the
        pass in execution order, as in any other pass. Every pass writes the same position, and the cache's write
        positions are put back after each: the cache is left as it was (the position's keys/values are written
        again by the real step).
        """
        lengths = step.cache_lengths()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                for segment in segments:
                    step.run(segment)
                step.restore_cache_lengths(lengths)
        torch.cuda.current_stream().wait_stream(side)
        graphs: list[SegmentGraph | None] = []
        for segment in segments:
            if segment.captured:
                graphs.append(SegmentGraph.capture(functools.partial(step.run, segment)))
            else:
                step.run(segment)
                graphs.append(None)
        step.restore_cache_lengths(lengths)
        return cls(step, segments, graphs, binder)

    def run(self) -> torch.Tensor:
        """One decode step on the step's buffers: the logits ([vocab]), valid until the next step."""
        logits = None
        for segment, graph in zip(self.segments, self.graphs):
            if graph is None:
                logits = self.step.run(segment)
            else:
                logits = graph.replay()
                # A replay runs no hooks. Its units are resident: their views were bound at capture and need no
                # acquire or release, but the binder must still pass them so that the streamed units after them
                # are the ones it expects (it refuses units out of execution order).
                self._binder.skip(segment.units)
        return logits

    @property
    def description(self) -> str:
        """How this step runs, as ``describe`` says."""
        return describe(self.segments)


class Decoder:
    """How an engine runs its decode steps, decided again whenever the plan in force or ``cuda_graphs`` changes.

    ``decoder(token, position, cuda_graphs=True)`` returns the step's logits ([vocab], valid until the next step).
    On CUDA with ``cuda_graphs``, the first step under a plan cuts the step into segments (``plan_segments``) and
    captures the resident ones (``DecodeGraphs``); a plan that leaves nothing to capture, a CPU device, or a capture
    that fails (logged with its reason, the pass it interrupted walked to its end) runs the whole step eagerly.
    A policy switch moves units in the pool, so graphs captured under an older plan would read stale addresses:
    they are dropped. ``mode`` says in one line how decode runs.
    """

    def __init__(self, step: DecodeStep, binder: UnitBinder, weights: object, device: torch.device):
        self.step = step
        self.graphs: DecodeGraphs | None = None  # the captured step for the plan in force, if any
        self._binder = binder
        self._weights = weights
        self._device = device
        self._units = [name for name, _ in binder.units]
        self._eager = eager_segment(self._units, len(step.layers))
        self._decided_for: tuple[int | None, bool] | None = None  # (plan generation, cuda_graphs) of the decision
        self._eager_reason = "undecided (decided at the first decode step)"

    @property
    def mode(self) -> str:
        """"graph", "piecewise (N graphs, M eager units)", or "eager: <reason>" (or "undecided" before a step)."""
        if self.graphs is not None:
            return self.graphs.description
        return self._eager_reason

    def __call__(self, token: int, position: int, *, cuda_graphs: bool) -> torch.Tensor:
        self.step.set(token, position)
        self._decide(cuda_graphs)
        if self.graphs is not None:
            return self.graphs.run()
        return self.step.run(self._eager)

    def _decide(self, cuda_graphs: bool) -> None:
        key = (plan_generation(self._weights), cuda_graphs)
        if key == self._decided_for:
            return
        self.graphs = None
        segments, reason = self._segments(cuda_graphs)
        if segments is not None:
            reason = self._capture(segments)
        if reason is not None:
            self._eager_reason = f"eager: {reason}"
            log.info("decode runs eagerly: %s", reason)
        # Only now: a capture interrupted by Ctrl-C decides again at the next step.
        self._decided_for = key

    def _segments(self, cuda_graphs: bool) -> tuple[tuple[Segment, ...] | None, str | None]:
        """(the segments to capture, None), or (None, why the step runs eagerly)."""
        if not cuda_graphs:
            return None, "cuda_graphs is off"
        if self._device.type != "cuda":
            return None, f"CUDA graphs need a CUDA device (decode runs on {self._device})"
        streamed = streamed_units(self._weights)
        try:
            segments = plan_segments(self._units, streamed, len(self.step.layers))
        except ValueError as e:
            return None, str(e)
        if not any(segment.captured for segment in segments):
            policy = self._weights.plan.policy  # something streams, so there is a plan
            return None, f"policy {policy!r} streams {len(streamed)} of {len(self._units)} units: nothing to capture"
        return segments, None

    def _capture(self, segments: tuple[Segment, ...]) -> str | None:
        """Capture ``segments``; None on success, else why it failed (the step is left ready to run eagerly)."""
        lengths = self.step.cache_lengths()
        started = time.perf_counter()
        try:
            self.graphs = DecodeGraphs.capture(self.step, segments, self._binder)
        except Exception as e:  # any capture failure leaves eager decode, which is always correct
            if self._binder.in_pass:
                self._binder.abandon_pass()  # the ring must start the next pass in step
            self.step.restore_cache_lengths(lengths)
            log.warning("capturing the decode step as CUDA graphs failed", exc_info=True)
            return f"capturing the decode step as CUDA graphs failed: {e}"
        log.info("decode step captured in %.2f s: %s", time.perf_counter() - started, self.graphs.description)
        return None


def streamed_units(weights: object) -> frozenset[str]:
    """The units the loader's plan streams through its ring (no fixed address); none for weights without a plan
    (in-process sources in tests serve the same tensors every time)."""
    plan = getattr(weights, "plan", None)
    if plan is None:
        return frozenset()
    return frozenset(unit.name for unit in plan.units if unit.pool_offset is None)


def plan_generation(weights: object) -> int | None:
    """The generation of the plan in force (it changes with every policy switch), or None without a plan."""
    plan = getattr(weights, "plan", None)
    return None if plan is None else plan.generation
