"""Kueue admits, preempts and re-admits GRPOJobs (issue 14.5): the pure decision (kueue.py), then
the real operator against the API-server double with Kueue's CRDs and a Kueue double that writes
Workload status as Kueue does, driving the example's own manifests (examples/kueue/)."""

from __future__ import annotations

import asyncio
import base64
import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from grpo_operator import kueue
from grpo_runtime.spec import parse_job
from grpo_operator import render
from k8s_doubles import eventually, stored
from kueue_double import KueueDouble, condition
from local_kubelet import LocalKubelet

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "kueue"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def queued_job(suspend: bool = True, phase: str | None = None) -> dict[str, Any]:
    job = {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob",
           "metadata": {"name": "q", "namespace": "ns", "uid": "uid-1", "labels": {kueue.QUEUE_LABEL: "grpo"}},
           "spec": {"model": {"name": "m"}, "dataset": {"source": "builtin:arithmetic"},
                    "rewards": [{"name": "a", "function": "builtin:exact_answer"}],
                    "resources": {"requests": {"cpu": "4"}, "limits": {"memory": "24Gi"}},
                    "runPolicy": {"suspend": suspend}}}
    if phase:
        job["status"] = {"phase": phase}
    return job


def workload_with(*conditions: tuple[str, str], admission: bool = False) -> dict[str, Any]:
    wl = {"metadata": {"name": kueue.workload_name(queued_job()), "generation": 1, "resourceVersion": "7"},
          "status": {"conditions": [{"type": t, "status": s, "reason": "R", "message": f"{t} {s}",
                                     "lastTransitionTime": "2026-01-01T00:00:00Z"} for t, s in conditions]}}
    if admission:
        wl["status"]["admission"] = {"clusterQueue": "grpo-gpus", "podSetAssignments": [
            {"name": "trainer", "flavors": {"nvidia.com/gpu": "h100", "cpu": "h100"}, "count": 1}]}
    return wl


# ---- the pure decision ------------------------------------------------------------------------


def test_unlabelled_jobs_are_not_kueues():
    job = queued_job(suspend=False)
    del job["metadata"]["labels"]
    assert kueue.decide(job, None, pod_active=False, now=NOW) == kueue.KueueDecision()


def test_a_queued_job_gets_a_workload_and_waits_suspended():
    d = kueue.decide(queued_job(suspend=False), None, pod_active=False, now=NOW)
    assert d.create_workload and d.suspend is True and [e.reason for e in d.events] == ["Queued"]
    d = kueue.decide(queued_job(suspend=True), workload_with(), pod_active=False, now=NOW)
    assert not d.create_workload and d.suspend is None and d.workload_status is None


def test_the_workload_is_the_training_pod_as_kueue_counts_it():
    job = queued_job()
    pod = render.pod(parse_job({**job, "metadata": {"name": "q", "namespace": "ns"}}), 1, image="img")
    wl = kueue.workload(job, pod)
    assert wl["metadata"]["name"] == kueue.workload_name(job) and wl["metadata"]["name"].startswith("grpojob-q-")
    assert wl["metadata"]["labels"][kueue.JOB_UID_LABEL] == "uid-1"
    assert wl["spec"]["queueName"] == "grpo"
    (pod_set,) = wl["spec"]["podSets"]
    assert (pod_set["name"], pod_set["count"]) == ("trainer", 1)
    requests = pod_set["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests == {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": "1"}  # limits count as requests


