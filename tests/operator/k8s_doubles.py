"""Test doubles for Kubernetes: an API server (kmock's emulator, extended) and the operator runner.

kmock's KubernetesEmulator (kmock 0.8) stores objects, serves list/watch/get and merges
patches, but is deliberately simple. ApiServerDouble adds, here and nowhere else, the
semantics the operator and its users rely on; each extension names what the real API
server does:

- create: metadata.uid, resourceVersion, creationTimestamp and generation are assigned
  (the kubernetes client refuses ownerReferences without a uid); the namespace comes from
  the URL; 201 Created; 409 AlreadyExists (as a real Status); 422 without a name; status
  is reset on create for resources with a status subresource (pods start Pending); a pod
  naming a ServiceAccount that does not exist is refused (the ServiceAccount admission).
- update: JSON merge patch, JSON patch (a failed `test` op is 422, which kopf's optimistic
  concurrency relies on), and strategic merge patch (approximated as a merge patch); the
  status subresource changes only `status`, the main resource never does;
  uid/name/namespace/creationTimestamp are immutable; a `metadata.resourceVersion` in the
  patch is a precondition (409 Conflict when stale); resourceVersion increases on every
  write; metadata.generation increases when the spec changes.
- delete: ownerReference garbage collection: dependents whose owners are all gone are
  deleted (at once, where the real collector is merely quick), recursively.
- discovery: the core group's groupVersion is "v1" (kmock says "/v1", which kubectl
  misreads); /version says v1.33.
- read: labelSelector (equality-based: a=b, a==b, a!=b, a, !a) and fieldSelector
  (metadata.name, metadata.namespace) on list and watch; list kind/resourceVersion;
  `Accept: ...;as=Table` answered with a meta.k8s.io/v1 Table that uses the CRD's
  additionalPrinterColumns (what `kubectl get` prints).
- speed: kmock routes each request by rescanning all recorded ones; the double keeps only
  in-flight requests in kmock's log and the served ones in `served` (assert on that).
- CRDs: creating a CustomResourceDefinition (or install_crd()) registers its resource for
  discovery (kind, shortNames, categories, status subresource), its printer columns, and
  its OpenAPI v3 document under /openapi/v3 (kubectl apply looks there for server-side
  fieldValidation, kubectl explain for the schema); the created CRD's status says
  NamesAccepted and Established at once (the API server's controllers are merely quick).
  Deleting a CRD does what the API server does, in its order: the CRD is marked
  (deletionTimestamp, Terminating=True: a MODIFIED event), every object of its resource is
  deleted (DELETED events), the resource leaves discovery and its URLs answer 404, and the
  CRD itself is deleted. Creating it again serves the resource again, with no objects.
- CRD versions: only `served: true` versions are served; a CRD of several versions keeps one
  object per name, stored in its `storage: true` version and served in any served version
  (apiVersion rewritten: the conversion of a CRD whose versions have the same fields, which is
  all the double knows; Kueue's webhook also renames fields no test here uses). Requests to a
  `deprecated: true` version are listed in `deprecated_calls` (the API server's warning header).
- OpenAPI schema of the requested version, for the groups in `schema_groups` (Kueue's; not yet
  grpo.dev, whose tests here post deliberately partial GRPOJobs) (crd_validation.py): unknown fields are pruned (or, with
  `?fieldValidation=Strict`, refused with 400 "strict decoding error: unknown field"), then type,
  required, enum, pattern, lengths, counts, bounds and list-map keys are checked (422 Invalid
  naming the field, as the API server words it).
- CEL validation rules (x-kubernetes-validations) of a CRD's schema run on create and on
  every write (the status subresource's included: the whole object is validated), with the
  API server's semantics (crd_validation.py: transition rules run only where the old object
  has the node), after the schema's defaults are filled in; a failed rule is a 422 Invalid
  naming the field and the rule's message.

Not emulated: admission webhooks, conversion webhooks, RBAC, namespaces' own
existence, PUT, graceful pod termination (a deleted pod is gone at once), real watch
resourceVersions (a watch replays the current objects, then streams changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import dicts as kmock_dicts  # kmock's own merge-patch (the one it applies)

from crd_validation import apply_defaults, prune, schema_errors, unknown_fields, violations

WRITE_ACTIONS = (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)


def status_error(code: int, reason: str, message: str) -> kmock.Response:
    """An error as the API server sends it: a v1 Status with a machine-readable reason."""
    return kmock.Response(
        status=code,
        payload={"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                 "code": code, "reason": reason, "message": message},
    )


def merge_patch(old: Any, new: Any) -> dict[str, Any]:
    """The RFC 7386 merge patch that turns `old` into `new` (both dicts)."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif isinstance(value, dict) and isinstance(old[key], dict):
            sub = merge_patch(old[key], value)
            if sub:
                patch[key] = sub
        elif value != old[key]:
            patch[key] = value
    return patch


