"""``./run.sh`` through real processes on CPU: it becomes ``spillover run`` (compute, in the foreground), which starts
the loader in a session of its own; the built-in demo streams and keeps stdout clean, and a Ctrl-C (SIGINT to its
process group, as a terminal sends it) leaves no process and no run directory behind."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import psutil

RUN_SH = Path(__file__).resolve().parent.parent / "run.sh"


def run_sh_env(cache_dir: Path) -> dict[str, str]:
    # This interpreter first on PATH: it has spillover installed, so run.sh uses it and sets nothing up.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "SPILLOVER_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}


def test_run_sh_without_model_runs_the_streaming_demo(tmp_path):
    result = subprocess.run(
        [str(RUN_SH), "--device", "cpu", "-p", "Hello", "-n", "3", "--output-format", "json"],
        capture_output=True, text=True, env={**run_sh_env(tmp_path), "TMPDIR": str(tmp_path)}, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)  # the loader's placement table went to stderr, not into the JSON
    assert "random weights" in result.stderr
    assert "streamed: layers." in result.stderr  # the placement the loader printed
    stats = reply["stats"]
    assert 1 <= len(reply["token_ids"]) <= 3
    assert stats["streamed_bytes"] > 0  # the demo's budget is smaller than its model: streaming is visible
    assert not list(Path(tmp_path).glob("spillover-*"))


def test_sigint_to_run_sh_leaves_no_process_behind(tiny_q, tmp_path):
    run_sh = subprocess.Popen(
        [str(RUN_SH), "--model", str(tiny_q), "--device", "cpu", "--gpu-memory", "300MiB", "--temperature", "0",
         "-p", "Hello", "-n", "1000", "--max-context", "1024"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**run_sh_env(tmp_path), "TMPDIR": str(tmp_path)},
        start_new_session=True,
    )  # fmt: skip
    try:
        ready, _, _ = select.select([run_sh.stdout], [], [], 180)
        assert ready, "no reply text within 180 s"
        run_sh.stdout.read1(1)  # the reply is streaming: both processes run
        compute = psutil.Process(run_sh.pid)  # run.sh execs compute: the same process
        processes = compute.children(recursive=True)
        assert " run " in " ".join(compute.cmdline()), compute.cmdline()
        loaders = [p for p in processes if "loader.main" in p.cmdline()]
        assert len(loaders) == 1, [p.cmdline() for p in processes]
        assert os.getsid(loaders[0].pid) != os.getsid(run_sh.pid)  # its own session: Ctrl-C reaches compute only
        (run_dir,) = Path(tmp_path).glob("spillover-*")
        os.killpg(run_sh.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
        _, stderr = run_sh.communicate(timeout=60)
    finally:
        if run_sh.poll() is None:
            os.killpg(run_sh.pid, signal.SIGKILL)
    assert run_sh.returncode == 130, stderr.decode()  # compute's exit code for an interrupted reply
    _, alive = psutil.wait_procs(processes, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    assert not run_dir.exists()
    assert b"Traceback" not in stderr
