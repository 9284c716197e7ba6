"""A Kueue double: Kueue's real CRDs (kueue_real_crds/: v0.19.2, serving v1beta1 and v1beta2, or
v0.14.8, serving v1beta1 only) in the API-server double, which validates and prunes Kueue objects
against them, and the status writes Kueue's controllers make to a Workload, through the API as
Kueue makes them, in Kueue's storage version.

What Kueue does and this double does (pkg/workload's SetQuotaReservation,
SetEvictedCondition, SetPreemptedCondition):
- admit(): the scheduler found quota in the ClusterQueue behind the Workload's LocalQueue:
  status.admission {clusterQueue, podSetAssignments [{name, flavors, resourceUsage, count}]},
  QuotaReserved True (reason QuotaReserved), Admitted True (reason Admitted: no admission
  checks); an earlier Evicted or Preempted condition turns False (reason QuotaReserved,
  message "Previously: ..."), status.resourceRequests (what the pod sets request). A podSet's
  resourceUsage and resourceRequests are its pods' together: one pod's requests times its count.
- evict(): preemption (or deactivation, a pods-ready timeout, ...): Evicted True with the
  reason, and for a preemption Preempted True (reason InClusterQueue); status.schedulingStats
  counts the eviction. Kueue then waits for the
  job's integration -- here the operator -- to stop the job and release the reservation.
It admits only a Workload whose LocalQueue and ClusterQueue exist, and assigns each resource
the first flavor of the ClusterQueue's resource group that covers it.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from k8s_doubles import ApiServerDouble, stored, stored_all

REAL_CRDS = Path(__file__).parent / "kueue_real_crds"
RELEASES = {"v0.19.2": REAL_CRDS, "v0.14.8": REAL_CRDS / "v0.14.8"}


@functools.lru_cache(maxsize=None)
def crds(release: str = "v0.19.2") -> tuple[dict[str, Any], ...]:
    """Kueue's CRDs of that release (Workload, ResourceFlavor, LocalQueue, ClusterQueue), as shipped."""
    return tuple(yaml.load(gzip.decompress(path.read_bytes()), Loader=yaml.CSafeLoader)
                 for path in sorted(RELEASES[release].glob("*.yaml.gz")))


def storage_version(release: str = "v0.19.2") -> str:
    workload_crd = next(c for c in crds(release) if c["spec"]["names"]["kind"] == "Workload")
    return next(v["name"] for v in workload_crd["spec"]["versions"] if v.get("storage"))


MERGE = {"Content-Type": "application/merge-patch+json"}


