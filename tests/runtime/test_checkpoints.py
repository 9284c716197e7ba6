"""The checkpoint protocol: LATEST names only complete checkpoints, whatever fails when."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from grpo_runtime.checkpoints import fetch_checkpoint, latest_checkpoint, publish_checkpoint
from grpo_runtime.storage import StorageError


@pytest.fixture
def storage(any_storage):
    return any_storage


def make_checkpoint(root: Path, step: int) -> Path:
    """What a trainer leaves in a local dir: a PEFT adapter and its trainer state."""
    d = root / f"local-step-{step}"
    (d / "trainer_state").mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "step": step}))
    (d / "adapter_model.safetensors").write_bytes(bytes([step % 256]) * (1000 + step))
    (d / "trainer_state" / "optimizer.pt").write_bytes(b"opt" * step)
    (d / "trainer_state" / "state.json").write_text(json.dumps({"step": step, "cursor": step * 8}))
    return d


def step_dirs(storage) -> list[str]:
    return sorted({k.split("/")[1] for k in storage.list("checkpoints/") if k.count("/") >= 2})


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def assert_same_tree(a: Path, b: Path) -> None:
    assert tree(a) == tree(b)


def test_publish_then_fetch_roundtrips(storage, tmp_path):
    src = make_checkpoint(tmp_path, 5)
    assert latest_checkpoint(storage) is None
    assert publish_checkpoint(storage, src, step=5, keep=3) == "checkpoints/step-5"
    assert storage.read_bytes("checkpoints/LATEST").decode().strip() == "step-5"
    manifest = json.loads(storage.read_bytes("checkpoints/step-5/MANIFEST.json"))
    assert [f["path"] for f in manifest["files"]] == [
        "adapter_config.json", "adapter_model.safetensors", "trainer_state/optimizer.pt", "trainer_state/state.json"]
    assert manifest["files"][1]["size"] == 1005 and len(manifest["files"][1]["sha256"]) == 64
    assert latest_checkpoint(storage) == 5
    out = fetch_checkpoint(storage, 5, tmp_path / "restored")
    assert out == tmp_path / "restored"
    assert_same_tree(src, out)


@pytest.mark.parametrize("fail_at", ["2nd file upload", "manifest write", "LATEST write"])
def test_failure_mid_publish_keeps_the_previous_checkpoint(storage, tmp_path, monkeypatch, fail_at):
    publish_checkpoint(storage, make_checkpoint(tmp_path, 2), step=2, keep=3)
    uploads = []
    real_upload, real_write = storage.upload_file, storage.write_bytes

    def upload_file(local_path, key):
        uploads.append(key)
        if fail_at == "2nd file upload" and key.startswith("checkpoints/step-4/") and len(uploads) == 2:
            raise ConnectionResetError("network died")
        return real_upload(local_path, key)

    def write_bytes(key, data):
        if (fail_at, key) in {("manifest write", "checkpoints/step-4/MANIFEST.json"),
                              ("LATEST write", "checkpoints/LATEST")}:
            raise StorageError(f"{storage.uri}: cannot write {key!r}: pod evicted")
        return real_write(key, data)

    monkeypatch.setattr(storage, "upload_file", upload_file)
    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    with pytest.raises((ConnectionResetError, StorageError)):
        publish_checkpoint(storage, make_checkpoint(tmp_path, 4), step=4, keep=3)
    monkeypatch.undo()
    if fail_at == "2nd file upload":
        assert storage.list("checkpoints/step-4/") == ["checkpoints/step-4/adapter_config.json"]

    assert storage.read_bytes("checkpoints/LATEST").decode().strip() == "step-2"
    assert latest_checkpoint(storage) == 2
    assert_same_tree(make_checkpoint(tmp_path / "again", 2), fetch_checkpoint(storage, 2, tmp_path / "r2"))
    if fail_at != "LATEST write":
        with pytest.raises(StorageError, match="step-4 is missing or incomplete"):
            fetch_checkpoint(storage, 4, tmp_path / "r4")

    # the retry of the same step, or the next one, publishes normally
    publish_checkpoint(storage, make_checkpoint(tmp_path / "retry", 4), step=4, keep=3)
    assert latest_checkpoint(storage) == 4
    assert_same_tree(make_checkpoint(tmp_path / "expect", 4), fetch_checkpoint(storage, 4, tmp_path / "r4b"))
    assert step_dirs(storage) == ["step-2", "step-4"]


def test_keep_prunes_all_but_the_newest(storage, tmp_path):
    for step in (1, 2, 3, 4, 5):
        publish_checkpoint(storage, make_checkpoint(tmp_path, step), step=step, keep=2)
    assert step_dirs(storage) == ["step-4", "step-5"]
    assert latest_checkpoint(storage) == 5
    assert_same_tree(make_checkpoint(tmp_path / "x", 4), fetch_checkpoint(storage, 4, tmp_path / "r4"))


def test_partial_uploads_are_pruned_and_never_count(storage, tmp_path):
    publish_checkpoint(storage, make_checkpoint(tmp_path, 2), step=2, keep=5)
    storage.write_bytes("checkpoints/step-3/adapter_model.safetensors", b"half")  # a crash mid-upload
    assert latest_checkpoint(storage) == 2
    publish_checkpoint(storage, make_checkpoint(tmp_path, 4), step=4, keep=5)
    assert step_dirs(storage) == ["step-2", "step-4"]


def test_latest_pointing_at_an_incomplete_checkpoint_falls_back(storage, tmp_path, caplog):
    publish_checkpoint(storage, make_checkpoint(tmp_path, 2), step=2, keep=3)
    publish_checkpoint(storage, make_checkpoint(tmp_path, 4), step=4, keep=3)
    storage.delete("checkpoints/step-4/trainer_state/optimizer.pt")
    with caplog.at_level(logging.WARNING, logger="grpo_runtime.checkpoints"):
        assert latest_checkpoint(storage) == 2
    assert "step-4" in caplog.text and "using step-2" in caplog.text

    storage.delete_prefix("checkpoints/step-2/")
    assert latest_checkpoint(storage) is None


def test_fetch_detects_a_corrupt_file(storage, tmp_path):
    publish_checkpoint(storage, make_checkpoint(tmp_path, 3), step=3, keep=3)
    storage.write_bytes("checkpoints/step-3/adapter_model.safetensors", b"bitrot")
    with pytest.raises(StorageError, match="adapter_model.safetensors' is corrupt"):
        fetch_checkpoint(storage, 3, tmp_path / "r")


def test_republishing_a_step_drops_files_it_no_longer_has(storage, tmp_path):
    src = make_checkpoint(tmp_path, 6)
    publish_checkpoint(storage, src, step=6, keep=3)
    (src / "trainer_state" / "optimizer.pt").unlink()
    publish_checkpoint(storage, src, step=6, keep=3)
    assert "checkpoints/step-6/trainer_state/optimizer.pt" not in storage.list("checkpoints/step-6/")
    assert_same_tree(src, fetch_checkpoint(storage, 6, tmp_path / "r"))


def test_a_fresh_run_in_the_same_output_drops_the_old_runs_later_checkpoints(storage, tmp_path):
    publish_checkpoint(storage, make_checkpoint(tmp_path, 10), step=10, keep=3)
    publish_checkpoint(storage, make_checkpoint(tmp_path, 2), step=2, keep=3)
    assert step_dirs(storage) == ["step-2"]
    storage.delete("checkpoints/step-2/adapter_config.json")
    assert latest_checkpoint(storage) is None  # never falls back to the old run's step-10


def test_publish_refuses_bad_input(storage, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        publish_checkpoint(storage, tmp_path / "nope", step=1, keep=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        publish_checkpoint(storage, tmp_path / "empty", step=1, keep=1)
    with pytest.raises(ValueError, match="keep"):
        publish_checkpoint(storage, make_checkpoint(tmp_path, 1), step=1, keep=0)
    assert storage.list("") == []
