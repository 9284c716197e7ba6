"""The checkpoint protocol: how a job survives a pod restart without trusting half a write.

Layout under the job's output:

    checkpoints/step-N/...             whatever the trainer saved locally (PEFT adapter, trainer state)
    checkpoints/step-N/MANIFEST.json   file list with sizes and sha256, written after every file
    checkpoints/LATEST                 "step-N", written after the manifest: the commit point

A checkpoint is complete when its manifest exists and every file it lists is present; each
object write is atomic (see storage.py), so presence means whole content. LATEST only ever
names a complete checkpoint at the moment it is written. If anything fails mid-publish, LATEST
still names the previous checkpoint and the partial step-N has no manifest, so nothing counts
it. fetch_checkpoint verifies sizes and hashes on the way down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from grpo_runtime.storage import Storage, StorageError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ROOT = CHECKPOINTS + "/"
LATEST = ROOT + "LATEST"
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    sha256: str


def checkpoint_prefix(step: int) -> str:
    return f"{ROOT}step-{step}/"


def publish_checkpoint(storage: Storage, local_dir: str | Path, step: int, keep: int) -> str:
    """Upload `local_dir` as checkpoint `step`, commit it via LATEST, prune old ones.

    Order: drop any stale manifest of step-N, upload every file, drop leftovers from an
    earlier attempt, write the manifest, write LATEST, then delete checkpoints beyond the
    newest `keep` (and any not on the line LATEST leads to). Returns the checkpoint's key
    prefix without the trailing slash, "checkpoints/step-N" (what status.latestCheckpoint shows).
    """
    if step < 0 or keep < 1:
        raise ValueError(f"step must be >= 0 and keep >= 1, got step={step}, keep={keep}")
    local_dir = Path(local_dir)
    entries = _describe(local_dir)
    prefix = checkpoint_prefix(step)

    storage.delete(prefix + MANIFEST)  # a re-publish of step-N is incomplete until it ends
    for entry in entries:
        storage.upload_file(local_dir / entry.path, prefix + entry.path)
    wanted = {prefix + e.path for e in entries}
    for stale in storage.list(prefix):
        if stale not in wanted:
            storage.delete(stale)
    manifest = {"step": step, "files": [vars(e) for e in entries]}
    storage.write_bytes(prefix + MANIFEST, json.dumps(manifest, indent=1).encode())
    storage.write_bytes(LATEST, f"step-{step}\n".encode())
    log.info("checkpoint step-%d published to %s/%s", step, storage.uri, prefix)
    _prune(storage, step, keep)
    return prefix.removesuffix("/")


def latest_checkpoint(storage: Storage) -> int | None:
    """The step LATEST names, if that checkpoint is complete; None when nothing was committed.

    If LATEST names a missing or incomplete checkpoint (deleted by hand, or a re-publish of
    that step was interrupted), fall back to the newest complete one, with a warning.
    """
    if not storage.exists(LATEST):
        return None
    text = storage.read_bytes(LATEST).decode(errors="replace").strip()
    match = _STEP_DIR.match(text)
    if match and _is_complete(storage, int(match.group(1))):
        return int(match.group(1))
    fallback = next((s for s in sorted(_steps(storage), reverse=True) if _is_complete(storage, s)), None)
    log.warning(
        "%s/%s names %r, which is not a complete checkpoint; using %s instead",
        storage.uri,
        LATEST,
        text,
        f"step-{fallback}" if fallback is not None else "none (starting fresh)",
    )
    return fallback


def fetch_checkpoint(storage: Storage, step: int, local_dir: str | Path) -> Path:
    """Download the files of complete checkpoint `step` into `local_dir`, verifying each
    file's size and sha256 against the manifest. Returns `local_dir`."""
    local_dir = Path(local_dir)
    entries = _read_manifest(storage, step)
    if entries is None:
        raise StorageError(f"{storage.uri}: checkpoint step-{step} is missing or incomplete (no {MANIFEST})")
    prefix = checkpoint_prefix(step)
    for entry in entries:
        target = local_dir / entry.path
        storage.download_file(prefix + entry.path, target)
        size, digest = _size_and_sha256(target)
        if (size, digest) != (entry.size, entry.sha256):
            raise StorageError(
                f"{storage.uri}: checkpoint step-{step} file {entry.path!r} is corrupt: "
                f"expected {entry.size} bytes sha256 {entry.sha256[:12]}, got {size} bytes sha256 {digest[:12]}"
            )
    return local_dir


def _describe(local_dir: Path) -> list[ManifestEntry]:
    if not local_dir.is_dir():
        raise ValueError(f"checkpoint directory {local_dir} does not exist")
    entries = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        if rel == MANIFEST:
            raise ValueError(f"{local_dir}: {MANIFEST} is reserved for the checkpoint manifest")
        entries.append(ManifestEntry(rel, *_size_and_sha256(path)))
    if not entries:
        raise ValueError(f"checkpoint directory {local_dir} is empty")
    return entries


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _read_manifest(storage: Storage, step: int) -> list[ManifestEntry] | None:
    key = checkpoint_prefix(step) + MANIFEST
    if not storage.exists(key):
        return None
    try:
        document = json.loads(storage.read_bytes(key))
        return [ManifestEntry(f["path"], int(f["size"]), f["sha256"]) for f in document["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s/%s is unreadable (%s); treating step-%d as incomplete", storage.uri, key, exc, step)
        return None


def _is_complete(storage: Storage, step: int) -> bool:
    entries = _read_manifest(storage, step)
    if entries is None:
        return False
    prefix = checkpoint_prefix(step)
    present = set(storage.list(prefix))
    return all(prefix + e.path in present for e in entries)


def _steps(storage: Storage) -> set[int]:
    """Steps that have a checkpoints/step-N/ directory, complete or not."""
    steps = set()
    for key in storage.list(ROOT):
        match = _STEP_DIR.match(key[len(ROOT) :].split("/")[0])
        if match and "/" in key[len(ROOT) :]:
            steps.add(int(match.group(1)))
    return steps


def _prune(storage: Storage, latest: int, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints up to `latest` (always `latest` itself).

    Deleted: older complete ones beyond `keep`, older partial uploads, and any step after
    `latest` (left by a run whose line LATEST no longer leads to, e.g. before a resume from
    an older checkpoint or a fresh start in the same output). The manifest goes first, so a
    crash mid-prune leaves an incomplete directory, never a complete-looking one.
    """
    kept = 0
    for step in sorted(_steps(storage) | {latest}, reverse=True):
        if step == latest:
            kept += 1
            continue
        if step < latest and kept < keep and _is_complete(storage, step):
            kept += 1
            continue
        prefix = checkpoint_prefix(step)
        storage.delete(prefix + MANIFEST)
        storage.delete_prefix(prefix)
        log.info("checkpoint step-%d deleted from %s (keep=%d)", step, storage.uri, keep)
