"""The decode pass of many sequences over static buffers, replayed from CUDA graphs where the plan allows.

``BatchDecoder.run(chunks)`` runs a pass whose chunks are all decode rows (one token each, logits wanted) and
returns their logits ``[rows, vocab]``. It promises:

* The rows' inputs go into static buffers (``DecodeInputs``: token ids, or their embedding rows when the
  embedding is in host memory; positions; KV slots; the page table, ``max_pages`` wide; lengths), filled from
  the host by one copy each, and ``BatchEngine.run_pass`` computes from them with attention by
  ``compute.kernels.paged_attention`` (where it does not run: each row's own SDPA over its sequence's positions,
  as a mixed pass computes it). Nothing in the pass reads a value back from the device.
* On CUDA with ``cuda_graphs``, the pass is cut as the one-conversation decode step is
  (``compute.segments.plan_segments``: every run of resident pieces that holds a unit is one captured segment, the
  streamed units eager between them; with nothing streamed, one segment: the whole pass) and captured once per
  bucket size (``BUCKETS``: 1, 2, 4, 8, ... up to the engine's ``max_batch``) at its first use: a batch of n rows
  runs in the smallest bucket holding it, the extra rows padded (token 0 at position 0, their keys/values in the
  pool's padding page, which no sequence holds; their logits dropped). Segments exchange the hidden state and the
  rotary tables through static buffers. A replay runs no hooks: the unit binder is advanced past the resident
  units the graph read (``UnitBinder.skip``); a streamed unit's weights arrive through the loader's ring behind
  host-side waits a graph cannot hold, so its layer runs eagerly every pass. A new plan drops the graphs; a
  capture that fails is logged and the plan decodes eagerly.
* Otherwise (CPU, graphs off, no paged kernel, a plan that streams every unit) the whole pass runs eagerly on buffers of exactly
  n rows.

``mode`` says how the last pass ran. This module knows nothing about requests or sampling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from compute.cuda_graphs import WARMUP_STEPS
from compute.kernels.embedding import embedding_rows
from compute.model import HostEmbedding
from compute.segments import Segment, describe, plan_generation, plan_segments, streamed_units

if TYPE_CHECKING:
    from compute.batch_engine import BatchEngine, Chunk
    from compute.kernels.gemv import RowOperand

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # rows a decode pass is captured for (up to max_batch)


class DecodeInputs:
    """Static inputs of a decode pass of ``rows`` rows on the engine's device."""

    def __init__(self, engine: BatchEngine, rows: int):
        device, pool = engine.device, engine.kv_pool
        self.rows = rows
        self.ids = torch.zeros(rows, dtype=torch.long, device=engine._ids_device)  # [rows]
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # [rows]
        self.slots = torch.full((rows,), pool.padding_page * pool.page_tokens, dtype=torch.long, device=device)
        self.page_table = torch.full((rows, engine.max_pages), pool.padding_page, dtype=torch.int32, device=device)
        self.lengths = torch.ones(rows, dtype=torch.int32, device=device)  # [rows]: positions attended over
        self.row_slots: list[torch.Tensor] = []  # each real row's KV slots, positions 0 .. its own (no paged kernel)
        config = engine.config
        dtype = engine.kv_pool.keys.dtype
        # What crosses a segment boundary (compute.segments.plan_segments): the hidden state and the rotary tables.
        self.hidden_state = torch.zeros((1, rows, config.hidden_size), dtype=dtype, device=device)  # (1, rows, hidden)
        self.cos = torch.zeros((rows, 1, engine.head_dim), dtype=dtype, device=device)  # (rows, 1, D)
        self.sin = torch.zeros_like(self.cos)
        embedding = engine.model.model.embed_tokens
        self.host_embedding = embedding if isinstance(embedding, HostEmbedding) else None
        self.embedded = None  # (1, rows, hidden): the rows of a host embedding, copied over by ``set``
        if self.host_embedding is not None:
            hidden = self.host_embedding.weight.shape[1]
            self.embedded = torch.zeros((1, rows, hidden), dtype=self.host_embedding.weight.dtype, device=device)

    def set(self, engine: BatchEngine, chunks: Sequence[Chunk]) -> None:
        """Write the rows of ``chunks`` (at most ``rows``); rows past them keep padding: token 0 at position 0,
        written to and reading only the padding page."""
        pool, n = engine.kv_pool, len(chunks)
        if n > self.rows:
            raise ValueError(f"{n} decode rows do not fit buffers of {self.rows}")
        pad = self.rows - n
        ids = [chunk.token_ids[0] for chunk in chunks]
        positions = [chunk.start for chunk in chunks]
        slots = [pool.slot(chunk.seq, chunk.start) for chunk in chunks] + [pool.padding_page * pool.page_tokens] * pad
        table = pool.page_table([chunk.seq for chunk in chunks] + [None] * pad, engine.max_pages, device="cpu")
        host = torch.tensor([ids + [0] * pad, positions + [0] * pad, slots], dtype=torch.long)
        self.ids.copy_(host[0], non_blocking=True)
        self.positions.copy_(host[1], non_blocking=True)
        self.slots.copy_(host[2], non_blocking=True)
        self.page_table.copy_(table, non_blocking=True)
        self.lengths.copy_(torch.tensor([p + 1 for p in positions] + [1] * pad, dtype=torch.int32), non_blocking=True)
        # without the paged kernel each row attends over its positions' slots, found here once, not in every layer
        self.row_slots = [] if engine.paged_kernel else [pool.slots(chunk.seq, 0, chunk.start + 1) for chunk in chunks]
        if self.host_embedding is not None:
            # Staged in pinned memory of torch's caching host allocator, fresh each pass: it is not handed out again
            # before the copy has run, where a buffer of our own could be overwritten by the next pass's rows while
            # a pass launched ahead still waits in the stream to copy it.
            staging = torch.empty(self.embedded.shape[1:], dtype=self.embedded.dtype, pin_memory=self.embedded.is_cuda)
            torch.index_select(self.host_embedding.weight, 0, host[0], out=staging)
            self.embedded[0].copy_(staging, non_blocking=True)

    def set_ids(self, ids: torch.Tensor) -> None:
        """Replace the token ids ``set`` wrote for the first ``len(ids)`` rows by ``ids`` (int64 on the device: the
        argmax of the pass before, not read back): with a host embedding their rows are gathered from the pinned
        table by the device (``compute.kernels.embedding``). After ``set``, on the same stream."""
        n = ids.shape[0]
        if self.host_embedding is not None:
            embedding_rows(self.host_embedding.weight, ids, self.embedded[0, :n])
        else:
            self.ids[:n].copy_(ids)

    def hidden(self, engine: BatchEngine) -> torch.Tensor:
        """The rows' embeddings (1, rows, hidden)."""
        if self.embedded is not None:
            return self.embedded
        return engine.model.model.embed_tokens(self.ids.unsqueeze(0))

    def attend(
        self, engine: BatchEngine, index: int, q: torch.Tensor, scale: float, *, operand: bool = False
    ) -> torch.Tensor | RowOperand:
        """Every row over its sequence's positions (rows, H, D): the paged kernel in one launch, else the same
        per-sequence attention a mixed pass uses (``BatchEngine.sequence_attention``), so a row's result does not
        depend on the pass it lands in; padding rows give zeros there. With ``operand``, where the paged kernel runs
        and can write it (``engine.attention_operand``), the o projection's ``RowOperand`` of the rows instead."""
        if engine.paged_kernel:
            operand = operand and engine.attention_operand
            return engine.paged_attention(index, q, self.page_table, self.lengths, scale, operand=operand)
        out = torch.zeros_like(q)  # (rows, H, D)
        for row, slots in enumerate(self.row_slots):
            out[row : row + 1] = engine.sequence_attention(index, q[row : row + 1], slots, scale)
        return out

    def run(self, engine: BatchEngine) -> torch.Tensor:
        """The pass over these buffers: logits of every row [rows, vocab]."""
        return engine.run_pass(self.hidden(engine), self.positions, self.slots, self, None)

    def run_segment(self, engine: BatchEngine, segment: Segment) -> torch.Tensor | None:
        """``segment``'s pieces of the pass (compute.segments.Segment: the prologue, a run of layers, the head) over
        these buffers, its units bound around them; the logits [rows, vocab] when it ends with the head, else None
        (the hidden state left in ``hidden_state`` for the next segment)."""
        inner = engine.model.model
        if segment.embeds:
            hidden = self.hidden(engine)
            cos, sin = inner.rotary_emb(hidden, self.positions.unsqueeze(0))  # (1, rows, D)
            self.cos.copy_(cos[0].unsqueeze(1))
            self.sin.copy_(sin[0].unsqueeze(1))
        else:
            hidden = self.hidden_state
        binder = engine.model.unit_binder
        layers = segment.layers
        normed = None  # the next layer's input norm, made by the layer before it in this segment (fused layers)
        for n, index in enumerate(layers):
            next_norm = engine.layers[layers[n + 1]].input_layernorm if n + 1 < len(layers) else None
            with binder.bound(index):  # layer i is unit i (plan_segments checks the order)
                hidden, normed = engine._layer(index, engine.layers[index], hidden, (self.cos, self.sin), self.slots,
                                               self, normed=normed, next_norm=next_norm)  # fmt: skip
        if segment.head:
            return engine.model.lm_head(inner.norm(hidden))[0]  # (rows, vocab); an untied head's hooks bind it
        self.hidden_state.copy_(hidden)
        return None


