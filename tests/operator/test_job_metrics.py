"""Per-job Prometheus metrics: what a dashboard reads, parsed from the real exposition text with
prometheus_client's own parser; bounded labels; absent status fields are no series; a deleted
job's series go with it."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from grpo_operator.metrics import Metrics
from k8s_doubles import eventually

RUNNING = {
    "phase": "Running",
    "restarts": 1,
    "disruptions": 2,
    "progress": {
        "step": 40,
        "totalSteps": 100,
        "reward": 0.5625,
        "rewards": {"correct": 0.5, "format": 0.125},
        "kl": 0.0031,
        "completionLength": 187.5,
        "tokensPerSecond": 812.25,
        "tools": {"callFrequency": 1.5, "failureFrequency": 0.25, "turns": 2.5},
        "eval": {"step": 40, "accuracy": 0.42, "rewards": {"correct": 0.42}},
    },
}


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, from the exposition text as Prometheus would scrape it."""
    found = {}
    for family in text_string_to_metric_families(metrics.text()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def job_labels(job: str, **more: str) -> frozenset:
    return frozenset({"namespace": "ml", "job": job, **more}.items())


def test_a_jobs_status_becomes_its_series():
    metrics = Metrics()
    metrics.job_status("ml", "gsm8k", RUNNING)
    got = samples(metrics)
    expected = {
        "grpo_job_step": 40, "grpo_job_total_steps": 100, "grpo_job_reward": 0.5625, "grpo_job_kl": 0.0031,
        "grpo_job_completion_length": 187.5, "grpo_job_tokens_per_second": 812.25, "grpo_job_eval_accuracy": 0.42,
        "grpo_job_eval_step": 40, "grpo_job_restarts": 1, "grpo_job_disruptions": 2,
        "grpo_job_tool_calls_per_episode": 1.5, "grpo_job_tool_failure_ratio": 0.25,
    }  # fmt: skip
    for name, value in expected.items():
        assert got[(name, job_labels("gsm8k"))] == pytest.approx(value), name
    assert got[("grpo_job_reward_mean", job_labels("gsm8k", reward="correct"))] == 0.5
    assert got[("grpo_job_reward_mean", job_labels("gsm8k", reward="format"))] == 0.125
    assert got[("grpo_job_eval_reward_mean", job_labels("gsm8k", reward="correct"))] == 0.42
    assert got[("grpo_job_phase", job_labels("gsm8k", phase="Running"))] == 1
    assert got[("grpo_job_phase", job_labels("gsm8k", phase="Failed"))] == 0
    assert got[("grpo_jobs", frozenset({"phase": "Running"}.items()))] == 1


def test_labels_are_namespace_job_and_reward_only():
    metrics = Metrics()
    for i in range(3):
        metrics.job_status("ml", f"job-{i}", RUNNING)
    allowed = {"namespace", "job", "reward", "phase"}
    per_job = [key for key in samples(metrics) if key[0].startswith("grpo_job_")]
    assert per_job
    for name, labels in per_job:
        keys = {k for k, _ in labels}
        assert {"namespace", "job"} <= keys <= allowed, (name, keys)
        assert "phase" not in keys or name == "grpo_job_phase"
    # series per job: 12 gauges + 2 rewards + 1 eval reward + 5 phases
    assert len(per_job) == 3 * 20


def test_fields_the_status_lacks_are_no_series():
    metrics = Metrics()
    metrics.job_status("ml", "fresh", {"phase": "Pending"})  # no progress, no restarts yet
    metrics.job_status("ml", "no-eval", {"phase": "Running", "progress": {"step": 3, "kl": None, "rewards": {"x": None}}})
    got = samples(metrics)
    assert not any(labels == job_labels("fresh") for _, labels in got)
    assert got[("grpo_job_step", job_labels("no-eval"))] == 3
    names = {name for name, labels in got if ("job", "no-eval") in labels}
    assert not names & {"grpo_job_kl", "grpo_job_eval_accuracy", "grpo_job_disruptions", "grpo_job_reward_mean"}


def test_a_deleted_job_takes_its_series_along():
    metrics = Metrics()
    metrics.job_status("ml", "gone", RUNNING)
    metrics.job_status("ml", "kept", RUNNING)
    metrics.job_status("ml", "gone", None)
    names = {labels for _, labels in samples(metrics)}
    assert not any(("job", "gone") in labels for labels in names)
    assert any(("job", "kept") in labels for labels in names)
    assert samples(metrics)[("grpo_jobs", frozenset({"phase": "Running"}.items()))] == 1


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_the_operator_exports_what_the_pod_reports_and_forgets_deleted_jobs(apiserver, operator):
    from test_operator import JOBS_URL, create_job, job

    async with operator() as memo:
        await create_job(apiserver, "watched")
        progress = {"step": 7, "totalSteps": 20, "reward": 0.25, "rewards": {"answer": 0.25}, "kl": 0.01}
        response = await apiserver.patch(
            f"{JOBS_URL}/watched/status", data=json.dumps({"status": {"progress": progress}}),
            headers={"Content-Type": "application/merge-patch+json"},
        )  # fmt: skip
        assert response.status == 200

        def reward_seen() -> bool:
            got = samples(memo.metrics)
            labels = frozenset({"namespace": "default", "job": "watched", "reward": "answer"}.items())
            return got.get(("grpo_job_reward_mean", labels)) == 0.25 and any(
                name == "grpo_job_step" and ("job", "watched") in l for name, l in got
            )

        await eventually(reward_seen)
        assert (await apiserver.delete(f"{JOBS_URL}/watched")).status == 200
        await eventually(lambda: job(apiserver, "watched") is None)
        await eventually(lambda: not any(("job", "watched") in labels for _, labels in samples(memo.metrics)))


def test_the_eval_series_read_what_the_runtime_patches():
    """status.progress.eval as grpo_runtime.status.eval_progress writes it, not a hand-written copy."""
    from grpo_runtime.status import eval_progress

    record = {"step": 20, "eval/accuracy": 0.25, "eval/correct/mean": 0.25, "eval/correct/accuracy": 0.25,
              "eval/format/mean": 0.75, "eval/format/accuracy": 0.5, "eval/num_samples": 1, "eval/num_prompts": 4,
              "eval/completion_length": 30.0}
    metrics = Metrics()
    metrics.job_status("ml", "evaluated", {"phase": "Running", "progress": {"step": 20, "eval": eval_progress(record)}})
    got = samples(metrics)
    assert got[("grpo_job_eval_accuracy", job_labels("evaluated"))] == 0.25
    assert got[("grpo_job_eval_step", job_labels("evaluated"))] == 20
    assert got[("grpo_job_eval_reward_mean", job_labels("evaluated", reward="correct"))] == 0.25
    assert got[("grpo_job_eval_reward_mean", job_labels("evaluated", reward="format"))] == 0.75
