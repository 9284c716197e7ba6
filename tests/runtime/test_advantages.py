"""Advantages, against TRL's own code: the lines of GRPOTrainer._generate_and_score_completions (TRL 1.16)
that turn rewards_per_func into advantages are inline in that method, so they are read from the installed
TRL's source and run as they are on the same rewards (no copy that could drift from it)."""

from __future__ import annotations

import inspect
import math
import textwrap
from types import SimpleNamespace

import pytest
import torch

from grpo_runtime.advantages import frac_zero_std_groups, group_advantages, nan_std, weighted_total

NAN = math.nan


def trl_advantages(per_reward, weights, group_size, scale, aggregation):
    """TRL's lines, from `unscorable_mask = ...` to `advantages = torch.nan_to_num(...)`, executed."""
    trl = pytest.importorskip("trl")  # a dev dependency: always there in CI
    from trl.trainer.utils import nanstd

    source = textwrap.dedent(inspect.getsource(trl.GRPOTrainer._generate_and_score_completions))
    start = source.rindex("\n", 0, source.index("unscorable_mask = ")) + 1
    end = source.index("\n", source.index("advantages = torch.nan_to_num(advantages, nan=0.0)"))
    lines = textwrap.dedent(source[start:end])
    assert "multi_objective_aggregation" in lines and "scale_rewards" in lines
    trainer = SimpleNamespace(multi_objective_aggregation=aggregation, scale_rewards=scale, reward_weights=weights,
                              reward_funcs=[None] * per_reward.shape[1])
    scope = {"torch": torch, "nanstd": nanstd, "self": trainer, "rewards_per_func": per_reward.clone(),
             "num_generations": group_size, "device": per_reward.device}
    exec(compile(lines, "trl:_generate_and_score_completions", "exec"), scope)
    return scope["advantages"]


# 3 groups of 4 completions, 2 rewards: correctness (0/1, None where it does not apply) and a
# wide-range length reward; group 2 holds one unscorable completion (both None), group 3 a
# completion only the length reward scores and a correctness column with one value.
PER_REWARD = torch.tensor([
    [1.0, -40.0], [0.0, 10.0], [1.0, 25.0], [0.0, 3.0],
    [NAN, NAN], [1.0, -5.0], [1.0, 7.0], [0.0, 7.0],
    [NAN, 2.0], [NAN, 2.0], [1.0, 2.0], [NAN, -1.0],
])
WEIGHTS = torch.tensor([2.0, 0.05])


@pytest.mark.parametrize("aggregation,scale", [
    ("sum_then_normalize", "group"), ("sum_then_normalize", "batch"), ("sum_then_normalize", "none"),
    ("normalize_then_sum", "group"),
])
def test_advantages_are_trls(aggregation, scale):
    ours = group_advantages(PER_REWARD, WEIGHTS, 4, scale, aggregation)
    theirs = trl_advantages(PER_REWARD, WEIGHTS, 4, scale, aggregation)
    assert not ours.isnan().any()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours[4] == 0.0  # unscorable: no advantage, and left out of its group's mean and std


def test_unscorable_completion_is_left_out_of_its_group():
    """The three scorable completions of the group are normalised among themselves: the one left out
    does not pull the group's mean towards 0 (it did, when None everywhere summed to 0)."""
    per_reward = torch.tensor([[NAN], [1.0], [2.0], [3.0]])
    adv = group_advantages(per_reward, torch.ones(1), 4)
    expected = torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-4)
    torch.testing.assert_close(adv, torch.cat([torch.zeros(1), expected]))


def test_gdpo_keeps_a_wide_reward_from_drowning_a_narrow_one():
    """Summed first, a length reward in the tens decides the order; normalised first, correctness counts."""
    per_reward = torch.tensor([[1.0, -30.0], [0.0, 30.0], [1.0, 0.0], [0.0, 0.0]])
    weights = torch.ones(2)
    summed = group_advantages(per_reward, weights, 4, aggregation="sum_then_normalize")
    decoupled = group_advantages(per_reward, weights, 4, aggregation="normalize_then_sum")
    assert summed[0] < summed[1]  # the correct completion is pushed down
    assert decoupled[2] > decoupled[3] and decoupled[0] > -1.0


def test_nan_std_is_torch_std_without_nans():
    x = torch.tensor([[1.0, 4.0, NAN, 9.0], [NAN, NAN, 2.0, NAN]])
    torch.testing.assert_close(nan_std(x, 1)[0], torch.tensor([1.0, 4.0, 9.0]).std())
    assert nan_std(x, 1)[1].isnan()  # one value: no std
    torch.testing.assert_close(nan_std(x), torch.tensor([1.0, 4.0, 9.0, 2.0]).std())


def test_weighted_total_skips_none_and_marks_unscorable():
    total = weighted_total(torch.tensor([[1.0, NAN], [NAN, NAN], [1.0, 2.0]]), torch.tensor([2.0, 3.0]))
    assert total[0] == 2.0 and total[1].isnan() and total[2] == 8.0


def test_equal_rewards_give_zero_advantage_and_count_as_zero_std():
    rewards = torch.tensor([[1.0], [1.0], [0.0], [1.0]])
    assert group_advantages(rewards, torch.ones(1), 2)[:2].tolist() == [0.0, 0.0]
    assert frac_zero_std_groups(rewards[:, 0], 2) == 0.5
    assert frac_zero_std_groups(torch.tensor([NAN, 1.0, 0.0, 1.0]), 2) == 0.5  # one scorable: no signal


def test_uneven_groups_and_unknown_options_are_refused():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6, 1), torch.ones(1), 4)
    with pytest.raises(ValueError, match="unknown reward scaling"):
        group_advantages(torch.zeros(4, 1), torch.ones(1), 2, scale="global")
    with pytest.raises(ValueError, match="unknown reward aggregation"):
        group_advantages(torch.zeros(4, 1), torch.ones(1), 2, aggregation="mean")
