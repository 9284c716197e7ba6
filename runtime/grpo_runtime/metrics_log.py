"""A run's metrics: one JSON object per step, stored as numbered segments of a few lines each.

    metrics/part-000000.jsonl   steps 1..100
    metrics/part-000001.jsonl   steps 101..200, ...

Object stores cannot append, and rewriting one growing metrics.jsonl at every step moves
O(steps^2) bytes over a run. Here a step rewrites only the open segment (at most
`segment_lines` lines; the write is atomic, so a reader sees whole lines), and a full
segment is never written again: a run moves O(steps) bytes on every store.

`read_metrics` gives the segments back as one stream in step order (`grpo report`, tests,
anyone with the output's URI); `truncate_after` drops the steps a resumed run will redo.
A single `metrics.jsonl` left by an older runtime is read first, as the stream's head.
"""

from __future__ import annotations

import json
import re
from typing import Any

from grpo_runtime.storage import Storage

PREFIX = "metrics/"
LEGACY = "metrics.jsonl"
SEGMENT_LINES = 100
_SEGMENT = re.compile(r"^metrics/part-(\d+)\.jsonl$")


def segment_key(index: int) -> str:
    return f"{PREFIX}part-{index:06d}.jsonl"


def _segments(storage: Storage) -> list[int]:
    found = (_SEGMENT.match(key) for key in storage.list(PREFIX))
    return sorted(int(m.group(1)) for m in found if m)


def _parse(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def _encode(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def read_metrics(storage: Storage) -> list[dict[str, Any]]:
    """Every step's record, oldest first, as one list (legacy metrics.jsonl, then the segments)."""
    records = _parse(storage.read_bytes(LEGACY)) if storage.exists(LEGACY) else []
    for index in _segments(storage):
        records += _parse(storage.read_bytes(segment_key(index)))
    return records


class MetricsLog:
    """Appends step records to `storage` as segments; one writer (the job's trainer) per output."""

    def __init__(self, storage: Storage, segment_lines: int = SEGMENT_LINES):
        if segment_lines < 1:
            raise ValueError("segment_lines must be >= 1")
        self.storage = storage
        self.segment_lines = segment_lines
        self._index: int | None = None  # the open segment; None until first used
        self._open: list[dict[str, Any]] = []

    def _load_open_segment(self) -> None:
        indexes = _segments(self.storage)
        if not indexes:
            self._index, self._open = 0, []
            return
        self._index = indexes[-1]
        self._open = _parse(self.storage.read_bytes(segment_key(self._index)))

    def append(self, record: dict[str, Any]) -> None:
        """Add one record; rewrites at most `segment_lines` lines, never the history."""
        if self._index is None:
            self._load_open_segment()
        assert self._index is not None
        if len(self._open) >= self.segment_lines:
            self._index, self._open = self._index + 1, []
        self._open.append(dict(record))  # as it is now: the caller's dict may grow (the step's checkpoint) after
        self.storage.write_bytes(segment_key(self._index), _encode(self._open))

    def truncate_after(self, step: int) -> None:
        """Drop records whose "step" is greater than `step` (what a run resumed at `step` redoes).

        Walks back from the newest segment: whole segments past `step` are deleted, the one
        that straddles it is rewritten once. A legacy metrics.jsonl is rewritten if it must be.
        """
        for index in reversed(_segments(self.storage)):
            key = segment_key(index)
            records = _parse(self.storage.read_bytes(key))
            kept = [r for r in records if r["step"] <= step]
            if not kept:
                self.storage.delete(key)
                continue
            if len(kept) < len(records):
                self.storage.write_bytes(key, _encode(kept))
            break
        if self.storage.exists(LEGACY):
            records = _parse(self.storage.read_bytes(LEGACY))
            kept = [r for r in records if r["step"] <= step]
            if len(kept) < len(records):
                self.storage.write_bytes(LEGACY, _encode(kept))
        self._index = None  # re-read on the next append
