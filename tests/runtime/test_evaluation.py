"""Held-out evaluation (spec.evaluation): the split, the scores, the eval lines, status, report,
the best adapter, resume, bad input, and that evaluating never changes what the job trains."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_runtime.data import DatasetError, arithmetic_problems
from grpo_runtime.evaluation import pass_at_k, split_rows, summarise
from grpo_runtime.spec import EvaluationSpec, SpecError, parse_job

from tests.runtime.test_hub_datasets import gsm8k_repo  # noqa: F401  (a fixture)
from tests.runtime.test_tracking import mlflow_server  # noqa: F401  (a fixture)
from tests.runtime.test_trainer import read_metrics, run_in_process, tiny_job, write_job

REPO = Path(__file__).resolve().parents[2]
TIMING = {"tokens_per_second", "generation_seconds", "sync_seconds", "learner_seconds", "step_seconds", "peak_memory_mb", "eval/seconds"}


def train_lines(metrics):
    return [m for m in metrics if "reward" in m]


def eval_lines(metrics):
    return [m for m in metrics if "eval/accuracy" in m]


def eval_job(model_dir, output, evaluation, **training):
    doc = tiny_job(model_dir, output, **training)
    doc["spec"]["evaluation"] = evaluation
    return doc


def grpo_train(job_path, env=None):
    """`grpo train` in a fresh process, on this checkout's code (whatever grpo_runtime is installed)."""
    path = os.pathsep.join(str(REPO / part) for part in ("", "runtime", "operator"))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "grpo_runtime.cli", "train", str(job_path), "--quiet"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- pass@k and the scores ---------------------------------------------------------------------


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0  # n == k: did any sample pass?
    assert pass_at_k(4, 1, 1) == 0.25  # pass@1 is the share correct
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)


def test_greedy_scores_per_reward_and_the_headline_from_correct():
    per_reward = {
        "correct": torch.tensor([1.0, 0.0, 1.0, math.nan]),
        "format": torch.tensor([1.0, 1.0, 0.0, 1.0]),
        "short": torch.tensor([0.0, -0.5, -1.0, 0.0]),
    }
    spec = EvaluationSpec(held_out=4, correct={"correct": 1.0, "format": 1.0}, threshold=0.0)
    m = summarise(per_reward, 1, spec)
    assert m["eval/accuracy"] == 0.25  # only the first completion reaches both thresholds
    assert m["eval/correct/accuracy"] == 0.5  # None (NaN) never counts as reached
    assert m["eval/correct/mean"] == pytest.approx(2 / 3)  # ...and is left out of the mean
    assert m["eval/format/accuracy"] == 0.75
    assert m["eval/short/accuracy"] == 0.5  # not in correct: evaluation.threshold (0.0)
    assert m["eval/short/mean"] == pytest.approx(-0.375)
    assert not any("pass@" in key for key in m)  # greedy: accuracy is pass@1


def test_sampled_scores_report_mean_at_k_and_pass_at_k():
    # 3 prompts x k=2, grouped by prompt: [p0 p0 p1 p1 p2 p2]
    per_reward = {"correct": torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), "format": torch.ones(6)}
    m = summarise(per_reward, 2, EvaluationSpec(held_out=3, num_samples=2))
    assert m["eval/correct/accuracy"] == pytest.approx(0.5)  # mean@2: 3 of 6 completions
    assert m["eval/correct/pass@2"] == pytest.approx(2 / 3)  # prompts 0 and 2 have a correct one
    # without `correct`, the first reward defines eval/accuracy
    assert m["eval/accuracy"] == m["eval/correct/accuracy"] and m["eval/pass@2"] == m["eval/correct/pass@2"]
    assert m["eval/format/pass@2"] == 1.0


def test_metric_names_are_what_an_eval_line_carries():
    spec = EvaluationSpec(held_out=3, num_samples=2)
    m = summarise({"correct": torch.zeros(6), "format": torch.ones(6)}, 2, spec)
    assert set(spec.metric_names(["correct", "format"])) == set(m)


# --- which prompts are held out ----------------------------------------------------------------


