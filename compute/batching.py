"""The scheduler's engine loops: how queued requests become forward passes.

``BatchRunner`` drives a ``compute.batch_engine.BatchEngine``: continuous batching, many requests per pass
(its docstring has the rules). ``SerialRunner`` drives a ``compute.engine.Engine`` (one conversation at a time):
each request in turn through ``Engine.generate``, its tokens forwarded as they come, ``should_stop`` polled
between passes for a cancel; with the engine's drafter it decodes speculatively, and its ``speculation`` sums
the replies' ``compute.speculation.SpeculationStats`` (``BatchRunner.speculation`` is None: it never speculates).

Both runners talk to the ``compute.scheduler.Scheduler`` only through its engine-thread methods
(``next_requests``, ``token``, ``finish``, ``error``, ``should_stop``, ``count_pass``,
``hold_events``, ``send_held_events``) and let out of ``run``
only the exceptions that are fatal (``protocol.client.LoaderError``, or anything that is not an ``Exception``);
any other exception fails the requests it touched and the loop goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from compute.batch_engine import Chunk
from compute.engine import FinishReason
from compute.sampling import sample_next
from compute.speculation import SpeculationStats
from protocol.errors import LoaderError

if TYPE_CHECKING:
    from compute.batch_engine import BatchEngine
    from compute.engine import Engine
    from compute.scheduler import Request, Scheduler

log = logging.getLogger(__name__)


def check_pass_tokens(max_pass_tokens: int | None, max_batch: int) -> None:
    """``ValueError`` unless a cap on a batched pass's tokens leaves room for prompts beside ``max_batch`` decode
    rows (None: no cap)."""
    if max_pass_tokens is not None and max_pass_tokens <= max_batch:
        raise ValueError(
            f"{max_pass_tokens} is not more than the max batch ({max_batch}): a pass carries a row for each running "
            "request, and new prompts are fed from what is left"
        )


def failure_message(error: Exception) -> str:
    """One line for the requests a failed pass touched."""
    return f"generation failed: {type(error).__name__}: {error}"


class SerialRunner:
    """One request at a time through ``Engine.generate``."""

    max_batch = 1
    passes_ahead = 0  # each pass waits for the token before it
    pass_tokens = None  # a prompt is prefilled in the engine's own chunks, with no other request in its passes

    def __init__(self, scheduler: Scheduler, engine: Engine):
        self.scheduler = scheduler
        self.engine = engine
        self.vocab_size: int = engine.vocab_size
        self._current: Request | None = None
        # with a drafter: what speculation did over every reply that ended (replaced whole, so a reader in
        # another thread sees one consistent record); None without
        self.speculation: SpeculationStats | None = (
            SpeculationStats(drafter=engine.drafter.name) if engine.drafter is not None else None
        )

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
            if result.speculation is not None and self.speculation is not None:
                self.speculation = self.speculation + result.speculation
            scheduler.finish(entry, result.finish_reason)


@dataclasses.dataclass(eq=False)
class Running:
    """A request in the batch: every id it has (prompt, then reply), and how many of them the KV pool holds."""

    entry: Request
    ids: list[int]  # prompt + generated; the last one is fed next (its logits choose the following token)
    generator: torch.Generator  # the reply's own, seeded once: a sampled reply depends on its seed alone
    fed: int = 0  # positions 0 .. fed - 1 are in the sequence's pages

    @property
    def key(self) -> int:
        return self.entry.id


def _plain_greedy(seq: Running) -> bool:
    """The sequence's next token is its logits' argmax, whatever it saw before."""
    return seq.entry.params.greedy and seq.entry.params.repetition_penalty == 1


@dataclasses.dataclass(eq=False)
class Launched:
    """A pass on its way: its chunks and sequences, and its logits (or why it failed)."""

    fed: list[Running]
    chunks: list[Chunk]
    logits: torch.Tensor | None = None
    error: str | None = None  # the pass failed: its sequences end with this
    greedy: torch.Tensor | None = None  # the argmax of every row (all plain greedy), on the device
    _host: torch.Tensor | None = None  # ``greedy`` copied to host memory (pinned, on CUDA) as the device makes it
    _ready: torch.cuda.Event | None = None  # recorded once the copy is on its way

    def read_greedy(self) -> None:
        """Take the argmax of every row on the device and start copying it to the host, without waiting."""
        self.greedy = self.logits.float().argmax(dim=-1)
        cuda = self.greedy.device.type == "cuda"
        self._host = torch.empty(self.greedy.shape, dtype=self.greedy.dtype, pin_memory=cuda)
        self._host.copy_(self.greedy, non_blocking=True)
        if cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def tokens(self) -> list[int]:
        """The argmax of every row, once the pass (and nothing launched after it) is done."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


