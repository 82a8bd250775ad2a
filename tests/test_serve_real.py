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

from bench.batch_equality import PROMPTS  # the same eight prompts the engine-level check uses
from conftest import ServerProcess

pytestmark = pytest.mark.real

MAX_TOKENS = 6  # the 0.5B decodes about 1 token/s on a 2-core CPU: 16 replies of 6 tokens take minutes


@pytest.fixture(scope="module")
def qwen05b_server(qwen_05b_cache, tmp_path_factory):
    _cache, model_dir = qwen_05b_cache  # the GGUF imported into spillover-int4 once
    args = ["--model", str(model_dir), "--device", "cpu", "--max-context", "512", "--max-batch", "8",
            "--served-model-name", "qwen"]  # fmt: skip
    log = tmp_path_factory.mktemp("serve_real") / "server.log"
    with ServerProcess(args, log_path=log, timeout_s=600) as server:
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


def test_deepseek_r1_reasoning_goes_to_reasoning_content(deepseek_r1_tokenizer):
    from transformers import AutoTokenizer

    from compute.serve.text import ReplyText, prompt_opens_reasoning, thinks

    tokenizer = AutoTokenizer.from_pretrained(deepseek_r1_tokenizer)
    assert thinks(tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]  # fmt: skip
    # This file's template ends the prompt at "<｜Assistant｜>" and the model opens "<think>" itself; later
    # templates put "<think>\n" in the generation prompt. Both go the same way.
    assert not prompt_opens_reasoning(tokenizer, list(prompt))
    opened = list(prompt) + tokenizer("<think>\n", add_special_tokens=False)["input_ids"]
    assert prompt_opens_reasoning(tokenizer, opened)
    thought, answer = "Two plus two: 4. Café ✓\n", "\n\nThe answer is **4**."
    for prompt_ids, reply in [(prompt, f"<think>\n{thought}</think>{answer}"), (opened, f"{thought}</think>{answer}")]:
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokenizer.convert_tokens_to_ids("</think>") in ids  # one token in R1's vocabulary
        text = ReplyText(tokenizer, reasoning=prompt_opens_reasoning(tokenizer, list(prompt_ids)))
        deltas = [text.add(i) for i in ids] + [text.finish()]
        assert "".join(d.reasoning for d in deltas).lstrip("\n") == thought
        assert "".join(d.content for d in deltas) == answer  # EOS not shown
