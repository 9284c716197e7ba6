"""Prompt datasets: files (local or s3), hub datasets (hf://), the built-in arithmetic set, and a resumable sampler."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo_runtime.messages import first_line
from grpo_runtime.spec import HUB_DATASET_SCHEME, DatasetSpec


def is_conversational(prompt: Any) -> bool:
    """TRL's conversational format: the prompt is a list of chat messages ({"role": ..., "content": ...})."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m for m in prompt)


class DatasetError(Exception):
    """A dataset that cannot be used; the message names spec.dataset.* and the cause."""


# Word problems whose answer a small model can compute in a line or two; the RL signal needs
# some groups where a few of the completions are right.
_TEMPLATES = (
    ("{name} has {a} {item}. {pronoun} buys {b} more. How many {item} does {name} have now?", lambda a, b: a + b),
    ("{name} had {a} {item} and gave {b} to a friend. How many {item} are left?", lambda a, b: a - b),
    ("{name} packs {b} boxes with {a} {item} in each box. How many {item} are there in total?", lambda a, b: a * b),
    ("A shop sells {item} for {a} dollars each. How much do {b} {item} cost in dollars?", lambda a, b: a * b),
    ("{name} reads {a} pages on Monday and {b} pages on Tuesday. How many pages is that in total?", lambda a, b: a + b),
)
_NAMES = (("Tom", "He"), ("Anna", "She"), ("Ravi", "He"), ("Mei", "She"), ("Lucas", "He"), ("Sara", "She"))
_ITEMS = ("apples", "pencils", "marbles", "cookies", "stickers", "books")


def arithmetic_problems(count: int = 2000, seed: int = 1234) -> list[dict[str, Any]]:
    """Deterministic arithmetic word problems with integer answers (no download)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        template, solve = rng.choice(_TEMPLATES)
        name, pronoun = rng.choice(_NAMES)
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        if solve(a, b) < 0:
            a, b = b, a
        question = template.format(name=name, pronoun=pronoun, item=rng.choice(_ITEMS), a=a, b=b)
        rows.append({"prompt": question, "answer": str(solve(a, b))})
    return rows


BUILTIN_DATASETS = {"arithmetic": arithmetic_problems}


def _parse_rows(name: str, suffix: str, data: bytes, field: str) -> list[dict[str, Any]]:
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(data.decode().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{field}: {name} line {number} is not JSON ({exc.msg})") from None
        return rows
    if suffix == ".json":
        try:
            loaded = json.loads(data)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{field}: {name} is not JSON ({exc.msg})") from None
        return loaded if isinstance(loaded, list) else loaded.get("data", loaded.get("rows", []))
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(data)).to_pylist()
    except Exception as exc:
        raise DatasetError(f"{field}: {name} is not a parquet file ({exc})") from None


def hub_rows(spec: DatasetSpec, field: str = "spec.dataset.source") -> list[dict[str, Any]]:
    """hf://NAME through the datasets library: NAME is a hub dataset id (or a local folder laid out
    like one), with spec.dataset.config, split and revision. Downloads are cached under HF_HOME
    (on the model cache claim when model.cache is set); HF_TOKEN reaches gated datasets."""
    import datasets

    name = spec.source.removeprefix(HUB_DATASET_SCHEME)
    where = f"{field}: {spec.source}" + (f" (config {spec.config!r})" if spec.config else "")
    try:
        loaded = datasets.load_dataset(name, spec.config, split=spec.split, revision=spec.revision)
    except Exception as exc:
        from grpo_runtime.model import hub_access_error

        refused = hub_access_error(exc, spec.source, field=field, secret_field="spec.model.tokenSecret")
        if refused is not None:
            raise DatasetError(str(refused)) from None
        if isinstance(exc, datasets.exceptions.DatasetNotFoundError):
            raise DatasetError(f"{where}: no such dataset on the hub ({first_line(exc)})") from None
        if isinstance(exc, ValueError | KeyError | FileNotFoundError | OSError):
            # unknown split or config, a config that must be named, files that cannot be read
            raise DatasetError(f"{where}, split {spec.split!r}: {first_line(exc)}") from None
        raise
    return loaded.to_list()



def _read_source(source: str, endpoint: str | None, region: str | None, field: str) -> bytes:
    if source.startswith(("s3://", "gs://", "az://", "abfs://")):
        from grpo_runtime.storage import StorageError, open_storage

        parent, _, key = source.rpartition("/")
        try:
            return open_storage(parent, endpoint=endpoint, region=region).read_bytes(key)
        except StorageError as exc:
            raise DatasetError(f"{field}: {exc}") from None
    try:
        return Path(source).expanduser().read_bytes()
    except OSError as exc:
        raise DatasetError(f"{field}: cannot read {source} ({exc.strerror})") from None


def load_rows(
    spec: DatasetSpec, *, endpoint: str | None = None, region: str | None = None, field: str = "spec.dataset.source"
) -> list[dict[str, Any]]:
    """All usable rows: dicts with at least the prompt column, capped at maxSamples. `field` is the
    spec path errors name (another section may read a source with the dataset's columns)."""
    if spec.source.startswith("builtin:"):
        rows = BUILTIN_DATASETS[spec.source.removeprefix("builtin:")]()
    elif spec.source.startswith(HUB_DATASET_SCHEME):
        rows = hub_rows(spec, field)
    else:
        suffix = Path(spec.source.split("?", 1)[0]).suffix
        rows = _parse_rows(spec.source, suffix, _read_source(spec.source, endpoint, region, field), field)
    if not rows:
        raise DatasetError(f"{field}: {spec.source} has no rows")
    bad = [i for i, row in enumerate(rows) if not isinstance(row, dict) or spec.prompt_field not in row]
    if bad:
        where = "spec.dataset.promptField" if field == "spec.dataset.source" else f"{field} (spec.dataset.promptField)"
        raise DatasetError(
            f"{where}: column {spec.prompt_field!r} missing in {len(bad)} of {len(rows)} rows "
            f"of {spec.source} (first: row {bad[0]})"
        )
    return rows[: spec.max_samples] if spec.max_samples else rows


@dataclass
class PromptSampler:
    """Hands out rows in a per-epoch shuffled order; (epoch, position) is the resumable cursor."""

    rows: list[dict[str, Any]]
    seed: int
    shuffle: bool = True
    epoch: int = 0
    position: int = 0

    def _order(self) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[dict[str, Any]]:
        batch, order = [], self._order()
        while len(batch) < count:
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            batch.append(self.rows[order[self.position]])
            self.position += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