class BatchRunner:
    """Many requests per forward pass through a ``compute.batch_engine.BatchEngine``.

    Each pass: every running sequence whose prompt is fed gets one decode row (its last token); the rest of the
    pass's token budget (``pass_tokens``: the engine's ``prefill_chunk``, or ``max_pass_tokens`` where that is
    less) goes to prompts being prefilled, oldest first, in chunks;
    a sequence's last prompt chunk asks for logits, so its first token comes from the same pass. Requests join
    between passes, up to ``max_batch`` running, in submission order, when the KV pool can hold their prompt
    and one more token. When a growing sequence finds the pool full, the sequence admitted last is preempted:
    its pages are released and it is fed again from its first token once there is room (its tokens already
    sent stand; its reply goes on where it was, computed anew). Sampling is per sequence
    (``compute.sampling.sample_next``, the reply's own generator); greedy rows are one batched argmax.

    A pass is launched ahead, before the tokens of the pass before it are read, where its rows are certain: every
    running sequence decodes greedily, none can end but by EOS, no waiting request could join now, none is to stop
    (``_launch_ahead``). Its token ids are the argmax the device just computed (``BatchEngine.forward(ids=...)``),
    so the host's work between passes (reading the tokens, the events, the next pass's inputs) overlaps the
    device's instead of adding to it. A sequence that ends at EOS meanwhile has its row of the pass ahead computed
    and dropped. Each pass's tokens are the same as without it: the same argmax of the same logits.
    """

    speculation: SpeculationStats | None = None  # batched passes do not speculate

    def __init__(self, scheduler: Scheduler, engine: BatchEngine, max_batch: int, max_pass_tokens: int | None = None):
        self.scheduler = scheduler
        self.engine = engine
        self.pool = engine.kv_pool
        self.max_batch = min(max_batch, engine.max_batch)
        check_pass_tokens(max_pass_tokens, self.max_batch)
        # tokens a pass carries at most: the activations are counted for the engine's prefill chunk
        self.pass_tokens: int = min(engine.prefill_chunk, max_pass_tokens or engine.prefill_chunk)
        self.vocab_size: int = engine.vocab_size
        self.running: list[Running] = []  # in admission order
        self.preempted: list[Running] = []  # to be fed again, before any new request
        self.passes_ahead = 0  # passes launched before the tokens of the pass before them were read

    def kv_tokens(self) -> tuple[int, int]:
        return self.pool.free_tokens, self.pool.total_tokens

    def run(self) -> None:
        scheduler = self.scheduler
        scheduler.hold_events()  # a pass's events go out once the next pass is launched (the scheduler's docstring)
        launched: Launched | None = None  # a pass on the device whose tokens are not read yet
        while True:
            if launched is None:
                self._stop_requested()
                self._admit()
                if not self.running:
                    scheduler.send_held_events()
                    if not scheduler.wait_for_work():
                        return
                    continue
                launched = self._launch(*self._plan_pass())
            following = self._launch_ahead(launched)
            scheduler.send_held_events()  # the device computes while the events go out
            self._advance(launched)
            launched = following

    def _launch(self, chunks: list[Chunk], fed: list[Running], ids: torch.Tensor | None = None) -> Launched:
        """Launch the pass of ``chunks`` (their token ids ``ids`` on the device, for a pass launched ahead); when
        every row asking for logits is plain greedy, their argmax starts on its way to the host."""
        try:
            logits = self.engine.forward(chunks, ids=ids)
        except LoaderError:
            raise
        except Exception as e:
            log.exception("a forward pass of %d sequences failed", len(fed))
            return Launched(fed, chunks, error=failure_message(e))
        self.scheduler.count_pass()
        launched = Launched(fed, chunks, logits)
        asking = [seq for seq, chunk in zip(fed, chunks) if chunk.logits]
        if asking and all(_plain_greedy(seq) for seq in asking):
            launched.read_greedy()
        return launched

    def _launch_ahead(self, launched: Launched) -> Launched | None:
        """The next pass, launched before ``launched``'s tokens are read, when it is sure to be every running
        sequence's next decode row: ``launched`` decodes every running sequence, greedily, none of them can end
        but by EOS (then its row of the pass ahead is computed and dropped), no waiting request could join (a
        batch row and room in the pool), none is to stop, and the pool holds each one's next position. Its token
        ids are ``launched``'s argmax, on the device. None otherwise (the next pass is planned once the tokens are
        read)."""
        if launched.greedy is None or not self.engine.device_ids or self.preempted:
            return None
        fed, chunks = launched.fed, launched.chunks
        if len(fed) != len(self.running) or any(len(chunk.token_ids) != 1 or not chunk.logits for chunk in chunks):
            return None
        if any(self.scheduler.should_stop(seq.entry) for seq in fed):
            return None
        head = self.scheduler.peek_waiting()  # one that could join now joins now (``_admit``'s test)
        if head is not None and len(self.running) < self.max_batch:
            if self.pool.can_reserve(head.id, head.prompt_tokens + 1):
                return None
        for seq in fed:  # after this pass's token: len(seq.ids) + 1 ids, position seq.fed + 1 fed next
            produced = len(seq.ids) + 1 - seq.entry.prompt_tokens
            if produced >= seq.entry.params.max_new_tokens or len(seq.ids) + 1 > self.engine.max_context:
                return None
        if not all(self.pool.reserve(seq.key, seq.fed + 2) for seq in fed):
            return None
        ahead = [Chunk(seq.key, (0,), seq.fed + 1, logits=True) for seq in fed]  # token 0: the ids are on the device
        following = self._launch(ahead, list(fed), ids=launched.greedy)
        if following.error is None:
            self.passes_ahead += 1
        return following

    def _stop_requested(self) -> None:
        self.scheduler.end_stopped_waiting()
        for seq in [*self.running, *self.preempted]:
            if self.scheduler.should_stop(seq.entry):
                self._end(seq, FinishReason.STOPPED)

    def _admit(self) -> None:
        """Preempted sequences first, then queued requests, while there is a batch row and room in the pool."""
        while self.preempted and len(self.running) < self.max_batch:
            seq = self.preempted[0]
            if not self.pool.reserve(seq.key, len(seq.ids)):
                return
            self.running.append(self.preempted.pop(0))
        while not self.preempted and len(self.running) < self.max_batch:
            head = self.scheduler.peek_waiting()
            if head is None or not self.pool.can_reserve(head.id, head.prompt_tokens + 1):
                return
            for entry in self.scheduler.next_requests(1, block=False):
                generator = torch.Generator(device=self.engine.device)
                if entry.params.seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(entry.params.seed)
                seq = Running(entry=entry, ids=list(entry.prompt_ids), generator=generator)
                if not self.pool.reserve(seq.key, len(seq.ids)):  # the head was checked; a later one may not fit
                    self.preempted.insert(0, seq)
                    return
                self.running.append(seq)

    def _plan_pass(self) -> tuple[list[Chunk], list[Running]]:
        """The pass's chunks (decode rows first, then prefill chunks within the token budget) and their sequences."""
        budget = self.pass_tokens
        decoding = [seq for seq in self.running if seq.fed == len(seq.ids) - 1]
        for seq in decoding:
            while seq in self.running and not self.pool.reserve(seq.key, seq.fed + 1):
                self._preempt_last(but=seq)
        decoding = [seq for seq in decoding if seq in self.running]
        chunks = [Chunk(seq.key, (seq.ids[-1],), seq.fed, logits=True) for seq in decoding]
        fed = list(decoding)
        budget -= len(chunks)
        for seq in self.running:
            if budget <= 0:
                break
            if seq.fed < len(seq.ids) - 1:
                n = min(budget, len(seq.ids) - seq.fed)
                last = seq.fed + n == len(seq.ids)  # the prompt's last chunk: its logits give the first token
                chunks.append(Chunk(seq.key, tuple(seq.ids[seq.fed : seq.fed + n]), seq.fed, logits=last))
                fed.append(seq)
                budget -= n
        return chunks, fed

    def _preempt_last(self, *, but: Running) -> None:
        """Free the pages of the sequence admitted last (``but`` itself only when it is the only one)."""
        victim = next((seq for seq in reversed(self.running) if seq is not but), but)
        log.info("KV pool full: request %d is preempted (fed again later)", victim.key)
        self.pool.release(victim.key)
        victim.fed = 0
        self.running.remove(victim)
        self.preempted.insert(0, victim)

    def _advance(self, launched: Launched) -> None:
        """Read ``launched``'s tokens and hand them on; a sequence that ended before (a pass launched ahead of
        its EOS) gets nothing more. A failed pass ends its sequences with the error."""
        fed, chunks = launched.fed, launched.chunks
        if launched.error is not None:
            for seq in fed:
                if seq in self.running:
                    self._end(seq, error=launched.error)
            return
        asking = [seq for seq, chunk in zip(fed, chunks) if chunk.logits]
        for seq, chunk in zip(fed, chunks):
            seq.fed += len(chunk.token_ids)
        tokens = launched.tokens() if launched.greedy is not None else self._sample(asking, launched.logits)
        running = set(self.running)  # a sequence that ended since the pass was launched (ahead) gets nothing more
        for seq, token in zip(asking, tokens):
            if seq not in running:
                continue
            seq.ids.append(token)
            self.scheduler.token(seq.entry, token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._end(seq, reason)

    def _sample(self, seqs: list[Running], logits: torch.Tensor) -> list[int]:
        """Each sequence's next token from its row of ``logits``: plain greedy rows in one argmax, others alone."""
        tokens: list[int | None] = [None] * len(seqs)
        plain = [i for i, seq in enumerate(seqs) if _plain_greedy(seq)]
        if plain:
            rows = logits if len(plain) == len(seqs) else logits[plain]  # no index copy in the common case
            best = rows.float().argmax(dim=-1).tolist()
            for i, token in zip(plain, best):
                tokens[i] = token
        for i, seq in enumerate(seqs):
            if tokens[i] is None:
                # only the repetition penalty reads the ids seen so far: no O(length) copy per token without it
                seen = seq.ids if seq.entry.params.repetition_penalty != 1 else []
                history = torch.tensor(seen, dtype=torch.long, device=logits.device)
                tokens[i] = sample_next(logits[i], seq.entry.params, seq.generator, history)
        return tokens

    def _finish_reason(self, seq: Running, token: int) -> FinishReason | None:
        produced = len(seq.ids) - seq.entry.prompt_tokens
        if token in self.engine.eos_token_ids:
            return FinishReason.EOS
        if produced >= seq.entry.params.max_new_tokens:
            return FinishReason.LENGTH
        if len(seq.ids) > self.engine.max_context:  # no position left to feed ``token`` at
            return FinishReason.CONTEXT
        return None

    def _end(self, seq: Running, reason: FinishReason | None = None, *, error: str | None = None) -> None:
        self.pool.release(seq.key)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.preempted:
            self.preempted.remove(seq)
        if error is not None:
            self.scheduler.error(seq.entry, error, fatal=False)
        else:
            self.scheduler.finish(seq.entry, reason)
