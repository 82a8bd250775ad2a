"""Segments of the decode step captured as CUDA graphs and replayed, the eager ones run between them.

At batch 1 a 64-layer model launches over a thousand small kernels per token; issuing them from Python costs more
CPU time than the GPU spends reading the weights. ``DecodeGraphs.capture(step, segments, binder)`` warms the step up,
then captures the captured segments (``compute.segments``) in one pass that runs the eager ones for real;
``run()`` is one decode step: replays and eager segments in order, the logits returned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from compute.decode_step import DecodeStep
from compute.model import UnitBinder
from compute.segments import Segment, describe

WARMUP_STEPS = 2  # eager runs on the side stream before capture (lazy inits, Triton compiles, cuBLAS workspaces)


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
