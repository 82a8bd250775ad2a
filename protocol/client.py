"""``LoaderClient``: everything the compute process does with the loader, behind one small API.

    client = LoaderClient.connect(address, timeout_s=30)   # Hello -> Plan; attaches pool, counters, events
    weights = client.acquire("layers.3", stream=None)       # tensor name -> view into the pool
    client.release("layers.3", stream=None)
    client.set_policy("stream")                             # at a forward boundary, everything released
    client.stats(); client.close(shutdown_loader=False)

Resident units are views at fixed pool addresses: ``acquire`` returns them at once and ``release`` only checks
the name. Streamed units go through the ring (``protocol.ring``): in execution order, every forward pass,
at most K held at a time, released oldest first; ``acquire`` waits for the loader's fill without a message
and raises ``LoaderGone`` within about 0.1 s of the loader dying. Views handed out before ``set_policy`` are
invalid afterwards (the units move); fetch them again. Control requests (set_policy, stats, close) are
ZeroMQ round trips, never made per unit.

This module must not import ``loader``: the two processes share only ``protocol`` and ``quantizer``.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from protocol.codec import ProtocolError
from protocol.errors import LoaderError, LoaderGone, RingOrderError
from protocol.messages import (
    PROTOCOL_VERSION,
    Error,
    GetStats,
    Hello,
    Message,
    Ok,
    Plan,
    SetPolicy,
    Shutdown,
    Stats,
    UnitPlacement,
)
from protocol.ring import RingConsumer, RingCounters, pid_alive
from protocol.shared import attach_buffer, open_ipc_events
from protocol.sockets import ComputeSocket
from quantizer.checkpoint import tensor_view

__all__ = ["LoaderClient", "LoaderError", "LoaderGone", "RingOrderError"]

log = logging.getLogger(__name__)

# how often a waiting request checks that the loader is still alive
_POLL_S = 0.1


class LoaderClient:
    """A connection to a ready loader; build it with ``LoaderClient.connect``."""

    def __init__(self, sock: ComputeSocket, timeout_s: float):
        self._sock = sock
        self._timeout_s = timeout_s
        self._loader_pid: int | None = None
        self._pool: torch.Tensor | None = None
        self._pool_buffer = None
        self._counters: RingCounters | None = None
        self._events: dict[bytes, torch.cuda.Event] = {}
        self._closed = False
        self._broken = False  # a request timed out: its late answer could be mistaken for the next one's

    @classmethod
    def connect(cls, address: str, timeout_s: float = 30.0) -> "LoaderClient":
        """Say Hello to the loader at ``address`` and attach what its Plan shares."""
        client = cls(ComputeSocket(address), timeout_s)
        try:
            plan = client._request(Hello(protocol_version=PROTOCOL_VERSION, pid=os.getpid()), Plan)
            client._bind(plan)
        except BaseException:
            client.close()
            raise
        return client

    @property
    def plan(self) -> Plan:
        return self._plan

    def acquire(self, name: str, stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
        """Tensor name -> view into the pool for unit ``name``; the dict is shared: do not modify it."""
        views = self._resident.get(name)
        if views is not None:
            return views
        if name not in self._streamed:
            raise KeyError(f"unit {name!r} is not in the plan; units: {', '.join(u.name for u in self._plan.units)}")
        slot = self._ring.acquire(name, stream)
        key = (slot, name)
        views = self._slot_views.get(key)
        if views is None:
            base = self._plan.ring.base_offset + slot * self._plan.ring.slot_bytes
            views = self._slot_views[key] = self._views(self._streamed[name], base)
        return views

    def release(self, name: str, stream: torch.cuda.Stream | None = None) -> None:
        """Done with unit ``name`` once every use enqueued so far on ``stream`` has run."""
        if name in self._resident:
            return
        if name not in self._streamed:
            raise KeyError(f"unit {name!r} is not in the plan")
        self._ring.release(name, stream)

    def finish_pass(self, stream: torch.cuda.Stream | None = None) -> None:
        """Release what is held and run the ring to the start of the next pass (for an abandoned forward)."""
        ring = self._ring
        while ring.held:
            self.release(self._plan.ring.order[ring.next_release % len(self._plan.ring.order)], stream)
        while ring.next_access % max(len(self._plan.ring.order), 1):
            name = ring.expected()
            ring.acquire(name, stream)
            ring.release(name, stream)

    def set_policy(self, policy: str, ring_slots: int | None = None, depth: int | None = None) -> Plan:
        """Re-place the units under ``policy`` (call between forward passes, with nothing acquired)."""
        if self._ring.held:
            raise RingOrderError(f"set_policy({policy!r}) while {self._ring.held} streamed unit(s) are acquired; release them first")
        if self._plan.device == "cuda":
            # queued kernels may still read units the loader is about to overwrite
            torch.cuda.synchronize(self._pool.device)
        plan = self._request(SetPolicy(policy=policy, ring_slots=ring_slots, prefetch_depth=depth), Plan)
        self._bind(plan)
        return plan

    def stats(self) -> Stats:
        return self._request(GetStats(), Stats)

    def close(self, shutdown_loader: bool = False) -> None:
        """Detach from the pool; with ``shutdown_loader`` the loader frees it and exits."""
        if self._closed:
            return
        try:
            if shutdown_loader and not self._broken:
                self._request(Shutdown(), Ok)
        except LoaderGone:
            log.info("the loader was already gone at close")
        finally:
            self._closed = True
            self._drop_views()
            self._pool = None
            self._events.clear()
            if self._counters is not None:
                self._counters.close()
            self._sock.close()

    def __enter__(self) -> "LoaderClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ----

    def _request(self, message: Message, expect: type) -> Message:
        """Send ``message`` and wait for the loader's answer, which must be of type ``expect``."""
        if self._closed or self._broken:
            raise LoaderError("this LoaderClient is closed (or timed out waiting for the loader); connect again")
        self._sock.send_to_loader(message)
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                reply = self._sock.recv_from_loader(_POLL_S)
            except ProtocolError as e:
                raise LoaderError(f"the loader answered {message.TYPE} with an unreadable message: {e}") from None
            if reply is not None:
                break
            if self._loader_pid is not None and not pid_alive(self._loader_pid):
                raise LoaderGone(f"the loader process (pid {self._loader_pid}) is gone; it did not answer {message.TYPE}")
            if time.monotonic() > deadline:
                # a late answer would be taken for the next request's: this connection is finished
                self._broken = True
                raise LoaderError(
                    f"no answer to {message.TYPE} from the loader at {self._sock.address} within {self._timeout_s:.0f} s "
                    "(is it running and ready?)"
                )
        if isinstance(reply, Error):
            raise LoaderError(f"the loader refused {message.TYPE}: {reply.message}", code=reply.code)
        if not isinstance(reply, expect):
            raise LoaderError(f"the loader answered {message.TYPE} with {reply.TYPE}, expected {expect.TYPE}")
        return reply

    def _bind(self, plan: Plan) -> None:
        """Attach what ``plan`` shares (reusing attachments that did not change) and build the views."""
        if plan.protocol_version != PROTOCOL_VERSION:
            raise LoaderError(f"the loader speaks protocol {plan.protocol_version}, this client {PROTOCOL_VERSION}")
        self._loader_pid = plan.loader_pid
        self._drop_views()
        if plan.pool != self._pool_buffer:
            self._pool = None
            self._pool = attach_buffer(plan.pool)
            self._pool_buffer = plan.pool
        if self._counters is None or self._counters.path != plan.counters.path:
            self._counters = RingCounters.attach(plan.counters)
        filled = released = None
        if plan.device == "cuda":
            filled = [self._event(handle) for handle in plan.filled_events]
            released = [self._event(handle) for handle in plan.released_events]
        self._plan = plan
        self._resident = {u.name: self._views(u, u.pool_offset) for u in plan.units if u.pool_offset is not None}
        self._streamed = {u.name: u for u in plan.units if u.pool_offset is None}
        self._slot_views: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self._ring = RingConsumer(
            self._counters,
            plan.ring,
            generation=plan.generation,
            loader_pid=plan.loader_pid,
            timeout_s=self._timeout_s,
            filled_events=filled,
            released_events=released,
        )

    def _event(self, handle: bytes) -> torch.cuda.Event:
        event = self._events.get(handle)
        if event is None:
            (event,) = open_ipc_events((handle,), self._pool.device)
            self._events[handle] = event
        return event

    def _views(self, unit: UnitPlacement, base: int) -> dict[str, torch.Tensor]:
        views = {}
        for t in unit.tensors:
            views[t.name] = tensor_view(self._pool, base + t.offset, t.nbytes, t.dtype, t.shape)
        return views

    def _drop_views(self) -> None:
        self._resident = {}
        self._streamed = {}
        self._slot_views = {}
