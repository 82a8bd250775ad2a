"""Text around generation: the chat template, streaming detokenization, reasoning display, and the REPL.

This module turns what a person types into the exact token ids fed to the model, and the ids the model
produces back into text on a terminal, as they come. It knows nothing about the model, the loader or the
device: the REPL drives generation through a ``generate`` callable that ``compute.session`` supplies.

* ``Conversation`` keeps the multi-turn history and renders it with the tokenizer's chat template
  (``add_generation_prompt=True``), or, with ``raw=True``, tokenizes each prompt as it is, without history.
* ``StreamingDetokenizer`` turns ids into text one at a time without ever cutting a multi-byte character in
  half; ids the tokenizer does not know (real Qwen models have more ids than tokens) become U+FFFD instead of
  crashing, and special tokens such as EOS are not shown (``<think>``/``</think>`` are, see below).
* ``ReasoningSplitter`` separates DeepSeek-R1's ``<think>…</think>`` reasoning from the answer in a stream of
  text pieces, even when a tag arrives split across pieces; ``ReplyPrinter`` shows reasoning dimmed on a
  terminal and the text verbatim (tags included) anywhere else.
* ``repl`` is the interactive loop: ``/reset``, ``/exit`` (or end of input), Ctrl-C stops the current reply.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from typing import Callable, Iterator, Protocol, TextIO

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
REPLACEMENT_CHAR = "\ufffd"
MAX_PENDING_IDS = 4  # a UTF-8 character has at most 4 bytes, so at most 4 byte-level ids

# ANSI styles for a terminal: reasoning dim, statistics dim, errors plain.
DIM = "\x1b[2m"
RESET = "\x1b[0m"


class Tokenizer(Protocol):
    """The part of a transformers tokenizer this module uses."""

    all_special_ids: list[int]

    def __len__(self) -> int: ...

    def __call__(self, text: str, add_special_tokens: bool = ...) -> dict: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...

    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...

    def convert_ids_to_tokens(self, ids: int) -> str: ...

    def apply_chat_template(self, messages: list[dict], **kwargs) -> dict: ...


class ReplyRefused(ValueError):
    """A reply cannot start for a reason the person can act on (e.g. the conversation outgrew the context)."""


class Conversation:
    """The messages of one chat and the token ids they render to.

    With the chat template, past replies are stored without their reasoning (what DeepSeek-R1 asks for; its
    template drops it too). With ``raw=True`` there is no template and no history: each prompt is tokenized as
    it is, with no special tokens added.
    """

    def __init__(self, tokenizer: Tokenizer, *, raw: bool):
        if not raw and not getattr(tokenizer, "chat_template", None):
            raise ReplyRefused("the model's tokenizer has no chat template: run with --raw to feed prompts as they are")
        self.tokenizer = tokenizer
        self.raw = raw
        self.messages: list[dict[str, str]] = []

    def prompt_ids(self, user_text: str) -> list[int]:
        """Add the user's message and return the ids to feed the model for the reply (the whole history)."""
        if self.raw:
            return list(self.tokenizer(user_text, add_special_tokens=False)["input_ids"])
        self.messages.append({"role": "user", "content": user_text})
        encoded = self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def add_reply(self, text: str) -> None:
        """Record the model's reply; only the answer after ``</think>`` is kept for later turns."""
        if not self.raw:
            self.messages.append({"role": "assistant", "content": text.split(THINK_CLOSE)[-1].strip()})

    def drop_last_user_message(self) -> None:
        """Forget a user message whose reply failed, so the history stays a valid alternation."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def reset(self) -> None:
        self.messages.clear()

    def prompt_opens_reasoning(self, prompt_ids: list[int]) -> bool:
        """Whether the rendered prompt ends inside an open ``<think>`` block (DeepSeek-R1's generation prompt)."""
        text = self.tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)
        return text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE)


