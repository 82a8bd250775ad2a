"""``spillover serve`` on the real Qwen2.5-Coder-0.5B-Instruct (its Q4_K_M GGUF, assembled from PyPI by
``tests/real_models.py``, imported into spillover's INT4 format once): 8 concurrent streamed greedy requests
reply exactly what the same requests reply one at a time. A random model's flat logits would turn the kernels'
numerical noise into different tokens; a real model's greedy choices are stable to it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ServerProcess

pytestmark = pytest.mark.real

MAX_TOKENS = 6  # the 0.5B decodes about 1 token/s on a 2-core CPU: 16 replies of 6 tokens take minutes
PROMPTS = [
    "Write a Python function that reverses a string.",
    "What does HTTP status 404 mean?",
    "Name three sorting algorithms.",
    "How do I open a file in C?",
    "Explain a Python list comprehension.",
    "What is a mutex?",
    "Write SQL that counts the rows of a table.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def qwen05b_server(tmp_path_factory):
    real_models = pytest.importorskip("real_models", reason="tests/real_models.py fetches the real GGUF files")
    gguf = real_models.assemble(real_models.QWEN_05B)
    cache = real_models.test_cache_dir() / "spillover"  # the imported model is kept there between sessions
    args = ["--model", str(gguf), "--cache-dir", str(cache), "--device", "cpu", "--max-context", "512",
            "--max-batch", "8", "--served-model-name", "qwen"]  # fmt: skip
    log = tmp_path_factory.mktemp("serve_real") / "server.log"
    with ServerProcess(args, log_path=log, timeout_s=1800) as server:
        yield server


def stream_reply(client, prompt: str) -> str:
    stream = client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_TOKENS, stream=True
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_8_concurrent_greedy_streams_equal_the_same_requests_one_at_a_time(qwen05b_server):
    client = qwen05b_server.client()
    started = time.perf_counter()
    alone = [stream_reply(client, prompt) for prompt in PROMPTS]
    alone_s = time.perf_counter() - started
    assert all(alone), alone

    in_flight: list[int] = []
    done = threading.Event()

    def watch() -> None:  # how many requests the server held at once
        while not done.is_set():
            state = httpx.get(qwen05b_server.url + "/health", timeout=10).json()
            in_flight.append(state["running"] + state["waiting"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda p: stream_reply(client, p), PROMPTS))
    finally:
        done.set()
        watcher.join()
    together_s = time.perf_counter() - started
    assert max(in_flight) == len(PROMPTS)  # all eight were in the server at once
    assert together == alone
    print(f"8 replies of {MAX_TOKENS} tokens: one at a time {alone_s:.1f} s, concurrently {together_s:.1f} s")
