"""How an engine runs its decode steps: CUDA graphs where the plan in force allows, eagerly otherwise.

``Decoder`` is what the engine calls per decode step, and per speculative pass of up to ``gemv_mma.MAX_ROWS`` rows
where the fused decode layers run (``Decoder.rows``: a step of as many rows, in buckets of 2, 4, 8 and 16); it
decides per plan generation whether to capture (``compute.cuda_graphs``), drops the graphs of an older plan, falls
back to eager decode (reason logged) when capture fails; ``mode`` says how it runs. It reads the loader's plan
through ``UnitWeights.plan`` and nothing else of the protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from compute.cuda_graphs import DecodeGraphs
from compute.decode_step import DecodeStep
from compute.kernels.gemv_mma import MAX_ROWS
from compute.model import UnitBinder, UnitWeights
from compute.segments import Segment, eager_segment, plan_generation, plan_segments, streamed_units

log = logging.getLogger(__name__)

ROW_BUCKETS = (2, 4, 8, MAX_ROWS)  # rows a speculative pass's step is made (and captured) for


class Decoder:
    """How an engine runs its decode steps, decided again whenever the plan in force or ``cuda_graphs`` changes.

    ``decoder(token, position, cuda_graphs=True)`` returns the step's logits ([vocab], valid until the next step).
    On CUDA with ``cuda_graphs``, the first step under a plan cuts the step into segments (``plan_segments``) and
    captures the resident ones (``DecodeGraphs``); a plan that leaves nothing to capture, a CPU device, or a capture
    that fails (logged with its reason, the pass it interrupted walked to its end) runs the whole step eagerly.
    A policy switch moves units in the pool, so graphs captured under an older plan would read stale addresses:
    they are dropped. ``mode`` says in one line how decode runs.

    ``decoder.rows(tokens, positions, slot, tree, cuda_graphs=True)`` runs the rows of a speculative pass
    (``DecodeStep.set_rows``) through a step of the smallest bucket that holds them, made by ``make_step(rows)`` at
    its first use; the bucket's extra rows attend only themselves and are written past the real ones (the caller
    rewinds the cache). Where the one-row step replays graphs, each bucket's step is captured at its first use
    too, under the same segments. ``max_rows`` is how many rows it takes (1 without ``make_step`` or fused
    layers).
    """

    def __init__(
        self, step: DecodeStep, binder: UnitBinder, weights: UnitWeights, device: torch.device,
        make_step: Callable[[int], DecodeStep] | None = None,
    ):  # fmt: skip
        self.step = step
        self.graphs: DecodeGraphs | None = None  # the captured step for the plan in force, if any
        self._make_step = make_step
        self._row_steps: dict[int, DecodeStep] = {}  # bucket -> its step, made at first use
        self._row_graphs: dict[int, DecodeGraphs | None] = {}  # bucket -> its captured step (None: eager)
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

    @property
    def max_rows(self) -> int:
        return MAX_ROWS if self._make_step is not None and self.step.fused_layers is not None else 1

    def rows(self, tokens: list[int], positions: list[int], slot: int, tree: list[int], *, cuda_graphs: bool):
        """The logits ([len(tokens), vocab], valid until the next pass) of a speculative pass over ``tokens`` at
        rotary ``positions``, written at cache slots ``slot …``, row t attending the rows of ``tree[t]``'s bits."""
        n = len(tokens)
        if not 1 <= n <= self.max_rows:
            raise ValueError(f"a pass of {n} rows: this decoder takes 1 … {self.max_rows}")
        bucket = next(b for b in ROW_BUCKETS if b >= n)
        step = self._row_steps.get(bucket)
        if step is None:
            step = self._row_steps[bucket] = self._make_step(bucket)
        pad = bucket - n
        step.set_rows([*tokens, *[0] * pad], [*positions, *[positions[-1]] * pad], slot,
                      [*tree, *(1 << row for row in range(n, bucket))])  # fmt: skip
        if self._decision(cuda_graphs) != self._decided_for:
            # deciding may capture the one-row step, whose warm-up writes a token's keys/values at its position: let
            # that be this pass's first slot, which the pass writes again (not a stale position the cache holds)
            self.step.set(tokens[0], slot)
        self._decide(cuda_graphs)
        if self.graphs is not None:
            if bucket not in self._row_graphs:
                self._row_graphs[bucket] = self._capture_rows(step, bucket)
            graphs = self._row_graphs[bucket]
            if graphs is not None:
                return graphs.run()[:n]
        return step.run(self._eager)[:n]

    def _capture_rows(self, step: DecodeStep, bucket: int) -> DecodeGraphs | None:
        """``step`` captured under the one-row step's segments, or None (logged) to run it eagerly."""
        lengths = step.cache_lengths()
        started = time.perf_counter()
        try:
            graphs = DecodeGraphs.capture(step, self.graphs.segments, self._binder)
        except Exception:  # eager is always correct
            if self._binder.in_pass:
                self._binder.abandon_pass()
            step.restore_cache_lengths(lengths)
            log.warning("capturing the %d-row step as CUDA graphs failed: it runs eagerly", bucket, exc_info=True)
            return None
        log.info("%d-row step captured in %.2f s", bucket, time.perf_counter() - started)
        return graphs

    def _decision(self, cuda_graphs: bool) -> tuple[int | None, bool]:
        """What a decision is made for: the plan in force and ``cuda_graphs``."""
        return plan_generation(self._weights.plan), cuda_graphs

    def _decide(self, cuda_graphs: bool) -> None:
        key = self._decision(cuda_graphs)
        if key == self._decided_for:
            return
        self.graphs = None
        self._row_graphs.clear()
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
