"""The Helm chart, rendered by a real Helm v4 and checked against the Kubernetes API schemas,
the operator's settings and the API calls the operator really makes."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import tomllib
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpo_operator import kube
from grpo_operator import render as children
from grpo_operator.settings import DEFAULT_RUNTIME_IMAGE, Settings
from grpo_runtime.spec import parse_job

from tests.packaging.helpers import CHART, KUBERNETES_VERSION, REPO, find, one, run

MODES = {
    "default": (),
    "namespaced": ("--set", "watchNamespaces={team-a,team-b}"),
    "metrics": ("--set", "metrics.enabled=true", "--set", "metrics.serviceMonitor.enabled=true"),
}
NO_SCHEMA = {"ServiceMonitor"}  # a Prometheus Operator CRD: not in the Kubernetes API schemas


def container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(manifests: list[dict[str, Any]]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(manifests)["env"]}


# ---------------------------------------------------------------- lint and schemas


def test_helm_lint_strict_passes(helm):
    result = run([helm, "lint", "--strict", CHART])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_every_rendered_manifest_is_valid_for_kubernetes(render, mode):
    manifests = render(*MODES[mode])
    kinds = {m["kind"] for m in manifests}
    assert {"CustomResourceDefinition", "ServiceAccount", "Deployment"} <= kinds
    for manifest in manifests:
        if manifest["kind"] in NO_SCHEMA:
            continue
        # strict: a field the API does not know is an error, not silently pruned
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_the_schema_validation_catches_a_broken_manifest(render):
    deployment = copy.deepcopy(one(render(), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_chart_crd_is_the_generated_crd():
    chart_copy = CHART / "crds" / "grpojob.yaml"
    assert chart_copy.read_bytes() == (REPO / "crds" / "grpojob.yaml").read_bytes(), (
        "charts/grpo-operator/crds/grpojob.yaml differs from crds/grpojob.yaml: "
        "cp crds/grpojob.yaml charts/grpo-operator/crds/grpojob.yaml"
    )


def test_rendered_crd_is_installed_by_helm(render):
    crd = one(render(), "CustomResourceDefinition")
    assert crd == yaml.safe_load((REPO / "crds" / "grpojob.yaml").read_text())


# ---------------------------------------------------------------- values and their schema


@pytest.mark.parametrize(
    "setting, complaint",
    [
        ("imag.tag=x", "imag"),  # a typo in a key
        ("metrics.port=metrics", "port"),  # a wrong type
        ("logLevel=VERBOSE", "logLevel"),  # not one of the enum
        ("watchNamespaces={Team_A}", "watchNamespaces"),  # not a namespace name
        ("runtime.s3Endpoint=minio:9000", "s3Endpoint"),  # not a URL
    ],
)
def test_bad_values_fail_the_install(helm, setting, complaint):
    result = run([helm, "template", "grpo", CHART, "--set", setting])
    assert result.returncode != 0, f"--set {setting} was accepted"
    assert complaint in result.stderr, result.stderr


def test_values_yaml_is_valid_for_its_own_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


def test_every_value_is_commented_and_described():
    """Every key of values.yaml has a comment line right above it (inside resources: Kubernetes'
    own shape, no), and every key of values.schema.json a description."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented = []
    for index, line in enumerate(lines):
        match = re.match(r"^\s*([A-Za-z0-9]+):", line)
        commented = index and lines[index - 1].strip().startswith("#")
        if match and "resources" not in _ancestors(lines, index) and not commented:
            uncommented.append(match.group(1))
    assert not uncommented, f"values without a comment: {uncommented}"

    def undescribed(node: dict[str, Any], path: str) -> list[str]:
        missing = [path] if path and not node.get("description") else []
        for name, sub in (node.get("properties") or {}).items():
            missing += undescribed(sub, f"{path}.{name}" if path else name)
        return missing

    assert undescribed(json.loads((CHART / "values.schema.json").read_text()), "") == []


def _ancestors(lines: list[str], index: int) -> list[str]:
    """The keys enclosing line `index` of a YAML mapping, innermost first."""
    found, indent = [], len(lines[index]) - len(lines[index].lstrip())
    for line in reversed(lines[:index]):
        depth = len(line) - len(line.lstrip())
        if line.strip() and not line.lstrip().startswith("#") and depth < indent:
            found.append(line.strip().split(":")[0])
            indent = depth
    return found


def test_versions_and_default_runtime_image_match_the_operator(render):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["version"] == chart["appVersion"] == version
    manifests = render()
    assert env_of(manifests)["GRPO_RUNTIME_IMAGE"] == DEFAULT_RUNTIME_IMAGE
    assert container(manifests)["image"] == f"ghcr.io/grpo-dev/grpo-operator:{version}"