def test_held_out_split_is_disjoint_by_prompt_text_and_fixed_by_the_seed(tiny_model_dir, tmp_path):
    rows = arithmetic_problems()
    prompts = [row["prompt"] for row in rows]
    assert len(set(prompts)) < len(prompts), "the builtin set repeats prompts: the split must go by text"

    def split(held_out, seed=42):
        return split_rows(parse_job(eval_job(tiny_model_dir, tmp_path, {"heldOut": held_out}, seed=seed)), rows)

    train, held = split(100)
    assert len(held) == 100 and len({r["prompt"] for r in held}) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len(train) + sum(prompts.count(r["prompt"]) for r in held) == len(rows)  # every copy left training
    assert split(100) == (train, held)  # the same seed, the same split
    assert split(100, seed=7)[1] != held
    assert len(split(0.05)[1]) == round(0.05 * len(set(prompts)))
    # the training rows keep the dataset's order (the sampler shuffles them by its own seed)
    assert train == [row for row in rows if row["prompt"] not in {r["prompt"] for r in held}]


def test_separate_source_is_deduplicated_capped_and_removed_from_training(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(6)]
    source = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "q1", "answer": "1"}, {"prompt": "new", "answer": "7"},
                                                   {"prompt": "q1", "answer": "1"}, {"prompt": "q2", "answer": "2"}])
    job = parse_job(eval_job(tiny_model_dir, tmp_path, {"source": str(source)}))
    train, held = split_rows(job, rows)
    assert [r["prompt"] for r in held] == ["q1", "new", "q2"]
    assert [r["prompt"] for r in train] == ["q0", "q3", "q4", "q5"]
    capped = parse_job(eval_job(tiny_model_dir, tmp_path, {"source": str(source), "maxSamples": 2}))
    assert [r["prompt"] for r in split_rows(capped, rows)[1]] == ["q1", "new"]
    assert split_rows(parse_job(tiny_job(tiny_model_dir, tmp_path)), rows) == (rows, [])  # no evaluation


def test_a_hub_source_is_evaluated_on_its_own_split(gsm8k_repo, tiny_model_dir, tmp_path):
    from tests.runtime.test_hub_datasets import TRAIN

    doc = eval_job(tiny_model_dir, tmp_path, {"source": f"hf://{gsm8k_repo}", "split": "test"})
    doc["spec"]["dataset"] = {"source": f"hf://{gsm8k_repo}", "config": "main", "promptField": "question"}
    job = parse_job(doc)
    train, held = split_rows(job, TRAIN)
    assert held == TRAIN[:1]  # the test split (config main, as the dataset's)
    assert train == TRAIN[1:]  # the double's test question is also a train row: it leaves training
    doc["spec"]["evaluation"]["split"] = "validation"
    with pytest.raises(DatasetError, match=r"^spec.evaluation.source: hf://.* split 'validation'"):
        split_rows(parse_job(doc), TRAIN)


def test_held_out_larger_than_the_dataset_names_the_field(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"q{i % 4}", "answer": "1"} for i in range(10)]  # 4 distinct prompts
    job = parse_job(eval_job(tiny_model_dir, tmp_path, {"heldOut": 4}))
    with pytest.raises(DatasetError, match=r"^spec.evaluation.heldOut: 4 .* has 4 distinct prompts"):
        split_rows(job, rows)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "evaluation, checkpoint, expected",
    [
        ({"heldOut": 5, "correct": {"corect": 1.0}}, {}, "spec.evaluation.correct: no reward named 'corect'"),
        ({"heldOut": 5}, {"keepBest": "eval/correct/pass@4"}, "spec.checkpoint.keepBest: unknown eval metric"),
        (None, {"keepBest": "eval/accuracy"}, "spec.checkpoint.keepBest: needs spec.evaluation"),
        ({"heldOut": 5, "source": "e.jsonl"}, {}, "spec.evaluation.heldOut: set exactly one of heldOut"),
        ({}, {}, "spec.evaluation.heldOut: set exactly one of heldOut"),
        ({"heldOut": 1.5}, {}, "spec.evaluation.heldOut: a fraction must be between 0 and 1"),
        ({"heldOut": 0}, {}, "spec.evaluation.heldOut: a count of held-out prompts must be >= 1"),
        ({"heldOut": True}, {}, "spec.evaluation.heldOut: must be a count"),
        ({"source": "eval.csv"}, {}, "spec.evaluation.source: must be builtin:NAME, hf://DATASET or a path"),
        ({"heldOut": 5, "maxSamples": 2}, {}, "spec.evaluation.maxSamples: applies to source only"),
        ({"heldOut": 5, "numSamples": 0}, {}, "spec.evaluation.numSamples: must be >= 1"),
        ({"heldOut": 50}, {}, "spec.evaluation.heldOut: 50 held-out prompts leave no training rows"),
    ],
)
def test_bad_evaluation_sections_name_the_field(tiny_model_dir, tmp_path, evaluation, checkpoint, expected):
    doc = tiny_job(tiny_model_dir, tmp_path)
    doc["spec"]["dataset"]["maxSamples"] = 50
    if evaluation is not None:
        doc["spec"]["evaluation"] = evaluation
    doc["spec"]["checkpoint"].update(checkpoint)
    with pytest.raises(SpecError) as info:
        parse_job(doc)
    assert any(message.startswith(expected) for message in info.value.messages), info.value.messages


