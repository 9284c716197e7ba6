"""Held-out evaluation: is the policy getting better at the task on prompts it never trains on?

`split_rows` sets the held-out prompts apart before training starts (a seeded share of the
dataset, or a separate source), so that no held-out prompt text is ever a training row.
`Evaluator.evaluate(step)` samples them through the job's own engine with the current weights
(greedy, or k samples at the job's temperature), scores every completion with the job's rewards
and returns one `eval/...` record for the metrics. It is seeded from its own stream and the
engines sample under forked RNGs, so a job trains identically with and without evaluation.

Every score is "higher is better": per reward its mean, its accuracy (share of completions that
reach the reward's threshold: pass@1 when greedy, mean@k when sampled) and, for k > 1, pass@k by
the unbiased estimator; `eval/accuracy` (and `eval/pass@k`) for the completions that reach every
threshold of `spec.evaluation.correct`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from grpo_runtime.data import DatasetError, load_rows
from grpo_runtime.distributed import World
from grpo_runtime.engines import Engine, sampling_config
from grpo_runtime.episodes import episode_metrics
from grpo_runtime.prompts import encode_prompts, exchange, reward_inputs, sample
from grpo_runtime.rewards import Reward, score
from grpo_runtime.spec import EvaluationSpec, GRPOJob
from grpo_runtime.storage import Storage

log = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"
BEST = "best"
EVAL_SEED_OFFSET = 1_000_000_007  # eval sampling seeds never collide with the training steps' seeds


# ---------------------------------------------------------------------------------------------
# Which prompts are held out


def _distinct(rows: list[dict[str, Any]], field: str) -> dict[str, dict[str, Any]]:
    """The first row of every distinct prompt text, in dataset order."""
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(str(row[field]), row)
    return first


def split_rows(
    job: GRPOJob, rows: list[dict[str, Any]], *, endpoint: str | None = None, region: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows): disjoint by prompt text, the same for the same seed.

    heldOut picks distinct prompts of the training source with a generator of its own, seeded by
    training.seed; source reads a separate dataset. Either way every training row whose prompt
    text is held out is dropped, and each held-out prompt is evaluated once.
    """
    evaluation, dataset = job.spec.evaluation, job.spec.dataset
    if evaluation is None:
        return rows, []
    field = dataset.prompt_field
    if evaluation.held_out is not None:
        prompts = list(_distinct(rows, field).items())
        held_out = evaluation.held_out
        count = held_out if isinstance(held_out, int) else max(1, round(held_out * len(prompts)))
        if count >= len(prompts):
            raise DatasetError(
                f"spec.evaluation.heldOut: {held_out} means {count} held-out prompts, which leaves nothing to "
                f"train on: {dataset.source} has {len(prompts)} distinct prompts"
                + (f" (dataset.maxSamples {dataset.max_samples})" if dataset.max_samples else "")
            )
        picked = sorted(random.Random(job.spec.training.seed * 7_919 + 104_729).sample(range(len(prompts)), count))
        held = [prompts[i][1] for i in picked]
    else:
        source = dataset.model_copy(update={"source": evaluation.source, "split": evaluation.split, "max_samples": None})
        loaded = load_rows(source, endpoint=endpoint, region=region, field="spec.evaluation.source")
        held = list(_distinct(loaded, field).values())[: evaluation.max_samples]  # [:None] keeps them all
    texts = {str(row[field]) for row in held}
    train = [row for row in rows if str(row[field]) not in texts]
    if not train:
        raise DatasetError(
            f"spec.evaluation.source: every prompt of {dataset.source} is also in {evaluation.source}; "
            "nothing to train on"
        )
    if evaluation.source is not None and len(train) < len(rows):
        log.warning(
            "evaluation: %d training rows of %s have a prompt of %s; they are left out of training",
            len(rows) - len(train), dataset.source, evaluation.source,
        )
    log.info("evaluation: %d held-out prompts, %d training rows", len(held), len(train))
    return train, held


