"""A GRPOJob of two nodes, end to end, with doubles only where nothing real can run here: the real
operator makes the gang's two pods and their headless Service in the API-server double; the local
kubelet runs each pod's `grpo train` as a local process and stands in for the cluster's DNS (pod 0's
name is this host), so the two meet over loopback as one torchrun world of two ranks (gloo on the
CPU); checkpoints go to moto's S3 server.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from k8s_doubles import eventually, stored  # noqa: E402
from k8s_fixtures import apiserver, bare_apiserver, kubeconfig, operator  # noqa: E402,F401
from test_apply_to_succeeded import (  # noqa: E402,F401  (kubelet and tiny_model are fixtures)
    JOBS, create_credentials, job, job_manifest, kubelet, s3_keys, s3_metrics, tiny_model)

pytestmark = pytest.mark.asyncio

REWARDS = [{"name": "correct", "function": "builtin:exact_answer"}]


def two_node_manifest(name: str, model: Path, bucket, *, max_steps: int) -> dict:
    manifest = job_manifest(name, model, bucket, rewards=REWARDS, max_steps=max_steps)
    manifest["spec"]["resources"] = {"nodes": 2}  # one GPU each: a world of 2 ranks, one prompt of a step each
    return manifest


def finished(apiserver, name: str) -> bool:
    return job(apiserver, name).get("status", {}).get("phase") in ("Succeeded", "Failed")


def logs(kubelet, pods: list[str]) -> str:
    return "\n".join(f"--- {pod}\n{kubelet.log('default', pod)[-3000:]}" for pod in pods)


async def test_a_two_node_job_trains_as_one_world_and_succeeds(  # noqa: F811
        apiserver, operator, kubelet, s3_bucket, tiny_model):
    await create_credentials(apiserver, s3_bucket)
    gang = ["pair-attempt-1-0", "pair-attempt-1-1"]
    async with operator():
        response = await apiserver.post(JOBS, json=two_node_manifest("pair", tiny_model, s3_bucket, max_steps=3))
        assert response.status == 201
        await eventually(lambda: finished(apiserver, "pair"), timeout=400)
    status = job(apiserver, "pair")["status"]
    assert status["phase"] == "Succeeded", (status, logs(kubelet, gang))
    assert all(("default", pod) in kubelet.processes for pod in gang)  # both pods ran, as local processes
    assert kubelet.exit_codes[("default", gang[0])] == 0
    assert (status["attempt"], status["restarts"], status["ranks"]) == (1, 0, 2)
    assert stored(apiserver, "v1/services", "default", "pair-nodes")["spec"]["clusterIP"] == "None"
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == 3
    assert {"jobs/pair/final/adapter_model.safetensors", "jobs/pair/checkpoints/LATEST"} <= s3_keys(
        s3_bucket, "jobs/pair/")
    assert [m["step"] for m in s3_metrics(s3_bucket, "jobs/pair")] == [1, 2, 3]


async def test_a_killed_pod_restarts_the_gang_from_the_last_checkpoint(  # noqa: F811
        apiserver, operator, kubelet, s3_bucket, tiny_model):
    await create_credentials(apiserver, s3_bucket)
    first, second = ["again-attempt-1-0", "again-attempt-1-1"], ["again-attempt-2-0", "again-attempt-2-1"]
    async with operator():
        response = await apiserver.post(JOBS, json=two_node_manifest("again", tiny_model, s3_bucket, max_steps=6))
        assert response.status == 201
        # checkpoint.everySteps is 2: kill rank 1's pod (its container, every process of it) once step 2 is saved
        await eventually(lambda: finished(apiserver, "again") or job(apiserver, "again")["status"].get(
            "progress", {}).get("latestCheckpoint") == "checkpoints/step-2", timeout=400)
        assert not finished(apiserver, "again"), logs(kubelet, first)
        kubelet.kill("default", first[1])
        await eventually(lambda: finished(apiserver, "again"), timeout=400)
    status = job(apiserver, "again")["status"]
    assert status["phase"] == "Succeeded", (status, logs(kubelet, first + second))
    assert kubelet.exit_codes[("default", first[1])] == 137
    assert (status["attempt"], status["restarts"], status["disruptions"]) == (2, 1, 0)
    assert all(("default", pod) in kubelet.processes for pod in second)  # a new attempt of both pods
    assert "resumed from checkpoints/step-2 at step 2" in kubelet.log("default", second[0])
    assert [m["step"] for m in s3_metrics(s3_bucket, "jobs/again")] == [1, 2, 3, 4, 5, 6]
