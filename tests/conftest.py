"""Shared test fixtures: tiny random Qwen2 checkpoints, as Hugging Face directories and quantized.

``make_tiny_qwen2`` writes a real bf16 HF checkpoint with transformers itself (several safetensors shards and an
index, ``generation_config.json`` with EOS ids, rope theta 1e6, a DeepSeek-R1-style tokenizer whose vocabulary is
smaller than the model's, as in real Qwen checkpoints). Every parameter is random, norms and biases included, so
that a test comparing against stock transformers cannot pass by accident. The session fixtures build each
checkpoint once per test run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_HIDDEN = 128
TINY_INTERMEDIATE = 256
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_MAX_POSITIONS = 1024
BOS_ID, EOS_ID = 0, 1  # the tokenizer's first two special tokens (quantizer/tokenizer.py)


def make_tiny_qwen2(
    path: str | Path,
    *,
    tied: bool = False,
    num_layers: int = 2,
    vocab_size: int = 320,
    tokenizer_vocab: int = 300,
    shards: int = 2,
    seed: int = 0,
    hidden_size: int = TINY_HIDDEN,
    intermediate_size: int = TINY_INTERMEDIATE,
) -> Path:
    """Write a random bf16 Qwen2 checkpoint (hidden 128, intermediate 256, 4 heads of 32, 2 KV heads) to ``path``."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from quantizer.tokenizer import build_tokenizer

    path = Path(path)
    config = Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        num_hidden_layers=num_layers,
        vocab_size=vocab_size,
        max_position_embeddings=TINY_MAX_POSITIONS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=tied,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype="bfloat16",
    )
    generator = torch.Generator().manual_seed(seed)
    # Built on the meta device and materialized uninitialized: transformers' own init would be thrown away anyway.
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * values if name.endswith("norm.weight") else 0.05 * values)
    model.tie_weights()  # to_empty gave the tied lm_head a storage of its own
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # save_pretrained never splits a tensor, so the shard size is a little above an even split.
    model.save_pretrained(str(path), max_shard_size=total_bytes // shards + 1)
    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID], pad_token_id=EOS_ID, do_sample=True, temperature=0.6, top_p=0.95
    ).save_pretrained(str(path))
    build_tokenizer(path, tokenizer_vocab)
    return path


def shard_count(path: Path) -> int:
    index = path / "model.safetensors.index.json"
    return len(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else 1


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """An untied tiny Qwen2 HF checkpoint in three shards."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_hf") / "model", tied=False, shards=3, seed=1)


@pytest.fixture(scope="session")
def tiny_hf_tied(tmp_path_factory) -> Path:
    """A tied (no lm_head.weight) tiny Qwen2 HF checkpoint in two shards."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_hf_tied") / "model", tied=True, shards=2, seed=2)


@pytest.fixture(scope="session")
def tiny_q(tiny_hf, tmp_path_factory) -> Path:
    """``tiny_hf`` quantized, in several small output shards."""
    from quantizer.quantize import quantize_checkpoint

    return quantize_checkpoint(
        tiny_hf, tmp_path_factory.mktemp("tiny_q") / "model", device="cpu", shard_bytes=150_000, progress=False
    )


@pytest.fixture(scope="session")
def tiny_q_tied(tiny_hf_tied, tmp_path_factory) -> Path:
    """``tiny_hf_tied`` quantized, in several small output shards."""
    from quantizer.quantize import quantize_checkpoint

    return quantize_checkpoint(
        tiny_hf_tied, tmp_path_factory.mktemp("tiny_q_tied") / "model", device="cpu", shard_bytes=150_000,
        progress=False,
    )