def times(quantity: str | int, count: int) -> str:
    """A Kubernetes quantity times a count, in its own unit: "24Gi" x 2 = "48Gi", "500m" x 3 = "1500m"."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", str(quantity))
    assert match, f"the double reads plain quantities only, not {quantity!r}"
    return f"{(Decimal(match[1]) * count).normalize():f}{match[2]}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _set(conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str,
         generation: int | None) -> None:
    for condition in conditions:
        if condition["type"] == type_:
            if condition["status"] != status:
                condition["lastTransitionTime"] = _now()
            condition.update(status=status, reason=reason, message=message)
            break
    else:
        conditions.append({"type": type_, "status": status, "reason": reason, "message": message,
                           "lastTransitionTime": _now()})
    if generation is not None:
        next(c for c in conditions if c["type"] == type_)["observedGeneration"] = generation


class KueueDouble:
    def __init__(self, server: ApiServerDouble, release: str = "v0.19.2"):
        self.server, self.release = server, release
        self.version = storage_version(release)  # what Kueue's own controllers speak
        self.api = f"kueue.x-k8s.io/{self.version}"

    async def install(self) -> None:
        for crd in copy.deepcopy(crds(self.release)):
            response = await self.server.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd)
            assert response.status == 201, await response.text()

    async def apply(self, obj: dict[str, Any]) -> None:
        """Create a Kueue object (a ResourceFlavor, ClusterQueue or LocalQueue)."""
        api, kind = obj["apiVersion"], obj["kind"]
        plural = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues",
                  "LocalQueue": "localqueues"}[kind]
        namespace = obj["metadata"].get("namespace")
        path = f"/apis/{api}/namespaces/{namespace}/{plural}" if namespace else f"/apis/{api}/{plural}"
        response = await self.server.post(path, json=obj)
        assert response.status == 201, await response.text()

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        return stored_all(self.server, f"{self.api}/workloads", namespace)

    def workload_of(self, namespace: str, job: str) -> dict[str, Any] | None:
        found = [w for w in self.workloads(namespace) if w["metadata"].get("labels", {}).get("grpo.dev/job-name") == job]
        assert len(found) <= 1, found
        return found[0] if found else None

    async def _patch_status(self, workload: dict[str, Any], status: dict[str, Any]) -> None:
        meta = workload["metadata"]
        url = f"/apis/{self.api}/namespaces/{meta['namespace']}/workloads/{meta['name']}/status"
        body = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
        response = await self.server.patch(url, data=json.dumps(body), headers=MERGE)
        assert response.status == 200, await response.text()

    def _assign(self, workload: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        namespace = workload["metadata"]["namespace"]
        local = stored(self.server, f"{self.api}/localqueues", namespace, workload["spec"]["queueName"])
        assert local, f"LocalQueue {namespace}/{workload['spec']['queueName']} does not exist: Kueue admits nothing"
        cluster_queue = local["spec"]["clusterQueue"]
        queue = stored(self.server, f"{self.api}/clusterqueues", None, cluster_queue)
        assert queue, f"ClusterQueue {cluster_queue} does not exist"
        assignments = []
        for pod_set in workload["spec"]["podSets"]:
            usage: dict[str, Any] = {}
            for container in pod_set["template"]["spec"]["containers"]:
                for resource, value in (container.get("resources", {}).get("requests") or {}).items():
                    usage[resource] = times(value, pod_set["count"])  # one container here: no sum needed
            flavors = {}
            for resource in usage:
                group = next((g for g in queue["spec"]["resourceGroups"] if resource in g["coveredResources"]), None)
                assert group, f"ClusterQueue {cluster_queue} covers no {resource}: Kueue would not admit it"
                flavors[resource] = group["flavors"][0]["name"]
            assignments.append({"name": pod_set["name"], "flavors": flavors, "resourceUsage": usage,
                                "count": pod_set["count"]})
        return cluster_queue, assignments

    async def admit(self, namespace: str, job: str) -> dict[str, Any]:
        workload = self.workload_of(namespace, job)
        assert workload, f"no Workload for GRPOJob {namespace}/{job}"
        cluster_queue, assignments = self._assign(workload)
        conditions = copy.deepcopy(workload.get("status", {}).get("conditions") or [])
        generation = workload["metadata"].get("generation")
        _set(conditions, "QuotaReserved", "True", "QuotaReserved", f"Quota reserved in ClusterQueue {cluster_queue}",
             generation)
        for type_ in ("Evicted", "Preempted"):
            old = next((c for c in conditions if c["type"] == type_), None)
            if old and old["status"] == "True":
                _set(conditions, type_, "False", "QuotaReserved", "Previously: " + old["message"], generation)
        _set(conditions, "Admitted", "True", "Admitted", "The workload is admitted", generation)
        await self._patch_status(workload, {
            "admission": {"clusterQueue": cluster_queue, "podSetAssignments": assignments},
            "conditions": conditions,
            "resourceRequests": [{"name": a["name"], "resources": a["resourceUsage"]} for a in assignments],
        })
        return self.workload_of(namespace, job)

    async def evict(self, namespace: str, job: str, reason: str = "Preempted",
                    message: str = "Preempted to accommodate a workload (UID: 0f1e) due to prioritization "
                                   "in the ClusterQueue") -> None:
        workload = self.workload_of(namespace, job)
        assert workload
        conditions = copy.deepcopy(workload.get("status", {}).get("conditions") or [])
        generation = workload["metadata"].get("generation")
        _set(conditions, "Evicted", "True", reason, message, generation)
        if reason == "Preempted":
            _set(conditions, "Preempted", "True", "InClusterQueue", message, generation)
        evictions = copy.deepcopy((workload.get("status", {}).get("schedulingStats") or {}).get("evictions") or [])
        for eviction in evictions:
            if (eviction["reason"], eviction["underlyingCause"]) == (reason, ""):
                eviction["count"] += 1
                break
        else:
            evictions.append({"reason": reason, "underlyingCause": "", "count": 1})
        await self._patch_status(workload, {"conditions": conditions, "schedulingStats": {"evictions": evictions}})

    async def check(self, namespace: str, job: str, name: str, state: str = "Ready") -> None:
        """An admission check's controller (e.g. ProvisioningRequest's) reports on the Workload."""
        workload = self.workload_of(namespace, job)
        assert workload
        checks = [c for c in workload.get("status", {}).get("admissionChecks") or [] if c["name"] != name]
        checks.append({"name": name, "state": state, "message": f"check {name} is {state}",
                       "lastTransitionTime": _now()})
        await self._patch_status(workload, {"admissionChecks": checks})


def condition(workload: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((c for c in (workload or {}).get("status", {}).get("conditions") or [] if c["type"] == type_), {})
