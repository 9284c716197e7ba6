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
from kueue_double import KueueDouble, condition, crds, storage_version
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
    wl = kueue.workload(job, pod, version="v1beta2")
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


def test_the_kueue_version_is_v1beta2_where_served_else_v1beta1():
    both = {"v1beta1": {"workloads", "workloads/status", "resourceflavors"},
            "v1beta2": {"workloads", "workloads/status", "resourceflavors"}}
    assert kueue.workload_version(both) == "v1beta2"  # Kueue v0.15+: v1beta1 is deprecated
    assert kueue.workload_version({"v1beta1": both["v1beta1"]}) == "v1beta1"  # Kueue before v0.15
    assert kueue.workload_version({"v1beta2": both["v1beta2"]}) == "v1beta2"  # v1beta1 no longer served
    assert kueue.workload_version({}) is None  # Kueue not installed
    assert kueue.workload_version({"v1beta2": {"localqueues"}}) is None


@pytest.mark.asyncio
async def test_discovery_reads_only_the_names_of_what_kueue_serves(apiserver):
    """A discovery listing is read as served, not through the client's models: one entry they would refuse
    (a resource whose `namespaced` is missing, as a double or an aggregated API may serve it) must not
    blind the operator to Kueue (it raised a ValidationError and no Workload was ever made)."""
    import kmock
    from kubernetes.aio import client

    from grpo_operator.kube import kueue_discovery

    await _install_kueue(apiserver, served_at_once=True)
    apiserver.resources["kueue.x-k8s.io/v1beta2/oddities"] = kmock.ResourceInfo(kind="Oddity", namespaced=None)
    api = client.ApiClient(client.Configuration(host=str(apiserver.url).rstrip("/")))
    try:
        served = await kueue_discovery(api)
    finally:
        await api.close()
    assert {"workloads", "resourceflavors", "oddities"} <= served["v1beta2"]
    assert kueue.workload_version(served) == "v1beta2"


@pytest.mark.asyncio
async def test_a_kueue_that_serves_only_v1beta1_refuses_v1beta2(apiserver):
    """As the API server: a CRD's group serves the versions its CRD marks served, no other (the double used to
    store a v1beta2 object on Kueue v0.14.8, and to list it in discovery)."""
    await _install_kueue(apiserver, "v0.14.8", served_at_once=True)
    queue = next(q for q in yaml.safe_load_all((EXAMPLES / "queues.yaml").read_text()) if q["kind"] == "LocalQueue")
    response = await apiserver.post("/apis/kueue.x-k8s.io/v1beta2/namespaces/ml-team/localqueues",
                                    json={**queue, "metadata": {**queue["metadata"], "name": "other"}})
    assert response.status == 404


async def _install_kueue(apiserver, release: str = "v0.19.2", *, served_at_once: bool = False) -> KueueDouble:
    double = KueueDouble(apiserver, release)
    if served_at_once:  # no 1.4 MB POST while looptime runs the clock (aiohttp's timeouts)
        for crd in copy.deepcopy(crds(release)):
            apiserver.install_crd(crd)
    else:
        await double.install()
    for obj in yaml.safe_load_all((EXAMPLES / "queues.yaml").read_text()):
        # the example is v1beta2; on a Kueue older than v0.16 it is written v1beta1, as its header says
        await double.apply({**obj, "apiVersion": double.api})
    return double


