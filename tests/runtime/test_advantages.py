import pytest
import torch

from grpo_runtime.advantages import frac_zero_std_groups, group_advantages


def test_group_scaling_matches_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    adv = group_advantages(rewards, 4, "group")
    for g in range(2):
        r = rewards[g * 4 : (g + 1) * 4]
        expected = (r - r.mean()) / (r.std() + 1e-4)
        assert torch.allclose(adv[g * 4 : (g + 1) * 4], expected)


def test_batch_and_none_scaling():
    rewards = torch.tensor([1.0, 3.0, 10.0, 20.0])
    centred = torch.tensor([-1.0, 1.0, -5.0, 5.0])
    assert torch.allclose(group_advantages(rewards, 2, "none"), centred)
    assert torch.allclose(group_advantages(rewards, 2, "batch"), centred / (rewards.std() + 1e-4))


def test_equal_rewards_give_zero_advantage_and_count_as_zero_std():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert group_advantages(rewards, 2)[:2].tolist() == [0.0, 0.0]
    assert frac_zero_std_groups(rewards, 2) == 0.5


def test_uneven_groups_are_refused():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), 4)
