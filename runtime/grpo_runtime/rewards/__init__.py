"""Reward functions: loading them from the spec, calling them, combining their scores.

A reward is any callable with TRL's signature fn(prompts, completions, **columns) ->
list[float | None], synchronous or async (an LLM judge: async ones run concurrently, see
_AsyncRewards); None means "not applicable to this completion" and is left out of the
weighted sum and of that reward's mean/std, as TRL does; a completion every reward returned None
for is unscorable (its total is NaN, and grpo_runtime.advantages gives it no advantage).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from grpo_runtime.advantages import weighted_total
from grpo_runtime.rewards.builtin import BUILTINS
from grpo_runtime.rewards.errors import RewardError
from grpo_runtime.spec import RewardSpec

RewardCallable = Callable[..., Sequence[float | None]]


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


def load_rewards(specs: Sequence[RewardSpec], chat_template_kwargs: dict[str, Any] | None = None) -> list[Reward]:
    """The job's rewards, ready to call; a reward model is loaded here (onto the job's device), so a bad
    reference fails before training. chat_template_kwargs: the job's, for reward models' templates."""
    rewards = []
    for index, spec in enumerate(specs):
        if spec.model is not None:
            from grpo_runtime.rewards.model import RewardModel

            args = spec.args
            fn = RewardModel(spec.model, where=f"spec.rewards[{index}].model", revision=args.get("revision"),
                             batch_size=args.get("batchSize", 8), chat_template_kwargs=chat_template_kwargs)
            rewards.append(Reward(name=spec.name, weight=spec.weight, fn=fn, ref=f"model {spec.model}"))
            continue
        fn = _resolve(spec.function, index)
        if spec.args:
            fn = functools.partial(fn, **spec.args)
        rewards.append(Reward(name=spec.name, weight=spec.weight, fn=fn, ref=spec.function))
    return rewards


@dataclass
class RewardScores:
    """A step's scores; matrix, weight_vector and total are computed once, on first use."""

    per_reward: dict[str, torch.Tensor]  # name -> [N], NaN where the reward returned None
    weights: dict[str, float]  # name -> its weight in the sum
    logged: dict[str, float] = field(default_factory=dict)  # log_metric(name, value): the mean of each name's values
    extra: dict[str, list[Any]] = field(default_factory=dict)  # log_extra(column, values): a value per completion

    @functools.cached_property
    def matrix(self) -> torch.Tensor:
        """[N, K] the scores, one column per reward (NaN: None)."""
        return torch.stack(list(self.per_reward.values()), dim=1)

    @functools.cached_property
    def weight_vector(self) -> torch.Tensor:
        return torch.tensor([self.weights[name] for name in self.per_reward], dtype=torch.float32)

    def extra_of(self, i: int) -> dict[str, Any]:
        """{"extra": {column: its value for completion i}} of what the rewards logged with log_extra, or {}."""
        return {"extra": {column: values[i] for column, values in self.extra.items()}} if self.extra else {}

    def add_logged(self, metrics: dict[str, Any], prefix: str = "") -> list[str]:
        """Add what the rewards logged with log_metric to `metrics` (names under `prefix`); a name a metric
        already has keeps its value. Returns those clashing names (the caller says so)."""
        clashes = sorted(prefix + name for name in self.logged if prefix + name in metrics)
        metrics |= {prefix + name: value for name, value in self.logged.items() if prefix + name not in metrics}
        return clashes

    @functools.cached_property
    def total(self) -> torch.Tensor:
        """[N] the weighted sum, None scores skipped; NaN for a completion every reward returned None for."""
        return weighted_total(self.matrix, self.weight_vector)


def merge_scores(pieces: Sequence[RewardScores]) -> RewardScores:
    """The scores of consecutive shares of a step's completions (a data-parallel job's ranks, in rank order) as
    one: per-completion scores and log_extra columns concatenated (None where a share lacks a column), each
    log_metric name the mean of the shares that logged it."""
    counts = [len(next(iter(piece.per_reward.values()))) for piece in pieces]
    columns = sorted({column for piece in pieces for column in piece.extra})
    extra = {
        column: [value for piece, n in zip(pieces, counts, strict=True) for value in piece.extra.get(column, [None] * n)]
        for column in columns
    }
    names = {name for piece in pieces for name in piece.logged}
    logged = {
        name: sum(values) / len(values)
        for name in sorted(names)
        for values in [[piece.logged[name] for piece in pieces if name in piece.logged]]
    }
    return RewardScores(
        per_reward={name: torch.cat([piece.per_reward[name] for piece in pieces]) for name in pieces[0].per_reward},
        weights=dict(pieces[0].weights),
        logged=logged,
        extra=extra,
    )


