"""release_freed_heap: what a CPU step frees is returned to the OS between its phases."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from grpo_runtime import host_memory
from grpo_runtime.host_memory import release_freed_heap

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"

CHILD = textwrap.dedent(
    """
    import ctypes, sys
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 64 * 2**20)  # M_MMAP_THRESHOLD: 1 MiB blocks come from the heap, as glibc does once it adapts
    libc.mallopt(-1, 2**30)       # M_TRIM_THRESHOLD: free() alone keeps them
    import torch
    from grpo_runtime.host_memory import release_freed_heap

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    temporaries, kept = [], []
    for _ in range(300):  # a forward's temporaries, each followed by a small tensor that stays
        temporaries.append(torch.ones(2**18))  # 1 MiB
        kept.append(torch.ones(16))
    temporaries.clear()
    freed = rss_mb()
    returned = release_freed_heap(torch.device("cpu"))
    print(returned, freed - rss_mb())
    """
)


@pytest.mark.skipif(host_memory._MALLOC_TRIM is None, reason="no malloc_trim: not glibc (macOS, musl)")
def test_the_heap_a_phase_freed_goes_back_to_the_os():
    env = {"PYTHONPATH": str(RUNTIME), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True).stdout
    returned, dropped_mb = out.split()
    assert returned == "True"
    assert float(dropped_mb) > 200  # of the 300 MiB freed


def test_nothing_happens_off_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "_MALLOC_TRIM", lambda pad: calls.append(pad) or 1)
    assert release_freed_heap(torch.device("meta")) is False and calls == []
    assert release_freed_heap(torch.device("cpu")) is True and calls == [0]
