"""One ``spillover run`` session: the connection to the loader, the engine, and the replies it writes.

``Session.open(address, model, config)`` connects to a ready loader (``protocol.client.LoaderClient``), builds
the ``compute.engine.Engine`` on its plan (the KV cache for the plan's ``max_context``, prefill in the plan's
chunks: what the budget counted), and closes the connection when left. It then serves:

* ``answer(prompt)``: one reply streamed to stdout, statistics to stderr;
* ``answer_json(prompt)``: one reply as a dict for ``--output-format json`` (nothing written to stdout);
* ``chat()``: the multi-turn REPL of ``compute.chat``.

With ``config.speculate`` ("ngram") or a draft model (``draft``, resolved from ``--draft-model``) the engine
decodes speculatively (``compute.speculation``); the draft model is held here, resident, drafting chains or trees
(``config.draft_shape``), and must be the one the loader's plan reserved room for (``Plan.draft_model``) and have
the target's tokenizer, else ``DraftModelError``. ``build_engine`` builds that engine; ``spillover serve`` builds
its one-conversation engine with it too.

Any failure of the loader connection becomes ``LoaderLost``, whose message names the loader and its pid. A
watchdog thread also checks, every ``WATCH_S``, that the loader process lives: resident weights need no
messages, so without it a reply could go on, or the REPL wait for input, with the loader long gone. When it
finds the loader dead it signals the main thread (SIGUSR1), whose handler raises ``LoaderLost`` wherever the
main thread is, a blocking ``input()`` included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

import torch

from compute.chat import Conversation, Reply, ReplyRefused, StopOnInterrupt, StreamingDetokenizer, reply_once, repl
from compute.config import RunConfig
from compute.draft_model import DraftModelError, ModelDrafter, check_same_tokenizer, open_drafter
from compute.engine import ContextLengthError, Engine, FinishReason, GenerationResult
from compute.resolve import ResolvedModel
from compute.speculation import Drafter, NgramDrafter
from compute.usage import PeakMemorySampler
from protocol.client import LoaderClient, LoaderError
from protocol.defaults import DEFAULT_PREFILL_CHUNK
from protocol.ring import pid_alive
from protocol.sockets import AddressError
from quantizer.checkpoint import QuantizedCheckpoint

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15.0  # the loader is ready before anyone connects, so the handshake is quick
WATCH_S = 0.2  # how often the watchdog checks that the loader process lives


class LoaderLost(RuntimeError):
    """The loader died or failed while this session needed it; the message names it."""


def cpu_compute_threads(cores: int | None = None) -> int:
    """Compute's intra-op threads on a CPU device: one core fewer than the machine has (at least one).

    PyTorch splits an op's work evenly over its threads and waits for the last: a thread that loses its core (to
    the loader copying a streamed unit, to any other process) stalls the whole op. On the 2-core development
    machine, busy with other work, the real 0.5B decoded 31 tok/s with one thread and under 2 with two within ten
    minutes (docs/performance.md); an idle machine gains from the last core (up to 2x in the INT4 kernel alone):
    ``OMP_NUM_THREADS``, when set, rules."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    return max(1, (cores or os.cpu_count() or 1) - 1)


class LoaderWatchdog:
    """While active, turns the loader's death into ``LoaderLost`` in the main thread within ``WATCH_S``."""

    def __init__(self, loader_pid: int):
        self.loader_pid = loader_pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loader-watchdog", daemon=True)
        self._previous = None

    def __enter__(self) -> "LoaderWatchdog":
        self._previous = signal.signal(signal.SIGUSR1, self._on_loader_dead)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        signal.signal(signal.SIGUSR1, self._previous)

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_S):
            if not pid_alive(self.loader_pid):
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    def _on_loader_dead(self, signum, frame) -> None:
        raise LoaderLost(f"the loader process (pid {self.loader_pid}) is gone; compute cannot go on without it")


