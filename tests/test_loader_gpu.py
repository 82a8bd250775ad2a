"""The loader with CUDA IPC between two real processes (skipped without CUDA; run on the H200).

* every byte a consumer process sees in the device pool, under each policy, with streaming through 2 slots;
* the host -> device rate the ``stream`` policy achieves (wall clock, in the consumer) against a plain
  pinned copy measured by the same consumer in the same run: at least 90%;
* the device memory of both processes, read from NVML while they run, against ``--gpu-memory``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from test_loader_process import CONSUMER, ROOT, budget_for, child_env, start_loader, stop, unit_sizes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def run_consumer(loader, model, *args: str, timeout: float = 300) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, str(CONSUMER), loader.address, str(model), *args],
        capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, f"consumer exited {result.returncode}:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_every_byte_through_cuda_ipc(tiny_q, tmp_path, capsys):
    sizes = unit_sizes(tiny_q, "cuda")
    budget = budget_for(tiny_q, max(sum(sizes.values()), 3 * max(sizes.values())), device="cuda")
    loader = start_loader(tiny_q, tmp_path, budget, "stream", "--ring-slots", "2", device="cuda")
    try:
        summary, _ = run_consumer(
            loader, tiny_q, "--passes", "3", "--bench", "50",
            "--switch", "resident", "--switch", "stream:3", "--switch", "hybrid", "--shutdown",
        )  # fmt: skip
        assert loader.proc.wait(10) == 0
    finally:
        stop(loader.proc)
    with capsys.disabled():
        costs = ", ".join(f"{b['policy']} {b['per_acquire_us']:.1f} us" for b in summary["benches"])
        print(f"\nacquire+release per unit on CUDA, no compute between units: {costs}")
    assert summary["policies"] == ["stream", "resident", "stream", "hybrid"]
    assert summary["acquires"]["streamed"] == 2 * (3 + 51) * len(sizes)
    assert summary["checked_tensors"] > 0


class DeviceMemoryWatch:
    """Samples NVML while running: the peak of the processes' summed usage and of the device's used memory."""

    def __init__(self, interval_s: float = 0.02):
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.peak_processes = self.peak_device = 0
        self.per_process: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.is_set():
            processes = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
            # this test process may hold CUDA memory of earlier tests in the same session: not under test
            used = {p.pid: p.usedGpuMemory or 0 for p in processes if p.pid != os.getpid()}
            for pid, nbytes in used.items():
                self.per_process[pid] = max(self.per_process.get(pid, 0), nbytes)
            self.peak_processes = max(self.peak_processes, sum(used.values()))
            self.peak_device = max(self.peak_device, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used - self.baseline)
            time.sleep(interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.nvml.nvmlShutdown()


@pytest.fixture(scope="module")
def big_q(tmp_path_factory):
    """Two decoder layers and the lm_head of the 32B model's shapes: units of 240-400 MB, as in real use."""
    from quantizer.synth import synthesize

    # written on the CPU: this (test) process must hold no CUDA context, so NVML sees only the two under test
    return synthesize(tmp_path_factory.mktemp("big_q") / "model", preset="qwen2-32b", layers=2, device="cpu", progress=False)


def test_stream_rate_and_device_memory(big_q, tmp_path, capsys):
    sizes = unit_sizes(big_q, "cuda")
    budget = budget_for(big_q, 3 * max(sizes.values()), device="cuda")
    watch = DeviceMemoryWatch()
    loader = start_loader(big_q, tmp_path, budget, "stream", "--ring-slots", "3", "--stats-on-exit", device="cuda")
    try:
        summary, _ = run_consumer(loader, big_q, "--passes", "0", "--bench", "20", "--shutdown")
        assert loader.proc.wait(30) == 0
        out, _ = loader.proc.communicate()
    finally:
        stop(loader.proc)
        watch.stop()
    (bench,) = summary["benches"]
    ratio = bench["streamed_gbps"] / bench["pinned_gbps"]
    with capsys.disabled():
        print(
            f"\nstream policy: {bench['streamed_gbps']:.1f} GB/s end to end vs plain pinned copy {bench['pinned_gbps']:.1f} GB/s "
            f"({ratio:.0%}); {bench['per_acquire_us']:.0f} us per unit of {max(sizes.values()) / 1e6:.0f} MB max"
            f"\ndevice memory (NVML): processes {watch.per_process} sum peak {watch.peak_processes / 2**30:.2f} GiB, "
            f"device used peak {watch.peak_device / 2**30:.2f} GiB, budget {budget / 2**30:.2f} GiB\n{out}"
        )
    assert ratio >= 0.9, f"the stream policy moved {bench['streamed_gbps']:.1f} GB/s, under 90% of {bench['pinned_gbps']:.1f}"
    # per-process figures are missing in some containers (NVML reports them as unavailable); the device's are not
    assert watch.peak_processes <= budget
    assert 0 < watch.peak_device <= budget
