"""GRPOJob -> the Kubernetes objects that run it. Pure: plain dicts in, plain dicts out.

Per job: a ServiceAccount, a Role that may only get/patch the job's own status (the
runtime's progress reports), a RoleBinding, a ConfigMap holding the job manifest the pod
trains from, and one Pod per attempt. Owner references are added by the caller
(handlers.py) from the live object, which alone knows the job's uid.
"""

from __future__ import annotations

from typing import Any

import yaml

from grpo_runtime.spec import GRPOJob

from grpo_operator.crd import GROUP, PLURAL

LABEL_JOB = "grpo.dev/job-name"
LABEL_ATTEMPT = "grpo.dev/attempt"
CONTAINER = "trainer"
SPEC_DIR = "/etc/grpo"
SPEC_FILE = "job.yaml"
WORKDIR = "/workspace"
REWARD_MODULES_DIR = "/opt/grpo/rewards"  # not under SPEC_DIR: that is a read-only configMap mount
RUNTIME_UID = 1000  # the runtime image's user; the pod never runs as root
GPU = "nvidia.com/gpu"
DEVICE_ENV = "GRPO_DEVICE"  # grpo_runtime.device.DEVICE_ENV (the operator image has no torch to import it from)
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# spec.tracking.mlflow.credentialsSecret: basic auth or a token, whichever keys the Secret has
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
AZURE_SECRET_KEYS = (  # any of them may be in the Secret: a connection string, an account key or a SAS
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
)
GCS_KEY_FILE = "key.json"  # the service account key in spec.output.credentialsSecret for gs://
GCS_CREDENTIALS_DIR = "/var/run/secrets/grpo/gcs"
HF_TOKEN_KEY = "HF_TOKEN"  # the key in spec.model.tokenSecret, and the env var huggingface_hub reads
HUB_TOKEN_ENV = "GRPO_HUB_TOKEN"  # grpo_runtime.hub.HUB_TOKEN_ENV: the push token from spec.output.hub.tokenSecret
MODEL_CACHE_DIR = "/var/cache/grpo"  # spec.model.cache is mounted here


def runtime_name(job: str) -> str:
    """The ServiceAccount, Role and RoleBinding of a job."""
    return f"{job}-runtime"


def config_map_name(job: str) -> str:
    return f"{job}-spec"


def pod_name(job: str, attempt: int) -> str:
    """Deterministic per attempt: creating the same attempt twice is a 409, never a second pod."""
    return f"{job}-attempt-{attempt}"


def _labels(job: GRPOJob, component: str) -> dict[str, str]:
    return {
        LABEL_JOB: job.metadata.name,
        "app.kubernetes.io/name": "grpo-runtime",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "grpo-operator",
    }


