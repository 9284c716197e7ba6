"""Kueue admission of GRPOJobs: what to do with a job's Workload. Pure: dicts in, a decision out.

A GRPOJob labelled `kueue.x-k8s.io/queue-name: Q` is queued in Kueue's LocalQueue Q. This
operator is GRPOJob's Kueue integration, doing for it what Kueue's job framework does for the
kinds it knows (and what Apache's Spark Kubernetes operator does for its own CRDs):

- it creates one Workload per job, owned by the job (deleted with it), in the API version
  workload_version() picks from what the API server serves (v1beta2 where served, else v1beta1):
  spec.queueName Q, one podSet `trainer` whose count is the job's pods (spec.resources.nodes)
  and whose template is the training pod with its requests (its GPUs, spec.resources.gpus,
  included), labelled kueue.x-k8s.io/job-uid: Kueue admits a job of several nodes all or
  nothing, quota for every pod at once or none;
- while the Workload is not admitted the job is suspended (spec.runPolicy.suspend: true, the
  field Kueue's integrations drive); when Kueue admits it (QuotaReserved and Admitted True,
  status.admission set) the job is resumed (suspend: false) and its pod gets the node labels
  and tolerations of the ResourceFlavors Kueue assigned (status.admission.podSetAssignments);
- when Kueue evicts it (Evicted True: preemption, a deactivated Workload, a pods-ready
  timeout, ...) the job is suspended, its pod deleted (a disruption of the run, not a failure:
  it resumes from its last checkpoint), and once the pod is gone the quota reservation is
  released as Kueue's job framework does (status.admission cleared, QuotaReserved False with
  reason Pending, Admitted False): Kueue requeues the Workload and may admit it again;
- when the job finishes, the Workload gets Finished True (reason Succeeded or Failed), which
  releases its quota.

Conditions and fields follow Kueue's Workload API: condition types QuotaReserved, Admitted,
Evicted, Finished (PodsReady, Preempted and Requeued are Kueue's own and only read here);
metav1.Condition shape. Every field written or read here (spec.queueName, spec.podSets[].name,
count and template, status.conditions, status.admission.clusterQueue and podSetAssignments[].name
and flavors; a ResourceFlavor's spec.nodeLabels and tolerations) has the same name, type and
meaning in v1beta1 and v1beta2 (Kueue v0.19's CRDs); so the version only changes the apiVersion.
Kueue v0.16+ deprecates v1beta1 (a warning on every call) and will stop serving it.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Collection, Mapping

from grpo_operator.lifecycle import TERMINAL, Event, set_condition

GROUP, PLURAL = "kueue.x-k8s.io", "workloads"
VERSIONS = ("v1beta2", "v1beta1")  # the Workload API versions this operator speaks, preferred first
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
POD_SET = "trainer"


def workload_version(served: Mapping[str, Collection[str]]) -> str | None:
    """The Kueue API version to use, from discovery of the kueue.x-k8s.io group (version -> the
    resources it serves): the first of VERSIONS that serves Workloads and ResourceFlavors; None
    where Kueue is not installed (or serves none of them)."""
    for version in VERSIONS:
        if {PLURAL, "resourceflavors"} <= set(served.get(version) or ()):
            return version
    return None


def queue_name(job: Mapping[str, Any]) -> str | None:
    return ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL) or None


def workload_name(job: Mapping[str, Any]) -> str:
    """grpojob-<name>-<5 hex of the uid>, as Kueue names the Workloads of the kinds it integrates."""
    meta = job.get("metadata") or {}
    digest = hashlib.sha256(str(meta.get("uid", "")).encode()).hexdigest()[:5]
    return f"grpojob-{meta.get('name', '')[:240]}-{digest}"


def _requests_from_limits(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """The API server defaults a container's missing requests to its limits; Kueue counts requests."""
    spec = copy.deepcopy(pod_spec)
    for container in spec.get("containers") or []:
        resources = container.setdefault("resources", {})
        requests = resources.setdefault("requests", {})
        for name, value in (resources.get("limits") or {}).items():
            requests.setdefault(name, value)
    return spec


def workload(job: Mapping[str, Any], pod: Mapping[str, Any], *, version: str, count: int = 1) -> dict[str, Any]:
    """The job's Workload in API `version`; `pod` is the rendered training pod (render.pod; pod 0 stands
    for each of a gang's `count` pods: they ask for the same). The owner reference is added by the
    caller, as for the job's other children."""
    meta = job["metadata"]
    return {
        "apiVersion": f"{GROUP}/{version}",
        "kind": "Workload",
        "metadata": {
            "name": workload_name(job),
            "namespace": meta["namespace"],
            "labels": {JOB_UID_LABEL: meta.get("uid", ""), **{
                k: v for k, v in (pod.get("metadata") or {}).get("labels", {}).items() if k.startswith("grpo.dev/")}},
        },
        "spec": {
            "queueName": queue_name(job),
            "podSets": [{
                "name": POD_SET,
                "count": count,
                "template": {
                    "metadata": {"labels": dict((pod.get("metadata") or {}).get("labels") or {})},
                    "spec": _requests_from_limits(pod["spec"]),
                },
            }],
        },
    }


