"""kopf wiring: which events reconcile which job.

Every handler ends in `reconcile(job)`: read the job and its pods (those labelled with its
name and owned by it, every attempt's), ask lifecycle.decide() what the status should be and
what to do, do it, write the status. It runs under a per-job lock, reads fresh state each time
and creates pods under deterministic names (a second create is a 409, never a second pod), so
it is safe to call from any event, any number of times, and after an operator restart.

Triggers: the job's create/resume and changes of spec.runPolicy.suspend; any event of a
pod labelled grpo.dev/job-name; and a resync loop (deadlines, TTLs, and a safety net for
missed events) that lists the jobs every RECHECK_SECONDS. The resync is a task of ours, not a
kopf timer: kopf's timers put a finalizer on every job, and a finalizer would hold a CRD
deletion until this operator released it (supervisor.py stops serving as soon as the CRD is
being deleted). An operator of an earlier version left that finalizer: kopf removes it.

Shutdown (kopf's cleanup): the resync loop stops, reconciles still running are waited for and
new ones turned away, and only then is the API client closed.

The operator needs RBAC for: grpojobs get/list/watch/patch/delete, grpojobs/status get/patch,
pods get/list/watch/create/delete, serviceaccounts, configmaps, services (a several-node
job's headless Service), roles and rolebindings get/create, events create/patch, and the CRD
grpojobs.grpo.dev get/list/watch (supervisor.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import kopf

from grpo_runtime.spec import GRPOJob

from grpo_operator import kube, kueue, lifecycle, render
from grpo_operator.crd import GROUP, PLURAL, VERSION
from grpo_operator.metrics import Metrics
from grpo_operator.settings import Settings

JOBS = (GROUP, VERSION, PLURAL)
RECHECK_SECONDS = 15.0  # resync period: how late a deadline or a TTL may be noticed, at most
SHUTDOWN_SECONDS = 30.0  # how long cleanup waits for reconciles in flight before closing anyway
log = logging.getLogger("grpo_operator")


class InFlight:
    """The reconciles running now. close() turns new ones away and waits for the running ones."""

    def __init__(self) -> None:
        self.closed = False
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def enter(self) -> AsyncIterator[bool]:
        """Yields False (do nothing) once closed."""
        if self.closed:
            yield False
            return
        self._running += 1
        self._idle.clear()
        try:
            yield True
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def close(self, timeout: float) -> None:
        self.closed = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's own bookkeeping goes to annotations: the status belongs to the operator and the runtime.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="grpo.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="grpo.dev", key="last-handled-configuration"
    )
    # No handler needs a finalizer now; under this name kopf finds (and removes) the one that
    # the timers of earlier versions put on jobs.
    settings.persistence.finalizer = "grpo.dev/kopf-finalizer"
    # The supervisor owns CRD order (it starts kopf once the CRD is established and stops it before
    # the CRD goes), and the namespaces are exact names: kopf needs no scanning of CRDs or
    # namespaces, nor cluster-wide RBAC to list them.
    settings.scanning.disabled = True
    memo.setdefault("settings", Settings.from_env())
    memo.setdefault("metrics", Metrics())
    memo.locks = collections.defaultdict(asyncio.Lock)
    memo.inflight = InFlight()
    # The Kueue API version of this run: the supervisor discovered it (supervisor.py) and restarts
    # kopf when it changes (Kueue installed, upgraded to serve v1beta2, or removed).
    memo.kube = kube.Kube(await kube.connect(), kueue_version=memo.get("kueue_version"))
    memo.resync = asyncio.create_task(resync(memo), name="GRPOJob resync")


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    resync_task = memo.get("resync")
    if resync_task is not None:
        resync_task.cancel()
        await asyncio.gather(resync_task, return_exceptions=True)
    if "inflight" in memo:
        await memo.inflight.close(SHUTDOWN_SECONDS)
    if "kube" in memo:
        await memo.kube.close()


async def job_changed(namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await reconcile(memo, namespace, name, logger)


async def pod_changed(
    body: kopf.Body, namespace: str, labels: dict[str, str], memo: kopf.Memo, logger: logging.Logger,
    **_: Any,
) -> None:
    # The pod as this event shows it: if it is gone by the time reconcile reads it, its last state
    # says why it went (its DisruptionTarget condition).
    await reconcile(memo, namespace, labels[render.LABEL_JOB], logger, last_seen=dict(body))


def needs_recheck(job: dict[str, Any]) -> bool:
    """Unfinished jobs (deadlines, missed events) and finished ones with a TTL still to apply."""
    finished = (job.get("status") or {}).get("phase") in lifecycle.TERMINAL
    policy = (job.get("spec") or {}).get("runPolicy") or {}
    return not finished or policy.get("ttlSecondsAfterFinished") is not None


async def resync(memo: kopf.Memo) -> None:
    """Every RECHECK_SECONDS, reconcile each job that needs it; errors wait for the next round."""
    settings: Settings = memo.settings
    namespaces: list[str | None] = list(settings.namespaces) or [None]
    while True:
        await asyncio.sleep(RECHECK_SECONDS)
        for namespace in namespaces:
            try:
                jobs = await memo.kube.list_jobs(namespace)
            except Exception as exc:  # the API server away for a moment: next round
                log.warning("resync: cannot list GRPOJobs in %s: %s", namespace or "all namespaces", exc)
                continue
            for job in jobs:
                meta = job.get("metadata") or {}
                if not needs_recheck(job):
                    continue
                try:
                    await reconcile(memo, meta["namespace"], meta["name"], log)
                except Exception as exc:
                    log.warning("resync of %s/%s: %s", meta.get("namespace"), meta.get("name"), exc)


async def job_seen(type: str | None, namespace: str, name: str, status: dict[str, Any], memo: kopf.Memo, **_: Any) -> None:
    """Every change of a job (status.progress from its pod too) refreshes its metrics; a deletion drops them."""
    if type == "DELETED":
        memo.locks.pop((namespace, name), None)
        memo.metrics.job_status(namespace, name, None)
    else:
        memo.metrics.job_status(namespace, name, status)


async def workload_changed(
    namespace: str, labels: dict[str, str], memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    await reconcile(memo, namespace, labels[render.LABEL_JOB], logger)


def registry(*, kueue_version: str | None) -> kopf.OperatorRegistry:
    """The handlers of one kopf run. Kueue's Workloads are watched in `kueue_version`, the version
    kueue.workload_version() chose from discovery; not at all where Kueue is not installed (None):
    kopf warns about every resource it cannot resolve."""
    reg = kopf.OperatorRegistry()
    # kopf's default registry logs in through the kubernetes client (in-cluster or kubeconfig); so here.
    kopf.on.login(registry=reg)(kopf.login_via_client)
    kopf.on.startup(registry=reg)(startup)
    kopf.on.cleanup(registry=reg)(cleanup)
    for on in (kopf.on.resume, kopf.on.create):
        on(*JOBS, backoff=5, registry=reg)(job_changed)
    kopf.on.update(*JOBS, field="spec.runPolicy.suspend", backoff=5, registry=reg)(job_changed)
    kopf.on.event("", "v1", "pods", labels={render.LABEL_JOB: kopf.PRESENT}, registry=reg)(pod_changed)
    kopf.on.event(*JOBS, registry=reg)(job_seen)
    if kueue_version:
        kopf.on.event(kueue.GROUP, kueue_version, kueue.PLURAL, labels={render.LABEL_JOB: kopf.PRESENT},
                      registry=reg)(workload_changed)
    return reg


async def reconcile(
    memo: kopf.Memo, namespace: str, name: str, logger: logging.Logger, *, last_seen: dict[str, Any] | None = None
) -> None:
    async with memo.inflight.enter() as open_:
        if open_:
            await _reconcile(memo, namespace, name, logger, last_seen)


async def _reconcile(
    memo: kopf.Memo, namespace: str, name: str, logger: logging.Logger, last_seen: dict[str, Any] | None
) -> None:
    settings: Settings = memo.settings
    api: kube.Kube = memo.kube
    async with memo.locks[(namespace, name)]:
        job = await api.get_job(namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        pods = _owned_by(job, await api.list_pods(namespace, f"{render.LABEL_JOB}={name}"))
        now = settings.clock()

        queued = kueue.queue_name(job) is not None
        workload = await api.get_workload(namespace, kueue.workload_name(job)) if queued else None
        pod_active = any(lifecycle.pod_outcome(pod).state in ("pending", "running", "terminating") for pod in pods)
        queueing = kueue.decide(job, workload, pod_active=pod_active, now=now)
        if queueing.suspend is not None:
            await api.patch_job_suspend(namespace, name, queueing.suspend)
            job["spec"].setdefault("runPolicy", {})["suspend"] = queueing.suspend

        decision = lifecycle.decide(job, pods, now, last_seen=last_seen)

        if queueing.create_workload and decision.job:
            await _create_workload(memo, job, decision.job, logger)
        for pod_name in decision.delete_pods:
            await api.delete_pod(namespace, pod_name)
        if decision.create_attempt and decision.job:
            await _create_attempt(memo, job, decision.job, decision.create_attempt, workload)
        patch = decision.status_patch(job.get("status"))
        if patch:
            await api.patch_job_status(namespace, name, patch)
        if workload is not None and not queueing.workload_status and decision.status.get("phase") in lifecycle.TERMINAL:
            # Finished in this very reconcile: tell Kueue now (nothing else may reconcile a finished job).
            queueing = kueue.decide({**job, "status": decision.status}, workload, pod_active=pod_active, now=now)
        if workload is not None and queueing.workload_status:
            await api.patch_workload_status(namespace, workload["metadata"]["name"], queueing.workload_status,
                                            workload["metadata"].get("resourceVersion"))
        for event in queueing.events + decision.events:
            kopf.event(job, type=event.type, reason=event.reason, message=event.message)
            logger.log(logging.INFO if event.type == "Normal" else logging.WARNING, f"{event.reason}: {event.message}")
        memo.metrics.job_phase(namespace, name, decision.status.get("phase"))
        if decision.delete_job:
            await api.delete_job(namespace, name)


async def _create_workload(memo: kopf.Memo, job: dict[str, Any], spec: GRPOJob, logger: logging.Logger) -> None:
    settings: Settings = memo.settings
    version = memo.kube.kueue_version
    try:
        if version is None:
            raise kube.NotServed(f"{kueue.GROUP} Workloads are not served: is Kueue installed?")
        workload = kueue.workload(job, render.pod(spec, 1, image=settings.runtime_image), version=version,
                                  count=spec.spec.resources.nodes)
        kopf.append_owner_reference(workload, owner=job)
        await memo.kube.create_workload(workload)
    except kube.Conflict:
        pass  # made before a restart: its name carries the job's uid
    except kube.NotServed as exc:
        message = f"{exc}: the job stays suspended until its Workload can be created"
        kopf.event(job, type="Warning", reason="QueueUnavailable", message=message)
        logger.warning(f"QueueUnavailable: {message}")


async def _create_attempt(
    memo: kopf.Memo, job: dict[str, Any], spec: GRPOJob, attempt: int, workload: dict[str, Any] | None
) -> None:
    """The support objects, then the attempt's pods; each owned by the job, each idempotent. A job
    admitted by Kueue runs on the nodes of the ResourceFlavors Kueue assigned it."""
    settings: Settings = memo.settings
    node_selector, tolerations = {}, []
    assigned = kueue.admitted_flavors(workload)
    if assigned:
        flavors = [await memo.kube.get_flavor(name) for name in sorted(set(assigned.values()))]
        node_selector, tolerations = kueue.placement([f for f in flavors if f])
    objects = render.support_objects(spec, s3_endpoint=settings.s3_endpoint)
    objects += render.pods(spec, attempt, image=settings.runtime_image, model_cache=settings.model_cache,
                           node_selector=node_selector, tolerations=tolerations)
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


def _owned_by(job: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's own pods: a deleted namesake's, not yet garbage-collected, carry the same label."""
    uid = job["metadata"].get("uid")
    return [pod for pod in pods
            if any(ref.get("uid") == uid for ref in (pod.get("metadata") or {}).get("ownerReferences") or [])]


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
