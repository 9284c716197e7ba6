"""The operator's memory with N GRPOJobs: `grpo operator` (the chart's command, in a process of its
own) against the tests' API-server double, jobs created in steps, RSS read after each step.

    PYTHONPATH=runtime:operator:tests/operator python bench/operator_memory.py [--steps 0,100,200,300]

Prints one row per step: jobs, pods the operator made, RSS (MiB) once every job has its pod
and a resync round has passed, and the peak RSS seen while getting there. The chart's memory
request (charts/grpo-operator/values.yaml) is set from the last row, with headroom.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import kmock
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))

from grpo_operator.crd import crd  # noqa: E402
from k8s_doubles import ApiServerDouble, stored_all, write_kubeconfig  # noqa: E402

SETTLE_SECONDS = 20.0  # past one resync round (15 s) after the last pod


def job(name: str) -> dict:
    return {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob", "metadata": {"name": name},
            "spec": {"model": {"name": "Qwen/Qwen2.5-1.5B-Instruct"}, "dataset": {"source": "builtin:arithmetic"},
                     "rewards": [{"name": "a", "function": "builtin:exact_answer"}],
                     "output": {"uri": f"s3://runs/{name}"}}}


async def measure(steps: list[int]) -> list[tuple[int, int, float, float]]:
    rows = []
    async with ApiServerDouble() as server, kmock.Server(server):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server.resources.load_bundled()
        response = await server.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd())
        assert response.status == 201
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = write_kubeconfig(Path(tmp) / "kubeconfig", str(server.url))
            env = {**os.environ, "KUBECONFIG": str(kubeconfig), "GRPO_WATCH_NAMESPACES": "default",
                   "GRPO_HEALTH_PORT": "0", "GRPO_LOG_LEVEL": "WARNING"}
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "grpo_runtime.cli", "operator", env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            operator = psutil.Process(process.pid)
            try:
                await asyncio.sleep(5)  # started, serving
                created = 0
                for target in steps:
                    peak = 0.0
                    for start in range(created, target, 25):
                        names = [f"job-{i:04d}" for i in range(start, min(start + 25, target))]
                        await asyncio.gather(*(server.post("/apis/grpo.dev/v1alpha1/namespaces/default/grpojobs",
                                                           json=job(n)) for n in names))
                        peak = max(peak, operator.memory_info().rss)
                    created = target
                    deadline = time.monotonic() + 600
                    while len(stored_all(server, "v1/pods", "default")) < target and time.monotonic() < deadline:
                        peak = max(peak, operator.memory_info().rss)
                        await asyncio.sleep(0.5)
                    settle = time.monotonic() + SETTLE_SECONDS
                    while time.monotonic() < settle:
                        peak = max(peak, operator.memory_info().rss)
                        await asyncio.sleep(0.5)
                    rss = operator.memory_info().rss
                    pods = len(stored_all(server, "v1/pods", "default"))
                    rows.append((target, pods, rss / 2**20, max(peak, rss) / 2**20))
                    server.served.clear()  # the double's request log is the bench's memory, not the operator's
            finally:
                process.terminate()
                await process.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="0,100,200,300", help="job counts to measure at, increasing")
    args = parser.parse_args()
    steps = [int(n) for n in args.steps.split(",")]
    print(f"{'jobs':>6} {'pods':>6} {'RSS MiB':>9} {'peak MiB':>9}")
    for jobs, pods, rss, peak in asyncio.run(measure(steps)):
        print(f"{jobs:>6} {pods:>6} {rss:>9.1f} {peak:>9.1f}")


if __name__ == "__main__":
    main()
