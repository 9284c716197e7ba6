"""Rewards: TRL's signature, built-ins, weighting, and clear errors naming the reward."""

import asyncio
import math
import sys
import types

import pytest
import torch

from grpo_runtime.rewards import RewardError, load_rewards, reward_metrics, score
from grpo_runtime.rewards.builtin import exact_answer, extract_answer
from grpo_runtime.rewards.builtin import format as format_reward
from grpo_runtime.rewards.builtin import length
from grpo_runtime.spec import RewardSpec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the total is \\boxed{42}.", 42.0),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72.0),
        ("<answer> 1,250 </answer>", 1250.0),
        ("first 3 then 5 and finally 8", 8.0),
        ("#### 7 ... wait, \\boxed{9}", 9.0),  # boxed outranks ####
        ("costs $1,234.50 in total #### $1,234.50", 1234.5),
        ("#### -3", -3.0),
        ("no digits here", None),
    ],
)
def test_extract_answer_styles(text, expected):
    assert extract_answer(text) == expected


def test_exact_answer_matches_gsm8k_references():
    completions = ["... #### 72", "The answer is \\boxed{72}", "I think 71", "no idea"]
    answers = ["Natalia sold 48 clips... #### 72"] * 4
    assert exact_answer(["p"] * 4, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]


def test_exact_answer_strict_mode_ignores_stray_numbers():
    assert exact_answer(["p"], ["maybe 5"], answer=["5"], last_number_fallback=False) == [0.0]


def test_exact_answer_without_reference_answer_is_none():
    assert exact_answer(["p"], ["5"], answer=["no number"]) == [None]


def test_format_default_wants_think_then_answer():
    completions = ["<think>add them</think> 7", "7", "<think>unfinished", "<think>x</think>"]
    assert format_reward(["p"] * 4, completions) == [1.0, 0.0, 0.0, 0.0]


def test_format_custom_pattern():
    assert format_reward(["p", "p"], ["... #### 5", "5"], pattern=r"####\s*\d+") == [1.0, 0.0]


def test_length_penalty_counts_tokens_when_given():
    ids = [[0] * 10, [0] * 20, [0] * 40]
    assert length(["p"] * 3, ["a"] * 3, target=10, scale=20, completion_ids=ids) == [0.0, -0.5, -1.0]


def trl_style_reward(prompts, completions, answer, **kwargs):
    """A reward written for TRL, unchanged: it relies on **kwargs swallowing extra columns."""
    return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]


async def async_judge(prompts, completions, answer, bonus=0.0, **kwargs):
    """An async reward, as an LLM judge over HTTP is written: it awaits, and notes the loop it ran on."""
    await asyncio.sleep(0)
    sys.modules["my_rewards"].judge_loops.append(asyncio.get_running_loop())
    return [(1.0 if a in c else 0.0) + bonus for c, a in zip(completions, answer)]


_HANDSHAKE: dict[str, asyncio.Event] = {}


async def handshake_a(prompts, completions, **kwargs):
    """Finishes only once handshake_b has started: run one after the other, the two would never end."""
    _HANDSHAKE.setdefault("b", asyncio.Event())
    _HANDSHAKE.setdefault("a", asyncio.Event()).set()
    await asyncio.wait_for(_HANDSHAKE["b"].wait(), timeout=60)  # only reached when they do not run together
    return [1.0] * len(completions)


async def handshake_b(prompts, completions, **kwargs):
    _HANDSHAKE.setdefault("a", asyncio.Event())
    _HANDSHAKE.setdefault("b", asyncio.Event()).set()
    await asyncio.wait_for(_HANDSHAKE["a"].wait(), timeout=60)
    return [2.0] * len(completions)


