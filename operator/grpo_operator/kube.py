"""The operator's few Kubernetes API calls, on the official client's asyncio flavour.

kopf watches and posts events itself; this is what it does not do: read a job and its
pods, create the children, patch the job's status, delete pods (and jobs past their TTL).
Objects come back as plain camelCase dicts, as the API server serves them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kubernetes.aio import client, config

from grpo_operator import kueue
from grpo_operator.crd import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"


class APIError(Exception):
    """The API server refused a request (other than the 404s and 409s handled here)."""


def _check(status: int, body: dict[str, Any], what: str) -> None:
    if not 200 <= status < 300:
        raise APIError(f"{what}: HTTP {status} {body.get('reason', '')}: {body.get('message', '')}".strip())


class Conflict(Exception):
    """The object exists already (HTTP 409 on create)."""


class NotServed(Exception):
    """The API server does not serve that resource (its CRD is not installed)."""


async def connect() -> client.ApiClient:
    """In-cluster service account first, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        await config.load_kube_config(config_file=path, client_configuration=configuration)
    return client.ApiClient(configuration)


async def kueue_discovery(api: client.ApiClient) -> dict[str, set[str]]:
    """API discovery of the Kueue versions this operator speaks (kueue.VERSIONS): version -> the
    resources it serves; a version not served is absent. Discovery needs no RBAC. Other errors (the
    API server restarting) raise APIError."""
    served: dict[str, set[str]] = {}
    for version in kueue.VERSIONS:
        # the listing as served, not through the client's models: only the names are needed, and a model
        # that refuses one entry (a field it requires left out) must not blind the operator to Kueue
        try:
            response = await client.CustomObjectsApi(api).get_api_resources_without_preload_content(kueue.GROUP, version)
        except client.ApiException as exc:  # the connection's own failures
            raise APIError(f"discovery of {kueue.GROUP}/{version}: HTTP {exc.status} {exc.reason}") from exc
        status, listing = await Kube._json(response)
        if status == 404:
            continue
        if status >= 400:
            raise APIError(f"discovery of {kueue.GROUP}/{version}: HTTP {status} {listing.get('message', '')}".rstrip())
        served[version] = {r["name"] for r in listing.get("resources") or [] if isinstance(r, dict) and "name" in r}
    return served