def test_grpo_validate_names_an_unknown_correct_reward(tiny_model_dir, tmp_path, capsys):
    from grpo_runtime.cli import main

    doc = eval_job(tiny_model_dir, tmp_path / "out", {"heldOut": 5, "correct": {"nope": 1.0}})
    assert main(["validate", str(write_job(tmp_path, doc))]) == 2
    assert "spec.evaluation.correct: no reward named 'nope' in spec.rewards (known: correct, short)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "evaluation, message",
    [
        ({"heldOut": 3}, "spec.evaluation.heldOut: 3 means 3 held-out prompts, which leaves nothing to train on"),
        ({"source": "{tmp}/missing.jsonl"}, "spec.evaluation.source: cannot read {tmp}/missing.jsonl"),
        ({"source": "{tmp}/broken.jsonl"}, "spec.evaluation.source: {tmp}/broken.jsonl line 1 is not JSON"),
        ({"source": "{tmp}/train.jsonl"}, "spec.evaluation.source: every prompt of {tmp}/train.jsonl is also in"),
    ],
    ids=["split-too-large", "unreadable-source", "broken-source", "source-is-the-training-set"],
)
def test_unusable_held_out_prompts_exit_2_before_the_model_loads(tiny_model_dir, tmp_path, capsys, evaluation, message):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "answer": "1"} for i in range(3)])
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    evaluation = {key: str(value).format(tmp=tmp_path) if key == "source" else value for key, value in evaluation.items()}
    doc = eval_job(tiny_model_dir, tmp_path / "out", evaluation)
    doc["spec"]["dataset"]["source"] = str(tmp_path / "train.jsonl")
    doc["spec"]["model"]["name"] = str(tmp_path / "no-model-here")  # the data is checked first
    assert run_in_process(doc) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err
    assert "Traceback" not in err and not (tmp_path / "out" / "metrics").exists()


# --- a run with evaluation ---------------------------------------------------------------------


def test_eval_lines_at_step_0_every_n_and_the_last_step(tiny_model_dir, tmp_path, capsys):
    # 8 distinct prompts, each twice: 4 held out, so training cycles through the other 4 only
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(8)] * 2)
    out = tmp_path / "run"
    doc = eval_job(tiny_model_dir, out, {"heldOut": 4, "everySteps": 2}, maxSteps=5, logSamples=8)
    doc["spec"]["dataset"]["source"] = str(data)
    assert run_in_process(doc) == 0
    metrics = read_metrics(out)
    evals = eval_lines(metrics)
    assert [m["step"] for m in evals] == [0, 2, 4, 5]
    assert [m["step"] for m in train_lines(metrics)] == [1, 2, 3, 4, 5]
    assert [m["step"] for m in metrics] == [0, 1, 2, 2, 3, 4, 4, 5, 5]  # an eval line follows its step's line
    for m in evals:
        assert set(m) - TIMING == {"step", "eval/accuracy", "eval/correct/mean", "eval/correct/accuracy", "eval/short/mean",
                                   "eval/short/accuracy", "eval/num_prompts", "eval/num_samples", "eval/completion_length"}
        assert m["eval/num_prompts"] == 4 and m["eval/num_samples"] == 1
        assert m["eval/accuracy"] == m["eval/correct/accuracy"]  # the first reward defines it by default
    # every held-out completion is kept with its reference answer; none of its prompts was trained on
    held = [json.loads(line) for line in (out / "samples" / "eval-step-0.jsonl").read_text().splitlines()]
    assert len(held) == 4 and all(s["answer"] == str(2 * int(s["prompt"].split()[2])) for s in held)
    assert sum(s["rewards"]["correct"] for s in held) / 4 == evals[0]["eval/correct/accuracy"]
    trained = {json.loads(line)["prompt"] for p in (out / "samples").glob("step-*.jsonl") for line in p.read_text().splitlines()}
    assert trained == {f"What is {i} + {i}?" for i in range(8)} - {s["prompt"] for s in held}
    printed = capsys.readouterr().out
    assert f"eval accuracy: {evals[0]['eval/accuracy']:.3f} at step 0 -> {evals[-1]['eval/accuracy']:.3f} at step 5" in printed


