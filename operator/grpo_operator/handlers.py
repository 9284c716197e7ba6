"""kopf wiring: which events reconcile which job.

Every handler ends in `reconcile(job)`: read the job and its current pod, ask
lifecycle.decide() what the status should be and what to do, do it, write the status.
It runs under a per-job lock, reads fresh state each time and creates pods under
deterministic names (a second create is a 409, never a second pod), so it is safe to
call from any event, any number of times, and after an operator restart.

Triggers: the job's create/resume and changes of spec.runPolicy.suspend; any event of a
pod labelled grpo.dev/job-name; a timer (deadlines, TTLs, and a safety net for missed
events). The operator needs RBAC for: grpojobs get/list/watch/patch/delete,
grpojobs/status get/patch, pods get/list/watch/create/delete, serviceaccounts,
configmaps, roles and rolebindings get/create, events create/patch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import kopf

from grpo_runtime.spec import GRPOJob

from grpo_operator import kube, lifecycle, render
from grpo_operator.crd import GROUP, PLURAL, VERSION
from grpo_operator.metrics import Metrics
from grpo_operator.settings import Settings

JOBS = (GROUP, VERSION, PLURAL)
RECHECK_SECONDS = 15.0  # timer period: how late a deadline or a TTL may be noticed, at most


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's own bookkeeping goes to annotations: the status belongs to the operator and the runtime.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="grpo.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="grpo.dev", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "grpo.dev/kopf-finalizer"  # kopf's timers need one on each job
    # The watched resources are known; no need to watch CRDs and namespaces (nor the RBAC for it).
    settings.scanning.disabled = True
    memo.setdefault("settings", Settings.from_env())
    memo.setdefault("metrics", Metrics())
    memo.locks = collections.defaultdict(asyncio.Lock)
    memo.kube = kube.Kube(await kube.connect())


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if "kube" in memo:
        await memo.kube.close()


@kopf.on.resume(*JOBS, backoff=5)
@kopf.on.create(*JOBS, backoff=5)
@kopf.on.update(*JOBS, field="spec.runPolicy.suspend", backoff=5)
async def job_changed(namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await reconcile(memo, namespace, name, logger)


@kopf.on.event("", "v1", "pods", labels={render.LABEL_JOB: kopf.PRESENT})
async def pod_changed(
    namespace: str, labels: dict[str, str], memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    await reconcile(memo, namespace, labels[render.LABEL_JOB], logger)


def _unfinished_or_ttl(status: dict[str, Any], spec: dict[str, Any], **_: Any) -> bool:
    finished = status.get("phase") in lifecycle.TERMINAL
    return not finished or (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished") is not None


@kopf.timer(*JOBS, interval=RECHECK_SECONDS, when=_unfinished_or_ttl)
async def recheck(namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await reconcile(memo, namespace, name, logger)


@kopf.on.event(*JOBS, when=lambda type, **_: type == "DELETED")
async def job_gone(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    memo.locks.pop((namespace, name), None)
    memo.metrics.job_phase(namespace, name, None)


async def reconcile(memo: kopf.Memo, namespace: str, name: str, logger: logging.Logger) -> None:
    settings: Settings = memo.settings
    api: kube.Kube = memo.kube
    async with memo.locks[(namespace, name)]:
        job = await api.get_job(namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        pod_name = (job.get("status") or {}).get("podName")
        pod = await api.get("Pod", namespace, pod_name) if pod_name else None
        decision = lifecycle.decide(job, pod, settings.clock())

        if decision.delete_pod:
            await api.delete_pod(namespace, decision.delete_pod)
        if decision.create_attempt and decision.job:
            await _create_attempt(memo, job, decision.job, decision.create_attempt)
        patch = decision.status_patch(job.get("status"))
        if patch:
            await api.patch_job_status(namespace, name, patch)
        for event in decision.events:
            kopf.event(job, type=event.type, reason=event.reason, message=event.message)
            logger.log(logging.INFO if event.type == "Normal" else logging.WARNING, f"{event.reason}: {event.message}")
        memo.metrics.job_phase(namespace, name, decision.status.get("phase"))
        if decision.delete_job:
            await api.delete_job(namespace, name)


async def _create_attempt(memo: kopf.Memo, job: dict[str, Any], spec: GRPOJob, attempt: int) -> None:
    """The support objects, then the attempt's pod; each owned by the job, each idempotent."""
    settings: Settings = memo.settings
    objects = render.support_objects(spec, s3_endpoint=settings.s3_endpoint)
    objects.append(render.pod(spec, attempt, image=settings.runtime_image, model_cache=settings.model_cache))
    # An owner reference, not kopf.adopt(): adopt also copies the job's labels, and a label such as
    # Kueue's queue-name must stay on the job, not reach the pod.
    kopf.append_owner_reference(objects, owner=job)
    for obj in objects:
        try:
            await memo.kube.create(obj)
        except kube.Conflict:
            await _check_ours(memo, job, obj)
        else:
            if obj["kind"] == "Pod":
                memo.metrics.pod_created()


async def _check_ours(memo: kopf.Memo, job: dict[str, Any], obj: dict[str, Any]) -> None:
    """A 409 is fine if the object is this job's (made before a restart); not if a namesake's."""
    meta = obj["metadata"]
    existing = await memo.kube.get(obj["kind"], meta["namespace"], meta["name"])
    owners = {ref.get("uid") for ref in ((existing or {}).get("metadata") or {}).get("ownerReferences") or []}
    if job["metadata"]["uid"] not in owners:
        raise kopf.TemporaryError(
            f"{obj['kind']} {meta['name']} exists but is not this job's (a deleted namesake's, "
            "not yet garbage-collected?); retrying",
            delay=5,
        )