class BatchDecoder:
    """Runs decode passes for one ``BatchEngine``: replayed per bucket, or eagerly; see the module docstring."""

    def __init__(self, engine: BatchEngine, *, cuda_graphs: bool):
        self.engine = engine
        self.cuda_graphs = cuda_graphs
        self.buckets = tuple(b for b in BUCKETS if b < engine.max_batch) + (
            next((b for b in BUCKETS if b >= engine.max_batch), engine.max_batch),
        )
        self._graphs: dict[int, tuple[DecodeInputs, list]] = {}  # bucket -> buffers, per segment (graph, output)|None
        self._eager_inputs: dict[int, DecodeInputs] = {}  # rows -> buffers of eager passes (allocated once)
        self._pool = None  # one graph memory pool for every bucket (their replays never overlap)
        self._decided_for: object = ()  # the plan generation the graphs (or their absence) were decided for
        self._segments: tuple[Segment, ...] | None = None  # the pass cut for the plan in force; None: eager
        self._reason = "undecided (decided at the first decode pass)"
        self._units = [name for name, _ in engine.model.unit_binder.units]

    @property
    def mode(self) -> str:
        """"graph (buckets …)" (the whole pass one graph), "piecewise (N graphs, M eager units; buckets …)", or
        "eager: <why>"."""
        if self._segments is not None:
            buckets = ", ".join(str(b) for b in sorted(self._graphs)) or "none captured yet"
            shape = describe(self._segments)
            return f"{shape} (buckets {buckets})" if shape == "graph" else f"{shape[:-1]}; buckets {buckets})"
        return f"eager: {self._reason}"

    def run(self, chunks: Sequence[Chunk], ids: torch.Tensor | None = None) -> torch.Tensor:
        """The decode pass of ``chunks``: their logits [rows, vocab]; ``ids`` (int64 [rows] on the device), when
        given, are the rows' tokens instead of the chunks' (``DecodeInputs.set_ids``)."""
        self._decide()
        n = len(chunks)
        if self._segments is not None and n <= self.buckets[-1]:
            bucket = next(b for b in self.buckets if b >= n)
            captured = self._graphs.get(bucket) or self._capture(bucket, chunks)
            if captured is not None:
                inputs, graphs = captured
                inputs.set(self.engine, chunks)
                if ids is not None:
                    inputs.set_ids(ids)
                return self._run_segments(inputs, graphs)[:n]
        inputs = self._eager_inputs.get(n)
        if inputs is None:
            inputs = self._eager_inputs[n] = DecodeInputs(self.engine, n)
        inputs.set(self.engine, chunks)
        if ids is not None:
            inputs.set_ids(ids)
        return inputs.run(self.engine)

    def _run_segments(self, inputs: DecodeInputs, graphs) -> torch.Tensor:
        """One pass: each captured segment replayed (the binder moved past its units), the others run eagerly."""
        binder = self.engine.model.unit_binder
        logits = None
        for segment, graph in zip(self._segments, graphs):
            if graph is None:
                logits = inputs.run_segment(self.engine, segment)
            else:
                graph[0].replay()
                binder.skip(segment.units)
                logits = graph[1]
        return logits

    def _decide(self) -> None:
        key = plan_generation(self.engine.weights.plan)
        if key == self._decided_for:
            return
        self._graphs.clear()
        self._decided_for = key
        self._segments = None
        if not self.cuda_graphs:
            self._reason = "cuda_graphs is off"
            return
        if self.engine.device.type != "cuda":
            self._reason = f"CUDA graphs need a CUDA device (decode runs on {self.engine.device})"
            return
        if not self.engine.paged_kernel:  # the per-sequence attention indexes with slots found on the host per pass
            self._reason = "the paged attention kernel does not run for this model (bf16, power-of-two head size)"
            return
        streamed = streamed_units(self.engine.weights.plan)
        segments = plan_segments(self._units, streamed, len(self.engine.layers))
        if not any(segment.captured for segment in segments):
            self._reason = f"the plan streams {len(streamed)} of {len(self._units)} units: nothing to capture"
            return
        self._segments = segments

    def _capture(self, bucket: int, chunks: Sequence[Chunk]):
        """Warm up and capture the pass of ``bucket`` rows on ``chunks``' inputs: ``WARMUP_STEPS`` eager passes on a
        side stream, then one pass that captures the captured segments and runs the eager ones (so the loader's
        ring sees every unit of every pass in order). Every pass writes the rows' keys/values where the real pass
        writes them again. None, and eager decode for this plan, when it fails."""
        engine = self.engine
        binder = engine.model.unit_binder
        inputs = DecodeInputs(engine, bucket)
        inputs.set(engine, chunks)
        started = time.perf_counter()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    for segment in self._segments:
                        inputs.run_segment(engine, segment)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graphs = []
            for segment in self._segments:
                if not segment.captured:
                    inputs.run_segment(engine, segment)
                    graphs.append(None)
                    continue
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    output = inputs.run_segment(engine, segment)
                graphs.append((graph, output))
        except Exception as e:  # eager decode is always correct
            if binder.in_pass:
                binder.abandon_pass()
            log.warning("capturing the %d-row decode pass failed: decoding eagerly", bucket, exc_info=True)
            self._segments = None
            self._reason = f"capturing the decode pass failed: {e}"
            return None
        log.info("%d-row decode pass captured in %.2f s: %s", bucket, time.perf_counter() - started,
                 describe(self._segments))  # fmt: skip
        self._graphs[bucket] = (inputs, graphs)
        return self._graphs[bucket]
