"""The chart's Grafana dashboard: shipped as a ConfigMap the Grafana sidecar loads, shaped as
Grafana's dashboard model documents it, and querying only series the operator really exports
(read from the operator's registry after it has seen a few jobs, with prometheus_client's parser)."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from prometheus_client.parser import text_string_to_metric_families

from grpo_operator.metrics import Metrics
from tests.packaging.helpers import CHART, KUBERNETES_VERSION, find, one

DASHBOARD = json.loads((CHART / "dashboards" / "grpo-jobs.json").read_text())
ON = ("--set", "metrics.enabled=true", "--set", "grafanaDashboard.enabled=true")

# Grafana's dashboard JSON model (grafana.com/docs/grafana/latest/dashboards/build-dashboards/
# view-dashboard-json-model/): the parts a provisioned dashboard needs, as a JSON Schema.
GRID = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
DATASOURCE = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"const": "prometheus"}, "uid": {"type": "string", "minLength": 1}},
}
PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos", "datasource", "targets"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"enum": ["timeseries", "stat", "bargauge", "gauge", "table", "text", "row"]},
        "title": {"type": "string", "minLength": 1},
        "gridPos": GRID,
        "datasource": DATASOURCE,
        "targets": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["refId", "expr"],
                "properties": {"refId": {"type": "string", "minLength": 1}, "expr": {"type": "string", "minLength": 1}},
            },
        },
        "fieldConfig": {"type": "object", "required": ["defaults", "overrides"]},
    },
}
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},  # datasource objects, not names
        "panels": {"type": "array", "minItems": 1, "items": PANEL},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "type"],
                        "properties": {"type": {"enum": ["datasource", "query", "custom", "constant", "interval"]}},
                    },
                }
            },
        },
    },
}

# PromQL words that are not metric names
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "rate", "irate", "increase", "delta", "topk", "bottomk", "max_over_time", "min_over_time",
    "avg_over_time", "last_over_time", "label_values", "and", "or", "unless", "bool", "offset",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a label_values() query) reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r",\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", ")", text)  # label_values(metric, label)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    names = set(re.findall(r"(?<![$\w:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:]|\s*\()", text))  # not a function
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"\d+\w*", n)}


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def exported_series() -> set[str]:
    """Sample names the operator's /metrics has with a few jobs in every state it reports."""
    metrics = Metrics()
    progress = {"step": 4, "totalSteps": 10, "reward": 0.5, "rewards": {"correct": 0.5, "format": 1.0}, "kl": 0.01,
                "completionLength": 90.0, "tokensPerSecond": 300.0, "eval": {"step": 4, "accuracy": 0.3, "rewards": {"correct": 0.3}}}  # fmt: skip
    metrics.job_status("ml", "a", {"phase": "Running", "restarts": 1, "disruptions": 1, "progress": progress})
    metrics.job_status("ml", "b", {"phase": "Succeeded", "restarts": 0, "progress": progress})
    metrics.job_status("ops", "c", {"phase": "Pending"})
    metrics.pod_created()
    return {s.name for family in text_string_to_metric_families(metrics.text()) for s in family.samples}


def unknown_metrics(dashboard: dict[str, Any]) -> dict[str, set[str]]:
    exported = exported_series()
    return {q: metric_names(q) - exported for q in dashboard_queries(dashboard) if metric_names(q) - exported}


# ---------------------------------------------------------------- the tests


def test_the_dashboard_follows_grafanas_dashboard_model():
    jsonschema.validate(DASHBOARD, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]  # Grafana's grid is 24 columns wide
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    used = set(re.findall(r"\$\{?(\w+)", json.dumps(DASHBOARD)))
    assert used <= variables, f"undefined variables: {used - variables}"


def test_the_dashboard_shows_what_the_issue_asks_for():
    queries = " ".join(dashboard_queries(DASHBOARD))
    for name in ("grpo_jobs", "grpo_job_reward", "grpo_job_reward_mean", "grpo_job_kl",
                 "grpo_job_tokens_per_second", "grpo_job_restarts", "grpo_job_eval_accuracy"):  # fmt: skip
        assert re.search(rf"\b{name}\b", queries), name
    assert any("sum by (phase) (grpo_jobs)" in q for q in dashboard_queries(DASHBOARD))


def test_every_query_reads_only_series_the_operator_exports():
    assert unknown_metrics(DASHBOARD) == {}


@pytest.mark.parametrize(
    ("old", "new", "bad"),
    [("grpo_job_kl{", "grpo_job_kl_divergence{", "grpo_job_kl_divergence"),
     ("(grpo_jobs)", "(grpo_jobs_total)", "grpo_jobs_total"),
     ("label_values(grpo_job_phase,", "label_values(grpo_job_state,", "grpo_job_state")],
)  # fmt: skip
def test_a_query_on_a_metric_the_operator_lacks_is_caught(old, new, bad):
    text = json.dumps(DASHBOARD)
    assert old in text
    unknown = unknown_metrics(json.loads(text.replace(old, new, 1)))
    assert [names for names in unknown.values()] == [{bad}]


def test_metric_names_ignore_labels_functions_and_variables():
    expr = 'sum by (phase) (rate(grpo_pods_created_total{namespace=~"$namespace", job="x"}[5m])) / grpo_job_step == 1'
    assert metric_names(expr) == {"grpo_pods_created_total", "grpo_job_step"}
    assert metric_names('label_values(grpo_job_phase{namespace=~"$namespace"}, job)') == {"grpo_job_phase"}


def test_the_chart_ships_it_in_a_configmap_grafanas_sidecar_loads(render):
    assert not find(render(), "ConfigMap")  # off by default
    manifests = render(*ON)
    config_map = one(manifests, "ConfigMap")
    kubernetes_validate.validate(config_map, KUBERNETES_VERSION, strict=True)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "grpo-system"
    (key, text), = config_map["data"].items()
    assert key.endswith(".json") and json.loads(text) == DASHBOARD


def test_the_dashboard_configmap_goes_where_the_sidecar_looks(render):
    manifests = render(*ON, "--set", "grafanaDashboard.namespace=monitoring",
                       "--set", "grafanaDashboard.annotations.grafana_folder=ML")  # fmt: skip
    config_map = one(manifests, "ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "ML"}


def test_the_servicemonitor_keeps_the_jobs_own_namespace_and_job_labels(render):
    """Prometheus sets `namespace` and `job` on every scraped series (the target's); the per-job
    series carry the GRPOJob's, and the dashboard filters on them: they must win."""
    monitor = one(render(*ON, "--set", "metrics.serviceMonitor.enabled=true"), "ServiceMonitor")
    assert [e.get("honorLabels") for e in monitor["spec"]["endpoints"]] == [True]
