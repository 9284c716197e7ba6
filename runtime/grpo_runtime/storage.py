"""Where a job's outputs live: a local directory, s3://bucket/prefix (boto3), gs://bucket/prefix
(gcsfs) or az://container/prefix (adlfs; abfs:// too), behind one interface.

Keys are relative, "/"-separated paths such as "checkpoints/step-5/adapter_model.safetensors".
`list` and `delete_prefix` take a plain string prefix, as S3 does: pass a trailing "/" to
mean a directory ("checkpoints/step-1/" does not match "checkpoints/step-10/...").

Every object write is atomic: a reader sees the old content or the new, never half a file
(local: temp file + os.replace; S3: a PUT or a completed multipart upload is all or nothing;
GCS: an upload, simple or resumable, makes the object only when it completes; Azure: a blob
appears when its block list is committed). Local downloads go to a temp file, then os.replace.
The checkpoint protocol in `checkpoints.py` is built on that guarantee.

Errors surface as StorageError, whose message names the URI, what was being done and the
cause. It never carries credentials: secrets from the environment are scrubbed from it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from grpo_runtime.messages import typed_first_line

T = TypeVar("T")

MiB = 1024 * 1024
_TMP_PREFIX = ".tmp-"  # local temp files; never listed
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CLIENT_SECRET",
    "HF_TOKEN",
)
FSSPEC_SCHEMES = {"gs": "gcs", "az": "az", "abfs": "az"}  # URI scheme -> fsspec protocol


class StorageError(RuntimeError):
    """A storage operation failed. The message names the URI and the cause, never a secret."""

    def __init__(self, message: str):
        super().__init__(_scrub(message))


def _scrub(text: str) -> str:
    """Remove credential values (from the environment, or user:pass@ in URLs) from `text`."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    text = re.sub(r"(AccountKey|SharedAccessSignature|sig)=[^;&\s]+", r"\1=***", text)
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