def test_admission_resumes_and_eviction_suspends_then_releases_the_quota():
    admitted = workload_with(("QuotaReserved", "True"), ("Admitted", "True"), admission=True)
    d = kueue.decide(queued_job(suspend=True), admitted, pod_active=False, now=NOW)
    assert d.suspend is False and [e.reason for e in d.events] == ["Admitted"]
    assert kueue.admitted_flavors(admitted) == {"nvidia.com/gpu": "h100", "cpu": "h100"}

    evicted = workload_with(("QuotaReserved", "True"), ("Admitted", "True"), ("Evicted", "True"), admission=True)
    assert kueue.admitted_flavors(evicted) is None
    d = kueue.decide(queued_job(suspend=False), evicted, pod_active=True, now=NOW)
    assert d.suspend is True and d.workload_status is None  # stop the job first
    assert [e.reason for e in d.events] == ["Evicted"] and "Evicted True" in d.events[0].message
    d = kueue.decide(queued_job(suspend=True), evicted, pod_active=True, now=NOW)
    assert d.workload_status is None  # its pod still terminates
    d = kueue.decide(queued_job(suspend=True), evicted, pod_active=False, now=NOW)
    status = d.workload_status
    assert status["admission"] is None
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["QuotaReserved"]["status"], by_type["QuotaReserved"]["reason"]) == ("False", "Pending")
    assert (by_type["Admitted"]["status"], by_type["Admitted"]["reason"]) == ("False", "NoReservation")
    assert by_type["Evicted"]["status"] == "True"  # Kueue's, left as it is
    assert by_type["QuotaReserved"]["observedGeneration"] == 1


def test_a_finished_job_finishes_its_workload_once():
    wl = workload_with(("QuotaReserved", "True"), ("Admitted", "True"), admission=True)
    d = kueue.decide(queued_job(suspend=False, phase="Succeeded"), wl, pod_active=False, now=NOW)
    finished = next(c for c in d.workload_status["conditions"] if c["type"] == "Finished")
    assert (finished["status"], finished["reason"]) == ("True", "Succeeded")
    done = workload_with(("Finished", "True"))
    assert kueue.decide(queued_job(phase="Failed"), done, pod_active=False, now=NOW).workload_status is None


