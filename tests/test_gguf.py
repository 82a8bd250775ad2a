"""GGUF import (``quantizer.gguf_import``): the real Qwen2.5-Coder-0.5B file gives exactly the bytes of
quantizing transformers' own conversion of it, with its tokenizer and chat template; files it cannot import
(another architecture, a tensor type without a dequantizer, a truncated file, no ``gguf`` package) are refused
in one line, leaving nothing at the destination. Small GGUF files are written with ``gguf.GGUFWriter``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compute.cli import main
from compute.resolve import ModelResolveError, resolve_model
from quantizer import format as fmt
from quantizer.gguf_import import GGUF_MISSING, quantize_gguf
from quantizer.quantize import QuantizeError, quantize_checkpoint

gguf = pytest.importorskip("gguf")


def write_gguf(path: Path, architecture: str, tensors: dict[str, np.ndarray]) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_refused(src: Path, dst: Path, pattern: str) -> None:
    with pytest.raises(QuantizeError, match=pattern) as refused:
        quantize_checkpoint(src, dst, device="cpu", progress=False)
    assert "\n" not in str(refused.value)
    assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}.*")), list(dst.parent.iterdir())
    result = CliRunner().invoke(main, ["quantize", str(src), str(dst), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert not dst.exists()


def test_another_architecture_is_refused(tmp_path):
    rng = np.random.default_rng()
    src = write_gguf(tmp_path / "llama.gguf", "llama", {"token_embd.weight": rng.standard_normal((8, 32), np.float32)})
    assert_refused(src, tmp_path / "out", r"architecture 'llama'; only qwen2 is supported")


def test_a_tensor_type_without_a_dequantizer_is_refused(tmp_path):
    rng = np.random.default_rng()
    tensors = {"token_embd.weight": rng.standard_normal((8, 32), np.float32),
               "blk.0.attn_q.weight": rng.integers(0, 9, (32, 32), dtype=np.int32)}  # fmt: skip
    src = write_gguf(tmp_path / "int.gguf", "qwen2", tensors)
    assert_refused(src, tmp_path / "out", r"tensor blk\.0\.attn_q\.weight has type I32, which cannot be dequantized")


def test_a_truncated_file_is_refused(tmp_path):
    rng = np.random.default_rng()
    src = write_gguf(tmp_path / "cut.gguf", "qwen2", {"token_embd.weight": rng.standard_normal((64, 256), np.float32)})
    os.truncate(src, src.stat().st_size - int(rng.integers(1, 4096)))
    assert_refused(src, tmp_path / "out", r"cut\.gguf \(\d+ bytes\) is not a readable GGUF file: truncated")


def test_without_the_gguf_package_the_message_says_what_to_install(tmp_path, monkeypatch):
    src = write_gguf(tmp_path / "m.gguf", "qwen2", {"token_embd.weight": np.zeros((8, 32), np.float32)})
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(QuantizeError) as refused:
        quantize_gguf(src, tmp_path / "out", device="cpu", progress=False)
    assert str(refused.value) == GGUF_MISSING and "pip install 'spillover[gguf]'" in GGUF_MISSING


def test_model_option_refuses_a_file_that_is_not_gguf(tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(os.urandom(64))
    with pytest.raises(ModelResolveError, match="is a file but not a GGUF file"):
        resolve_model(str(other), cache_dir=tmp_path / "cache", device="cpu")


@pytest.mark.real
def test_import_is_transformers_conversion_quantized(qwen_05b_gguf, qwen_05b_cache):
    """Every tensor of the import equals transformers' own dequantization of the file (load_gguf_checkpoint, which
    applies its qwen2 tensor processing and name map) rounded to bf16, and each Linear is that quantized; the
    config, the chat template and the tokenizer are the file's."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cache, imported = qwen_05b_cache
    config = json.loads((imported / "config.json").read_text())
    with torch.device("meta"):
        meta = Qwen2ForCausalLM(Qwen2Config(**config))
    parsed = load_gguf_checkpoint(str(qwen_05b_gguf), return_tensors=True, model_to_load=meta,
                                  torch_dtype=torch.bfloat16)  # fmt: skip
    reference = parsed["tensors"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "rms_norm_eps", "tie_word_embeddings"):  # fmt: skip
        assert config[key] == parsed["config"][key], key
    assert config["rope_parameters"]["rope_theta"] == parsed["config"]["rope_theta"] == 1e6

    manifest = fmt.read_manifest(imported)
    files = {t.name: t.file for t in manifest.tensors}
    linears = {name.removesuffix(fmt.QWEIGHT_SUFFIX) for name in files if name.endswith(fmt.QWEIGHT_SUFFIX)}
    assert len(linears) == 24 * 7 + 1  # every layer's q/k/v/o/gate/up/down and the untied lm_head
    assert {m + ".weight" for m in linears} | {n for n in files if n in reference} == set(reference)
    for name, expected in reference.items():
        module = name.removesuffix(".weight")
        if module in linears:
            qweight, scales = fmt.quantize(expected)
            with safe_open(imported / files[module + fmt.QWEIGHT_SUFFIX], framework="pt") as f:
                assert torch.equal(f.get_tensor(module + fmt.QWEIGHT_SUFFIX), qweight), name
            with safe_open(imported / files[module + fmt.SCALES_SUFFIX], framework="pt") as f:
                assert torch.equal(f.get_tensor(module + fmt.SCALES_SUFFIX), scales), name
        else:
            with safe_open(imported / files[name], framework="pt") as f:
                assert torch.equal(f.get_tensor(name), expected), name

    ours = AutoTokenizer.from_pretrained(imported)
    theirs = AutoTokenizer.from_pretrained(str(qwen_05b_gguf.parent), gguf_file=qwen_05b_gguf.name)
    template = gguf.GGUFReader(qwen_05b_gguf).fields["tokenizer.chat_template"].contents()
    assert ours.chat_template == theirs.chat_template == template
    chat = [{"role": "user", "content": "Sort [3, 1, 2] in Python. 日本語?"}]
    ids = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]  # fmt: skip
    assert ours.convert_ids_to_tokens(ids[:1] + ids[-3:]) == ["<|im_start|>", "<|im_start|>", "assistant", "Ċ"]
    generation = json.loads((imported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ours.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.real
def test_deepseek_r1_gguf_tokenizer_keeps_its_special_tokens_whole(deepseek_r1_tokenizer):
    """transformers alone cuts <｜User｜> into pieces and appends EOS beyond the vocabulary; the import keeps every
    control token of the file whole, at the file's id."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(deepseek_r1_tokenizer)
    assert len(tokenizer) == 152064  # the file's vocabulary, nothing appended
    assert tokenizer.eos_token == "<｜end▁of▁sentence｜>" and tokenizer.eos_token_id == 151643
    assert tokenizer.bos_token_id == 151646
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids[:2] == [151646, 151644] and ids[-1] == 151645  # BOS <｜User｜> ... <｜Assistant｜>
    assert ids.count(151644) == 2 and 151643 in ids  # each turn; the assistant's turn ends with EOS
    think = tokenizer("<think>\nHm</think>", add_special_tokens=False)["input_ids"]
    assert think[0] == 151648 and think[-1] == 151649 and len(think) <= 5


def test_a_directory_holding_a_gguf_file_points_at_the_file(tiny_hf, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text((tiny_hf / "config.json").read_text())
    write_gguf(tmp_path / "model" / "m.gguf", "qwen2", {"token_embd.weight": np.zeros((8, 32), np.float32)})
    with pytest.raises(QuantizeError, match=r"pass the file itself, e\.g\. .*m\.gguf"):
        quantize_checkpoint(tmp_path / "model", tmp_path / "out", device="cpu", progress=False)