class Session:
    """A connected engine and what it needs to answer: the model's name and the run's options."""

    def __init__(self, client: LoaderClient, engine: Engine, model: ResolvedModel, config: RunConfig):
        self.client = client
        self.engine = engine
        self.model = model
        self.config = config
        self.params = config.sampling()
        self.loader_pid = client.plan.loader_pid

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, address: str, model: ResolvedModel, config: RunConfig, draft: ResolvedModel | None = None
    ) -> Iterator["Session"]:
        try:
            client = LoaderClient.connect(address, timeout_s=CONNECT_TIMEOUT_S)
        except (LoaderError, AddressError) as e:
            raise LoaderLost(f"could not connect to the loader at {address}: {e}") from None
        plan = client.plan
        log.info("loader pid %d, policy %s, max_context %d", plan.loader_pid, plan.policy, plan.max_context)
        with client, LoaderWatchdog(plan.loader_pid), cls._loader_errors(plan.loader_pid):
            engine = build_engine(client, model, config, draft=draft, address=address)
            yield cls(client, engine, model, config)

    @staticmethod
    @contextlib.contextmanager
    def _loader_errors(loader_pid: int) -> Iterator[None]:
        try:
            yield
        except LoaderError as e:
            raise LoaderLost(f"the loader (pid {loader_pid}) failed: {e}") from None

    def _streamed_bytes(self) -> int:
        return sum(p.streamed_bytes for p in self.client.stats().policies)

    def _generate(
        self, prompt_ids: list[int], write: Callable[[str], None], should_stop: Callable[[], bool]
    ) -> tuple[GenerationResult, str, int]:
        """(result, decoded text, bytes the loader streamed meanwhile), writing text as it comes."""
        detokenizer = StreamingDetokenizer(self.engine.tokenizer)
        pieces: list[str] = []

        def on_token(token_id: int) -> None:
            text = detokenizer.add(token_id)
            if text:
                pieces.append(text)
                write(text)

        with self._loader_errors(self.loader_pid):
            streamed_before = self._streamed_bytes()
            try:
                result = self.engine.generate(prompt_ids, self.params, on_token=on_token, should_stop=should_stop)
            except ContextLengthError as e:
                raise ReplyRefused(str(e)) from None
            streamed = self._streamed_bytes() - streamed_before
        tail = detokenizer.flush()
        if tail:
            pieces.append(tail)
            write(tail)
        if detokenizer.unknown_ids:
            log.info("%d generated ids have no token in the tokenizer (shown as U+FFFD)", detokenizer.unknown_ids)
        return result, "".join(pieces), streamed

    def _reply(self, prompt_ids: list[int], write: Callable[[str], None], should_stop: Callable[[], bool]) -> Reply:
        """``compute.chat.Generate``: one reply for the REPL or a one-shot prompt."""
        result, text, streamed = self._generate(prompt_ids, write, should_stop)
        line = (
            f"prefill {result.prefill_tokens} tok, {result.prefill_tokens_per_s:.1f} tok/s | "
            f"decode {result.decode_tokens} tok, {result.decode_tokens_per_s:.1f} tok/s"
        )
        if result.speculation is not None:
            s = result.speculation
            line += f" | {s.tokens_per_pass:.2f} tok/pass, draft {100 * s.draft_time_share:.0f}% of the time"
        if streamed:
            line += f" | streamed {self._per_forward(streamed, result) / 2**20:.1f} MiB/token"
        return Reply(text=text, stopped=result.finish_reason == FinishReason.STOPPED, stats_line=line)

    def _per_forward(self, streamed_bytes: int, result: GenerationResult) -> float:
        """Bytes streamed per forward pass of a reply: one per decoded token, one per prefill chunk."""
        passes = result.forward_passes
        return streamed_bytes / passes if passes else 0.0

    def answer(self, prompt: str) -> Reply:
        """One reply to ``prompt`` on stdout (reasoning dimmed on a terminal)."""
        conversation = Conversation(self.engine.tokenizer, raw=self.config.raw)
        return reply_once(conversation, prompt, self._reply, out=sys.stdout, err=sys.stderr, styled=sys.stdout.isatty())

    def answer_json(self, prompt: str) -> dict:
        """One reply to ``prompt`` as the ``--output-format json`` object; nothing is printed. Ctrl-C ends the reply
        early (``finish_reason`` "stopped")."""
        conversation = Conversation(self.engine.tokenizer, raw=self.config.raw)
        prompt_ids = conversation.prompt_ids(prompt)
        pids = {"compute": os.getpid(), "loader": self.loader_pid}
        with PeakMemorySampler(pids, device=self.config.device) as memory, StopOnInterrupt() as stop:
            started = time.perf_counter()
            result, text, streamed = self._generate(prompt_ids, lambda _text: None, stop.requested.is_set)
            seconds = time.perf_counter() - started
        return {
            "model": self.model.label,
            "prompt_token_ids": prompt_ids,
            "token_ids": list(result.token_ids),
            "text": text,
            "finish_reason": result.finish_reason.value,
            "stats": {
                "prompt_tokens": result.prompt_tokens,
                "prefill_tokens": result.prefill_tokens,
                "prefill_seconds": result.prefill_seconds,
                "prefill_tokens_per_s": result.prefill_tokens_per_s,
                "decode_tokens": result.decode_tokens,
                "decode_seconds": result.decode_seconds,
                "decode_tokens_per_s": result.decode_tokens_per_s,
                "total_seconds": seconds,
                "policy": self.client.plan.policy,
                "budget_bytes": self.client.plan.budget_bytes,
                "streamed_bytes": streamed,
                "streamed_bytes_per_token": self._per_forward(streamed, result),
                "device": self.config.device,
                "forward_passes": result.forward_passes,
                "speculation": result.speculation.as_dict() if result.speculation is not None else None,
                **memory.report(),
            },
        }

    def chat(self) -> None:
        """The interactive REPL until /exit or end of input."""
        if sys.stdin.isatty():
            import readline  # noqa: F401  (line editing and history for input())
        conversation = Conversation(self.engine.tokenizer, raw=self.config.raw)
        styled = sys.stdout.isatty()
        repl(conversation, self._reply, read_line=input, out=sys.stdout, err=sys.stderr, styled=styled)



