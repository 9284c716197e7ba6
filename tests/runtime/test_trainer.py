"""`grpo train` end to end on a tiny random model: metrics, checkpoints, resume, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from grpo_runtime.spec import parse_job

REPO = Path(__file__).resolve().parents[2]

REQUIRED_METRICS = {
    "step", "loss", "reward", "reward_std", "kl", "entropy", "clip_ratio", "clip_ratio_low", "clip_ratio_high",
    "frac_reward_zero_std",
    "completion_length/mean", "completion_length/max", "clipped_ratio", "tokens_per_second",
    "generation_seconds", "sync_seconds", "learner_seconds", "step_seconds", "peak_memory_mb", "grad_norm",
    "learning_rate",
}


def tiny_job(model_dir, output, *, rewards=None, **training):
    doc = {
        "apiVersion": "grpo.dev/v1alpha1",
        "kind": "GRPOJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"name": str(model_dir), "maxSeqLength": 128},
            "lora": {"rank": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "dataset": {"source": "builtin:arithmetic", "systemPrompt": "Answer with a number."},
            "rewards": rewards
            or [
                {"name": "correct", "function": "builtin:exact_answer"},
                {"name": "short", "function": "builtin:length", "weight": 0.5, "args": {"target": 4, "scale": 8}},
            ],
            "generation": {"engine": "hf", "numGenerations": 4, "maxPromptLength": 48, "maxCompletionLength": 12},
            "training": {
                "maxSteps": 3,
                "promptsPerStep": 2,
                "learningRate": 5e-3,
                "lossChunkSize": 16,
                "gradientCheckpointing": "off",
                **training,
            },
            "checkpoint": {"everySteps": 2, "keep": 2},
            "output": {"uri": str(output)},
        },
    }
    return doc


def write_job(tmp_path, doc) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def grpo_train(job_path, *extra, env=None):
    # the parent's PYTHONPATH stays after the repository: a worktree's code wins over an editable install
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "grpo_runtime.cli", "train", str(job_path), "--quiet", *extra],
        capture_output=True, text=True, env=full_env, timeout=600,
    )


def read_metrics(output: Path) -> list[dict]:
    from grpo_runtime import metrics_log
    from grpo_runtime.storage import open_storage

    return metrics_log.read_metrics(open_storage(str(output)))


def run_in_process(doc, **overrides):
    from grpo_runtime.run import run_job

    return run_job(parse_job(doc), quiet=True, **overrides)


def test_train_writes_metrics_samples_checkpoints_and_final_adapter(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert run_in_process(tiny_job(tiny_model_dir, out)) == 0
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert REQUIRED_METRICS <= m.keys()
        assert {"rewards/correct/mean", "rewards/correct/std", "rewards/short/mean", "rewards/short/std"} <= m.keys()
        assert 0 <= m["completion_length/mean"] <= m["completion_length/max"] <= 12
        assert m["peak_memory_mb"] > 0 and m["tokens_per_second"] > 0
        assert m["sync_seconds"] == 0.0  # the hf engine generates with the learner's own model: nothing pushed
        assert 0 < m["learner_seconds"] < m["step_seconds"] and m["generation_seconds"] < m["step_seconds"]
    # the weighted sum is what the per-reward means say it is
    assert metrics[0]["reward"] == pytest.approx(metrics[0]["rewards/correct/mean"] + 0.5 * metrics[0]["rewards/short/mean"], abs=1e-5)
    assert (out / "spec.yaml").is_file() and yaml.safe_load((out / "spec.yaml").read_text())["spec"]["training"]["maxSteps"] == 3
    samples = [json.loads(line) for line in (out / "samples" / "step-2.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "completion", "reward", "rewards"} <= samples[0].keys()
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-3"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-2", "step-3"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, out / "final")
    state = torch.load(out / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "training left LoRA B at its zero init"


def test_killed_run_resumes_and_reproduces_the_uninterrupted_metrics(tiny_model_dir, tmp_path):
    """The adaptive entropy bonus's coefficient is state too: with a target the entropy never reaches it grows
    by its delta every step (and is applied from step 2 on), so a resume that lost it would differ at step 3."""
    rewards = [{"name": "len7", "function": "tests.runtime.crash_rewards:die_on_call"}]
    bonus = {"entropyCoef": 0.01, "useAdaptiveEntropy": True, "entropyTarget": 100.0, "entropyCoefDelta": 0.01}
    straight_out, resumed_out = tmp_path / "straight", tmp_path / "resumed"
    straight = write_job(tmp_path, tiny_job(tiny_model_dir, straight_out, rewards=rewards, maxSteps=4, **bonus))
    assert grpo_train(straight).returncode == 0

    (tmp_path / "b").mkdir()
    job_b = write_job(tmp_path / "b", tiny_job(tiny_model_dir, resumed_out, rewards=rewards, maxSteps=4, **bonus))
    killed = grpo_train(job_b, env={"GRPO_TEST_DIE_ON_CALL": "4"})  # dies inside step 4, after step-2's checkpoint
    assert killed.returncode == 137
    assert (resumed_out / "checkpoints" / "LATEST").read_text().strip() == "step-2"
    assert [m["step"] for m in read_metrics(resumed_out)] == [1, 2, 3]

    resumed = grpo_train(job_b)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoints/step-2 at step 2" in resumed.stderr
    expected, got = read_metrics(straight_out), read_metrics(resumed_out)
    assert [m["step"] for m in got] == [1, 2, 3, 4]  # step 3 re-run, not duplicated
    for a, b in zip(expected, got):
        for key in ("reward", "reward_std", "loss", "kl", "grad_norm", "completion_length/mean", "rewards/len7/mean",
                    "policy_loss", "entropy_coef"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert [m["entropy_coef"] for m in expected] == pytest.approx([0.02, 0.03, 0.04, 0.05])
    assert expected[0]["policy_loss"] == expected[0]["loss"]  # no entropy measured before step 1: no bonus
    assert all(m["loss"] < m["policy_loss"] for m in expected[1:])  # then minus coef x entropy


TIMINGS = {"tokens_per_second", "generation_seconds", "sync_seconds", "learner_seconds", "step_seconds",
           "peak_memory_mb"}


def dropout_job(model_dir, output):
    doc = tiny_job(model_dir, output, maxSteps=4)
    doc["spec"]["rewards"].append({"name": "grader", "function": "tests.runtime.crash_rewards:raise_on_call",
                                   "weight": 0.1})  # to fail a step at will (GRPO_TEST_RAISE_ON_CALL)
    doc["spec"]["lora"]["dropout"] = 0.3
    return doc


def same_training(a: Path, b: Path) -> None:
    """Every step's metrics (but the timings) and the final adapter, bit for bit."""
    from safetensors.torch import load_file

    strip = lambda out: [{k: v for k, v in m.items() if k not in TIMINGS} for m in read_metrics(out)]  # noqa: E731
    assert strip(a) == strip(b)
    first, second = (load_file(str(out / "final" / "adapter_model.safetensors")) for out in (a, b))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_lora_dropout_is_seeded_by_the_job(tiny_model_dir, tmp_path):
    """lora.dropout draws from torch's global stream; training.seed starts it, so two runs of one manifest train
    the same adapter, even in one process, where the stream has moved on after the first."""
    for name in ("a", "b"):
        assert run_in_process(dropout_job(tiny_model_dir, tmp_path / name)) == 0
    same_training(tmp_path / "a", tmp_path / "b")


