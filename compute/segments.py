"""The decode step cut into segments: runs of resident pieces captured as CUDA graphs, the rest run eagerly.

A resident unit's weights sit at fixed addresses in the pool and the KV cache is static, so the part of a token's
forward that touches only resident units is the same sequence of kernels every time: captured once, it replays
with one launch. A streamed unit sits in whichever ring slot the loader filled, behind host-side waits, so its
layer must run eagerly.

``plan_segments(units, streamed, num_layers)`` cuts the decode step's pieces (the prologue: embedding, rotary
cos/sin and mask; decoder layers 0 … L-1; the head: final norm and lm_head) into ``Segment``s: every maximal run of
resident pieces that holds a resident unit is one captured segment, everything else runs eagerly, adjacent eager
pieces in one segment. With nothing streamed that is ONE captured segment (the whole step); with everything
streamed, one eager segment. ``streamed_units(plan)`` and ``plan_generation(plan)`` read the loader's plan.
Pure: no device, no model.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Collection, Sequence

from protocol.messages import Plan

LM_HEAD_UNIT = "lm_head"  # the unit name of an untied lm_head (a tied one is the embedding: no unit)


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


def streamed_units(plan: Plan | None) -> frozenset[str]:
    """The units the loader's plan streams through its ring (no fixed address); none without a plan (an
    in-process weight source serves the same tensors every time)."""
    if plan is None:
        return frozenset()
    return frozenset(unit.name for unit in plan.units if unit.pool_offset is None)


def plan_generation(plan: Plan | None) -> int | None:
    """The generation of the plan in force (it changes with every policy switch), or None without a plan."""
    return None if plan is None else plan.generation
