"""Shared pytest fixtures. Each block is self-contained; add new ones below their own header."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# ---------------------------------------------------------------- S3 (moto server over HTTP)

S3_TEST_SECRET = "test-secret-key-do-not-leak-0123456789"


@dataclass(frozen=True)
class S3Bucket:
    endpoint: str  # http://127.0.0.1:<port>, a real HTTP S3 endpoint (moto)
    name: str  # a fresh, empty bucket
    secret: str  # the AWS_SECRET_ACCESS_KEY value set for the test

    def uri(self, prefix: str = "job") -> str:
        return f"s3://{self.name}/{prefix}" if prefix else f"s3://{self.name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (random free port) for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh bucket on the moto server, with dummy AWS credentials in the environment."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return S3Bucket(endpoint=s3_server, name=name, secret=S3_TEST_SECRET)


# ---------------------------------------------------- GCS (gcp-storage-emulator, from PyPI) and Azure (Azurite)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen | None = None, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the emulator exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f}s")


@dataclass(frozen=True)
class ObjectStoreBucket:
    scheme: str  # gs or az
    name: str  # a fresh, empty bucket / container
    endpoint: str | None  # what spec.output.endpoint would say (GCS emulator); None for Azure
    secret: str  # a credential value set in the environment for the test

    def uri(self, prefix: str = "job") -> str:
        return f"{self.scheme}://{self.name}/{prefix}" if prefix else f"{self.scheme}://{self.name}"


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """gcp-storage-emulator (PyPI) on 127.0.0.1, in memory; yields its endpoint URL."""
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    _wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server: str, monkeypatch: pytest.MonkeyPatch) -> ObjectStoreBucket:
    """A fresh bucket on the GCS emulator; gcsfs finds the emulator through STORAGE_EMULATOR_HOST."""
    import requests

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    name = f"test-{uuid.uuid4().hex[:12]}"
    requests.post(f"{gcs_server}/storage/v1/b", params={"project": "test"}, json={"name": name}, timeout=10).raise_for_status()
    return ObjectStoreBucket("gs", name, gcs_server, secret="no-secret-with-the-emulator")


AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented, public development key (not a secret); used to prove keys are scrubbed.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Iterator[str]:
    """Azurite's blob service (npm, pinned in tests/tools/fetch_k8s_binaries.py) on 127.0.0.1;
    yields the connection string."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
    try:
        from fetch_k8s_binaries import fetch_azurite
    finally:
        sys.path.pop(0)
    blob = fetch_azurite()
    port = _free_port()
    process = subprocess.Popen(
        [str(blob), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(tmp_path_factory.mktemp("azurite")),
         "--silent", "--skipApiVersionCheck", "--loose"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, process)
        yield (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};")
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def azure_container(azurite: str, monkeypatch: pytest.MonkeyPatch) -> ObjectStoreBucket:
    """A fresh container on Azurite, with its connection string in the environment (as the pod gets it)."""
    from azure.storage.blob import BlobServiceClient

    for name in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite)
    name = f"test-{uuid.uuid4().hex[:12]}"
    BlobServiceClient.from_connection_string(azurite).create_container(name)
    return ObjectStoreBucket("az", name, None, secret=AZURITE_KEY)


class FlakyProxy:
    """A double of a flaky network path: an HTTP proxy on loopback that answers the first
    `failures` requests with 503 and forwards the rest, unchanged, to `upstream`."""

    def __init__(self, upstream: str, failures: int):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        proxy = self
        self.failures, self.seen = failures, []

        class Handler(BaseHTTPRequestHandler):
            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen.append((self.command, self.path))
                if len(proxy.seen) <= proxy.failures:
                    self.send_response(503, "Service Unavailable")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _relay

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