def test_a_resumed_run_continues_the_lora_dropout_stream(tiny_model_dir, tmp_path, monkeypatch):
    """Its checkpoint's RNG state, not training.seed again nor the process's: steps 3 and 4 after a resume
    from step 2 drop what the uninterrupted run dropped (in process: the stream is elsewhere after the failure)."""
    from tests.runtime import crash_rewards

    assert run_in_process(dropout_job(tiny_model_dir, tmp_path / "straight")) == 0
    monkeypatch.setitem(crash_rewards._calls, "n", 0)
    monkeypatch.setenv("GRPO_TEST_RAISE_ON_CALL", "4")  # step 4's rewards raise, after step-2's checkpoint
    resumed = dropout_job(tiny_model_dir, tmp_path / "resumed")
    assert run_in_process(resumed) == 2
    assert [m["step"] for m in read_metrics(tmp_path / "resumed")] == [1, 2, 3]
    monkeypatch.delenv("GRPO_TEST_RAISE_ON_CALL")
    assert run_in_process(resumed) == 0
    same_training(tmp_path / "straight", tmp_path / "resumed")


def test_padding_to_max_lengths_changes_nothing_but_memory(tiny_model_dir):
    """Step 0 runs at the maximum lengths so an OOM shows at once; the loss must not notice."""
    from grpo_runtime.engines import Completion
    from grpo_runtime.loss import LossConfig, grpo_loss
    from grpo_runtime.model import lm_head, load_policy
    from grpo_runtime.trainer import build_batch, completion_hidden

    job = parse_job(tiny_job(tiny_model_dir, "unused"))
    policy = load_policy(job.spec.model, job.spec.lora, seed=0)
    prompts = [[5, 6, 7, 8], [9, 10]]
    completions = [Completion(0, [11, 12, 13], "", False), Completion(1, [14], "", True)]
    advantages = torch.tensor([1.0, -1.0])
    weight, bias = lm_head(policy.model)
    results = []
    for pad_to in (None, (20, 30)):
        batch = build_batch(prompts, completions, policy.tokenizer.pad_token_id, policy.device, pad_to)
        loss, _ = grpo_loss(
            completion_hidden(policy, batch), weight, batch.completion_ids, batch.completion_mask, advantages,
            config=LossConfig(loss_type="grpo", chunk_size=8),
        )
        grads = torch.autograd.grad(loss, [p for p in policy.model.parameters() if p.requires_grad])
        results.append((batch.input_ids.shape, loss, grads))
    assert results[1][0] == (2, 50) and results[0][0] == (2, 7)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    for a, b in zip(results[0][2], results[1][2]):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_batch_without_the_engines_log_probs_carries_none():
    """None, not NaN: NaN reads as tokens the engine could not score, so the off-policy mask would drop nothing where
    TRL takes pi_old as the sampler (test_loss_vs_trl's opsm cases). Where only some completions have them, the
    others' tokens are NaN (unscored: sampling weight 1, no KL evidence), padding too."""
    from grpo_runtime.engines import Completion
    from grpo_runtime.trainer import build_batch

    cpu = torch.device("cpu")
    without = build_batch([[5, 6]], [Completion(0, [11, 12], "", False), Completion(0, [13], "", False)], 0, cpu)
    assert without.sampling_logps is None and without.rows(torch.tensor([1])).sampling_logps is None
    some = [Completion(0, [11, 12], "", False, logprobs=[-0.5, -1.5]), Completion(0, [13], "", False),
            Completion(0, [14], "", False, logprobs=[-2.0])]
    mixed = build_batch([[5, 6]], some, 0, cpu).sampling_logps
    assert mixed[0].tolist() == [-0.5, -1.5] and mixed[1].isnan().all()
    assert mixed[2, 0] == -2.0 and mixed[2, 1].isnan()


