"""The examples users copy: each GRPOJob validates and renders to valid Kubernetes objects, its
rewards load and score, the custom reward module keeps TRL's signature, the Kueue and GitOps
pieces fit together, and the Argo CD health check (real Lua) maps each phase right."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from grpo_operator import render
from grpo_operator.crd import GROUP, PLURAL
from grpo_operator.metrics import PHASES
from grpo_runtime.cli import main as grpo
from grpo_runtime.spec import GRPOJob, parse_job

from tests.packaging.helpers import KUBERNETES_VERSION, REPO, documents

EXAMPLES = REPO / "examples"
CUSTOM = EXAMPLES / "custom-reward"


def grpojob_files() -> list[Path]:
    return [
        p for p in sorted(EXAMPLES.rglob("*.yaml")) if any(d.get("kind") == "GRPOJob" for d in documents(p.read_text()))
    ]


def load(path: Path) -> GRPOJob:
    (doc,) = [d for d in documents(path.read_text()) if d.get("kind") == "GRPOJob"]
    return parse_job(doc)


def test_the_examples_promised_by_the_docs_exist():
    names = {p.relative_to(EXAMPLES).as_posix() for p in grpojob_files()}
    assert {
        "local-cpu.yaml",
        "gsm8k-qwen2.5-1.5b-qlora.yaml",
        "llama3.1-8b-20k-context.yaml",
        "custom-reward/grpojob.yaml",
        "kueue/grpojob.yaml",
    } <= names
    assert any(name.startswith("gitops/jobs/") for name in names)


@pytest.mark.parametrize("path", grpojob_files(), ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_grpo_validate_accepts_the_example(path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert grpo(["validate", str(path)]) == 0
    assert out.getvalue().startswith(f"GRPOJob {load(path).metadata.name}: ")


@pytest.mark.parametrize("path", grpojob_files(), ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_the_operator_renders_the_example_to_valid_kubernetes_objects(path):
    job = load(path)
    job.metadata.namespace = job.metadata.namespace or "default"
    objects = render.support_objects(job, s3_endpoint="http://minio:9000") + [render.pod(job, 1, image="img:1")]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    pod = objects[-1]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    if job.spec.output.credentials_secret:
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in pod["containers"][0]["env"] if "valueFrom" in e}
        assert refs == {job.spec.output.credentials_secret} | ({job.spec.model.token_secret} - {None})


def test_cluster_examples_keep_their_output_in_s3():
    """Everything but the laptop example is meant for a cluster, where the pod's disk dies with it."""
    for path in grpojob_files():
        if path.name != "local-cpu.yaml":
            output = load(path).spec.output
            assert output.uri and output.uri.startswith("s3://") and output.credentials_secret, path


