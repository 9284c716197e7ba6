"""Group-relative advantages: the 'GR' of GRPO, as TRL 1.16 computes them (checked against its code in
tests/runtime/test_advantages.py).

A reward that returns None for a completion is left out (NaN here). A completion every reward left
out is unscorable: it is left out of its group's mean and std, and its advantage is 0.
"""

from __future__ import annotations

import torch

STD_EPS = 1e-4
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def nan_std(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sample std (Bessel's correction) of the non-NaN values; NaN where fewer than two."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    count = (~x.isnan()).sum(dim, keepdim=keepdim)
    squares = ((x - x.nanmean(dim, keepdim=True)) ** 2).nansum(dim, keepdim=keepdim)
    return (squares / (count - 1).clamp(min=1)).sqrt().masked_fill(count < 2, float("nan"))


def weighted_total(per_reward: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N] sum of per_reward [N, K] x weights [K], None scores (NaN) skipped; NaN where all are."""
    total = (per_reward * weights).nansum(dim=1)
    return total.masked_fill(per_reward.isnan().all(dim=1), float("nan"))


def group_advantages(
    per_reward: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
    scale: str = "group",
    aggregation: str = "sum_then_normalize",
) -> torch.Tensor:
    """Advantages [N] of per_reward [N, K] (NaN: None), grouped (a prompt's completions are contiguous).

    sum_then_normalize (GRPO): the weighted sum, minus its group's mean, divided by the std (+ 1e-4)
    of the group, of the whole batch, or (scale 'none', as Dr. GRPO recommends) not at all.
    normalize_then_sum (GDPO): each reward normalised within its group first, then the weighted sum,
    normalised over the batch; scale does not apply."""
    if per_reward.shape[0] % group_size:
        raise ValueError(f"{per_reward.shape[0]} rewards do not split into groups of {group_size}")
    if aggregation == "normalize_then_sum":
        grouped = per_reward.view(-1, group_size, per_reward.shape[1])
        normalised = (grouped - grouped.nanmean(dim=1, keepdim=True)) / (nan_std(grouped, 1, keepdim=True) + STD_EPS)
        # a value alone in its group has no std, so no normalised score; only unscorable rows are left out
        total = (normalised.view_as(per_reward) * weights).nansum(dim=1)
        total = total.masked_fill(per_reward.isnan().all(dim=1), float("nan"))
        return ((total - total.nanmean()) / (nan_std(total) + STD_EPS)).nan_to_num(nan=0.0)
    if aggregation != "sum_then_normalize":
        raise ValueError(f"unknown reward aggregation {aggregation!r}")
    total = weighted_total(per_reward, weights)
    grouped = total.view(-1, group_size)
    centred = (grouped - grouped.nanmean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred.nan_to_num(nan=0.0)
    if scale == "group":
        std = nan_std(grouped, 1).repeat_interleave(group_size)
    elif scale == "batch":
        std = nan_std(total)
    else:
        raise ValueError(f"unknown reward scaling {scale!r}")
    return (centred / (std + STD_EPS)).nan_to_num(nan=0.0)


def frac_zero_std_groups(total: torch.Tensor, group_size: int) -> float:
    """Share of groups whose scorable completions all scored alike (or that have fewer than two):
    they carry no learning signal."""
    std = nan_std(total.view(-1, group_size), 1).nan_to_num(nan=0.0)
    return (std < 1e-6).float().mean().item()
