"""``spillover serve`` through real processes on CPU, driven by the official ``openai`` client: chat and completions,
streamed and not, against ``spillover run``'s greedy reply; usage; stop strings; every error status; 1000 malformed
requests; a full queue; a client that disconnects; speculative decoding (prompt lookup, a draft model) against
the plain server, its statistics in /health, and a batch asked with it refused; SIGTERM with streams open; the
loader killed mid-stream; ``./run.sh serve``."""

from __future__ import annotations

import json
import os
import random
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from transformers import AutoTokenizer

from compute.chat import ANSWER, ReasoningSplitter
from compute.serve.main import READY_PATTERN
from conftest import SERVE_BUDGET, ServerProcess

MODEL = "tiny"
API_KEY = "sk-test-" + "".join(random.choices(string.ascii_letters, k=16))
SPECULATE_BUDGET = "600MiB"  # the tiny model and itself as its draft, on CPU
CONTEXT = 1024  # greedy replies of the tiny model run to 1000 tokens without an EOS: long streams for the tests
RUN_SH = Path(__file__).resolve().parent.parent / "run.sh"


def serve_args(tiny_q: Path, *extra: str) -> list[str]:
    return ["--model", str(tiny_q), "--device", "cpu", "--gpu-memory", SERVE_BUDGET, "--max-context", str(CONTEXT),
            "--served-model-name", MODEL, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_q, tmp_path_factory):
    """One server for the tests that leave it serving: a key, one request running and one waiting at most."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = serve_args(tiny_q, "--api-key", API_KEY, "--max-batch", "1", "--max-waiting", "1")
    with ServerProcess(args, log_path=log) as s:
        yield s
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return server.client(API_KEY)


@pytest.fixture(scope="module")
def tokenizer(tiny_q):
    return AutoTokenizer.from_pretrained(tiny_q)


def health(server: ServerProcess) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def wait_health(server: ServerProcess, condition, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        state = health(server)
        if condition(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def fresh(client) -> None:
    """Leave the one-conversation engine's cache holding nothing a test's prompt starts with.

    The engine reuses the cached prefix a prompt shares with the previous one, and keys and values prefilled in
    other chunks differ in their last bits; on a random model such noise tips near-ties between tokens. So each
    reply a test compares starts from the same cache state: a full prefill, as ``spillover run`` does."""
    client.completions.create(model=MODEL, prompt=[6], max_tokens=1)  # 6: the padding token, no prompt's first


def random_prompt() -> str:
    words = ["tell", "me", "about", "the", "sea", "numbers", "why", "café", "日本", "code", "write", "a", "poem"]
    return " ".join(random.choices(words, k=random.randint(2, 6)))


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a reply whose prompt opened a <think> block."""
    splitter = ReasoningSplitter(reasoning=True)
    pieces = splitter.feed(text) + splitter.finish()
    return "".join(t for k, t in pieces if k != ANSWER), "".join(t for k, t in pieces if k == ANSWER)


def collect_chat_stream(stream) -> tuple[str, str, list]:
    reasoning, content, chunks = "", "", []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    return reasoning, content, chunks


def test_models_auth_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")
    with pytest.raises(openai.AuthenticationError) as wrong:
        server.client(API_KEY + "-wrong").models.list()
    assert wrong.value.status_code == 401 and wrong.value.body["type"] == "authentication_error"
    missing = httpx.post(server.base_url + "/chat/completions", json={"model": MODEL, "messages": []})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    state = health(server)  # no key needed
    assert state["status"] == "ok" and state["model"] == MODEL
    assert state["running"] == state["waiting"] == 0
    assert state["kv_free_tokens"] == state["kv_total_tokens"] == CONTEXT
    assert state["speculation"] is None  # no drafter


