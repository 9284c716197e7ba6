"""The GRPOJob CRD: generated from the pydantic spec, checked in, and structural."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import yaml

from grpo_operator.crd import crd, spec_schema
from grpo_runtime.cli import main as grpo
from grpo_runtime.spec import GRPOJobSpec, parse_job

from crd_validation import violations

CHECKED_IN = Path(__file__).resolve().parents[2] / "crds" / "grpojob.yaml"

FULL_JOB = {
    "apiVersion": "grpo.dev/v1alpha1",
    "kind": "GRPOJob",
    "metadata": {"name": "full", "namespace": "ns"},
    "spec": {
        "model": {"name": "Qwen/Qwen2.5-1.5B-Instruct", "revision": "main", "loadIn4bit": True},
        "lora": {"rank": 8, "targetModules": ["q_proj"]},
        "dataset": {"source": "s3://d/gsm8k.jsonl", "systemPrompt": "Think.", "maxSamples": 100},
        "rewards": [{"name": "fmt", "function": "builtin:format", "weight": 0.5, "args": {"pattern": "<a>.*</a>"}}],
        "generation": {"topK": 50, "minP": 0.1, "stop": ["</a>"], "samplingParams": {"repetition_penalty": 1.1}},
        "training": {"epsilonHigh": 0.28, "lossType": "grpo"},
        "evaluation": {"heldOut": 0.05, "everySteps": 10, "numSamples": 4, "correct": {"fmt": 1.0}, "threshold": 0.5},
        "checkpoint": {"keepBest": "eval/pass@4"},
        "output": {"uri": "s3://runs/full", "endpoint": "http://minio:9000", "region": "x", "credentialsSecret": "s"},
        "image": "img:1",
        "imagePullSecrets": ["regcred"],
        "resources": {"requests": {"cpu": 4}, "limits": {"memory": "40Gi"}},
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "high",
        "runPolicy": {"backoffLimit": 1, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 60},
    },
}


def walk(schema: dict[str, Any], path: str = ""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_checked_in_crd_is_what_grpo_crd_prints():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert grpo(["crd"]) == 0
    assert out.getvalue() == CHECKED_IN.read_text(), (
        "crds/grpojob.yaml is stale: regenerate it with `grpo crd > crds/grpojob.yaml`"
    )


def test_names_scope_and_subresources():
    spec = crd()["spec"]
    assert crd()["metadata"]["name"] == "grpojobs.grpo.dev"
    assert spec["names"]["kind"] == "GRPOJob" and spec["names"]["plural"] == "grpojobs"
    assert spec["names"]["shortNames"] == ["grpo"]
    assert spec["scope"] == "Namespaced"
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns_phase_gpus_step_reward_eval_age():
    (version,) = crd()["spec"]["versions"]
    shown = [(c["name"], c["jsonPath"]) for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert shown == [
        ("Phase", ".status.phase"),
        ("GPUs", ".status.ranks"),  # gpus x nodes, which the operator writes: a column cannot multiply
        ("Step", ".status.progress.step"),
        ("Reward", ".status.progress.reward"),
        ("Eval", ".status.progress.eval.accuracy"),
        ("Age", ".metadata.creationTimestamp"),
    ]


def test_status_progress_eval_is_what_the_runtime_patches():
    from grpo_runtime.status import eval_progress

    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    node = schema["properties"]["progress"]["properties"]["eval"]
    line = {"step": 2, "eval/accuracy": 0.5, "eval/pass@4": 0.75, "eval/correct/mean": 0.5, "eval/correct/accuracy": 0.5,
            "eval/num_samples": 4, "eval/num_prompts": 8, "eval/completion_length": 9.0}
    progress = eval_progress(line)
    assert set(progress) == set(node["properties"])
    for key in ("rewards", "accuracies"):  # name -> number, as progress.rewards (and the operator's gauges) read it
        assert node["properties"][key]["additionalProperties"]["type"] == "number"
        assert progress[key] == {"correct": 0.5}


def test_schema_is_structural():
    """What the API server demands of a CRD schema: a type everywhere, no $ref/anyOf/false maps."""
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert not {"$ref", "$defs", "anyOf", "oneOf", "title", "default"} & node.keys(), path
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, f"{path}: {bound} must be a boolean in OpenAPI v3.0"


def test_schema_is_camel_case_and_documented():
    spec = spec_schema()
    for path, node in walk(spec):
        assert "_" not in path, path
        if path.count(".") <= 2 and path and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"spec{path} has no description (kubectl explain shows it)"
    training = spec["properties"]["training"]["properties"]
    assert "Default: 100." in training["maxSteps"]["description"]
    assert training["epsilon"]["exclusiveMinimum"] is True and training["epsilon"]["minimum"] == 0.0
    assert spec["properties"]["generation"]["properties"]["numGenerations"]["minimum"] == 2
    assert spec["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["properties"]["model"]["properties"]["revision"]["nullable"] is True


def test_every_field_of_a_full_job_survives_pruning():
    """The API server drops fields the schema does not know; none of the spec's may be dropped."""
    schema = spec_schema()
    manifest = parse_job(FULL_JOB).to_manifest()["spec"]

    def check(value: Any, node: dict[str, Any], path: str) -> None:
        if node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in node:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                if "properties" in node:
                    assert key in node["properties"], f"{path}.{key} would be pruned"
                    check(item, node["properties"][key], f"{path}.{key}")
                else:
                    assert "additionalProperties" in node, f"{path}.{key} would be pruned"
        elif isinstance(value, list):
            for item in value:
                check(item, node["items"], f"{path}[]")

    check(manifest, schema, "spec")
    assert set(schema["properties"]) == {field.alias for field in GRPOJobSpec.model_fields.values()}


