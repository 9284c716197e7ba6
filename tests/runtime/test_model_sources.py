"""Model folders in a bucket (s3://, a real HTTP endpoint: moto): downloaded once into the cache, atomically."""

from __future__ import annotations

import threading

import pytest

from grpo_runtime import model as model_mod
from grpo_runtime.model import ModelError, load_policy, resolve_model_source
from grpo_runtime.spec import LoraSpec, ModelSpec
from grpo_runtime.storage import S3Storage, open_storage


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def s3_model(s3_bucket, tiny_model_dir):
    uri = s3_bucket.uri("models/tiny-llama")
    open_storage(uri, endpoint=s3_bucket.endpoint).upload_dir(tiny_model_dir, "")
    return uri


def count_downloads(monkeypatch):
    calls = []
    real = S3Storage.download_file

    def counting(self, key, local_path):
        calls.append(key)
        return real(self, key, local_path)

    monkeypatch.setattr(S3Storage, "download_file", counting)
    return calls


def test_an_s3_model_folder_is_downloaded_once_and_loads(s3_bucket, s3_model, tiny_model_dir, cache, monkeypatch):
    downloads = count_downloads(monkeypatch)
    folder = resolve_model_source(s3_model, endpoint=s3_bucket.endpoint)
    assert folder.startswith(str(cache))
    files = sorted(p.name for p in tiny_model_dir.iterdir())
    assert len(downloads) == len(files)
    assert resolve_model_source(s3_model + "/", endpoint=s3_bucket.endpoint) == folder  # a retry, a second job
    assert len(downloads) == len(files)  # nothing downloaded again
    policy = load_policy(ModelSpec(name=s3_model), LoraSpec(rank=4, alpha=8), endpoint=s3_bucket.endpoint)
    assert policy.source == folder and len(downloads) == len(files)
    assert [p.name for p in cache.rglob(".*")] == []  # no temp dirs left behind


def test_concurrent_jobs_sharing_the_cache_get_one_complete_folder(s3_bucket, s3_model, cache):
    results, errors = [], []

    def resolve():
        try:
            results.append(resolve_model_source(s3_model, endpoint=s3_bucket.endpoint))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(results[0]).model_type == "llama"
    assert [p.name for p in cache.rglob(".*")] == []


def test_a_failed_download_leaves_nothing_that_looks_complete(s3_bucket, s3_model, cache, monkeypatch):
    def broken(self, key, local_path):
        if key.endswith("model.safetensors"):
            raise model_mod.ModelError("spec.model.name: simulated failure half-way")
        return real(self, key, local_path)

    real = S3Storage.download_file
    monkeypatch.setattr(S3Storage, "download_file", broken)
    with pytest.raises(ModelError, match="half-way"):
        resolve_model_source(s3_model, endpoint=s3_bucket.endpoint)
    assert list(cache.rglob("config.json")) == []
    monkeypatch.setattr(S3Storage, "download_file", real)
    assert resolve_model_source(s3_model, endpoint=s3_bucket.endpoint)  # the next attempt completes it


@pytest.mark.parametrize(
    "prefix, message",
    [("models/none", "nothing under"), ("models/not-a-model", "is not a model folder (no config.json under it)")],
)
def test_a_wrong_s3_model_uri_names_the_field_and_the_uri(s3_bucket, cache, prefix, message):
    open_storage(s3_bucket.uri("models/not-a-model"), endpoint=s3_bucket.endpoint).write_bytes("README.md", b"hi")
    uri = s3_bucket.uri(prefix)
    with pytest.raises(ModelError) as err:
        resolve_model_source(uri, endpoint=s3_bucket.endpoint)
    assert str(err.value).startswith("spec.model.name: ") and message in str(err.value)
    assert uri.removeprefix("s3://").split("/")[0] in str(err.value)
    assert s3_bucket.secret not in str(err.value)