@pytest_asyncio.fixture
async def kueue_cluster(apiserver) -> KueueDouble:
    """Kueue installed, the example's flavor and queues created, the job's S3 Secret in ml-team."""
    response = await apiserver.post("/api/v1/namespaces/ml-team/secrets", json={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
        "data": {k: base64.b64encode(b"x").decode() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    assert response.status == 201
    return await _install_kueue(apiserver)


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


def workload_calls(apiserver) -> list[str]:
    return [f"{r.method.value} {r.url.path}" for r in apiserver.served if "/workloads" in r.url.path]


@pytest.mark.asyncio
@pytest.mark.looptime
@pytest.mark.parametrize("release,version", [("v0.19.2", "v1beta2"), ("v0.14.8", "v1beta1")])
async def test_the_operator_speaks_the_version_kueue_serves_and_keeps_kueues_status(
        apiserver, operator, scripted_kubelet, release, version):
    double = await _install_kueue(apiserver, release)
    example = yaml.safe_load((EXAMPLES / "grpojob.yaml").read_text())
    del example["spec"]["output"]["credentialsSecret"]
    earlier = len(apiserver.deprecated_calls)  # what the set-up wrote, whatever its version
    async with operator(namespaces=("ml-team",)):
        response = await apiserver.post("/apis/grpo.dev/v1alpha1/namespaces/ml-team/grpojobs", json=example)
        assert response.status == 201, await response.text()
        await eventually(lambda: double.workload_of("ml-team", "gsm8k-queued"))
        creates = [c for c in workload_calls(apiserver) if c.startswith("POST")]
        assert creates == [f"POST /apis/kueue.x-k8s.io/{version}/namespaces/ml-team/workloads"]
        await double.admit("ml-team", "gsm8k-queued")
        await double.check("ml-team", "gsm8k-queued", "provisioning")
        await eventually(lambda: pod(apiserver, "gsm8k-queued-attempt-1"))
        await double.evict("ml-team", "gsm8k-queued")
        await eventually(lambda: condition(double.workload_of("ml-team", "gsm8k-queued"), "QuotaReserved")
                         .get("status") == "False")  # the operator released the quota: its status patch
        status = double.workload_of("ml-team", "gsm8k-queued")["status"]
        assert [c["name"] for c in status["admissionChecks"]] == ["provisioning"]  # Kueue's, kept
        assert status["resourceRequests"][0]["name"] == "trainer"
        assert status["schedulingStats"]["evictions"] == [{"reason": "Preempted", "underlyingCause": "", "count": 1}]
        assert all(f"/kueue.x-k8s.io/{version}/" in c for c in workload_calls(apiserver))
        assert apiserver.deprecated_calls[earlier:] == []  # the operator got no deprecation warning


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_kueue_installed_after_the_operator_is_spoken_to_in_v1beta2(apiserver, operator, scripted_kubelet):
    from grpo_operator.handlers import RECHECK_SECONDS
    from grpo_operator.supervisor import KUEUE_DISCOVERY_SECONDS

    example = yaml.safe_load((EXAMPLES / "grpojob.yaml").read_text())
    del example["spec"]["output"]["credentialsSecret"]
    async with operator(namespaces=("ml-team",)) as memo:
        await eventually(lambda: memo.supervisor.ready)
        double = await _install_kueue(apiserver, served_at_once=True)
        await asyncio.sleep(KUEUE_DISCOVERY_SECONDS + 1)
        await eventually(lambda: memo.supervisor.ready)
        response = await apiserver.post("/apis/grpo.dev/v1alpha1/namespaces/ml-team/grpojobs", json=example)
        assert response.status == 201, await response.text()
        await eventually(lambda: double.workload_of("ml-team", "gsm8k-queued"))
        assert [c for c in workload_calls(apiserver) if c.startswith("POST")] == [
            "POST /apis/kueue.x-k8s.io/v1beta2/namespaces/ml-team/workloads"]
        await eventually(lambda: phase(apiserver, "gsm8k-queued") == "Suspended")
        loop = asyncio.get_running_loop()
        admitted_at = loop.time()
        await double.admit("ml-team", "gsm8k-queued")
        await eventually(lambda: pod(apiserver, "gsm8k-queued-attempt-1"))
        assert loop.time() - admitted_at < RECHECK_SECONDS  # the Workload watch saw it, not the resync


# ---- the double is as strict as Kueue's CRDs ----------------------------------------------------


def rendered_workload(version: str) -> dict[str, Any]:
    job = queued_job()
    spec = parse_job({**job, "metadata": {"name": "q", "namespace": "ns"}})
    return kueue.workload(job, render.pod(spec, 1, image="img", node_selector={"gpu": "h100"}), version=version)


@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["v1beta1", "v1beta2"])
async def test_kueue_accepts_the_operators_workload_under_strict_field_validation(apiserver, version):
    await _install_kueue(apiserver)
    wl = rendered_workload(version)
    response = await apiserver.post(f"/apis/kueue.x-k8s.io/{version}/namespaces/ns/workloads?fieldValidation=Strict",
                                    json=wl)
    assert response.status == 201, await response.text()
    stored_wl = stored(apiserver, "kueue.x-k8s.io/v1beta2/workloads", "ns", wl["metadata"]["name"])
    assert stored_wl["spec"]["podSets"][0]["template"] == wl["spec"]["podSets"][0]["template"]  # nothing pruned


@pytest.mark.asyncio
@pytest.mark.parametrize("breakage,message", [
    (lambda spec: spec["containers"][0].pop("name"),
     "spec.podSets[0].template.spec.containers[0].name: Required value"),
    (lambda spec: spec["containers"][0]["resources"]["requests"].update(cpu="four"),
     'spec.podSets[0].template.spec.containers[0].resources.requests.cpu: Invalid value: "four": '
     "spec.podSets[0].template.spec.containers[0].resources.requests.cpu in body should match"),
    (lambda spec: spec.update(nodeSelector=["gpu=h100"]),
     'spec.podSets[0].template.spec.nodeSelector: Invalid value: "array": '
     "spec.podSets[0].template.spec.nodeSelector in body must be of type object"),
])
async def test_kueue_refuses_a_workload_whose_pod_template_is_not_a_pod(apiserver, breakage, message):
    await _install_kueue(apiserver)
    wl = rendered_workload("v1beta2")
    breakage(wl["spec"]["podSets"][0]["template"]["spec"])
    response = await apiserver.post("/apis/kueue.x-k8s.io/v1beta2/namespaces/ns/workloads", json=wl)
    assert response.status == 422, await response.text()
    body = await response.json()
    assert body["reason"] == "Invalid"
    assert body["message"].startswith(f'Workload.kueue.x-k8s.io "{wl["metadata"]["name"]}" is invalid: ')
    assert message in body["message"]


@pytest.mark.asyncio
async def test_kueue_prunes_or_refuses_an_unknown_container_field(apiserver):
    await _install_kueue(apiserver)
    wl = rendered_workload("v1beta2")
    wl["spec"]["podSets"][0]["template"]["spec"]["containers"][0]["gpus"] = 1
    url = "/apis/kueue.x-k8s.io/v1beta2/namespaces/ns/workloads"
    response = await apiserver.post(url + "?fieldValidation=Strict", json=wl)
    assert response.status == 400
    assert 'strict decoding error: unknown field "spec.podSets[0].template.spec.containers[0].gpus"' in (
        await response.json())["message"]
    response = await apiserver.post(url, json=wl)  # the default (Warn): dropped
    assert response.status == 201
    kept = stored(apiserver, "kueue.x-k8s.io/v1beta2/workloads", "ns", wl["metadata"]["name"])
    assert "gpus" not in kept["spec"]["podSets"][0]["template"]["spec"]["containers"][0]


# ---- a job of several nodes: admitted all or nothing ----------------------------------------------


def gang_job() -> dict[str, Any]:
    job = queued_job()
    job["spec"]["resources"].update(gpus=4, nodes=2)
    job["spec"]["training"] = {"promptsPerStep": 8}
    return job


def gang_workload(version: str) -> dict[str, Any]:
    job = gang_job()
    spec = parse_job({**job, "metadata": {"name": "q", "namespace": "ns"}})
    return kueue.workload(job, render.pod(spec, 1, image="img"), version=version, count=spec.spec.resources.nodes)


def test_a_gangs_workload_counts_its_pods_each_with_its_gpus():
    (pod_set,) = gang_workload("v1beta2")["spec"]["podSets"]
    assert pod_set["count"] == 2  # Kueue reserves quota for both pods at once, or for neither
    requests = pod_set["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests == {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": "4"}  # per pod


@pytest.mark.asyncio
@pytest.mark.parametrize("release,version", [("v0.19.2", "v1beta2"), ("v0.14.8", "v1beta1")])
async def test_kueue_takes_a_gangs_workload_as_it_is(apiserver, release, version):
    await _install_kueue(apiserver, release)
    wl = gang_workload(version)
    response = await apiserver.post(f"/apis/kueue.x-k8s.io/{version}/namespaces/ns/workloads?fieldValidation=Strict",
                                    json=wl)
    assert response.status == 201, await response.text()
    kept = stored(apiserver, f"kueue.x-k8s.io/{storage_version(release)}/workloads", "ns", wl["metadata"]["name"])
    assert kept["spec"]["podSets"][0]["count"] == 2
    assert kept["spec"]["podSets"][0]["template"] == wl["spec"]["podSets"][0]["template"]  # nothing pruned


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_kueue_admits_a_gang_whole_and_evicts_it_whole(apiserver, operator, kueue_cluster, scripted_kubelet):
    kueue_ = kueue_cluster
    example = yaml.safe_load((EXAMPLES / "grpojob.yaml").read_text())
    example["spec"]["resources"].update(gpus=4, nodes=2)
    example["spec"]["training"]["promptsPerStep"] = 8
    gang = ["gsm8k-queued-attempt-1-0", "gsm8k-queued-attempt-1-1"]
    async with operator(namespaces=("ml-team",)):
        response = await apiserver.post("/apis/grpo.dev/v1alpha1/namespaces/ml-team/grpojobs", json=example)
        assert response.status == 201, await response.text()
        workload = await eventually(lambda: kueue_.workload_of("ml-team", "gsm8k-queued"))
        assert workload["spec"]["podSets"][0]["count"] == 2
        await eventually(lambda: phase(apiserver, "gsm8k-queued") == "Suspended")
        assert all(pod(apiserver, name) is None for name in gang)

        admitted = await kueue_.admit("ml-team", "gsm8k-queued")
        (assignment,) = admitted["status"]["admission"]["podSetAssignments"]
        assert (assignment["count"], assignment["resourceUsage"]["nvidia.com/gpu"]) == (2, "8")
        pods = await eventually(lambda: [pod(apiserver, name) for name in gang] if all(
            pod(apiserver, name) for name in gang) else None)
        assert all(p["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"} for p in pods)
        await eventually(lambda: phase(apiserver, "gsm8k-queued") == "Running")

        await kueue_.evict("ml-team", "gsm8k-queued")
        await eventually(lambda: phase(apiserver, "gsm8k-queued") == "Suspended")
        await eventually(lambda: all(pod(apiserver, name) is None for name in gang))
        await eventually(lambda: condition(kueue_.workload_of("ml-team", "gsm8k-queued"), "QuotaReserved")
                         .get("status") == "False")
        assert grpojob(apiserver, "gsm8k-queued")["status"]["restarts"] == 0
