"""``spillover bench --concurrency … --http``: the same levels measured by an HTTP client against ``spillover serve``.

``run_http_concurrency`` starts the real server (``python -m compute.cli serve --model DIR --gpu-memory B
--max-batch N [--kv-tokens K] --port 0``, which starts its loader) and, for each concurrency level N, opens N
streamed ``POST /v1/completions`` requests at once from one asyncio client (httpx): random token-id prompts of
``prompt_tokens`` (no special tokens), ``temperature`` 0, ``max_tokens`` ``new_tokens``,
``stream_options.include_usage``. Per request it records the arrival time of every SSE chunk that carries text
and the completion tokens of the final ``usage`` (and the scheduler's pass count from ``GET /health`` before and
after the level):

* time to first token: request sent -> first chunk with text (what a chat UI shows);
* inter-token latency: gaps between a request's chunks (the server sends a chunk per token unless a token's text
  is incomplete, a partial UTF-8 sequence, which merges two gaps into one);
* aggregate decode tokens/s: completion tokens after each request's first, over first first chunk -> last chunk.

The server's and its loader's peak device memory are sampled by NVML (``compute.usage.PeakMemorySampler``) for
the whole run. The model has random weights: a reply may end at EOS early; every figure uses the tokens the
server reported. Warm-up requests (1, 2, 4, … ``max_batch`` at once, a few tokens) run before the timed levels.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path

from bench.concurrency import ConcurrencyResult, LevelResult
from bench.serve_process import ServeProcess

MODEL_NAME = "bench"


async def _stream(client, url: str, prompt: list[int], new_tokens: int) -> tuple[float, list[float], int]:
    """One streamed completion: (sent at, arrival time of each chunk with text, completion tokens from usage)."""
    body = {
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    arrivals: list[float] = []
    completion = 0
    sent = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
            if any(choice.get("text") for choice in chunk.get("choices", ())):
                arrivals.append(time.perf_counter())
    return sent, arrivals, completion


async def _level(url: str, vocab: list[int], concurrency: int, prompt_tokens: int, new_tokens: int, rng) -> LevelResult:
    import httpx

    prompts = [[rng.choice(vocab) for _ in range(prompt_tokens)] for _ in range(concurrency)]
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        before = (await client.get(url + "/health")).json()
        started = time.perf_counter()
        streams = await asyncio.gather(*(_stream(client, url, p, new_tokens) for p in prompts))
        after = (await client.get(url + "/health")).json()
    # passes: the scheduler's count, from GET /health before and after
    return LevelResult.measure(streams, prompt_tokens=prompt_tokens, new_tokens=new_tokens, started=started,
                               passes=after["passes"] - before["passes"],
                               passes_ahead=after["passes_ahead"] - before["passes_ahead"])  # fmt: skip


def run_http_concurrency(
    model_dir: Path, budget: str, *, levels: list[int], policy: str = "hybrid", max_batch: int = 16,
    kv_tokens: int | None = None, max_context: int = 4096, prompt_tokens: int = 128, new_tokens: int = 128,
    device: str = "cuda", seed: int = 0, max_pass_tokens: int | None = None,
) -> ConcurrencyResult:  # fmt: skip
    """Every level against one ``spillover serve``; see the module docstring."""
    from compute.usage import PeakMemorySampler
    from protocol.sizes import parse_size

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]  # ids the server takes as plain prompt tokens
    args = [
        "--model", str(model_dir), "--gpu-memory", budget, "--policy", policy, "--device", device,
        "--max-context", str(max_context), "--max-batch", str(max_batch), "--max-waiting", str(max(levels) + max_batch),
        *(["--kv-tokens", str(kv_tokens)] if kv_tokens is not None else []),  # else the server's default pool
        *(["--max-pass-tokens", str(max_pass_tokens)] if max_pass_tokens is not None else []),
    ]  # fmt: skip
    rng = random.Random(seed)
    with ServeProcess([*args, "--served-model-name", MODEL_NAME]) as server:
        for n in sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch} | {max_batch}):
            asyncio.run(_level(server.url, vocab, n, prompt_tokens, 3, rng))  # warm-up: every bucket once
        pids = {"compute": server.process.pid, "loader": server.loader_pid() or os.getpid()}
        with PeakMemorySampler(pids, device=device) as memory:
            results = [asyncio.run(_level(server.url, vocab, n, prompt_tokens, new_tokens, rng)) for n in levels]
        health = _get_json(server.url + "/health")
    return ConcurrencyResult(
        budget=budget,
        budget_bytes=parse_size(budget),
        policy=policy,
        resident_units=-1,  # not reported over HTTP
        streamed_units=-1,
        max_batch=max_batch,
        kv_tokens=int(health["kv_total_tokens"]) if isinstance(health, dict) and "kv_total_tokens" in health else -1,
        pass_tokens=health.get("pass_tokens", -1) if isinstance(health, dict) else -1,
        device=device,
        decode_mode="http",
        levels=results,
        peak_device_bytes=memory.report()["peak_device_memory_bytes"],
    )


def _get_json(url: str) -> object:
    import httpx

    try:
        return httpx.get(url, timeout=30).json()
    except (httpx.HTTPError, ValueError):
        return None