def test_greedy_evaluation_is_the_policys_own_greedy_decoding(tiny_model_dir, tmp_path):
    """Step 0 scores exactly the greedy completions of the untrained model on the held-out prompts."""
    from grpo_runtime.engines import SamplingConfig
    from grpo_runtime.engines.hf import HFEngine
    from grpo_runtime.model import load_policy
    from grpo_runtime.prompts import encode_prompts

    out = tmp_path / "run"
    doc = eval_job(tiny_model_dir, out, {"heldOut": 6}, maxSteps=1)
    doc["spec"]["rewards"] = [{"name": "short", "function": "builtin:length", "args": {"target": 4, "scale": 8}}]
    assert run_in_process(doc) == 0
    job = parse_job(doc)
    _, held = split_rows(job, arithmetic_problems())
    policy = load_policy(job.spec.model, job.spec.lora, seed=0)
    greedy = HFEngine(policy).generate(encode_prompts(policy, job, held), SamplingConfig(n=1, max_tokens=12, temperature=0.0))
    samples = [json.loads(line) for line in (out / "samples" / "eval-step-0.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in held]
    assert [s["completion"] for s in samples] == [c.text for c in greedy]


def adapter_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_a_job_trains_identically_with_and_without_evaluation(tiny_model_dir, tmp_path):
    """Evaluation samples (k > 1, every step) through the same engine between updates; the
    training metrics and the adapter must not move a bit. LoRA dropout draws from the global RNG
    while training, so an evaluation that touched that stream would show."""
    source = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"Held-out question {i}: 3 + {i}?", "answer": str(3 + i)}
                                                  for i in range(5)])
    runs = {}
    for name, evaluation in (("plain", None), ("evaluated", {"source": str(source), "everySteps": 1, "numSamples": 3})):
        doc = tiny_job(tiny_model_dir, tmp_path / name, maxSteps=4)
        doc["spec"]["lora"]["dropout"] = 0.1
        doc["spec"]["checkpoint"]["everySteps"] = 4
        if evaluation:
            doc["spec"]["evaluation"] = evaluation
            doc["spec"]["checkpoint"]["keepBest"] = "eval/short/mean"
        torch.manual_seed(1234)  # dropout draws from the process's stream; start both runs from the same state
        assert run_in_process(doc) == 0
        runs[name] = read_metrics(tmp_path / name)
    assert [m["step"] for m in eval_lines(runs["evaluated"])] == [0, 1, 2, 3, 4]
    assert eval_lines(runs["plain"]) == []
    plain, evaluated = train_lines(runs["plain"]), train_lines(runs["evaluated"])
    assert len(plain) == len(evaluated) == 4
    for a, b in zip(plain, evaluated, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    for where in ("final", "checkpoints/step-4"):
        a, b = adapter_of(tmp_path / "plain" / where), adapter_of(tmp_path / "evaluated" / where)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), where
    state = [torch.load(tmp_path / run / "checkpoints/step-4/trainer_state.pt", weights_only=False) for run in runs]
    assert state[0]["sampler"] == state[1]["sampler"]  # the same data order and cursor
    assert torch.equal(state[0]["rng"]["torch"], state[1]["rng"]["torch"])


