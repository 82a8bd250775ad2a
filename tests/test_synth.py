"""``spillover synth``: random-weight models in the format, end to end, and the 32B preset's shapes and size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compute.cli import main as spillover
from conftest import bf16_bits_to_f32, numpy_dequantize, read_directory
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.format import QWEIGHT_SUFFIX, SCALES_SUFFIX, read_manifest
from quantizer.model_spec import describe_model
from quantizer.synth import PRESETS, preset_config, synthesize
from quantizer.writer import linear_group, plan_shards, planned_file_bytes


def run_cli(*args: str):
    return CliRunner().invoke(spillover, list(args))


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_synth_writes_a_verifiable_model_with_plausible_values(preset, tmp_path):
    dst = tmp_path / preset
    seed = int(torch.randint(0, 2**31, ()))
    result = run_cli("synth", str(dst), "--preset", preset, "--seed", str(seed), "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert run_cli("verify", str(dst)).exit_code == 0

    config = json.loads((dst / "config.json").read_text())
    chosen = PRESETS[preset]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        chosen.hidden_size, chosen.num_layers, chosen.vocab_size,
    )
    manifest = read_manifest(dst)
    assert manifest.source == f"synthetic:{preset}"
    assert [u.name for u in manifest.units] == [f"layers.{i}" for i in range(chosen.num_layers)] + ["lm_head"]

    tensors = read_directory(dst)
    for module in manifest.linears:
        weight = numpy_dequantize(tensors[module + ".qweight"][2], bf16_bits_to_f32(tensors[module + ".scales"][2]))
        assert np.isfinite(weight).all() and 0.015 < weight.std() < 0.025, module
    first, second = (tensors[f"model.layers.{i}.mlp.up_proj.qweight"][2] for i in (0, 1))
    assert not np.array_equal(first, second)  # every tensor gets bytes of its own
    embedding = bf16_bits_to_f32(tensors["model.embed_tokens.weight"][2])
    assert 0.015 < embedding.std() < 0.025
    assert (bf16_bits_to_f32(tensors["model.norm.weight"][2]) == 1).all()


def test_synthetic_model_runs_in_stock_transformers_with_finite_logits(tmp_path):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    dst = synthesize(tmp_path / "m", preset="tiny", layers=3, device="cpu", progress=False)
    checkpoint = QuantizedCheckpoint(dst)
    config = checkpoint.config
    assert config["num_hidden_layers"] == 3 and len(checkpoint.manifest.units) == 4

    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in config.items() if k != "model_type"}))
    state = {}
    for name in checkpoint.dense_tensor_names():
        state[name] = checkpoint.tensor(name).float()
    for module in checkpoint.manifest.linears:
        packed, scales = checkpoint.tensor(module + QWEIGHT_SUFFIX), checkpoint.tensor(module + SCALES_SUFFIX)
        state[module + ".weight"] = torch.from_numpy(numpy_dequantize(packed.numpy(), scales.float().numpy()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing

    tokenizer = AutoTokenizer.from_pretrained(dst)
    messages = [{"role": "user", "content": "Hello"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert max(ids) < config["vocab_size"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_synth_refuses_an_existing_destination_and_bad_layers(tmp_path):
    dst = tmp_path / "m"
    dst.mkdir()
    result = run_cli("synth", str(dst), "--preset", "tiny")
    assert result.exit_code == 1 and result.stderr.strip() == (
        f"Error: {dst} already exists: choose another destination or pass --overwrite"
    )
    assert run_cli("synth", str(tmp_path / "n"), "--preset", "tiny", "--layers", "0").exit_code == 2
    assert not (tmp_path / "n").exists()


def test_the_32b_preset_has_the_r1_distill_shapes_and_size():
    config = preset_config(PRESETS["qwen2-32b"], 64)
    expected = dict(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    assert {k: config[k] for k in expected} == expected
    assert config["rope_parameters"]["rope_theta"] == 1e6
    spec = describe_model(config)
    assert len(spec.units) == 65 and spec.units[-1].name == "lm_head"
    groups = [
        linear_group(p.name.removesuffix(".weight"), *p.shape)
        for p in spec.parameters
        if p.linear
    ]
    linear_bytes = planned_file_bytes(plan_shards(groups, 2 * 10**9))
    assert 16.3e9 < linear_bytes < 16.7e9  # the 32B model: ~16.5 GB with an INT4 lm_head


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_synth_on_cuda_writes_a_verifiable_model(tmp_path):
    dst = synthesize(tmp_path / "m", preset="demo", layers=2, device="cuda", progress=False)
    QuantizedCheckpoint(dst).verify()
    tensors = read_directory(dst)
    module = "model.layers.1.mlp.down_proj"
    weight = numpy_dequantize(tensors[module + ".qweight"][2], bf16_bits_to_f32(tensors[module + ".scales"][2]))
    assert 0.015 < weight.std() < 0.025
