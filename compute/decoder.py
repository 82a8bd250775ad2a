"""How an engine runs its decode steps: CUDA graphs where the plan in force allows, eagerly otherwise.

``Decoder`` is what the engine calls per decode step; it decides per plan generation whether to capture
(``compute.cuda_graphs``), drops the graphs of an older plan, falls back to eager decode (reason logged) when capture
fails; ``mode`` says how it runs. It reads the loader's plan through ``UnitWeights.plan`` and nothing else of the
protocol.
"""

from __future__ import annotations

import logging
import time

import torch

from compute.cuda_graphs import DecodeGraphs
from compute.decode_step import DecodeStep
from compute.model import UnitBinder, UnitWeights
from compute.segments import Segment, eager_segment, plan_generation, plan_segments, streamed_units

log = logging.getLogger(__name__)


class Decoder:
    """How an engine runs its decode steps, decided again whenever the plan in force or ``cuda_graphs`` changes.

    ``decoder(token, position, cuda_graphs=True)`` returns the step's logits ([vocab], valid until the next step).
    On CUDA with ``cuda_graphs``, the first step under a plan cuts the step into segments (``plan_segments``) and
    captures the resident ones (``DecodeGraphs``); a plan that leaves nothing to capture, a CPU device, or a capture
    that fails (logged with its reason, the pass it interrupted walked to its end) runs the whole step eagerly.
    A policy switch moves units in the pool, so graphs captured under an older plan would read stale addresses:
    they are dropped. ``mode`` says in one line how decode runs.
    """

    def __init__(self, step: DecodeStep, binder: UnitBinder, weights: UnitWeights, device: torch.device):
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
        key = (plan_generation(self._weights.plan), cuda_graphs)
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
        streamed = streamed_units(self._weights.plan)
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
