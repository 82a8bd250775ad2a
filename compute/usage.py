"""Peak memory of the two processes during a reply, for the ``stats`` of ``spillover run --output-format json``.

``PeakMemorySampler`` samples, in a background thread every ``SAMPLE_S`` seconds, the device memory each
process holds (NVML per-process usage, on CUDA only: that is what the budget bounds, allocator caches and
CUDA contexts included) and each process's resident host memory (RSS, from psutil; on CPU the pool, KV cache
and activations live there). Peaks are over the samples, so a spike shorter than ``SAMPLE_S`` can be missed.
A value that cannot be measured (no NVML, a process NVML does not list, a process gone) is ``None``.
"""

from __future__ import annotations

import logging
import threading

import psutil

log = logging.getLogger(__name__)

SAMPLE_S = 0.05


class PeakMemorySampler:
    """A context manager sampling ``pids`` (role -> pid) while it is active."""

    def __init__(self, pids: dict[str, int], *, device: str):
        self.pids = dict(pids)
        self.peak_device: dict[str, int | None] = {role: None for role in pids}
        self.peak_rss: dict[str, int | None] = {role: None for role in pids}
        self._nvml = _nvml_handles() if device == "cuda" else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def __enter__(self) -> "PeakMemorySampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict:
        """The JSON ``stats`` fields; device memory is ``None`` on CPU (there is no device besides host RAM)."""
        known = [v for v in self.peak_device.values() if v is not None]
        return {
            "peak_device_memory_bytes": {
                **self.peak_device,
                "total": sum(known) if len(known) == len(self.peak_device) else None,
            },
            "peak_device_memory_source": (
                f"NVML per-process usage, sampled every {SAMPLE_S * 1000:.0f} ms"
                if self._nvml is not None
                else "not measured: no CUDA device in use (see peak_host_rss_bytes)"
            ),
            "peak_host_rss_bytes": dict(self.peak_rss),
        }

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def _sample(self) -> None:
        device_usage = _nvml_usage(self._nvml) if self._nvml is not None else {}
        for role, pid in self.pids.items():
            if pid in device_usage:
                self.peak_device[role] = max(self.peak_device[role] or 0, device_usage[pid])
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
            self.peak_rss[role] = max(self.peak_rss[role] or 0, rss)


def _nvml_handles() -> list | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as e:  # no driver, no library, no permission: all mean "not measurable here"
        log.warning("NVML is not available (%s): peak device memory will not be reported", e)
        return None


def _nvml_usage(handles: list) -> dict[int, int]:
    """pid -> bytes of device memory, summed over devices, for every process NVML lists."""
    import pynvml

    usage: dict[int, int] = {}
    for handle in handles:
        try:
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except pynvml.NVMLError as e:  # a transient driver error: this sample has nothing for the device
            log.debug("NVML process query failed: %s", e)
            continue
        for process in processes:
            if process.usedGpuMemory is not None:
                usage[process.pid] = usage.get(process.pid, 0) + process.usedGpuMemory
    return usage
