"""The real operator (kopf, in this event loop) running a job of several nodes against the API-server
double: a gang of pods started, replaced and ended together, and its headless Service. Pods are driven
by the scripted kubelet; looptime compresses the loop's clock."""

from __future__ import annotations

import asyncio

import pytest

from k8s_doubles import eventually, stored
from test_operator import (  # noqa: F401  (scripted_kubelet is a fixture)
    JOBS_URL, condition, create_job, events_of, job, mark_disrupted, patch_job, phase_is, pods_of, scripted_kubelet,
    status)

pytestmark = [pytest.mark.asyncio, pytest.mark.looptime]

GANG = {"resources": {"nodes": 2, "gpus": 4}, "training": {"promptsPerStep": 8}}


def live_pod_names(apiserver, name: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in pods_of(apiserver, name) if p["status"].get("phase") in (
        "Pending", "Running"))


async def test_a_gang_gets_its_service_and_runs_only_when_all_its_pods_run(apiserver, operator, scripted_kubelet):
    async with operator():
        created = await create_job(apiserver, "gang", **GANG)
        await eventually(phase_is(apiserver, "gang", "Running"))
        assert live_pod_names(apiserver, "gang") == ["gang-attempt-1-0", "gang-attempt-1-1"]
        assert (status(apiserver, "gang")["ranks"], status(apiserver, "gang")["runningPods"]) == (8, 2)
        service = stored(apiserver, "v1/services", "default", "gang-nodes")
        assert service["spec"]["clusterIP"] == "None"
        assert service["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        for pod in pods_of(apiserver, "gang"):
            assert pod["spec"]["subdomain"] == "gang-nodes"
            assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
        (created_event,) = [e for e in events_of(apiserver, "gang") if e["reason"] == "PodCreated"]
        assert "gang-attempt-1-0, gang-attempt-1-1" in created_event["message"]


async def test_one_failed_pod_restarts_the_whole_gang(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "crashy", **GANG)
        await eventually(phase_is(apiserver, "crashy", "Running"))
        await scripted_kubelet.finish("default", "crashy-attempt-1-1", 1)
        await eventually(lambda: live_pod_names(apiserver, "crashy") == ["crashy-attempt-2-0", "crashy-attempt-2-1"])
        assert stored(apiserver, "v1/pods", "default", "crashy-attempt-1-0") is None  # deleted by the operator
        assert stored(apiserver, "v1/pods", "default", "crashy-attempt-1-1")["status"]["phase"] == "Failed"  # logs
        await eventually(phase_is(apiserver, "crashy", "Running"))
        assert (status(apiserver, "crashy")["restarts"], status(apiserver, "crashy")["disruptions"]) == (1, 0)
        assert status(apiserver, "crashy")["podName"] == "crashy-attempt-2-0"

        # An eviction of one pod restarts the gang too, not counted against backoffLimit.
        await scripted_kubelet.evict("default", "crashy-attempt-2-0")
        await eventually(lambda: live_pod_names(apiserver, "crashy") == ["crashy-attempt-3-0", "crashy-attempt-3-1"])
        await eventually(phase_is(apiserver, "crashy", "Running"))
        assert (status(apiserver, "crashy")["restarts"], status(apiserver, "crashy")["disruptions"]) == (1, 1)

        # A pod the scheduler is preempting: its peer losing the rendezvous is no failure of the job either.
        await mark_disrupted(apiserver, "crashy-attempt-3-1")
        await scripted_kubelet.finish("default", "crashy-attempt-3-0", 1)
        await eventually(lambda: live_pod_names(apiserver, "crashy") == ["crashy-attempt-4-0", "crashy-attempt-4-1"])
        assert (status(apiserver, "crashy")["restarts"], status(apiserver, "crashy")["disruptions"]) == (1, 2)
        assert condition(apiserver, "crashy", "Disrupted")["reason"] == "PreemptionByScheduler"

        # Pod 0 succeeds: so does the job; its peer, still exiting, is not left holding its GPUs.
        await eventually(phase_is(apiserver, "crashy", "Running"))
        await scripted_kubelet.finish("default", "crashy-attempt-4-0", 0)
        await eventually(phase_is(apiserver, "crashy", "Succeeded"))
        await eventually(lambda: live_pod_names(apiserver, "crashy") == [])


async def test_exit_code_2_on_a_peer_fails_the_job_without_retry(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "typo", **GANG)
        await eventually(phase_is(apiserver, "typo", "Running"))
        await scripted_kubelet.finish("default", "typo-attempt-1-1", 2)
        await eventually(phase_is(apiserver, "typo", "Failed"))
        assert condition(apiserver, "typo", "Failed")["reason"] == "BadInput"
        await eventually(lambda: live_pod_names(apiserver, "typo") == [])
        await asyncio.sleep(30)
        assert sorted(p["metadata"]["name"] for p in pods_of(apiserver, "typo")) == ["typo-attempt-1-1"]


async def test_suspending_deletes_every_pod_and_deleting_the_job_its_service(apiserver, operator, scripted_kubelet):
    async with operator():
        await create_job(apiserver, "paused", **GANG)
        await eventually(phase_is(apiserver, "paused", "Running"))
        await patch_job(apiserver, "paused", {"spec": {"runPolicy": {"suspend": True}}})
        await eventually(phase_is(apiserver, "paused", "Suspended"))
        await eventually(lambda: not pods_of(apiserver, "paused"))
        await patch_job(apiserver, "paused", {"spec": {"runPolicy": {"suspend": False}}})
        await eventually(lambda: live_pod_names(apiserver, "paused") == ["paused-attempt-2-0", "paused-attempt-2-1"])
        await eventually(phase_is(apiserver, "paused", "Running"))
        assert status(apiserver, "paused")["restarts"] == 0

        response = await apiserver.delete(f"{JOBS_URL}/paused")
        assert response.status == 200
        await eventually(lambda: job(apiserver, "paused") is None)
        assert pods_of(apiserver, "paused") == []
        assert stored(apiserver, "v1/services", "default", "paused-nodes") is None
