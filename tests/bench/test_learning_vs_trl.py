"""bench/learning_vs_trl.py --quick: ours and TRL's GRPOTrainer trained from one spec, scored by one routine.

The 3-seed run on the local example is the bench's business (its table is in the README); here the
same script runs --quick on a tiny random model over two seeds, through the real `grpo train` and
the real GRPOTrainer, and the checks are on what must hold whatever the numbers are: TRL trained on
the prompts ours trained on, in the same order; the common evaluation reproduces the job's own
(both on the transformers engine) before and after training; the table and the last line are the
results file's figures; a rerun reuses them and an ablation of ours reruns ours only.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("trl", reason="TRL is a dev dependency")

from tests.runtime.conftest import build_tiny_model
from tests.runtime.test_trainer import tiny_job

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "learning_vs_trl.py"
sys.path.insert(0, str(ROOT / "bench"))
import learning_vs_trl  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def tiny(tiny_model_dir, tmp_path) -> Path:
    doc = tiny_job(tiny_model_dir, tmp_path / "unused")
    # a length threshold a random model meets on some prompts and not others, so accuracy is not 0 or 1
    doc["spec"]["evaluation"] = {"heldOut": 8, "correct": {"short": -0.9}}
    doc["spec"]["generation"]["temperature"] = 0.9
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    return job


def bench(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env=env)


def test_quick_run_trains_both_sides_on_the_same_prompts_and_scores_them_alike(tiny_model_dir, tmp_path):
    job, results = tiny(tiny_model_dir, tmp_path), tmp_path / "results.jsonl"
    first = bench("--job", job, "--quick", "--seeds", "2", "--results", results, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((line["seed"], line["side"]) for line in lines) == [
        (seed, side) for seed in (42, 43) for side in ("base", "ours", "trl")]
    by = {(line["seed"], line["side"]): line for line in lines}
    for seed in (42, 43):
        base, ours, trl = by[seed, "base"], by[seed, "ours"], by[seed, "trl"]
        assert ours["steps"] == trl["steps"] == 2  # --quick
        assert ours["prompt_order"] is not None and ours["prompt_order"] == trl["prompt_order"]
        # one routine: on the job's own engine (hf) it gives what the job's own evaluations gave
        assert base["accuracy"] == ours["own_base"]["accuracy"]
        assert base["completion_length"] == pytest.approx(ours["own_base"]["completion_length"])
        assert ours["accuracy"] == ours["own_final"]["accuracy"]
        assert ours["completion_length"] == pytest.approx(ours["own_final"]["completion_length"])
        assert base["prompts"] == ours["prompts"] == trl["prompts"] == 8
    assert by[42, "ours"]["prompt_order"] != by[43, "ours"]["prompt_order"]  # the seed orders the data

    out = first.stdout.strip().splitlines()
    for seed in (42, 43):
        row = next(line.split() for line in out if line.split()[:1] == [str(seed)])
        base, ours, trl = by[seed, "base"], by[seed, "ours"], by[seed, "trl"]
        assert row[1:4] == [f"{base['accuracy']:.3f}", f"{ours['accuracy']:.3f}", f"{trl['accuracy']:.3f}"]
        assert row[6] == f"{ours['seconds'] / trl['seconds']:.2f}"
    mean = {side: statistics.fmean(by[s, side]["accuracy"] for s in (42, 43)) for side in ("ours", "trl")}
    ratio = statistics.fmean(by[s, "ours"]["seconds"] for s in (42, 43)) / statistics.fmean(
        by[s, "trl"]["seconds"] for s in (42, 43))
    assert out[-1] == f"accuracy ours {mean['ours']:.3f} trl {mean['trl']:.3f} (mean of 2 seeds) time ours/trl {ratio:.2f}"
    paired = [by[s, "ours"]["accuracy"] - by[s, "trl"]["accuracy"] for s in (42, 43)]
    assert f"ours - trl by seed: {paired[0]:+.3f} {paired[1]:+.3f}; mean {statistics.fmean(paired):+.3f} " \
           f"+-{statistics.stdev(paired):.3f}" in out
    assert not any("another order" in line for line in out)

    again = bench("--job", job, "--quick", "--seeds", "2", "--results", results, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout == first.stdout
    assert len(results.read_text().splitlines()) == 6  # nothing ran again
    assert re.findall(r"seed (\d+) (\w+): from results.jsonl", again.stderr) == [
        (str(seed), side) for seed in (42, 43) for side in ("base", "ours", "trl")]

    # an ablation of ours (a field TRL's mapping does not read) reruns ours and reuses base and TRL
    ablation = bench("--job", job, "--quick", "--seed", "42", "--results", results,
                     "--set", "checkpoint.everySteps=1", cwd=tmp_path)
    assert ablation.returncode == 0, ablation.stderr[-4000:]
    assert re.findall(r"seed 42 (\w+): (running|from)", ablation.stderr) == [
        ("base", "from"), ("ours", "running"), ("trl", "from")]


def test_trl_gets_the_spec_it_is_mapped_from(tiny_model_dir, tmp_path):
    from grpo_runtime.data import load_rows
    from grpo_runtime.evaluation import split_rows
    from grpo_runtime.spec import load_job

    doc = yaml.safe_load(tiny(tiny_model_dir, tmp_path).read_text())
    doc["spec"]["training"].update(gradientAccumulationSteps=2, warmupRatio=0.5, lrScheduler="cosine",
                                   epsilonHigh=0.28, maxGradNorm=0.5, weightDecay=0.1, gradientCheckpointing="offload")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    job = load_job(tmp_path / "job.yaml")
    config = learning_vs_trl.trl_config(job, str(tmp_path), cpu=True)
    assert (config["per_device_train_batch_size"], config["gradient_accumulation_steps"]) == (4, 2)  # 2 prompts x 4
    assert config["warmup_steps"] == 1  # int(0.5 x 3 steps), as our lr_schedule counts it
    assert (config["lr_scheduler_type"], config["epsilon_high"], config["max_grad_norm"], config["weight_decay"]) == (
        "cosine", 0.28, 0.5, 0.1)
    assert config["gradient_checkpointing"] is True
    assert config["reward_weights"] == [1.0, 0.5]
    assert config["shuffle_dataset"] is False

    rows = learning_vs_trl.trl_rows(job)
    assert len(rows) == 3 * 2  # maxSteps x promptsPerStep
    _, held_out = split_rows(job, load_rows(job.spec.dataset))
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in held_out}

    doc["spec"]["training"]["gradientAccumulationSteps"] = 3  # 8 completions do not split in 3 for TRL
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="gradientAccumulationSteps"):
        learning_vs_trl.trl_config(load_job(tmp_path / "job.yaml"), str(tmp_path), cpu=True)


def test_a_job_without_evaluation_or_with_a_bad_override_is_refused(tiny_model_dir, tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(tiny_job(tiny_model_dir, tmp_path / "out")))
    result = bench("--job", plain, cwd=tmp_path)
    assert result.returncode == 2 and "has no spec.evaluation" in result.stderr
    result = bench("--job", tiny(tiny_model_dir, tmp_path), "--set", "training.lossType=nope", cwd=tmp_path)
    assert result.returncode == 2 and "spec.training.lossType" in result.stderr
    assert not (tmp_path / "out").exists()
