"""Gated and private hub models: a missing or refused token is bad input (exit 2) that says so.

No hub here: the hub's refusals are raised by a double of transformers' download step, using
huggingface_hub's own error types around a double of the HTTP response.
"""

from __future__ import annotations

import pytest

from grpo_runtime.model import ModelError, load_policy
from grpo_runtime.spec import LoraSpec, ModelSpec
from tests.runtime.test_trainer import run_in_process, tiny_job

GATED = "meta-llama/Llama-3.1-8B-Instruct"
TOKEN = "hf_double_token_value_never_printed_0123"


class HubResponseDouble:
    """What huggingface_hub's errors read from an HTTP response: status, headers, request."""

    def __init__(self, status_code: int):
        self.status_code = status_code
        self.headers = {"x-request-id": "double-request"}
        self.request = None


def hub_refusal(kind: str, status: int) -> Exception:
    from huggingface_hub import errors

    cls = {"gated": errors.GatedRepoError, "not-found": errors.RepositoryNotFoundError, "http": errors.HfHubHTTPError}[kind]
    # a server that echoes the token must not get it into our message
    return cls(f"{status} Client Error for {GATED} (token {TOKEN})", response=HubResponseDouble(status))


@pytest.fixture
def hub_refuses(monkeypatch):
    """from_pretrained as transformers wraps a hub refusal: OSError raised from the hub's error."""
    import transformers

    def install(kind: str, status: int):
        def from_pretrained(*args, **kwargs):
            raise OSError(f"You are trying to access a gated repo. {GATED}") from hub_refusal(kind, status)

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)

    return install


@pytest.mark.parametrize(
    "kind, status, token, message",
    [
        ("gated", 401, None, "no hub token was given: set spec.model.tokenSecret"),
        ("not-found", 401, None, "no hub token was given"),
        ("http", 401, TOKEN, "the hub refused the token from spec.model.tokenSecret (HTTP 401"),
        ("gated", 403, TOKEN, "has no access to this gated repository (HTTP 403); accept the licence"),
        ("not-found", 404, TOKEN, "no such repository on the hub, or the account of the token"),
    ],
    ids=["gated-no-token", "private-no-token", "bad-token", "licence-not-accepted", "not-visible"],
)
def test_hub_refusals_become_model_errors_that_say_what_to_do(hub_refuses, monkeypatch, kind, status, token, message):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    hub_refuses(kind, status)
    with pytest.raises(ModelError) as err:
        load_policy(ModelSpec(name=GATED), LoraSpec(), device="cpu")
    assert message in str(err.value) and GATED in str(err.value)
    assert TOKEN not in str(err.value)


def test_other_load_failures_keep_their_own_message(monkeypatch):
    import transformers

    def from_pretrained(*args, **kwargs):
        raise OSError("Unrecognized model in /models/x. Should have a `model_type` key")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(ModelError, match=r"cannot load 'org/model' \(Unrecognized model"):
        load_policy(ModelSpec(name="org/model"), LoraSpec(), device="cpu")


def test_grpo_train_exits_2_on_a_refused_token_without_printing_it(hub_refuses, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub_refuses("gated", 403)
    doc = tiny_job(tiny_model_dir, tmp_path / "out")
    doc["spec"]["model"]["name"] = GATED
    assert run_in_process(doc) == 2
    captured = capsys.readouterr()
    assert "has no access to this gated repository" in captured.err
    assert TOKEN not in captured.err + captured.out
