"""spec.output.hub: `grpo train` pushes the adapter and a model card to the Hugging Face Hub.

The Hub cannot run here: HubDouble (tests/runtime/hub_double.py) serves its HTTP API on loopback,
and huggingface_hub's own client talks to it (HF_ENDPOINT; HF_HUB_DISABLE_XET=1, see the double).
"""

import re

import pytest
import yaml

from grpo_runtime.spec import parse_job
from tests.runtime.hub_double import HubDouble
from tests.runtime.test_trainer import grpo_train, tiny_job, write_job

WRITE, READ = "hf_write_0123456789abcdef", "hf_read_0123456789abcdef"


@pytest.fixture
def hub():
    with HubDouble({WRITE: ("alice", "write"), READ: ("alice", "read")}) as double:
        yield double


def hub_job(tiny_model_dir, out, **hub_spec):
    doc = tiny_job(tiny_model_dir, out)
    doc["spec"]["output"]["hub"] = {"repo": "alice/tiny-grpo", **hub_spec}
    return doc


def train(tmp_path, doc, hub, token=WRITE, **env):
    hub_env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "GRPO_HUB_TOKEN": token or "", "HF_TOKEN": "", **env}
    return grpo_train(write_job(tmp_path, doc), env=hub_env)


def card_metadata(text: str) -> dict:
    return yaml.safe_load(re.match(r"^---\n(.*?)\n---", text, re.S).group(1))


