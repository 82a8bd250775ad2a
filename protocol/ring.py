"""The ring protocol: shared int64 counters, the loader's (producer) side and compute's (consumer) side.

The streamed units, in execution order, repeat every forward pass. Access ``i`` (counted from 0 since the
last plan by both sides) is unit ``order[i % S]`` in slot ``i % K``. Four counters in a small shared file
carry the schedule, each with exactly one writer:

* ``acquired`` (compute): access ``i`` is wanted -> ``i + 1``;
* ``released`` (compute): access ``i`` is done -> ``i + 1`` (releases come in access order);
* ``filled`` (loader): access ``j`` is in its slot (CUDA: its copy is enqueued and ``filled_event[j % K]``
  recorded after it) -> ``j + 1``;
* ``wait_ns`` (compute): total time compute waited for ``filled``, for the loader's stats;

plus ``generation`` (loader), the plan they belong to. The loader fills access ``j`` only when the slot's
previous user has released it (``released > j - K``) and it is at most D ahead (``j < acquired + D``).
A counter is written only after the event record it announces is enqueued, so an event wait always waits
on the record it means (a wait on an event waits for its most recent record at the time the wait is enqueued,
so the consumer must know the record it means is enqueued). On CPU the copy is done before ``filled`` moves and the
counters alone suffice. An aligned 8-byte store is atomic, and on x86-64 stores become visible to the
other process in program order, so the bytes copied before ``filled`` moves are visible once it has; a
weakly ordered CPU would need a fence between the copy and the counter on the CPU path.

Waits spin with back-off, check that the peer process is alive, and time out with a message that says
where the ring stood. Nothing here sends a message: the ring runs without a round trip per unit.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import psutil
import torch

from protocol.errors import LoaderError, LoaderGone, RingOrderError
from protocol.messages import RingSpec, SharedBuffer

# int64 slots of the counters file, and its size (room to grow without changing the file's shape)
GENERATION, ACQUIRED, RELEASED, FILLED, WAIT_NS = range(5)
COUNTERS_BYTES = 128

# back-off of a waiting consumer: a few polls, then sleeps from SLEEP_MIN_S doubling to SLEEP_MAX_S (longer
# spinning measured slower on 2 cores: it takes the core the loader needs to make the fill)
SPINS_BEFORE_SLEEP = 20
SLEEP_MIN_S = 20e-6
SLEEP_MAX_S = 1e-3
LIVENESS_INTERVAL_S = 0.1


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as dead."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


class RingCounters:
    """The shared int64 counters, mapped from a file; reads and writes are plain aligned 8-byte accesses."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), COUNTERS_BYTES)
        self._values = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, path: Path) -> tuple["RingCounters", SharedBuffer]:
        """A new zeroed counters file at ``path`` (which must not exist), and its description for the Plan."""
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, COUNTERS_BYTES)
        finally:
            os.close(fd)
        return cls(str(path)), SharedBuffer(nbytes=COUNTERS_BYTES, path=str(path), cuda=None)

    @classmethod
    def attach(cls, buffer: SharedBuffer) -> "RingCounters":
        if buffer.path is None or buffer.nbytes != COUNTERS_BYTES:
            raise LoaderError(f"the plan's counters are not a {COUNTERS_BYTES}-byte file: {buffer}")
        if not os.path.isfile(buffer.path):
            raise LoaderGone(f"the loader's counters file {buffer.path} is gone (has the loader exited?)")
        return cls(buffer.path)

    def __getitem__(self, index: int) -> int:
        return self._values[index]

    def __setitem__(self, index: int, value: int) -> None:
        self._values[index] = value

    def reset(self, generation: int) -> None:
        """Loader only, with compute quiescent: every counter to 0 for a new plan."""
        for index in (ACQUIRED, RELEASED, FILLED, WAIT_NS):
            self._values[index] = 0
        self._values[GENERATION] = generation

    def close(self) -> None:
        self._values.release()
        self._map.close()


class RingProducer:
    """The loader's side: which access to fill next, and when the counters allow it."""

    def __init__(self, counters: RingCounters, spec: RingSpec):
        self.counters = counters
        self.spec = spec

    def next_fill(self) -> tuple[int, int, str] | None:
        """(access j, slot, unit name) the loader may fill now, or None while the counters forbid it."""
        if not self.spec.order:
            return None
        j = self.counters[FILLED]
        if j >= self.counters[ACQUIRED] + self.spec.prefetch_depth:
            return None  # D ahead of compute already
        if self.counters[RELEASED] <= j - self.spec.slots:
            return None  # the slot's previous user (access j - K) has not released it
        return j, j % self.spec.slots, self.spec.order[j % len(self.spec.order)]

    def publish_fill(self, access: int) -> None:
        """Announce that ``access`` is filled (CUDA: after its copy and event record are enqueued)."""
        self.counters[FILLED] = access + 1


