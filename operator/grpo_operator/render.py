"""GRPOJob -> the Kubernetes objects that run it. Pure: plain dicts in, plain dicts out.

Per job: a ServiceAccount, a Role that may only get/patch the job's own status (the
runtime's progress reports), a RoleBinding, a ConfigMap holding the job manifest the pod
trains from, and one Pod per attempt. Owner references are added by the caller
(handlers.py) from the live object, which alone knows the job's uid.

A job of several nodes (spec.resources.nodes > 1) gets one pod per node per attempt,
`<job>-attempt-<a>-<i>`, and a headless Service that gives each its DNS name,
`<hostname>.<service>.<namespace>.svc`. The runtime launches torchrun itself, with a static
rendezvous at pod 0 of the attempt; the contract is three env vars: GRPO_NODE_RANK (the pod's
index), GRPO_MASTER_ADDR (pod 0's DNS name) and GRPO_MASTER_PORT. A one-node job has none of
this: the runtime's rendezvous stays on loopback.
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from grpo_runtime.spec import GRPOJob

from grpo_operator.crd import GROUP, PLURAL

LABEL_JOB = "grpo.dev/job-name"
LABEL_ATTEMPT = "grpo.dev/attempt"
LABEL_NODE_INDEX = "grpo.dev/node-index"  # only on the pods of a several-node job
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
# The runtime's contract for several nodes (grpo_runtime reads them; the operator image has no torch)
NODE_RANK_ENV, MASTER_ADDR_ENV, MASTER_PORT_ENV = "GRPO_NODE_RANK", "GRPO_MASTER_ADDR", "GRPO_MASTER_PORT"
RENDEZVOUS_PORT = 29500  # torchrun's default master port
RENDEZVOUS_PORT_NAME = "rendezvous"
DNS_LABEL_LENGTH = 63


def runtime_name(job: str) -> str:
    """The ServiceAccount, Role and RoleBinding of a job."""
    return f"{job}-runtime"


def config_map_name(job: str) -> str:
    return f"{job}-spec"


def pod_name(job: str, attempt: int) -> str:
    """Deterministic per attempt: creating the same attempt twice is a 409, never a second pod."""
    return f"{job}-attempt-{attempt}"


def pod_names(job: str, attempt: int, nodes: int) -> list[str]:
    """The pods of one attempt, by node index; a one-node job's is pod_name()."""
    if nodes == 1:
        return [pod_name(job, attempt)]
    return [f"{pod_name(job, attempt)}-{index}" for index in range(nodes)]


def dns_label(name: str) -> str:
    """`name` where it fits in a DNS label, else its head and a hash of the whole: deterministic, and
    two long names with the same head still differ."""
    if len(name) <= DNS_LABEL_LENGTH:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: DNS_LABEL_LENGTH - len(digest) - 1].rstrip('-')}-{digest}"


def service_name(job: str) -> str:
    """The headless Service of a several-node job: its pods' DNS subdomain. A Service's name must
    start with a letter (RFC 1035), a job's need not."""
    name = f"{job}-nodes"
    return dns_label(name if name[0].isalpha() else f"grpo-{name}")


def hostname(job: str, attempt: int, index: int) -> str:
    """Pod `index`'s hostname: its pod name where that is a DNS label. A new one each attempt, so that
    no DNS cache still answers with the address of the attempt before."""
    return dns_label(f"{pod_name(job, attempt)}-{index}")


def master_address(job: GRPOJob, attempt: int) -> str:
    """The DNS name of pod 0 of the attempt, where the runtime's rendezvous listens."""
    name = job.metadata.name
    return f"{hostname(name, attempt, 0)}.{service_name(name)}.{job.metadata.namespace}.svc"


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
    """The spec's resources with spec.resources.gpus GPUs: extended resources need requests == limits."""
    requests = _quantities(job.spec.resources.requests)
    limits = _quantities(job.spec.resources.limits)
    gpus = str(job.spec.resources.gpus)
    limits[GPU] = gpus
    if GPU in requests:
        requests[GPU] = gpus
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
    index: int = 0,
    image: str,
    model_cache: str | None = None,
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The training pod of one attempt, pod `index` of its nodes; `image` is the operator's default unless
    spec.image is set, `model_cache` the operator's default model cache claim unless spec.model.cache
    is set. `node_selector` and `tolerations` are added to the spec's (Kueue's assigned flavors, kueue.py).

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

    name = job.metadata.name
    meta = _meta(job, pod_names(name, attempt, spec.resources.nodes)[index], "trainer")
    meta["labels"][LABEL_ATTEMPT] = str(attempt)
    if spec.resources.nodes > 1:
        meta["labels"][LABEL_NODE_INDEX] = str(index)
        pod_spec["hostname"], pod_spec["subdomain"] = hostname(name, attempt, index), service_name(name)
        container["env"] += [
            {"name": NODE_RANK_ENV, "value": str(index)},
            {"name": MASTER_ADDR_ENV, "value": master_address(job, attempt)},
            {"name": MASTER_PORT_ENV, "value": str(RENDEZVOUS_PORT)},
        ]
        container["ports"] = [{"name": RENDEZVOUS_PORT_NAME, "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def pods(job: GRPOJob, attempt: int, **options: Any) -> list[dict[str, Any]]:
    """Every pod of one attempt, by node index; `options` as for pod()."""
    return [pod(job, attempt, index=index, **options) for index in range(job.spec.resources.nodes)]


def service(job: GRPOJob) -> dict[str, Any]:
    """The headless Service of a several-node job: no virtual IP, only a DNS name for each of its pods
    (the pods name it as their subdomain). Its addresses are published before the pods are ready:
    pod 0's name must resolve while the gang is still meeting at the rendezvous."""
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, service_name(name), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_JOB: name},
            "publishNotReadyAddresses": True,
            "ports": [{"name": RENDEZVOUS_PORT_NAME, "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT_NAME,
                       "protocol": "TCP"}],
        },
    }


def support_objects(job: GRPOJob, *, s3_endpoint: str | None = None) -> list[dict[str, Any]]:
    """Everything the pods need to exist first, in creation order (the pods' SA must exist); a job of
    several nodes also needs its Service, for their DNS names."""
    objects = [service_account(job), role(job), role_binding(job), config_map(job, s3_endpoint=s3_endpoint)]
    if job.spec.resources.nodes > 1:
        objects.append(service(job))
    return objects