async def async_raises(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    raise ConnectionError("judge unreachable")


class AsyncJudge:
    """A reward object whose __call__ is async."""

    async def __call__(self, prompts, completions, **kwargs):
        return [0.5] * len(completions)


@pytest.fixture
def user_module(monkeypatch):
    module = types.ModuleType("my_rewards")
    module.trl_style = trl_style_reward
    module.raises = lambda prompts, completions, **kw: 1 / 0
    module.short = lambda prompts, completions, **kw: [1.0]
    module.nan_for_some = lambda prompts, completions, **kw: [None if "skip" in c else 2.0 for c in completions]
    module.not_callable = 3
    module.judge, module.judge_loops = async_judge, []
    module.handshake_a, module.handshake_b = handshake_a, handshake_b
    module.async_raises = async_raises
    module.Judge = AsyncJudge()
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    return module


def rewards(*pairs):
    return load_rewards([RewardSpec(name=name, function=fn, **extra) for name, fn, extra in pairs])


def test_user_reward_with_trl_signature_and_weights(user_module):
    loaded = rewards(("trl", "my_rewards:trl_style", {"weight": 2.0}), ("fmt", "builtin:format", {"args": {"pattern": "x"}}))
    scores = score(loaded, ["p1", "p2"], ["x 5", "6"], {"answer": ["5", "5"], "completion_ids": [[1], [2]]})
    assert scores.per_reward["trl"].tolist() == [1.0, 0.0]
    assert scores.per_reward["fmt"].tolist() == [1.0, 0.0]
    assert scores.total.tolist() == [3.0, 0.0]


def test_none_scores_are_left_out_of_sum_and_stats(user_module):
    loaded = rewards(("maybe", "my_rewards:nan_for_some", {}), ("len", "builtin:length", {"args": {"target": 100}}))
    scores = score(loaded, ["p"] * 3, ["skip", "a", "b"], {})
    assert math.isnan(scores.per_reward["maybe"][0].item())
    assert scores.total.tolist() == [0.0, 2.0, 2.0]
    metrics = reward_metrics(scores)
    assert metrics["rewards/maybe/mean"] == 2.0 and metrics["rewards/maybe/std"] == 0.0


def test_async_rewards_work_as_in_trl(user_module):
    """Async rewards (TRL runs them on one event loop): with spec args, beside a synchronous one, each weighted;
    every step's calls share the one loop, so a client a judge keeps stays usable."""
    loaded = rewards(("judge", "my_rewards:judge", {"args": {"bonus": 0.5}, "weight": 2.0}),
                     ("trl", "my_rewards:trl_style", {}))
    for _ in range(2):
        scores = score(loaded, ["p1", "p2"], ["x 5", "6"], {"answer": ["5", "5"]})
        assert scores.per_reward["judge"].tolist() == [1.5, 0.5]
        assert scores.total.tolist() == [4.0, 1.0]
    loops = user_module.judge_loops
    assert len(loops) == 2 and loops[0] is loops[1] and loops[0].is_running()
    assert score(rewards(("obj", "my_rewards:Judge", {})), ["p"], ["c"], {}).per_reward["obj"].tolist() == [0.5]


def test_async_rewards_of_a_step_run_together(user_module):
    _HANDSHAKE.clear()
    loaded = rewards(("a", "my_rewards:handshake_a", {}), ("b", "my_rewards:handshake_b", {}))
    scores = score(loaded, ["p"], ["c"], {})
    assert scores.total.tolist() == [3.0]


def test_async_reward_that_raises_is_named(user_module):
    loaded = rewards(("judge", "my_rewards:async_raises", {}), ("trl", "my_rewards:trl_style", {}))
    with pytest.raises(RewardError, match=r"reward 'judge' \(my_rewards:async_raises\) raised ConnectionError: judge"):
        score(loaded, ["p"], ["c"], {"answer": ["5"]})


def test_rewards_get_trls_trainer_state_log_metric_and_log_extra(user_module):
    """What TRL passes a reward beside the columns: trainer_state (a transformers.TrainerState), log_metric
    (averaged over the step's calls, async ones included) and log_extra (a value per completion)."""
    from transformers import TrainerState

    def shaped(prompts, completions, trainer_state, log_metric, log_extra, **kwargs):
        log_metric("progress", trainer_state.global_step / trainer_state.max_steps)
        log_extra("chars", [len(c) for c in completions])
        return [1.0] * len(completions)

    async def judged(prompts, completions, log_metric, **kwargs):
        log_metric("progress", 1.0)
        return [0.0] * len(completions)

    def bad_extra(prompts, completions, log_extra, **kwargs):
        log_extra("chars", [1])
        return [0.0] * len(completions)

    user_module.shaped, user_module.judged, user_module.bad_extra = shaped, judged, bad_extra
    loaded = rewards(("shaped", "my_rewards:shaped", {}), ("judged", "my_rewards:judged", {}))
    scores = score(loaded, ["p", "p"], ["a", "bcd"], {}, trainer_state=TrainerState(global_step=1, max_steps=4))
    assert scores.logged == {"progress": (0.25 + 1.0) / 2}
    assert scores.extra == {"chars": [1, 3]}
    with pytest.raises(RewardError, match=r"reward 'bad' .* log_extra\('chars'\): 1 values for 2 completions"):
        score(rewards(("bad", "my_rewards:bad_extra", {})), ["p", "p"], ["a", "b"], {}, trainer_state=TrainerState())


def test_reward_that_raises_is_named(user_module):
    loaded = rewards(("boom", "my_rewards:raises", {}))
    with pytest.raises(RewardError, match=r"reward 'boom' \(my_rewards:raises\) raised ZeroDivisionError"):
        score(loaded, ["p"], ["c"], {})


def test_reward_with_wrong_length_is_named(user_module):
    loaded = rewards(("short", "my_rewards:short", {}))
    with pytest.raises(RewardError, match="reward 'short' .* returned 1 scores for 2 completions"):
        score(loaded, ["p", "p"], ["a", "b"], {})


def test_unimportable_module_names_the_field():
    with pytest.raises(RewardError, match=r"spec.rewards\[0\].function: cannot import module 'no_such_module_xyz'"):
        rewards(("r", "no_such_module_xyz:fn", {}))


def test_missing_attribute_names_the_field(user_module):
    with pytest.raises(RewardError, match=r"spec.rewards\[0\].function: module 'my_rewards' has no callable 'not_callable'"):
        rewards(("r", "my_rewards:not_callable", {}))


def test_reward_metrics_mean_and_std():
    loaded = rewards(("len", "builtin:length", {"args": {"target": 1, "scale": 1}}))
    scores = score(loaded, ["p"] * 2, ["a", "a b c"], {})
    metrics = reward_metrics(scores)
    assert metrics["rewards/len/mean"] == pytest.approx(-0.5)
    assert metrics["rewards/len/std"] == pytest.approx(torch.tensor([0.0, -1.0]).std().item())
