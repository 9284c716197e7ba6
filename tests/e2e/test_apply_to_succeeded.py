"""The whole path with doubles only where nothing real can run here: a GRPOJob is created in
the API-server double, the real operator makes its pod, the local kubelet double runs the
pod's real command (`grpo train`) on a tiny model with checkpoints in moto's S3 server, the
runtime patches status.progress, and the operator marks the job Succeeded.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import boto3
import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from k8s_doubles import eventually, stored  # noqa: E402
from k8s_fixtures import apiserver, bare_apiserver, kubeconfig, operator  # noqa: E402,F401
from local_kubelet import LocalKubelet  # noqa: E402

from tests.runtime.conftest import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parents[2]
JOBS = "/apis/grpo.dev/v1alpha1/namespaces/default/grpojobs"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-e2e"))


@pytest_asyncio.fixture
async def kubelet(apiserver, kubeconfig, tmp_path):  # noqa: F811
    # the repository (for tests.* reward modules) first, then whatever the test run itself imports from
    pythonpath = os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    env = {"KUBECONFIG": str(kubeconfig), "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    async with LocalKubelet(str(apiserver.url), root=tmp_path / "kubelet", env=env) as k:
        yield k


def job_manifest(name: str, model: Path, bucket, *, rewards: list[dict], max_steps: int) -> dict:
    return {
        "apiVersion": "grpo.dev/v1alpha1",
        "kind": "GRPOJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"name": str(model), "maxSeqLength": 128},
            "lora": {"rank": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
            "dataset": {"source": "builtin:arithmetic"},
            "rewards": rewards,
            "generation": {"engine": "hf", "numGenerations": 2, "maxPromptLength": 48, "maxCompletionLength": 8},
            "training": {"maxSteps": max_steps, "promptsPerStep": 2, "learningRate": 1e-3,
                         "gradientCheckpointing": "off"},
            "checkpoint": {"everySteps": 2},
            "output": {"uri": bucket.uri(f"jobs/{name}"), "endpoint": bucket.endpoint,
                       "credentialsSecret": "s3-creds"},
            "runPolicy": {"backoffLimit": 2},
        },
    }


async def create_credentials(apiserver, bucket) -> None:
    data = {"AWS_ACCESS_KEY_ID": "testing-access-key", "AWS_SECRET_ACCESS_KEY": bucket.secret}
    response = await apiserver.post("/api/v1/namespaces/default/secrets", json={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    })
    assert response.status == 201


def job(apiserver, name):
    return stored(apiserver, "grpo.dev/v1alpha1/grpojobs", "default", name) or {}


def s3_keys(bucket, prefix):
    client = boto3.client("s3", endpoint_url=bucket.endpoint, region_name="us-east-1")
    return {o["Key"] for o in client.list_objects_v2(Bucket=bucket.name, Prefix=prefix).get("Contents", [])}


def s3_metrics(bucket, prefix):
    """The run's metrics stream under `prefix`, read as `grpo report` reads it."""
    from grpo_runtime.metrics_log import read_metrics
    from grpo_runtime.storage import open_storage

    with pytest.MonkeyPatch.context() as env:  # the test took the credentials away from this process
        env.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
        env.setenv("AWS_SECRET_ACCESS_KEY", bucket.secret)
        return read_metrics(open_storage(bucket.uri(prefix), endpoint=bucket.endpoint))


async def test_apply_trains_in_a_pod_and_succeeds(apiserver, operator, kubelet, s3_bucket, tiny_model, monkeypatch):  # noqa: F811
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the pod must get them from the Secret
        monkeypatch.delenv(var)
    await create_credentials(apiserver, s3_bucket)
    rewards = [{"name": "correct", "function": "builtin:exact_answer"},
               {"name": "short", "function": "builtin:length", "args": {"target": 2, "scale": 6}}]
    async with operator():
        response = await apiserver.post(JOBS, json=job_manifest("tiny", tiny_model, s3_bucket, rewards=rewards, max_steps=3))
        assert response.status == 201
        done = await eventually(lambda: job(apiserver, "tiny").get("status", {}).get("phase") in ("Succeeded", "Failed"), timeout=300)
        assert done
    status = job(apiserver, "tiny")["status"]
    log = kubelet.log("default", "tiny-attempt-1")
    assert status["phase"] == "Succeeded", (status, log[-3000:])
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == 3
    assert set(progress["rewards"]) == {"correct", "short"}
    assert progress["latestCheckpoint"] == "checkpoints/step-3"
    assert {"jobs/tiny/final/adapter_model.safetensors", "jobs/tiny/checkpoints/LATEST",
            "jobs/tiny/metrics/part-000000.jsonl", "jobs/tiny/spec.yaml"} <= s3_keys(s3_bucket, "jobs/tiny/")
    assert [m["step"] for m in s3_metrics(s3_bucket, "jobs/tiny")] == [1, 2, 3]
    assert s3_bucket.secret not in json.dumps(job(apiserver, "tiny"))
    assert s3_bucket.secret not in log


async def test_killed_pod_is_replaced_and_resumes_from_the_last_checkpoint(apiserver, operator, kubelet, s3_bucket, tiny_model):  # noqa: F811
    await create_credentials(apiserver, s3_bucket)
    # the reward kills its process on its 3rd call: inside step 3, after step-2's checkpoint
    rewards = [{"name": "len7", "function": "tests.runtime.crash_rewards:die_on_call", "args": {"die_on_call": 3}}]
    async with operator():
        response = await apiserver.post(JOBS, json=job_manifest("flaky", tiny_model, s3_bucket, rewards=rewards, max_steps=4))
        assert response.status == 201
        await eventually(lambda: job(apiserver, "flaky").get("status", {}).get("phase") in ("Succeeded", "Failed"), timeout=400)
    status = job(apiserver, "flaky")["status"]
    assert kubelet.exit_codes[("default", "flaky-attempt-1")] == 137
    second = kubelet.log("default", "flaky-attempt-2")
    assert status["phase"] == "Succeeded", (status, second[-3000:])
    assert status["restarts"] == 1
    assert "resumed from checkpoints/step-2 at step 2" in second
    assert [m["step"] for m in s3_metrics(s3_bucket, "jobs/flaky")] == [1, 2, 3, 4]