class RingConsumer:
    """Compute's side: checks the caller keeps the ring's order, and waits for fills without messages."""

    def __init__(
        self,
        counters: RingCounters,
        spec: RingSpec,
        generation: int,
        loader_pid: int,
        timeout_s: float,
        filled_events: list[torch.cuda.Event] | None = None,
        released_events: list[torch.cuda.Event] | None = None,
    ):
        self.counters = counters
        self.spec = spec
        self.generation = generation
        self.loader_pid = loader_pid
        self.timeout_s = timeout_s
        self.filled_events = filled_events
        self.released_events = released_events
        self.next_access = 0  # the access the next acquire takes
        self.next_release = 0  # the oldest acquired access not yet released

    @property
    def held(self) -> int:
        return self.next_access - self.next_release

    def expected(self) -> str:
        return self.spec.order[self.next_access % len(self.spec.order)]

    def acquire(self, name: str, stream: torch.cuda.Stream | None = None) -> int:
        """Take the next access, which must be unit ``name``; returns its slot once the loader filled it."""
        i = self.next_access
        if name != self.expected():
            raise RingOrderError(
                f"acquire({name!r}): the ring expects {self.expected()!r} next (streamed access {i}, order "
                f"{', '.join(self.spec.order)}); acquire streamed units in execution order every forward pass"
            )
        if self.held >= self.spec.slots:
            raise RingOrderError(
                f"acquire({name!r}) while holding {self.held} streamed units: the ring has only "
                f"{self.spec.slots} slots, so this would wait forever; release the oldest first"
            )
        self.counters[ACQUIRED] = i + 1
        if self.counters[FILLED] <= i:
            self._wait_filled(i)
        slot = i % self.spec.slots
        if self.filled_events is not None:
            stream = stream if stream is not None else torch.cuda.current_stream()
            stream.wait_event(self.filled_events[slot])
        self.next_access = i + 1
        return slot

    def release(self, name: str, stream: torch.cuda.Stream | None = None) -> None:
        """Give back the oldest held access, which must be unit ``name``, after its last use is enqueued."""
        i = self.next_release
        if i >= self.next_access:
            raise RingOrderError(f"release({name!r}): no streamed unit is acquired")
        held_name = self.spec.order[i % len(self.spec.order)]
        if name != held_name:
            raise RingOrderError(
                f"release({name!r}): streamed units are released in the order acquired; the oldest held is {held_name!r}"
            )
        if self.released_events is not None:
            stream = stream if stream is not None else torch.cuda.current_stream()
            self.released_events[i % self.spec.slots].record(stream)
        self.counters[RELEASED] = i + 1
        self.next_release = i + 1

    def _wait_filled(self, i: int) -> None:
        start = time.perf_counter()
        next_check = start + LIVENESS_INTERVAL_S
        spins = 0
        sleep = SLEEP_MIN_S
        while self.counters[FILLED] <= i:
            spins += 1
            if spins > SPINS_BEFORE_SLEEP:
                time.sleep(sleep)
                sleep = min(sleep * 2, SLEEP_MAX_S)
            now = time.perf_counter()
            if now >= next_check:
                next_check = now + LIVENESS_INTERVAL_S
                self._check_loader(i, now - start)
        self.counters[WAIT_NS] = self.counters[WAIT_NS] + int((time.perf_counter() - start) * 1e9)

    def _check_loader(self, i: int, waited_s: float) -> None:
        if not pid_alive(self.loader_pid):
            raise LoaderGone(
                f"the loader process (pid {self.loader_pid}) is gone while compute waited for "
                f"{self.spec.order[i % len(self.spec.order)]!r} (streamed access {i})"
            )
        generation = self.counters[GENERATION]
        if generation != self.generation:
            raise LoaderError(f"the loader's plan changed under compute (generation {generation}, ours {self.generation})")
        if waited_s > self.timeout_s:
            raise LoaderError(
                f"the loader (pid {self.loader_pid}) is alive but did not fill streamed access {i} "
                f"({self.spec.order[i % len(self.spec.order)]!r}) within {self.timeout_s:.0f} s; counters: "
                f"acquired {self.counters[ACQUIRED]}, released {self.counters[RELEASED]}, filled {self.counters[FILLED]}"
            )

