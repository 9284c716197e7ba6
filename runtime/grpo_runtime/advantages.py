"""Group-relative advantages: the 'GR' of GRPO."""

from __future__ import annotations

import torch

STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """(r - mean of its group) / (std + 1e-4), the std taken over the group, the whole batch,
    or not at all (scale 'none', as Dr. GRPO recommends). `rewards` is [num_prompts * group_size],
    grouped: the completions of one prompt are contiguous."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)
        return centred / (std + STD_EPS)
    if scale == "batch":
        return centred / (rewards.std() + STD_EPS)
    if scale == "none":
        return centred
    raise ValueError(f"unknown reward scaling {scale!r}")


def frac_zero_std_groups(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose completions all scored alike: they carry no learning signal."""
    return (rewards.view(-1, group_size).std(dim=1) < 1e-6).float().mean().item()