def test_flavors_place_the_pod():
    flavors = [{"spec": {"nodeLabels": {"gpu": "h100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]}},
               {"spec": {"nodeLabels": {"zone": "a"}}}]
    assert kueue.placement(flavors) == ({"gpu": "h100", "zone": "a"}, [{"key": "gpu", "operator": "Exists"}])


# ---- the operator with Kueue --------------------------------------------------------------------


@pytest_asyncio.fixture
async def kueue_cluster(apiserver) -> KueueDouble:
    """Kueue installed, the example's flavor and queues created, the job's S3 Secret in ml-team."""
    double = KueueDouble(apiserver)
    await double.install()
    for obj in yaml.safe_load_all((EXAMPLES / "queues.yaml").read_text()):
        await double.apply(obj)
    response = await apiserver.post("/api/v1/namespaces/ml-team/secrets", json={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
        "data": {k: base64.b64encode(b"x").decode() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    assert response.status == 201
    return double


@pytest_asyncio.fixture
async def scripted_kubelet(apiserver, kubeconfig, tmp_path):
    async with LocalKubelet(str(apiserver.url), root=tmp_path / "kubelet", run=False) as kubelet:
        yield kubelet


def grpojob(apiserver, name: str) -> dict[str, Any]:
    return stored(apiserver, "grpo.dev/v1alpha1/grpojobs", "ml-team", name) or {}


def phase(apiserver, name: str) -> str | None:
    return grpojob(apiserver, name).get("status", {}).get("phase")


def pod(apiserver, name: str) -> dict[str, Any] | None:
    return stored(apiserver, "v1/pods", "ml-team", name)


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_kueue_admits_preempts_and_readmits_the_example_job(apiserver, operator, kueue_cluster,
                                                                 scripted_kubelet):
    kueue_ = kueue_cluster
    example = yaml.safe_load((EXAMPLES / "grpojob.yaml").read_text())
    async with operator(namespaces=("ml-team",)):
        response = await apiserver.post("/apis/grpo.dev/v1alpha1/namespaces/ml-team/grpojobs", json=example)
        assert response.status == 201, await response.text()
        job = grpojob(apiserver, "gsm8k-queued")

        # Queued: a Workload owned by the job, the job Suspended, no pod.
        workload = await eventually(lambda: kueue_.workload_of("ml-team", "gsm8k-queued"))
        assert workload["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        assert workload["spec"]["queueName"] == "grpo" and workload["spec"]["active"] is True  # defaulted
        await eventually(lambda: phase(apiserver, "gsm8k-queued") == "Suspended")
        await asyncio.sleep(60)
        assert pod(apiserver, "gsm8k-queued-attempt-1") is None

        # Admitted: resumed, the pod on the flavor's nodes.
        await kueue_.admit("ml-team", "gsm8k-queued")
        first = await eventually(lambda: pod(apiserver, "gsm8k-queued-attempt-1"))
        assert grpojob(apiserver, "gsm8k-queued")["spec"]["runPolicy"]["suspend"] is False
        assert first["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        await eventually(lambda: phase(apiserver, "gsm8k-queued") == "Running")

        # Preempted: suspended, the pod deleted, the quota released; not a failure.
        await kueue_.evict("ml-team", "gsm8k-queued")
        await eventually(lambda: phase(apiserver, "gsm8k-queued") == "Suspended")
        await eventually(lambda: pod(apiserver, "gsm8k-queued-attempt-1") is None)
        await eventually(lambda: condition(kueue_.workload_of("ml-team", "gsm8k-queued"), "QuotaReserved")
                         .get("status") == "False")
        released = kueue_.workload_of("ml-team", "gsm8k-queued")
        assert "admission" not in released["status"]
        assert condition(released, "QuotaReserved")["reason"] == "Pending"
        assert condition(released, "Admitted")["status"] == "False"
        assert grpojob(apiserver, "gsm8k-queued")["status"]["restarts"] == 0

        # Re-admitted: attempt 2 resumes from the checkpoint, then succeeds; Kueue hears it finished.
        await kueue_.admit("ml-team", "gsm8k-queued")
        await eventually(lambda: pod(apiserver, "gsm8k-queued-attempt-2"))
        await eventually(lambda: phase(apiserver, "gsm8k-queued") == "Running")
        assert condition(kueue_.workload_of("ml-team", "gsm8k-queued"), "Evicted")["status"] == "False"
        await scripted_kubelet.finish("ml-team", "gsm8k-queued-attempt-2", 0)
        await eventually(lambda: phase(apiserver, "gsm8k-queued") == "Succeeded")
        finished = await eventually(lambda: condition(kueue_.workload_of("ml-team", "gsm8k-queued"), "Finished"))
        assert (finished["status"], finished["reason"]) == ("True", "Succeeded")
        status = grpojob(apiserver, "gsm8k-queued")["status"]
        assert (status["restarts"], status["attempt"]) == (0, 2)
        reasons = [e["reason"] for e in stored_events(apiserver, "gsm8k-queued")]
        assert {"Queued", "Admitted", "Evicted", "Resumed"} <= set(reasons)

        # Deleting the job deletes its Workload (owned).
        response = await apiserver.delete("/apis/grpo.dev/v1alpha1/namespaces/ml-team/grpojobs/gsm8k-queued")
        assert response.status == 200
        await eventually(lambda: kueue_.workload_of("ml-team", "gsm8k-queued") is None)


def stored_events(apiserver, name: str) -> list[dict[str, Any]]:
    from k8s_doubles import stored_all

    return [e for e in stored_all(apiserver, "v1/events", "ml-team") if e["involvedObject"]["name"] == name]


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_a_queued_job_created_unsuspended_never_starts_before_admission(apiserver, operator, kueue_cluster):
    example = copy.deepcopy(yaml.safe_load((EXAMPLES / "grpojob.yaml").read_text()))
    example["spec"]["runPolicy"]["suspend"] = False  # as if the user forgot: Kueue's webhooks would suspend it
    async with operator(namespaces=("ml-team",)):
        response = await apiserver.post("/apis/grpo.dev/v1alpha1/namespaces/ml-team/grpojobs", json=example)
        assert response.status == 201
        await eventually(lambda: grpojob(apiserver, "gsm8k-queued")["spec"]["runPolicy"]["suspend"] is True)
        await asyncio.sleep(60)
        assert pod(apiserver, "gsm8k-queued-attempt-1") is None
        assert phase(apiserver, "gsm8k-queued") == "Suspended"
