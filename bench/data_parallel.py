"""How a job scales over ranks: generation tokens per second for 1, 2 and 4 processes, beside the ideal.

Runs a GRPOJob (default: the local example, examples/local-cpu.yaml, evaluation off) with
resources.gpus = 1, 2, 4 through `grpo train` (torchrun, gloo: CPU processes standing in for GPUs),
the same global batch each time, for a few steps, and reads each run's metrics: the tokens the step's
completions hold over its wall time (the first step, warm-up and worst-case memory probe, left out).
The baseline is the one-process run of the same job in the same invocation:

    ranks  steps  tokens/s  per rank  speed-up  ideal  efficiency
        1      3     180.1     180.1     1.00x  1.00x        100%

On a CPU the ranks share the machine's cores (each gets cores / ranks threads), so the ideal is capped by
the cores: the figure shows what the exchange between ranks costs, not what GPUs would gain. No GPU
figure is claimed here; on GPUs each rank has a device of its own.

    python bench/data_parallel.py                       # the local example, 1/2/4 ranks, 4 steps (~10 min on 2 cores)
    python bench/data_parallel.py --ranks 1,2 --steps 3 --job my.yaml
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from checkout import REPO, child_env  # bench/ is on sys.path: the scripts run from it

JOB = REPO / "examples" / "local-cpu.yaml"


def scaled_job(doc: dict, ranks: int, output: Path) -> dict:
    """The job on `ranks` processes: evaluation off (it is not the step's throughput), its own output."""
    spec = dict(doc["spec"])
    spec.pop("evaluation", None)
    spec["checkpoint"] = {**spec.get("checkpoint", {}), "keepBest": None}
    spec["resources"] = {**spec.get("resources", {}), "gpus": ranks}
    spec["output"] = {**spec.get("output", {}), "uri": str(output)}
    return {**doc, "spec": spec}


def run(doc: dict, ranks: int, steps: int, workdir: Path) -> list[dict]:
    """The step records of the job run on `ranks` processes for `steps` steps."""
    output = workdir / f"ranks-{ranks}"
    path = workdir / f"ranks-{ranks}.yaml"
    path.write_text(yaml.safe_dump(scaled_job(doc, ranks, output)))
    threads = max(1, (os.cpu_count() or 1) // ranks)  # the cores split between the ranks
    env = child_env(OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-m", "grpo_runtime.cli", "train", str(path), "--quiet",
                           "--max-steps", str(steps)], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"grpo train on {ranks} ranks exited {done.returncode}")
    sys.path[:0] = [str(REPO / "runtime")]
    from grpo_runtime.report import read_metrics

    return [record for record in read_metrics(str(output)) if "loss" in record]


def tokens_per_second(records: list[dict]) -> float:
    """Completion tokens over wall time of the steps after the first (warm-up, worst-case memory probe)."""
    timed = records[1:] or records
    tokens = [r["tokens_per_second"] * r["step_seconds"] for r in timed]
    return sum(tokens) / sum(r["step_seconds"] for r in timed)


def table(rows: list[tuple[int, int, float]]) -> str:
    base = rows[0][2]
    header = ["ranks", "steps", "tokens/s", "per rank", "speed-up", "ideal", "efficiency"]
    lines = [
        [str(ranks), str(steps), f"{tps:.1f}", f"{tps / ranks:.1f}", f"{tps / base:.2f}x", f"{ranks:.2f}x",
         f"{100 * tps / (base * ranks):.0f}%"]
        for ranks, steps, tps in rows
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default=str(JOB), help="the GRPOJob (default: examples/local-cpu.yaml)")
    parser.add_argument("--ranks", default="1,2,4", help="world sizes to run, comma-separated; the first is the baseline")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is left out of the figure)")
    args = parser.parse_args(argv)
    doc = yaml.safe_load(Path(args.job).read_text())
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="grpo-data-parallel-") as tmp:
        for n in ranks:
            records = run(doc, n, args.steps, Path(tmp))
            rows.append((n, len(records), tokens_per_second(records)))
            print(f"{n} ranks: {rows[-1][2]:.1f} tokens/s "
                  f"(reward {statistics.fmean(r['reward'] for r in records):.3f})", file=sys.stderr)
    print(f"{Path(args.job).name}: {os.cpu_count()} cores, the same global batch on every world size")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
