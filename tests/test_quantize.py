"""``spillover quantize`` on tiny random Qwen2 checkpoints: output checked tensor by tensor, every bad input refused.

The output is read back with the hand-written numpy reader of conftest.py, not with quantizer/ itself, and the
expected codes come from conftest's numpy restatement of the format. Bad inputs go through the real click
command (in-process with ``CliRunner``, or as a subprocess where environment or memory matter).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compute.cli import main as spillover
from conftest import bf16_bits_to_f32, make_tiny_qwen2, numpy_quantize, read_directory, shard_count
from quantizer.checkpoint import QuantizedCheckpoint
from quantizer.format import MANIFEST_NAME, read_manifest
from quantizer.writer import PlannedTensor, ShardWriter, plan_shards

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def run_cli(*args: str):
    return CliRunner().invoke(spillover, list(args))


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit status 1, a single ``Error:`` line naming each fragment, and no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_written(parent: Path, dst: Path) -> None:
    assert not dst.exists()
    assert not [p.name for p in parent.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("fixture", ["tiny_q", "tiny_q_tied"])
def test_output_matches_an_independent_reading(fixture, request):
    quantized: Path = request.getfixturevalue(fixture)
    source_dir: Path = request.getfixturevalue(fixture.replace("_q", "_hf"))
    source = read_directory(source_dir)
    output = read_directory(quantized)
    config = json.loads((source_dir / "config.json").read_text())
    manifest = read_manifest(quantized)

    # Units: one per layer with its seven Linears in module order, then an untied lm_head.
    expected_units = [
        (f"layers.{i}", tuple(f"model.layers.{i}.{name}" for name in LAYER_LINEARS))
        for i in range(config["num_hidden_layers"])
    ]
    if not config["tie_word_embeddings"]:
        expected_units.append(("lm_head", ("lm_head",)))
    assert [(u.name, u.linears) for u in manifest.units] == expected_units
    linears = {module for _, modules in expected_units for module in modules}

    expected_names = set()
    for name, (dtype, shape, values) in source.items():
        module = name.removesuffix(".weight")
        if module in linears:
            packed, scales = numpy_quantize(bf16_bits_to_f32(values))
            assert output[module + ".qweight"][:2] == ("U8", (shape[0], shape[1] // 2))
            assert output[module + ".scales"][:2] == ("BF16", (shape[0], shape[1] // 128))
            np.testing.assert_array_equal(output[module + ".qweight"][2], packed)
            np.testing.assert_array_equal(bf16_bits_to_f32(output[module + ".scales"][2]), scales)
            expected_names |= {module + ".qweight", module + ".scales"}
        else:
            assert output[name][:2] == (dtype, shape)
            np.testing.assert_array_equal(output[name][2], values)
            expected_names.add(name)
    assert set(output) == expected_names
    assert ("lm_head.weight" in source) != config["tie_word_embeddings"]

    # The manifest describes the files exactly.
    assert {t.name for t in manifest.tensors} == expected_names
    for shard in manifest.shards:
        data = (quantized / shard.file).read_bytes()
        assert len(data) == shard.nbytes and hashlib.sha256(data).hexdigest() == shard.sha256
    assert len(manifest.shards) >= 2 and shard_count(source_dir) >= 2
    assert manifest.architecture == "Qwen2ForCausalLM" and manifest.source == str(source_dir.resolve())
    for name in COPIED:
        assert (quantized / name).read_bytes() == (source_dir / name).read_bytes()
    QuantizedCheckpoint(quantized).verify()


def test_reading_in_small_uneven_pieces_gives_the_same_bytes(tiny_hf, tiny_q, tmp_path, monkeypatch):
    from quantizer.quantize import quantize_checkpoint

    monkeypatch.setattr("quantizer.quantize.CHUNK_BYTES", 3000)  # 11 rows of 128 bf16: every tensor in pieces
    again = quantize_checkpoint(tiny_hf, tmp_path / "q", device="cpu", shard_bytes=150_000, progress=False)
    assert read_manifest(again).shards == read_manifest(tiny_q).shards  # same bytes, same sha256


def test_tiny_tokenizer_fits_the_model_and_has_the_r1_template(tiny_q):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_q)
    config = json.loads((tiny_q / "config.json").read_text())
    assert len(tokenizer) < config["vocab_size"]
    messages = [{"role": "user", "content": "hi"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert max(ids) < config["vocab_size"] and ids[0] == config["bos_token_id"]
    assert tokenizer.decode(ids).endswith("<｜User｜>hi<｜Assistant｜><think>\n")
    assert tokenizer.eos_token_id == config["eos_token_id"]


def test_single_file_checkpoint_and_overwrite(tmp_path):
    source = make_tiny_qwen2(tmp_path / "hf", shards=1, num_layers=1, seed=5)
    assert (source / "model.safetensors").is_file() and not (source / "model.safetensors.index.json").exists()
    dst = tmp_path / "q"
    result = run_cli("quantize", str(source), str(dst), "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert [u.name for u in read_manifest(dst).units] == ["layers.0", "lm_head"]
    assert run_cli("verify", str(dst)).exit_code == 0

    (dst / MANIFEST_NAME).write_text("stale")
    assert_one_line_error(run_cli("quantize", str(source), str(dst), "--no-progress"), str(dst), "--overwrite")
    result = run_cli("quantize", str(source), str(dst), "--overwrite", "--no-progress")
    assert result.exit_code == 0, result.output
    QuantizedCheckpoint(dst).verify()
    assert_nothing_written(tmp_path, tmp_path / "absent")


def _break_missing_shard(src: Path) -> tuple[str, ...]:
    (src / "model-00002-of-00004.safetensors").unlink()
    return "model-00002-of-00004.safetensors", "missing"


def _break_truncated_shard(src: Path) -> tuple[str, ...]:
    shard = src / "model-00003-of-00004.safetensors"
    os.truncate(shard, shard.stat().st_size - 1000)
    return "model-00003-of-00004.safetensors", "truncated"


def _break_index_names_an_absent_tensor(src: Path) -> tuple[str, ...]:
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00004.safetensors"
    index_path.write_text(json.dumps(index))
    return "model.layers.0.mlp.extra.weight", "model-00001-of-00004.safetensors"


def _break_architecture(src: Path) -> tuple[str, ...]:
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (src / "config.json").write_text(json.dumps(config))
    return "LlamaForCausalLM", "Qwen2ForCausalLM"


def _break_model_type(src: Path) -> tuple[str, ...]:
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="no_such_type")
    (src / "config.json").write_text(json.dumps(config))
    return "does not describe a buildable Qwen2ForCausalLM", "no_such_type"


def _break_to_pytorch_bin(src: Path) -> tuple[str, ...]:
    for path in src.glob("model*.safetensors*"):
        path.unlink()
    (src / "pytorch_model.bin").write_bytes(b"not really")
    return "pytorch_model.bin", "safetensors"


def _break_block_size(src: Path) -> tuple[str, ...]:
    config = json.loads((src / "config.json").read_text())
    config.update(hidden_size=96)  # 4 heads of 24: every Linear reading the hidden state has in=96
    (src / "config.json").write_text(json.dumps(config))
    return "in_features=96", "block size 128"


def _break_config(src: Path) -> tuple[str, ...]:
    (src / "config.json").unlink()
    return "config.json", str(src)


@pytest.mark.parametrize(
    "breakage",
    [
        _break_missing_shard,
        _break_truncated_shard,
        _break_index_names_an_absent_tensor,
        _break_architecture,
        _break_model_type,
        _break_to_pytorch_bin,
        _break_block_size,
        _break_config,
    ],
)
def test_bad_checkpoint_is_refused_in_one_line(breakage, tiny_hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf, src)
    assert shard_count(src) == 4, "the breakages below name tiny_hf's shard files"
    fragments = breakage(src)
    dst = tmp_path / "out" / "q"
    assert_one_line_error(run_cli("quantize", str(src), str(dst), "--no-progress"), *fragments)
    assert_nothing_written(tmp_path, dst)


def test_shard_plan_keeps_groups_whole_in_order_and_bounded():
    rng = np.random.default_rng()
    groups = [
        [PlannedTensor(name=f"t{i}.{j}", dtype="U8", shape=(int(rng.integers(1, 1000)),)) for j in range(i % 2 + 1)]
        for i in range(60)
    ]
    limit = int(rng.integers(500, 5000))
    shards = plan_shards(groups, limit)
    assert [t for shard in shards for t in shard.tensors] == [t for group in groups for t in group]
    where = {t.name: shard.file for shard in shards for t in shard.tensors}
    assert all(len({where[t.name] for t in group}) == 1 for group in groups)
    for shard in shards:
        assert shard.data_bytes <= limit or len({t.name.split(".")[0] for t in shard.tensors}) == 1
    assert [s.file for s in shards][-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"


def test_not_enough_free_space_is_refused_before_writing(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.setattr("quantizer.writer.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    dst = tmp_path / "q"
    assert_one_line_error(run_cli("quantize", str(tiny_hf), str(dst), "--no-progress"), "not enough space", str(dst))
    assert_nothing_written(tmp_path, dst)


def test_no_space_left_while_writing_leaves_nothing(tiny_hf, tmp_path, monkeypatch):
    real_write = ShardWriter.write
    calls = []

    def write_until_the_disk_fills(self, name, piece):
        calls.append(name)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, name, piece)

    monkeypatch.setattr(ShardWriter, "write", write_until_the_disk_fills)
    dst = tmp_path / "q"
    assert_one_line_error(run_cli("quantize", str(tiny_hf), str(dst), "--no-progress"), "no space left", str(dst))
    assert len(calls) == 4
    assert_nothing_written(tmp_path, dst)


def test_an_interrupted_run_leaves_neither_dst_nor_its_staging_directory(tiny_hf, tmp_path, monkeypatch):
    from quantizer.quantize import quantize_checkpoint

    def interrupted(self, name, piece):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tiny_hf, tmp_path / "q", device="cpu", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "q")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(tiny_hf, tmp_path):
    assert_one_line_error(run_cli("quantize", str(tiny_hf), str(tmp_path / "q"), "--device", "cuda"), "no CUDA device")


def run_spillover_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from compute.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO_ROOT, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=120,
    )


def test_repo_id_offline_and_missing_path_fail_in_one_line(tmp_path):
    offline = run_spillover_process(
        "quantize", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", str(tmp_path / "q"), env={"HF_HUB_OFFLINE": "1"}
    )
    assert offline.returncode == 1 and "Traceback" not in offline.stderr
    lines = offline.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not download deepseek-ai/DeepSeek-R1-Distill-Qwen-32B" in lines[0]
    missing = run_cli("quantize", str(tmp_path / "no" / "such" / "dir"), str(tmp_path / "q"))
    assert_one_line_error(missing, "does not exist")
    assert_nothing_written(tmp_path, tmp_path / "q")


PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from quantizer.model_spec import describe_model
    from quantizer.quantize import quantize_checkpoint

    def status_bytes(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB

    describe_model(json.load(open(sys.argv[1] + "/config.json")))  # import transformers before the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    baseline = status_bytes("VmRSS")
    quantize_checkpoint(sys.argv[1], sys.argv[2], device="cpu", progress=False)
    print(json.dumps({"baseline": baseline, "peak": status_bytes("VmHWM")}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux /proc")
def test_peak_memory_stays_far_below_the_checkpoint_size(tmp_path):
    # ~185 MB of bf16 in three shards; the largest tensors (embedding, lm_head) are 32 MB each. Peak RSS is read
    # from /proc (VmHWM) rather than getrusage, whose maximum a child inherits from the (large) pytest process.
    source = make_tiny_qwen2(
        tmp_path / "hf", num_layers=4, hidden_size=1024, intermediate_size=4096, vocab_size=16384, shards=3,
        seed=int(torch.randint(0, 2**31, ())),
    )
    checkpoint_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(source), str(tmp_path / "q")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    growth = figures["peak"] - figures["baseline"]
    assert checkpoint_bytes > 150e6
    # Streaming in 2 MiB pieces grows by 20-50 MB (allocator slack included). Holding a shard's mapping open, or
    # quantizing a 32 MB tensor whole (float32 temporaries), would each pass 0.4x of the checkpoint.
    message = f"peak RSS grew {growth / 1e6:.0f} MB for a {checkpoint_bytes / 1e6:.0f} MB model"
    assert growth < 0.4 * checkpoint_bytes, message
    QuantizedCheckpoint(tmp_path / "q").verify()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_output_is_identical_to_cpu_output(tiny_hf, tiny_q, tmp_path):
    from quantizer.quantize import quantize_checkpoint

    on_gpu = quantize_checkpoint(tiny_hf, tmp_path / "q", device="cuda", shard_bytes=150_000, progress=False)
    assert read_manifest(on_gpu).shards == read_manifest(tiny_q).shards  # same bytes, same sha256