def test_the_final_adapter_and_its_card_are_pushed(tiny_model_dir, tmp_path, hub):
    out = tmp_path / "out"
    result = train(tmp_path, hub_job(tiny_model_dir, out), hub)
    assert result.returncode == 0, result.stderr
    repo = hub.repos["alice/tiny-grpo"]
    assert repo.private  # the default: an adapter is not published by accident
    assert [c["message"] for c in repo.commits] == ["grpo-operator: tiny started",
                                                    "grpo-operator: final adapter of tiny at step 3"]
    assert repo.commits[0]["paths"] == ["README.md"]  # the start proves the token can write
    assert repo.commits[1]["paths"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    # exactly the adapter the object store holds
    assert repo.files["adapter_model.safetensors"] == (out / "final" / "adapter_model.safetensors").read_bytes()
    assert repo.files["adapter_config.json"] == (out / "final" / "adapter_config.json").read_bytes()
    card = repo.files["README.md"].decode()
    meta = card_metadata(card)
    assert meta["library_name"] == "peft" and "grpo" in meta["tags"]
    assert "base_model" not in meta  # a local folder is no hub id: the Hub would refuse the card
    assert "step 3 of 3" in card and "`correct` (weight 1)" in card and "| reward |" in card
    assert not (out / "final" / "README.md").exists() or "grpo-operator" not in (out / "final" / "README.md").read_text()
    assert "alice/tiny-grpo" in result.stderr  # where it went, in the log
    assert WRITE not in result.stdout + result.stderr
    assert hub.unhandled == []


def test_a_hub_id_base_is_named_in_the_card():
    from grpo_runtime.hub import model_card

    doc = tiny_job("HuggingFaceTB/SmolLM2-135M-Instruct", "unused")
    card = model_card(parse_job(doc), 3, {"reward": 0.5, "rewards/correct/mean": 0.25, "loss": 1.0})
    assert card_metadata(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "| rewards/correct/mean | 0.2500 |" in card and "| loss |" not in card


def test_strategy_checkpoint_pushes_every_checkpoint_without_trainer_state(tiny_model_dir, tmp_path, hub):
    result = train(tmp_path, hub_job(tiny_model_dir, tmp_path / "out", strategy="checkpoint"), hub)
    assert result.returncode == 0, result.stderr
    commits = hub.repos["alice/tiny-grpo"].commits
    assert [c["message"] for c in commits][1:] == ["grpo-operator: checkpoint of tiny at step 2",
                                                   "grpo-operator: final adapter of tiny at step 3"]
    assert commits[1]["paths"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("token, says", [
    (READ, "may not write there (HTTP 403)"),
    ("hf_revoked_0123456789", "refused the token from spec.output.hub.tokenSecret (or spec.model.tokenSecret) (HTTP 401"),
    (None, "needs a write token and none was given"),
])
def test_a_token_that_cannot_write_fails_before_the_model_loads(tiny_model_dir, tmp_path, hub, token, says):
    result = train(tmp_path, hub_job(tiny_model_dir, tmp_path / "out"), hub, token=token)
    assert result.returncode == 2, result.stderr  # bad input: not retried
    assert "spec.output.hub" in result.stderr and says in result.stderr
    assert "loading" not in result.stderr  # failed in its first seconds, before the model
    assert token is None or token not in result.stdout + result.stderr


def test_a_read_token_fails_at_the_start_even_where_the_repository_exists(tiny_model_dir, tmp_path, hub):
    """create_repo(exist_ok=True) succeeds for a read token when the repository is there (the client looks it up
    after the 403): only the start's commit tells that the token cannot write."""
    from tests.runtime.hub_double import Repo

    hub.repos["alice/tiny-grpo"] = Repo(private=True)
    result = train(tmp_path, hub_job(tiny_model_dir, tmp_path / "out"), hub, token=READ)
    assert result.returncode == 2, result.stderr
    assert "may not write there (HTTP 403)" in result.stderr and "loading" not in result.stderr
    assert hub.repos["alice/tiny-grpo"].commits == []


def test_a_hub_outage_at_the_end_fails_the_run_and_the_retry_pushes_without_training(tiny_model_dir, tmp_path, hub):
    out = tmp_path / "out"
    doc = hub_job(tiny_model_dir, out, strategy="checkpoint")
    hub.outage = {"checkpoint of tiny at step 2": 1, "final adapter": 1}
    first = train(tmp_path, doc, hub)
    assert first.returncode == 1  # retried by the operator
    assert "the checkpoint of step 2 was not pushed" in first.stderr  # and training went on
    assert (out / "final" / "adapter_model.safetensors").is_file()  # the store has everything
    assert [c["message"] for c in hub.repos["alice/tiny-grpo"].commits] == ["grpo-operator: tiny started"]

    retry = train(tmp_path, doc, hub)
    assert retry.returncode == 0, retry.stderr
    assert "nothing to run" in retry.stdout
    final = hub.repos["alice/tiny-grpo"]
    assert final.commits[-1]["message"] == "grpo-operator: final adapter of tiny at step 3"
    assert final.files["adapter_model.safetensors"] == (out / "final" / "adapter_model.safetensors").read_bytes()
    assert "| reward |" in final.files["README.md"].decode()  # the last step's metrics, read back from the store


def test_merged_repo_gets_final_merged_as_a_plain_model(tiny_model_dir, tmp_path, hub):
    out = tmp_path / "out"
    doc = hub_job(tiny_model_dir, out, mergedRepo="alice/tiny-grpo-merged")
    doc["spec"]["output"]["merged"] = True
    result = train(tmp_path, doc, hub)
    assert result.returncode == 0, result.stderr
    merged = hub.repos["alice/tiny-grpo-merged"]
    assert merged.private
    assert [c["message"] for c in merged.commits] == ["grpo-operator: tiny started",
                                                      "grpo-operator: merged model of tiny at step 3"]
    # every file of final-merged/, as the store holds it, and our card
    stored = {f.name: f.read_bytes() for f in (out / "final-merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= stored.keys()
    assert {name: data for name, data in merged.files.items() if name != "README.md"} == stored
    meta = card_metadata(merged.files["README.md"].decode())
    assert meta["library_name"] == "transformers"
    assert "with a LoRA adapter folded in" in merged.files["README.md"].decode()
    # the adapter went to its own repository, as without mergedRepo
    assert "adapter_model.safetensors" in hub.repos["alice/tiny-grpo"].files
    assert "model.safetensors" not in hub.repos["alice/tiny-grpo"].files


def test_merged_repo_that_cannot_be_written_fails_at_the_start_naming_its_field(tiny_model_dir, tmp_path):
    with HubDouble({WRITE: ("alice", "write")}) as hub:
        doc = hub_job(tiny_model_dir, tmp_path / "out", mergedRepo="bob/not-alices")
        doc["spec"]["output"]["merged"] = True
        result = train(tmp_path, doc, hub)
    assert result.returncode == 2, result.stderr
    assert "spec.output.hub.mergedRepo: creating or writing 'bob/not-alices'" in result.stderr
    assert "loading" not in result.stderr


def test_adapter_best_pushes_the_best_evaluations_adapter(tiny_model_dir, tmp_path, hub):
    """hub.adapter: best (TRL's load_best_model_at_end, then push_to_hub): best/ goes up, not final/."""
    import json

    out = tmp_path / "out"
    doc = hub_job(tiny_model_dir, out, adapter="best")
    doc["spec"]["training"]["maxSteps"] = 4
    doc["spec"]["evaluation"] = {"heldOut": 6, "everySteps": 1, "numSamples": 2}
    doc["spec"]["checkpoint"]["keepBest"] = "eval/short/mean"
    result = train(tmp_path, doc, hub)
    assert result.returncode == 0, result.stderr
    best = json.loads((out / "best" / "best.json").read_text())
    repo = hub.repos["alice/tiny-grpo"]
    assert repo.commits[-1]["message"] == f"grpo-operator: best adapter (step {best['step']}) of tiny at step 4"
    assert repo.files["adapter_model.safetensors"] == (out / "best" / "adapter_model.safetensors").read_bytes()
    assert "best.json" not in repo.files
    assert f"best adapter by `eval/short/mean` = {best['value']:.4f}, evaluated at step {best['step']}" in \
        repo.files["README.md"].decode()


@pytest.mark.parametrize("hub_spec, merged, says", [
    ({"repo": "a/b", "adapter": "best"}, False, "spec.output.hub.adapter: best pushes checkpoint.keepBest's adapter"),
    ({"repo": "a/b", "adapter": "best", "mergedRepo": "a/c"}, True,
     "spec.output.hub.mergedRepo: the merged model is the final adapter's"),
    ({"repo": "a/b", "mergedRepo": "a/c"}, False, "spec.output.hub.mergedRepo: pushes final-merged/, so it needs "
                                                  "output.merged: true"),
    ({"repo": "a/b", "mergedRepo": "a/b"}, True, "spec.output.hub.mergedRepo: must differ from repo"),
])
def test_a_merged_repo_without_a_merge_or_equal_to_repo_is_refused(hub_spec, merged, says):
    from grpo_runtime.spec import SpecError

    doc = tiny_job("m", "unused")
    doc["spec"]["output"].update(hub=hub_spec, merged=merged)
    with pytest.raises(SpecError, match=re.escape(says)):
        parse_job(doc)


@pytest.mark.parametrize("repo", ["no-owner", "a/b/c", "alice/-bad", "alice/a..b", "/name"])
def test_a_malformed_repo_is_refused_naming_the_field(repo):
    from grpo_runtime.spec import SpecError

    doc = tiny_job("m", "unused")
    doc["spec"]["output"]["hub"] = {"repo": repo}
    with pytest.raises(SpecError, match=r"spec\.output\.hub\.repo: must be owner/name"):
        parse_job(doc)
