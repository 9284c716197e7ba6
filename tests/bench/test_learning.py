"""bench/learning.py: the local example's held-out gain, read from the run it starts.

The 20-minute SmolLM2 run itself is not run here; the same script runs a tiny job end to end
through the real `grpo train`, and its last line must be what that run's metrics say.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grpo_runtime.spec import load_job

from tests.runtime.conftest import build_tiny_model
from tests.runtime.test_trainer import read_metrics, tiny_job

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "learning.py"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def bench(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(BENCH), *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd, env=env,
    )


def test_last_line_is_the_held_out_accuracy_before_and_after(tiny_model_dir, tmp_path):
    doc = tiny_job(tiny_model_dir, tmp_path / "unused", maxSteps=3)
    doc["spec"]["evaluation"] = {"heldOut": 6, "everySteps": 2}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    result = bench("--job", job, "--reward", "short", "--output", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(out)
    evals = [m for m in metrics if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 2, 3]
    lines = result.stdout.strip().splitlines()
    before, after = evals[0]["eval/short/accuracy"], evals[-1]["eval/short/accuracy"]
    assert lines[-1] == f"eval short: before {before:.3f} after {after:.3f}"
    assert lines[0].split() == ["step", "accuracy", "correct", "short", "tokens"]
    assert [row.split()[0] for row in lines[1:4]] == ["0", "2", "3"]
    assert "3 steps, 6 held-out prompts, 1 sample(s) each" in lines[-2]
    assert "done: 3 steps" in result.stderr  # grpo train's own summary, kept off the bench's stdout


def test_a_job_without_evaluation_or_an_unknown_reward_is_refused(tiny_model_dir, tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(tiny_job(tiny_model_dir, tmp_path / "out", maxSteps=1)))
    result = bench("--job", plain, cwd=tmp_path)
    assert result.returncode == 2 and "has no spec.evaluation" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before training

    doc = tiny_job(tiny_model_dir, tmp_path / "unused", maxSteps=1)
    doc["spec"]["evaluation"] = {"heldOut": 2}
    evaluated = tmp_path / "evaluated.yaml"
    evaluated.write_text(yaml.safe_dump(doc))
    result = bench("--job", evaluated, "--reward", "nope", "--output", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2 and "no eval/nope/accuracy in the eval lines (rewards: correct, short)" in result.stderr


def test_the_local_example_measures_held_out_correctness_not_format():
    spec = load_job(ROOT / "examples" / "local-cpu.yaml").spec
    evaluation = spec.evaluation
    assert evaluation is not None and evaluation.held_out is not None and evaluation.source is None  # a held-out split
    assert evaluation.correct == {"correct": 1.0} and evaluation.num_samples == 1
    (correct,) = [reward for reward in spec.rewards if reward.name == "correct"]
    assert correct.function == "builtin:exact_answer"
    assert spec.checkpoint.keep_best == "eval/accuracy"
    assert spec.training.max_steps in {evaluation.every_steps * n for n in range(1, 100)}  # the last eval is on the grid