def _label(reward: Reward) -> str:
    return f"reward {reward.name!r} ({reward.ref})"


def _checked(reward: Reward, values: Any, count: int) -> torch.Tensor:
    """A reward's return value as [count] float32 scores (NaN for None), or a RewardError naming it."""
    label = _label(reward)
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"{label} returned {type(values).__name__}, expected a list of floats") from None
    if len(values) != count:
        raise RewardError(f"{label} returned {len(values)} scores for {count} completions")
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


def _raised(reward: Reward, exc: BaseException) -> RewardError:
    return RewardError(f"{_label(reward)} raised {type(exc).__name__}: {exc}")


class _AsyncRewards:
    """One event loop, on a daemon thread, for a process's async rewards (as TRL runs them): a step's
    async rewards run concurrently (an LLM judge over HTTP waits on the network, not the CPU), and
    what they keep between calls (a client session) stays bound to the same loop from step to step."""

    _loop: asyncio.AbstractEventLoop | None = None
    _lock = threading.Lock()

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                cls._loop = asyncio.new_event_loop()
                threading.Thread(target=cls._loop.run_forever, name="grpo-async-rewards", daemon=True).start()
            return cls._loop

    @classmethod
    def run(cls, calls: list) -> list:
        """The results of the coroutine functions `calls` (no arguments), run together; an exception is
        returned in its call's place."""

        async def together():
            return await asyncio.gather(*(call() for call in calls), return_exceptions=True)

        return asyncio.run_coroutine_threadsafe(together(), cls.loop()).result()


def is_async(fn: Callable) -> bool:
    """An async reward: a coroutine function, a partial of one, or an object whose __call__ is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def score(
    rewards: Sequence[Reward],
    prompts: list[Any],
    completions: list[str],
    columns: dict[str, list[Any]],
    trainer_state: Any = None,
) -> RewardScores:
    """Call every reward on the same completions and combine them with their weights: the synchronous
    ones one after the other, then the async ones together.

    With trainer_state (a transformers.TrainerState), the rewards also get what TRL gives them beside the
    columns: trainer_state (for shaping a reward by training progress), log_metric(name, value) (a scalar
    metric, averaged over the step's calls) and log_extra(column, values) (a value per completion, kept
    with the samples)."""
    kwargs = {"prompts": prompts, "completions": completions, **columns}
    logged: dict[str, list[float]] = {}
    extra: dict[str, list[Any]] = {}
    if trainer_state is not None:

        def log_metric(name: str, value: float) -> None:
            logged.setdefault(str(name), []).append(float(value))

        def log_extra(column: str, values: Sequence[Any]) -> None:
            if len(values) != len(completions):
                raise ValueError(f"log_extra({column!r}): {len(values)} values for {len(completions)} completions")
            extra[str(column)] = list(values)

        kwargs |= {"trainer_state": trainer_state, "log_metric": log_metric, "log_extra": log_extra}
    values: dict[str, Any] = {}
    pending = [reward for reward in rewards if is_async(reward.fn)]
    for reward in rewards:
        if reward not in pending:
            try:
                values[reward.name] = reward.fn(**kwargs)
            except Exception as exc:
                raise _raised(reward, exc) from exc
    if pending:
        results = _AsyncRewards.run([functools.partial(reward.fn, **kwargs) for reward in pending])
        for reward, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                raise _raised(reward, result) from result
            values[reward.name] = result
    per_reward = {reward.name: _checked(reward, values[reward.name], len(completions)) for reward in rewards}
    return RewardScores(
        per_reward=per_reward,
        weights={reward.name: reward.weight for reward in rewards},
        logged={name: sum(v) / len(v) for name, v in logged.items()},
        extra=extra,
    )


def reward_metrics(scores: RewardScores) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, values in scores.per_reward.items():
        valid = values[~values.isnan()]
        metrics[f"rewards/{name}/mean"] = valid.mean().item() if valid.numel() else math.nan
        metrics[f"rewards/{name}/std"] = valid.std().item() if valid.numel() > 1 else 0.0
    return metrics
