"""Can the operator serve GRPOJobs now? A pure function of the GRPOJob CRD as the API server has it.

`crd_readiness(crd)` takes the CustomResourceDefinition grpojobs.grpo.dev (None when it does
not exist) and says whether jobs can be served, and why not. The supervisor (supervisor.py)
runs kopf only while the answer is yes and reports it on /readyz; the CRD may be installed
after the operator (GitOps sync order, `helm install --skip-crds`), deleted, or reinstalled.

A CRD being deleted (metadata.deletionTimestamp) is not servable: the API server is deleting
every GRPOJob and will stop serving the resource once they are gone; a watch on it then ends
in 404s. Stopping first is what keeps the operator alive through a CRD reinstall.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from grpo_operator.crd import GROUP, PLURAL, VERSION

CRD_NAME = f"{PLURAL}.{GROUP}"


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str
    message: str


def _condition(crd: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for condition in (crd.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_:
            return condition
    return None


def crd_readiness(crd: Mapping[str, Any] | None) -> Readiness:
    """Ready when the CRD exists, is not being deleted, serves our version and is Established."""
    if crd is None:
        return Readiness(False, "CRDMissing", f"CustomResourceDefinition {CRD_NAME} does not exist (yet): "
                         "install it (crds/grpojob.yaml, or the chart without --skip-crds)")
    if (crd.get("metadata") or {}).get("deletionTimestamp"):
        return Readiness(False, "CRDTerminating", f"CustomResourceDefinition {CRD_NAME} is being deleted")
    versions = {v.get("name"): v for v in (crd.get("spec") or {}).get("versions") or []}
    if not (versions.get(VERSION) or {}).get("served"):
        return Readiness(False, "VersionNotServed", f"CustomResourceDefinition {CRD_NAME} does not serve {VERSION}")
    established = _condition(crd, "Established")
    if not established or established.get("status") != "True":
        detail = (established or {}).get("message") or "not yet established"
        return Readiness(False, "CRDNotEstablished", f"CustomResourceDefinition {CRD_NAME}: {detail}")
    return Readiness(True, "CRDEstablished", f"CustomResourceDefinition {CRD_NAME} is established")