# ---------------------------------------------------------------- the Deployment


def test_deployment_runs_locked_down_with_liveness_and_readiness_probes(render):
    manifests = render()
    deployment = one(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(manifests)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    probe = c["livenessProbe"]["httpGet"]
    health = next(p for p in c["ports"] if p["name"] == probe["port"])
    assert probe["path"] == "/healthz"
    settings = Settings.from_env(env_of(manifests))
    assert settings.liveness_endpoint == f"http://0.0.0.0:{health['containerPort']}/healthz"
    ready = c["readinessProbe"]["httpGet"]
    assert ready["port"] == probe["port"] and ready["path"] == "/readyz"
    assert settings.readiness_endpoint == f"http://0.0.0.0:{health['containerPort']}/readyz"


# bench/operator_memory.py, `grpo operator` with 300 GRPOJobs and their pods (2026-11-27): 125.4 MiB RSS.
MEASURED_RSS_MIB_300_JOBS = 125.4


def mebibytes(quantity: str) -> float:
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_memory_request_covers_what_the_operator_uses_with_hundreds_of_jobs(render):
    resources = container(render())["resources"]
    request, limit = mebibytes(resources["requests"]["memory"]), mebibytes(resources["limits"]["memory"])
    assert request >= 1.25 * MEASURED_RSS_MIB_300_JOBS, "the request must cover 300 jobs with headroom"
    assert limit >= 2 * request
    assert str(MEASURED_RSS_MIB_300_JOBS).split(".")[0] in (CHART / "values.yaml").read_text()  # documented there


class RecordingEnv(dict):
    """An environment that remembers which variables were read."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


def test_deployment_env_is_exactly_what_the_operator_reads(render):
    probe = RecordingEnv()
    Settings.from_env(probe)
    for mode, args in MODES.items():
        assert set(env_of(render(*args))) == probe.read, f"mode {mode}"


def test_values_reach_the_operator_settings(render):
    manifests = render(
        "--set", "watchNamespaces={team-a,team-b}",
        "--set", "logLevel=DEBUG",
        "--set", "healthPort=8181",
        "--set", "metrics.enabled=true",
        "--set", "metrics.port=9300",
        "--set", "runtime.image.repository=registry.example.com/grpo-runtime",
        "--set", "runtime.image.tag=cu13",
        "--set", "runtime.s3Endpoint=http://minio.minio:9000",
        "--set", "runtime.modelCache=shared-models",
    )  # fmt: skip
    settings = Settings.from_env(env_of(manifests))
    assert settings.namespaces == ("team-a", "team-b") and not settings.clusterwide
    assert (settings.log_level, settings.health_port, settings.metrics_port) == ("DEBUG", 8181, 9300)
    assert settings.runtime_image == "registry.example.com/grpo-runtime:cu13"
    assert settings.s3_endpoint == "http://minio.minio:9000"
    assert settings.model_cache == "shared-models"
    ports = {p["name"]: p["containerPort"] for p in container(manifests)["ports"]}
    assert ports == {"health": 8181, "metrics": 9300}


def test_defaults_give_a_clusterwide_operator_without_metrics(render):
    settings = Settings.from_env(env_of(render()))
    assert settings.clusterwide and settings.metrics_port == 0 and settings.s3_endpoint is None
    assert settings.model_cache is None


# ---------------------------------------------------------------- RBAC


def allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str, name: str | None = None) -> bool:
    """RBAC's answer; a rule with resourceNames allows only requests that name one of them."""
    return any(
        group in rule.get("apiGroups", [])
        and resource in rule.get("resources", [])
        and verb in rule.get("verbs", [])
        and (not rule.get("resourceNames") or name in rule["resourceNames"])
        for rule in rules
    )


class Recorder:
    """Stands in for a kubernetes client API class; records each method called on it."""

    def __init__(self, calls: list[tuple[str, tuple[Any, ...]]]):
        self.calls = calls

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args))
            return _Response() if name.endswith("_without_preload_content") else {}

        return call


class _Response:
    status = 200

    async def read(self) -> bytes:
        return b"{}"


_RESOURCES = {
    "custom_object": ("grpo.dev", "grpojobs"),
    "pod": ("", "pods"),
    "service_account": ("", "serviceaccounts"),
    "config_map": ("", "configmaps"),
    "service": ("", "services"),
    "role_binding": ("rbac.authorization.k8s.io", "rolebindings"),
    "role": ("rbac.authorization.k8s.io", "roles"),
}
_VERBS = {"read": "get", "get": "get", "create": "create", "patch": "patch", "delete": "delete", "list": "list"}


