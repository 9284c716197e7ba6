"""A job on GCS and Azure end to end: outputs, resume from LATEST, metrics as one stream, and
models and datasets read from those stores (emulators on loopback: gcp-storage-emulator, Azurite)."""

from __future__ import annotations

import json

import pytest

from grpo_runtime import checkpoints
from grpo_runtime.metrics_log import read_metrics
from grpo_runtime.storage import open_storage
from tests.runtime.test_trainer import run_in_process, tiny_job


@pytest.fixture(params=["gs", "az"])
def bucket(request):
    return request.getfixturevalue("gcs_bucket" if request.param == "gs" else "azure_container")


def test_a_job_writes_to_the_store_and_resumes_from_its_latest(bucket, tiny_model_dir):
    uri = bucket.uri("jobs/tiny")
    doc = tiny_job(tiny_model_dir, uri, maxSteps=2)
    doc["spec"]["output"]["endpoint"] = bucket.endpoint
    assert run_in_process(doc) == 0
    store = open_storage(uri, endpoint=bucket.endpoint)
    assert checkpoints.latest_checkpoint(store) == 2
    assert {"spec.yaml", "final/adapter_model.safetensors", "checkpoints/step-2/MANIFEST.json"} <= set(store.list(""))

    doc["spec"]["training"]["maxSteps"] = 3  # the same job, asked for one more step: resumes at 2
    assert run_in_process(doc) == 0
    assert [m["step"] for m in read_metrics(store)] == [1, 2, 3]
    assert checkpoints.latest_checkpoint(store) == 3


def test_model_and_dataset_come_from_the_stores(gcs_bucket, azure_container, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE_DIR", str(tmp_path / "cache"))
    model_uri = azure_container.uri("models/tiny")
    open_storage(model_uri).upload_dir(tiny_model_dir, "")
    rows = [{"prompt": f"What is {a} + 2?", "answer": str(a + 2)} for a in range(6)]
    open_storage(gcs_bucket.uri("data")).write_bytes("train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())

    out = tmp_path / "run"
    doc = tiny_job(model_uri, out, maxSteps=1)
    doc["spec"]["dataset"] = {"source": gcs_bucket.uri("data/train.jsonl")}
    assert run_in_process(doc) == 0
    (metrics,) = read_metrics(open_storage(str(out)))
    assert metrics["step"] == 1
    assert list((tmp_path / "cache").rglob("config.json"))  # the model went through the cache