@pytest.fixture
def custom_reward_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The custom-reward folder on sys.path, as PYTHONPATH puts it in the image (and locally)."""
    monkeypatch.syspath_prepend(str(CUSTOM))
    yield CUSTOM
    sys.modules.pop("reasoning_rewards", None)


@pytest.mark.parametrize("path", grpojob_files(), ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_every_example_reward_loads_and_scores_a_completion(path, custom_reward_path):
    from grpo_runtime.rewards import load_rewards

    rewards = load_rewards(load(path).spec.rewards)
    completion = "<think>\n6 times 7\nis 42\n</think>\n<answer>42</answer>\n#### 42"
    for reward in rewards:  # the args in the example bind to the function's parameters
        scores = list(reward.fn(prompts=["What is 6 x 7?"], completions=[completion], answer=["42"],
                                completion_ids=[[1] * 20]))  # fmt: skip
        assert len(scores) == 1 and (scores[0] is None or isinstance(scores[0], float)), reward.name


# ---------------------------------------------------------------- the custom reward module


def test_custom_rewards_follow_trls_signature(custom_reward_path):
    import reasoning_rewards as rr

    good = "<think>\n3 apples\nplus 4\nmakes 7\n</think>\n<answer>7</answer>"
    wrong = "<think>guess</think><answer>8</answer>"
    untagged = "The answer is 7."
    gsm8k_reference = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"
    assert rr.tagged_answer(["q"] * 4, [good, wrong, untagged, good], answer=[gsm8k_reference, "7", "7", None]) == [
        1.0, 0.0, 0.0, None]  # fmt: skip
    # TRL's conversational completions: lists of messages
    chat = [[{"role": "assistant", "content": good}]]
    assert rr.tagged_answer(["q"], chat, answer=["7"], completion_ids=[[1, 2]]) == [1.0]
    assert rr.think_steps(["q"] * 3, [good, wrong, untagged], max_steps=3) == [1.0, 1 / 3, 0.0]


# ---------------------------------------------------------------- Kueue


def test_kueue_job_names_a_local_queue_that_exists_and_starts_suspended():
    job = load(EXAMPLES / "kueue" / "grpojob.yaml")
    queues = documents((EXAMPLES / "kueue" / "queues.yaml").read_text())
    by_kind = {(q["kind"], q["metadata"]["name"]): q for q in queues}
    local = by_kind[("LocalQueue", job.metadata.labels["kueue.x-k8s.io/queue-name"])]
    assert local["metadata"]["namespace"] == job.metadata.namespace
    cluster_queue = by_kind[("ClusterQueue", local["spec"]["clusterQueue"])]
    for group in cluster_queue["spec"]["resourceGroups"]:
        assert "nvidia.com/gpu" in group["coveredResources"]
        for flavor in group["flavors"]:
            assert ("ResourceFlavor", flavor["name"]) in by_kind
            assert {r["name"] for r in flavor["resources"]} == set(group["coveredResources"])
    assert job.spec.run_policy.suspend is True
    # The label stays on the job: the operator does not hand it to the pod (Kueue's pod
    # integration would otherwise gate the pod a second time).
    job.metadata.namespace = job.metadata.namespace or "default"
    assert "kueue.x-k8s.io/queue-name" not in render.pod(job, 1, image="img")["metadata"]["labels"]


# ---------------------------------------------------------------- GitOps


def test_argocd_application_points_at_a_folder_of_valid_grpojobs():
    (app,) = documents((EXAMPLES / "gitops" / "application.yaml").read_text())
    assert app["kind"] == "Application" and app["apiVersion"] == "argoproj.io/v1alpha1"
    folder = REPO / app["spec"]["source"]["path"]
    files = sorted(folder.glob("*.yaml"))
    assert files
    for path in files:
        job = load(path)
        # a TTL would delete a finished job, and self-heal would create (and retrain) it again
        assert job.spec.run_policy.ttl_seconds_after_finished is None, path


def health_script() -> tuple[str, str]:
    (cm,) = documents((EXAMPLES / "gitops" / "argocd-cm-health.yaml").read_text())
    ((key, script),) = cm["data"].items()
    return key, script


def test_health_check_key_names_the_grpojob_kind():
    key, _ = health_script()
    crd = yaml.safe_load((REPO / "crds" / "grpojob.yaml").read_text())
    assert key == f"resource.customizations.health.{crd['spec']['group']}_{crd['spec']['names']['kind']}"
    assert crd["spec"]["group"] == GROUP and crd["spec"]["names"]["plural"] == PLURAL


def to_lua(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([to_lua(lua, v) for v in value])
    return value


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    """Run the health script as Argo CD does (gopher-lua is Lua 5.1): `obj` global, a table back."""
    from lupa.lua51 import LuaRuntime

    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = to_lua(lua, obj)
    _, script = health_script()
    result = lua.execute(script)
    return dict(result.items())


def job_with(status: dict[str, Any] | None) -> dict[str, Any]:
    job = yaml.safe_load((EXAMPLES / "gitops" / "jobs" / "gsm8k-qwen2.5-1.5b.yaml").read_text())
    if status is not None:
        job["status"] = status
    return job


def condition(type_: str, reason: str, message: str) -> dict[str, str]:
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip


@pytest.mark.parametrize(
    "status, health, message",
    [
        (None, "Progressing", "Waiting for the operator"),
        ({"phase": "Pending", "podName": "j-attempt-1"}, "Progressing", "Pending"),
        ({"phase": "Running"}, "Progressing", "Running"),
        ({"phase": "Running", "progress": {"step": 12, "totalSteps": 500, "reward": 0.4375}},
         "Progressing", "Running: step 12/500, reward 0.438"),
        ({"phase": "Succeeded", "conditions": [condition("Succeeded", "Succeeded", "pod completed")]},
         "Healthy", "Training finished"),
        ({"phase": "Failed", "conditions": [
            condition("Running", "Failed", "x"),
            condition("Failed", "InvalidSpec", "spec.generation.numGenerations: must be >= 2, got 1")]},
         "Degraded", "InvalidSpec: spec.generation.numGenerations: must be >= 2, got 1"),
        ({"phase": "Failed"}, "Degraded", "Training failed"),
        ({"phase": "Suspended"}, "Suspended", "runPolicy.suspend is true"),
        ({"phase": "Exploded"}, "Unknown", "Unknown phase Exploded"),
    ],
)  # fmt: skip
def test_argocd_health_of_each_phase(status, health, message):
    assert argocd_health(job_with(status)) == {"status": health, "message": message}


def test_health_check_covers_every_phase_the_operator_sets():
    statuses = {phase: argocd_health(job_with({"phase": phase}))["status"] for phase in PHASES}
    assert statuses == {
        "Pending": "Progressing",
        "Running": "Progressing",
        "Succeeded": "Healthy",
        "Failed": "Degraded",
        "Suspended": "Suspended",
    }


def test_custom_reward_kustomization_ships_the_module_the_pod_imports(kubectl, tmp_path):
    """`kubectl apply -k examples/custom-reward` makes a ConfigMap the job's pod mounts on PYTHONPATH;
    the module imported from the mounted file scores completions."""
    import importlib.util

    from grpo_operator import render as render_objects
    from grpo_runtime.spec import parse_job
    from tests.packaging.helpers import documents, one, run

    result = run([kubectl, "kustomize", str(CUSTOM)])
    assert result.returncode == 0, result.stderr
    manifests = documents(result.stdout)
    config_map, job = one(manifests, "ConfigMap"), one(manifests, "GRPOJob")
    parsed = parse_job(job)
    assert config_map["metadata"]["name"] == parsed.spec.reward_modules.config_map
    pod = render_objects.pod(parsed.model_copy(update={"metadata": parsed.metadata.model_copy(update={"namespace": "default"})}), 1, image="img")
    volume = next(v for v in pod["spec"]["volumes"] if v.get("configMap", {}).get("name") == config_map["metadata"]["name"])
    mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    # materialise the ConfigMap as the kubelet would and import the module from there
    for key, text in config_map["data"].items():
        (tmp_path / key).write_text(text)
    modules = {r.function.split(":")[0] for r in parsed.spec.rewards if not r.function.startswith("builtin:")}
    assert modules == {Path(key).stem for key in config_map["data"]}
    for module in modules:
        spec = importlib.util.spec_from_file_location(module, tmp_path / f"{module}.py")
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        for reward in parsed.spec.rewards:
            if reward.function.startswith(f"{module}:"):
                scores = getattr(loaded, reward.function.split(":")[1])(["p"], ["<think>a</think><answer>4</answer>"], answer=["4"], **reward.args)
                assert len(scores) == 1
    assert mount["mountPath"] == render_objects.REWARD_MODULES_DIR


def test_kueue_queues_are_valid_kueue_objects_in_both_versions():
    """examples/kueue/queues.yaml against Kueue v0.19.2's own CRDs: valid as written (v1beta2) and as an older
    Kueue would take it (v1beta1), nothing an API server would prune."""
    import gzip

    from tests.operator.crd_validation import schema_errors, unknown_fields

    crds = {}
    for path in (REPO / "tests" / "operator" / "kueue_real_crds").glob("*.yaml.gz"):
        crd = yaml.safe_load(gzip.decompress(path.read_bytes()))
        for version in crd["spec"]["versions"]:
            crds[crd["spec"]["names"]["kind"], version["name"]] = version["schema"]["openAPIV3Schema"]
    queues = documents((EXAMPLES / "kueue" / "queues.yaml").read_text())
    assert {q["apiVersion"] for q in queues} == {"kueue.x-k8s.io/v1beta2"}
    for queue in queues:
        for version in ("v1beta2", "v1beta1"):
            schema = crds[queue["kind"], version]
            as_version = {**queue, "apiVersion": f"kueue.x-k8s.io/{version}"}
            assert unknown_fields(schema, as_version) == [] and schema_errors(schema, as_version) == [], (queue, version)