class StreamingDetokenizer:
    """Ids in, text out, one id at a time.

    Text for a window of recent ids is decoded and compared with the text of the window without the newest ids;
    the difference is emitted unless it ends in an incomplete character (U+FFFD from a partial UTF-8 sequence),
    in which case it waits for more ids (at most ``MAX_PENDING_IDS``: bytes that never complete a character, as a
    random model emits, come out as U+FFFD rather than stalling the stream). The window then slides, so decoding
    stays O(1) per id.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        # Shown: the reasoning tags. Hidden: BOS/EOS/padding and other control tokens.
        shown = {tokenizer.convert_tokens_to_ids(tag) for tag in (THINK_OPEN, THINK_CLOSE)}
        shown = {i for i in shown if i is not None and tokenizer.convert_ids_to_tokens(i) in (THINK_OPEN, THINK_CLOSE)}
        self.hidden_ids = frozenset(tokenizer.all_special_ids) - shown
        self.unknown_ids = 0  # how many ids had no token (each shown as U+FFFD)
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # end of what has been emitted

    def add(self, token_id: int) -> str:
        """The new text that ``token_id`` completes ('' while a character is still incomplete)."""
        if token_id in self.hidden_ids:
            return ""
        if not 0 <= token_id < self.vocab_size:
            self.unknown_ids += 1
            return self.flush() + REPLACEMENT_CHAR
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        incomplete = after.endswith(REPLACEMENT_CHAR) and len(self._ids) - self._read < MAX_PENDING_IDS
        if len(after) <= len(before) or incomplete:
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""


REASONING = "reasoning"
ANSWER = "answer"


class ReasoningSplitter:
    """Splits streamed text into (kind, text) pieces, kind ``"reasoning"`` or ``"answer"``; tags are dropped.

    A tail that could be the start of the next tag is held back until the following piece decides it.
    """

    def __init__(self, *, reasoning: bool):
        self.reasoning = reasoning
        self._held = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        text = self._held + text
        self._held = ""
        while text:
            tag = THINK_CLOSE if self.reasoning else THINK_OPEN
            found = text.find(tag)
            if found >= 0:
                self._emit(pieces, text[:found])
                text = text[found + len(tag) :]
                self.reasoning = not self.reasoning
                continue
            keep = _partial_tag_suffix(text, tag)
            self._emit(pieces, text[: len(text) - keep])
            self._held = text[len(text) - keep :]
            break
        return pieces

    def finish(self) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        self._emit(pieces, self._held)
        self._held = ""
        return pieces

    def _emit(self, pieces: list[tuple[str, str]], text: str) -> None:
        if text:
            pieces.append((REASONING if self.reasoning else ANSWER, text))


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReplyPrinter:
    """Writes a reply as it streams: on a terminal reasoning is dimmed and its tags hidden; elsewhere verbatim."""

    def __init__(self, out: TextIO, *, styled: bool, opens_reasoning: bool):
        self.out = out
        self.styled = styled
        self.splitter = ReasoningSplitter(reasoning=opens_reasoning)
        self._dim = False

    def write(self, text: str) -> None:
        if self.styled:
            for kind, piece in self.splitter.feed(text):
                self._write_styled(kind, piece)
        else:
            self.out.write(text)
        self.out.flush()

    def finish(self) -> None:
        for kind, piece in self.splitter.finish() if self.styled else ():
            self._write_styled(kind, piece)
        if self._dim:
            self.out.write(RESET)
            self._dim = False
        self.out.write("\n")
        self.out.flush()

    def _write_styled(self, kind: str, piece: str) -> None:
        want_dim = kind == REASONING
        if want_dim != self._dim:
            self.out.write(DIM if want_dim else RESET)
            self._dim = want_dim
        self.out.write(piece)


@dataclasses.dataclass(frozen=True)
class Reply:
    """What one generation produced, as the REPL needs it."""

    text: str  # the decoded reply, tags included
    stopped: bool  # cut short by Ctrl-C
    stats_line: str  # e.g. "prefill 12 tok 340.1 tok/s | decode 32 tok 12.5 tok/s"


# generate(prompt_ids, write, should_stop) -> Reply: streams text through ``write`` as it comes.
Generate = Callable[[list[int], Callable[[str], None], Callable[[], bool]], Reply]


class StopOnInterrupt:
    """While active, the first Ctrl-C only sets a flag (the reply stops between tokens); a second one
    interrupts for real (KeyboardInterrupt), in case something below is not checking the flag."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._previous = None

    def __enter__(self) -> "StopOnInterrupt":
        self.requested.clear()
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum, frame) -> None:
        self.requested.set()
        signal.signal(signal.SIGINT, self._previous)


PROMPT = ">>> "
HELP = "Commands: /reset forgets the conversation, /exit quits (or Ctrl-D). Ctrl-C stops a reply."


def repl(
    conversation: Conversation,
    generate: Generate,
    *,
    read_line: Callable[[str], str],
    out: TextIO,
    err: TextIO,
    styled: bool,
) -> None:
    """The interactive loop; returns on ``/exit`` or end of input. Ctrl-C at the prompt raises KeyboardInterrupt.

    A ``ReplyRefused`` from ``generate`` is reported and the loop goes on; any other error ends it.
    """
    err.write(HELP + "\n")
    for line in _lines(read_line):
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            return
        if command == "/reset":
            conversation.reset()
            err.write("(conversation forgotten)\n")
            continue
        if command.startswith("/") and command.split()[0] in ("/help", "/?"):
            err.write(HELP + "\n")
            continue
        try:
            reply_once(conversation, line, generate, out=out, err=err, styled=styled)
        except ReplyRefused as e:
            err.write(f"{e} (/reset starts a new conversation)\n")


def reply_once(
    conversation: Conversation, user_text: str, generate: Generate, *, out: TextIO, err: TextIO, styled: bool
) -> Reply:
    """Generate and print one reply to ``user_text``, recording it in the conversation."""
    prompt_ids = conversation.prompt_ids(user_text)
    printer = ReplyPrinter(out, styled=styled, opens_reasoning=conversation.prompt_opens_reasoning(prompt_ids))
    try:
        with StopOnInterrupt() as stop:
            reply = generate(prompt_ids, printer.write, stop.requested.is_set)
    except BaseException:
        conversation.drop_last_user_message()
        printer.finish()
        raise
    printer.finish()
    conversation.add_reply(reply.text)
    note = " (stopped)" if reply.stopped else ""
    err.write(f"{DIM if styled else ''}[{reply.stats_line}]{note}{RESET if styled else ''}\n")
    err.flush()
    return reply


def _lines(read_line: Callable[[str], str]) -> Iterator[str]:
    while True:
        try:
            yield read_line(PROMPT)
        except EOFError:
            return
