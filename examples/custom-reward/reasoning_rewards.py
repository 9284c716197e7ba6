"""A custom reward module for GRPOJob: plain functions with TRL's reward signature.

    fn(prompts, completions, **columns) -> list[float | None]

`completions` are strings (or, where the prompt went through the chat template, lists of
{"role", "content"} messages, as TRL passes them); dataset columns arrive as keyword arguments (here `answer`), and so does
`completion_ids`. None means "does not apply to this completion": it is left out of the sum and
of the reward's mean. Reference a function as `reasoning_rewards:FUNCTION` in spec.rewards, with
this file's folder on PYTHONPATH (see grpojob.yaml).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _text(completion: Any) -> str:
    """A completion as text, whether a string or TRL's conversational [{"role", "content"}] list."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion if isinstance(message, dict))


def _number(text: str) -> float | None:
    """The last number in a text ('1,234.5' -> 1234.5), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def tagged_answer(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **_: Any
) -> list[float | None]:
    """1.0 when <answer>...</answer> holds the reference number, 0.0 when it holds another one or
    is missing; None for rows without a reference answer. GSM8K references ("... #### 72") work."""
    scores: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        expected = _number(str(reference).split("####")[-1]) if reference is not None else None
        if expected is None:
            scores.append(None)
            continue
        match = _ANSWER.search(_text(completion))
        got = _number(match.group(1)) if match else None
        scores.append(1.0 if got is not None and abs(got - expected) < 1e-6 else 0.0)
    return scores


def think_steps(prompts: Sequence[Any], completions: Sequence[Any], max_steps: int = 8, **_: Any) -> list[float]:
    """Rewards showing the work: 1/max_steps per non-empty line inside <think>, at most 1.0;
    0.0 without a <think> block. Bind max_steps from spec.rewards[].args."""
    scores = []
    for completion in completions:
        match = _THINK.search(_text(completion))
        lines = [line for line in match.group(1).splitlines() if line.strip()] if match else []
        scores.append(min(1.0, len(lines) / max_steps))
    return scores
