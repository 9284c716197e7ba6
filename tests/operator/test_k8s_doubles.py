"""The API-server double's own semantics (what the operator tests rely on kmock + extensions for)."""

from __future__ import annotations

import json

import pytest

from k8s_doubles import stored

pytestmark = pytest.mark.asyncio

JOBS = "/apis/grpo.dev/v1alpha1/namespaces/default/grpojobs"
JOB = {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob", "metadata": {"name": "j"}, "spec": {"a": 1},
       "status": {"phase": "Forged"}}
MERGE = {"Content-Type": "application/merge-patch+json"}


async def post(apiserver, path, body):
    response = await apiserver.post(path, json=body)
    return response.status, await response.json()


async def patch(apiserver, path, body):
    response = await apiserver.patch(path, data=json.dumps(body), headers=MERGE)
    return response.status, await response.json()


async def test_create_assigns_identity_and_answers_201_then_409(apiserver):
    status, created = await post(apiserver, JOBS, JOB)
    assert status == 201
    meta = created["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"].endswith("Z")
    assert meta["namespace"] == "default" and meta["generation"] == 1
    assert "status" not in created  # the status subresource owns it
    status, error = await post(apiserver, JOBS, JOB)
    assert status == 409 and error["reason"] == "AlreadyExists"


async def test_status_subresource_and_main_resource_change_only_their_parts(apiserver):
    await post(apiserver, JOBS, JOB)
    _, after = await patch(apiserver, f"{JOBS}/j/status", {"status": {"phase": "Running"}, "spec": {"a": 2}})
    assert after["status"] == {"phase": "Running"} and after["spec"] == {"a": 1}
    _, after = await patch(apiserver, f"{JOBS}/j", {"status": {"phase": "Hacked"}, "spec": {"a": 3}})
    assert after["status"] == {"phase": "Running"} and after["spec"] == {"a": 3}
    assert after["metadata"]["generation"] == 2  # the spec changed once


async def test_resource_version_grows_and_is_a_precondition(apiserver):
    _, created = await post(apiserver, JOBS, JOB)
    old = created["metadata"]["resourceVersion"]
    _, after = await patch(apiserver, f"{JOBS}/j", {"metadata": {"labels": {"x": "y"}}})
    assert int(after["metadata"]["resourceVersion"]) > int(old)
    status, error = await patch(apiserver, f"{JOBS}/j", {"metadata": {"resourceVersion": old, "labels": {"x": "z"}}})
    assert status == 409 and error["reason"] == "Conflict"


async def test_failed_json_patch_test_is_422(apiserver):
    await post(apiserver, JOBS, JOB)
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
           {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}]
    response = await apiserver.patch(f"{JOBS}/j", data=json.dumps(ops),
                                     headers={"Content-Type": "application/json-patch+json"})
    assert response.status == 422


async def test_deleting_an_owner_collects_its_dependents_recursively(apiserver):
    _, owner = await post(apiserver, JOBS, JOB)
    ref = {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob", "name": "j", "uid": owner["metadata"]["uid"]}
    _, cm = await post(apiserver, "/api/v1/namespaces/default/configmaps",
                       {"metadata": {"name": "child", "ownerReferences": [ref]}})
    grandchild_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "child", "uid": cm["metadata"]["uid"]}
    await post(apiserver, "/api/v1/namespaces/default/configmaps",
               {"metadata": {"name": "grandchild", "ownerReferences": [grandchild_ref]}})
    await post(apiserver, "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "bystander"}})
    response = await apiserver.delete(f"{JOBS}/j")
    assert response.status == 200
    assert stored(apiserver, "v1/configmaps", "default", "child") is None
    assert stored(apiserver, "v1/configmaps", "default", "grandchild") is None
    assert stored(apiserver, "v1/configmaps", "default", "bystander") is not None


async def test_pod_needs_its_service_account_and_starts_pending(apiserver):
    pod = {"metadata": {"name": "p"}, "spec": {"serviceAccountName": "sa", "containers": []},
           "status": {"phase": "Running"}}
    status, error = await post(apiserver, "/api/v1/namespaces/default/pods", pod)
    assert status == 403 and "serviceaccount \"sa\" not found" in error["message"]
    await post(apiserver, "/api/v1/namespaces/default/serviceaccounts", {"metadata": {"name": "sa"}})
    status, created = await post(apiserver, "/api/v1/namespaces/default/pods", pod)
    assert status == 201 and created["status"] == {"phase": "Pending"}


async def test_label_and_field_selectors(apiserver):
    for name, labels in [("a", {"app": "x"}), ("b", {"app": "y"}), ("c", {})]:
        await post(apiserver, "/api/v1/namespaces/default/configmaps", {"metadata": {"name": name, "labels": labels}})

    async def names(**params):
        response = await apiserver.get("/api/v1/namespaces/default/configmaps", params=params)
        return sorted(item["metadata"]["name"] for item in (await response.json())["items"])

    assert await names(labelSelector="app=x") == ["a"]
    assert await names(labelSelector="app!=x") == ["b", "c"]
    assert await names(labelSelector="app") == ["a", "b"]
    assert await names(labelSelector="!app") == ["c"]
    assert await names(fieldSelector="metadata.name=b") == ["b"]


async def test_tables_use_the_crds_printer_columns(apiserver):
    await post(apiserver, JOBS, JOB)
    progress = {"step": 4, "reward": 0.5, "eval": {"step": 4, "accuracy": 0.25}}
    await patch(apiserver, f"{JOBS}/j/status", {"status": {"phase": "Running", "ranks": 8, "progress": progress}})
    response = await apiserver.get(JOBS, headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
    table = await response.json()
    assert table["kind"] == "Table"
    columns = [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0]
    assert columns == ["Name", "Phase", "GPUs", "Step", "Reward", "Eval", "Age"]
    (row,) = table["rows"]
    cells = dict(zip([c["name"] for c in table["columnDefinitions"]], row["cells"], strict=True))
    assert (cells["Name"], cells["Phase"], cells["GPUs"], cells["Step"], cells["Reward"], cells["Eval"]) == (
        "j", "Running", 8, 4, 0.5, 0.25)


async def test_cel_rules_of_the_crd_refuse_changing_a_running_jobs_spec(apiserver):
    """The GRPOJob CRD's rules, run by the double as the API server runs them (issue 14's patch)."""
    job = {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob", "metadata": {"name": "cel"},
           "spec": {"model": {"name": "tiny"}, "dataset": {"source": "builtin:arithmetic"},
                    "rewards": [{"name": "a", "function": "builtin:exact_answer"}]}}
    status, _ = await post(apiserver, JOBS, job)
    assert status == 201
    policy = {"activeDeadlineSeconds": 1, "backoffLimit": 0, "ttlSecondsAfterFinished": 0}
    status, error = await patch(apiserver, f"{JOBS}/cel", {"spec": {"runPolicy": policy}})
    assert status == 422 and error["reason"] == "Invalid"
    assert error["message"].startswith('GRPOJob.grpo.dev "cel" is invalid: [spec: Invalid value: "object": ')
    assert "spec.runPolicy.activeDeadlineSeconds is immutable" in error["message"]
    assert "runPolicy" not in stored(apiserver, "grpo.dev/v1alpha1/grpojobs", "default", "cel")["spec"]
    status, _ = await patch(apiserver, f"{JOBS}/cel", {"spec": {"runPolicy": {"suspend": True}}})
    assert status == 200
    status, error = await patch(apiserver, f"{JOBS}/cel", {"spec": {"model": {"name": "other"}}})
    assert status == 422 and "spec.model is immutable" in error["message"]
