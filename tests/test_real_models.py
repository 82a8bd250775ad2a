"""Real models end to end on CPU, through ``./run.sh`` (both processes): Qwen2.5-Coder-0.5B-Instruct from its
GGUF file (imported once per session, ``qwen_05b_cache``), and DeepSeek-R1's real tokenizer and chat template on
a small random-weight model. Replies are kept short: the CPU path is slow.

Fidelity rule (``test_greedy_reply_follows_transformers_under_every_policy``): stock transformers holding the
same dequantized INT4 weights, in float32, is fed the prompt and spillover's reply (teacher forcing). At least
``AGREEMENT`` of the reply's tokens must be the reference's argmax, and at every other step the reference must
rank spillover's token within ``NEAR_TIE`` (in logits) of its argmax: two bf16 ulps for logits in [16, 32)
(spillover computes in bf16). Every run is checked: the three policies must also give the same tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from compute.chat import DIM, RESET
from test_model import reference_model
from test_repl import Terminal
from test_run_sh import RUN_SH, run_sh_env

pytestmark = pytest.mark.real

PROMPT = "Write a Python function that checks whether a number is prime."
NEW_TOKENS = 20
MAX_CONTEXT = "512"
# Planned for --max-context 512 (the planner's table): every unit resident; all streamed; 9 of 25 resident.
BUDGETS = {"resident": "1GiB", "stream": "800MiB", "hybrid": "700MiB"}
AGREEMENT = 0.98
NEAR_TIE = 0.25


def run_sh(cache: Path, model: Path | str, *args: str, timeout: float = 900) -> dict:
    """``./run.sh --model MODEL --device cpu ... --output-format json``: the reply object; the run must reuse the
    model cache's import and leave nothing behind."""
    command = [str(RUN_SH), "--model", str(model), "--device", "cpu", "--max-context", MAX_CONTEXT, *args,
               "--output-format", "json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=run_sh_env(cache), timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quantizing" not in result.stderr  # the session's one import was reused
    return json.loads(result.stdout) | {"stderr": result.stderr}


@pytest.fixture(scope="module")
def reference(qwen_05b_cache, tmp_path_factory):
    """Stock transformers Qwen2 holding the imported model's dequantized INT4 weights, in float32."""
    _, imported = qwen_05b_cache
    return reference_model(imported, tmp_path_factory.mktemp("reference_05b")).float()


def test_greedy_reply_follows_transformers_under_every_policy(qwen_05b_gguf, qwen_05b_cache, reference):
    cache, imported = qwen_05b_cache
    tokenizer = AutoTokenizer.from_pretrained(imported)
    chat = [{"role": "user", "content": PROMPT}]
    expected_prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]  # fmt: skip
    replies = {}
    for policy, budget in BUDGETS.items():
        reply = run_sh(cache, qwen_05b_gguf, "--policy", policy, "--gpu-memory", budget, "-p", PROMPT,
                       "--temperature", "0", "-n", str(NEW_TOKENS))  # fmt: skip
        stats = reply["stats"]
        assert stats["policy"] == policy
        assert (stats["streamed_bytes"] > 0) == (policy != "resident"), stats
        if policy == "hybrid":
            assert "resident: layers.0" in reply["stderr"] and "streamed: layers." in reply["stderr"]
        assert reply["prompt_token_ids"] == expected_prompt  # the file's chat template, system prompt included
        replies[policy] = reply

        prompt, tokens = reply["prompt_token_ids"], reply["token_ids"]
        assert len(tokens) == NEW_TOKENS and reply["finish_reason"] == "length"
        with torch.inference_mode():
            logits = reference(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
        best = logits.argmax(dim=-1).tolist()
        agreeing = sum(b == t for b, t in zip(best, tokens))
        assert agreeing >= AGREEMENT * len(tokens), (policy, tokens, best)
        for step, (b, t) in enumerate(zip(best, tokens)):
            gap = float(logits[step, b] - logits[step, t])
            assert gap < NEAR_TIE, f"{policy}, step {step}: chose {t}, transformers' argmax {b} is {gap:.3f} ahead"
    # Where the weights live never changes the math.
    assert replies["stream"]["token_ids"] == replies["hybrid"]["token_ids"] == replies["resident"]["token_ids"]
    # A coherent answer: an import that got the weights wrong (Q/K rows permuted, say) writes no code.
    assert "def " in replies["resident"]["text"], replies["resident"]["text"]


def test_raw_prompt_is_tokenized_as_it_is(qwen_05b_gguf, qwen_05b_cache):
    cache, imported = qwen_05b_cache
    tokenizer = AutoTokenizer.from_pretrained(imported)
    text = "def fibonacci(n):"
    reply = run_sh(cache, qwen_05b_gguf, "--raw", "-p", text, "--temperature", "0", "-n", "3")
    assert reply["prompt_token_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(reply["token_ids"]) == 3


def test_im_end_ends_the_reply(qwen_05b_gguf, qwen_05b_cache):
    cache, imported = qwen_05b_cache
    im_end = AutoTokenizer.from_pretrained(imported).convert_tokens_to_ids("<|im_end|>")
    reply = run_sh(cache, qwen_05b_gguf, "-p", "What is 2+3? Reply with only the number.", "--temperature", "0",
                   "-n", "24")  # fmt: skip
    assert reply["finish_reason"] == "eos" and reply["token_ids"][-1] == im_end, reply
    assert "5" in reply["text"] and "<|im_end|>" not in reply["text"]


def chat_on_a_terminal(argv: list[str], env: dict[str, str], turns: list[str]) -> list[str]:
    """Each turn typed into the REPL on a pseudo-terminal; what the terminal showed for each, up to the next
    prompt. Ends with /exit and checks the exit status."""
    terminal = Terminal(argv, env)
    shown = []
    try:
        terminal.expect(">>> ", timeout=300)
        for turn in turns:
            terminal.send(turn + "\r")
            shown.append(terminal.expect(">>> ", timeout=300))
        terminal.send("/exit\r")
        assert terminal.wait(timeout=60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(terminal.pid, signal.SIGKILL)
            os.waitpid(terminal.pid, 0)
        os.close(terminal.fd)
    return shown


def test_multi_turn_chat_on_a_terminal(qwen_05b_gguf, qwen_05b_cache):
    cache, _ = qwen_05b_cache
    limit = 24
    argv = [str(RUN_SH), "--model", str(qwen_05b_gguf), "--device", "cpu", "--gpu-memory", "1GiB",
            "--temperature", "0", "-n", str(limit), "--max-context", MAX_CONTEXT]  # fmt: skip
    first, second = chat_on_a_terminal(
        argv, {**run_sh_env(cache), "TERM": "dumb"},
        ["My name is Ada. Greet me in one short sentence.", "What is my name? Answer in one word."],
    )
    for shown in (first, second):
        decoded = re.search(r"decode (\d+) tok", shown)
        assert decoded and int(decoded.group(1)) < limit, shown  # <|im_end|> ended the reply, not -n
        assert "<|im_end|>" not in shown and "<|im_start|>" not in shown
    assert "Ada" in second.split("\n", 1)[1]  # the second turn saw the first (the echo of the question aside)


# DeepSeek-R1's tokenizer on a random model whose replies are planted: with every layer's o_proj and down_proj
# zero, the residual stream is the last token's embedding, so lm_head alone picks the next token from the last
# one; lm_head's row for b is made to point along a's embedding for each planted step a -> b.
REASONING_CHAIN = ["<｜Assistant｜>", "<think>", "\n", "Let", " me", " think", "</think>", "\n\n", "The", " answer",
                   ".", "<｜end▁of▁sentence｜>"]  # fmt: skip


@pytest.fixture(scope="module")
def reasoning_model(deepseek_r1_tokenizer, tmp_path_factory) -> Path:
    """A 1-layer random Qwen2 (hidden 128) with DeepSeek-R1's tokenizer and template, quantized, whose greedy reply
    to any chat turn is REASONING_CHAIN."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from quantizer.quantize import quantize_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(deepseek_r1_tokenizer)
    chain = [tokenizer.convert_tokens_to_ids(t) if t.startswith("<") else
             tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in REASONING_CHAIN]  # fmt: skip
    assert len(set(chain)) == len(chain) and all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1
                                                 for t in REASONING_CHAIN)  # fmt: skip
    config = Qwen2Config(
        architectures=["Qwen2ForCausalLM"], hidden_size=128, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=1, vocab_size=152064, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dtype="bfloat16",
    )  # fmt: skip
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if name.endswith("norm.weight") else 0.05 * torch.randn(param.shape))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed[chain] = torch.randn(len(chain), config.hidden_size, dtype=embed.dtype)
        lm_head = model.lm_head.weight
        lm_head.mul_(0.4)
        for a, b in zip(chain, chain[1:]):
            lm_head[b] = embed[a] / embed[a].float().norm()
    work = tmp_path_factory.mktemp("reasoning")
    model.save_pretrained(work / "hf")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id]).save_pretrained(
        work / "hf"
    )
    tokenizer.save_pretrained(work / "hf")
    return quantize_checkpoint(work / "hf", work / "q", device="cpu", progress=False)


def test_reasoning_is_shown_dimmed_and_the_answer_plain_with_deepseek_r1_tokens(reasoning_model, tmp_path):
    reply = run_sh(tmp_path, reasoning_model, "-p", "Why?", "--temperature", "0", "-n", "32")
    tokenizer = AutoTokenizer.from_pretrained(reasoning_model)
    assert tokenizer.convert_ids_to_tokens(reply["prompt_token_ids"][-1:]) == ["<｜Assistant｜>"]
    assert reply["token_ids"] == tokenizer.convert_tokens_to_ids(
        [tokenizer.convert_ids_to_tokens(tokenizer(t, add_special_tokens=False)["input_ids"])[0]
         for t in REASONING_CHAIN[1:]])  # fmt: skip
    assert reply["finish_reason"] == "eos" and reply["text"] == "<think>\nLet me think</think>\n\nThe answer."

    argv = [str(RUN_SH), "--model", str(reasoning_model), "--device", "cpu", "--temperature", "0", "-n", "32",
            "--max-context", MAX_CONTEXT]  # fmt: skip
    shown = chat_on_a_terminal(argv, {**run_sh_env(tmp_path), "TERM": "xterm"}, ["Why?", "And then?"])
    for turn in shown:
        assert re.search(re.escape(DIM) + r"\s*Let me think" + re.escape(RESET) + r"\s*The answer\.", turn), turn
        assert "think>" not in turn and "end▁of▁sentence" not in turn
