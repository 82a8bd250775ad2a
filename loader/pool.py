"""``DevicePool``: the ONE device allocation the loader shares with compute, and the ring's producer side.

The pool holds, for the placement in force, the resident units back to back from offset 0 (execution order,
each laid out as its ``UnitLayout``), then the K ring slots. It is allocated once, at its capacity (the
largest pool any policy would use under the budget, see ``loader.process``), so a policy switch re-places
units inside the same memory and compute keeps its attachment. On CUDA it is one ``torch.empty`` allocation
exported by CUDA IPC (an IPC handle covers a whole segment: one buffer, offsets inside it); on CPU it is a
file in the loader's private run directory, mapped by both processes.

``place`` copies the resident units in and resets the ring; ``advance`` fills slots as far as the shared
counters allow (``protocol.ring``), on a dedicated copy stream with ``non_blocking`` copies from the pinned
arena, gated by the interprocess "released" events and announced by the "filled" events. Copy times are
measured on the copy stream (CUDA events) or around the copy (CPU) and kept per policy for ``Stats``.

Nothing here talks to a socket; ``loader.process`` drives it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from loader.arena import PinnedArena
from loader.layout import UnitLayout
from loader.planner import Placement
from protocol.sizes import format_size
from protocol.messages import PolicyStats, RingSpec, SharedBuffer, TensorPlacement, UnitPlacement
from protocol.ring import ACQUIRED, RELEASED, WAIT_NS, RingCounters, RingProducer
from protocol.shared import create_host_buffer, create_ipc_events, export_cuda_buffer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PolicyTotals:
    """Running totals while one policy is in force; mutable because it accumulates (``freeze`` for Stats)."""

    streamed_bytes: int = 0  # ring copies done and timed, bytes (counted when their time is known)
    fills: int = 0  # ring fills measured
    copy_seconds: float = 0.0  # time of those copies, seconds
    resident_bytes: int = 0  # bytes copied for resident units
    resident_seconds: float = 0.0  # time of those copies (to completion), seconds
    acquires: int = 0  # streamed accesses compute acquired, from plans no longer in force
    wait_ns: int = 0  # compute's waits for fills, from plans no longer in force, nanoseconds

    def freeze(self, policy: str, live_acquires: int = 0, live_wait_ns: int = 0) -> PolicyStats:
        return PolicyStats(
            policy=policy,
            streamed_bytes=self.streamed_bytes,
            fills=self.fills,
            copy_seconds=self.copy_seconds,
            resident_bytes=self.resident_bytes,
            resident_seconds=self.resident_seconds,
            acquires=self.acquires + live_acquires,
            compute_wait_seconds=(self.wait_ns + live_wait_ns) / 1e9,
        )


@dataclasses.dataclass(frozen=True)
class PoolPlacement:
    """What the Plan message needs from the pool for one placement."""

    units: tuple[UnitPlacement, ...]  # every unit, execution order
    ring: RingSpec
    filled_events: tuple[bytes, ...]  # CUDA: K IPC event handles; CPU: empty
    released_events: tuple[bytes, ...]


class DevicePool:
    """The shared pool, its counters and events, and the copies that fill it."""

    def __init__(self, *, arena: PinnedArena, units: Sequence[UnitLayout], device: str, capacity_bytes: int, run_dir: Path):
        self.arena = arena
        self.units = {u.name: u for u in units}
        self.device = torch.device(device)
        self.capacity_bytes = capacity_bytes
        if self.device.type == "cuda":
            # one allocation, so one IPC handle covers every offset compute will use
            self.buffer = torch.empty(capacity_bytes, dtype=torch.uint8, device=self.device)
            self.shared: SharedBuffer = export_cuda_buffer(self.buffer)
            self.copy_stream = torch.cuda.Stream(device=self.device)
        else:
            self.buffer, self.shared = create_host_buffer(run_dir / "pool", capacity_bytes)
            self.copy_stream = None
        self.counters, self.counters_shared = RingCounters.create(run_dir / "counters")
        self._filled_events: list[torch.cuda.Event] = []
        self._released_events: list[torch.cuda.Event] = []
        self._filled_handles: tuple[bytes, ...] = ()
        self._released_handles: tuple[bytes, ...] = ()
        self._pending: collections.deque = collections.deque()  # CUDA: (start, end, nbytes) of unmeasured fills
        self.totals: dict[str, PolicyTotals] = {}
        self.policy: str | None = None
        self.generation = 0
        self._producer: RingProducer | None = None
        self._resident: tuple[str, ...] | None = None  # the resident units now in the pool, in pool order
        self._slot_base = 0
        self._slot_bytes = 0
        log.info("device pool: %s on %s", format_size(capacity_bytes), self.device)

    def place(self, placement: Placement) -> PoolPlacement:
        """Re-place every unit for ``placement``: copy the resident ones in, reset the ring, bump the generation.

        Compute must be quiescent (nothing acquired): the caller checks that before calling.
        """
        if placement.pool_bytes > self.capacity_bytes:
            raise ValueError(
                f"policy {placement.policy!r} needs a pool of {format_size(placement.pool_bytes)}, but this loader "
                f"allocated {format_size(self.capacity_bytes)} at start; restart the loader with --policy {placement.policy}"
            )
        self._quiesce()
        self._fold_live_counters()
        totals = self.totals.setdefault(placement.policy, PolicyTotals())

        # the same resident units land at the same offsets: skip the copies when only the ring changes
        copy_resident = placement.resident != self._resident
        placements = []
        offset = 0
        start = time.perf_counter()
        for name in placement.resident:
            unit = self.units[name]
            if copy_resident:
                self._copy(self.buffer[offset : offset + unit.nbytes], self.arena.unit(name))
            placements.append(_unit_placement(unit, offset))
            offset += unit.nbytes
        self._sync()
        self._resident = placement.resident
        if copy_resident:
            totals.resident_bytes += offset
            totals.resident_seconds += time.perf_counter() - start
        placements += [_unit_placement(self.units[name], None) for name in placement.streamed]
        placements.sort(key=lambda u: u.index)

        ring = RingSpec(
            slots=placement.ring_slots,
            slot_bytes=placement.slot_bytes,
            base_offset=offset,
            prefetch_depth=placement.prefetch_depth,
            order=placement.streamed,
        )
        self._ensure_events(placement.ring_slots)
        self.generation += 1
        self.counters.reset(self.generation)
        self.policy = placement.policy
        self._producer = RingProducer(self.counters, ring)
        self._slot_base, self._slot_bytes = offset, placement.slot_bytes
        log.info(
            "placed policy %r (generation %d): %d resident units (%s), %d streamed through %d slots",
            placement.policy, self.generation, len(placement.resident), format_size(offset),
            len(placement.streamed), placement.ring_slots,
        )  # fmt: skip
        return PoolPlacement(
            units=tuple(placements),
            ring=ring,
            filled_events=self._filled_handles[: placement.ring_slots],
            released_events=self._released_handles[: placement.ring_slots],
        )

    def quiescent(self) -> bool:
        """True when compute holds no streamed unit (every acquired access released)."""
        return self.counters[ACQUIRED] == self.counters[RELEASED]

    def advance(self) -> int:
        """Fill every access the counters allow now; returns how many were filled."""
        if self._producer is None:
            return 0
        filled = 0
        while (fill := self._producer.next_fill()) is not None:
            access, slot, name = fill
            start = self._slot_base + slot * self._slot_bytes
            source = self.arena.unit(name)
            target = self.buffer[start : start + source.numel()]
            if self.copy_stream is None:
                began = time.perf_counter()
                target.copy_(source)
                self._count_fill(source.numel(), time.perf_counter() - began)
            else:
                self._fill_cuda(target, source, slot)
            self._producer.publish_fill(access)
            filled += 1
        if self._pending:
            self._drain_timings()
        return filled

    def stats(self) -> tuple[PolicyStats, ...]:
        """Per policy, in the order first used; the policy in force includes the live counters.

        Waits for the copies in flight (at most K) so every fill enqueued so far is counted and timed.
        """
        self._quiesce()
        return tuple(
            totals.freeze(policy, *((self.counters[ACQUIRED], self.counters[WAIT_NS]) if policy == self.policy else ()))
            for policy, totals in self.totals.items()
        )

    def close(self) -> None:
        """Wait for in-flight copies, then drop the pool (compute's attachment keeps CUDA memory until it detaches)."""
        self._quiesce()
        self._producer = None
        self.counters.close()
        self.buffer = None
        self._filled_events.clear()
        self._released_events.clear()

    # ---- internals ----

    def _copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        if self.copy_stream is None:
            target.copy_(source)
            return
        with torch.cuda.stream(self.copy_stream):
            target.copy_(source, non_blocking=True)

    def _fill_cuda(self, target: torch.Tensor, source: torch.Tensor, slot: int) -> None:
        stream = self.copy_stream
        # the wait is for access j - K's release: released > j - K guarantees its record is already enqueued
        stream.wait_event(self._released_events[slot])
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began.record(stream)
        self._copy(target, source)
        ended.record(stream)
        self._filled_events[slot].record(stream)
        self._pending.append((began, ended, source.numel()))

    def _drain_timings(self) -> None:
        while self._pending and self._pending[0][1].query():
            began, ended, nbytes = self._pending.popleft()
            self._count_fill(nbytes, began.elapsed_time(ended) / 1e3)

    def _count_fill(self, nbytes: int, seconds: float) -> None:
        totals = self.totals[self.policy]
        totals.streamed_bytes += nbytes
        totals.fills += 1
        totals.copy_seconds += seconds

    def _sync(self) -> None:
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    def _quiesce(self) -> None:
        """Let every enqueued copy finish and be measured, so nothing writes into a slot being re-placed."""
        self._sync()
        if self._pending:
            self._drain_timings()

    def _fold_live_counters(self) -> None:
        """Move the ending plan's compute-side counters into its policy's totals before they are reset."""
        if self.policy is not None:
            totals = self.totals[self.policy]
            totals.acquires += self.counters[ACQUIRED]
            totals.wait_ns += self.counters[WAIT_NS]

    def _ensure_events(self, count: int) -> None:
        if self.copy_stream is None or len(self._filled_events) >= count:
            return
        more = count - len(self._filled_events)
        filled, filled_handles = create_ipc_events(more, self.device)
        released, released_handles = create_ipc_events(more, self.device)
        self._filled_events += filled
        self._released_events += released
        self._filled_handles += filled_handles
        self._released_handles += released_handles


def _unit_placement(unit: UnitLayout, pool_offset: int | None) -> UnitPlacement:
    return UnitPlacement(
        name=unit.name,
        index=unit.index,
        nbytes=unit.nbytes,
        pool_offset=pool_offset,
        tensors=tuple(
            TensorPlacement(name=t.name, offset=t.offset, nbytes=t.nbytes, dtype=t.dtype, shape=tuple(t.shape))
            for t in unit.tensors
        ),
    )