def build_engine(
    client: LoaderClient, model: ResolvedModel, config: RunConfig, *, draft: ResolvedModel | None, address: str
) -> Engine:
    """The one-conversation engine on the loader's plan (its ``max_context`` and prefill chunk), with the drafter
    the options ask for (``config.speculate``, or ``draft``: the resolved ``--draft-model``, held resident here).

    Raises ``DraftModelError`` (one line) when the loader at ``address`` reserved no room for ``draft`` or the
    draft's tokenizer differs from the target's; ``protocol.client.LoaderError`` when the loader fails."""
    plan = client.plan
    checkpoint = QuantizedCheckpoint(model.path)
    engine = Engine(
        checkpoint,
        client,
        device=config.device,
        max_context=plan.max_context,
        prefill_chunk=plan.prefill_chunk,
        drafter=_drafter(config, draft, plan, checkpoint, address),
        draft_tokens=config.draft_tokens,
    )
    if isinstance(engine.drafter, ModelDrafter):
        check_same_tokenizer(engine.tokenizer, engine.drafter.engine.tokenizer, config.draft_model)
    return engine


def _drafter(
    config: RunConfig, draft: ResolvedModel | None, plan, target: QuantizedCheckpoint, address: str
) -> Drafter | None:
    """The drafter the options ask for: prompt lookup, a draft model (held resident here), or none."""
    if config.speculate == "ngram":
        return NgramDrafter()
    if draft is None:
        return None
    if plan.draft_model != str(draft.path):
        raise DraftModelError(
            f"the loader at {address} reserved no room for the draft model {draft.path} "
            f"(it counted {plan.draft_model or 'none'}): start it with --draft-model {draft.path}"
        )
    drafter = open_drafter(
        QuantizedCheckpoint(draft.path),
        shape=config.draft_shape,
        device=config.device,
        max_context=plan.max_context,
        vocab_size=int(target.config["vocab_size"]),
        prefill_chunk=min(plan.prefill_chunk, DEFAULT_PREFILL_CHUNK),  # what the planner counted for the draft
        max_tokens=config.draft_tokens,
    )
    log.info("draft model %s: %d layers, resident, drafting a %s", draft.label,
             drafter.engine.config.num_hidden_layers, config.draft_shape)  # fmt: skip
    return drafter
