"""The trained adapter on the Hugging Face Hub (spec.output.hub), as TRL's push_to_hub does.

The repository is created (or found) when the job starts, so a token that cannot write fails the
job in its first minute, not after the last step. Then the adapter goes up at the end (strategy
`end`), or at every checkpoint and at the end (`checkpoint`, TRL's `every_save`), always with a
model card of ours: peft's card would name the base by whatever path it was loaded from. With
`mergedRepo`, final-merged/ (a plain model) goes to a repository of its own at the end.

The object store stays the record: a checkpoint's push that fails is logged and training goes on;
the final push that fails fails the job (exit 1), and the retry, finding every step done, pushes
again without training.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from grpo_runtime.model import HF_TOKEN_ENV  # without hub.tokenSecret the push uses the model's token

log = logging.getLogger(__name__)

HUB_TOKEN_ENV = "GRPO_HUB_TOKEN"  # the pod gets it from spec.output.hub.tokenSecret
FIELD = "spec.output.hub"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the hub names a model it can link


class HubError(Exception):
    """The hub refused the job's repository or token: bad input, exit 2. Never carries the token."""


def push_token() -> str | None:
    return os.environ.get(HUB_TOKEN_ENV) or os.environ.get(HF_TOKEN_ENV) or None


def _secret_field(spec) -> str:
    return f"{FIELD}.tokenSecret" if spec.token_secret else f"{FIELD}.tokenSecret (or spec.model.tokenSecret)"


class HubPusher:
    def __init__(self, job) -> None:
        from huggingface_hub import HfApi

        self.job = job
        self.spec = job.spec.output.hub
        self.token = push_token()
        if not self.token:
            raise HubError(
                f"{FIELD}.repo: pushing to {self.spec.repo!r} needs a write token and none was given: set "
                f"{_secret_field(self.spec)} to a Secret whose key {HF_TOKEN_ENV} holds one (without a cluster: export "
                f"{HUB_TOKEN_ENV} or {HF_TOKEN_ENV})"
            )
        self.api = HfApi(token=self.token)

    def _hub_error(self, exc: BaseException, doing: str, repo: str) -> Exception:
        """HubError (bad input) for what only the user can fix; the exception itself (retried) otherwise."""
        from huggingface_hub.errors import HfHubHTTPError

        status = getattr(getattr(exc, "response", None), "status_code", None)
        field = "mergedRepo" if repo == self.spec.merged_repo else "repo"
        where = f"{FIELD}.{field}: {doing} {repo!r}"
        if isinstance(exc, HfHubHTTPError) and status == 401:
            return HubError(f"{where}: the hub refused the token from {_secret_field(self.spec)} (HTTP 401: invalid "
                            "or expired)")
        if isinstance(exc, HfHubHTTPError) and status in (403, 404):
            return HubError(f"{where}: the token from {_secret_field(self.spec)} may not write there (HTTP {status}): "
                            "use a token with write access to that namespace")
        return exc

    def prepare(self) -> None:
        """Create the repositories (or find them) and commit the card of a run in progress: at the start, so that a
        token that cannot write fails first. Finding a repository proves only read access; a commit proves write."""
        for repo, merged in ((self.spec.repo, False), (self.spec.merged_repo, True)):
            if repo is None:
                continue
            try:
                url = self.api.create_repo(repo, private=self.spec.private, exist_ok=True)
                with tempfile.TemporaryDirectory(prefix="grpo-hub-") as tmp:
                    Path(tmp, "README.md").write_text(model_card(self.job, None, None, merged=merged))
                    self._commit(repo, tmp, f"grpo-operator: {self.job.metadata.name} started", merged=merged)
            except Exception as exc:  # noqa: BLE001 - sorted into bad input or retried by _hub_error
                raise self._hub_error(exc, "creating or writing", repo) from None
            log.info("hub: the %s goes to %s", "merged model" if merged else f"adapter (strategy {self.spec.strategy})",
                     url)

    def push(self, adapter_dir: str | Path, step: int, metrics: dict[str, Any] | None, *, final: bool,
             best: dict[str, Any] | None = None) -> None:
        """Push an adapter folder (its adapter files and our model card) as one commit. best: best/best.json
        when the folder is the best adapter (hub.adapter: best). The trainer pushes checkpoints only with
        strategy: checkpoint."""
        Path(adapter_dir, "README.md").write_text(model_card(self.job, step, metrics, best=best))
        what = f"best adapter (step {best['step']})" if best else "final adapter" if final else "checkpoint"
        try:
            url = self._commit(self.spec.repo, adapter_dir,
                               f"grpo-operator: {what} of {self.job.metadata.name} at step {step}")
        except Exception as exc:  # noqa: BLE001
            error = self._hub_error(exc, "pushing to", self.spec.repo)
            if final:
                raise error from None
            log.warning("hub: the checkpoint of step %d was not pushed (%s); it is in the object store, and the final "
                        "adapter will be pushed at the end", step, str(error).splitlines()[0])
            return
        log.info("hub: %s of step %d pushed: %s", what, step, url)

    def push_merged(self, merged_dir: str | Path, step: int, metrics: dict[str, Any] | None) -> None:
        """Push final-merged/ (every file of it, and our card) to mergedRepo; a failure fails the job (retried)."""
        if self.spec.merged_repo is None:
            return
        Path(merged_dir, "README.md").write_text(model_card(self.job, step, metrics, merged=True))
        try:
            url = self._commit(self.spec.merged_repo, merged_dir,
                               f"grpo-operator: merged model of {self.job.metadata.name} at step {step}", merged=True)
        except Exception as exc:  # noqa: BLE001
            raise self._hub_error(exc, "pushing to", self.spec.merged_repo) from None
        log.info("hub: merged model of step %d pushed: %s", step, url)

    def _commit(self, repo: str, folder: str | Path, message: str, *, merged: bool = False) -> str:
        adapter = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
        info = self.api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=message,
                                      allow_patterns=None if merged else adapter)
        return info.commit_url