def test_spec_is_immutable_except_suspend():
    spec = spec_schema()
    guarded = {rule["message"].split(" ")[0] for rule in spec["x-kubernetes-validations"]}
    policy = spec["properties"]["runPolicy"]
    everything = {f"spec.{name}" for name in spec["properties"] if name != "runPolicy"}
    everything |= {f"spec.runPolicy.{name}" for name in policy["properties"]}
    assert guarded == everything - {"spec.runPolicy.suspend"}
    for rule in spec["x-kubernetes-validations"]:
        assert "oldSelf" in rule["rule"]  # transition rules: checked on update only
    # Every rule sits on spec, which every job has: a transition rule on an optional node (say
    # runPolicy) does not run when the old object lacks that node, and would guard nothing.
    below = [path for path, node in walk(spec) if path and "x-kubernetes-validations" in node]
    assert below == []


SCHEMA = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
NO_POLICY = {"apiVersion": "grpo.dev/v1alpha1", "kind": "GRPOJob", "metadata": {"name": "j"},
             "spec": {k: v for k, v in FULL_JOB["spec"].items() if k != "runPolicy"}}


def updated(job: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {**job, "spec": {**job["spec"], **spec}}


def test_immutability_holds_for_fields_absent_at_creation():
    """Issue 14: a job created without runPolicy took a patch adding a deadline and a TTL."""
    added = updated(NO_POLICY, runPolicy={"activeDeadlineSeconds": 1, "backoffLimit": 0, "ttlSecondsAfterFinished": 0})
    refused = violations(SCHEMA, added, NO_POLICY)
    assert sorted(refused) == [
        f'spec: Invalid value: "object": spec.runPolicy.{name} is immutable (only spec.runPolicy.suspend may change)'
        for name in ("activeDeadlineSeconds", "backoffLimit", "ttlSecondsAfterFinished")
    ]
    no_image = {**NO_POLICY, "spec": {k: v for k, v in NO_POLICY["spec"].items() if k != "image"}}
    assert violations(SCHEMA, NO_POLICY, no_image)  # spec.image added later
    assert violations(SCHEMA, updated(NO_POLICY, lora={"rank": 64}), NO_POLICY)  # a whole section changed


def test_suspend_alone_may_change_whether_or_not_run_policy_existed():
    assert violations(SCHEMA, updated(NO_POLICY, runPolicy={"suspend": True}), NO_POLICY) == []
    with_policy = updated(NO_POLICY, runPolicy={"backoffLimit": 1, "suspend": True})
    assert violations(SCHEMA, updated(NO_POLICY, runPolicy={"backoffLimit": 1, "suspend": False}), with_policy) == []
    assert violations(SCHEMA, NO_POLICY, with_policy)  # dropping runPolicy drops backoffLimit: refused
    assert violations(SCHEMA, updated(NO_POLICY, runPolicy={"backoffLimit": 1}), with_policy) == []
    assert violations(SCHEMA, with_policy) == []  # create: transition rules do not run


def test_rules_on_an_optional_object_do_not_run_when_the_old_object_lacks_it():
    """The evaluator runs rules as the API server does, so it reproduces the hole of the old layout
    (rules on runPolicy itself), which the real v1.25 API server showed."""
    old_layout = {"type": "object", "properties": {"spec": {"type": "object", "properties": {"runPolicy": {
        "type": "object",
        "properties": {"backoffLimit": {"type": "integer"}, "suspend": {"type": "boolean"}},
        "x-kubernetes-validations": [{"rule": "has(self.backoffLimit) == has(oldSelf.backoffLimit)",
                                      "message": "spec.runPolicy.backoffLimit is immutable"}],
    }}}}}
    before, after = {"spec": {}}, {"spec": {"runPolicy": {"backoffLimit": 0}}}
    assert violations(old_layout, after, before) == []  # the hole
    assert violations(old_layout, after, {"spec": {"runPolicy": {}}})  # the rule runs when old has the node


def test_status_has_the_contract_fields():
    status = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"phase", "conditions", "observedGeneration", "podName", "restarts", "startTime", "completionTime",
            "progress"} <= status.keys()
    progress = status["progress"]["properties"]
    assert {"step", "totalSteps", "reward", "rewards", "kl", "completionLength", "tokensPerSecond",
            "latestCheckpoint", "updatedAt", "eval", "tools"} == progress.keys()


def test_checked_in_file_is_a_single_valid_yaml_document():
    (document,) = list(yaml.safe_load_all(CHECKED_IN.read_text()))
    assert document == crd()


def test_crd_is_a_valid_v1_33_customresourcedefinition():
    """Against the Kubernetes 1.33 API schema of CustomResourceDefinition, unknown fields refused."""
    import kubernetes_validate  # in the dev extra

    assert kubernetes_validate.validate(crd(), "1.33.0", strict=True) == "1.33"
