"""``spillover run`` through real processes on CPU: the JSON output, the loader's share of the options, bad
input (one line, non-zero exit, no traceback), a too-small budget, a loader killed mid-generation, and
``--model`` resolution into the cache."""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import psutil
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from compute.cli import main
from compute import run as run_command
from compute.config import KernelOptions, kernel_options
from protocol.launch import LoaderCommand
from compute.resolve import ModelResolveError, resolve_model
from quantizer.format import MANIFEST_NAME

# The tiny model's planner lines on CPU are ~257 MiB (most of it the allocator margin): this holds it all,
# and with --policy stream everything goes through the ring.
BUDGET = "300MiB"


def spillover_env(cache_dir: Path) -> dict[str, str]:
    # One OpenMP thread per process: two processes on a 2-core CI machine otherwise spin against each other.
    return {**os.environ, "SPILLOVER_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}


def spillover(*args: str) -> list[str]:
    return [sys.executable, "-m", "compute.cli", *args]


def test_json_output_is_one_object_with_the_fed_ids_and_stats(tiny_q, tmp_path):
    prompt = random.choice(["Hello there", "What is 2 + 2?", "Write a poem"])
    seed = random.randrange(1000)
    result = subprocess.run(
        spillover("run", "--model", str(tiny_q), "--device", "cpu", "--gpu-memory", BUDGET, "--policy", "stream",
                  "-p", prompt, "-n", "5", "--seed", str(seed), "--output-format", "json"),
        capture_output=True, text=True, env=spillover_env(tmp_path), timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)  # the whole of stdout is one JSON object
    tokenizer = AutoTokenizer.from_pretrained(tiny_q)
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert reply["prompt_token_ids"] == list(expected)
    ids = reply["token_ids"]
    assert 1 <= len(ids) <= 5 and all(0 <= t < 320 for t in ids)
    assert reply["finish_reason"] == ("eos" if ids[-1] == tokenizer.eos_token_id else "length")
    known = [t for t in ids if t < len(tokenizer) and t not in tokenizer.all_special_ids]
    # U+FFFD stands for each unknown id, and for bytes that do not complete a character
    assert reply["text"].replace("\ufffd", "") == tokenizer.decode(known).replace("\ufffd", "")
    assert reply["text"].count("\ufffd") >= sum(t >= len(tokenizer) for t in ids)
    stats = reply["stats"]
    assert stats["prompt_tokens"] == stats["prefill_tokens"] == len(expected)
    assert stats["decode_tokens"] == len(ids) - 1
    assert stats["prefill_tokens_per_s"] > 0
    assert stats["policy"] == "stream" and stats["device"] == "cpu"
    assert stats["streamed_bytes"] > 0 and stats["streamed_bytes_per_token"] > 0
    assert stats["peak_device_memory_bytes"]["compute"] is None  # no device on CPU
    assert stats["peak_host_rss_bytes"]["compute"] > 0 and stats["peak_host_rss_bytes"]["loader"] > 0
    assert "Traceback" not in result.stderr


def test_the_loader_gets_its_share_of_the_options(tiny_q, monkeypatch):
    commands, configs = [], []
    monkeypatch.setattr(run_command, "_chat", lambda config, model, command: (commands.append(command),
                                                                             configs.append(config)))  # fmt: skip
    args = ["--model", str(tiny_q), "--gpu-memory", "3GiB", "--policy", "stream", "--device", "cpu", "-p", "hi"]
    result = CliRunner().invoke(main, ["-v", "run", *args, "--max-context", "64", "-n", "3"])
    assert result.exit_code == 0, result.output
    assert commands == [LoaderCommand(
        model=Path(tiny_q).resolve(), gpu_memory=3 << 30, policy="stream", device="cpu", max_context=64, verbose=1,
    )]  # fmt: skip
    # without --max-context: the default, capped at what the tiny model was built for (1024 positions)
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 0, result.output
    assert commands[-1].max_context == 1024 and commands[-1].verbose == 0
    # a draft model: the loader is told, so that its budget reserves the draft's bytes
    result = CliRunner().invoke(main, ["run", *args, "--draft-model", str(tiny_q)])
    assert result.exit_code == 0, result.output
    assert commands[-1].draft_model == Path(tiny_q).resolve()
    assert configs[-1].draft_shape == "tree"  # on CPU a draft grows trees unless told otherwise
    result = CliRunner().invoke(main, ["run", *args, "--draft-model", str(tiny_q), "--draft-shape", "chain"])
    assert result.exit_code == 0, result.output
    assert configs[-1].draft_shape == "chain"
    result = CliRunner().invoke(main, ["run", *args, "--draft-shape", "chain"])
    assert result.exit_code == 2 and "--draft-shape needs --draft-model" in result.output


def test_an_unknown_policy_or_size_is_refused_before_anything_starts(tmp_path):
    for args, message in [(["--policy", "hybird"], "'hybird' is not one of"), (["--gpu-memory", "lots"], "not a size")]:
        result = CliRunner().invoke(main, ["run", "-p", "hi", "--device", "cpu", *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model-dir", "-p", "hi"], "no such directory"),
        (["--top-p", "2", "-p", "hi"], "--top-p"),
        (["--temperature", "nan", "-p", "hi"], "--temperature"),
        (["--output-format", "json"], "needs a prompt"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_options_get_one_clear_message(tmp_path, args, message):
    # Refused before anything starts, so click's runner in this process is enough.
    result = CliRunner().invoke(main, ["run", "--device", "cpu", *args], env={"SPILLOVER_CACHE_DIR": str(tmp_path)})
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert result.stderr.count(message) == 1 and "Traceback" not in result.stderr, result.stderr


def test_too_small_budget_is_refused_once_by_the_loader(tiny_q, tmp_path):
    result = subprocess.run(
        spillover("run", "--model", str(tiny_q), "--device", "cpu", "--gpu-memory", "1MiB", "-p", "hi"),
        capture_output=True, text=True, env=spillover_env(tmp_path), timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("--gpu-memory 1.0 MiB is too small") == 1, result.stderr
    assert "loader" in result.stderr.splitlines()[-1]


def test_killing_the_loader_mid_generation_stops_compute_naming_it(tiny_q, tmp_path):
    # Greedy on the tiny random model runs the full 8000 tokens without an EOS (seconds with the CPU INT4 kernel),
    # so the reply is still going; the budget holds the 8192-token context's activations.
    compute = subprocess.Popen(
        spillover("run", "--model", str(tiny_q), "--device", "cpu", "--gpu-memory", "400MiB", "--policy", "hybrid",
                  "--temperature", "0", "-p", "Hello", "-n", "8000", "--max-context", "8192"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=spillover_env(tmp_path),
    )  # fmt: skip
    try:
        ready, _, _ = select.select([compute.stdout], [], [], 120)
        assert ready, "no reply text within 120 s"
        compute.stdout.read1(1)
        (loader,) = [p for p in psutil.Process(compute.pid).children() if "loader.main" in p.cmdline()]
        loader.kill()
        killed = time.monotonic()
        _, stderr = compute.communicate(timeout=30)
        elapsed = time.monotonic() - killed
    finally:
        if compute.poll() is None:
            compute.kill()
    assert compute.returncode not in (0, None)
    assert elapsed < 5, f"compute took {elapsed:.1f} s to notice"
    stderr = stderr.decode()
    assert f"loader process (pid {loader.pid})" in stderr or f"loader (pid {loader.pid})" in stderr, stderr
    assert "Traceback" not in stderr


def test_hf_checkpoint_is_quantized_once_into_the_cache(tiny_hf, tmp_path):
    source = Path(shutil.copytree(tiny_hf, tmp_path / "My-Model"))
    cache = tmp_path / "cache"
    first = resolve_model(str(source), cache_dir=cache, device="cpu")
    assert first.path.parent == cache and first.path.name.startswith("My-Model-") and not first.is_demo
    assert (first.path / MANIFEST_NAME).is_file()
    written = (first.path / MANIFEST_NAME).stat().st_mtime_ns
    again = resolve_model(str(source), cache_dir=cache, device="cpu")
    assert again.path == first.path and (again.path / MANIFEST_NAME).stat().st_mtime_ns == written
    # a changed checkpoint is a different cache entry
    config = source / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    changed = resolve_model(str(source), cache_dir=cache, device="cpu")
    assert changed.path != first.path and (changed.path / MANIFEST_NAME).is_file()
    # a quantized directory is used as it is
    assert resolve_model(str(first.path), cache_dir=cache, device="cpu").path == first.path


def test_unreachable_repo_id_and_non_model_directory_are_refused(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelResolveError, match="no-such-org/no-such-model.*Hugging Face"):
        resolve_model("no-such-org/no-such-model", cache_dir=tmp_path, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelResolveError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), cache_dir=tmp_path, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_json_on_cuda_reports_both_processes_device_memory_within_the_budget(tiny_q, tmp_path):
    result = subprocess.run(
        spillover("run", "--model", str(tiny_q), "--device", "cuda", "--gpu-memory", "2GiB", "--policy", "stream",
                  "-p", "Hello", "-n", "16", "--output-format", "json"),
        capture_output=True, text=True, env=spillover_env(tmp_path), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    peaks = stats["peak_device_memory_bytes"]
    assert peaks["compute"] > 0 and peaks["loader"] > 0, stats["peak_device_memory_source"]
    assert peaks["total"] == peaks["compute"] + peaks["loader"] <= stats["budget_bytes"]


def test_a_bad_gemv_config_table_is_refused_in_one_line(tmp_path):
    table = tmp_path / "kernels.json"
    table.write_text('{"tuned": {"mma 7168": {}}}')
    for args, env in [(["--gemv-configs", str(table)], {}), ([], {"SPILLOVER_GEMV_CONFIGS": str(table)})]:
        result = CliRunner().invoke(main, ["run", "-p", "Hi", "--device", "cpu", *args], env=env)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "--gemv-configs" in result.output and f"{table}: not a GEMV config table" in result.output


def test_kernel_options_come_from_the_command_line_or_the_environment_and_reach_the_kernels(tmp_path, monkeypatch):
    from compute.kernels import gemv_configs, pdl

    table = tmp_path / "kernels.json"
    table.write_text(json.dumps({"tuned": {"mma 4096 1024": {"tiles": 1, "warps": 4, "groups": 1, "splits": 3}}}))
    seen = []

    @click.command()
    @kernel_options
    def show(**options):
        seen.append(KernelOptions(**options))

    runner = CliRunner()
    assert runner.invoke(show, []).exit_code == 0
    assert runner.invoke(show, ["--no-early-launch", "--gemv-configs", str(table)]).exit_code == 0
    env = {"SPILLOVER_EARLY_LAUNCH": "0", "SPILLOVER_GEMV_CONFIGS": str(table)}
    assert runner.invoke(show, [], env=env).exit_code == 0
    tuned = KernelOptions(gemv_configs=table, early_launch=False)
    assert seen == [KernelOptions(), tuned, tuned]
    monkeypatch.setattr(gemv_configs, "TUNED_CONFIGS", dict(gemv_configs.TUNED_CONFIGS))
    monkeypatch.setattr(pdl, "_EARLY_LAUNCH", True)
    seen[1].apply()
    assert gemv_configs.gemv_config("mma", 4096, 1024) == gemv_configs.MmaConfig(tiles=1, warps=4, groups=1, splits=3)
    assert not pdl._EARLY_LAUNCH