@runtime_checkable
class Storage(Protocol):
    uri: str

    def check(self) -> None:
        """Fail fast (StorageError) if the location cannot be reached, read and written."""

    def write_bytes(self, key: str, data: bytes) -> None: ...
    def read_bytes(self, key: str) -> bytes:
        """Raises StorageError naming the URI and key when the key is missing."""

    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]:
        """Full keys starting with `prefix`, sorted."""

    def delete(self, key: str) -> None:
        """Delete one key; a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> None: ...
    def upload_file(self, local_path: str | Path, key: str) -> None: ...
    def download_file(self, key: str, local_path: str | Path) -> None: ...
    def upload_dir(self, local_dir: str | Path, prefix: str) -> None: ...
    def download_dir(self, prefix: str, local_dir: str | Path) -> None:
        """Raises StorageError when nothing is under `prefix` (a wrong name, nearly always)."""


def open_storage(
    uri: str,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    multipart_threshold: int = 64 * MiB,
    multipart_chunksize: int = 16 * MiB,
    max_attempts: int = 5,
) -> Storage:
    """Storage for `uri`: "s3://bucket/prefix", "gs://bucket/prefix", "az://container/prefix",
    "file:///dir" or a plain directory path.

    `endpoint`: S3-compatible stores (MinIO, Ceph, R2...) or a GCS endpoint (an emulator);
    `region` and `max_attempts` (botocore's per-request retry budget) apply to S3 only.
    """
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"{uri}: an s3 URI needs a bucket: s3://bucket/prefix")
        return S3Storage(
            bucket,
            prefix,
            endpoint=endpoint,
            region=region,
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_attempts=max_attempts,
        )
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme in FSSPEC_SCHEMES:
        return FsspecStorage(uri, endpoint=endpoint)
    if uri.startswith("file://"):
        return LocalStorage(uri.removeprefix("file://"))
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        raise StorageError(
            f"{uri}: unsupported storage scheme (use a directory, s3://bucket/prefix, gs://bucket/prefix "
            "or az://container/prefix)"
        )
    return LocalStorage(uri)


def _check_key(key: str, *, prefix: bool = False) -> str:
    """A key is a relative "/"-path without "." or ".." parts; a prefix may be "" or end in "/"."""
    body = key[:-1] if prefix and key.endswith("/") else key
    if prefix and body == "":
        return key
    parts = body.split("/")
    if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}: use a relative path like 'checkpoints/step-1/x'")
    return key


def _dir_prefix(prefix: str) -> str:
    """A directory prefix: "" stays "", anything else ends with "/"."""
    return prefix if prefix == "" or prefix.endswith("/") else prefix + "/"


def _files_under(local_dir: Path) -> list[tuple[Path, str]]:
    """(path, relative posix key) of every file under `local_dir`, sorted by key."""
    if not local_dir.is_dir():
        raise StorageError(f"{local_dir}: not a directory")
    files = [(p, p.relative_to(local_dir).as_posix()) for p in local_dir.rglob("*") if p.is_file()]
    return sorted(files, key=lambda item: item[1])


class _DirectoryTransfers:
    """upload_dir / download_dir of every store, file by file through its own upload_file, list and
    download_file."""

    def upload_dir(self, local_dir: str | Path, prefix: str) -> None:
        prefix = _dir_prefix(_check_key(prefix, prefix=True))
        for path, rel in _files_under(Path(local_dir)):
            self.upload_file(path, prefix + rel)

    def download_dir(self, prefix: str, local_dir: str | Path) -> None:
        prefix = _dir_prefix(_check_key(prefix, prefix=True))
        keys = self.list(prefix)
        if not keys:
            raise StorageError(f"{self.uri}: nothing under {prefix!r} to download")
        for key in keys:
            self.download_file(key, Path(local_dir) / key[len(prefix) :])


class LocalStorage(_DirectoryTransfers):
    """A directory on the local filesystem; writes go to a temp file, then os.replace."""

    def __init__(self, root: str | Path):
        self.root = Path(os.path.abspath(os.path.expanduser(str(root))))
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _atomic_write(self, path: Path, write: Callable[[int], None]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
        try:
            write(fd)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            Path(tmp).unlink(missing_ok=True)
            raise

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{_TMP_PREFIX}check"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"{self.uri}: directory is not writable: {exc.strerror or exc}") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        def write(fd: int) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

        self._os_call(f"write {key!r}", lambda: self._atomic_write(self._path(key), write))

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"{self.uri}: cannot read {key!r}: no such key") from exc
        except OSError as exc:
            raise StorageError(f"{self.uri}: cannot read {key!r}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        _check_key(prefix, prefix=True)
        base = self.root / prefix.rpartition("/")[0]
        keys = []
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._os_call(f"delete {key!r}", lambda: self._path(key).unlink(missing_ok=True))

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)
        base = self.root / prefix.rpartition("/")[0]
        if prefix.endswith("/") and base.is_dir() and base != self.root:
            # drop the now-empty directories (and stray temp files) below a directory prefix
            shutil.rmtree(base, ignore_errors=True)

    def upload_file(self, local_path: str | Path, key: str) -> None:
        def copy(fd: int) -> None:
            with open(local_path, "rb") as src, os.fdopen(os.dup(fd), "wb") as dst:
                shutil.copyfileobj(src, dst, 4 * MiB)

        self._os_call(f"upload {str(local_path)!r} to {key!r}", lambda: self._atomic_write(self._path(key), copy))

    def download_file(self, key: str, local_path: str | Path) -> None:
        if not self.exists(key):
            raise StorageError(f"{self.uri}: cannot download {key!r}: no such key")

        def copy(fd: int) -> None:
            with open(self._path(key), "rb") as src, os.fdopen(os.dup(fd), "wb") as dst:
                shutil.copyfileobj(src, dst, 4 * MiB)

        self._os_call(f"download {key!r}", lambda: self._atomic_write(Path(local_path), copy))

    def _os_call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except OSError as exc:
            raise StorageError(f"{self.uri}: cannot {action}: {exc.strerror or exc}") from exc

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"


# ---------------------------------------------------------------------------------------- S3

# Error codes botocore or our outer retry treat as worth another try.
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "500",
    "502",
    "503",
    "504",
}


class S3Storage(_DirectoryTransfers):
    """s3://bucket/prefix through boto3: default credential chain, endpoint override, multipart.

    Retries: botocore's "standard" mode retries each request (connection errors, 5xx,
    throttling) with jittered backoff; on top, whole transfers (upload_file, download_file)
    are retried, since s3transfer aborts a multipart upload when one part fails for good.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_attempts: int = 5,
        transfer_attempts: int = 3,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = _dir_prefix(prefix.strip("/"))
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint = endpoint
        self.transfer_attempts = transfer_attempts
        config = Config(
            region_name=region,
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=10,
            read_timeout=120,
            # Third-party S3 (MinIO, Ceph, R2) wants path-style URLs and may reject the
            # default CRC checksums newer botocore sends; ask for them only when required.
            s3={"addressing_style": "path" if endpoint else "auto"},
            request_checksum_calculation="when_required" if endpoint else "when_supported",
            response_checksum_validation="when_required" if endpoint else "when_supported",
        )
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            use_threads=True,
            max_concurrency=4,
        )

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _call(self, action: str, fn: Callable[[], T], *, attempts: int = 1) -> T:
        """Run `fn`, retrying transient failures `attempts` times; raise StorageError."""
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                if attempt < attempts and _is_transient(exc):
                    time.sleep(min(2.0 ** (attempt - 1), 10.0))
                    continue
                raise StorageError(f"{self.uri}: cannot {action}: {self._cause(exc)}") from exc
        raise AssertionError("unreachable")

    def _cause(self, exc: BaseException) -> str:
        from botocore.exceptions import (
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = self.endpoint or "the S3 endpoint"
        if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
            return f"cannot reach {where} ({exc})"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        code, message = _client_error(exc)
        if code is None:
            return f"{type(exc).__name__}: {exc}"
        if code == "NoSuchBucket":
            return f"bucket {self.bucket!r} does not exist"
        if code in ("NoSuchKey", "404", "NotFound"):
            return "no such key"
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return f"access denied to bucket {self.bucket!r} (check the credentials and the bucket policy)"
        if code in ("InvalidAccessKeyId",):
            return "the access key id was rejected (InvalidAccessKeyId)"
        if code in ("SignatureDoesNotMatch",):
            return "the secret access key was rejected (SignatureDoesNotMatch)"
        return f"{code}: {message}"

    def check(self) -> None:
        """HEAD the bucket, then write and delete a probe object under the prefix."""
        self._call("access the bucket", lambda: _head_bucket(self.client, self.bucket))
        probe = self.prefix + ".grpo-write-check"
        self._call("write to the bucket", lambda: self.client.put_object(Bucket=self.bucket, Key=probe, Body=b""))
        self._call("delete from the bucket", lambda: self.client.delete_object(Bucket=self.bucket, Key=probe))

    def write_bytes(self, key: str, data: bytes) -> None:
        k = self._key(key)
        self._call(f"write {key!r}", lambda: self.client.put_object(Bucket=self.bucket, Key=k, Body=data))

    def read_bytes(self, key: str) -> bytes:
        k = self._key(key)
        return self._call(
            f"read {key!r}", lambda: self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read()
        )

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        k = self._key(key)

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=k)
                return True
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return self._call(f"check {key!r}", head)

    def list(self, prefix: str = "") -> list[str]:
        full = self.prefix + _check_key(prefix, prefix=True)

        def list_all() -> list[str]:
            keys = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys += [obj["Key"][len(self.prefix) :] for obj in page.get("Contents", [])]
            return sorted(keys)

        return self._call(f"list {prefix!r}", list_all)

    def delete(self, key: str) -> None:
        k = self._key(key)
        self._call(f"delete {key!r}", lambda: self.client.delete_object(Bucket=self.bucket, Key=k))

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.prefix + k} for k in keys[start : start + 1000]]

            def delete_batch(batch: list[dict[str, str]] = batch) -> None:
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if response.get("Errors"):
                    first = response["Errors"][0]
                    raise RuntimeError(
                        f"{len(response['Errors'])} key(s) not deleted, e.g. {first.get('Key')!r}: "
                        f"{first.get('Code')} {first.get('Message')}"
                    )

            self._call(f"delete under {prefix!r}", delete_batch)

    def upload_file(self, local_path: str | Path, key: str) -> None:
        k = self._key(key)
        self._call(
            f"upload {str(local_path)!r} to {key!r}",
            lambda: self.client.upload_file(str(local_path), self.bucket, k, Config=self.transfer_config),
            attempts=self.transfer_attempts,
        )

    def download_file(self, key: str, local_path: str | Path) -> None:
        k = self._key(key)
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        # s3transfer writes to a temp file and renames it: the local file is never half-written
        self._call(
            f"download {key!r}",
            lambda: self.client.download_file(self.bucket, k, str(local_path), Config=self.transfer_config),
            attempts=self.transfer_attempts,
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r}, endpoint={self.endpoint!r})"


