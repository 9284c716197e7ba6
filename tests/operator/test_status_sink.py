"""grpo_runtime.status: the runtime's progress reports on its GRPOJob (the other half of the status contract)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import pytest
from kubernetes import client

from grpo_runtime.status import KubernetesProgressSink, sink_from_env
from k8s_doubles import eventually, stored
from local_kubelet import LocalKubelet

pytestmark = pytest.mark.asyncio

JOB = {
    "apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob", "metadata": {"name": "run"},
    "spec": {"model": {"name": "tiny"}, "dataset": {"source": "builtin:arithmetic"},
             "rewards": [{"name": "answer", "function": "builtin:exact_answer"}], "output": {"uri": "s3://b/p"}},
}
STEP = {"step": 7, "totalSteps": 50, "reward": 0.75, "rewards": {"answer": 0.75}, "kl": 0.01,
        "completionLength": 120.5, "tokensPerSecond": 900.0, "latestCheckpoint": "s3://b/p/checkpoints/step-5"}


def sink_for(apiserver) -> KubernetesProgressSink:
    api = client.ApiClient(client.Configuration(host=str(apiserver.url).rstrip("/")))
    return KubernetesProgressSink("run", "default", api=client.CustomObjectsApi(api))


def job_status(apiserver) -> dict:
    return (stored(apiserver, "grpo.dev/v1alpha1/grpojobs", "default", "run") or {}).get("status") or {}


async def create_job(apiserver) -> None:
    response = await apiserver.post("/apis/grpo.dev/v1alpha1/namespaces/default/grpojobs", json=JOB)
    assert response.status == 201


async def test_no_sink_outside_a_pod():
    assert sink_from_env({}) is None
    assert sink_from_env({"GRPOJOB_NAME": "run"}) is None
    sink = sink_from_env({"GRPOJOB_NAME": "run", "GRPOJOB_NAMESPACE": "team"})
    assert (sink.name, sink.namespace) == ("run", "team")


async def test_update_patches_only_progress_on_the_status_subresource(apiserver):
    await create_job(apiserver)
    operator_part = {"status": {"phase": "Running", "podName": "run-attempt-1"}}
    await apiserver.patch("/apis/grpo.dev/v1alpha1/namespaces/default/grpojobs/run/status",
                          data=json.dumps(operator_part), headers={"Content-Type": "application/merge-patch+json"})
    await asyncio.to_thread(sink_for(apiserver).update, STEP)

    status = job_status(apiserver)
    assert status["phase"] == "Running" and status["podName"] == "run-attempt-1"  # untouched
    assert {k: status["progress"][k] for k in STEP} == STEP
    assert status["progress"]["updatedAt"].endswith("Z")
    (patch,) = [r for r in apiserver.served if r.method == "PATCH" and r.subresource == "status"
                and "progress" in (r.data or {}).get("status", {})]
    assert patch.headers["Content-Type"] == "application/merge-patch+json"


async def test_non_finite_numbers_become_null(apiserver):
    await create_job(apiserver)
    await asyncio.to_thread(sink_for(apiserver).update, {"step": 1, "kl": float("inf"), "rewards": {"a": float("nan")}})
    progress = job_status(apiserver)["progress"]
    assert progress["step"] == 1 and "kl" not in progress  # null in a merge patch removes the key


async def test_a_failing_api_server_is_a_warning_not_a_crash(caplog):
    configuration = client.Configuration(host="http://127.0.0.1:9")  # nothing listens there
    configuration.retries = 0
    api = client.ApiClient(configuration)
    sink = KubernetesProgressSink("run", "default", api=client.CustomObjectsApi(api))
    with caplog.at_level(logging.DEBUG, logger="grpo_runtime.status"):
        sink.update({"step": 1})
        sink.update({"step": 2})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "grpo_runtime.status"]
    assert len(warnings) == 1  # once per outage, not once per step
    assert "training goes on" in warnings[0].getMessage()


async def test_a_pod_reports_progress_through_the_operator_given_env(apiserver, operator, kubeconfig, tmp_path):
    """apply -> operator -> pod (a local process) -> sink_from_env().update() -> Succeeded, with progress."""
    script = (
        "from grpo_runtime.status import sink_from_env\n"
        "sink = sink_from_env()\n"
        "for step in range(1, 4):\n"
        "    sink.update({'step': step, 'totalSteps': 3, 'reward': step / 4})\n"
    )
    argv = lambda pod: [sys.executable, "-c", script]  # noqa: E731  (instead of `grpo train`)
    async with LocalKubelet(str(apiserver.url), root=tmp_path / "k", env={"KUBECONFIG": str(kubeconfig)},
                            argv=argv) as kubelet:
        async with operator():
            await create_job(apiserver)
            await eventually(lambda: job_status(apiserver).get("phase") == "Succeeded")
        assert kubelet.exit_codes[("default", "run-attempt-1")] == 0, kubelet.log("default", "run-attempt-1")
    progress = job_status(apiserver)["progress"]
    assert (progress["step"], progress["totalSteps"], progress["reward"]) == (3, 3, 0.75)
