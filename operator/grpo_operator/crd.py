"""The GRPOJob CustomResourceDefinition, generated from the pydantic spec (`grpo crd`).

The spec schema is pydantic's JSON schema turned into a Kubernetes *structural* schema:
$refs inlined, `anyOf [X, null]` -> X + nullable, free-form dicts ->
x-kubernetes-preserve-unknown-fields, int-or-string maps -> x-kubernetes-int-or-string,
JSON-Schema-2020 exclusive bounds -> OpenAPI 3.0 booleans, `additionalProperties: false`
dropped (the API server prunes unknown fields instead). Every description is kept and the
default is appended to it, so `kubectl explain grpojob.spec.training` reads like the spec.

The status schema is written here: it is the contract between the operator (everything
but `progress`) and the runtime (`progress` only, see grpo_runtime.status).
crds/grpojob.yaml is this module's output, checked in; a test keeps the two equal.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml

from grpo_runtime.spec import API_VERSION, KIND, GRPOJobSpec

GROUP, VERSION = API_VERSION.split("/")
PLURAL, SINGULAR, SHORT_NAME = "grpojobs", "grpojob", "grpo"
MUTABLE_SPEC_FIELD = ("runPolicy", "suspend")  # the one field that may change after creation

_DROP_KEYS = {
    "title", "description", "default", "additionalProperties", "$ref", "anyOf", "exclusiveMinimum", "exclusiveMaximum",
}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a $ref; the referring node's own keys (its description) win over the definition's."""
    if "$ref" not in node:
        return node
    target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _describe(description: str | None, default: Any) -> str | None:
    if default is None or default == {} or default == []:
        return description
    text = json.dumps(default)
    return f"{description or ''} Default: {text}.".strip()


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON-schema node -> one Kubernetes structural-schema node (recursive)."""
    node = _resolve(node, defs)
    out: dict[str, Any] = {}

    variants = node.get("anyOf")
    if variants:
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) < len(variants):
            out["nullable"] = True
        types = {_resolve(v, defs).get("type") for v in non_null}
        if types == {"string", "integer"}:
            out["x-kubernetes-int-or-string"] = True
        elif len(non_null) == 1:
            inner = structural(non_null[0], defs)
            out.update({k: v for k, v in inner.items() if k != "description"})
        else:
            raise ValueError(f"no structural form for anyOf {variants!r}")

    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out["properties"] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out["items"] = structural(value, defs)
        else:
            out[key] = value

    if "exclusiveMinimum" in node:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True

    extra = node.get("additionalProperties")
    if extra is True:  # dict[str, Any]: free-form
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(extra, dict):  # dict[str, X]
        out["additionalProperties"] = structural(extra, defs)

    description = _describe(node.get("description"), node.get("default"))
    head = {"description": description} if description else {}
    if "type" in out:
        head["type"] = out.pop("type")
    return {**head, **out}


def _unchanged(path: str) -> str:
    """CEL: the optional field at `path` (dotted, under self/oldSelf) is neither added, removed nor
    changed. Every object on the way may itself be absent: `has()` is asked of each prefix."""
    parts = path.split(".")

    def present(root: str) -> str:
        return " && ".join(f"has({root}.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))

    return (
        f"({present('self')}) == ({present('oldSelf')}) && "
        f"(!({present('self')}) || self.{path} == oldSelf.{path})"
    )


def spec_schema() -> dict[str, Any]:
    """The spec's structural schema with its immutability rules.

    All rules sit on `spec` itself, which every GRPOJob has: the API server runs a transition
    rule (one that reads oldSelf) only where the old object has the node the rule is on, so a
    rule on an optional object such as runPolicy would never run for a job created without it,
    and a later patch could add any runPolicy it liked. On `spec`, every field's rule runs on
    every update, whether or not the field (or its parent) existed at creation.
    """
    raw = GRPOJobSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = structural(raw, defs)
    schema["description"] = (
        "Desired state of one GRPO fine-tuning run. Immutable once created, except "
        "runPolicy.suspend (how Kueue admits and preempts)."
    )
    parent, mutable = MUTABLE_SPEC_FIELD
    only = f"(only spec.{parent}.{mutable} may change)"
    paths = [name for name in schema["properties"] if name != parent]
    paths += [f"{parent}.{name}" for name in schema["properties"][parent]["properties"] if name != mutable]
    schema["x-kubernetes-validations"] = [
        {"rule": _unchanged(path), "message": f"spec.{path} is immutable {only}"} for path in paths
    ]
    return schema


def _number(description: str) -> dict[str, Any]:
    return {"type": "number", "nullable": True, "description": description}


def status_schema() -> dict[str, Any]:
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string",
                     "description": "Running, Suspended, Succeeded, Failed, Disrupted or OutputPersistent."},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string",
                       "description": "CamelCase cause, e.g. InvalidSpec, BadInput, BackoffLimitExceeded."},
            "message": {"type": "string", "description": "Human-readable detail."},
            "lastTransitionTime": {"type": "string", "format": "date-time",
                                   "description": "When status last changed (not reason or message)."},
            "observedGeneration": {"type": "integer", "format": "int64"},
        },
    }
    progress = {
        "type": "object",
        "description": "Written by the runtime every optimizer step (never by the operator).",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "step": {"type": "integer", "description": "Optimizer steps done."},
            "totalSteps": {"type": "integer", "description": "Optimizer steps the run will do."},
            "reward": _number("Mean weighted reward of the last step."),
            "rewards": {"type": "object", "additionalProperties": {"type": "number", "nullable": True},
                        "description": "Mean reward of the last step per reward function name."},
            "kl": _number("Mean KL to the reference policy of the last step."),
            "completionLength": _number("Mean completion length in tokens of the last step."),
            "tokensPerSecond": _number("Generated tokens per second of the last step."),
            "tools": {
                "type": "object",
                "description": "With spec.tools or spec.environment: the last step's episodes.",
                "properties": {
                    "callFrequency": _number("Tool calls per episode."),
                    "failureFrequency": _number("Share of the calls that failed (raised, unknown, timed out)."),
                    "turns": _number("Replies the model wrote per episode."),
                },
            },
            "latestCheckpoint": {"type": "string", "nullable": True,
                                 "description": "URI of the newest complete checkpoint."},
            "eval": {
                "type": "object",
                "description": "The latest held-out evaluation (spec.evaluation).",
                "properties": {
                    "step": {"type": "integer", "description": "Optimizer steps done when it ran (0: the baseline)."},
                    "accuracy": _number("Share of held-out completions that are correct (spec.evaluation.correct)."),
                    "passAtK": _number("Share of held-out prompts with a correct completion among numSamples "
                                       "(unbiased pass@k); only when numSamples > 1."),
                    "numSamples": {"type": "integer", "description": "Completions per held-out prompt."},
                    "rewards": {"type": "object", "additionalProperties": {"type": "number", "nullable": True},
                                "description": "Mean reward on the held-out prompts per reward function name."},
                    "accuracies": {"type": "object", "additionalProperties": {"type": "number", "nullable": True},
                                   "description": "Per reward function name: the share of held-out completions "
                                                  "reaching its threshold."},
                },
            },
            "updatedAt": {"type": "string", "format": "date-time", "description": "When the runtime wrote this."},
        },
    }
    return {
        "type": "object",
        "description": "Observed state. The operator writes everything but progress; the runtime writes progress.",
        "properties": {
            "phase": {"type": "string", "enum": ["Pending", "Running", "Succeeded", "Failed", "Suspended"],
                      "description": "Pending, Running, Succeeded, Failed or Suspended."},
            "conditions": {"type": "array", "items": condition,
                           "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
            "observedGeneration": {"type": "integer", "format": "int64",
                                   "description": "metadata.generation this status was computed for."},
            "podName": {"type": "string",
                        "description": "The current attempt's pod (of several nodes, pod 0's, where the rendezvous "
                                       "is); absent while the pods of the attempt before are still ending."},
            "attempt": {"type": "integer", "description": "The current attempt's number (its pods' GRPO_ATTEMPT)."},
            "restarts": {"type": "integer",
                         "description": "Attempts that failed and were retried (counted against backoffLimit)."},
            "disruptions": {"type": "integer",
                            "description": "Attempts ended by the cluster, not by a failure: preemption, eviction "
                                         "(node drain, queue manager, node pressure), node loss, pod deleted. "
                                         "Retried without counting against backoffLimit; the Disrupted condition "
                                         "names the last cause."},
            "ranks": {"type": "integer",
                      "description": "Training processes, one per GPU: spec.resources.gpus x nodes (torchrun's "
                                     "world size)."},
            "runningPods": {"type": "integer",
                            "description": "Of a job of several nodes: how many of the current attempt's pods run "
                                           "(it is Running when all spec.resources.nodes do)."},
            "startTime": {"type": "string", "format": "date-time",
                          "description": "When the job (last resumed and) started; "
                                         "activeDeadlineSeconds counts from here."},
            "completionTime": {"type": "string", "format": "date-time", "description": "When it Succeeded or Failed."},
            "progress": progress,
        },
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Job phase."},
    # status.ranks, not the spec: a column cannot multiply gpus by nodes, and fields left at their default are
    # absent from the stored spec (the schema sets no defaults); the operator writes ranks from the validated spec.
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.ranks",
     "description": "GPUs of the job, one training process each (spec.resources.gpus x nodes)."},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "description": "Optimizer steps done."},
    {"name": "Total", "type": "integer", "jsonPath": ".status.progress.totalSteps", "priority": 1,
     "description": "Optimizer steps in the run."},
    {"name": "Reward", "type": "number", "jsonPath": ".status.progress.reward",
     "description": "Mean weighted reward of the last step."},
    {"name": "Eval", "type": "number", "jsonPath": ".status.progress.eval.accuracy",
     "description": "Held-out accuracy of the latest evaluation (spec.evaluation)."},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1,
     "description": "Retried attempts."},
    {"name": "Disruptions", "type": "integer", "jsonPath": ".status.disruptions", "priority": 1,
     "description": "Attempts ended by preemption, eviction or node loss (not counted as failures)."},
    {"name": "Pod", "type": "string", "jsonPath": ".status.podName", "priority": 1, "description": "Current pod."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A GRPO fine-tuning job: a training pod on each of its nodes, "
                            "retried from its last checkpoint.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# GENERATED by `grpo crd` from runtime/grpo_runtime/spec.py: do not edit, regenerate.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100)
