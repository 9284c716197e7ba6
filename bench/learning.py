"""Does the local example learn the task? Held-out correctness before and after training.

Runs examples/local-cpu.yaml end to end as the README's first command does (`grpo train`, in a
fresh process, this checkout's runtime) into a temporary output, then reads its metrics:
the evaluations of spec.evaluation at step 0 (the baseline, before any update), every N steps and
at the last step. Prints one row per evaluation, the wall time, and last:

    eval correct: before 0.281 after 0.844

the share of held-out prompts whose reward `correct` (the exact answer, not the format) reaches
its threshold (with greedy decoding: pass@1) at step 0 and at the last step. The held-out prompts
never enter training (grpo_runtime.evaluation.split_rows), and everything is seeded by
training.seed: the same job gives the same numbers.

    python bench/learning.py                                  # the local example (CPU, ~15 minutes)
    python bench/learning.py --job my.yaml --reward correct --output ./grpo-runs/learning
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checkout import REPO, child_env  # bench/ is on sys.path: the scripts run from it

JOB = REPO / "examples" / "local-cpu.yaml"
EXIT_BAD_INPUT = 2


def eval_lines(output: Path) -> list[dict]:
    """The run's eval records (metrics/part-N.jsonl, read as grpo report reads them)."""
    sys.path[:0] = [str(REPO / "runtime")]  # this checkout's reader, as the run used this checkout's writer
    from grpo_runtime.report import read_metrics

    return [record for record in read_metrics(str(output)) if "eval/accuracy" in record]


def table(evals: list[dict]) -> str:
    names = sorted({key.split("/")[1] for line in evals for key in line if key.count("/") == 2})
    header = ["step", "accuracy", *names, "tokens"]
    rows = [
        [str(line["step"]), f"{line['eval/accuracy']:.3f}", *(f"{line[f'eval/{n}/accuracy']:.3f}" for n in names),
         f"{line['eval/completion_length']:.1f}"]
        for line in evals
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default=str(JOB), help="the GRPOJob to run (default: examples/local-cpu.yaml)")
    parser.add_argument("--reward", default="correct", help="the reward whose held-out accuracy is reported")
    parser.add_argument("--output", help="keep the run here (default: a temporary directory, deleted afterwards)")
    args = parser.parse_args(argv)

    import yaml

    spec = next(doc for doc in yaml.safe_load_all(Path(args.job).read_text()) if doc and doc.get("kind") == "GRPOJob")
    if not spec["spec"].get("evaluation"):
        print(f"bench/learning.py: {args.job} has no spec.evaluation: nothing would measure the gain", file=sys.stderr)
        return EXIT_BAD_INPUT
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        output = Path(args.output or tmp)
        env = child_env()
        started = time.perf_counter()
        run = subprocess.run(  # the README's command; its progress goes to stderr, its summary too
            [sys.executable, "-m", "grpo_runtime.cli", "train", args.job, "--output", str(output)],
            env=env, stdout=sys.stderr, check=False,
        )
        seconds = time.perf_counter() - started
        if run.returncode != 0:
            print(f"bench/learning.py: grpo train exited {run.returncode}", file=sys.stderr)
            return run.returncode
        evals = eval_lines(output)
        key = f"eval/{args.reward}/accuracy"
        if not evals or key not in evals[0]:
            known = sorted({k.split("/")[1] for line in evals for k in line if k.count("/") == 2})
            print(f"bench/learning.py: no {key} in the eval lines (rewards: {', '.join(known)})", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(table(evals))
        print(f"{evals[-1]['step']} steps, {evals[0]['eval/num_prompts']} held-out prompts, "
              f"{evals[0]['eval/num_samples']} sample(s) each; wall time {seconds:.0f} s")
        print(f"eval {args.reward}: before {evals[0][key]:.3f} after {evals[-1][key]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