def test_micro_batches_are_as_many_as_asked_and_never_empty():
    from grpo_runtime.trainer import split_micro_batches

    assert [len(rows) for rows in split_micro_batches(6, 4)] == [2, 2, 1, 1]  # torch.chunk would give 3 of 2
    assert [len(rows) for rows in split_micro_batches(8, 3)] == [3, 3, 2]
    assert [len(rows) for rows in split_micro_batches(3, 8)] == [1, 1, 1]
    assert torch.cat(split_micro_batches(8, 5)).tolist() == list(range(8))


@pytest.mark.parametrize(
    "training",
    [{"lossType": "grpo"}, {"lossType": "dr_grpo"}, {"lossType": "dapo"}, {"lossType": "cispo", "epsilonHigh": 2.0},
     {"lossType": "grpo", "importanceSamplingLevel": "sequence", "delta": 1.5, "samplingCorrection": "sequence_mask"},
     {"lossType": "sapo", "sapoTemperaturePos": 0.5}, {"lossType": "luspo", "importanceSamplingLevel": "sequence"},
     {"lossType": "vespo", "vespoKNeg": 2.0, "offPolicyMaskThreshold": 0.1},
     {"lossType": "dapo", "entropyCoef": 0.1}, {"lossType": "grpo", "importanceSamplingLevel": "sequence",
                                                "entropyCoef": 0.1}],
    ids=["grpo", "dr_grpo", "dapo", "cispo", "gspo-delta-sampling", "sapo", "luspo", "vespo-opsm", "entropy-bonus",
         "gspo-entropy-bonus"],
)
def test_a_step_has_the_same_loss_and_gradients_for_any_gradient_accumulation(tiny_model_dir, training):
    """gradientAccumulationSteps is memory, not maths: 1, a divisor of the batch, or not (6 completions in
    4 micro-batches of 2, 2, 1, 1; in 5; in 6), the step's loss, metrics and every gradient are the same."""
    from types import SimpleNamespace

    from grpo_runtime.engines import Completion
    from grpo_runtime.model import load_policy
    from grpo_runtime.trainer import Trainer, batch_logprobs, build_batch, loss_config, split_micro_batches

    job = parse_job(tiny_job(tiny_model_dir, "unused", beta=0.04, **training))
    policy = load_policy(job.spec.model, job.spec.lora, seed=0)
    for name, param in policy.model.named_parameters():  # LoRA B starts at 0: move it, so every path has a gradient
        if "lora_B" in name:
            param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 7, 3, 6, 2]
    completions = [Completion(i // 3, torch.randint(3, 60, (n,), generator=g).tolist(), "", False,
                              logprobs=(-torch.rand(n, generator=g) * 4).tolist()) for i, n in enumerate(lengths)]
    batch = build_batch([[5, 6, 7, 8], [9, 10]], completions, policy.tokenizer.pad_token_id, policy.device)
    advantages = torch.tensor([1.2, -0.4, -0.8, 0.9, 0.3, -1.2])
    trainer = SimpleNamespace(policy=policy, loss_config=loss_config(job.spec, "vllm"))  # what accumulate reads
    assert trainer.loss_config.sampling_correction != "off"
    old = batch_logprobs(policy, batch, trainer.loss_config, 1)
    old = old + 0.3 * torch.randn(old.shape, generator=g)
    ref = old - 0.2
    params = [p for p in policy.model.parameters() if p.requires_grad]
    results = []
    for steps in (1, 2, 4, 5, 6):
        metrics = Trainer.accumulate(trainer, batch, advantages, split_micro_batches(len(completions), steps), old, ref,
                                     job.spec.training.entropy_coef)
        results.append((metrics, [p.grad.clone() for p in params]))
        policy.model.zero_grad(set_to_none=True)
    (want_metrics, want_grads), *others = results
    assert want_metrics["sampling_weight"] != 1.0 and want_metrics["kl"] > 0
    assert all(g.abs().max() > 0 for g in want_grads)
    for metrics, grads in others:
        assert metrics.keys() == want_metrics.keys()
        for key in metrics:
            assert metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-7), key
        for got, want in zip(grads, want_grads, strict=True):
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_sampling_correction_auto_is_token_truncate_for_vllm_and_off_for_hf(tiny_model_dir):
    """On by default where the sampler's weights are not the learner's. TRL's default mode is sequence_mask;
    ours is token_truncate on purpose (README, "The GRPO loss")."""
    from grpo_runtime.trainer import loss_config

    spec = parse_job(tiny_job(tiny_model_dir, "unused")).spec
    assert loss_config(spec, "vllm").sampling_correction == "token_truncate"
    assert loss_config(spec, "vllm").sampling_correction_max == 3.0
    assert loss_config(spec, "hf").sampling_correction == "off"
    chosen = parse_job(tiny_job(tiny_model_dir, "unused", samplingCorrection="sequence_mask")).spec
    assert loss_config(chosen, "hf").sampling_correction == "sequence_mask"


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_score_aggregates_the_rewards_as_the_job_says(tiny_model_dir, aggregation):
    """The job's multiObjectiveAggregation reaches the advantages (grpo_runtime.advantages is checked against
    TRL's code in test_advantages.py), and a completion no reward scores gets none."""
    from types import SimpleNamespace

    from grpo_runtime.advantages import group_advantages
    from grpo_runtime.data import PromptSampler
    from grpo_runtime.engines import Completion
    from grpo_runtime.rewards import load_rewards
    from grpo_runtime.trainer import Trainer

    job = parse_job(tiny_job(tiny_model_dir, "unused", multiObjectiveAggregation=aggregation))
    rows = [{"prompt": "2 + 2?", "answer": "4"}]
    from transformers import AutoTokenizer

    trainer = SimpleNamespace(rewards=load_rewards(job.spec.rewards), job=job, generation=job.spec.generation,
                              training=job.spec.training, step=0, sampler=PromptSampler(rows, seed=0),
                              policy=SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir)))  # what score reads
    texts = ["4", "#### 4 and then some more words", "5", "five"]
    completions = [Completion(0, list(range(1, 2 + 3 * i)), text, False) for i, text in enumerate(texts)]
    scores = Trainer.score(trainer, rows, completions)
    advantages = Trainer.advantages(trainer, scores)
    assert scores.per_reward["correct"].tolist() == [1.0, 1.0, 0.0, 0.0]
    want = group_advantages(scores.matrix, torch.tensor([1.0, 0.5]), 4, aggregation=aggregation)
    assert torch.equal(advantages, want)
    other = "normalize_then_sum" if aggregation == "sum_then_normalize" else "sum_then_normalize"
    assert not torch.allclose(advantages, group_advantages(scores.matrix, torch.tensor([1.0, 0.5]), 4, aggregation=other))


