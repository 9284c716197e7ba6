"""render.py: the objects a GRPOJob becomes (pure functions, no cluster)."""

from __future__ import annotations

import copy

import yaml

from grpo_operator import render
from grpo_runtime.spec import parse_job

MANIFEST = {
    "apiVersion": "grpo.dev/v1alpha1",
    "kind": "GRPOJob",
    "metadata": {
        "name": "gsm8k",
        "namespace": "team-a",
        "labels": {"kueue.x-k8s.io/queue-name": "gpu"},
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
    },
    "spec": {
        "model": {"name": "Qwen/Qwen2.5-1.5B-Instruct", "loadIn4bit": True},
        "dataset": {"source": "s3://data/gsm8k.jsonl"},
        "rewards": [{"name": "answer", "function": "builtin:exact_answer"}],
        "output": {"uri": "s3://runs/gsm8k", "credentialsSecret": "s3-creds"},
        "resources": {"requests": {"cpu": 4, "memory": "32Gi"}, "limits": {"memory": "48Gi", "nvidia.com/gpu": 2}},
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}},
        "priorityClassName": "training",
        "imagePullSecrets": ["regcred"],
    },
}


def job(**spec_overrides):
    manifest = copy.deepcopy(MANIFEST)
    manifest["spec"].update(spec_overrides)
    return parse_job(manifest)


def env_of(pod):
    return {var["name"]: var for var in pod["spec"]["containers"][0]["env"]}


def test_pod_runs_grpo_train_on_the_mounted_job_spec():
    pod = render.pod(job(), 1, image="registry/runtime:1")
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["grpo", "train", "/etc/grpo/job.yaml"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/grpo")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == render.config_map_name("gsm8k")
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["serviceAccountName"] == render.runtime_name("gsm8k")


def test_pod_image_is_the_operator_default_unless_the_spec_sets_one():
    assert render.pod(job(), 1, image="registry/runtime:1")["spec"]["containers"][0]["image"] == "registry/runtime:1"
    custom = render.pod(job(image="mine:2"), 1, image="registry/runtime:1")
    assert custom["spec"]["containers"][0]["image"] == "mine:2"


def test_pod_names_and_labels_identify_job_and_attempt():
    pod = render.pod(job(), 3, image="x")
    assert pod["metadata"]["name"] == "gsm8k-attempt-3" == render.pod_name("gsm8k", 3)
    assert pod["metadata"]["namespace"] == "team-a"
    assert pod["metadata"]["labels"][render.LABEL_JOB] == "gsm8k"
    assert pod["metadata"]["labels"][render.LABEL_ATTEMPT] == "3"
    assert env_of(pod)["GRPO_ATTEMPT"]["value"] == "3"
    assert env_of(pod)["GRPOJOB_NAME"]["value"] == "gsm8k"
    assert env_of(pod)["GRPOJOB_NAMESPACE"]["value"] == "team-a"


def test_the_pod_requires_the_gpu_it_asks_for():
    from grpo_runtime.device import DEVICE_ENV

    pod = render.pod(job(), 1, image="x")
    assert pod["spec"]["containers"][0]["resources"]["limits"][render.GPU] == "1"
    assert render.DEVICE_ENV == DEVICE_ENV
    assert env_of(pod)[DEVICE_ENV]["value"] == "cuda"  # the runtime fails, not falls back to CPU, without it


def test_job_labels_such_as_kueue_queue_name_do_not_reach_the_pod():
    pod = render.pod(job(), 1, image="x")
    assert "kueue.x-k8s.io/queue-name" not in pod["metadata"]["labels"]


def test_credentials_are_secret_references_never_values():
    env = env_of(render.pod(job(), 1, image="x"))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": key}}


def test_no_credentials_env_without_a_secret():
    output = {"uri": "s3://runs/gsm8k"}
    assert "AWS_ACCESS_KEY_ID" not in env_of(render.pod(job(output=output), 1, image="x"))


def test_exactly_one_gpu_and_the_spec_resources():
    resources = render.pod(job(), 1, image="x")["spec"]["containers"][0]["resources"]
    assert resources["limits"] == {"memory": "48Gi", "nvidia.com/gpu": "1"}
    assert resources["requests"] == {"cpu": "4", "memory": "32Gi"}
    bare = render.pod(job(resources={}), 1, image="x")["spec"]["containers"][0]["resources"]
    assert bare == {"limits": {"nvidia.com/gpu": "1"}}


def test_scheduling_knobs_pass_through():
    spec = render.pod(job(), 1, image="x")["spec"]
    assert spec["nodeSelector"] == {"gpu": "a100"}
    assert spec["tolerations"] == MANIFEST["spec"]["tolerations"]
    assert spec["affinity"] == MANIFEST["spec"]["affinity"]
    assert spec["priorityClassName"] == "training"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]


def test_pod_is_locked_down_and_has_shared_memory():
    spec = render.pod(job(), 1, image="x")["spec"]
    container = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert next(v for v in spec["volumes"] if v["name"] == shm["name"])["emptyDir"] == {"medium": "Memory"}


def test_role_may_only_get_and_patch_this_jobs_status():
    role = render.role(job())
    assert role["rules"] == [
        {"apiGroups": ["grpo.dev"], "resources": ["grpojobs/status"], "resourceNames": ["gsm8k"],
         "verbs": ["get", "patch"]}
    ]
    binding = render.role_binding(job())
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gsm8k-runtime", "namespace": "team-a"}]
    assert render.service_account(job())["metadata"]["name"] == "gsm8k-runtime"


