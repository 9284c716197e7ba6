"""render.py and spec.tracking: the MLflow credentials reach the pod as Secret references only."""

from __future__ import annotations

import copy
import json

from grpo_operator import render
from grpo_runtime.spec import parse_job
from test_render import MANIFEST, env_of

MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def tracked(**mlflow):
    manifest = copy.deepcopy(MANIFEST)
    manifest["spec"]["tracking"] = {"mlflow": {"trackingUri": "http://mlflow.mlflow:5000", **mlflow}}
    return parse_job(manifest)


def test_mlflow_credentials_are_optional_secret_references_never_values():
    env = env_of(render.pod(tracked(credentialsSecret="mlflow-creds"), 1, image="x"))
    for key in MLFLOW_KEYS:
        assert "value" not in env[key]
        # optional: a Secret with a token only (or a username and password only) is fine
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-creds", "key": key, "optional": True}}
    # the S3 credentials are unchanged beside them
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}


def test_no_mlflow_credentials_env_without_a_secret():
    env = env_of(render.pod(tracked(), 1, image="x"))
    assert not set(MLFLOW_KEYS) & env.keys()


def test_the_job_config_map_names_the_secret_and_holds_no_credential_env():
    objects = render.support_objects(tracked(credentialsSecret="mlflow-creds"), s3_endpoint=None)
    text = json.dumps(objects)
    assert "mlflow-creds" in text  # the name, in the job spec the pod reads
    assert not any(key in text for key in MLFLOW_KEYS)
