"""The real operator (kopf, in this event loop) against the API-server double.

Pods are driven by a scripted kubelet (pods go Running; the test says how they end), and
looptime compresses the loop's clock, so deadlines and TTLs take no real time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio

from k8s_doubles import eventually, stored, stored_all
from local_kubelet import LocalKubelet

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]

JOBS = "grpo.dev/v1alpha1/grpojobs"
JOBS_URL = "/apis/grpo.dev/v1alpha1/namespaces/default/grpojobs"
SPEC = {
    "model": {"name": "tiny"},
    "dataset": {"source": "builtin:arithmetic"},
    "rewards": [{"name": "answer", "function": "builtin:exact_answer"}],
    "output": {"uri": "s3://runs/prefix"},
}


@pytest_asyncio.fixture
async def scripted_kubelet(apiserver, kubeconfig: Path, tmp_path: Path) -> AsyncIterator[LocalKubelet]:
    async with LocalKubelet(str(apiserver.url), root=tmp_path / "kubelet", run=False) as kubelet:
        yield kubelet


async def create_job(apiserver, name: str, **spec: Any) -> dict[str, Any]:
    body = {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob", "metadata": {"name": name},
            "spec": {**SPEC, **spec}}
    response = await apiserver.post(JOBS_URL, json=body)
    assert response.status == 201, await response.text()
    return await response.json()


async def patch_job(apiserver, name: str, patch: dict[str, Any]) -> None:
    response = await apiserver.patch(f"{JOBS_URL}/{name}", data=json.dumps(patch),
                                     headers={"Content-Type": "application/merge-patch+json"})
    assert response.status == 200, await response.text()


def job(apiserver, name: str) -> dict[str, Any] | None:
    return stored(apiserver, JOBS, "default", name)


def status(apiserver, name: str) -> dict[str, Any]:
    return (job(apiserver, name) or {}).get("status") or {}


def phase_is(apiserver, name: str, phase: str):
    return lambda: status(apiserver, name).get("phase") == phase


def pods_of(apiserver, name: str) -> list[dict[str, Any]]:
    return [p for p in stored_all(apiserver, "v1/pods", "default")
            if p["metadata"]["labels"].get("grpo.dev/job-name") == name]


def events_of(apiserver, name: str) -> list[dict[str, Any]]:
    return [e for e in stored_all(apiserver, "v1/events", "default") if e["involvedObject"]["name"] == name]


def condition(apiserver, name: str, type_: str) -> dict[str, Any]:
    return next(c for c in status(apiserver, name).get("conditions", []) if c["type"] == type_)


async def test_valid_job_gets_its_owned_children_and_a_pod(apiserver, operator):
    async with operator() as memo:
        created = await create_job(apiserver, "good")
        await eventually(lambda: pods_of(apiserver, "good"))
        await eventually(phase_is(apiserver, "good", "Pending"))
        uid = created["metadata"]["uid"]
        for resource, name in [
            ("v1/serviceaccounts", "good-runtime"),
            ("rbac.authorization.k8s.io/v1/roles", "good-runtime"),
            ("rbac.authorization.k8s.io/v1/rolebindings", "good-runtime"),
            ("v1/configmaps", "good-spec"),
            ("v1/pods", "good-attempt-1"),
        ]:
            obj = stored(apiserver, resource, "default", name)
            assert obj is not None, f"{resource} {name} missing"
            (owner,) = obj["metadata"]["ownerReferences"]
            assert owner["uid"] == uid and owner["controller"] is True and owner["kind"] == "GRPOJob"
        assert status(apiserver, "good")["podName"] == "good-attempt-1"
        await eventually(lambda: any(e["reason"] == "PodCreated" for e in events_of(apiserver, "good")))
        assert "grpo_pods_created_total 1.0" in memo.metrics.text()


async def test_invalid_job_fails_and_the_next_valid_job_still_runs(apiserver, operator):
    async with operator():
        await create_job(apiserver, "bad", generation={"maxPromptLength": 4000})
        await create_job(apiserver, "fine")
        await eventually(phase_is(apiserver, "bad", "Failed"))
        failed = condition(apiserver, "bad", "Failed")
        assert failed["reason"] == "InvalidSpec"
        assert "exceeds model.maxSeqLength" in failed["message"]
        await eventually(lambda: pods_of(apiserver, "fine"))
        await asyncio.sleep(30)  # timers come and go: still no pod for the bad one
        assert pods_of(apiserver, "bad") == []
        assert any(e["reason"] == "InvalidSpec" and e["type"] == "Warning" for e in events_of(apiserver, "bad"))


async def test_restarted_operator_makes_no_second_pod(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "once")
        await eventually(phase_is(apiserver, "once", "Running"))
    async with operator():
        await asyncio.sleep(60)  # resume handlers, pod events and several timer rounds
        assert [p["metadata"]["name"] for p in pods_of(apiserver, "once")] == ["once-attempt-1"]
        assert status(apiserver, "once")["phase"] == "Running"
        assert status(apiserver, "once")["attempt"] == 1


async def test_pod_left_by_a_crashed_operator_is_adopted_not_duplicated(apiserver, operator):
    """The operator died after creating the pod but before writing the status: no second pod."""
    created = await create_job(apiserver, "crashed")
    owner = {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob", "name": "crashed",
             "uid": created["metadata"]["uid"], "controller": True}
    await apiserver.post("/api/v1/namespaces/default/serviceaccounts",
                         json={"metadata": {"name": "crashed-runtime", "ownerReferences": [owner]}})
    response = await apiserver.post("/api/v1/namespaces/default/pods", json={
        "metadata": {"name": "crashed-attempt-1", "labels": {"grpo.dev/job-name": "crashed"},
                     "ownerReferences": [owner]},
        "spec": {"serviceAccountName": "crashed-runtime", "containers": [{"name": "trainer", "image": "x"}]},
    })
    assert response.status == 201
    async with operator():
        await eventually(phase_is(apiserver, "crashed", "Pending"))
        await asyncio.sleep(30)
        assert [p["metadata"]["name"] for p in pods_of(apiserver, "crashed")] == ["crashed-attempt-1"]
        assert status(apiserver, "crashed")["podName"] == "crashed-attempt-1"


async def test_a_namesakes_leftover_pod_is_waited_for_not_taken(apiserver, operator):
    """A pod of that name owned by something else (a deleted namesake job) is not this job's pod."""
    other = await apiserver.post("/api/v1/namespaces/default/configmaps", json={"metadata": {"name": "other"}})
    foreign = {"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": (await other.json())["metadata"]["uid"]}
    response = await apiserver.post("/api/v1/namespaces/default/pods", json={
        "metadata": {"name": "reborn-attempt-1", "ownerReferences": [foreign]},
        "spec": {"containers": [{"name": "trainer", "image": "old"}]},
    })
    assert response.status == 201
    async with operator():
        created = await create_job(apiserver, "reborn")
        await asyncio.sleep(20)
        assert not status(apiserver, "reborn").get("podName")
        await apiserver.delete("/api/v1/namespaces/default/pods/reborn-attempt-1")
        pod = await eventually(lambda: stored(apiserver, "v1/pods", "default", "reborn-attempt-1"))
        assert pod["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        await eventually(phase_is(apiserver, "reborn", "Pending"))


async def test_failed_pod_gets_a_new_attempt(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "flaky")
        await eventually(phase_is(apiserver, "flaky", "Running"))
        await scripted_kubelet.finish("default", "flaky-attempt-1", 1)
        await eventually(lambda: stored(apiserver, "v1/pods", "default", "flaky-attempt-2"))
        await eventually(phase_is(apiserver, "flaky", "Running"))
        pod = stored(apiserver, "v1/pods", "default", "flaky-attempt-2")
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["GRPO_ATTEMPT"] == "2"
        assert status(apiserver, "flaky")["restarts"] == 1
        assert any(e["reason"] == "Restarting" for e in events_of(apiserver, "flaky"))
        await scripted_kubelet.finish("default", "flaky-attempt-2", 0)
        await eventually(phase_is(apiserver, "flaky", "Succeeded"))
        assert status(apiserver, "flaky")["completionTime"]


async def test_exit_code_2_fails_without_retry(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "typo")
        await eventually(phase_is(apiserver, "typo", "Running"))
        await scripted_kubelet.finish("default", "typo-attempt-1", 2)
        await eventually(phase_is(apiserver, "typo", "Failed"))
        assert condition(apiserver, "typo", "Failed")["reason"] == "BadInput"
        await asyncio.sleep(30)
        assert len(pods_of(apiserver, "typo")) == 1


async def test_backoff_limit_exhausted_fails_the_job(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "doomed", runPolicy={"backoffLimit": 1})
        await eventually(phase_is(apiserver, "doomed", "Running"))
        await scripted_kubelet.finish("default", "doomed-attempt-1", 137)
        await eventually(lambda: status(apiserver, "doomed").get("podName") == "doomed-attempt-2")
        await eventually(phase_is(apiserver, "doomed", "Running"))
        await scripted_kubelet.finish("default", "doomed-attempt-2", 1)
        await eventually(phase_is(apiserver, "doomed", "Failed"))
        failed = condition(apiserver, "doomed", "Failed")
        assert failed["reason"] == "BackoffLimitExceeded" and "exit code 1" in failed["message"]
        assert len(pods_of(apiserver, "doomed")) == 2


async def test_deleted_pod_is_replaced_as_a_disruption(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "deleted", runPolicy={"backoffLimit": 0})
        await eventually(phase_is(apiserver, "deleted", "Running"))
        response = await apiserver.delete("/api/v1/namespaces/default/pods/deleted-attempt-1")
        assert response.status == 200
        await eventually(lambda: stored(apiserver, "v1/pods", "default", "deleted-attempt-2"))
        assert (status(apiserver, "deleted")["restarts"], status(apiserver, "deleted")["disruptions"]) == (0, 1)
        assert condition(apiserver, "deleted", "Disrupted")["reason"] == "PodDeleted"


async def mark_disrupted(apiserver, pod: str, reason: str = "PreemptionByScheduler") -> None:
    """The scheduler's (or the Eviction API's, a node drain's, Kueue's) first move on a pod it takes away: the
    DisruptionTarget condition (its deletion follows)."""
    condition_ = {"type": "DisruptionTarget", "status": "True", "reason": reason,
                  "message": "Kubernetes default scheduler: preempted by a higher-priority pod"}
    response = await apiserver.patch(f"/api/v1/namespaces/default/pods/{pod}/status",
                                     data=json.dumps({"status": {"conditions": [condition_]}}),
                                     headers={"Content-Type": "application/merge-patch+json"})
    assert response.status == 200, await response.text()


async def preempt(apiserver, pod: str, reason: str = "PreemptionByScheduler") -> None:
    """What the scheduler (or the Eviction API, a node drain, Kueue) does to a pod: mark it with the
    DisruptionTarget condition, then delete it."""
    await mark_disrupted(apiserver, pod, reason)
    response = await apiserver.delete(f"/api/v1/namespaces/default/pods/{pod}")
    assert response.status == 200


async def test_preemptions_and_evictions_do_not_use_up_the_backoff_limit(apiserver, operator, scripted_kubelet):
    """Issue 14: a GRPO job resumes from its checkpoint; three preemptions in a busy cluster are no failure."""
    async with operator():
        await create_job(apiserver, "busy", runPolicy={"backoffLimit": 0})
        await eventually(phase_is(apiserver, "busy", "Running"))
        await preempt(apiserver, "busy-attempt-1")
        await eventually(lambda: status(apiserver, "busy").get("podName") == "busy-attempt-2")
        await eventually(phase_is(apiserver, "busy", "Running"))
        await preempt(apiserver, "busy-attempt-2", "EvictionByEvictionAPI")  # kubectl drain
        await eventually(lambda: status(apiserver, "busy").get("podName") == "busy-attempt-3")
        await eventually(phase_is(apiserver, "busy", "Running"))
        await scripted_kubelet.evict("default", "busy-attempt-3")  # node pressure
        await eventually(lambda: status(apiserver, "busy").get("podName") == "busy-attempt-4")
        await eventually(phase_is(apiserver, "busy", "Running"))
        assert (status(apiserver, "busy")["restarts"], status(apiserver, "busy")["disruptions"]) == (0, 3)
        assert condition(apiserver, "busy", "Disrupted")["reason"] == "Evicted"
        causes = [e["message"] for e in events_of(apiserver, "busy") if e["reason"] == "Disrupted"]
        assert ["PreemptionByScheduler" in causes[0], "EvictionByEvictionAPI" in causes[1], "Evicted" in causes[2]] \
            == [True, True, True]
        await scripted_kubelet.finish("default", "busy-attempt-4", 0)
        await eventually(phase_is(apiserver, "busy", "Succeeded"))


async def test_suspend_deletes_the_pod_and_resume_makes_a_new_one(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "queued")
        await eventually(phase_is(apiserver, "queued", "Running"))
        await patch_job(apiserver, "queued", {"spec": {"runPolicy": {"suspend": True}}})
        await eventually(phase_is(apiserver, "queued", "Suspended"))
        await eventually(lambda: not pods_of(apiserver, "queued"))
        assert condition(apiserver, "queued", "Suspended")["status"] == "True"
        await patch_job(apiserver, "queued", {"spec": {"runPolicy": {"suspend": False}}})
        await eventually(lambda: stored(apiserver, "v1/pods", "default", "queued-attempt-2"))
        await eventually(phase_is(apiserver, "queued", "Running"))
        assert status(apiserver, "queued")["restarts"] == 0


async def test_created_suspended_runs_no_pod_until_admitted(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "kueue", runPolicy={"suspend": True})
        await eventually(phase_is(apiserver, "kueue", "Suspended"))
        await asyncio.sleep(30)
        assert pods_of(apiserver, "kueue") == []
        await patch_job(apiserver, "kueue", {"spec": {"runPolicy": {"suspend": False}}})
        await eventually(phase_is(apiserver, "kueue", "Running"))


async def test_deleting_the_job_garbage_collects_its_children(apiserver, operator):
    async with operator() as memo:
        await create_job(apiserver, "doomed")
        await eventually(lambda: pods_of(apiserver, "doomed"))
        response = await apiserver.delete(f"{JOBS_URL}/doomed")
        assert response.status == 200
        await eventually(lambda: job(apiserver, "doomed") is None)  # kopf releases its finalizer
        await eventually(lambda: 'grpo_jobs{phase="Pending"} 0.0' in memo.metrics.text())
        for resource, name in [("v1/pods", "doomed-attempt-1"), ("v1/configmaps", "doomed-spec"),
                               ("v1/serviceaccounts", "doomed-runtime"),
                               ("rbac.authorization.k8s.io/v1/roles", "doomed-runtime"),
                               ("rbac.authorization.k8s.io/v1/rolebindings", "doomed-runtime")]:
            assert stored(apiserver, resource, "default", name) is None, name


async def test_active_deadline_fails_the_job(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "slow", runPolicy={"activeDeadlineSeconds": 600})
        await eventually(phase_is(apiserver, "slow", "Running"))
        await asyncio.sleep(300)
        assert status(apiserver, "slow")["phase"] == "Running"
        await eventually(phase_is(apiserver, "slow", "Failed"), timeout=400)
        assert condition(apiserver, "slow", "Failed")["reason"] == "DeadlineExceeded"
        await eventually(lambda: not pods_of(apiserver, "slow"))


async def test_ttl_deletes_the_finished_job(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "done", runPolicy={"ttlSecondsAfterFinished": 120})
        await eventually(phase_is(apiserver, "done", "Running"))
        await scripted_kubelet.finish("default", "done-attempt-1", 0)
        await eventually(phase_is(apiserver, "done", "Succeeded"))
        await asyncio.sleep(60)
        assert job(apiserver, "done") is not None
        await eventually(lambda: job(apiserver, "done") is None, timeout=300)
        assert pods_of(apiserver, "done") == []


async def test_progress_belongs_to_the_runtime(apiserver, operator, scripted_kubelet):
    """The operator's status writes never touch status.progress, which the runtime's sink owns."""
    from kubernetes import client

    from grpo_runtime.status import KubernetesProgressSink

    async with operator():
        await create_job(apiserver, "report")
        await eventually(phase_is(apiserver, "report", "Running"))
        api = client.ApiClient(client.Configuration(host=str(apiserver.url).rstrip("/")))
        sink = KubernetesProgressSink("report", "default", api=client.CustomObjectsApi(api))
        progress = {"step": 3, "totalSteps": 10, "reward": 0.5, "rewards": {"answer": 0.5}, "kl": float("nan"),
                    "completionLength": 88.0, "tokensPerSecond": 1234.5, "latestCheckpoint": "s3://runs/x/step-2"}
        await asyncio.to_thread(sink.update, progress)
        await scripted_kubelet.finish("default", "report-attempt-1", 0)
        await eventually(phase_is(apiserver, "report", "Succeeded"))
        reported = status(apiserver, "report")["progress"]
        assert reported["step"] == 3 and reported["rewards"] == {"answer": 0.5}
        assert "kl" not in reported  # NaN is sent as null, which a merge patch removes
        assert reported["updatedAt"]


async def test_fifty_jobs_at_once_get_fifty_pods(apiserver, operator, scripted_kubelet):
    names = [f"batch-{i:02d}" for i in range(50)]
    async with operator() as memo:
        await asyncio.gather(*(create_job(apiserver, name) for name in names))
        await eventually(lambda: all(status(apiserver, n).get("phase") == "Running" for n in names), timeout=120)
        await asyncio.sleep(30)
        pods = stored_all(apiserver, "v1/pods", "default")
        assert sorted(p["metadata"]["name"] for p in pods) == sorted(f"{n}-attempt-1" for n in names)
        creates = [r for r in apiserver.served if r.method == "POST" and r.resource == kmock.resource("v1/pods")]
        assert len(creates) == 50  # not even a refused duplicate attempt
        assert 'grpo_jobs{phase="Running"} 50.0' in memo.metrics.text()