def test_chat_equals_spillover_run_streamed_or_not(server, client, tiny_q, tmp_path):
    prompt, max_tokens = random_prompt(), random.randint(6, 14)
    run = subprocess.run(
        [sys.executable, "-m", "compute.cli", "run", "--model", str(tiny_q), "--device", "cpu", "--gpu-memory",
         SERVE_BUDGET, "--max-context", str(CONTEXT), "--temperature", "0", "-n", str(max_tokens), "-p", prompt,
         "--output-format", "json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    expected = json.loads(run.stdout)
    reasoning, answer = split_reasoning(expected["text"])
    finish = "stop" if expected["finish_reason"] == "eos" else "length"
    messages = [{"role": "user", "content": prompt}]

    fresh(client)
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.reasoning_content == reasoning  # the tiny tokenizer's generation prompt opens <think>
    assert choice.message.content == answer
    assert choice.finish_reason == finish
    assert reply.usage.prompt_tokens == len(expected["prompt_token_ids"])
    assert reply.usage.completion_tokens == len(expected["token_ids"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == MODEL and reply.id.startswith("chatcmpl-")

    fresh(client)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_completion_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    streamed_reasoning, streamed_content, chunks = collect_chat_stream(stream)
    assert (streamed_reasoning, streamed_content) == (reasoning, answer)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + [finish]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage
    assert len({c.id for c in chunks}) == 1


def test_completions_from_text_or_ids_streamed_or_not(client, tokenizer):
    prompt, max_tokens = random_prompt(), random.randint(5, 12)
    ids = tokenizer(prompt)["input_ids"]
    fresh(client)
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
    fresh(client)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    assert by_text.usage.completion_tokens == max_tokens or by_text.choices[0].finish_reason == "stop"
    assert by_text.object == "text_completion"
    fresh(client)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == by_text.choices[0].text
    assert chunks[-2].choices[0].finish_reason == by_text.choices[0].finish_reason
    assert chunks[-1].usage == by_text.usage


def test_stop_strings_end_the_reply_and_are_trimmed(client):
    for _ in range(10):  # a reply with a two-character stop string, printable, first found past its start
        prompt = random_prompt()
        fresh(client)
        full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0)
        text = full.choices[0].text
        pairs = [text[i : i + 2] for i in range(len(text) - 1)]
        starts = [i for i in range(3, len(pairs)) if pairs[i].isprintable() and "\ufffd" not in pairs[i]]
        starts = [i for i in starts if text.find(text[i : i + 2]) == i]
        # in the reply's first half: a stop string inside its last token's text would stop nothing early
        starts = [i for i in starts if i + 2 <= len(text) // 2]
        if starts:
            break
    assert starts, f"no usable stop string in {text!r}"
    at = random.choice(starts)
    stop = [text[at : at + 2], "never-in-the-reply-\u2603"]
    fresh(client)
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0, stop=stop)
    assert cut.choices[0].text == text[:at]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    fresh(client)
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0, stop=stop[0],
                                         stream=True)  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text[:at]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_reproducible(client):
    messages = [{"role": "user", "content": random_prompt()}]
    seed = random.randrange(2**31)

    def sampled():
        fresh(client)
        return client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, top_p=0.9, seed=seed,
                                              max_tokens=12)  # fmt: skip

    first, second = sampled(), sampled()
    assert first.choices[0].message == second.choices[0].message


def test_errors_have_openai_shapes_and_statuses(server, client):
    messages = [{"role": "user", "content": "hi"}]
    cases = [
        (openai.BadRequestError, "n", dict(model=MODEL, messages=messages, n=2)),
        (openai.BadRequestError, "temperature", dict(model=MODEL, messages=messages, temperature=2.5)),
        (openai.BadRequestError, "max_tokens", dict(model=MODEL, messages=messages, max_tokens=0)),
        (openai.BadRequestError, "stream_options",
         dict(model=MODEL, messages=messages, stream_options={"include_usage": True})),
        (openai.BadRequestError, "messages", dict(model=MODEL, messages=[])),
        (openai.BadRequestError, "messages.0.role", dict(model=MODEL, messages=[{"role": "robot", "content": "x"}])),
        (openai.BadRequestError, "logprobs", dict(model=MODEL, messages=messages, logprobs=True)),
        (openai.NotFoundError, "model", dict(model="gpt-4o", messages=messages)),
    ]  # fmt: skip
    for error, param, kwargs in cases:
        with pytest.raises(error) as caught:
            client.chat.completions.create(**kwargs)
        assert caught.value.body["param"] == param, caught.value.body
        assert caught.value.body["message"]
    long_prompt = " ".join(["sea"] * (CONTEXT + 50))
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    body = too_long.value.body
    assert body["code"] == "context_length_exceeded" and str(CONTEXT) in body["message"]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt=[random.randrange(10, 290) for _ in range(CONTEXT + 5)])
    message = too_long.value.body["message"]
    assert f"{CONTEXT} tokens" in message and f"{CONTEXT + 5} tokens" in message


