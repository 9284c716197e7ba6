"""The error a reward raises when it cannot be loaded or misbehaves: here, below both the reward loader
(grpo_runtime.rewards) and the reward model (rewards/model.py) that raise it; the package re-exports it."""

from __future__ import annotations


class RewardError(Exception):
    """A reward that cannot be loaded or misbehaves; the message names the reward."""