def permission(client_method: str, args: tuple[Any, ...] = ()) -> tuple[str, str, str]:
    """kubernetes client method name (and its arguments) -> (API group, resource[/subresource], RBAC verb).
    Custom objects name their group and plural in the arguments: (group, version, [namespace,] plural)."""
    name = client_method.removesuffix("_without_preload_content")
    namespaced = "_namespaced_" in name
    verb, _, rest = name.partition("_namespaced_") if namespaced else name.partition("_cluster_")
    subresource = ""
    if rest.endswith("_status"):
        rest, subresource = rest.removesuffix("_status"), "/status"
    group, resource = _RESOURCES[rest]
    if rest == "custom_object" and args:
        group, resource = args[0], args[3 if namespaced else 2]
    return group, resource + subresource, _VERBS[verb]


def operator_calls(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str, str]]:
    """Every API call kube.Kube makes, found by calling each of its methods on recording clients."""
    calls: list[tuple[str, tuple[Any, ...]]] = []
    for api in ("CoreV1Api", "RbacAuthorizationV1Api", "CustomObjectsApi"):
        monkeypatch.setattr(kube.client, api, lambda _api: Recorder(calls))
    api = kube.Kube(None)
    known = {"close", "get_job", "list_jobs", "patch_job_status", "delete_job", "get", "create", "list_pods",
             "delete_pod", "patch_job_suspend", "get_workload", "create_workload", "patch_workload_status",
             "get_flavor"}
    methods = {name for name in vars(kube.Kube) if not name.startswith("_")}
    assert methods == known, f"kube.Kube changed: teach this test what {methods ^ known} call(s)"

    async def call_all() -> None:
        await api.get_job("ns", "job")
        await api.list_jobs("ns")
        await api.list_jobs(None)
        await api.patch_job_status("ns", "job", {"phase": "Running"})
        await api.delete_job("ns", "job")
        await api.list_pods("ns", "grpo.dev/job-name=job")
        await api.delete_pod("ns", "pod")
        await api.patch_job_suspend("ns", "job", False)
        await api.get_workload("ns", "wl")
        await api.create_workload({"metadata": {"name": "wl", "namespace": "ns"}})
        await api.patch_workload_status("ns", "wl", {}, "1")
        await api.get_flavor("h100")
        for kind in api._create:
            await api.create({"kind": kind, "metadata": {"name": "x", "namespace": "ns"}})
        for kind in api._read:
            await api.get(kind, "ns", "x")

    asyncio.run(call_all())
    return {permission(name, args) for name, args in calls}


# kopf's own calls for this operator (handlers.py, main.py): it lists and watches GRPOJobs and
# labelled pods, patches the job's annotations and its finalizer (timers need one) and posts
# events. standalone=True and scanning disabled: no peering objects, CRDs or namespaces.
# The supervisor's (supervisor.py): it lists and watches its one CRD, named by a field selector.
CRD = "grpojobs.grpo.dev"
SUPERVISOR_CALLS = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}

# Kueue's Workloads, where Kueue is installed (handlers.registry): kopf lists and watches them.
KOPF_KUEUE_CALLS = {
    ("kueue.x-k8s.io", "workloads", "list"),
    ("kueue.x-k8s.io", "workloads", "watch"),
}

KOPF_CALLS = {
    ("grpo.dev", "grpojobs", "list"),
    ("grpo.dev", "grpojobs", "watch"),
    ("grpo.dev", "grpojobs", "patch"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "events", "create"),
}


def _rules(manifests: list[dict[str, Any]], kind: str) -> list[list[dict[str, Any]]]:
    return [role["rules"] for role in find(manifests, kind)]


def test_rbac_grants_every_call_the_operator_makes_and_nothing_else(render, monkeypatch):
    needed = operator_calls(monkeypatch) | KOPF_CALLS | KOPF_KUEUE_CALLS
    # The per-job Role (children.role) grants get+patch on grpojobs/status: RBAC lets the operator
    # create it only if it holds those itself (no `escalate`), and the OwnerReferencesPermission-
    # Enforcement admission plugin wants update on the owner's finalizers for blockOwnerDeletion.
    job = parse_job(yaml.safe_load((REPO / "examples" / "local-cpu.yaml").read_text()))
    for rule in children.role(job)["rules"]:
        needed |= {
            (group, res, verb) for group in rule["apiGroups"] for res in rule["resources"] for verb in rule["verbs"]
        }
    needed.add(("grpo.dev", "grpojobs/finalizers", "update"))

    (rules,) = _rules(render(), "ClusterRole")
    missing = {need for need in needed if not allows(rules, *need)}
    missing |= {need for need in SUPERVISOR_CALLS if not allows(rules, *need, name=CRD)}
    assert not missing, f"the ClusterRole lacks {sorted(missing)}"
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == needed | SUPERVISOR_CALLS, f"granted but never used: {sorted(granted - needed)}"
    assert not any(allows(rules, *need, name="someone-elses.example.com") for need in SUPERVISOR_CALLS)
    assert all("*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"] for rule in rules)