def test_config_map_holds_the_validated_job_with_defaults_and_clean_metadata():
    config_map = render.config_map(job())
    document = yaml.safe_load(config_map["data"]["job.yaml"])
    assert document["metadata"] == {"name": "gsm8k", "namespace": "team-a"}
    assert parse_job(document).spec == job().spec  # the runtime reads back exactly this spec
    assert document["spec"]["training"]["maxSteps"] == 100  # defaults spelled out


def test_operator_s3_endpoint_fills_only_an_unset_endpoint():
    unset = yaml.safe_load(render.config_map(job(), s3_endpoint="http://minio:9000")["data"]["job.yaml"])
    assert unset["spec"]["output"]["endpoint"] == "http://minio:9000"
    own = job(output={"uri": "s3://b/p", "endpoint": "https://r2.example"})
    kept = yaml.safe_load(render.config_map(own, s3_endpoint="http://minio:9000")["data"]["job.yaml"])
    assert kept["spec"]["output"]["endpoint"] == "https://r2.example"


def test_support_objects_come_before_the_pod_in_creation_order():
    kinds = [obj["kind"] for obj in render.support_objects(job())]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap"]
    assert all(obj["metadata"]["namespace"] == "team-a" for obj in render.support_objects(job()))


def test_reward_modules_config_map_is_mounted_and_importable():
    pod = render.pod(job(rewardModules={"configMap": "my-rewards"}), 1, image="registry/runtime:1")
    container = pod["spec"]["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == render.REWARD_MODULES_DIR)
    assert mount["readOnly"] is True
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "my-rewards"
    assert env_of(pod)["PYTHONPATH"]["value"] == render.REWARD_MODULES_DIR
    plain = render.pod(job(), 1, image="registry/runtime:1")
    assert "PYTHONPATH" not in env_of(plain)
    assert all(m["mountPath"] != render.REWARD_MODULES_DIR for m in plain["spec"]["containers"][0]["volumeMounts"])


def test_hub_token_is_a_secret_reference_named_hf_token():
    model = {"name": "meta-llama/Llama-3.1-8B-Instruct", "tokenSecret": "hf-token"}
    pod = render.pod(job(model=model), 1, image="x")
    token = env_of(pod)["HF_TOKEN"]
    assert "value" not in token
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}
    assert "HF_TOKEN" not in env_of(render.pod(job(), 1, image="x"))


def test_hub_push_token_is_a_secret_reference_of_its_own():
    from grpo_runtime.hub import HUB_TOKEN_ENV

    assert render.HUB_TOKEN_ENV == HUB_TOKEN_ENV  # the operator's copy (no torch there) names the runtime's variable
    pod = render.pod(job(output={"uri": "s3://b/p", "hub": {"repo": "acme/tuned", "tokenSecret": "hf-write"}}), 1, image="x")
    token = env_of(pod)[HUB_TOKEN_ENV]
    assert "value" not in token
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf-write", "key": "HF_TOKEN"}}
    # without hub.tokenSecret the runtime pushes with the model's HF_TOKEN: no variable of its own
    same = render.pod(job(output={"uri": "s3://b/p", "hub": {"repo": "acme/tuned"}}), 1, image="x")
    assert HUB_TOKEN_ENV not in env_of(same)


def test_model_cache_claim_is_mounted_where_hub_and_grpo_caches_live():
    model = {"name": "Qwen/Qwen2.5-1.5B-Instruct", "cache": "model-cache"}
    pod = render.pod(job(model=model), 1, image="x")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["model-cache"] == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}}
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    env = env_of(pod)
    assert env["HF_HOME"]["value"].startswith(mounts["model-cache"] + "/")
    assert env["GRPO_CACHE_DIR"]["value"].startswith(mounts["model-cache"] + "/")
    plain = render.pod(job(), 1, image="x")
    assert "model-cache" not in {v["name"] for v in plain["spec"]["volumes"]} and "HF_HOME" not in env_of(plain)


def test_azure_credentials_are_optional_secret_references_by_the_uri_scheme():
    output = {"uri": "az://runs/gsm8k", "credentialsSecret": "azure-creds"}
    env = env_of(render.pod(job(output=output), 1, image="x"))
    for key in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
                "AZURE_STORAGE_SAS_TOKEN"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "azure-creds", "key": key, "optional": True}}
    assert "AWS_SECRET_ACCESS_KEY" not in env


def test_gcs_service_account_key_is_a_mounted_secret_file():
    output = {"uri": "gs://runs/gsm8k", "credentialsSecret": "gcs-key"}
    pod = render.pod(job(output=output), 1, image="x")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["gcs-credentials"]["secret"] == {"secretName": "gcs-key", "items": [{"key": "key.json", "path": "key.json"}]}
    mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["gcs-credentials"]["readOnly"] is True
    env = env_of(pod)
    assert env["GOOGLE_APPLICATION_CREDENTIALS"]["value"] == mounts["gcs-credentials"]["mountPath"] + "/key.json"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    document = yaml.safe_load(render.config_map(job(output=output), s3_endpoint="http://minio:9000")["data"]["job.yaml"])
    assert "endpoint" not in document["spec"]["output"]  # the operator's S3 endpoint is not GCS's


def test_the_operators_default_model_cache_applies_unless_the_job_names_one():
    default = render.pod(job(), 1, image="x", model_cache="shared-models")
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "shared-models"}} in default["spec"]["volumes"]
    assert "HF_HOME" in env_of(default)
    own = render.pod(job(model={"name": "Qwen/Qwen2.5-1.5B-Instruct", "cache": "mine"}), 1, image="x", model_cache="shared-models")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in own["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["mine"]
