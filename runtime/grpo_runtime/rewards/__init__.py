"""Reward functions: loading them from the spec, calling them, combining their scores.

A reward is any callable with TRL's signature fn(prompts, completions, **columns) ->
list[float | None]; None means "not applicable to this completion" and is left out of the
weighted sum and of that reward's mean/std, as TRL does; a completion every reward returned None
for is unscorable (its total is NaN, and grpo_runtime.advantages gives it no advantage).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from grpo_runtime.advantages import weighted_total
from grpo_runtime.rewards.builtin import BUILTINS
from grpo_runtime.spec import RewardSpec

RewardCallable = Callable[..., Sequence[float | None]]


class RewardError(Exception):
    """A reward that cannot be loaded or misbehaves; the message names the reward."""


@dataclass(frozen=True)
class Reward:
    name: str
    weight: float
    fn: RewardCallable
    ref: str  # builtin:NAME or module:function, for messages


def _resolve(ref: str, index: int) -> RewardCallable:
    where = f"spec.rewards[{index}].function"
    if ref.startswith("builtin:"):
        name = ref.removeprefix("builtin:")
        if name not in BUILTINS:
            raise RewardError(f"{where}: unknown builtin reward {name!r}; known: {', '.join(BUILTINS)}")
        return BUILTINS[name]
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing at import time
        raise RewardError(f"{where}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"{where}: module {module_name!r} has no callable {attr!r}")
    return fn


def load_rewards(specs: Sequence[RewardSpec]) -> list[Reward]:
    rewards = []
    for index, spec in enumerate(specs):
        fn = _resolve(spec.function, index)
        if spec.args:
            fn = functools.partial(fn, **spec.args)
        rewards.append(Reward(name=spec.name, weight=spec.weight, fn=fn, ref=spec.function))
    return rewards


@dataclass
class RewardScores:
    per_reward: dict[str, torch.Tensor]  # name -> [N], NaN where the reward returned None
    weights: dict[str, float]  # name -> its weight in the sum

    @property
    def matrix(self) -> torch.Tensor:
        """[N, K] the scores, one column per reward (NaN: None)."""
        return torch.stack(list(self.per_reward.values()), dim=1)

    @property
    def weight_vector(self) -> torch.Tensor:
        return torch.tensor([self.weights[name] for name in self.per_reward], dtype=torch.float32)

    @property
    def total(self) -> torch.Tensor:
        """[N] the weighted sum, None scores skipped; NaN for a completion every reward returned None for."""
        return weighted_total(self.matrix, self.weight_vector)


def _call(reward: Reward, prompts: list[Any], completions: list[str], columns: dict[str, list[Any]]) -> torch.Tensor:
    label = f"reward {reward.name!r} ({reward.ref})"
    try:
        values = reward.fn(prompts=prompts, completions=completions, **columns)
    except Exception as exc:
        raise RewardError(f"{label} raised {type(exc).__name__}: {exc}") from exc
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"{label} returned {type(values).__name__}, expected a list of floats") from None
    if len(values) != len(completions):
        raise RewardError(f"{label} returned {len(values)} scores for {len(completions)} completions")
    scores = []
    for value in values:
        if value is None:
            scores.append(math.nan)
            continue
        try:
            scores.append(float(value))
        except (TypeError, ValueError):
            raise RewardError(f"{label} returned a non-number {value!r}") from None
    return torch.tensor(scores, dtype=torch.float32)


def score(
    rewards: Sequence[Reward], prompts: list[Any], completions: list[str], columns: dict[str, list[Any]]
) -> RewardScores:
    """Call every reward on the same completions and combine them with their weights."""
    per_reward = {reward.name: _call(reward, prompts, completions, columns) for reward in rewards}
    return RewardScores(per_reward=per_reward, weights={reward.name: reward.weight for reward in rewards})


def reward_metrics(scores: RewardScores) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, values in scores.per_reward.items():
        valid = values[~values.isnan()]
        metrics[f"rewards/{name}/mean"] = valid.mean().item() if valid.numel() else math.nan
        metrics[f"rewards/{name}/std"] = valid.std().item() if valid.numel() > 1 else 0.0
    return metrics