def test_a_trl_reward_gets_trainer_state_and_its_logged_metrics_and_columns_are_kept(tiny_model_dir, tmp_path):
    """TRL's reward kwargs in a real run: trainer_state follows the steps (training and evaluation),
    log_metric lands in the step's metrics (under eval/ for an evaluation), log_extra in the samples."""
    out = tmp_path / "run"
    rewards = [{"name": "shaped", "function": "tests.runtime.trl_context_rewards:progress_shaped"}]
    doc = tiny_job(tiny_model_dir, out, rewards=rewards, maxSteps=3)
    doc["spec"]["evaluation"] = {"heldOut": 2}
    assert run_in_process(doc) == 0
    records = read_metrics(out)
    train = [m for m in records if "loss" in m]
    evals = [m for m in records if "eval/num_prompts" in m]
    assert [m["shaping/progress"] for m in train] == pytest.approx([0.0, 1 / 3, 2 / 3])  # steps done / maxSteps
    assert 0 < train[0]["shaping/epoch"] < train[1]["shaping/epoch"] < train[2]["shaping/epoch"]
    assert [(m["step"], m["eval/shaping/progress"]) for m in evals] == [(0, 0.0), (3, 1.0)]
    samples = [json.loads(line) for line in (out / "samples" / "step-1.jsonl").read_text().splitlines()]
    assert all(sample["extra"]["chars"] == len(sample["completion"]) for sample in samples)
    assert all("extra" in json.loads(line) for line in (out / "samples" / "eval-step-3.jsonl").read_text().splitlines())


