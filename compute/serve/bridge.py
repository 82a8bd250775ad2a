"""The event loop's side of the scheduler: requests submitted from handlers, their events delivered as awaitables.

``SchedulerBridge(scheduler, loop)`` is the only thing the HTTP handlers use to generate. It promises:

* ``submit(prompt_ids, params) -> Generation``: the request is in the scheduler's queue; raises ``APIError``
  429 when the queue is full (``QueueFullError``), 400 when the prompt does not fit the context
  (``ContextLengthError``) or is empty or holds ids outside the vocabulary (``ValueError``), 503 once the
  engine has failed (``SchedulerClosedError``) or while the server shuts down.
* ``Generation.events()`` yields the scheduler's events for that request in order (``TokenEvent`` …), ending
  with exactly one ``FinishEvent`` or ``ErrorEvent``. The scheduler calls back from its engine thread; the
  events cross into the loop with ``call_soon_threadsafe``, so every ``Generation`` is used from the loop only.
* ``Generation.cancel()`` asks the scheduler to drop the request at its next pass (a client that went away, a
  stop string that matched, a shutdown); after a terminal event it does nothing.
* ``fail(message)``: the engine cannot go on (its loader is gone). Every live request gets a fatal
  ``ErrorEvent`` at once, new ones are refused with 503, and ``on_fatal`` (the server's exit) is called once.
  The scheduler's own fatal ``ErrorEvent`` leads here, and so does ``LoaderWatch``, a thread that checks the
  loader process every ``WATCH_S``: with every weight resident the engine exchanges no message with the
  loader and would not notice by itself.
* ``shut_down(grace_s)``: new requests are refused with 503; requests still running ``grace_s`` later are
  cancelled (their replies end with finish reason "abort").
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence

from compute.engine import ContextLengthError
from compute.sampling import SamplingParams
from compute.scheduler import (
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
)
from compute.serve.errors import invalid_request, over_capacity, unavailable
from protocol.ring import pid_alive

log = logging.getLogger(__name__)

WATCH_S = 0.2  # how often LoaderWatch checks the loader process and the scheduler


class Generation:
    """One submitted request, seen from the event loop."""

    def __init__(self, bridge: "SchedulerBridge", prompt_tokens: int):
        self.bridge = bridge
        self.prompt_tokens = prompt_tokens
        self.request_id: int | None = None
        self.done = False  # a terminal event has been delivered
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(self, event: Event) -> None:
        """Queue ``event`` (loop thread only); anything after the terminal event is dropped."""
        if self.done:
            return
        if isinstance(event, (FinishEvent, ErrorEvent)):
            self.done = True
            self.bridge._forget(self)
            if isinstance(event, ErrorEvent) and event.fatal:
                self.bridge.fail(event.message)
        self._queue.put_nowait(event)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, (FinishEvent, ErrorEvent)):
                return

    def cancel(self) -> None:
        if not self.done and self.request_id is not None:
            self.bridge.scheduler.cancel(self.request_id)


class SchedulerBridge:
    """See the module docstring."""

    def __init__(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop, *, on_fatal: Callable[[str], None]):
        self.scheduler = scheduler
        self.loop = loop
        self.on_fatal = on_fatal
        self.failure: str | None = None  # why the engine cannot go on
        self.closing = False  # shut_down was called
        self._live: dict[int, Generation] = {}

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, param: str) -> Generation:
        """Hand a request to the scheduler; a refusal is raised as its HTTP error, naming the request field
        ``param`` the prompt came from (the scheduler's checks of the prompt are the only ones)."""
        if self.failure is not None:
            raise unavailable(f"the engine has stopped: {self.failure}")
        if self.closing:
            raise unavailable("the server is shutting down")
        generation = Generation(self, len(prompt_ids))

        def on_event(event: Event) -> None:  # the engine thread
            try:
                self.loop.call_soon_threadsafe(generation.deliver, event)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass

        request = GenerationRequest(prompt_ids=tuple(prompt_ids), params=params)
        try:
            generation.request_id = self.scheduler.submit(request, on_event)
        except QueueFullError as e:
            raise over_capacity(f"the server is at capacity ({e}); retry later") from None
        except ContextLengthError as e:
            raise invalid_request(str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:  # an empty prompt, ids outside the vocabulary
            raise invalid_request(str(e), param=param) from None
        except SchedulerClosedError as e:
            raise unavailable(str(e)) from None
        self._live[generation.request_id] = generation
        return generation

    def _forget(self, generation: Generation) -> None:
        self._live.pop(generation.request_id, None)

    def fail(self, message: str) -> None:
        """The engine cannot go on: end every live request with a fatal error, refuse new ones, tell ``on_fatal``."""
        if self.failure is not None:
            return
        self.failure = message
        log.error("%s", message)
        for generation in list(self._live.values()):
            generation.deliver(ErrorEvent(generation.request_id, message, True))
        self.on_fatal(message)

    def shut_down(self, grace_s: float) -> None:
        """Refuse new requests; cancel those still running after ``grace_s`` seconds."""
        if self.closing:
            return
        self.closing = True
        self.loop.call_later(grace_s, self._cancel_all)

    def _cancel_all(self) -> None:
        for generation in list(self._live.values()):
            generation.cancel()


class LoaderWatch:
    """A thread that calls ``bridge.fail`` (in the loop) when the loader process dies or the scheduler fails."""

    def __init__(self, bridge: SchedulerBridge, loader_pid: int):
        self.bridge = bridge
        self.loader_pid = loader_pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loader-watch", daemon=True)

    def __enter__(self) -> "LoaderWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_S):
            if not pid_alive(self.loader_pid):
                message = f"the loader process (pid {self.loader_pid}) is gone; compute cannot go on without it"
            elif self.bridge.scheduler.failure is not None:
                message = f"the engine failed: {self.bridge.scheduler.failure}"
            else:
                continue
            try:
                self.bridge.loop.call_soon_threadsafe(self.bridge.fail, message)
            except RuntimeError:  # the loop has closed
                pass
            return