def jsonpath(obj: Any, path: str) -> Any:
    """The simple JSONPath of printer columns: .a.b.c (None where absent)."""
    for part in path.strip(".").split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def human_age(since: str, now: datetime | None = None) -> str:
    """kubectl's AGE: 42s, 5m3s, 17m, 3h4m, 2d5h, 12d."""
    moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
    seconds = max(0, int(((now or datetime.now(timezone.utc)) - moment).total_seconds()))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d"


def _selector_matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _fields_match(obj: dict[str, Any], selector: str) -> bool:
    meta = obj.get("metadata") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        key, value = (s.strip() for s in term.replace("!=", "=").replace("==", "=").split("=", 1))
        actual = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}.get(key)
        if (actual == value) == negate:
            return False
    return True


def _matches(obj: dict[str, Any], params: dict[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return _selector_matches(labels, params.get("labelSelector", "")) and _fields_match(
        obj, params.get("fieldSelector", "")
    )


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(type_: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}


CRDS = kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions")


@attrs.define(kw_only=True)
class ApiServerDouble(kmock.KubernetesEmulator):
    """kmock's emulator with the API-server semantics listed in this module's docstring."""

    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _revisions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _revision: int = attrs.field(default=0, init=False)
    _printer_columns: dict[Any, list[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    served: list[kmock.Request] = attrs.field(factory=list, init=False)
    _openapi: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)
    _schemas: dict[Any, tuple[str, dict[str, Any]]] = attrs.field(factory=dict, init=False)
    _uninstalled: set[Any] = attrs.field(factory=set, init=False)  # resources of deleted CRDs
    _storage: dict[Any, Any] = attrs.field(factory=dict, init=False)  # served version -> stored version
    _deprecated: set[Any] = attrs.field(factory=set, init=False)
    deprecated_calls: list[str] = attrs.field(factory=list, init=False)
    schema_groups: set[str] = attrs.field(factory=lambda: {"kueue.x-k8s.io"}, init=False)  # "METHOD path" of deprecated versions

    async def _serve_version(self, request: kmock.Request) -> Any:
        # kmock says groupVersion "/v1" for the core group; kubectl then resolves `pods` elsewhere.
        listing = await super()._serve_version(request)
        listing["groupVersion"] = listing["groupVersion"].lstrip("/")
        return listing

    async def _serve_server_version(self, request: kmock.Request) -> Any:
        # kubectl prints it and warns on a skew: say the version kubectl is.
        return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-apiserver-double", "platform": "linux/amd64"}

    # ---- CRDs ---------------------------------------------------------------------------------

    def install_crd(self, crd: dict[str, Any]) -> None:
        """Serve a CRD's resource as the API server does once the CRD is established."""
        spec, names = crd["spec"], crd["spec"]["names"]
        stored_in = next((v["name"] for v in spec["versions"] if v.get("storage")), spec["versions"][0]["name"])
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            key = f"{spec['group']}/{version['name']}/{names['plural']}"
            self._storage[kmock.resource(key)] = kmock.resource(f"{spec['group']}/{stored_in}/{names['plural']}")
            if version.get("deprecated"):
                self._deprecated.add(kmock.resource(key))
            self.resources[key] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular", names["kind"].lower()),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs={"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"},
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources=set((version.get("subresources") or {}).keys()),
            )
            self._uninstalled.discard(kmock.resource(key))
            self._printer_columns[kmock.resource(key)] = version.get("additionalPrinterColumns", [])
            self._schemas[kmock.resource(key)] = (
                f"{names['kind']}.{spec['group']}", (version.get("schema") or {}).get("openAPIV3Schema") or {})
            self._openapi[f"apis/{spec['group']}/{version['name']}"] = _openapi_document(crd, version)

    async def _uninstall_crd(self, name: str) -> None:
        """A CRD's deletion as the API server carries it out (see the module's docstring)."""
        key = (CRDS, None, name)
        if key not in self.objects or self.objects[key].deleted:
            return
        crd = copy.deepcopy(self.objects[key].raw)
        crd["metadata"]["deletionTimestamp"] = _now()
        conditions = [c for c in (crd.get("status") or {}).get("conditions") or [] if c["type"] != "Terminating"]
        conditions.append(_condition("Terminating", "True", "InstanceDeletionInProgress",
                                     "CustomResource deletion is in progress"))
        crd.setdefault("status", {})["conditions"] = conditions
        spec = crd["spec"]
        resources = {kmock.resource(f"{spec['group']}/{v['name']}/{spec['names']['plural']}")
                     for v in spec["versions"]}
        async with self._lock:
            await self._buses[CRDS].put({"type": "MODIFIED", "object": crd})
            for (resource, _, _), obj in list(self.objects.items()):
                if resource in resources and not obj.deleted:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})
        for resource in resources:
            if resource in self.resources:
                del self.resources[resource]
            self._schemas.pop(resource, None)
            self._printer_columns.pop(resource, None)
            self._storage.pop(resource, None)
            self._uninstalled.add(resource)
        for version in spec["versions"]:
            self._openapi.pop(f"apis/{spec['group']}/{version['name']}", None)

    def _get_resources(self) -> list[Any]:
        return [resource for resource in super()._get_resources() if resource not in self._uninstalled]

    # ---- request routing ----------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> Any:
        # kmock routes a request by scanning every request recorded so far (O(n) each, O(n^2) a
        # test: minutes for 50 jobs). Only in-flight requests stay in kmock's log; served ones
        # move to `served`, which tests read instead of kmock's views.
        try:
            return await self._serve(request)
        finally:
            with contextlib.suppress(ValueError):
                self._requests.remove(request)
            self.served.append(request)

    async def _serve(self, request: kmock.Request) -> Any:
        if request.url.path.startswith("/openapi/"):
            return self._serve_openapi(request)
        if request.resource is not None and any(request.resource == gone for gone in self._uninstalled):
            return await status_error(404, "NotFound", "the server could not find the requested resource")(request)
        asked = request.resource
        if (asked is not None and getattr(asked, "plural", None) and asked not in self._storage
                and any(served.group == asked.group for served in self._storage)):
            # a CRD's group serves only the versions its CRD marks served (Kueue v0.14 has no v1beta2)
            return await status_error(404, "NotFound", "the server could not find the requested resource")(request)
        if asked is not None and asked in self._storage:
            if asked in self._deprecated:
                self.deprecated_calls.append(f"{request.method.value} {request.url.path}")
            object.__setattr__(request, "resource", self._storage[asked])  # one object, every version
        return await self._serve_versioned(request)

    @staticmethod
    def _asked(request: kmock.Request) -> Any:
        """The resource in the version the request's URL names (request.resource: where it is stored)."""
        parts = request.url.path.split("/")
        if request.resource is None or len(parts) < 4 or parts[1] != "apis":
            return request.resource
        return kmock.resource(f"{parts[2]}/{parts[3]}/{request.resource.plural}")

    def _as_asked(self, request: kmock.Request, obj: Any) -> Any:
        """An object in the version the request named (the storage version is what is kept)."""
        asked = self._asked(request)
        if asked == request.resource or not isinstance(obj, dict) or "apiVersion" not in obj:
            return obj
        return {**obj, "apiVersion": f"{asked.group}/{asked.version}"}

    async def _serve_versioned(self, request: kmock.Request) -> Any:
        if request.resource is None or request.action not in WRITE_ACTIONS:
            return await super()._handle(request)
        async with self._write_lock:  # admission + storage + GC as one step, like etcd's transaction
            try:
                request = self._admit(request)
            except _Refused as refusal:
                return await refusal.response(request)
            if request.action == kmock.action.DELETE and request.resource == CRDS and request.name:
                await self._uninstall_crd(request.name)
            response = await super()._handle(request)
            if request.action in (kmock.action.DELETE, kmock.action.UPDATE):
                await self._collect_garbage()
            return response

    def _info(self, resource: Any) -> kmock.ResourceInfo | None:
        return self.resources[resource] if resource in self.resources else None

    def _has_status(self, resource: Any) -> bool:
        info = self._info(resource)
        return bool(info and "status" in info.subresources)

    def _next_revision(self) -> str:
        self._revision = next(self._revisions)
        return str(self._revision)

    def _validate(self, request: kmock.Request, new: dict[str, Any], old: dict[str, Any] | None = None) -> None:
        """The CRD's CEL rules, as the API server runs them (crd_validation.py); 422 when any fails."""
        asked = self._asked(request)
        if asked not in self._schemas:
            return
        kind, schema = self._schemas[asked]
        name = (new.get("metadata") or {}).get("name")
        unknown = unknown_fields(schema, new) if asked.group in self.schema_groups else []
        if unknown and dict(request.params).get("fieldValidation") == "Strict":
            raise _Refused(400, "BadRequest", f'{kind.split(".")[0]} in version "{asked.version}" cannot be handled '
                           f'as a {kind.split(".")[0]}: strict decoding error: '
                           + ", ".join(f'unknown field "{path}"' for path in unknown))
        errors: list[str] = []
        if asked.group in self.schema_groups:
            errors = schema_errors(schema, prune(schema, new))
        if errors:
            detail = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
            raise _Refused(422, "Invalid", f'{kind} "{name}" is invalid: {detail}')
        apply_defaults(schema, new)
        found = violations(schema, new) if old is None else violations(schema, new, old)
        if found:
            detail = found[0] if len(found) == 1 else "[" + ", ".join(found) + "]"
            raise _Refused(422, "Invalid", f'{kind} "{name}" is invalid: {detail}')

    def _admit(self, request: kmock.Request) -> kmock.Request:
        if request.action == kmock.action.CREATE:
            return self._admit_create(request)
        if request.action == kmock.action.UPDATE:
            return self._admit_update(request)
        return request

    def _admit_create(self, request: kmock.Request) -> kmock.Request:
        obj = copy.deepcopy(request.data) if isinstance(request.data, dict) else {}
        meta = obj.setdefault("metadata", {})
        info = self._info(request.resource)
        namespace = request.namespace or meta.get("namespace")
        if info is None or info.namespaced is not False:
            meta["namespace"] = namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if not meta.get("name"):
            raise _Refused(422, "Invalid", "metadata.name: Required value: name or generateName is required")
        key = (request.resource, namespace, meta["name"])
        if key in self.objects and not self.objects[key].deleted:
            plural = request.resource.plural
            raise _Refused(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
        if request.resource == kmock.resource("v1/pods"):
            account = (obj.get("spec") or {}).get("serviceAccountName")
            sa_key = (kmock.resource("v1/serviceaccounts"), namespace, account)
            if account and account != "default" and (sa_key not in self.objects or self.objects[sa_key].deleted):
                raise _Refused(
                    403, "Forbidden",
                    f'pods "{meta["name"]}" is forbidden: error looking up service account '
                    f'{namespace}/{account}: serviceaccount "{account}" not found',
                )
        self._validate(request, obj)
        if "apiVersion" in obj and request.resource.group:
            obj["apiVersion"] = f"{request.resource.group}/{request.resource.version}"  # stored as
        meta.update(
            uid=str(uuid.uuid4()),
            resourceVersion=self._next_revision(),
            creationTimestamp=_now(),
            generation=1,
        )
        meta.pop("deletionTimestamp", None)
        if self._has_status(request.resource):
            obj.pop("status", None)
            if request.resource == kmock.resource("v1/pods"):
                obj["status"] = {"phase": "Pending"}
        if request.resource == CRDS:
            self.install_crd(obj)
            obj["status"] = {
                "conditions": [
                    _condition("NamesAccepted", "True", "NoConflicts", "no conflicts found"),
                    _condition("Established", "True", "InitialNamesAccepted", "the initial names have been accepted"),
                ],
                "acceptedNames": obj["spec"]["names"],
                "storedVersions": [v["name"] for v in obj["spec"]["versions"] if v.get("storage")],
            }
        return _with_data(request, obj)

    def _admit_update(self, request: kmock.Request) -> kmock.Request:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            raise _Refused(404, "NotFound", f'{request.resource.plural} "{request.name}" not found')
        old = copy.deepcopy(self.objects[key].raw)
        patch = request.data
        content_type = request.headers.get("Content-Type", "")
        if isinstance(patch, list) or "json-patch" in content_type:
            try:
                new = jsonpatch.apply_patch(copy.deepcopy(old), list(patch or []))
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise _Refused(422, "Invalid", f"the JSON patch failed: {exc}") from None
        elif isinstance(patch, dict):
            expected = (patch.get("metadata") or {}).get("resourceVersion")
            if expected is not None and expected != old["metadata"].get("resourceVersion"):
                raise _Refused(
                    409, "Conflict",
                    f'Operation cannot be fulfilled on {request.resource.plural} "{request.name}": '
                    "the object has been modified; please apply your changes to the latest version and try again",
                )
            new = kmock_dicts.merge_patch_dict(copy.deepcopy(old), patch)
        else:
            raise _Refused(400, "BadRequest", f"unsupported patch body {type(patch).__name__}")
        new = dict(new)

        if request.subresource == "status":
            new = {**old, "status": new.get("status")} if new.get("status") is not None else {
                k: v for k, v in old.items() if k != "status"}
        elif request.subresource:
            raise _Refused(404, "NotFound", f"subresource {request.subresource} is not served")
        elif self._has_status(request.resource):
            new.pop("status", None)
            if "status" in old:
                new["status"] = old["status"]
        if "apiVersion" in old:
            new["apiVersion"] = old["apiVersion"]  # stored in the storage version, whichever was asked
        self._validate(request, new, old)  # the whole object, on status writes too
        meta = new.setdefault("metadata", {})
        for field in ("uid", "name", "namespace", "creationTimestamp", "deletionTimestamp"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
        if new.get("spec") != old.get("spec"):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_revision()
        return _with_data(request, merge_patch(old, new))

    async def _collect_garbage(self) -> None:
        """Delete every object whose owners are all gone, until none is left (cascading)."""
        while True:
            live = {
                (obj.get("metadata") or {}).get("uid")
                for obj in self.objects.values() if not obj.deleted
            }
            orphans = [
                (key, obj) for key, obj in self.objects.items()
                if not obj.deleted
                and (refs := (obj.get("metadata") or {}).get("ownerReferences"))
                and not any(ref.get("uid") in live for ref in refs)
            ]
            if not orphans:
                return
            async with self._lock:
                for (resource, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})

    # ---- reads --------------------------------------------------------------------------------

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        items = [self._as_asked(request, item) for item in result["items"] if _matches(item, dict(request.params))]
        info = self._info(request.resource)
        kind = f"{info.kind}List" if info and info.kind else "List"
        asked = self._asked(request)
        api_version = f"{asked.group}/{asked.version}".lstrip("/")
        listing = {"apiVersion": api_version, "kind": kind,
                   "metadata": {"resourceVersion": str(self._revision)}, "items": items}
        if "as=Table" in request.headers.get("Accept", ""):
            return self._table(request, items)
        return listing

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        obj = self._as_asked(request, await super()._serve_fetch(request))
        if "as=Table" in request.headers.get("Accept", ""):
            return self._table(request, [obj])
        return obj

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        params = dict(request.params)
        async for event in super()._serve_watch(request):
            if not isinstance(event, dict) or _matches(event.get("object") or {}, params):
                yield {**event, "object": self._as_asked(request, event["object"])} if isinstance(
                    event, dict) and "object" in event else event

    async def _serve_create(self, request: kmock.Request) -> Any:
        return kmock.Response(status=201, payload=self._as_asked(request, await super()._serve_create(request)))

    async def _serve_update(self, request: kmock.Request) -> Any:
        return self._as_asked(request, await super()._serve_update(request))

    def _serve_openapi(self, request: kmock.Request) -> aiohttp.web.Response:
        """OpenAPI v3 of the CRDs: kubectl apply checks fieldValidation in it, kubectl explain reads it."""
        path = request.url.path.removeprefix("/openapi/v3").strip("/")
        if not path:
            return aiohttp.web.json_response({"paths": {
                gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={abs(hash(json.dumps(doc, sort_keys=True)))}"}
                for gv, doc in self._openapi.items()
            }})
        if path in self._openapi:
            return aiohttp.web.json_response(self._openapi[path])
        return aiohttp.web.json_response(
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"}, status=404
        )

    def _table(self, request: kmock.Request, items: list[dict[str, Any]]) -> dict[str, Any]:
        """What `kubectl get` asks for: rows of cells, the columns from the CRD when it has any."""
        columns = self._printer_columns.get(request.resource) or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        ]
        if request.resource == kmock.resource("v1/pods") and not self._printer_columns.get(request.resource):
            columns = [{"name": "Status", "type": "string", "jsonPath": ".status.phase"}] + columns
        definitions = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
        definitions += [
            {"name": c["name"], "type": c["type"], "format": c.get("format", ""),
             "description": c.get("description", ""), "priority": c.get("priority", 0)}
            for c in columns
        ]
        rows = []
        for item in items:
            cells: list[Any] = [item["metadata"]["name"]]
            for column in columns:
                value = jsonpath(item, column["jsonPath"])
                if column["type"] == "date" and isinstance(value, str):
                    value = human_age(value)
                cells.append(value)
            rows.append({
                "cells": cells,
                "object": {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                           "metadata": item["metadata"]},
            })
        return {"apiVersion": "meta.k8s.io/v1", "kind": "Table",
                "metadata": {"resourceVersion": str(self._revision)},
                "columnDefinitions": definitions, "rows": rows}


