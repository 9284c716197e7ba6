"""Device memory as the driver sees it, for the GPU suite's parts that run vLLM: NVML's used memory of the
device counts torch's allocator, vLLM's own pools (its sleep-mode allocator maps memory outside torch's),
CUDA graphs and the CUDA context alike; torch.cuda.max_memory_allocated sees only the first. On CPU (the
smoke runs) the resident memory of a process and its children stands in."""

from __future__ import annotations

import functools
import os
import subprocess
import threading
import time
from dataclasses import dataclass


@functools.cache
def _nvml_device():
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetHandleByIndex(0)  # the suite's one GPU


def device_used_bytes(cuda: bool, pid: int | None = None) -> int:
    """The device's memory in use (NVML, every process and pool), or on CPU the RSS of `pid` and its children."""
    if cuda:
        import pynvml

        return pynvml.nvmlDeviceGetMemoryInfo(_nvml_device()).used
    import psutil

    try:
        process = psutil.Process(pid or os.getpid())
        return sum(p.memory_info().rss for p in (process, *process.children(recursive=True)))
    except psutil.Error:
        return 0


class PeakWatch:
    """The highest device memory in use while a child runs, above what was in use before it started."""

    def __init__(self, cuda: bool, interval: float = 0.01):
        self.cuda, self.interval = cuda, interval
        self.baseline = device_used_bytes(cuda) if cuda else 0
        self.peak = self.baseline

    def follow(self, process: subprocess.Popen) -> threading.Thread:
        def poll():
            while process.poll() is None:
                self.peak = max(self.peak, device_used_bytes(self.cuda, process.pid))
                time.sleep(self.interval)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        return thread

    @property
    def peak_bytes(self) -> int:
        return self.peak - self.baseline




@dataclass
class Watched:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_bytes: int  # above what the device held before the process started
    timed_out: bool


def run_watched(argv: list[str], env: dict[str, str], cuda: bool, timeout: float) -> Watched:
    """Run a process to its end (killed after `timeout` s), its peak memory polled from outside it."""
    watch = PeakWatch(cuda)
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    poller = watch.follow(process)
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        timed_out = True
    poller.join()
    return Watched(process.returncode, stdout, stderr, time.perf_counter() - started, watch.peak_bytes, timed_out)


def budget_timeout(deadline: float) -> float:
    """How long a child may run: a minute past the suite's budget at most (one hung run must not take the
    device call with it), never under a minute, never over the device's 9-minute call."""
    return min(540.0, max(60.0, deadline - time.monotonic() + 60))