def malformed_requests(rng: random.Random):
    """(method, path, body bytes, headers, expected status) of requests the server must refuse."""
    auth = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    good_chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    good_completion = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    bad_values = [None, -1, 0, 1.5, 1e308, "x", "", [], {}, [1, "a"], True, 2**70, {"a": {"b": []}}]
    fields = ["model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
              "stream_options", "max_completion_tokens", "top_k", "repetition_penalty"]  # fmt: skip

    def chat_with(field, value):
        body = dict(good_chat)
        body[field] = value
        return body

    while True:
        kind = rng.randrange(9)
        if kind == 0:  # bytes that are not JSON
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            if body.strip().startswith((b"{", b"[")):
                body = b"!" + body
            yield "POST", "/v1/chat/completions", body, auth, 400
        elif kind == 1:  # JSON cut short
            text = json.dumps(good_chat)
            yield "POST", "/v1/chat/completions", text[: rng.randrange(1, len(text) - 1)].encode(), auth, 400
        elif kind == 2:  # a field of the wrong type or out of range
            field, value = rng.choice(fields), rng.choice(bad_values)
            body = chat_with(field, value)
            try:  # skip the few values that are valid for the field
                from compute.serve.schemas import parse_chat

                parse_chat(json.dumps(body).encode())
                continue
            except Exception:
                pass
            status = 404 if field == "model" and isinstance(value, str) else 400
            yield "POST", "/v1/chat/completions", json.dumps(body).encode(), auth, status
        elif kind == 3:  # a field missing, or not an object at all
            body = dict(good_chat)
            body.pop(rng.choice(["model", "messages"]))
            payload = rng.choice([json.dumps(body), "[]", "null", "42", '"text"'])
            yield "POST", "/v1/chat/completions", payload.encode(), auth, 400
        elif kind == 4:  # a bad message
            message = rng.choice([{"role": "user"}, {"content": "x"}, {"role": "user", "content": 5},
                                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                  "hello", None])  # fmt: skip
            yield "POST", "/v1/chat/completions", json.dumps({**good_chat, "messages": [message]}).encode(), auth, 400
        elif kind == 5:  # a bad completion
            prompt = rng.choice([[], [[1, 2], [3]], ["a", "b"], [-1], [1.5], {"p": 1}, None, 10**6])
            yield "POST", "/v1/completions", json.dumps({**good_completion, "prompt": prompt}).encode(), auth, 400
        elif kind == 6:  # no key, or a wrong one
            headers = rng.choice([{}, {"authorization": "Bearer nope"}, {"authorization": API_KEY}])
            yield "POST", "/v1/chat/completions", json.dumps(good_chat).encode(), headers, 401
        elif kind == 7:  # a path that does not exist, or the wrong method
            yield rng.choice([("GET", "/v1/chat/completions", b"", auth, 405),
                              ("POST", "/v1/nothing", b"{}", auth, 404),
                              ("DELETE", "/v1/models", b"", auth, 405)])  # fmt: skip
        else:  # unsupported options
            field, value = rng.choice([("n", 3), ("presence_penalty", 0.5), ("tools", [{"type": "function"}]),
                                       ("logit_bias", {"5": 1})])  # fmt: skip
            yield "POST", "/v1/chat/completions", json.dumps(chat_with(field, value)).encode(), auth, 400


def test_1000_malformed_requests_then_the_server_still_answers(server, client):
    rng = random.Random()
    requests = malformed_requests(rng)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(1000):
            method, path, body, headers, status = next(requests)
            response = http.request(method, path, content=body, headers=headers)
            assert response.status_code == status, (method, path, body[:200], response.text)
            error = response.json()["error"]
            assert error["message"] and set(error) == {"message", "type", "param", "code"}
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.usage.completion_tokens >= 1
    assert health(server)["status"] == "ok"