def _openapi_document(crd: dict[str, Any], version: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI v3 document the API server publishes for one version of a CRD."""
    spec, names = crd["spec"], crd["spec"]["names"]
    group, plural, kind = spec["group"], names["plural"], names["kind"]
    gvk = {"group": group, "version": version["name"], "kind": kind}
    schema_name = ".".join([*reversed(group.split(".")), version["name"], kind])
    schema = {**copy.deepcopy(version["schema"]["openAPIV3Schema"]), "x-kubernetes-group-version-kind": [gvk]}
    ref = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
           "description": "OK"}
    writes = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
              {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": True}}]

    def operation(action: str) -> dict[str, Any]:
        return {
            "operationId": f"{action}{kind}",
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk,
            "parameters": writes if action in ("post", "put", "patch") else [],
            "responses": {"200": ref},
        }

    base = f"/apis/{group}/{version['name']}/namespaces/{{namespace}}/{plural}"
    paths = {
        base: {"get": operation("list"), "post": operation("post")},
        f"{base}/{{name}}": {verb: operation(verb) for verb in ("get", "put", "patch", "delete")},
    }
    if "status" in (version.get("subresources") or {}):
        paths[f"{base}/{{name}}/status"] = {verb: operation(verb) for verb in ("get", "put", "patch")}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": {schema_name: schema}},
    }


def _with_data(request: kmock.Request, data: Any) -> kmock.Request:
    """The admitted body replaces the client's, in place: kmock routes a request only if it is the
    very object it recorded (a copy made with attrs.evolve matches no reaction)."""
    object.__setattr__(request, "data", data)
    return request


class _Refused(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    async def response(self, request: kmock.Request) -> Any:
        return await status_error(self.code, self.reason, self.message)(request)


# ---- client side ------------------------------------------------------------------------------


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    """A kubeconfig for the double: kopf, the kubernetes client and kubectl all read it."""
    path.write_text(json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "double",
        "clusters": [{"name": "double", "cluster": {"server": server.rstrip("/")}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "double", "context": {"cluster": "double", "user": "tester", "namespace": namespace}}],
    }))
    return path


def loop_clock() -> Callable[[], datetime]:
    """Wall-clock datetimes that follow the event loop's time (looptime's fake time included)."""
    loop = asyncio.get_running_loop()
    origin, start = datetime.now(timezone.utc), loop.time()
    return lambda: origin + timedelta(seconds=loop.time() - start)


async def eventually(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll until check() returns something truthy (or raises nothing falsy); loop-time seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError, ValueError, TypeError) as exc:
            last_error = exc
        if loop.time() >= deadline:
            raise AssertionError(f"not true within {timeout} s (loop time): {last_error or check}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def operator_task(*, settings: Any, memo: Any, timeout: float = 30.0) -> AsyncIterator[Any]:
    """The real operator as production runs it (supervisor.py: kopf while the CRD is there), as a
    task in the test's event loop, so that looptime reaches it; yields the Supervisor."""
    from grpo_operator.supervisor import Supervisor

    stop = asyncio.Event()
    supervisor = Supervisor(settings, memo, stop=stop)
    task = asyncio.create_task(supervisor.run())
    supervisor.task = task
    try:
        yield supervisor
    finally:
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            raise AssertionError("the operator did not stop")
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def stored(server: kmock.KubernetesEmulator, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    """The object as the double stores it now (None: absent or deleted)."""
    key = (kmock.resource(resource), namespace, name)
    if key not in server.objects or server.objects[key].deleted:
        return None
    return copy.deepcopy(server.objects[key].raw)


def stored_all(server: kmock.KubernetesEmulator, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
    wanted = kmock.resource(resource)
    return [
        copy.deepcopy(obj.raw)
        for (res, ns, _), obj in server.objects.items()
        if res == wanted and not obj.deleted and (namespace is None or ns == namespace)
    ]
