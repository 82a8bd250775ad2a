"""The scheduler's engine loops: how queued requests become forward passes.

``SerialRunner`` drives a ``compute.engine.Engine`` (one conversation at a time): each request in turn through
``Engine.generate``, its tokens forwarded as they come, ``should_stop`` polled between passes for a cancel.

Both runners talk to the ``compute.scheduler.Scheduler`` only through its engine-thread methods
(``next_requests``, ``token``, ``finish``, ``error``, ``should_stop``, ``count_pass``) and let out of ``run``
only the exceptions that are fatal (``protocol.client.LoaderError``, or anything that is not an ``Exception``);
any other exception fails the requests it touched and the loop goes on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from protocol.errors import LoaderError

if TYPE_CHECKING:
    from compute.engine import Engine
    from compute.scheduler import Request, Scheduler

log = logging.getLogger(__name__)


def failure_message(error: Exception) -> str:
    """One line for the requests a failed pass touched."""
    return f"generation failed: {type(error).__name__}: {error}"


class SerialRunner:
    """One request at a time through ``Engine.generate``."""

    max_batch = 1

    def __init__(self, scheduler: Scheduler, engine: Engine):
        self.scheduler = scheduler
        self.engine = engine
        self.vocab_size: int = engine.vocab_size
        self._current: Request | None = None

    def kv_tokens(self) -> tuple[int, int]:
        """(free, total) KV positions: the one conversation's cache, less what the running request holds."""
        current = self._current
        used = 0 if current is None else current.prompt_tokens + len(current.generated)
        return max(self.engine.max_context - used, 0), self.engine.max_context

    def run(self) -> None:
        scheduler = self.scheduler
        while True:
            taken = scheduler.next_requests(1, block=True)
            if not taken:
                if scheduler.closing:
                    return
                continue
            entry = taken[0]
            self._current = entry
            try:
                result = self.engine.generate(
                    entry.prompt_ids,
                    entry.params,
                    on_token=lambda token: scheduler.token(entry, token),
                    should_stop=lambda: scheduler.should_stop(entry),
                )
            except LoaderError:
                raise
            except Exception as e:
                log.exception("request %d failed", entry.id)
                scheduler.error(entry, failure_message(e), fatal=False)
                continue
            finally:
                self._current = None
            scheduler.count_pass(result.forward_passes)
            scheduler.finish(entry, result.finish_reason)
