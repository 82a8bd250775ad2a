"""The decode pass of many sequences over static buffers, replayed from CUDA graphs where the plan allows.

``BatchDecoder.run(chunks)`` runs a pass whose chunks are all decode rows (one token each, logits wanted) and
returns their logits ``[rows, vocab]``. It promises:

* The rows' inputs go into static buffers (``DecodeInputs``: token ids, or their embedding rows when the
  embedding is in host memory; positions; KV slots; the page table, ``max_pages`` wide; lengths), filled from
  the host by one copy each, and ``BatchEngine.run_pass`` computes from them with attention by
  ``compute.kernels.paged_attention``. Nothing in the pass reads a value back from the device.
* On CUDA with ``cuda_graphs`` and a plan that streams no unit, the pass is captured once per bucket size
  (``BUCKETS``: 1, 2, 4, 8, ... up to the engine's ``max_batch``) at its first use and replayed: a batch of n rows
  runs in the smallest bucket holding it, the extra rows padded (token 0 at position 0, their keys/values in the
  pool's padding page, which no sequence holds; their logits dropped). A replay runs no hooks: the unit binder
  is advanced past the resident units the graph read (``UnitBinder.skip``). A new plan drops the graphs; a
  capture that fails is logged and the plan decodes eagerly.
* Otherwise (CPU, streamed units, graphs off) the same pass runs eagerly on buffers of exactly n rows: a streamed
  unit's weights arrive through the loader's ring behind host-side waits, which a graph cannot hold.

``mode`` says how the last pass ran. This module knows nothing about requests or sampling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from compute.graphs import WARMUP_STEPS, plan_generation, streamed_units
from compute.model import HostEmbedding

if TYPE_CHECKING:
    from compute.batch_engine import BatchEngine, Chunk

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
        embedding = engine.model.model.embed_tokens
        self.host_embedding = embedding if isinstance(embedding, HostEmbedding) else None
        self.embedded = None  # (1, rows, hidden): the rows of a host embedding, copied over by ``set``
        if self.host_embedding is not None:
            hidden = self.host_embedding.weight.shape[1]
            self.embedded = torch.zeros((1, rows, hidden), dtype=self.host_embedding.weight.dtype, device=device)
            self._staging = torch.empty((rows, hidden), dtype=self.host_embedding.weight.dtype,
                                        pin_memory=device.type == "cuda")  # fmt: skip

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
        if self.host_embedding is not None:
            torch.index_select(self.host_embedding.weight, 0, host[0], out=self._staging)
            self.embedded[0].copy_(self._staging, non_blocking=True)

    def hidden(self, engine: BatchEngine) -> torch.Tensor:
        """The rows' embeddings (1, rows, hidden)."""
        if self.embedded is not None:
            return self.embedded
        return engine.model.model.embed_tokens(self.ids.unsqueeze(0))

    def attend(self, engine: BatchEngine, index: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        return engine.paged_attention(index, q, self.page_table, self.lengths, scale)

    def run(self, engine: BatchEngine) -> torch.Tensor:
        """The pass over these buffers: logits of every row [rows, vocab]."""
        return engine.run_pass(self.hidden(engine), self.positions, self.slots, self, None)


class BatchDecoder:
    """Runs decode passes for one ``BatchEngine``: replayed per bucket, or eagerly; see the module docstring."""

    def __init__(self, engine: BatchEngine, *, cuda_graphs: bool):
        self.engine = engine
        self.cuda_graphs = cuda_graphs
        self.buckets = tuple(b for b in BUCKETS if b < engine.max_batch) + (
            next((b for b in BUCKETS if b >= engine.max_batch), engine.max_batch),
        )
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, DecodeInputs, torch.Tensor]] = {}
        self._eager_inputs: dict[int, DecodeInputs] = {}  # rows -> buffers of eager passes (allocated once)
        self._pool = None  # one graph memory pool for every bucket (their replays never overlap)
        self._decided_for: object = ()  # the plan generation the graphs (or their absence) were decided for
        self._graphs_allowed = False
        self._reason = "undecided (decided at the first decode pass)"
        self._units = [name for name, _ in engine.model.unit_binder.units]

    @property
    def mode(self) -> str:
        """"graphs (buckets …)" when passes replay, else "eager: <why>"."""
        if self._graphs_allowed:
            return f"graphs (buckets {', '.join(str(b) for b in sorted(self._graphs)) or 'none captured yet'})"
        return f"eager: {self._reason}"

    def run(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        self._decide()
        n = len(chunks)
        if self._graphs_allowed and n <= self.buckets[-1]:
            bucket = next(b for b in self.buckets if b >= n)
            replayed = self._replay(bucket, chunks)
            if replayed is not None:
                return replayed[:n]
        inputs = self._eager_inputs.get(n)
        if inputs is None:
            inputs = self._eager_inputs[n] = DecodeInputs(self.engine, n)
        inputs.set(self.engine, chunks)
        return inputs.run(self.engine)

    def _decide(self) -> None:
        key = plan_generation(self.engine.weights)
        if key == self._decided_for:
            return
        self._graphs.clear()
        self._decided_for = key
        self._graphs_allowed = False
        if not self.cuda_graphs:
            self._reason = "cuda_graphs is off"
        elif self.engine.device.type != "cuda":
            self._reason = f"CUDA graphs need a CUDA device (decode runs on {self.engine.device})"
        elif streamed_units(self.engine.weights):
            self._reason = "the plan streams units through the ring (host-side waits a graph cannot hold)"
        else:
            self._graphs_allowed = True

    def _replay(self, bucket: int, chunks: Sequence[Chunk]) -> torch.Tensor | None:
        captured = self._graphs.get(bucket)
        if captured is None:
            captured = self._capture(bucket, chunks)
            if captured is None:
                return None
        graph, inputs, logits = captured
        inputs.set(self.engine, chunks)
        graph.replay()
        self.engine.model.unit_binder.skip(self._units)
        return logits

    def _capture(self, bucket: int, chunks: Sequence[Chunk]):
        """Warm up and capture the pass of ``bucket`` rows (on ``chunks``' inputs: the warm-up writes their
        keys/values, as the real pass will again); None, graphs off for this plan, when it fails."""
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
                    inputs.run(engine)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = inputs.run(engine)
        except Exception as e:  # eager decode is always correct
            if binder.in_pass:
                binder.abandon_pass()
            log.warning("capturing the %d-row decode pass failed: decoding eagerly", bucket, exc_info=True)
            self._graphs_allowed = False
            self._reason = f"capturing the decode pass failed: {e}"
            return None
        log.info("%d-row decode pass captured in %.2f s", bucket, time.perf_counter() - started)
        self._graphs[bucket] = (graph, inputs, logits)
        return self._graphs[bucket]
