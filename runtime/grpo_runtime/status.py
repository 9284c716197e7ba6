"""The runtime's half of the status contract: report training progress on the GRPOJob.

In a pod the operator sets GRPOJOB_NAME and GRPOJOB_NAMESPACE, and the pod's service
account may get/patch the status of that one job. Every step the trainer calls
`update({...})`; the sink merge-patches `status.progress` (and nothing else: the rest of the
status is the operator's) on the status subresource, adding `updatedAt`.

A failed patch is logged as a warning and dropped: training must not die because the API
server blipped, and the next step's report supersedes it anyway. Non-finite floats (NaN,
inf) become null, as JSON has no such numbers. The `kubernetes` package is imported only
here, lazily: `grpo train` without a cluster never needs it.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import datetime, timezone
from typing import Any

from grpo_runtime.messages import typed_first_line
from grpo_runtime.spec import API_VERSION

log = logging.getLogger(__name__)

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "grpojobs"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    return value


class KubernetesProgressSink:
    """Patches status.progress of one GRPOJob; never raises from update().

    Keys the trainer sends: step, totalSteps, reward, rewards (name -> mean), kl,
    completionLength, tokensPerSecond, latestCheckpoint every step, and eval (see
    `eval_progress`) after each evaluation; this adds updatedAt. A merge patch keeps the keys
    it does not send, so eval stays until the next evaluation replaces it.
    """

    def __init__(self, name: str, namespace: str, api: Any = None):
        self.name, self.namespace = name, namespace
        self._api = api
        self._failing = False  # warn once per outage, not once per step

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.CustomObjectsApi()
        return self._api

    def update(self, progress: dict[str, Any]) -> None:
        body = {key: _finite(value) for key, value in progress.items()}
        body["updatedAt"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            self._client().patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                {"status": {"progress": body}},
                _content_type="application/merge-patch+json",
            )
        except Exception as exc:  # noqa: BLE001  (any failure: report, keep training)
            log.log(
                logging.DEBUG if self._failing else logging.WARNING,
                "could not report progress to GRPOJob %s/%s (training goes on): %s",
                self.namespace,
                self.name,
                _short(exc),
            )
            self._failing = True
        else:
            if self._failing:
                log.info("progress reports to GRPOJob %s/%s work again", self.namespace, self.name)
            self._failing = False

    def __repr__(self) -> str:
        return f"KubernetesProgressSink({self.namespace}/{self.name})"


def eval_progress(line: dict[str, Any]) -> dict[str, Any]:
    """status.progress.eval from an eval record of the metrics (see grpo_runtime.evaluation): step,
    accuracy (the headline), numSamples, passAtK (k > 1), rewards (name -> mean, as progress.rewards)
    and accuracies (name -> share of completions reaching that reward's threshold)."""
    per_reward: dict[str, dict[str, Any]] = {"mean": {}, "accuracy": {}}
    for key, value in line.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] in per_reward:
            per_reward[parts[2]][parts[1]] = value
    progress = {
        "step": line["step"],
        "accuracy": line["eval/accuracy"],
        "numSamples": line["eval/num_samples"],
        "rewards": per_reward["mean"],
        "accuracies": per_reward["accuracy"],
    }
    if line["eval/num_samples"] > 1:
        progress["passAtK"] = line[f"eval/pass@{line['eval/num_samples']}"]
    return progress


def _short(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return typed_first_line(exc)


def sink_from_env(env: dict[str, str] | None = None) -> KubernetesProgressSink | None:
    """The sink of the job this pod runs (GRPOJOB_NAME/GRPOJOB_NAMESPACE), or None outside a pod."""
    env = dict(os.environ) if env is None else env
    name, namespace = env.get("GRPOJOB_NAME"), env.get("GRPOJOB_NAMESPACE")
    if not name or not namespace:
        return None
    return KubernetesProgressSink(name, namespace)
