"""Residency policies: which units stay in the device pool, and which stream through a ring of slots.

A policy sees only the units (in execution order, with their sizes) and the bytes the planner left for the
pool. It answers with a ``Residency``: the resident units, the streamed units (execution order: the ring
serves them in that order, cyclically, every forward pass), the ring's slot count K, its prefetch depth
D (1 <= D <= K: how many accesses the loader may fill ahead of the compute process), and the slot size
(the largest streamed unit). The pool then holds ``resident bytes + K x slot bytes``.

Every policy answers two questions: its ``minimum`` (the smallest pool it can run in; the planner refuses
the budget, before allocating anything, when even that does not fit) and its ``place``-ment for a pool
budget at least that large. A policy is a small class registered in ``POLICIES`` by its ``name``; adding
one touches this file only. Policies are pure: no I/O, no device.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, NamedTuple, Sequence

from loader.layout import UnitLayout

# The ring must hold the unit in use and the one being filled: fewer than two slots serializes copy and compute.
MIN_RING_SLOTS = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class Residency:
    """A policy's answer: what stays in the pool, what streams, and the ring that streams it."""

    resident: tuple[str, ...]  # unit names, execution order; fixed addresses in the pool
    streamed: tuple[str, ...]  # unit names, execution order; the ring's order
    resident_bytes: int  # sum of the resident units' nbytes
    ring_slots: int  # K; 0 when nothing streams
    prefetch_depth: int  # D, 1 <= D <= K; 0 when nothing streams
    slot_bytes: int  # the largest streamed unit's nbytes; 0 when nothing streams

    @property
    def ring_bytes(self) -> int:
        return self.ring_slots * self.slot_bytes

    @property
    def pool_bytes(self) -> int:
        return self.resident_bytes + self.ring_bytes


