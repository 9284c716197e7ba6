"""Reward functions used by the trainer tests to kill or break a run at a chosen step."""

import os

from grpo_runtime.rewards.builtin import completion_text

_calls = {"n": 0}


def die_on_call(prompts, completions, die_on_call=None, **kwargs):
    """Scores like a length reward; on call number `die_on_call` (a reward arg, or
    $GRPO_TEST_DIE_ON_CALL) of this process, the process dies without any clean-up, as a
    SIGKILL or a lost node would leave it."""
    _calls["n"] += 1
    if _calls["n"] == int(die_on_call or os.environ.get("GRPO_TEST_DIE_ON_CALL", "0")):
        os._exit(137)
    return [float(len(completion_text(c)) % 7) for c in completions]


def raise_on_call(prompts, completions, **kwargs):
    _calls["n"] += 1
    if _calls["n"] == int(os.environ.get("GRPO_TEST_RAISE_ON_CALL", "0")):
        raise ValueError("the grader fell over")
    return [float(len(completion_text(c)) % 5) for c in completions]


def rank_fault(prompts, completions, **kwargs):
    """Scores like die_on_call; on call number $GRPO_TEST_FAULT_ON_CALL of the rank $GRPO_TEST_FAULT_RANK (torchrun's
    RANK) of a data-parallel job, that rank dies ($GRPO_TEST_FAULT=die, as a lost GPU or node leaves it) or hangs
    (hang: alive, never reaching the step's exchange)."""
    import time

    _calls["n"] += 1
    if os.environ.get("RANK") == os.environ.get("GRPO_TEST_FAULT_RANK") and _calls["n"] == int(
        os.environ.get("GRPO_TEST_FAULT_ON_CALL", "0")
    ):
        if os.environ.get("GRPO_TEST_FAULT") == "hang":
            time.sleep(3600)
        os._exit(137)
    return [float(len(completion_text(c)) % 7) for c in completions]
