"""CRD order and shutdown: the operator waits for its CRD, survives its deletion and return, and
stops without closing the API client under a running reconcile (issue 14, items 2 and 3).

The supervisor (production's, as `grpo operator` runs it) against the API-server double,
whose CRDs are created, established and deleted as the API server does (k8s_doubles.py).
looptime compresses the loop's clock.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import kopf
import pytest

from grpo_operator import handlers
from grpo_operator.crd import crd
from grpo_operator.metrics import Metrics
from grpo_operator.readiness import crd_readiness
from grpo_operator.settings import Settings
from k8s_doubles import eventually, stored, stored_all

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
JOBS_URL = "/apis/grpo.dev/v1alpha1/namespaces/default/grpojobs"


def job_body(name: str) -> dict[str, Any]:
    return {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob", "metadata": {"name": name},
            "spec": {"model": {"name": "tiny"}, "dataset": {"source": "builtin:arithmetic"},
                     "rewards": [{"name": "a", "function": "builtin:exact_answer"}]}}


def pod(server, name: str) -> dict[str, Any] | None:
    return stored(server, "v1/pods", "default", name)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


# ---- the pure part ----------------------------------------------------------------------------


def established(**changes: Any) -> dict[str, Any]:
    obj = crd()
    obj["status"] = {"conditions": [{"type": "NamesAccepted", "status": "True"},
                                    {"type": "Established", "status": "True"}]}
    obj.update(changes)
    return obj


def test_readiness_follows_the_crd():
    assert crd_readiness(established()).ready
    assert crd_readiness(None).reason == "CRDMissing"
    assert "install it" in crd_readiness(None).message
    terminating = established()
    terminating["metadata"] = {**terminating["metadata"], "deletionTimestamp": "2026-11-27T10:00:00Z"}
    assert crd_readiness(terminating).reason == "CRDTerminating"
    assert crd_readiness(established(status={})).reason == "CRDNotEstablished"
    pending = established(status={"conditions": [{"type": "Established", "status": "False",
                                                  "message": "not all names are accepted"}]})
    assert not crd_readiness(pending).ready and "not all names are accepted" in crd_readiness(pending).message
    unserved = established()
    unserved["spec"]["versions"][0]["served"] = False
    assert crd_readiness(unserved).reason == "VersionNotServed"


# ---- with the double --------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_started_before_its_crd_it_waits_then_serves(bare_apiserver, operator, caplog):
    async with operator() as memo:
        supervisor = memo.supervisor
        await eventually(lambda: supervisor.readiness.reason == "CRDMissing" and supervisor.task)
        await asyncio.sleep(60)
        assert not supervisor.ready and supervisor.starts == 0 and not supervisor.task.done()

        response = await bare_apiserver.post(CRDS, json=crd())  # helm install --skip-crds, then the CRD
        assert response.status == 201
        await eventually(lambda: supervisor.ready)
        response = await bare_apiserver.post(JOBS_URL, json=job_body("late"))
        assert response.status == 201
        await eventually(lambda: pod(bare_apiserver, "late-attempt-1"))
    assert errors(caplog) == []


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_survives_its_crd_deleted_and_serves_it_again(apiserver, operator, caplog):
    async with operator() as memo:
        supervisor = memo.supervisor
        await eventually(lambda: supervisor.ready)
        assert (await apiserver.post(JOBS_URL, json=job_body("first"))).status == 201
        await eventually(lambda: pod(apiserver, "first-attempt-1"))

        response = await apiserver.delete(f"{CRDS}/grpojobs.grpo.dev")
        assert response.status == 200
        await eventually(lambda: not supervisor.ready)
        assert supervisor.readiness.reason in ("CRDTerminating", "CRDMissing")
        await asyncio.sleep(60)
        assert not supervisor.task.done()  # alive, waiting: no 404 took it down
        assert stored_all(apiserver, "grpo.dev/v1alpha1/grpojobs") == []
        assert pod(apiserver, "first-attempt-1") is None  # the job's pod went with the job

        assert (await apiserver.post(CRDS, json=crd())).status == 201
        await eventually(lambda: supervisor.ready)
        assert supervisor.starts == 2
        assert (await apiserver.post(JOBS_URL, json=job_body("second"))).status == 201
        await eventually(lambda: pod(apiserver, "second-attempt-1"))
    assert errors(caplog) == []


@pytest.mark.asyncio
@pytest.mark.looptime
async def test_jobs_carry_no_finalizer_that_would_hold_a_crd_deletion(apiserver, operator):
    """An earlier version's kopf timer put a finalizer on each job; it is removed, none is added."""
    body = job_body("old")
    body["metadata"]["finalizers"] = ["grpo.dev/kopf-finalizer"]
    assert (await apiserver.post(JOBS_URL, json=body)).status == 201
    async with operator():
        await eventually(lambda: pod(apiserver, "old-attempt-1"))
        job = await eventually(lambda: stored(apiserver, "grpo.dev/v1alpha1/grpojobs", "default", "old"))
        await eventually(lambda: not stored(apiserver, "grpo.dev/v1alpha1/grpojobs", "default", "old")
                         ["metadata"].get("finalizers"))
        assert job["metadata"]["name"] == "old"


# ---- shutdown ---------------------------------------------------------------------------------


class BlockingKube:
    """Stands in for kube.Kube: get_job waits until released; using it after close() is an error."""

    def __init__(self) -> None:
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self.read: list[str] = []
        self.closed = False

    async def get_job(self, namespace: str, name: str) -> None:
        assert not self.closed, "the API client was closed under a running reconcile"
        self.read.append(name)
        self.entered.set()
        await self.release.wait()
        assert not self.closed, "the API client was closed under a running reconcile"
        return None

    async def close(self) -> None:
        self.closed = True


@pytest.mark.asyncio
async def test_cleanup_waits_for_a_running_reconcile_and_turns_later_ones_away():
    api = BlockingKube()
    memo = kopf.Memo(settings=Settings(health_port=0), metrics=Metrics(), kube=api,
                     locks=collections.defaultdict(asyncio.Lock), inflight=handlers.InFlight())
    log = logging.getLogger("test")
    running = asyncio.create_task(handlers.reconcile(memo, "default", "busy", log))
    await api.entered.wait()
    closing = asyncio.create_task(handlers.cleanup(memo=memo))
    await asyncio.wait({closing}, timeout=0.1)
    assert not closing.done() and not api.closed  # waiting for the reconcile

    api.release.set()
    await closing
    assert api.closed
    await running  # finished cleanly, before the client closed
    await handlers.reconcile(memo, "default", "late", log)  # after cleanup: does nothing
    assert api.read == ["busy"]
