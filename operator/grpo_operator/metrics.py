"""Prometheus metrics of the operator: jobs by phase, pods created.

Kept in a registry of their own (not prometheus_client's global one), so that several
operators in one process (tests) do not collide. prometheus_client is imported only when
metrics are served or read.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Gauge

        self.registry = CollectorRegistry()
        self._jobs = Gauge("grpo_jobs", "GRPOJobs seen by this operator, by phase.", ["phase"], registry=self.registry)
        self._pods = PromCounter("grpo_pods_created", "Training pods created.", registry=self.registry)
        self._phases: dict[tuple[str, str], str] = {}
        self._publish()

    def job_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a job's phase; None forgets the job (deleted)."""
        if phase is None:
            self._phases.pop((namespace, name), None)
        else:
            self._phases[(namespace, name)] = phase
        self._publish()

    def pod_created(self) -> None:
        self._pods.inc()

    def _publish(self) -> None:
        counts = Counter(self._phases.values())
        for phase in PHASES:
            self._jobs.labels(phase=phase).set(counts.get(phase, 0))

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, port: int) -> Any:
        """Serve /metrics on 0.0.0.0:port from a background thread."""
        from prometheus_client import start_http_server

        return start_http_server(port, registry=self.registry)
