"""The loader's launch contract (``protocol.launch``): its command line and its ready file, golden and round trip,
and what each side refuses."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.main import main as loader_main
from loader.policies import POLICIES
from protocol.defaults import POLICY_NAMES
from protocol.launch import LaunchContractError, LoaderCommand, ReadyFile

FULL = LoaderCommand(
    model=Path("/models/q"), gpu_memory=24 << 30, policy="stream", device="cuda", socket="ipc:///run/x/loader.sock",
    max_context=8192, ring_slots=3, prefetch_depth=2, verify_checksums=False, ready_file=Path("/run/x/ready.json"),
    stats_on_exit=True, verbose=2,
)  # fmt: skip


def test_golden_command_lines():
    assert LoaderCommand(model=Path("/m"), gpu_memory=1000, socket="tcp://127.0.0.1:5555").argv() == [
        "--model", "/m", "--gpu-memory", "1000", "--policy", "hybrid", "--socket", "tcp://127.0.0.1:5555",
        "--max-context", "4096",
    ]  # fmt: skip
    assert FULL.argv() == [
        "--model", "/models/q", "--gpu-memory", str(24 << 30), "--policy", "stream", "--device", "cuda",
        "--socket", "ipc:///run/x/loader.sock", "--max-context", "8192", "--ring-slots", "3", "--prefetch-depth", "2",
        "--no-verify-checksums", "--ready-file", "/run/x/ready.json", "--stats-on-exit", "-vv",
    ]  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(
    gpu_memory=st.integers(1, 1 << 45), policy=st.sampled_from(POLICY_NAMES),
    device=st.sampled_from([None, "cuda", "cpu"]),
    max_context=st.integers(1, 1 << 20), ring_slots=st.none() | st.integers(1, 64), verbose=st.integers(0, 2),
    verify=st.booleans(), stats=st.booleans(), ready=st.booleans(),
)  # fmt: skip
def test_a_command_line_decodes_to_the_record_it_encodes(gpu_memory, policy, device, max_context, ring_slots, verbose,
                                                         verify, stats, ready):  # fmt: skip
    command = dataclasses.replace(
        FULL, gpu_memory=gpu_memory, policy=policy, device=device, max_context=max_context, ring_slots=ring_slots,
        prefetch_depth=None, verbose=verbose, verify_checksums=verify, stats_on_exit=stats,
        ready_file=FULL.ready_file if ready else None,
    )  # fmt: skip
    assert LoaderCommand.parse(command.argv()) == command


def test_sizes_are_parsed_and_bad_command_lines_are_named():
    assert LoaderCommand.parse(["--model", "/m", "--gpu-memory", "2GiB", "--socket", "s"]).gpu_memory == 2 << 30
    for argv, message in [
        (["--model", "/m", "--socket", "s"], "--gpu-memory"),
        (["--model", "/m", "--gpu-memory", "lots", "--socket", "s"], "not a size"),
        (["--model", "/m", "--gpu-memory", "1G", "--socket", "s", "--policy", "fast"], "'fast' is not one of"),
    ]:
        with pytest.raises(LaunchContractError, match=message):
            LoaderCommand.parse(argv)
    with pytest.raises(LaunchContractError, match="socket"):
        dataclasses.replace(FULL, socket=None).argv()


def test_the_loader_takes_exactly_the_records_fields_and_implements_exactly_the_named_policies():
    assert {p.name for p in loader_main.params} == {f.name for f in dataclasses.fields(LoaderCommand)}
    assert set(POLICIES) == set(POLICY_NAMES)


def test_ready_file_golden_round_trip_and_refusals(tmp_path):
    ready = ReadyFile(address="ipc:///run/x/loader.sock", pid=4242)
    assert ready.encode() == '{"address": "ipc:///run/x/loader.sock", "pid": 4242}'
    assert ReadyFile.decode(ready.encode()) == ready
    path = tmp_path / "ready.json"
    ready.write(path)
    assert ReadyFile.read(path) == ready and [p.name for p in tmp_path.iterdir()] == ["ready.json"]
    for text, message in [
        ("not json", "must be JSON"),
        (json.dumps({"address": "a"}), "exactly 'address' and 'pid'"),
        (json.dumps({"address": "a", "pid": 1, "extra": 0}), "exactly 'address' and 'pid'"),
        (json.dumps({"address": 1, "pid": 1}), "a string"),
        (json.dumps({"address": "a", "pid": "1"}), "an integer"),
        (json.dumps(["a", 1]), "exactly"),
    ]:
        with pytest.raises(LaunchContractError, match=message):
            ReadyFile.decode(text)


def test_the_loader_process_imports_nothing_of_compute_and_compute_nothing_of_the_loader():
    """Each side in a fresh interpreter, as the launcher starts it: they share only ``protocol`` and ``quantizer``."""
    check = "import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] == {other!r}))"
    for modules, other in [("loader.main", "compute"), ("compute.run, compute.session, compute.launch", "loader")]:
        done = subprocess.run([sys.executable, "-c", check.format(modules=modules, other=other)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0 and done.stdout.strip() == "[]", (modules, done.stdout, done.stderr)
