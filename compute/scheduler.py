"""The scheduler: many requests, one engine thread, events back to whoever submitted them.

    scheduler = Scheduler(engine, max_batch=16)
    scheduler.start()
    request_id = scheduler.submit(GenerationRequest(prompt_ids=ids, params=params), on_event)
    scheduler.cancel(request_id); scheduler.stats(); scheduler.close(drain=True)

It promises:

* ONE engine thread runs every forward pass; ``submit``, ``cancel``, ``stats`` and ``close`` are thread-safe
  and never wait for a pass. ``on_event`` is called from the engine thread, for each request in order:
  ``TokenEvent`` per generated token (the EOS that ends a reply included), then exactly one ``FinishEvent``
  or ``ErrorEvent``. It must not block (an asyncio caller hands each event to its loop with
  ``call_soon_threadsafe``); an exception it raises is logged and that request is stopped. With a
  ``BatchEngine`` a pass's events are sent once the next pass is launched, so that their receiver's work (an
  HTTP server's, holding the GIL) overlaps the device's instead of delaying the launch: a token arrives the
  host's launch work later (a fraction of a millisecond), and the next one no later than before.
* ``submit`` checks the request before queueing it: an empty prompt or ids outside the vocabulary raise
  ``ValueError``, a prompt of ``max_context`` tokens or more ``compute.engine.ContextLengthError`` (a
  ``ValueError``; the reply needs at least one position), ``max_waiting`` requests already waiting
  ``QueueFullError``, a closed or failed scheduler ``SchedulerClosedError``.
* Requests start in submission order. With a ``compute.batch_engine.BatchEngine`` up to ``max_batch`` run in
  the same forward passes (``compute.batching``: decode rows of the running ones, prefill chunks of new ones, at
  most ``max_pass_tokens`` tokens a pass, by default the engine's prefill chunk; a request admitted only when the
  KV pool can hold its prompt and a first token); with a
  ``compute.engine.Engine`` (one conversation at a time) they run one after another, speculatively when the
  engine has a drafter (``stats().speculation`` then sums what speculation did over the replies that ended).
* ``cancel`` stops a request at the next pass boundary, queued or running: it ends with
  ``FinishEvent(STOPPED)``. Cancelling an unknown or finished request does nothing.
* A request ends with ``FinishReason.EOS`` (its last token is an EOS id), ``LENGTH`` (``max_new_tokens``),
  ``CONTEXT`` (no KV position left below ``max_context``) or ``STOPPED`` (cancelled, or closed without drain).
* An exception from the engine that is a ``protocol.client.LoaderError`` (the loader gone or broken), or not
  an ``Exception`` at all, is fatal: every live request gets ``ErrorEvent(fatal=True)``, ``failure`` holds the
  exception, the thread ends and later submits raise ``SchedulerClosedError``. Any other exception fails the
  requests of that pass (``ErrorEvent(fatal=False)``) and the scheduler goes on with the rest.
* ``close(drain=True)`` stops admitting and finishes every request already accepted (running and queued);
  ``close(drain=False)`` stops them all at the next pass (``FinishEvent(STOPPED)``). Both join the thread.

The scheduler knows nothing of HTTP, chat templates or text: stop strings are the caller's (it cancels).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable

from compute.engine import ContextLengthError, FinishReason
from compute.sampling import SamplingParams
from compute.speculation import SpeculationStats
from protocol.errors import LoaderError

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0  # close() waits this long for the engine thread's current pass before giving up on it


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One reply to generate."""

    prompt_ids: tuple[int, ...]  # the whole prompt, already templated and tokenized
    params: SamplingParams  # temperature 0 = greedy, seed, max_new_tokens, ...


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request_id: int
    token_id: int  # one generated token (the EOS that ends a reply included)


@dataclasses.dataclass(frozen=True)
class FinishEvent:
    request_id: int
    finish_reason: FinishReason
    prompt_tokens: int  # tokens of the prompt
    completion_tokens: int  # tokens generated (as many as TokenEvents were sent)


@dataclasses.dataclass(frozen=True)
class ErrorEvent:
    request_id: int
    message: str  # one line
    fatal: bool  # the engine cannot go on (the loader is gone): every live request gets one, and ``failure`` is set


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    running: int  # requests in the engine (prefilling or decoding)
    waiting: int  # requests queued, not started
    kv_free_tokens: int  # KV positions not held by any sequence
    kv_total_tokens: int  # KV positions the engine has
    max_batch: int  # sequences one forward pass can serve
    # tokens one batched pass carries at most (decode rows and prompt chunks); None: one request at a time
    pass_tokens: int | None
    passes: int  # forward passes run since start
    tokens_generated: int  # tokens sent as TokenEvents since start
    # of those passes, how many were launched before the tokens of the pass before them were read (batched, greedy)
    passes_ahead: int = 0
    # what speculative decoding did over the replies that ended since start; None when the engine has no drafter
    speculation: SpeculationStats | None = None