def _meta(job: GRPOJob, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": job.metadata.namespace, "labels": _labels(job, component)}


def job_document(job: GRPOJob, *, s3_endpoint: str | None = None) -> dict[str, Any]:
    """The manifest the pod trains from: the validated spec with defaults filled in.

    Only name and namespace are kept of the metadata (not kubectl's or kopf's annotations).
    The operator's default S3 endpoint fills spec.output.endpoint when the job has none (and its
    output is not on GCS or Azure, where the endpoint would mean theirs).
    """
    manifest = job.to_manifest()
    manifest["metadata"] = {k: v for k, v in manifest["metadata"].items() if k in ("name", "namespace")}
    output = manifest["spec"].setdefault("output", {})
    other_store = str(output.get("uri") or "").startswith(("gs://", "az://", "abfs://"))  # endpoint means theirs
    if s3_endpoint and not output.get("endpoint") and not other_store:
        output["endpoint"] = s3_endpoint
    return manifest


def service_account(job: GRPOJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(job, runtime_name(job.metadata.name), "runtime-identity"),
    }


def role(job: GRPOJob) -> dict[str, Any]:
    """Least privilege: read and patch the status of this one job, nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(job, runtime_name(job.metadata.name), "runtime-identity"),
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "resourceNames": [job.metadata.name],
                "verbs": ["get", "patch"],
            }
        ],
    }


def role_binding(job: GRPOJob) -> dict[str, Any]:
    name = runtime_name(job.metadata.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(job, name, "runtime-identity"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": job.metadata.namespace}],
    }


def config_map(job: GRPOJob, *, s3_endpoint: str | None = None) -> dict[str, Any]:
    document = job_document(job, s3_endpoint=s3_endpoint)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, config_map_name(job.metadata.name), "job-spec"),
        "data": {SPEC_FILE: yaml.safe_dump(document, sort_keys=False)},
    }


def _quantities(values: dict[str, str | int]) -> dict[str, str]:
    return {key: str(value) for key, value in values.items()}


def _resources(job: GRPOJob) -> dict[str, Any]:
    """The spec's resources with exactly one GPU: extended resources need requests == limits."""
    requests = _quantities(job.spec.resources.requests)
    limits = _quantities(job.spec.resources.limits)
    limits[GPU] = "1"
    if GPU in requests:
        requests[GPU] = "1"
    return {"requests": requests, "limits": limits} if requests else {"limits": limits}


def _output_scheme(job: GRPOJob) -> str:
    uri = job.spec.output.uri or ""
    return uri.partition("://")[0] if "://" in uri else ""


def _env(job: GRPOJob, attempt: int, cache: str | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "GRPOJOB_NAME", "value": job.metadata.name},
        {"name": "GRPOJOB_NAMESPACE", "value": job.metadata.namespace},
        {"name": "GRPO_ATTEMPT", "value": str(attempt)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": DEVICE_ENV, "value": "cuda"},  # the pod asks for a GPU: training on its CPU instead is a failure
    ]
    if job.spec.reward_modules.config_map:
        env.append({"name": "PYTHONPATH", "value": REWARD_MODULES_DIR})
    secret = job.spec.output.credentials_secret
    scheme = _output_scheme(job)
    # References only: the kubelet resolves them; the values never pass through the operator.
    if secret and scheme in ("az", "abfs"):
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for key in AZURE_SECRET_KEYS
        ]
    elif secret and scheme == "gs":
        env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{GCS_CREDENTIALS_DIR}/{GCS_KEY_FILE}"})
    elif secret:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}} for key in SECRET_KEYS
        ]
    mlflow = job.spec.tracking.mlflow
    if mlflow and mlflow.credentials_secret:
        # each key optional: a Secret holds a username and password, or a token
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": mlflow.credentials_secret, "key": key, "optional": True}}}
            for key in MLFLOW_SECRET_KEYS
        ]
    if job.spec.model.token_secret:
        env.append(
            {"name": HF_TOKEN_KEY, "valueFrom": {"secretKeyRef": {"name": job.spec.model.token_secret, "key": HF_TOKEN_KEY}}}
        )
    hub = job.spec.output.hub
    if hub and hub.token_secret:  # the same key as the model's Secret; a variable of its own, used only to push
        env.append({"name": HUB_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": hub.token_secret, "key": HF_TOKEN_KEY}}})
    if cache:
        # the hub's cache (with its file locks) and ours (s3:// model folders, dequantized GGUF) on the claim
        env += [
            {"name": "HF_HOME", "value": f"{MODEL_CACHE_DIR}/huggingface"},
            {"name": "GRPO_CACHE_DIR", "value": f"{MODEL_CACHE_DIR}/models"},
        ]
    return env


def pod(
    job: GRPOJob,
    attempt: int,
    *,
    image: str,
    model_cache: str | None = None,
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The training pod of one attempt; `image` is the operator's default unless spec.image is set,
    `model_cache` the operator's default model cache claim unless spec.model.cache is set.
    `node_selector` and `tolerations` are added to the spec's (Kueue's assigned flavors, kueue.py).

    Without spec.output.uri the runtime writes to ./grpo-runs/<name> under the working
    directory, an emptyDir: checkpoints and metrics live as long as this pod, so a retry
    starts from step 0. That is allowed (a smoke test needs no bucket) but reported by a
    Warning event and the OutputPersistent=False condition (lifecycle.py).
    """
    spec = job.spec
    cache = spec.model.cache or model_cache
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["grpo", "train", f"{SPEC_DIR}/{SPEC_FILE}"],
        "workingDir": WORKDIR,
        "env": _env(job, attempt, cache),
        "resources": _resources(job),
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "job-spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "workspace", "mountPath": WORKDIR},
        ],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": runtime_name(job.metadata.name),
        "restartPolicy": "Never",  # the operator retries, as a new attempt resuming from LATEST
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {
                "name": "job-spec",
                "configMap": {
                    "name": config_map_name(job.metadata.name),
                    "items": [{"key": SPEC_FILE, "path": SPEC_FILE}],
                },
            },
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "workspace", "emptyDir": {}},
        ],
    }
    if spec.reward_modules.config_map:
        container["volumeMounts"].append({"name": "reward-modules", "mountPath": REWARD_MODULES_DIR, "readOnly": True})
        pod_spec["volumes"].append({"name": "reward-modules", "configMap": {"name": spec.reward_modules.config_map}})
    if spec.output.credentials_secret and _output_scheme(job) == "gs":
        container["volumeMounts"].append({"name": "gcs-credentials", "mountPath": GCS_CREDENTIALS_DIR, "readOnly": True})
        pod_spec["volumes"].append(
            {
                "name": "gcs-credentials",
                "secret": {"secretName": spec.output.credentials_secret, "items": [{"key": GCS_KEY_FILE, "path": GCS_KEY_FILE}]},
            }
        )
    if cache:
        container["volumeMounts"].append({"name": "model-cache", "mountPath": MODEL_CACHE_DIR})
        pod_spec["volumes"].append({"name": "model-cache", "persistentVolumeClaim": {"claimName": cache}})
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in spec.image_pull_secrets]
    if spec.node_selector or node_selector:
        pod_spec["nodeSelector"] = {**(node_selector or {}), **spec.node_selector}
    if spec.tolerations or tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations] + [
            dict(t) for t in tolerations or [] if dict(t) not in spec.tolerations]
    if spec.affinity:
        pod_spec["affinity"] = dict(spec.affinity)
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name

    meta = _meta(job, pod_name(job.metadata.name, attempt), "trainer")
    meta["labels"][LABEL_ATTEMPT] = str(attempt)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def support_objects(job: GRPOJob, *, s3_endpoint: str | None = None) -> list[dict[str, Any]]:
    """Everything the pod needs to exist first, in creation order (the pod's SA must exist)."""
    return [service_account(job), role(job), role_binding(job), config_map(job, s3_endpoint=s3_endpoint)]

