"""Prometheus metrics of the operator: jobs by phase, pods created, and each job's progress.

Kept in a registry of their own (not prometheus_client's global one), so that several
operators in one process (tests) do not collide. prometheus_client is imported only when
metrics are served or read.

Per-job series come from the job's status as the operator last saw it (the runtime writes
`status.progress`, the operator the rest): labels namespace and job, plus reward for the
per-reward means, nothing else (bounded cardinality: jobs x reward functions). A field the status
lacks (no eval yet, an older runtime, a null KL) is no series, never a 0. A deleted job's series
go with it.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")

# name, help, where in the status (a path of keys): one gauge per job
JOB_GAUGES = (
    ("grpo_job_step", "Optimizer steps done (status.progress.step).", ("progress", "step")),
    ("grpo_job_total_steps", "Optimizer steps to run (status.progress.totalSteps).", ("progress", "totalSteps")),
    ("grpo_job_reward", "Mean summed (weighted) reward of the last step.", ("progress", "reward")),
    ("grpo_job_kl", "KL to the reference policy at the last step.", ("progress", "kl")),
    ("grpo_job_completion_length", "Mean completion length of the last step, in tokens.", ("progress", "completionLength")),
    ("grpo_job_tokens_per_second", "Generation throughput of the last step.", ("progress", "tokensPerSecond")),
    ("grpo_job_tool_calls_per_episode", "Tool calls per episode at the last step (spec.tools).",
     ("progress", "tools", "callFrequency")),
    ("grpo_job_tool_failure_ratio", "Share of the last step's tool calls that failed or timed out.",
     ("progress", "tools", "failureFrequency")),
    ("grpo_job_eval_accuracy", "Accuracy of the latest evaluation (status.progress.eval.accuracy).", ("progress", "eval", "accuracy")),
    ("grpo_job_eval_step", "Step of the latest evaluation.", ("progress", "eval", "step")),
    ("grpo_job_restarts", "Failed attempts retried so far (status.restarts).", ("restarts",)),
    ("grpo_job_disruptions", "Attempts lost to disruptions (preemption, eviction) (status.disruptions).", ("disruptions",)),
)
# name, help, where the {reward name: mean} mapping is: one gauge per job and reward
REWARD_GAUGES = (
    ("grpo_job_reward_mean", "Mean of one reward function at the last step.", ("progress", "rewards")),
    ("grpo_job_eval_reward_mean", "Mean of one reward function at the latest evaluation.", ("progress", "eval", "rewards")),
)
PHASE_GAUGE = ("grpo_job_phase", "1 for the job's current phase, 0 for the others.")


def _at(status: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = status
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


class _JobCollector:
    """Yields the per-job families at scrape time from the statuses the operator holds."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []  # families are known only at collect time; no duplicate checks needed

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        jobs = self.metrics.snapshot()
        for name, help_text, path in JOB_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=["namespace", "job"])
            for (namespace, job), status in jobs:
                value = _number(_at(status, path))
                if value is not None:
                    family.add_metric([namespace, job], value)
            yield family
        for name, help_text, path in REWARD_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=["namespace", "job", "reward"])
            for (namespace, job), status in jobs:
                means = _at(status, path)
                for reward, mean in sorted(means.items()) if isinstance(means, Mapping) else ():
                    value = _number(mean)
                    if value is not None:
                        family.add_metric([namespace, job, str(reward)], value)
            yield family
        family = GaugeMetricFamily(*PHASE_GAUGE, labels=["namespace", "job", "phase"])
        for (namespace, job), status in jobs:
            phase = status.get("phase")
            if phase in PHASES:
                for candidate in PHASES:
                    family.add_metric([namespace, job, candidate], 1.0 if candidate == phase else 0.0)
        yield family


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Gauge

        self.registry = CollectorRegistry()
        self._jobs = Gauge("grpo_jobs", "GRPOJobs seen by this operator, by phase.", ["phase"], registry=self.registry)
        self._pods = PromCounter("grpo_pods_created", "Training pods created.", registry=self.registry)
        self._lock = threading.Lock()  # the HTTP server's thread reads what the event loop writes
        self._statuses: dict[tuple[str, str], dict[str, Any]] = {}
        self.registry.register(_JobCollector(self))
        self._publish()

    def job_status(self, namespace: str, name: str, status: Mapping[str, Any] | None) -> None:
        """The job's status as last seen (an event of the job); None forgets the job (deleted)."""
        with self._lock:
            if status is None:
                self._statuses.pop((namespace, name), None)
            else:
                self._statuses[(namespace, name)] = dict(status)
        self._publish()

    def job_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a job's phase (as just decided); None forgets the job (deleted)."""
        with self._lock:
            if phase is None:
                self._statuses.pop((namespace, name), None)
            else:
                self._statuses.setdefault((namespace, name), {})["phase"] = phase
        self._publish()

    def pod_created(self) -> None:
        self._pods.inc()

    def snapshot(self) -> list[tuple[tuple[str, str], dict[str, Any]]]:
        with self._lock:
            return sorted((key, dict(status)) for key, status in self._statuses.items())

    def _publish(self) -> None:
        with self._lock:
            counts = Counter(status.get("phase") for status in self._statuses.values())
        for phase in PHASES:
            self._jobs.labels(phase=phase).set(counts.get(phase, 0))

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, port: int) -> Any:
        """Serve /metrics on 0.0.0.0:port from a background thread."""
        from prometheus_client import start_http_server

        return start_http_server(port, registry=self.registry)