def test_sampled_evaluation_is_reproducible_with_the_seed(tiny_model_dir, tmp_path):
    evaluation = {"heldOut": 6, "numSamples": 4}
    for name in ("a", "b"):
        assert run_in_process(eval_job(tiny_model_dir, tmp_path / name, evaluation, maxSteps=1)) == 0
    a, b = (eval_lines(read_metrics(tmp_path / name)) for name in ("a", "b"))
    strip = lambda lines: [{k: v for k, v in m.items() if k not in TIMING} for m in lines]  # noqa: E731
    assert strip(a) == strip(b) and "eval/pass@4" in a[0]
    samples = [(tmp_path / name / "samples" / "eval-step-1.jsonl").read_text() for name in ("a", "b")]
    assert samples[0] == samples[1] and len(samples[0].splitlines()) == 24


# --- the best adapter --------------------------------------------------------------------------


def test_keep_best_keeps_the_adapter_of_the_best_evaluation(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    doc = eval_job(tiny_model_dir, out, {"heldOut": 8, "everySteps": 1, "numSamples": 2}, maxSteps=4)
    doc["spec"]["rewards"].append({"name": "len7", "function": "tests.runtime.crash_rewards:die_on_call"})
    doc["spec"]["checkpoint"].update(everySteps=1, keep=10, keepBest="eval/len7/mean")
    assert run_in_process(doc) == 0
    evals = eval_lines(read_metrics(out))
    scores = [m["eval/len7/mean"] for m in evals]
    assert len(set(scores)) > 1, "the evaluations should differ for this test to mean anything"
    best_step = evals[scores.index(max(scores))]["step"]  # the first of equals: a tie does not replace
    record = json.loads((out / "best" / "best.json").read_text())
    assert record == {"step": best_step, "metric": "eval/len7/mean", "value": max(scores)}
    best = adapter_of(out / "best")
    if best_step == 0:  # LoRA starts as the identity: B is zero
        assert all(not v.any() for k, v in best.items() if "lora_B" in k)
    else:
        same = adapter_of(out / "checkpoints" / f"step-{best_step}")
        assert all(torch.equal(best[k], same[k]) for k in same)
    assert (out / "best" / "adapter_config.json").is_file() and (out / "final" / "adapter_config.json").is_file()


def test_a_fresh_start_clears_best_of_an_earlier_attempt(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "best.json").write_text(json.dumps({"step": 3, "metric": "eval/accuracy", "value": 1.0}))
    doc = eval_job(tiny_model_dir, out, {"heldOut": 4}, maxSteps=1)
    doc["spec"]["checkpoint"]["keepBest"] = "eval/accuracy"
    assert run_in_process(doc) == 0
    record = json.loads((out / "best" / "best.json").read_text())
    assert record["step"] == 0 and record["value"] == eval_lines(read_metrics(out))[0]["eval/accuracy"]


# --- resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "die_on_call, resumed_from",
    # reward calls: eval 0, step 1, eval 1, step 2, eval 2, [checkpoint 2], step 3, eval 3, ...
    [(7, "step-2"), (3, None)],
    ids=["after-a-checkpoint", "before-any-checkpoint"],
)
def test_a_resumed_job_keeps_its_eval_history_without_duplicates_or_gaps(tiny_model_dir, tmp_path, die_on_call, resumed_from):
    rewards = [{"name": "len7", "function": "tests.runtime.crash_rewards:die_on_call"}]
    evaluation = {"heldOut": 6, "everySteps": 1, "numSamples": 2}

    def job(out):
        doc = tiny_job(tiny_model_dir, out, rewards=rewards, maxSteps=4)
        doc["spec"]["evaluation"] = copy.deepcopy(evaluation)
        doc["spec"]["checkpoint"]["keepBest"] = "eval/len7/mean"
        return doc

    straight_out, resumed_out = tmp_path / "straight", tmp_path / "resumed"
    assert run_in_process(job(straight_out)) == 0
    job_path = write_job(tmp_path, job(resumed_out))
    killed = grpo_train(job_path, env={"GRPO_TEST_DIE_ON_CALL": str(die_on_call)})
    assert killed.returncode == 137
    before = read_metrics(resumed_out)
    assert [m["step"] for m in eval_lines(before)] == ([0, 1, 2] if resumed_from else [0])

    resumed = grpo_train(job_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"resumed from checkpoints/{resumed_from}" in resumed.stderr) == bool(resumed_from)
    expected, got = read_metrics(straight_out), read_metrics(resumed_out)
    assert [m["step"] for m in got] == [m["step"] for m in expected] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    strip = lambda lines: [{k: v for k, v in m.items() if k not in TIMING} for m in lines]  # noqa: E731
    assert strip(eval_lines(got)) == strip(eval_lines(expected))
    assert json.loads((resumed_out / "best" / "best.json").read_text()) == json.loads(
        (straight_out / "best" / "best.json").read_text()
    )


