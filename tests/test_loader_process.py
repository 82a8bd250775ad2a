"""The loader process and a consumer process (tests/consumer_proc.py), both real, on CPU.

The consumer acquires every unit in model order for several passes and checks every byte against the
checkpoint, under each policy with budgets chosen from the unit sizes so that streaming goes through 2 or 3
slots; a policy switch mid-run; the planner's refusals through the command line; killing either process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loader.layout import pool_layouts
from loader.planner import budget_lines
from protocol.launch import LoaderCommand, ReadyFile
from quantizer.checkpoint import QuantizedCheckpoint

ROOT = Path(__file__).resolve().parents[1]
CONSUMER = ROOT / "tests" / "consumer_proc.py"
MAX_CONTEXT = 64
READY_TIMEOUT_S = 60
EXIT_TIMEOUT_S = 10  # "within seconds": the loader checks its peers every 0.1 s


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@dataclasses.dataclass(frozen=True)
class Loader:
    proc: subprocess.Popen
    address: str
    run_dir: Path  # the test's private directory holding the socket and the ready file


def loader_command(
    model: Path, run_dir: Path, budget: int, policy: str, *extra: str, device: str = "cpu", socket: str | None = None
) -> list[str]:
    command = LoaderCommand(
        model=model, gpu_memory=budget, policy=policy, device=device, socket=socket or f"ipc://{run_dir}/loader.sock",
        max_context=MAX_CONTEXT, ready_file=run_dir / "ready.json", verbose=1,  # -v: the tests read its info lines
    )  # fmt: skip
    return [sys.executable, "-m", "loader.main", *command.argv(), *extra]


def start_loader(model: Path, tmp_path: Path, budget: int, policy: str, *extra: str, device: str = "cpu") -> Loader:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700, parents=True)
    proc = subprocess.Popen(
        loader_command(model, run_dir, budget, policy, *extra, device=device),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT,
    )  # fmt: skip
    ready = run_dir / "ready.json"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the loader exited with {proc.returncode} before it was ready:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the loader was not ready within {READY_TIMEOUT_S} s")
        time.sleep(0.05)
    info = ReadyFile.read(ready)
    assert info.pid == proc.pid
    return Loader(proc=proc, address=info.address, run_dir=run_dir)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def run_consumer(loader: Loader, model: Path, *args: str, timeout: float = 120) -> dict:
    result = subprocess.run(
        [sys.executable, str(CONSUMER), loader.address, str(model), *args],
        capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, f"consumer exited {result.returncode}:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def deep_q(tmp_path_factory) -> Path:
    """A random tiny-shaped model with 6 layers and an untied lm_head: 7 units, enough for hybrid to mix."""
    from quantizer.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("deep_q") / "model", preset="tiny", layers=6, device="cpu", progress=False)


def budget_for(model: Path, pool_bytes: int, device: str = "cpu") -> int:
    """The --gpu-memory whose pool share (what the planner leaves after its other lines) is ``pool_bytes``."""
    checkpoint = QuantizedCheckpoint(model)
    units = pool_layouts(checkpoint.manifest, device)
    fixed = budget_lines(device=device, units=units, config=checkpoint.config, max_context=MAX_CONTEXT)
    return sum(nbytes for _, nbytes in fixed) + pool_bytes


def unit_sizes(model: Path, device: str = "cpu") -> dict[str, int]:
    return {u.name: u.nbytes for u in pool_layouts(QuantizedCheckpoint(model).manifest, device)}


def case_budget(model: Path, case: str) -> tuple[str, int, tuple[str, ...]]:
    """(policy, budget, extra loader options) for a named test case."""
    sizes = unit_sizes(model)
    largest, total = max(sizes.values()), sum(sizes.values())
    if case == "stream-2":
        return "stream", budget_for(model, 2 * largest), ("--ring-slots", "2")
    assert case == "hybrid"  # room for all but about three layers: those stream through 2 slots
    return "hybrid", budget_for(model, total - 3 * largest + 2 * largest), ()


@pytest.mark.parametrize("case", ["stream-2", "hybrid"])
def test_consumer_sees_every_byte_under_each_policy(deep_q, tmp_path, case):
    policy, budget, extra = case_budget(deep_q, case)
    loader = start_loader(deep_q, tmp_path, budget, policy, *extra)
    try:
        if case == "hybrid":
            summary = run_consumer(loader, deep_q, "--passes", "4", "--shutdown")
        else:  # an orderly stop by signal instead of a Shutdown message
            summary = run_consumer(loader, deep_q, "--passes", "4")
            loader.proc.send_signal(signal.SIGINT)
        assert loader.proc.wait(EXIT_TIMEOUT_S) == 0
        out, err = loader.proc.communicate()
    finally:
        stop(loader.proc)
    assert "placement (policy" in out
    assert ("shutdown requested by compute" if case == "hybrid" else "received SIGINT") in err
    assert not (loader.run_dir / "loader.sock").exists(), "the socket file outlived the loader"
    units = len(unit_sizes(deep_q))
    assert summary["checked_tensors"] > 0
    streamed = summary["acquires"]["streamed"]
    assert summary["acquires"]["resident"] + streamed == 4 * units
    (stats,) = summary["stats"]
    assert stats["policy"] == policy and stats["acquires"] == streamed
    if case == "hybrid":
        assert 0 < streamed < 4 * units, "the hybrid budget should keep some units resident and stream others"
    else:
        assert streamed == 4 * units
    # every access compute took was filled, and at most D = 2 more ahead of it
    assert streamed <= stats["fills"] <= streamed + 2


def test_policy_switch_mid_run_and_acquire_cost(deep_q, tmp_path, capsys):
    """Every policy in turn on one loader and one consumer, bytes checked in each; then the cost per unit."""
    sizes = unit_sizes(deep_q)
    loader = start_loader(deep_q, tmp_path, budget_for(deep_q, sum(sizes.values())), "stream", "--stats-on-exit")
    try:
        summary = run_consumer(
            loader, deep_q, "--passes", "2", "--bench", "50",
            "--switch", "resident", "--switch", "stream:2", "--switch", "hybrid", "--shutdown",
        )  # fmt: skip
        assert loader.proc.wait(EXIT_TIMEOUT_S) == 0
        out, _ = loader.proc.communicate()
    finally:
        stop(loader.proc)
    assert summary["policies"] == ["stream", "resident", "stream", "hybrid"]
    by_policy = {s["policy"]: s for s in summary["stats"]}
    # stream ran two phases of 2 checked + 51 bench passes; everything fits, so resident and hybrid stream nothing
    assert by_policy["stream"]["acquires"] == 2 * 53 * len(sizes)
    assert by_policy["resident"]["fills"] == by_policy["hybrid"]["fills"] == 0
    assert "loader stats" in out and "resident" in out

    streamed_us = summary["benches"][0]["per_acquire_us"]  # stream, K = 3, D = 2
    resident_us = summary["benches"][1]["per_acquire_us"]
    with capsys.disabled():
        print(f"\nacquire+release on CPU, no compute between units: resident {resident_us:.2f} us, streamed {streamed_us:.1f} us")
    assert resident_us < 50, "a resident unit costs no synchronisation at all"
    assert streamed_us < 5000


def test_refusals_through_the_cli(deep_q, tmp_path):
    """Refused before anything is allocated: one line on stderr, exit status 2, no socket, no ready file."""
    from click.testing import CliRunner

    from loader.main import main

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    sizes = unit_sizes(deep_q)
    cases = {
        "too small for anything": (budget_for(deep_q, 0) // 2, "hybrid", None, "is too small"),
        "resident does not fit": (budget_for(deep_q, sum(sizes.values()) - 1), "resident", None, "is too small"),
        "a wildcard address": (budget_for(deep_q, 10**6), "stream", "tcp://0.0.0.0:5555", "never a wildcard"),
        "an open directory": (budget_for(deep_q, 10**6), "stream", f"ipc://{tmp_path}/loader.sock", "mode"),
    }
    tmp_path.chmod(0o755)
    for why, (budget, policy, socket, expected) in cases.items():
        result = CliRunner().invoke(main, loader_command(deep_q, run_dir, budget, policy, socket=socket)[3:])
        assert result.exit_code == 2, f"{why}: {result.output}"
        assert expected in result.stderr and "Traceback" not in result.stderr, f"{why}: {result.stderr}"
        assert len(result.stderr.strip().splitlines()) == 1, f"{why}: one line expected, got {result.stderr!r}"
        assert not (run_dir / "ready.json").exists() and not (run_dir / "loader.sock").exists()


def start_forever_consumer(loader: Loader, model: Path) -> subprocess.Popen:
    consumer = subprocess.Popen(
        [sys.executable, str(CONSUMER), loader.address, str(model), "--passes", "1", "--forever"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT,
    )  # fmt: skip
    assert consumer.stdout.readline().strip() == "ready", consumer.stderr.read()
    return consumer


def test_consumer_notices_the_loader_killed(deep_q, tmp_path):
    sizes = unit_sizes(deep_q)
    loader = start_loader(deep_q, tmp_path, budget_for(deep_q, 2 * max(sizes.values())), "stream", "--ring-slots", "2")
    consumer = start_forever_consumer(loader, deep_q)
    try:
        loader.proc.kill()
        started = time.monotonic()
        assert consumer.wait(EXIT_TIMEOUT_S) == 3
        assert time.monotonic() - started < 5
        assert "loader process" in consumer.stderr.read()
    finally:
        stop(consumer)
        stop(loader.proc)


def test_loader_exits_when_the_consumer_dies(deep_q, tmp_path):
    sizes = unit_sizes(deep_q)
    loader = start_loader(deep_q, tmp_path, budget_for(deep_q, 3 * max(sizes.values())), "stream")
    consumer = start_forever_consumer(loader, deep_q)
    try:
        consumer.kill()
        consumer.wait()
        assert loader.proc.wait(EXIT_TIMEOUT_S) == 0
        _, err = loader.proc.communicate()
        assert f"compute process {consumer.pid} exited" in err
        assert not (loader.run_dir / "loader.sock").exists()
    finally:
        stop(consumer)
        stop(loader.proc)


def test_loader_exits_when_its_parent_dies(deep_q, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    sizes = unit_sizes(deep_q)
    command = loader_command(deep_q, run_dir, budget_for(deep_q, 3 * max(sizes.values())), "stream")
    # a parent that starts the loader and then waits forever, so we can kill the parent alone
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(600)", *command],
        env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ready = run_dir / "ready.json"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        loader_pid = ReadyFile.read(ready).pid
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while _alive(loader_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(loader_pid), "the loader outlived its parent"
    finally:
        stop(parent)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
