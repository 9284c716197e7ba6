"""hf:// datasets through the datasets library, with config, split and GSM8K's '#### N' answers.

No hub here: the source is a local folder laid out like the hub repository openai/gsm8k (a
README whose YAML names the configs and their split files, parquet shards per config), a double
that `datasets.load_dataset` resolves with the same config and split logic as a hub download.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo_runtime.data import DatasetError, load_rows
from grpo_runtime.rewards.builtin import exact_answer
from grpo_runtime.spec import DatasetSpec
from tests.runtime.test_trainer import read_metrics, run_in_process, tiny_job

README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
---
# gsm8k (a local double of the hub repository's layout)
"""

TRAIN = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty needs $100 for a wallet. She has half of it. Her parents give her $15 and her grandparents "
                 "twice as much. How much more does she need?",
     "answer": "She has 100 / 2 = $<<100/2=50>>50.\nGrandparents give 15 * 2 = $<<15*2=30>>30.\n"
               "She needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"},
]


@pytest.fixture
def gsm8k_repo(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "openai-gsm8k"
    for config, split, rows in [("main", "train", TRAIN), ("main", "test", TRAIN[:1]),
                                ("socratic", "train", [{"question": "socratic?", "answer": "#### 1"}])]:
        (repo / config).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), repo / config / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(README)
    return repo


def spec(repo, **fields):
    return DatasetSpec(source=f"hf://{repo}", promptField="question", answerField="answer", **fields)


def test_config_and_split_pick_the_rows(gsm8k_repo):
    assert load_rows(spec(gsm8k_repo, config="main")) == TRAIN
    assert load_rows(spec(gsm8k_repo, config="main", split="test")) == TRAIN[:1]
    assert [r["question"] for r in load_rows(spec(gsm8k_repo, config="socratic"))] == ["socratic?"]
    assert len(load_rows(spec(gsm8k_repo, config="main", maxSamples=2))) == 2


def test_gsm8k_solutions_are_scored_by_their_hashes_answer(gsm8k_repo):
    rows = load_rows(spec(gsm8k_repo, config="main"))
    completions = ["<think>48 + 24</think><answer>72</answer>", "The answer is 12", "#### 5"]
    assert exact_answer([r["question"] for r in rows], completions, answer=[r["answer"] for r in rows]) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "fields, message",
    [({"config": "main", "split": "validation"}, "split 'validation'"), ({"config": "nope"}, "config 'nope'")],
    ids=["unknown-split", "unknown-config"],
)
def test_a_wrong_config_or_split_is_a_dataset_error_naming_it(gsm8k_repo, fields, message):
    with pytest.raises(DatasetError) as err:
        load_rows(spec(gsm8k_repo, **fields))
    assert str(err.value).startswith("spec.dataset.source: hf://") and message in str(err.value)


def test_hf_sources_are_validated_and_files_still_need_a_suffix():
    assert DatasetSpec(source="hf://openai/gsm8k", config="main").split == "train"
    with pytest.raises(ValueError, match="hf:// needs a dataset name"):
        DatasetSpec(source="hf://")
    with pytest.raises(ValueError, match="hf://DATASET"):
        DatasetSpec(source="s3://bucket/data.csv")


def test_a_job_trains_on_a_hub_dataset(gsm8k_repo, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    doc = tiny_job(tiny_model_dir, out, maxSteps=1)
    doc["spec"]["dataset"] = {"source": f"hf://{gsm8k_repo}", "config": "main", "split": "train",
                              "promptField": "question", "answerField": "answer"}
    assert run_in_process(doc) == 0
    (metrics,) = read_metrics(out)
    assert metrics["step"] == 1 and "rewards/correct/mean" in metrics


def test_a_gated_dataset_without_a_token_says_which_secret_to_set(monkeypatch):
    import datasets

    from tests.runtime.test_hub_access import hub_refusal

    def refuse(*args, **kwargs):  # a double of load_dataset meeting the hub's refusal
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'org/private' is a gated dataset") from hub_refusal("gated", 401)

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(DatasetError, match=r"spec\.dataset\.source: 'hf://org/private' is gated or private .* set spec\.model\.tokenSecret"):
        load_rows(DatasetSpec(source="hf://org/private"))
