"""The chat side of ``spillover run``: template, streaming detokenizer, reasoning display, and the REPL driven
through a real pseudo-terminal with both processes running (``/reset``, ``/exit``, Ctrl-C during a reply)."""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import select
import signal
import sys
import time

import psutil
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


def test_detokenizer_does_not_stall_on_bytes_that_never_form_a_character(tokenizer):
    # byte-level ids that decode to U+FFFD alone and in pairs: lone UTF-8 continuation bytes
    strays = [i for i in range(len(tokenizer)) if tokenizer.decode([i, i]) == "\ufffd\ufffd"]
    stray = random.choice(strays)
    detokenizer = StreamingDetokenizer(tokenizer)
    streamed = "".join(detokenizer.add(stray) for _ in range(12))
    assert streamed and set(streamed) == {"\ufffd"}  # shown as it comes, not held until the end


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


def test_repl_stops_at_end_of_input(tokenizer):
    def read_line(prompt):
        raise EOFError

    def generate(prompt_ids, write, should_stop):
        raise AssertionError("nothing was typed")

    out, err = io.StringIO(), io.StringIO()
    repl(Conversation(tokenizer, raw=False), generate, read_line=read_line, out=out, err=err, styled=False)
    assert out.getvalue() == "" and "/exit" in err.getvalue()  # only the help line was written


class Terminal:
    """A process on a pseudo-terminal (its controlling terminal, so Ctrl-C typed here is a real SIGINT)."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execve(argv[0], argv, env)
        self.seen = ""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str, timeout: float) -> str:
        """Read until ``pattern`` (a regex) appears after what earlier calls consumed; return what came before."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.seen)):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {pattern!r} within {timeout} s; the terminal shows:\n{self.seen[-2000:]}"
            if select.select([self.fd], [], [], remaining)[0]:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the process closed the terminal
                    assert False, f"the process ended before {pattern!r}:\n{self.seen[-2000:]}"
        before, self.seen = self.seen[: match.start()], self.seen[match.end() :]
        return before

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:
                    pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"the process did not exit within {timeout} s:\n{self.seen[-2000:]}")


def test_repl_on_a_terminal_reset_ctrl_c_and_exit(tiny_q, tmp_path):
    # Greedy replies of the tiny random model run to -n without an EOS: long enough to interrupt.
    argv = [sys.executable, "-m", "compute.cli", "run", "--model", str(tiny_q), "--device", "cpu",
            "--gpu-memory", "300MiB", "--temperature", "0", "-n", "1000", "--max-context", "1024"]  # fmt: skip
    env = {**os.environ, "SPILLOVER_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    terminal = Terminal(argv, env)
    try:
        terminal.expect(">>> ", timeout=120)
        loaders = [p for p in psutil.Process(terminal.pid).children() if "loader.main" in p.cmdline()]
        assert len(loaders) == 1
        for prompt in ("Hello", "/reset", "Hello again"):
            terminal.send(prompt + "\r")
            if prompt == "/reset":
                terminal.expect(r"\(conversation forgotten\)", timeout=10)
            else:
                terminal.expect(re.escape(prompt) + r"\s*\r\n.+", timeout=60)  # the reply has begun
                terminal.send("\x03")  # Ctrl-C: stops this reply, not the program
                stats = terminal.expect(r"\(stopped\)", timeout=30)
                assert re.search(r"prefill \d+ tok, [\d.]+ tok/s \| decode \d+ tok", stats)
            terminal.expect(">>> ", timeout=30)
        assert loaders[0].is_running()  # the terminal's Ctrl-C did not reach the loader
        terminal.send("/exit\r")
        assert terminal.wait(timeout=30) == 0
        psutil.wait_procs(loaders, timeout=15)
        assert not loaders[0].is_running()
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(terminal.pid, signal.SIGKILL)
            os.waitpid(terminal.pid, 0)
        os.close(terminal.fd)