# --- everywhere a user looks -------------------------------------------------------------------


def test_status_progress_gets_the_baseline_first_and_every_evaluation(tiny_model_dir, tmp_path, monkeypatch):
    import grpo_runtime.status as status

    class Recorder:
        def __init__(self):
            self.updates = []

        def update(self, progress):
            self.updates.append(copy.deepcopy(progress))

    recorder = Recorder()
    monkeypatch.setattr(status, "sink_from_env", lambda: recorder)
    doc = eval_job(tiny_model_dir, tmp_path / "run", {"heldOut": 5, "everySteps": 2, "numSamples": 2}, maxSteps=3)
    assert run_in_process(doc) == 0
    evals = eval_lines(read_metrics(tmp_path / "run"))
    shown = [(list(u), u.get("eval", {}).get("step", u.get("step"))) for u in recorder.updates]
    assert shown[0] == (["eval"], 0)  # the baseline, before the first step's report
    assert [u["eval"] for u in recorder.updates if "eval" in u] == [
        {
            "step": m["step"],
            "accuracy": m["eval/accuracy"],
            "numSamples": 2,
            "passAtK": m["eval/pass@2"],
            "rewards": {name: m[f"eval/{name}/mean"] for name in ("correct", "short")},
            "accuracies": {name: m[f"eval/{name}/accuracy"] for name in ("correct", "short")},
        }
        for m in evals
    ]
    assert [u["step"] for u in recorder.updates if "eval" not in u] == [1, 2, 3]
    assert all("eval" not in u for u in recorder.updates if "step" in u)  # a step report leaves eval as it is


def test_the_sink_patches_eval_into_status_progress_with_nan_as_null():
    from grpo_runtime.status import KubernetesProgressSink, eval_progress

    class Api:
        def patch_namespaced_custom_object_status(self, *args, **kwargs):
            self.body = args[-1]

    api = Api()
    line = {"step": 4, "eval/accuracy": 0.5, "eval/correct/mean": 0.5, "eval/correct/accuracy": 0.5,
            "eval/odd/mean": math.nan, "eval/odd/accuracy": 0.0, "eval/num_samples": 1, "eval/num_prompts": 2,
            "eval/completion_length": 3.0}
    KubernetesProgressSink("job", "ns", api=api).update({"eval": eval_progress(line)})
    sent = api.body["status"]["progress"]
    assert sent["eval"] == {"step": 4, "accuracy": 0.5, "numSamples": 1, "rewards": {"correct": 0.5, "odd": None},
                            "accuracies": {"correct": 0.5, "odd": 0.0}}
    assert set(sent) == {"eval", "updatedAt"}


def test_the_progress_line_shows_each_evaluation(capsys):
    from grpo_runtime.run import ProgressBar

    bar = ProgressBar(total=3, initial=0, quiet=False)
    bar.eval({"step": 0, "eval/accuracy": 0.25, "eval/pass@4": 0.5, "eval/correct/mean": 0.25, "eval/correct/accuracy": 0.25,
              "eval/correct/pass@4": 0.5, "eval/format/mean": 0.9, "eval/format/accuracy": 0.875, "eval/num_prompts": 100,
              "eval/num_samples": 4, "eval/completion_length": 40.0})
    bar.close()
    assert ("eval step 0: accuracy 0.250, pass@4 0.500 (correct 0.250, format 0.875) on 100 held-out prompts, "
            "4 samples each (accuracy is mean@4)") in capsys.readouterr().err
    ProgressBar(total=3, initial=0, quiet=True).eval({"step": 0, "eval/accuracy": 0.0})  # quiet: nothing, no error
    assert capsys.readouterr().err == ""