def model_card(job, step: int | None, metrics: dict[str, Any] | None, *, merged: bool = False,
               best: dict[str, Any] | None = None) -> str:
    """The repository's README: what was trained, from what, on what rewards, and how it ended.
    step None: the run has started and nothing is pushed yet. merged: the card of the merged model.
    best: best/best.json, when the adapter is the best one rather than the last."""
    from huggingface_hub import ModelCard, ModelCardData

    spec = job.spec
    base = spec.model.name
    hub_base = base if HUB_ID.match(base) and not Path(base).exists() else None
    data = ModelCardData(
        library_name="transformers" if merged else "peft",
        base_model=hub_base,
        base_model_relation="finetune" if merged and hub_base else None,  # the adapter's relation the Hub infers
        tags=["grpo", "lora", "grpo-operator"],
        pipeline_tag="text-generation",
    )
    rewards = "\n".join(f"- `{r.name}` (weight {r.weight:g}): `{r.function or r.model}`" for r in spec.rewards)
    what = f"`{base}` with a LoRA adapter folded in" if merged else "A LoRA adapter"
    where = "" if merged else f" on `{base}`"
    progress = (f"{spec.training.max_steps} steps. Training has started; nothing is pushed yet." if step is None
                else f"step {step} of {spec.training.max_steps}.")
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {job.metadata.name}", "",
        f"{what} (rank {spec.lora.rank}, alpha {spec.lora.alpha}) trained with GRPO by grpo-operator{where}: "
        f"loss `{spec.training.loss_type}`, {spec.generation.num_generations} completions per prompt, {progress}", "",
    ]
    if best:
        lines += [f"This is the run's best adapter by `{best['metric']}` = {best['value']:.4f}, evaluated at step "
                  f"{best['step']}; the metrics below are the last step's.", ""]
    lines += [
        "## Rewards", "", rewards, "",
    ]
    if metrics:
        shown = {k: v for k, v in metrics.items() if k == "reward" or k.startswith("rewards/") and k.endswith("/mean")}
        lines += ["## At the last step", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in shown.items() if isinstance(v, (int, float))]
        lines.append("")
    return str(ModelCard("\n".join(lines)))
