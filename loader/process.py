"""``LoaderProcess``: the loader's event loop — serve control messages, run the ring ahead, supervise peers.

One loop, single-threaded: fill every ring slot the shared counters allow (``DevicePool.advance``), take at
most one request off the socket and answer it through the handler table, check once per
``LIVENESS_INTERVAL_S`` that the parent and the attached compute process are alive, and back off (sleeping
from ``IDLE_SLEEP_MIN_S`` doubling to ``IDLE_SLEEP_MAX_S``) while nothing happens. With no compute attached
it blocks on the socket instead, as there is no ring to run.

Requests: ``Hello`` attaches one compute process (its pid is watched) and answers the ``Plan`` (the ring
restarts); ``SetPolicy`` re-places the units at a forward boundary (refused while compute holds a streamed
unit, so no weight in use is overwritten; the old plan stays in force when the new one is refused);
``GetStats``; ``Shutdown``. Bad input of any kind is answered with an ``Error`` and the loop goes on.

The loop stops (``serve`` returns the reason) on Shutdown, SIGINT/SIGTERM, when the parent process dies, or
when the compute process that said Hello dies; the caller then frees the pool.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

import zmq

from loader.planner import BudgetError, Placement
from loader.policies import POLICIES, get_policy
from loader.pool import DevicePool
from protocol.launch import LoaderCommand, ReadyFile
from protocol.messages import (
    PROTOCOL_VERSION,
    BudgetLine,
    Error,
    GetStats,
    Hello,
    Message,
    Ok,
    Plan,
    SetPolicy,
    Shutdown,
    Stats,
)
from protocol.ring import pid_alive
from protocol.sizes import format_size
from protocol.sockets import LoaderSocket, Received

log = logging.getLogger(__name__)

LIVENESS_INTERVAL_S = 0.1  # how often the parent and compute processes are checked
IDLE_SLEEP_MIN_S = 20e-6
IDLE_SLEEP_MAX_S = 1e-3

# policy -> its Placement under this loader's budget (ring settings: the policy's defaults unless given)
PlanFor = Callable[..., Placement]


def pool_capacity(placement: Placement, plan_for: PlanFor) -> int:
    """The pool to allocate: the largest any registered policy would use under this budget (and ``placement``'s).

    Allocating once at this size lets a policy switch re-place units inside the memory compute already holds,
    and every size considered was planned under the same budget, so the budget still holds.
    """
    sizes = [placement.pool_bytes]
    for policy in POLICIES.values():
        try:
            sizes.append(plan_for(policy=policy).pool_bytes)
        except ValueError:  # BudgetError included: this policy does not fit or does not apply
            continue
    return max(sizes)


def format_stats(stats: Stats) -> str:
    """The Stats message as a short table for people."""
    lines = [f"loader stats (policy now {stats.policy!r}, up {stats.uptime_seconds:.1f} s):"]
    for p in stats.policies:
        lines.append(
            f"  {p.policy:<9} streamed {format_size(p.streamed_bytes)} in {p.fills} fills "
            f"({p.copy_seconds:.3f} s copying, {p.copy_gbps:.2f} GB/s); resident {format_size(p.resident_bytes)} "
            f"in {p.resident_seconds:.3f} s; compute waited {p.compute_wait_seconds:.3f} s over {p.acquires} acquires"
        )
    return "\n".join(lines)


class LoaderProcess:
    """Serves one compute process at a time from a placed ``DevicePool``."""

    def __init__(self, config: LoaderCommand, pool: DevicePool, placement: Placement, plan_for: PlanFor):
        self.config = config
        self.pool = pool
        self.placement = placement
        self.plan_for = plan_for
        self.parent_pid = os.getppid()
        self.compute_pid: int | None = None
        self.compute_peer: bytes | None = None
        self.stop_reason: str | None = None
        self.started = time.monotonic()
        self.pool_placement = pool.place(placement)
        self.handlers: dict[type, Callable[[bytes, Message], Message]] = {
            Hello: self.on_hello,
            SetPolicy: self.on_set_policy,
            GetStats: self.on_get_stats,
            Shutdown: self.on_shutdown,
        }

    def serve(self) -> str:
        """Bind, announce readiness, and run the loop until a reason to stop; returns that reason."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        sock = LoaderSocket(self.config.socket)
        try:
            self._write_ready_file()
            log.info("loader ready on %s (pid %d)", sock.address, os.getpid())
            self._loop(sock)
        finally:
            sock.close()
        log.info("loader stopping: %s", self.stop_reason)
        return self.stop_reason

    def stats(self) -> Stats:
        return Stats(
            policy=self.placement.policy,
            generation=self.pool.generation,
            uptime_seconds=time.monotonic() - self.started,
            policies=self.pool.stats(),
        )

    # ---- handlers: each answers one request ----

    def on_hello(self, peer: bytes, message: Hello) -> Message:
        if message.protocol_version != PROTOCOL_VERSION:
            return Error(
                code="version",
                message=f"compute speaks protocol {message.protocol_version}, this loader {PROTOCOL_VERSION}: "
                "run both from the same spillover installation",
            )
        if message.pid <= 0 or not pid_alive(message.pid):
            return Error(code="bad_message", message=f"Hello names pid {message.pid}, which is not a running process")
        if self.compute_pid not in (None, message.pid) and pid_alive(self.compute_pid):
            return Error(code="busy", message=f"this loader already serves compute process {self.compute_pid}; start another loader")
        if not self.pool.quiescent():  # a reconnect restarts the ring: not under a unit still in use
            return Error(code="busy", message="Hello while compute still holds a streamed unit; release it (or finish_pass) first")
        self.compute_pid, self.compute_peer = message.pid, peer
        self.pool_placement = self.pool.place(self.placement)
        log.info("compute process %d attached; plan generation %d", message.pid, self.pool.generation)
        return self._plan()

    def on_set_policy(self, peer: bytes, message: SetPolicy) -> Message:
        if peer != self.compute_peer:
            return Error(code="not_attached", message="set_policy from a peer that has not said Hello; connect first")
        if not self.pool.quiescent():
            return Error(
                code="busy",
                message="set_policy while compute still holds a streamed unit; release every unit (a forward-pass boundary) first",
            )
        try:
            policy = get_policy(message.policy)
            placement = self.plan_for(policy=policy, ring_slots=message.ring_slots, prefetch_depth=message.prefetch_depth)
        except ValueError as e:
            return Error(code="budget" if isinstance(e, BudgetError) else "policy", message=str(e))
        if placement.pool_bytes > self.pool.capacity_bytes:
            return Error(
                code="budget",
                message=f"policy {policy.name!r} with these ring settings needs a pool of {format_size(placement.pool_bytes)}; "
                f"this loader's pool is {format_size(self.pool.capacity_bytes)}: use the defaults or restart the loader",
            )
        self.placement = placement
        self.pool_placement = self.pool.place(placement)
        log.info("policy now %r (generation %d)", placement.policy, self.pool.generation)
        return self._plan()

    def on_get_stats(self, peer: bytes, message: GetStats) -> Message:
        return self.stats()

    def on_shutdown(self, peer: bytes, message: Shutdown) -> Message:
        self.stop_reason = "shutdown requested by compute"
        return Ok()

    # ---- the loop ----

    def _loop(self, sock: LoaderSocket) -> None:
        idle_sleep = IDLE_SLEEP_MIN_S
        next_check = 0.0
        while self.stop_reason is None:
            # the ring runs only for an attached compute process: Hello restarts it anyway
            progressed = self.compute_pid is not None and self.pool.advance() > 0
            # with no compute attached nothing can move the ring: block on the socket instead of spinning
            received = sock.recv_from_compute(0 if self.compute_pid else LIVENESS_INTERVAL_S)
            if received is not None:
                self._answer(sock, received)
                progressed = True
            now = time.monotonic()
            if now >= next_check:
                next_check = now + LIVENESS_INTERVAL_S
                self._supervise()
            if progressed:
                idle_sleep = IDLE_SLEEP_MIN_S
            elif self.compute_pid:
                time.sleep(idle_sleep)
                idle_sleep = min(idle_sleep * 2, IDLE_SLEEP_MAX_S)

    def _answer(self, sock: LoaderSocket, received: Received) -> None:
        message = received.message
        if received.error is not None:
            log.warning("unreadable request: %s", received.error)
            reply: Message = Error(code="bad_message", message=str(received.error))
        elif (handler := self.handlers.get(type(message))) is None:
            accepted = ", ".join(cls.TYPE for cls in self.handlers)
            reply = Error(code="unexpected", message=f"the loader does not accept {message.TYPE!r} messages; it accepts {accepted}")
        else:
            try:
                reply = handler(received.peer, message)
            except Exception as e:  # a failed request must not take the loader (and compute's weights) down
                log.exception("handling %s failed", message.TYPE)
                reply = Error(code="internal", message=f"{message.TYPE} failed in the loader: {type(e).__name__}: {e}")
        try:
            sock.send_to_compute(received.peer, reply)
        except zmq.Again:
            log.warning("could not answer %s: the peer is not reading its replies", "a request" if message is None else message.TYPE)

    def _supervise(self) -> None:
        if os.getppid() != self.parent_pid or not pid_alive(self.parent_pid):
            self.stop_reason = f"parent process {self.parent_pid} exited"
        elif self.compute_pid is not None and not pid_alive(self.compute_pid):
            self.stop_reason = f"compute process {self.compute_pid} exited"

    def _on_signal(self, signum: int, frame) -> None:
        self.stop_reason = f"received {signal.Signals(signum).name}"

    def _plan(self) -> Plan:
        placement, pool = self.placement, self.pool_placement
        return Plan(
            protocol_version=PROTOCOL_VERSION,
            generation=self.pool.generation,
            policy=placement.policy,
            loader_pid=os.getpid(),
            device=self.pool.device.type,
            pool=self.pool.shared,
            counters=self.pool.counters_shared,
            filled_events=pool.filled_events,
            released_events=pool.released_events,
            units=pool.units,
            ring=pool.ring,
            max_context=placement.max_context,
            prefill_chunk=placement.prefill_chunk,
            max_batch=placement.max_batch,
            kv_tokens=placement.kv_tokens,
            budget_bytes=placement.budget_bytes,
            lines=tuple(BudgetLine(what=what, nbytes=nbytes) for what, nbytes in placement.lines),
        )

    def _write_ready_file(self) -> None:
        if self.config.ready_file is not None:
            ReadyFile(address=self.config.socket, pid=os.getpid()).write(self.config.ready_file)