def synthetic_metrics():
    lines = [{"step": 0, "eval/accuracy": 0.1, "eval/correct/mean": 0.1, "eval/correct/accuracy": 0.1,
              "eval/format/mean": 0.3, "eval/format/accuracy": 0.3, "eval/num_prompts": 10, "eval/num_samples": 1}]
    for step in (1, 2, 3):
        lines.append({"step": step, "reward": 0.2 * step, "reward_std": 0.1, "rewards/correct/mean": 0.1 * step,
                      "rewards/format/mean": 0.2 * step})
    lines.append({**lines[0], "step": 3, "eval/accuracy": 0.4, "eval/correct/accuracy": 0.4, "eval/correct/mean": 0.4})
    return lines


def test_report_draws_train_and_eval_curves_per_reward():
    from grpo_runtime.report import reward_figure

    fig = reward_figure(synthetic_metrics())
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == {"total reward and held-out accuracy", "reward correct", "reward format"}
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in panels["reward correct"].lines}
    assert curves["train mean"] == ([1, 2, 3], pytest.approx([0.1, 0.2, 0.3]))
    assert curves["eval mean"] == ([0, 3], [0.1, 0.4])
    assert curves["eval accuracy"] == ([0, 3], [0.1, 0.4])
    headline = {line.get_label(): list(line.get_ydata()) for line in panels["total reward and held-out accuracy"].lines}
    assert headline["eval accuracy"] == [0.1, 0.4]


def test_grpo_report_prints_the_eval_change_and_still_reads_runs_without_evaluation(tmp_path, capsys):
    from grpo_runtime.cli import main

    with_eval, without = tmp_path / "a", tmp_path / "b"
    for path, lines in ((with_eval, synthetic_metrics()), (without, train_lines(synthetic_metrics()))):
        path.mkdir()
        write_jsonl(path / "metrics.jsonl", lines)
    assert main(["report", str(with_eval), "--out", str(tmp_path / "a.png")]) == 0
    assert "3 steps, reward 0.200 -> 0.600, eval accuracy 0.100 (step 0) -> 0.400 (step 3)" in capsys.readouterr().out
    assert main(["report", str(without), "--out", str(tmp_path / "b.png")]) == 0
    assert capsys.readouterr().out.strip().endswith("3 steps, reward 0.200 -> 0.600")
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0


def test_the_docs_evaluation_example_is_a_valid_section():
    import re

    import yaml

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "rewards-and-evaluation.md").read_text(), re.DOTALL)
    (block,) = [b for b in blocks if b.startswith("evaluation:")]
    evaluation = EvaluationSpec.model_validate(yaml.safe_load(block)["evaluation"])
    assert evaluation.held_out == 100 and evaluation.every_steps == 10 and evaluation.correct == {"correct": 1.0}


def test_mlflow_and_tensorboard_get_every_evaluation_from_the_baseline_on(tiny_model_dir, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    from tests.runtime.test_tracking import history, only_run, tensorboard_scalars, tracked_job

    out = tmp_path / "run"
    doc = tracked_job(tiny_model_dir, out, mlflow_server, experiment="evaluated", maxSteps=3)
    doc["spec"]["evaluation"] = {"heldOut": 4, "everySteps": 2}
    assert run_in_process(doc) == 0
    evals = eval_lines(read_metrics(out))
    expected = [(m["step"], pytest.approx(m["eval/accuracy"])) for m in evals]
    assert [step for step, _ in expected] == [0, 2, 3]
    client = MlflowClient(mlflow_server)
    run_id = only_run(client, "evaluated").info.run_id
    assert history(client, run_id, "eval/accuracy") == expected  # the step-0 baseline too
    assert [step for step, _ in history(client, run_id, "reward")] == [1, 2, 3]
    assert tensorboard_scalars(out / "tensorboard", "eval/accuracy") == expected