class Policy(abc.ABC):
    """Decides a ``Residency`` for units under a pool budget. Subclasses set ``name`` and ``summary``."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help and error messages

    @abc.abstractmethod
    def minimum(
        self, units: Sequence[UnitLayout], *, ring_slots: int | None = None, prefetch_depth: int | None = None
    ) -> Residency:
        """The placement with the smallest pool this policy accepts for ``units``."""

    @abc.abstractmethod
    def place(
        self,
        units: Sequence[UnitLayout],
        pool_budget: int,
        *,
        ring_slots: int | None = None,
        prefetch_depth: int | None = None,
    ) -> Residency:
        """The placement for a pool of at most ``pool_budget`` bytes; called only when ``minimum`` fits."""


def _ring_shape(
    policy: str, ring_slots: int | None, prefetch_depth: int | None, default_slots: int, default_depth: int
) -> tuple[int, int]:
    """(K, D) from the caller's choices or the policy's defaults, checked."""
    slots = default_slots if ring_slots is None else ring_slots
    if slots < MIN_RING_SLOTS:
        raise ValueError(f"policy {policy!r}: --ring-slots {slots} is too few; a ring needs at least {MIN_RING_SLOTS}")
    depth = min(default_depth, slots) if prefetch_depth is None else prefetch_depth
    if not 1 <= depth <= slots:
        raise ValueError(f"policy {policy!r}: --prefetch-depth {depth} must be between 1 and the ring's {slots} slots")
    return slots, depth


def _split(units: Sequence[UnitLayout], streamed: set[str], slots: int, depth: int) -> Residency:
    resident = [u for u in units if u.name not in streamed]
    ring = [u for u in units if u.name in streamed]
    if not ring:
        slots = depth = 0
    return Residency(
        resident=tuple(u.name for u in resident),
        streamed=tuple(u.name for u in ring),
        resident_bytes=sum(u.nbytes for u in resident),
        ring_slots=slots,
        prefetch_depth=depth,
        slot_bytes=max((u.nbytes for u in ring), default=0),
    )


class ResidentPolicy(Policy):
    name = "resident"
    summary = "every unit stays in the pool; nothing streams (refused when the model does not fit)"

    def minimum(self, units, *, ring_slots=None, prefetch_depth=None):
        if ring_slots is not None or prefetch_depth is not None:
            raise ValueError("policy 'resident' streams nothing: --ring-slots and --prefetch-depth do not apply to it")
        return _split(units, set(), 0, 0)

    def place(self, units, pool_budget, *, ring_slots=None, prefetch_depth=None):
        return self.minimum(units, ring_slots=ring_slots, prefetch_depth=prefetch_depth)


class StreamPolicy(Policy):
    name = "stream"
    summary = "every unit streams through a ring of K slots (default 3), filled up to D (default 2) ahead"
    default_slots = 3
    default_depth = 2

    def minimum(self, units, *, ring_slots=None, prefetch_depth=None):
        slots, depth = _ring_shape(self.name, ring_slots, prefetch_depth, self.default_slots, self.default_depth)
        return _split(units, {u.name for u in units}, slots, depth)

    def place(self, units, pool_budget, *, ring_slots=None, prefetch_depth=None):
        return self.minimum(units, ring_slots=ring_slots, prefetch_depth=prefetch_depth)


class _Stretch(NamedTuple):
    """A candidate for the hybrid policy: units ``start .. start + length - 1`` (cyclically) streamed."""

    pool: int  # bytes: resident units + K x the stretch's largest unit
    resident: int  # bytes of the units outside the stretch
    start: int
    length: int


class HybridPolicy(Policy):
    """As many bytes resident as the pool allows; the rest streams as ONE stretch of the (cyclic) order.

    Keeping the streamed units contiguous means the loader can fill the ring's first slots during the whole
    resident stretch, hiding those copies behind compute. Among the stretches that fit, the one streaming
    the fewest bytes wins (each streamed byte crosses the bus every forward pass); ties go to the stretch
    that ends latest, keeping the earlier layers resident. The default ring is the smallest that overlaps
    copy and compute (K = D = 2): an extra slot costs a unit's worth of pool that, resident, would stream
    nothing at all.
    """

    name = "hybrid"
    summary = "as many units resident as the budget allows, one contiguous stretch streamed (ring K=2, D=2)"
    default_slots = 2
    default_depth = 2

    def _stretches(self, units: Sequence[UnitLayout], slots: int) -> list[_Stretch]:
        """All units resident (length 0), then every cyclic stretch of 1..n units streamed."""
        n = len(units)
        total = sum(u.nbytes for u in units)
        stretches = [_Stretch(pool=total, resident=total, start=0, length=0)]
        for start in range(n):
            streamed = largest = 0
            for length in range(1, n + 1 if start == 0 else n):
                unit = units[(start + length - 1) % n]
                streamed += unit.nbytes
                largest = max(largest, unit.nbytes)
                stretches.append(_Stretch(total - streamed + slots * largest, total - streamed, start, length))
        return stretches

    @staticmethod
    def _preference(n: int):
        def key(s: _Stretch) -> tuple[int, bool, int, int]:
            # most bytes resident (fewest streamed), then a stretch that does not wrap around the end of
            # the order, then the one ending latest (earlier layers stay resident), then the smaller pool
            return (-s.resident, s.start + s.length > n, -(s.start + s.length), s.pool)

        return key

    @staticmethod
    def _residency(units: Sequence[UnitLayout], s: _Stretch, slots: int, depth: int) -> Residency:
        streamed = {units[(s.start + k) % len(units)].name for k in range(s.length)}
        return _split(units, streamed, slots, depth)

    def minimum(self, units, *, ring_slots=None, prefetch_depth=None):
        slots, depth = _ring_shape(self.name, ring_slots, prefetch_depth, self.default_slots, self.default_depth)
        prefer = self._preference(len(units))
        best = min(self._stretches(units, slots), key=lambda s: (s.pool, prefer(s)))
        return self._residency(units, best, slots, depth)

    def place(self, units, pool_budget, *, ring_slots=None, prefetch_depth=None):
        slots, depth = _ring_shape(self.name, ring_slots, prefetch_depth, self.default_slots, self.default_depth)
        fitting = [s for s in self._stretches(units, slots) if s.pool <= pool_budget]
        if not fitting:
            raise ValueError(f"policy 'hybrid': no placement fits a pool of {pool_budget} bytes (check `minimum` first)")
        return self._residency(units, min(fitting, key=self._preference(len(units))), slots, depth)


POLICIES: dict[str, Policy] = {policy.name: policy for policy in (ResidentPolicy(), StreamPolicy(), HybridPolicy())}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}") from None