@pytest.mark.parametrize("scheduler,after", [("constant", [1.0, 1.0]), ("linear", [0.75, 0.5]),
                                             ("cosine", [0.8535534, 0.5])])
def test_every_schedule_warms_up_first(tiny_model_dir, scheduler, after):
    """warmupRatio applies to each schedule (transformers' own "constant" would skip it), over maxSteps x
    numIterations optimizer steps."""
    from grpo_runtime.trainer import lr_schedule

    training = parse_job(tiny_job(tiny_model_dir, "unused", maxSteps=4, numIterations=2, warmupRatio=0.5,
                                  lrScheduler=scheduler, learningRate=1.0)).spec.training
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = lr_schedule(optimizer, training)
    rates = []
    for _ in range(7):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]  # 4 of the 8 optimizer steps warm up
    assert rates[5:] == pytest.approx(after)


def test_kl_is_zero_until_the_adapter_moves(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    doc = tiny_job(tiny_model_dir, out, maxSteps=2, beta=0.1, lossType="grpo", gradientAccumulationSteps=2)
    assert run_in_process(doc) == 0
    metrics = read_metrics(out)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # before any update policy == reference
    assert metrics[1]["kl"] > 0  # after an update the adapter has moved away from the reference


def test_num_iterations_reuses_the_batch_with_the_clipped_ratio(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    doc = tiny_job(tiny_model_dir, out, maxSteps=1, beta=0.1, numIterations=3, epsilon=0.01, lossType="bnpo")
    assert run_in_process(doc) == 0
    (metrics,) = read_metrics(out)
    # passes 2 and 3 see a policy that already moved: KL against the reference and clipping show it
    assert metrics["kl"] > 0
    assert metrics["clip_ratio"] > 0


def test_mask_truncated_completions_leaves_unfinished_answers_out_of_the_loss(tiny_model_dir, tmp_path):
    """2 tokens are too few for the random model to end an answer: every completion is truncated, so with
    maskTruncatedCompletions nothing is left to learn from (TRL's build_batch-level masking: tests/runtime/
    test_loss_vs_trl.py compares the loss with TRL's for every loss type)."""
    steps = {}
    for masked in (False, True):
        out = tmp_path / f"run-{masked}"
        rewards = [{"name": "len7", "function": "tests.runtime.crash_rewards:die_on_call"}]  # varies with the text
        doc = tiny_job(tiny_model_dir, out, rewards=rewards, maxSteps=1, maskTruncatedCompletions=masked)
        doc["spec"]["generation"]["maxCompletionLength"] = 2
        assert run_in_process(doc) == 0
        (steps[masked],) = read_metrics(out)
    for metrics in steps.values():
        assert metrics["clipped_ratio"] == 1.0  # every completion hit the limit
        assert metrics["reward_std"] > 0  # the rewards still differ: the advantages are not zero
    assert steps[False]["grad_norm"] > 0
    assert steps[True]["grad_norm"] == 0.0 and steps[True]["loss"] == 0.0


def test_train_to_s3(tiny_model_dir, tmp_path, s3_bucket):
    import boto3

    doc = tiny_job(tiny_model_dir, s3_bucket.uri("jobs/tiny"), maxSteps=2)
    doc["spec"]["output"]["endpoint"] = s3_bucket.endpoint
    assert run_in_process(doc) == 0
    client = boto3.client("s3", endpoint_url=s3_bucket.endpoint, region_name="us-east-1")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket.name, Prefix="jobs/tiny/")["Contents"]}
    assert {"jobs/tiny/spec.yaml", "jobs/tiny/metrics/part-000000.jsonl", "jobs/tiny/checkpoints/LATEST",
            "jobs/tiny/final/adapter_model.safetensors", "jobs/tiny/checkpoints/step-2/trainer_state.pt"} <= keys
    body = client.get_object(Bucket=s3_bucket.name, Key="jobs/tiny/metrics/part-000000.jsonl")["Body"].read().decode()
    assert [json.loads(line)["step"] for line in body.splitlines()] == [1, 2]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d, tmp: d["spec"]["model"].update(name=str(tmp / "no-such-model")), "spec.model.name"),
        (lambda d, tmp: d["spec"]["dataset"].update(source=str(tmp / "empty.jsonl")), "has no rows"),
        (lambda d, tmp: d["spec"]["rewards"].append({"name": "x", "function": "no_such_mod_q:fn"}), "spec.rewards[2].function: cannot import"),
        (lambda d, tmp: d["spec"]["dataset"].update(source="builtin:nope"), "spec.dataset.source: unknown builtin dataset"),
    ],
    ids=["missing-model", "empty-dataset", "reward-import", "unknown-builtin"],
)
def test_bad_input_exits_2_naming_the_cause(tiny_model_dir, tmp_path, mutate, message):
    (tmp_path / "empty.jsonl").write_text("")
    doc = tiny_job(tiny_model_dir, tmp_path / "out")
    mutate(doc, tmp_path)
    result = grpo_train(write_job(tmp_path, doc))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_reward_that_raises_exits_2_and_keeps_written_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    rewards = [{"name": "grader", "function": "tests.runtime.crash_rewards:raise_on_call"}]
    doc = tiny_job(tiny_model_dir, out, rewards=rewards, maxSteps=4)
    result = grpo_train(write_job(tmp_path, doc), env={"GRPO_TEST_RAISE_ON_CALL": "3"})
    assert result.returncode == 2
    assert "reward 'grader' (tests.runtime.crash_rewards:raise_on_call) raised ValueError: the grader fell over" in result.stderr
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-2"
    assert (out / "checkpoints" / "step-2" / "adapter_model.safetensors").is_file()
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