def test_full_queue_is_429_and_disconnected_clients_free_their_sequences(server, client):
    messages = [{"role": "user", "content": random_prompt()}]

    def open_stream():
        return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=1000,
                                              stream=True)  # fmt: skip

    before = health(server)["tokens_generated"]
    running = open_stream()
    first = next(iter(running))  # the role chunk; then wait for a token: the request runs
    assert first.choices[0].delta.role == "assistant"
    next(iter(running))
    waiting = open_stream()
    state = wait_health(server, lambda s: s["waiting"] == 1)
    assert (state["running"], state["waiting"]) == (1, 1), state
    assert state["kv_free_tokens"] < CONTEXT
    with pytest.raises(openai.RateLimitError) as full:  # --max-waiting 1
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert full.value.status_code == 429 and full.value.body["type"] == "rate_limit_error"

    running.close()  # the client goes away mid-stream: its sequence is freed, the waiting one starts
    state = wait_health(server, lambda s: s["waiting"] == 0)
    assert (state["running"], state["waiting"]) == (1, 0), state
    waiting.close()
    state = wait_health(server, lambda s: s["running"] == 0)
    assert (state["running"], state["waiting"]) == (0, 0), state
    generated = state["tokens_generated"]
    time.sleep(0.5)
    assert health(server)["tokens_generated"] == generated  # nothing runs for the clients that left
    assert generated - before < 2000  # both were cut short
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_client_that_gives_up_on_a_whole_reply_frees_its_sequence(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": random_prompt()}], "temperature": 0,
            "max_tokens": 1000}  # fmt: skip
    headers = {"authorization": f"Bearer {API_KEY}"}
    before = health(server)["tokens_generated"]
    with pytest.raises(httpx.ReadTimeout):  # a 1000-token reply takes seconds; the client leaves after 0.5 s
        httpx.post(server.base_url + "/chat/completions", json=body, headers=headers, timeout=0.5)
    state = wait_health(server, lambda s: s["running"] == 0, timeout_s=5)
    assert state["running"] == 0, state
    generated = state["tokens_generated"]
    time.sleep(0.5)
    assert health(server)["tokens_generated"] == generated
    assert generated - before < 1000  # cut short: the reply would have run to max_tokens


@pytest.mark.parametrize(
    "extra, drafter",
    [(["--speculate", "ngram"], "ngram"), (["--draft-model", "TINY", "--draft-tokens", "6"], "draft-model")],
)
def test_speculative_servers_answer_as_the_plain_one_and_report_it_in_health(client, tiny_q, tmp_path, extra, drafter):
    """The tiny model drafts for itself (same tokenizer); the budget holds it twice."""
    extra = [str(tiny_q) if arg == "TINY" else arg for arg in extra]
    messages = [{"role": "user", "content": "write a poem about the sea, the sea, the sea"}]
    fresh(client)
    expected = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    args = serve_args(tiny_q, *extra, "--gpu-memory", SPECULATE_BUDGET)  # no --max-batch: 1 with a drafter
    with ServerProcess(args, log_path=tmp_path / "log") as server:
        assert f"max batch 1, context {CONTEXT} tokens, speculative decoding ({drafter})" in server.log()
        state = health(server)
        assert state["max_batch"] == 1 and state["speculation"]["drafter"] == drafter
        assert state["speculation"]["target_passes"] == 0
        speculating = server.client()
        reply = speculating.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
        assert reply.choices[0].message == expected.choices[0].message
        assert reply.usage == expected.usage
        stats = health(server)["speculation"]
        assert stats["emitted_tokens"] == reply.usage.completion_tokens - 1  # the first token comes from the prefill
        assert stats["target_passes"] >= 1
        assert stats["tokens_per_pass"] == stats["emitted_tokens"] / stats["target_passes"]
        if drafter == "draft-model":
            assert stats["tokens_per_pass"] > 1  # the target drafting for itself: its drafts are accepted
        assert 0 < stats["draft_time_share"] < 1 and stats["drafted_tokens"] >= stats["accepted_tokens"]
        again = speculating.completions.create(model=MODEL, prompt="the sea", temperature=0, max_tokens=5)
        total = health(server)["speculation"]  # summed over the replies
        assert total["emitted_tokens"] == stats["emitted_tokens"] + again.usage.completion_tokens - 1
    assert "Traceback" not in server.log()