def _head_bucket(client, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        # HEAD responses carry no error body: a 404 here is the bucket, not a key.
        if exc.response.get("Error", {}).get("Code") in ("404", "NotFound", "NoSuchBucket"):
            exc.response["Error"] = {"Code": "NoSuchBucket", "Message": "The specified bucket does not exist"}
        raise


def _client_error(exc: BaseException) -> tuple[str | None, str]:
    """(code, message) of the botocore ClientError in `exc` or its chain, else (None, "")."""
    from botocore.exceptions import ClientError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            error = seen.response.get("Error", {})
            return str(error.get("Code", "")), str(error.get("Message", ""))
        seen = seen.__cause__ or seen.__context__
    return None, ""


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import ReadTimeoutError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BotoConnectionError | ReadTimeoutError | ConnectionError | TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    code, _ = _client_error(exc)
    return code in _TRANSIENT_CODES


# ------------------------------------------------------------------------- GCS and Azure (fsspec)


class FsspecStorage(_DirectoryTransfers):
    """gs://bucket/prefix through gcsfs, az://container/prefix (or abfs://) through adlfs.

    The libraries do the transport: retries of transient errors (gcsfs retries 5xx, 429 and
    dropped connections with backoff; adlfs through azure-core's retry policy), resumable or
    block uploads of large files, paginated listing, batched deletes. This class only maps
    the protocol onto them and turns their errors into StorageError.

    Credentials come from the environment, as each library reads it: GOOGLE_APPLICATION_CREDENTIALS
    (or the node's workload identity) for GCS; AZURE_STORAGE_CONNECTION_STRING, or
    AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY / AZURE_STORAGE_SAS_TOKEN (or a
    service principal) for Azure. STORAGE_EMULATOR_HOST or `endpoint` points gcsfs at an emulator.
    """

    def __init__(self, uri: str, *, endpoint: str | None = None):
        import fsspec

        scheme, _, rest = uri.partition("://")
        bucket, _, prefix = rest.partition("/")
        options: dict = {"skip_instance_cache": True, "use_listings_cache": False}
        if "@" in bucket and scheme in ("az", "abfs"):  # container@account.dfs.core.windows.net
            bucket, _, host = bucket.partition("@")
            options["account_name"] = host.split(".")[0]
        if not bucket:
            raise StorageError(f"{uri}: needs a bucket or container: {scheme}://NAME/prefix")
        protocol = FSSPEC_SCHEMES[scheme]
        if protocol == "gcs" and endpoint:
            options["endpoint_url"] = endpoint
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = _dir_prefix(prefix.strip("/"))
        self.uri = f"{scheme}://{bucket}/{self.prefix}".rstrip("/")
        try:
            self.fs = fsspec.filesystem(protocol, **options)
        except ImportError as exc:
            raise StorageError(f"{self.uri}: the {protocol} client is not installed ({exc})") from None
        except Exception as exc:  # e.g. no Azure account configured
            raise StorageError(f"{self.uri}: cannot set up the {scheme}:// client: {typed_first_line(exc)}") from exc
        self._root = f"{bucket}/{self.prefix}"

    def _path(self, key: str) -> str:
        return self._root + _check_key(key)

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except StorageError:
            raise
        except FileNotFoundError as exc:
            raise StorageError(f"{self.uri}: cannot {action}: no such key (or bucket {self.bucket!r})") from exc
        except PermissionError as exc:
            raise StorageError(
                f"{self.uri}: cannot {action}: access denied to {self.bucket!r} (check the credentials)"
            ) from exc
        except Exception as exc:
            raise StorageError(f"{self.uri}: cannot {action}: {typed_first_line(exc)}") from exc

    def check(self) -> None:
        probe = self._root + ".grpo-write-check"
        self._call("write to the bucket", lambda: self.fs.pipe_file(probe, b""))
        self._call("delete from the bucket", lambda: self.fs.rm_file(probe))

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._call(f"write {key!r}", lambda: self.fs.pipe_file(path, data))

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        return self._call(f"read {key!r}", lambda: self.fs.cat_file(path))

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return self._call(f"check {key!r}", lambda: self.fs.isfile(path))

    def list(self, prefix: str = "") -> list[str]:
        full = self._root + _check_key(prefix, prefix=True)
        base = (self._root + prefix.rpartition("/")[0]).rstrip("/")

        def find() -> list[str]:
            try:
                found = self.fs.find(base)
            except FileNotFoundError:
                return []
            return sorted(p[len(self._root) :] for p in found if p.startswith(full) and p != base)

        return self._call(f"list {prefix!r}", find)

    def delete(self, key: str) -> None:
        path = self._path(key)

        def rm() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass

        self._call(f"delete {key!r}", rm)

    def delete_prefix(self, prefix: str) -> None:
        paths = [self._root + key for key in self.list(prefix)]
        if paths:
            self._call(f"delete under {prefix!r}", lambda: self.fs.rm(paths))

    def upload_file(self, local_path: str | Path, key: str) -> None:
        path = self._path(key)
        self._call(f"upload {str(local_path)!r} to {key!r}", lambda: self.fs.put_file(str(local_path), path))

    def download_file(self, key: str, local_path: str | Path) -> None:
        path, target = self._path(key), Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
        os.close(fd)
        try:
            self._call(f"download {key!r}", lambda: self.fs.get_file(path, tmp))
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"FsspecStorage({self.uri!r}, endpoint={self.endpoint!r})"

