"""A reply's token ids turned into text as they come: stop strings, and the reasoning split from the answer.

``ReplyText(tokenizer, stop=..., reasoning=...)`` takes one generated id at a time (``add``) and returns the
new text as a ``Delta`` (``reasoning``, ``content``):

1. ids become text through ``compute.chat.StreamingDetokenizer``: a multi-byte character split across ids is
   held until it is whole, special tokens (EOS, padding) are not shown, ``<think>``/``</think>`` are;
2. stop strings are looked for in that text (the whole reply's text, tags included, as vLLM does): a tail
   that could be the start of a stop string is held back until the next ids decide it; when one matches,
   the text before it is the last delta, ``stopped`` becomes True and every later id is ignored (the caller
   cancels the request);
3. with ``reasoning`` not None (a model that thinks), ``compute.chat.ReasoningSplitter`` sends the text
   inside ``<think>…</think>`` to ``reasoning`` and the rest to ``content``, the tags themselves dropped;
   ``reasoning=True`` when the prompt already opened the block (DeepSeek-R1's generation prompt does).

``finish()`` returns what is still held back once the reply has ended. ``tokens`` counts the ids taken, up
to and including the one that completed a stop string: the completion's token count in ``usage``.
"""

from __future__ import annotations

import dataclasses

from compute.chat import ANSWER, THINK_CLOSE, THINK_OPEN, ReasoningSplitter, StreamingDetokenizer, Tokenizer


@dataclasses.dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)

    def extend(self, pieces: list[tuple[str, str]]) -> "Delta":
        for kind, text in pieces:
            if kind == ANSWER:
                self.content += text
            else:
                self.reasoning += text
        return self


def thinks(tokenizer: Tokenizer) -> bool:
    """Whether the model writes reasoning in ``<think>…</think>``: both tags are single tokens of its tokenizer."""
    for tag in (THINK_OPEN, THINK_CLOSE):
        token_id = tokenizer.convert_tokens_to_ids(tag)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != tag:
            return False
    return True


def prompt_opens_reasoning(tokenizer: Tokenizer, prompt_ids: list[int]) -> bool:
    """Whether the prompt ends inside an open ``<think>`` block (DeepSeek-R1's generation prompt opens one)."""
    text = tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)
    return text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE)


class StopMatcher:
    """Finds the first of several stop strings in text that arrives in pieces; see the module docstring."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held) that is surely not part of a stop string."""
        if self.stopped:
            return ""
        text = self._held + text
        self._held = ""
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return text[: min(found)]
        keep = max((_prefix_suffix(text, stop) for stop in self.stops), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def finish(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _prefix_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class ReplyText:
    """One reply's ids in, text deltas out; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, *, stop: tuple[str, ...] = (), reasoning: bool | None = None):
        self._detokenizer = StreamingDetokenizer(tokenizer)
        self._stop = StopMatcher(stop)
        self._splitter = None if reasoning is None else ReasoningSplitter(reasoning=reasoning)
        self.tokens = 0

    @property
    def stopped(self) -> bool:
        """A stop string matched: the reply is over."""
        return self._stop.stopped

    def add(self, token_id: int) -> Delta:
        if self.stopped:
            return Delta()
        self.tokens += 1
        return self._split(self._stop.feed(self._detokenizer.add(token_id)))

    def finish(self) -> Delta:
        """The text still held back, once no more ids will come."""
        text = "" if self.stopped else self._stop.feed(self._detokenizer.flush())
        delta = self._split(text + self._stop.finish())
        if self._splitter is not None:
            delta.extend(self._splitter.finish())
        return delta

    def _split(self, text: str) -> Delta:
        if self._splitter is None:
            return Delta(content=text)
        return Delta().extend(self._splitter.feed(text))
