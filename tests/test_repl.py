"""The chat side of ``spillover run``: template, streaming detokenizer, reasoning display, and the REPL driven
through a real pseudo-terminal with both processes running (``/reset``, ``/exit``, Ctrl-C during a reply)."""

from __future__ import annotations

import io
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from compute.chat import (
    ANSWER,
    DIM,
    REASONING,
    Conversation,
    ReasoningSplitter,
    Reply,
    ReplyPrinter,
    StreamingDetokenizer,
    repl,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer(tiny_q):
    return AutoTokenizer.from_pretrained(tiny_q)


def test_detokenizer_streams_any_text_exactly(tokenizer):
    rng = random.Random()
    alphabet = "abc xyz éü✓日本語🙂\n<think></think>"
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        detokenizer = StreamingDetokenizer(tokenizer)
        pieces = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
        assert "".join(pieces) == text
        # no piece may end in half a character
        assert not any(p.endswith("\ufffd") for p in pieces)


def test_detokenizer_replaces_unknown_ids_and_hides_eos(tokenizer):
    detokenizer = StreamingDetokenizer(tokenizer)
    known = tokenizer("ok", add_special_tokens=False)["input_ids"]
    beyond = len(tokenizer) + random.randrange(5)  # the model's vocab is larger than the tokenizer's
    out = "".join(detokenizer.add(i) for i in [*known, beyond, tokenizer.eos_token_id]) + detokenizer.flush()
    assert out == "ok\ufffd"
    assert detokenizer.unknown_ids == 1


def test_reasoning_splitter_handles_tags_split_anywhere():
    text = "let me think</think>The answer is 42. <think>more</think>done"
    for _ in range(20):
        cuts = sorted(random.sample(range(1, len(text)), 6))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        splitter = ReasoningSplitter(reasoning=True)
        pieces = [p for c in chunks for p in splitter.feed(c)] + splitter.finish()
        merged: list[tuple[str, str]] = []
        for kind, piece in pieces:
            if merged and merged[-1][0] == kind:
                merged[-1] = (kind, merged[-1][1] + piece)
            else:
                merged.append((kind, piece))
        assert merged == [
            (REASONING, "let me think"),
            (ANSWER, "The answer is 42. "),
            (REASONING, "more"),
            (ANSWER, "done"),
        ]


def test_printer_dims_reasoning_on_a_terminal_and_is_verbatim_elsewhere():
    styled, plain = io.StringIO(), io.StringIO()
    for out, is_styled in ((styled, True), (plain, False)):
        printer = ReplyPrinter(out, styled=is_styled, opens_reasoning=True)
        for piece in ("hm", "m</th", "ink>Yes."):
            printer.write(piece)
        printer.finish()
    assert plain.getvalue() == "hmm</think>Yes.\n"
    assert styled.getvalue().startswith(DIM + "hmm")
    assert "</think>" not in styled.getvalue() and "Yes." in styled.getvalue()


def test_conversation_history_and_reset(tokenizer):
    conversation = Conversation(tokenizer, raw=False)
    first = conversation.prompt_ids("hello")
    assert conversation.prompt_opens_reasoning(first)  # DeepSeek-R1's generation prompt opens <think>
    conversation.add_reply("secret reasoning</think>the answer")
    second = tokenizer.decode(conversation.prompt_ids("again"))
    assert "the answer" in second and "secret reasoning" not in second and second.count("<｜User｜>") == 2
    conversation.reset()
    assert conversation.prompt_ids("hello") == first
    raw = Conversation(tokenizer, raw=True)
    assert raw.prompt_ids("hello") == tokenizer("hello", add_special_tokens=False)["input_ids"]


def test_repl_commands_with_a_fake_generator(tokenizer):
    prompts: list[list[int]] = []

    def generate(prompt_ids, write, should_stop):
        prompts.append(prompt_ids)
        write("thinking</think>reply")
        return Reply(text="thinking</think>reply", stopped=False, stats_line="stats")

    lines = iter(["hi", "", "/reset", "hi", "next", "/exit", "never read"])

    def read_line(prompt):
        return next(lines)

    out, err = io.StringIO(), io.StringIO()
    repl(Conversation(tokenizer, raw=False), generate, read_line=read_line, out=out, err=err, styled=False)
    assert len(prompts) == 3
    assert prompts[0] == prompts[1]  # /reset forgot the first exchange
    assert len(prompts[2]) > len(prompts[1])  # the second turn carries the history
    assert out.getvalue().count("reply") == 3 and err.getvalue().count("[stats]") == 3
