"""Storage: one behaviour for a local directory, S3 (moto), GCS (gcp-storage-emulator) and Azure (Azurite),
each a real HTTP endpoint on loopback."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from grpo_runtime import storage as storage_mod
from grpo_runtime.storage import LocalStorage, S3Storage, Storage, StorageError, open_storage

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3", "gs", "az"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    if request.param in ("gs", "az"):
        bucket = request.getfixturevalue("gcs_bucket" if request.param == "gs" else "azure_container")
        return open_storage(bucket.uri("jobs/demo"), endpoint=bucket.endpoint)
    bucket = request.getfixturevalue("s3_bucket")
    # 5 MiB: S3's smallest part size, so a 12 MiB file goes up in 3 parts
    return open_storage(
        bucket.uri("jobs/demo"), endpoint=bucket.endpoint, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB
    )


def test_write_read_exists_overwrite(storage):
    assert not storage.exists("spec.yaml")
    storage.write_bytes("spec.yaml", b"kind: GRPOJob\n")
    storage.write_bytes("samples/step-1.jsonl", b"{}\n")
    assert storage.exists("spec.yaml") and storage.exists("samples/step-1.jsonl")
    assert storage.read_bytes("spec.yaml") == b"kind: GRPOJob\n"
    storage.write_bytes("spec.yaml", b"v2")
    assert storage.read_bytes("spec.yaml") == b"v2"
    assert not storage.exists("samples")  # a "directory" is not a key


def test_read_missing_names_uri_and_key(storage):
    with pytest.raises(StorageError) as err:
        storage.read_bytes("checkpoints/LATEST")
    assert storage.uri in str(err.value) and "checkpoints/LATEST" in str(err.value)
    assert "no such key" in str(err.value)


def test_list_is_sorted_full_keys_with_s3_prefix_semantics(storage):
    for key in ["checkpoints/step-10/a", "checkpoints/step-1/b", "checkpoints/step-1/a", "metrics.jsonl"]:
        storage.write_bytes(key, b"x")
    assert storage.list("checkpoints/step-1/") == ["checkpoints/step-1/a", "checkpoints/step-1/b"]
    assert storage.list("checkpoints/step-1") == [
        "checkpoints/step-1/a", "checkpoints/step-1/b", "checkpoints/step-10/a"]
    assert storage.list("") == sorted(["checkpoints/step-10/a", "checkpoints/step-1/b", "checkpoints/step-1/a",
                                       "metrics.jsonl"])
    assert storage.list("nothing/") == []


def test_delete_and_delete_prefix_touch_only_their_keys(storage):
    for key in ["checkpoints/step-1/a", "checkpoints/step-1/sub/b", "checkpoints/step-10/a", "final/x"]:
        storage.write_bytes(key, b"x")
    storage.delete_prefix("checkpoints/step-1/")
    assert storage.list("") == ["checkpoints/step-10/a", "final/x"]
    storage.delete("final/x")
    storage.delete("final/x")  # missing: not an error
    storage.delete_prefix("nothing/")
    assert storage.list("") == ["checkpoints/step-10/a"]


def test_upload_download_file_roundtrip(storage, tmp_path):
    src = tmp_path / "adapter.bin"
    src.write_bytes(bytes(range(256)) * 100)
    storage.upload_file(src, "final/adapter.bin")
    dst = tmp_path / "fresh" / "nested" / "adapter.bin"  # parent dirs are created
    storage.download_file("final/adapter.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    with pytest.raises(StorageError, match="final/missing.bin"):
        storage.download_file("final/missing.bin", tmp_path / "missing.bin")


def test_multipart_upload_roundtrips_byte_identical(storage, tmp_path):
    src = tmp_path / "big.safetensors"
    src.write_bytes(os.urandom(12 * MiB + 123))  # > the 5 MiB threshold: 3 parts on S3
    storage.upload_file(src, "checkpoints/step-1/big.safetensors")
    dst = tmp_path / "big.copy"
    storage.download_file("checkpoints/step-1/big.safetensors", dst)
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    if isinstance(storage, S3Storage):
        key = storage.prefix + "checkpoints/step-1/big.safetensors"
        head = storage.client.head_object(Bucket=storage.bucket, Key=key)
        assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag counts its parts


def test_upload_download_dir_roundtrip(storage, tmp_path):
    src = tmp_path / "ckpt"
    (src / "trainer_state").mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"r": 8}')
    (src / "trainer_state" / "optimizer.pt").write_bytes(b"\x00\x01" * 1000)
    storage.upload_dir(src, "checkpoints/step-3")
    assert storage.list("checkpoints/") == [
        "checkpoints/step-3/adapter_config.json", "checkpoints/step-3/trainer_state/optimizer.pt"]
    dst = tmp_path / "restored"
    storage.download_dir("checkpoints/step-3/", dst)
    assert (dst / "adapter_config.json").read_text() == '{"r": 8}'
    assert (dst / "trainer_state" / "optimizer.pt").read_bytes() == b"\x00\x01" * 1000
    with pytest.raises(StorageError, match="nothing under 'checkpoints/step-4/'"):
        storage.download_dir("checkpoints/step-4", tmp_path / "none")


def test_keys_must_be_relative(storage):
    for bad in ["/etc/passwd", "../escape", "a/../b", "a//b", ""]:
        with pytest.raises(ValueError, match="invalid storage key"):
            storage.write_bytes(bad, b"x")


def test_check_passes_on_a_usable_location(storage):
    storage.check()
    assert storage.list("") == []  # the probe leaves nothing behind


def test_s3_prefixes_are_isolated(s3_bucket):
    a = open_storage(s3_bucket.uri("team/a"), endpoint=s3_bucket.endpoint)
    b = open_storage(s3_bucket.uri("team/ab"), endpoint=s3_bucket.endpoint)
    a.write_bytes("metrics.jsonl", b"a")
    b.write_bytes("metrics.jsonl", b"b")
    assert a.list("") == ["metrics.jsonl"] and a.read_bytes("metrics.jsonl") == b"a"
    a.delete_prefix("")
    assert b.read_bytes("metrics.jsonl") == b"b"


def test_open_storage_parses_uris(tmp_path):
    s3 = open_storage("s3://bucket/some/prefix/", endpoint="http://127.0.0.1:1", region="eu-west-1")
    assert isinstance(s3, S3Storage) and isinstance(s3, Storage)
    assert (s3.bucket, s3.prefix, s3.uri) == ("bucket", "some/prefix/", "s3://bucket/some/prefix")
    assert open_storage("s3://bucket").prefix == ""
    local = open_storage(f"file://{tmp_path}/out")
    assert isinstance(local, LocalStorage) and isinstance(local, Storage) and local.uri == str(tmp_path / "out")
    assert Path(open_storage("relative/dir").uri).is_absolute()
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        open_storage("ftp://bucket/x")


def test_open_storage_parses_gcs_and_azure_uris(monkeypatch):
    from grpo_runtime.storage import FsspecStorage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    gs = open_storage("gs://bucket/some/prefix/")
    assert isinstance(gs, FsspecStorage) and isinstance(gs, Storage)
    assert (gs.bucket, gs.prefix, gs.uri) == ("bucket", "some/prefix/", "gs://bucket/some/prefix")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "DefaultEndpointsProtocol=http;AccountName=a;"
                       "AccountKey=c2VjcmV0;BlobEndpoint=http://127.0.0.1:1/a;")
    for uri in ("az://runs/team/job", "abfs://runs/team/job"):
        az = open_storage(uri)
        assert (az.bucket, az.prefix) == ("runs", "team/job/") and az.uri == uri
    with pytest.raises(StorageError, match="needs a bucket or container"):
        open_storage("gs:///x")


def test_local_write_is_atomic(tmp_path, monkeypatch):
    store = open_storage(str(tmp_path))
    store.write_bytes("checkpoints/LATEST", b"step-2")

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage_mod.os, "replace", crash)
    with pytest.raises(StorageError, match="No space left on device"):
        store.write_bytes("checkpoints/LATEST", b"step-4")
    monkeypatch.undo()
    assert store.read_bytes("checkpoints/LATEST") == b"step-2"
    assert os.listdir(tmp_path / "checkpoints") == ["LATEST"]  # no temp file left behind


# ------------------------------------------------------------------------------- S3 errors


def test_unreachable_endpoint_fails_with_uri_and_cause(s3_bucket):
    store = open_storage("s3://my-bucket/job", endpoint="http://127.0.0.1:1", max_attempts=2)
    with pytest.raises(StorageError) as err:
        store.check()
    message = str(err.value)
    assert "s3://my-bucket/job" in message and "cannot reach http://127.0.0.1:1" in message
    assert s3_bucket.secret not in message


def test_missing_bucket_fails_with_bucket_name(s3_bucket):
    store = open_storage("s3://no-such-bucket-here/job", endpoint=s3_bucket.endpoint)
    for action in (store.check, lambda: store.write_bytes("spec.yaml", b"x")):
        with pytest.raises(StorageError) as err:
            action()
        message = str(err.value)
        assert "s3://no-such-bucket-here/job" in message
        assert "bucket 'no-such-bucket-here' does not exist" in message
        assert s3_bucket.secret not in message


def test_access_denied_and_rejected_secret_are_named_without_the_secret(s3_bucket):
    from botocore.stub import Stubber

    store = open_storage(s3_bucket.uri(), endpoint=s3_bucket.endpoint)
    with Stubber(store.client) as stub:
        stub.add_client_error("head_bucket", service_error_code="403", http_status_code=403)
        with pytest.raises(StorageError, match=f"access denied to bucket '{s3_bucket.name}'"):
            store.check()
        # a server echoing the secret back must not get it into our message
        stub.add_client_error("put_object", service_error_code="SignatureDoesNotMatch", http_status_code=403,
                              service_message=f"signature computed with {s3_bucket.secret}")
        with pytest.raises(StorageError) as err:
            store.write_bytes("x", b"x")
    assert "secret access key was rejected" in str(err.value)
    assert s3_bucket.secret not in str(err.value) and s3_bucket.secret not in repr(err.value)


def test_transfers_retry_transient_errors_but_not_permanent_ones(s3_bucket, tmp_path, monkeypatch):
    from botocore.exceptions import ClientError, EndpointConnectionError

    store = open_storage(s3_bucket.uri(), endpoint=s3_bucket.endpoint)
    monkeypatch.setattr(storage_mod.time, "sleep", lambda s: None)
    real_upload = store.client.upload_file
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise EndpointConnectionError(endpoint_url=s3_bucket.endpoint)
        return real_upload(*args, **kwargs)

    monkeypatch.setattr(store.client, "upload_file", flaky)
    src = tmp_path / "f"
    src.write_bytes(b"data")
    store.upload_file(src, "f")
    assert len(calls) == 2 and store.read_bytes("f") == b"data"

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "denied"}}, "PutObject")
    calls.clear()

    def refused(*args, **kwargs):
        calls.append(1)
        raise denied

    monkeypatch.setattr(store.client, "upload_file", refused)
    with pytest.raises(StorageError, match="access denied"):
        store.upload_file(src, "f")
    assert len(calls) == 1


# --------------------------------------------------------------------------- GCS and Azure errors


def test_missing_gcs_bucket_and_azure_container_are_named(gcs_bucket, azure_container):
    for bucket in (gcs_bucket, azure_container):
        store = open_storage(f"{bucket.scheme}://no-such-bucket-here/job", endpoint=bucket.endpoint)
        with pytest.raises(StorageError) as err:
            store.write_bytes("spec.yaml", b"x")
        message = str(err.value)
        assert message.startswith(f"{bucket.scheme}://no-such-bucket-here/job: cannot write 'spec.yaml'")
        assert bucket.secret not in message


def test_a_rejected_azure_key_fails_without_the_key_in_the_message(azure_container, monkeypatch, azurite):
    wrong_key = "d3Jvbmcta2V5LWRvLW5vdC1sZWFrLTAxMjM0NTY3ODk="
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.replace(azure_container.secret, wrong_key))
    store = open_storage(azure_container.uri())
    with pytest.raises(StorageError) as err:
        store.check()
    assert str(err.value).startswith(azure_container.uri() + ": cannot write to the bucket")
    assert wrong_key not in str(err.value) and wrong_key not in repr(err.value)


def test_scrub_removes_azure_keys_and_signatures_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "sv=2024&sig=abcdEFGH1234")
    text = storage_mod._scrub("AccountKey=s3cr3t==;BlobEndpoint=x; url?sv=2024&sig=abcdEFGH1234 and sig=zzzz9999")
    assert "s3cr3t" not in text and "abcdEFGH1234" not in text and "zzzz9999" not in text


@pytest.mark.parametrize("provider", ["gs", "az"])
def test_gcs_and_azure_clients_retry_transient_errors(provider, request, monkeypatch):
    """Retries are the client library's (gcsfs, azure-core), not ours: two 503s in front of the
    emulator, and the write and the read still succeed."""
    from tests.conftest import FlakyProxy

    bucket = request.getfixturevalue("gcs_bucket" if provider == "gs" else "azure_container")
    if provider == "gs":
        proxy = FlakyProxy(bucket.endpoint, failures=2)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    else:
        connection = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
        upstream = connection.split("BlobEndpoint=")[1].split(";")[0].rsplit("/", 1)[0]
        proxy = FlakyProxy(upstream, failures=2)
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection.replace(upstream, proxy.url))
    try:
        store = open_storage(bucket.uri("jobs/flaky"))
        store.write_bytes("checkpoints/LATEST", b"step-1\n")
        assert store.read_bytes("checkpoints/LATEST") == b"step-1\n"
        assert len(proxy.seen) >= 4  # two refused, then the write and the read went through
    finally:
        proxy.close()