class Kube:
    def __init__(self, api: client.ApiClient, *, kueue_version: str | None = kueue.VERSIONS[0]):
        self.api = api
        self.kueue_version = kueue_version  # kueue.workload_version() of discovery; None: Kueue not served
        self.core = client.CoreV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        # The *_without_preload_content calls: objects as served, not re-validated through the
        # client's models (which refuse, e.g., a container status a kubelet left incomplete).
        self._create = {
            "ServiceAccount": self.core.create_namespaced_service_account_without_preload_content,
            "ConfigMap": self.core.create_namespaced_config_map_without_preload_content,
            "Service": self.core.create_namespaced_service_without_preload_content,
            "Pod": self.core.create_namespaced_pod_without_preload_content,
            "Role": self.rbac.create_namespaced_role_without_preload_content,
            "RoleBinding": self.rbac.create_namespaced_role_binding_without_preload_content,
        }
        self._read = {
            "ServiceAccount": self.core.read_namespaced_service_account_without_preload_content,
            "ConfigMap": self.core.read_namespaced_config_map_without_preload_content,
            "Service": self.core.read_namespaced_service_without_preload_content,
            "Pod": self.core.read_namespaced_pod_without_preload_content,
            "Role": self.rbac.read_namespaced_role_without_preload_content,
            "RoleBinding": self.rbac.read_namespaced_role_binding_without_preload_content,
        }

    async def close(self) -> None:
        await self.api.close()

    @staticmethod
    async def _json(response: Any) -> tuple[int, dict[str, Any]]:
        body = await response.read()
        try:
            return response.status, (json.loads(body) if body else {})
        except ValueError:  # not the API server talking (a proxy's error page)
            return response.status, {"message": body[:200].decode(errors="replace")}

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]:
        """The GRPOJobs of one namespace (None: of all namespaces)."""
        if namespace is None:
            listing = await self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        else:
            listing = await self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        return list(listing.get("items") or [])

    async def patch_job_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": patch}, _content_type=MERGE_PATCH
        )

    async def delete_job(self, namespace: str, name: str) -> None:
        try:
            await self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
            )
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    async def patch_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        """spec.runPolicy.suspend, the one mutable spec field: Kueue admission drives it (kueue.py)."""
        await self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": {"runPolicy": {"suspend": suspend}}},
            _content_type=MERGE_PATCH,
        )

    async def get_workload(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.kueue_version is None:
            return None
        status, body = await self._json(await self.custom.get_namespaced_custom_object_without_preload_content(
            kueue.GROUP, self.kueue_version, namespace, kueue.PLURAL, name))
        if status == 404:
            return None
        _check(status, body, f"get Workload {namespace}/{name}")
        return body

    async def create_workload(self, obj: dict[str, Any]) -> None:
        """Create; Conflict when it exists; NotServed when Kueue is not installed."""
        meta = obj["metadata"]
        status, body = await self._json(await self.custom.create_namespaced_custom_object_without_preload_content(
            kueue.GROUP, self.kueue_version, meta["namespace"], kueue.PLURAL, obj))
        if status == 409:
            raise Conflict(f"Workload {meta['name']} exists")
        if status == 404:
            raise NotServed(f"{kueue.GROUP}/{self.kueue_version} Workloads are not served: is Kueue installed?")
        _check(status, body, f"create Workload {meta['namespace']}/{meta['name']}")

    async def patch_workload_status(self, namespace: str, name: str, status_patch: dict[str, Any],
                                    resource_version: str | None) -> bool:
        """Merge-patch the Workload's status, only if it is still at `resource_version` (False if not:
        Kueue wrote meanwhile; the next reconcile decides again)."""
        patch: dict[str, Any] = {"status": status_patch}
        if resource_version:
            patch["metadata"] = {"resourceVersion": resource_version}
        status, body = await self._json(
            await self.custom.patch_namespaced_custom_object_status_without_preload_content(
                kueue.GROUP, self.kueue_version, namespace, kueue.PLURAL, name, patch, _content_type=MERGE_PATCH))
        if status == 409:
            return False
        _check(status, body, f"patch Workload {namespace}/{name} status")
        return True

    async def get_flavor(self, name: str) -> dict[str, Any] | None:
        if self.kueue_version is None:
            return None
        status, body = await self._json(await self.custom.get_cluster_custom_object_without_preload_content(
            kueue.GROUP, self.kueue_version, "resourceflavors", name))
        if status == 404:
            return None
        _check(status, body, f"get ResourceFlavor {name}")
        return body

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, body = await self._json(await self._read[kind](name, namespace))
        if status == 404:
            return None
        _check(status, body, f"get {kind} {namespace}/{name}")
        return body

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create; raises Conflict when an object of that name exists."""
        meta = obj["metadata"]
        status, body = await self._json(await self._create[obj["kind"]](meta["namespace"], obj))
        if status == 409:
            raise Conflict(f"{obj['kind']} {meta['name']} exists")
        _check(status, body, f"create {obj['kind']} {meta['namespace']}/{meta['name']}")
        return body

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        status, body = await self._json(await self.core.list_namespaced_pod_without_preload_content(
            namespace, label_selector=label_selector))
        _check(status, body, f"list Pods {namespace} {label_selector}")
        return list(body.get("items") or [])

    async def delete_pod(self, namespace: str, name: str) -> None:
        status, body = await self._json(await self.core.delete_namespaced_pod_without_preload_content(name, namespace))
        if status != 404:
            _check(status, body, f"delete Pod {namespace}/{name}")
