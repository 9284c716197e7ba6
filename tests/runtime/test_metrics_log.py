"""Metrics as segments: appends never rewrite the history, readers get one stream (local and S3)."""

from __future__ import annotations

import json

import pytest

from grpo_runtime import metrics_log
from grpo_runtime.metrics_log import MetricsLog, read_metrics, segment_key
from grpo_runtime.storage import open_storage


@pytest.fixture
def storage(any_storage):
    return any_storage


class RecordingStorage:
    """Passes calls through to a real storage and records every write (key, bytes)."""

    def __init__(self, inner):
        self.inner, self.writes = inner, []

    def write_bytes(self, key, data):
        self.writes.append((key, data))
        self.inner.write_bytes(key, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def steps(n, start=1):
    return [{"step": s, "reward": s / 10} for s in range(start, start + n)]


def test_appends_read_back_as_one_stream_in_step_order(storage):
    log = MetricsLog(storage, segment_lines=4)
    for record in steps(10):
        log.append(record)
    assert read_metrics(storage) == steps(10)
    assert storage.list("metrics/") == [segment_key(0), segment_key(1), segment_key(2)]


def test_a_step_rewrites_only_its_open_segment_never_the_history(storage):
    recording = RecordingStorage(storage)
    log = MetricsLog(recording, segment_lines=5)
    for record in steps(40):
        log.append(record)
    # 40 steps: each write holds at most 5 lines, and each segment is written 5 times, then never again
    assert max(data.count(b"\n") for _, data in recording.writes) == 5
    per_key = {}
    for key, _ in recording.writes:
        per_key[key] = per_key.get(key, 0) + 1
    assert per_key == {segment_key(i): 5 for i in range(8)}
    last_write_of = {key: i for i, (key, _) in enumerate(recording.writes)}
    first_write_of = {}
    for i, (key, _) in enumerate(recording.writes):
        first_write_of.setdefault(key, i)
    for i in range(7):  # segment i is finished before segment i+1 is started
        assert last_write_of[segment_key(i)] < first_write_of[segment_key(i + 1)]


def test_a_new_writer_continues_the_open_segment(storage):
    first = MetricsLog(storage, segment_lines=4)
    for record in steps(6):
        first.append(record)
    second = MetricsLog(storage, segment_lines=4)  # e.g. the pod after a restart
    for record in steps(3, start=7):
        second.append(record)
    assert read_metrics(storage) == steps(9)
    assert storage.list("metrics/") == [segment_key(0), segment_key(1), segment_key(2)]


@pytest.mark.parametrize("keep", [0, 3, 4, 5, 9, 12])
def test_truncate_after_drops_later_steps_and_appending_continues(storage, keep):
    log = MetricsLog(storage, segment_lines=4)
    for record in steps(12):
        log.append(record)
    log.truncate_after(keep)
    assert read_metrics(storage) == steps(keep)
    for record in steps(12 - keep, start=keep + 1):  # the resumed run redoes them
        log.append(record)
    assert read_metrics(storage) == steps(12)


def test_a_legacy_metrics_jsonl_is_the_head_of_the_stream(storage):
    storage.write_bytes(metrics_log.LEGACY, "".join(json.dumps(r) + "\n" for r in steps(3)).encode())
    log = MetricsLog(storage, segment_lines=2)
    for record in steps(3, start=4):
        log.append(record)
    assert read_metrics(storage) == steps(6)
    log.truncate_after(2)
    assert read_metrics(storage) == steps(2)
    assert storage.list("metrics/") == []


def test_no_metrics_is_an_empty_stream(storage):
    assert read_metrics(storage) == []
    MetricsLog(storage).truncate_after(0)
    assert read_metrics(storage) == []


def test_grpo_report_plots_the_whole_stream_across_segments(tmp_path, capsys):
    from grpo_runtime.report import write_report

    storage = open_storage(str(tmp_path / "run"))
    log = MetricsLog(storage, segment_lines=2)
    for record in steps(5):
        log.append({**record, "reward_std": 0.1, "rewards/correct/mean": record["reward"]})
    assert write_report(str(tmp_path / "run"), str(tmp_path / "r.png")) == 0
    assert "5 steps, reward 0.100 -> 0.500" in capsys.readouterr().out
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
