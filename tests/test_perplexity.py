"""``spillover perplexity`` through both real processes, against a perplexity computed with stock transformers
holding the same dequantized weights; streamed units give the resident figure exactly."""

from __future__ import annotations

import json
import math
import random
import subprocess

import torch
from transformers import AutoTokenizer

from test_cli import spillover, spillover_env
from test_model import reference_model

CONTEXT = 24

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jolly frogs in the night".split()


def random_text(words: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(words)) + "\n"


def run_perplexity(model, text_file, out, *extra: str, env) -> dict:
    result = subprocess.run(
        spillover("perplexity", "--model", str(model), "--text", str(text_file), "--context", str(CONTEXT),
                  "--device", "cpu", "--json", str(out), *extra),
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("perplexity ")
    return json.loads(out.read_text())


def reference_perplexity(model, ids: list[int]) -> tuple[float, list[int]]:
    """The method, written again with stock transformers: non-overlapping windows, each token after a window's
    first scored from an empty cache."""
    nll, top1 = 0.0, []
    with torch.inference_mode():
        for begin in range(0, len(ids), CONTEXT):
            window = ids[begin : begin + CONTEXT]
            if len(window) < 2:
                continue
            logits = model(torch.tensor([window])).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
            top1 += logits.argmax(-1).tolist()
    return math.exp(nll / len(top1)), top1


def test_perplexity_follows_stock_transformers_and_streaming_changes_nothing(tiny_q, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(random_text(60))
    env = spillover_env(tmp_path / "cache")
    resident = run_perplexity(tiny_q, text_file, tmp_path / "resident.json", "--policy", "resident", env=env)
    streamed = run_perplexity(tiny_q, text_file, tmp_path / "stream.json", "--policy", "stream", env=env)

    ids = AutoTokenizer.from_pretrained(tiny_q)(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert resident["text_tokens"] == len(ids) and resident["context"] == CONTEXT
    assert resident["windows"] == math.ceil(len(ids) / CONTEXT) - (len(ids) % CONTEXT == 1)
    expected, expected_top1 = reference_perplexity(reference_model(tiny_q, tmp_path / "reference"), ids)
    assert resident["scored"] == len(expected_top1)
    assert abs(resident["perplexity"] - expected) <= 0.01 * expected, (resident["perplexity"], expected)
    agree = sum(a == b for a, b in zip(resident["top1"], expected_top1)) / len(expected_top1)
    assert agree >= 0.95, agree
    # the ring holds the same packed bytes as the resident pool: the same numbers, bit for bit
    assert streamed["nll_sum"] == resident["nll_sum"] and streamed["top1"] == resident["top1"]


def test_perplexity_refuses_a_missing_or_too_short_text(tiny_q, tmp_path):
    env = spillover_env(tmp_path / "cache")
    short = tmp_path / "short.txt"
    short.write_text("a")
    for path, expected in ((tmp_path / "missing.txt", "cannot read --text"), (short, "at least 2")):
        result = subprocess.run(
            spillover("perplexity", "--model", str(tiny_q), "--text", str(path), "--device", "cpu"),
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