# ---------------------------------------------------------------------------------------------
# Scores


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c correct of n samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def thresholds(evaluation: EvaluationSpec, reward_names: list[str]) -> dict[str, float]:
    """Each reward's own threshold: the one `correct` gives it, else evaluation.threshold."""
    return {name: evaluation.correct.get(name, evaluation.threshold) for name in reward_names}


def summarise(
    per_reward: dict[str, torch.Tensor], num_samples: int, evaluation: EvaluationSpec
) -> dict[str, float]:
    """eval/... scores from per-completion rewards ([prompts * k], grouped by prompt; NaN = None)."""
    k = num_samples
    limits = thresholds(evaluation, list(per_reward))
    reached: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}

    def add(prefix: str, hits: torch.Tensor) -> None:  # hits: [prompts, k] booleans
        metrics[f"{prefix}accuracy"] = hits.float().mean().item()
        if k > 1:
            counts = hits.sum(dim=1).tolist()
            metrics[f"{prefix}pass@{k}"] = sum(pass_at_k(k, int(c), k) for c in counts) / len(counts)

    headline = list(evaluation.correct) or list(per_reward)[:1]
    everything = torch.ones(next(iter(per_reward.values())).shape[0] // k, k, dtype=torch.bool)
    for name, values in per_reward.items():
        reached[name] = (values >= limits[name]).view(-1, k)  # NaN (None) never reaches
        if name in headline:
            everything &= reached[name]
    add(EVAL_PREFIX, everything)
    for name, values in per_reward.items():
        valid = values[~values.isnan()]
        metrics[f"{EVAL_PREFIX}{name}/mean"] = valid.mean().item() if valid.numel() else math.nan
        add(f"{EVAL_PREFIX}{name}/", reached[name])
    return metrics


def is_eval_line(line: dict[str, Any]) -> bool:
    """Eval records of the metrics (metrics/part-N.jsonl) carry `step` and eval/... keys only:
    eval/NAME/SCORE per reward (mean, accuracy, pass@k), eval/SCORE overall (accuracy, pass@k,
    num_prompts, num_samples, completion_length, seconds)."""
    return any(key.startswith(EVAL_PREFIX) for key in line)


# ---------------------------------------------------------------------------------------------
# Running one evaluation


@dataclass
class Evaluator:
    job: GRPOJob
    policy: Any  # grpo_runtime.model.Policy
    engine: Engine
    rewards: list[Reward]
    rows: list[dict[str, Any]]  # the held-out prompts, one row each
    world: World = dataclasses.field(default_factory=World)  # a data-parallel job's ranks share the prompts
    player: Any = None  # grpo_runtime.episodes.Player when spec.tools is set: held-out prompts are played out too

    def __post_init__(self) -> None:
        self.spec: EvaluationSpec = self.job.spec.evaluation
        self._prompt_ids: list[list[int]] | None = None

    def due(self, step: int) -> bool:
        """Step 0 (the baseline), every everySteps, and the last step."""
        every = self.spec.every_steps
        return step == 0 or step == self.job.spec.training.max_steps or bool(every and step % every == 0)

    def evaluate(self, step: int, trainer_state: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Sample the held-out prompts with the current weights and score them: the eval line of
        metrics, and every completion with its prompt, reference answer and rewards. trainer_state:
        what the rewards get (grpo_runtime.rewards.score); what they log goes under eval/."""
        started = time.perf_counter()
        if self._prompt_ids is None:
            self._prompt_ids = encode_prompts(self.policy, self.job, self.rows, self.player and self.player.tools)
        k = self.spec.num_samples
        seed = self.job.spec.training.seed * 100_003 + step + EVAL_SEED_OFFSET
        sampling = sampling_config(self.job.spec.generation, seed=seed, n=k)
        if k == 1:
            sampling = dataclasses.replace(sampling, temperature=0.0)  # greedy
        mine = self.world.share(len(self.rows))  # each rank its share; seeds keyed by the prompt's index, as in training
        sampling = dataclasses.replace(sampling, first_prompt=mine.start)
        completions, scores = [], None  # a rank of more ranks than held-out prompts has none
        if mine:
            with rng_untouched(self.policy.device):  # vLLM's sampler draws from the global stream even when seeded
                completions = sample(self.engine, self.player, self.rows[mine.start : mine.stop],
                                     self._prompt_ids[mine.start : mine.stop], sampling)
            scores = score(self.rewards, *reward_inputs(self.policy, self.job, self.rows, completions),
                           trainer_state=trainer_state)
        completions, scores = exchange(self.world, completions, scores)
        lengths = [c.written for c in completions]
        dataset = self.job.spec.dataset
        samples = [  # the dataset's prompt, as the training samples keep it (the rewards may have had its chat)
            {
                "prompt": self.rows[completion.prompt_index][dataset.prompt_field],
                "answer": self.rows[completion.prompt_index].get(dataset.answer_field),
                "completion": completion.text,
                **({"episode": completion.episode.messages} if completion.episode is not None else {}),
                "rewards": {name: _number(values[i]) for name, values in scores.per_reward.items()},
                **scores.extra_of(i),
            }
            for i, completion in enumerate(completions)
        ]
        metrics = {
            "step": step,
            **summarise(scores.per_reward, k, self.spec),
            f"{EVAL_PREFIX}num_prompts": len(self.rows),
            f"{EVAL_PREFIX}num_samples": k,
            f"{EVAL_PREFIX}completion_length": sum(lengths) / len(lengths),
            **{EVAL_PREFIX + name: value for name, value in episode_metrics(completions).items()},
            f"{EVAL_PREFIX}seconds": time.perf_counter() - started,
        }
        clashes = scores.add_logged(metrics, EVAL_PREFIX)
        if clashes:
            log.warning("reward metrics %s clash with built-in eval metrics of the same names: not logged", clashes)
        return metrics, samples


@contextlib.contextmanager
def rng_untouched(device: torch.device):
    """Run a block without moving the training process's RNG streams (torch, CUDA, random, numpy)."""
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


def _number(value: torch.Tensor) -> float | None:
    return None if value.isnan() else value.item()


def samples_jsonl(samples: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(sample, default=str) + "\n" for sample in samples).encode()


# ---------------------------------------------------------------------------------------------
# The best adapter


@dataclass
class BestAdapter:
    """checkpoint.keepBest: best/ holds the adapter with the highest `metric` evaluated in this run.

    The bar is the best of the eval history and of best/best.json: after a resume, an evaluation
    of a stretch that is being re-run may already have written best/, and that adapter did score
    what best.json says. A fresh start (step 0) clears best/ of an earlier attempt.
    """

    storage: Storage
    metric: str
    bar: float | None = None

    def start(self, step: int, history: list[dict[str, Any]]) -> None:
        if step == 0:
            self.storage.delete_prefix(f"{BEST}/")
            self.bar = None
            return
        values = [line.get(self.metric) for line in history]
        if self.storage.exists(f"{BEST}/best.json"):
            values.append(json.loads(self.storage.read_bytes(f"{BEST}/best.json"))["value"])
        values = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
        self.bar = max(values) if values else None

    def offer(self, step: int, metrics: dict[str, Any], model) -> bool:
        """Save `model`'s adapter as best/ when metrics beat every earlier evaluation; True when saved."""
        value = metrics.get(self.metric)
        if value is None or math.isnan(value) or (self.bar is not None and value <= self.bar):
            return False
        from grpo_runtime.model import save_adapter

        with tempfile.TemporaryDirectory(prefix="grpo-best-") as tmp:
            save_adapter(model, tmp)
            self.storage.delete(f"{BEST}/best.json")  # best/ is mid-update until best.json is back
            self.storage.upload_dir(tmp, BEST)
        record = {"step": step, "metric": self.metric, "value": value}
        self.storage.write_bytes(f"{BEST}/best.json", json.dumps(record).encode())
        self.bar = value
        log.info("best adapter so far: step %d, %s = %.4f, in %s/%s", step, self.metric, value, self.storage.uri, BEST)
        return True