def test_a_batch_with_speculative_decoding_is_refused_in_one_line(tiny_q):
    for extra, named in [(["--draft-model", str(tiny_q)], "--draft-model"), (["--speculate", "ngram"], "--speculate")]:
        result = subprocess.run(
            [sys.executable, "-m", "compute.cli", "serve", *serve_args(tiny_q, "--max-batch", "4", *extra)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            f"Error: speculative decoding ({named}{' ngram' if named == '--speculate' else ''}) serves one "
            "conversation at a time: drop --max-batch or pass --max-batch 1"
        )
    both = subprocess.run(
        [sys.executable, "-m", "compute.cli", "serve", *serve_args(tiny_q, "--speculate", "ngram", "--draft-model",
                                                                  str(tiny_q))],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert both.returncode == 2 and "choose one" in both.stderr and "Traceback" not in both.stderr


def test_a_pass_token_cap_the_batch_cannot_use_is_refused_in_one_line(tiny_q):
    for extra, last_line in [
        (["--max-batch", "4", "--max-pass-tokens", "4"], "Error: Invalid value for --max-pass-tokens: 4 is not more "
         "than the max batch (4): a pass carries a row for each running request, and new prompts are fed from what is "
         "left"),
        (["--max-batch", "1", "--max-pass-tokens", "64"], "Error: --max-pass-tokens sets how batched passes share "
         "their tokens: it needs --max-batch above 1"),
    ]:  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "compute.cli", "serve", *serve_args(tiny_q, *extra)],
                                capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == last_line


def test_a_port_in_use_is_one_line_before_anything_starts(server, tiny_q):
    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "compute.cli", "serve", *serve_args(tiny_q), "--port", port],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_sigterm_ends_open_streams_cleanly_and_stops_the_loader(tiny_q, tmp_path):
    grace = 1.0  # the long replies (1000 tokens) take several seconds, the short one (2 tokens) far less
    args = serve_args(tiny_q, "--max-batch", "4", "--max-pass-tokens", "24", "--shutdown-grace", str(grace))
    with ServerProcess(args, log_path=tmp_path / "log") as server:
        assert health(server)["pass_tokens"] == 24
        client = server.client()
        random.seed(1)  # a prompt whose greedy reply runs past the grace without an EOS (some random ones end early)
        messages = [{"role": "user", "content": random_prompt()}]
        # two replies too long for the grace, one short enough to finish in it
        streams = [
            client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=n, stream=True)
            for n in (1000, 1000, 2)
        ]
        iterators = [iter(s) for s in streams]
        read = [[next(i)] for i in iterators]  # every one answered
        read[0].append(next(iterators[0]))  # and generating
        read[2].append(next(iterators[2]))
        loader = psutil.Process(server.loader_pid())
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connection is accepted
            httpx.get(server.url + "/health", timeout=5)
        finishes = []
        for chunk_iterator, chunks in zip(iterators, read):
            chunks += list(chunk_iterator)  # ends without an exception: [DONE] came
            finishes.append(chunks[-1].choices[0].finish_reason)
        assert finishes[:2] == ["abort", "abort"] and finishes[2] in ("length", "stop")
        assert time.monotonic() - signalled >= grace - 0.5  # the long ones ran on for the grace
        assert server.process.wait(60) == 0, server.log()[-3000:]
        loader.wait(20)  # stopped with the server
    assert "Traceback" not in server.log()


def test_loader_killed_mid_stream_fails_every_request_and_the_server_exits(tiny_q, tmp_path):
    with ServerProcess(serve_args(tiny_q, "--max-batch", "1"), log_path=tmp_path / "log") as server:
        client = server.client()
        messages = [{"role": "user", "content": random_prompt()}]
        stream = iter(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=1000,
                                                     stream=True))  # fmt: skip
        next(stream), next(stream)
        queued: list[BaseException] = []

        def wait_in_queue():
            try:
                client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1000)
            except openai.APIStatusError as e:
                queued.append(e)

        thread = threading.Thread(target=wait_in_queue)
        thread.start()
        wait_health(server, lambda s: s["waiting"] == 1)
        os.kill(server.loader_pid(), signal.SIGKILL)
        with pytest.raises(openai.APIError) as streamed:
            for _ in stream:
                pass
        assert "loader" in str(streamed.value)
        thread.join(30)
        assert len(queued) == 1 and queued[0].status_code == 503, queued
        assert "loader" in queued[0].body["message"]
        code = server.process.wait(30)
    log = server.log()
    assert code == 1, log[-3000:]
    assert "loader" in log.splitlines()[-1] and "Traceback" not in log


def test_run_sh_serve_launches_both_processes_and_stops_on_sigterm(tiny_q, tmp_path):
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    log_path = tmp_path / "run_sh.log"
    with open(log_path, "wb") as log:
        run_sh = subprocess.Popen(
            [str(RUN_SH), "serve", "--model", str(tiny_q), "--device", "cpu", "--gpu-memory", SERVE_BUDGET,
             "--port", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (found := READY_PATTERN.search(log_path.read_text(errors="replace"))):
            assert run_sh.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        client = openai.OpenAI(base_url=found.group(1) + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == [str(tiny_q)]  # named as the user named it
        reply = client.chat.completions.create(model=str(tiny_q), messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3)  # fmt: skip
        assert reply.usage.completion_tokens >= 1
        processes = psutil.Process(run_sh.pid).children(recursive=True)
        run_sh.send_signal(signal.SIGTERM)
        assert run_sh.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        if run_sh.poll() is None:
            os.killpg(run_sh.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(processes, timeout=20)
    assert not alive
    assert not list(tmp_path.glob("spillover-*"))