def test_the_rbac_check_sees_a_missing_verb():
    assert allows([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}], "", "pods", "get")
    assert not allows([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}], "", "pods", "delete")
    assert permission("patch_namespaced_custom_object_status") == ("grpo.dev", "grpojobs/status", "patch")
    assert permission("read_namespaced_role_binding_without_preload_content") == (
        "rbac.authorization.k8s.io", "rolebindings", "get")  # fmt: skip


def test_clusterwide_mode_binds_a_clusterrole_to_the_operator(render):
    manifests = render()
    assert not find(manifests, "Role") and not find(manifests, "RoleBinding")
    binding = one(manifests, "ClusterRoleBinding")
    account = one(manifests, "ServiceAccount")
    deployment = one(manifests, "Deployment")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": one(manifests, "ClusterRole")["metadata"]["name"]}  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "grpo-system"}
    ]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_namespaced_mode_has_a_role_per_namespace_and_no_cluster_rights_but_its_crd(render):
    manifests = render(*MODES["namespaced"])
    (cluster_role,) = find(manifests, "ClusterRole")
    (cluster_binding,) = find(manifests, "ClusterRoleBinding")
    assert cluster_role["rules"] == [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                                      "resourceNames": [CRD], "verbs": ["list", "watch"]},
                                     {"apiGroups": ["kueue.x-k8s.io"], "resources": ["resourceflavors"], "verbs": ["get"]}]
    assert cluster_binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert cluster_binding["subjects"][0]["name"] == one(manifests, "ServiceAccount")["metadata"]["name"]
    roles = {r["metadata"]["namespace"]: r for r in find(manifests, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in find(manifests, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    (cluster_rules,) = _rules(render(), "ClusterRole")
    for namespace, role in roles.items():
        # the same verbs, narrower in scope; the CRD rule lives in the ClusterRole above
        assert role["rules"] + cluster_role["rules"] == cluster_rules
        binding = bindings[namespace]
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"][0]["namespace"] == "grpo-system"
    assert env_of(manifests)["GRPO_WATCH_NAMESPACES"] == "team-a,team-b"


def test_rbac_off_renders_no_rbac_objects(render):
    manifests = render("--set", "rbac.create=false")
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {m["kind"] for m in manifests}


# ---------------------------------------------------------------- metrics


def test_metrics_service_and_servicemonitor_reach_the_metrics_port(render):
    manifests = render(*MODES["metrics"])
    service = one(manifests, "Service")
    monitor = one(manifests, "ServiceMonitor")
    pod_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    ports = {p["name"]: p["containerPort"] for p in container(manifests)["ports"]}
    assert ports[port["targetPort"]] == int(env_of(manifests)["GRPO_METRICS_PORT"]) == port["port"]
    # The ServiceMonitor (no schema here) must select the Service and name its port.
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_metrics_off_by_default(render):
    manifests = render()
    assert not find(manifests, "Service") and not find(manifests, "ServiceMonitor")
    assert env_of(manifests)["GRPO_METRICS_PORT"] == "0"


def test_servicemonitor_without_metrics_is_refused(helm):
    result = run([helm, "template", "grpo", CHART, "--set", "metrics.serviceMonitor.enabled=true"])
    assert result.returncode != 0 and "needs metrics.enabled" in result.stderr


# ---------------------------------------------------------------- NOTES.txt


def test_install_notes_tell_the_next_commands(helm, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"  # --dry-run=client talks to no cluster; helm wants a file
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    result = run(
        [helm, "install", "grpo-operator", CHART, "--namespace", "grpo-system", "--dry-run=client",
         "--set", "watchNamespaces={ml-team}"],
        env={"KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n grpo-system rollout status deployment/grpo-operator" in notes
    assert "kubectl -n ml-team apply -f examples/gsm8k-qwen2.5-1.5b-qlora.yaml" in notes
    assert "kubectl -n ml-team get grpojobs -w" in notes
    assert "It runs GRPOJobs in: ml-team." in notes