def _condition(obj: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_:
            return condition
    return None


def _true(obj: Mapping[str, Any] | None, type_: str) -> bool:
    return (_condition(obj, type_) or {}).get("status") == "True"


def admitted_flavors(wl: Mapping[str, Any] | None) -> dict[str, str] | None:
    """resource -> ResourceFlavor name of an admitted, not evicted Workload; None otherwise."""
    admission = ((wl or {}).get("status") or {}).get("admission")
    if not admission or not _true(wl, "QuotaReserved") or not _true(wl, "Admitted") or _true(wl, "Evicted"):
        return None
    for assignment in admission.get("podSetAssignments") or []:
        if assignment.get("name") == POD_SET:
            return dict(assignment.get("flavors") or {})
    return {}


def placement(flavors: list[Mapping[str, Any]]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The nodeSelector and tolerations a pod gets from its assigned ResourceFlavors (their
    spec.nodeLabels and spec.tolerations), as Kueue's integrations inject them."""
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    for flavor in flavors:
        spec = flavor.get("spec") or {}
        node_selector.update(spec.get("nodeLabels") or {})
        tolerations += [dict(t) for t in spec.get("tolerations") or [] if dict(t) not in tolerations]
    return node_selector, tolerations


@dataclass
class KueueDecision:
    create_workload: bool = False
    suspend: bool | None = None  # set spec.runPolicy.suspend to this
    workload_status: dict[str, Any] | None = None  # merge patch of the Workload's status
    events: list[Event] = field(default_factory=list)


def _status_patch(wl: Mapping[str, Any], now: datetime, changes: list[tuple[str, bool, str, str]],
                  clear_admission: bool = False) -> dict[str, Any]:
    status = {"conditions": copy.deepcopy(((wl.get("status") or {}).get("conditions")) or [])}
    for type_, value, reason, message in changes:
        set_condition(status, type_, value, reason, message, now)
    generation = (wl.get("metadata") or {}).get("generation")
    if generation is not None:
        for condition in status["conditions"]:
            if condition["type"] in {change[0] for change in changes}:
                condition["observedGeneration"] = generation
    if clear_admission:
        status["admission"] = None
    return status


def decide(job: Mapping[str, Any], wl: Mapping[str, Any] | None, *, pod_active: bool, now: datetime) -> KueueDecision:
    """What the job's queueing needs now, given its Workload (None: not created yet) and whether its
    pod still runs (or terminates)."""
    d = KueueDecision()
    queue = queue_name(job)
    if not queue:
        return d
    name = workload_name(job)
    phase = (job.get("status") or {}).get("phase")
    suspended = bool(((job.get("spec") or {}).get("runPolicy") or {}).get("suspend"))

    if phase in TERMINAL:
        if wl is not None and not _true(wl, "Finished"):
            d.workload_status = _status_patch(wl, now, [("Finished", True, phase, f"the GRPOJob {phase.lower()}")])
        return d

    if wl is None:
        d.create_workload = True
        if not suspended:
            d.suspend = True
        d.events.append(Event("Normal", "Queued", f"queued in LocalQueue {queue} as Workload {name}; "
                                                  "it runs when Kueue admits it"))
        return d

    flavors = admitted_flavors(wl)
    if flavors is not None:
        if suspended:
            d.suspend = False
            cluster_queue = ((wl.get("status") or {}).get("admission") or {}).get("clusterQueue")
            d.events.append(Event("Normal", "Admitted", f"Workload {name} admitted by ClusterQueue {cluster_queue}"))
        return d

    evicted = _condition(wl, "Evicted") if _true(wl, "Evicted") else None
    if not suspended:
        d.suspend = True
        if evicted:
            d.events.append(Event(
                "Warning", "Evicted",
                f"Kueue evicted Workload {name} ({evicted.get('reason')}: {evicted.get('message')}): the job is "
                "suspended, and resumes from its last checkpoint when admitted again",
            ))
        else:
            d.events.append(Event("Normal", "Queued", f"Workload {name} is not admitted (yet): the job waits"))
    reserved = bool((wl.get("status") or {}).get("admission")) or _true(wl, "QuotaReserved")
    if evicted and reserved and suspended and not pod_active:
        message = str(evicted.get("message") or "evicted")
        d.workload_status = _status_patch(wl, now, [
            ("QuotaReserved", False, "Pending", message),
            ("Admitted", False, "NoReservation", "The workload has no reservation"),
        ], clear_admission=True)
    return d