class QueueFullError(RuntimeError):
    """``submit`` while ``max_waiting`` requests already wait."""


class SchedulerClosedError(RuntimeError):
    """``submit`` after ``close`` or after the engine failed (``failure`` says why)."""


@dataclasses.dataclass(eq=False)
class Request:
    """A request the scheduler accepted: its events' destination and what it has produced so far."""

    id: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    on_event: Callable[[Event], None]
    generated: list[int] = dataclasses.field(default_factory=list)
    cancelled: bool = False  # cancel() was called: stop at the next pass boundary
    done: bool = False  # its last event was sent

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class Scheduler:
    """Admits requests, runs them on ``engine`` in one thread, and reports their events; see the module docstring."""

    def __init__(self, engine, *, max_batch: int, max_waiting: int = 256, max_pass_tokens: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be at least 0, got {max_waiting}")
        self.engine = engine
        self.max_context: int = engine.max_context
        self.tokenizer = engine.tokenizer
        self.max_waiting = max_waiting
        self._runner = _make_runner(self, engine, max_batch, max_pass_tokens)
        self.max_batch = self._runner.max_batch
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._waiting: deque[Request] = deque()
        self._live: dict[int, Request] = {}  # every request accepted and not yet ended, waiting or running
        self._closing = False  # no more submits
        self._stop_all = False  # close(drain=False): stop everything at the next pass
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.tokens_generated = 0
        self._held: list[tuple[Request, Event]] | None = None  # events queued by hold_events, not yet sent

    # ----- the caller's side (any thread) -----

    def start(self) -> None:
        """Start the engine thread."""
        if self._thread is not None:
            raise RuntimeError("the scheduler was already started")
        self._thread = threading.Thread(target=self._run, name="spillover-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> int:
        """Queue ``request``; return its id. Raises (before queueing) as the module docstring lists."""
        prompt = self._check_prompt(request.prompt_ids)
        with self._lock:
            if self._failure is not None:
                raise SchedulerClosedError(f"the engine has stopped: {self._failure}")
            if self._closing:
                raise SchedulerClosedError("the scheduler is closing: it accepts no new requests")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting (at most {self.max_waiting}): try again later"
                )
            entry = Request(id=next(self._ids), prompt_ids=prompt, params=request.params, on_event=on_event)
            self._waiting.append(entry)
            self._live[entry.id] = entry
            self._wake.notify_all()
        return entry.id

    def cancel(self, request_id: int) -> None:
        """Stop the request at the next pass boundary; it ends with ``FinishEvent(STOPPED)``."""
        with self._lock:
            entry = self._live.get(request_id)
            if entry is not None:
                entry.cancelled = True
                self._wake.notify_all()

    def stats(self) -> SchedulerStats:
        with self._lock:
            waiting = len(self._waiting)
            running = len(self._live) - waiting
        free, total = self._runner.kv_tokens()
        return SchedulerStats(
            running=running,
            waiting=waiting,
            kv_free_tokens=free,
            kv_total_tokens=total,
            max_batch=self.max_batch,
            pass_tokens=self._runner.pass_tokens,
            passes=self.passes,
            tokens_generated=self.tokens_generated,
            passes_ahead=self._runner.passes_ahead,
            speculation=self._runner.speculation,
        )

    def close(self, *, drain: bool) -> None:
        """Stop admitting; finish (``drain``) or stop every accepted request; end the engine thread."""
        with self._lock:
            self._closing = True
            if not drain:
                self._stop_all = True
            self._wake.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(None if drain else JOIN_TIMEOUT_S)
            if thread.is_alive():
                log.warning("the engine thread did not end within %.0f s", JOIN_TIMEOUT_S)
        elif thread is None:
            self._end_all_queued(FinishReason.STOPPED)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The ids that end a reply: the engine's (a caller that changes them changes the engine's)."""
        return frozenset(self.engine.eos_token_ids)

    @property
    def failure(self) -> BaseException | None:
        """The exception that stopped the engine, or None."""
        return self._failure

    # ----- the engine thread's side -----

    def _check_prompt(self, prompt_ids) -> tuple[int, ...]:
        prompt = tuple(int(t) for t in prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt) >= self.max_context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.max_context} tokens "
                f"(prompt and reply together): shorten the prompt to at most {self.max_context - 1} tokens"
            )
        vocab = self._runner.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")
        return prompt

    def _run(self) -> None:
        try:
            self._runner.run()
        except BaseException as e:  # the runner lets only fatal errors out
            self._stop_holding()
            self._fail(e)
        else:
            self._stop_holding()
            self._end_all_queued(FinishReason.STOPPED)

    def _stop_holding(self) -> None:
        """Send what the runner held (before any event of the thread's end), and send the rest at once."""
        self.send_held_events()
        self._held = None

    def _fail(self, error: BaseException) -> None:
        log.error("the engine stopped: %s", error, exc_info=not isinstance(error, LoaderError))
        with self._lock:
            self._failure = error
            self._closing = True
            live = list(self._live.values())
            self._waiting.clear()
        message = f"the engine stopped: {error}" if str(error) else f"the engine stopped: {type(error).__name__}"
        for entry in live:
            self.error(entry, message, fatal=True)

    def _end_all_queued(self, reason: FinishReason) -> None:
        with self._lock:
            queued = list(self._waiting)
            self._waiting.clear()
        for entry in queued:
            self.finish(entry, reason)

    # The runner's interface to the queue and the events (called from the engine thread only).

    def next_requests(self, limit: int, *, block: bool) -> list[Request]:
        """Up to ``limit`` queued requests, taken off the queue in order (cancelled ones ended on the way).

        ``block``: wait until there is one, or the scheduler is closing and nothing is queued (then [] means
        the thread should end). Stopping everything (``close(drain=False)``) ends the queued ones too.
        """
        with self._lock:
            while block and not self._waiting and not self._closing:
                self._wake.wait()
            taken: list[Request] = []
            stopped: list[Request] = []
            while self._waiting and len(taken) < limit:
                entry = self._waiting.popleft()
                (stopped if entry.cancelled or self._stop_all else taken).append(entry)
        for entry in stopped:
            self.finish(entry, FinishReason.STOPPED)
        return taken

    def end_stopped_waiting(self) -> None:
        """End the queued requests that were cancelled (or all of them, when closing without drain)."""
        with self._lock:
            stopped = [entry for entry in self._waiting if entry.cancelled or self._stop_all]
            for entry in stopped:
                self._waiting.remove(entry)
        for entry in stopped:
            self.finish(entry, FinishReason.STOPPED)

    def wait_for_work(self) -> bool:
        """Wait until a request is queued (True) or the scheduler closes with none queued (False)."""
        with self._lock:
            while not self._waiting and not self._closing:
                self._wake.wait()
            return bool(self._waiting)

    def peek_waiting(self) -> Request | None:
        """The request at the head of the queue, left there (to check it fits before taking it)."""
        with self._lock:
            return self._waiting[0] if self._waiting else None

    def should_stop(self, entry: Request) -> bool:
        """``entry`` must stop at this pass boundary (cancelled, or the scheduler closes without draining)."""
        return entry.cancelled or self._stop_all

    @property
    def closing(self) -> bool:
        return self._closing

    def hold_events(self) -> None:
        """Queue the events of ``token``, ``finish`` and ``error`` from now on, until ``send_held_events`` (the
        batched runner sends a pass's events once the next pass is launched: module docstring)."""
        if self._held is None:
            self._held = []

    def send_held_events(self) -> None:
        """Send the events queued since ``hold_events``, in order (and go on holding)."""
        if not self._held:
            return
        held, self._held = self._held, []
        for entry, event in held:
            self._deliver(entry, event)

    def count_pass(self, passes: int = 1) -> None:
        self.passes += passes

    def token(self, entry: Request, token_id: int) -> None:
        entry.generated.append(token_id)
        self.tokens_generated += 1
        self._send(entry, TokenEvent(entry.id, token_id))

    def finish(self, entry: Request, reason: FinishReason) -> None:
        self._end(entry, FinishEvent(entry.id, reason, entry.prompt_tokens, len(entry.generated)))

    def error(self, entry: Request, message: str, *, fatal: bool) -> None:
        self._end(entry, ErrorEvent(entry.id, message, fatal))

    def _end(self, entry: Request, event: FinishEvent | ErrorEvent) -> None:
        if entry.done:
            return
        entry.done = True
        with self._lock:
            self._live.pop(entry.id, None)
        self._send(entry, event)

    def _send(self, entry: Request, event: Event) -> None:
        if self._held is not None:
            self._held.append((entry, event))
        else:
            self._deliver(entry, event)

    def _deliver(self, entry: Request, event: Event) -> None:
        try:
            entry.on_event(event)
        except Exception:
            log.exception("on_event of request %d raised: the request is stopped", entry.id)
            entry.cancelled = True


def _make_runner(scheduler: Scheduler, engine, max_batch: int, max_pass_tokens: int | None):
    """The loop that drives ``engine``: batched for a ``BatchEngine`` (at most ``max_pass_tokens`` a pass), one
    request at a time for an ``Engine``."""
    from compute.batch_engine import BatchEngine
    from compute.batching import BatchRunner, SerialRunner

    if isinstance(engine, BatchEngine):
        return BatchRunner(scheduler, engine, max_batch, max_pass_tokens)
    return SerialRunner(scheduler, engine)
