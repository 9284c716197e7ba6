"""Built-in reward functions, all with TRL's signature fn(prompts, completions, **columns).

Each returns one float (or None: "not applicable", ignored in the weighted sum) per completion. A
completion is its text, or (a prompt that went through the chat template, as TRL passes it) a list of chat
messages (grpo_runtime.prompts.reward_inputs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"
_BOXED = re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}")
_HASHES = re.compile(r"####\s*(" + _NUMBER + r")")
_ANSWER_TAG = re.compile(r"<answer>\s*(" + _NUMBER + r")\s*</answer>", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)

DEFAULT_FORMAT = r"^\s*<think>.+?</think>\s*\S.*$"


def completion_text(completion: Any) -> str:
    """The text of a completion: itself, or the contents of its messages (TRL's conversational format)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


def _to_float(text: str) -> float | None:
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_answer(text: str, *, last_number_fallback: bool = True) -> float | None:
    """The final numeric answer of a text: \\boxed{N}, then '#### N', then <answer>N</answer>,
    then (when allowed) the last number in the text. The last match of a style wins, as
    models often restate the answer at the end."""
    for pattern in (_BOXED, _HASHES, _ANSWER_TAG):
        matches = pattern.findall(text)
        if matches:
            return _to_float(matches[-1])
    if last_number_fallback:
        matches = _ANY_NUMBER.findall(text)
        if matches:
            return _to_float(matches[-1])
    return None


def exact_answer(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    answer: Sequence[Any] | None = None,
    *,
    last_number_fallback: bool = True,
    tolerance: float = 1e-6,
    **_: Any,
) -> list[float | None]:
    """1.0 when the completion's final number equals the reference answer, else 0.0.
    The reference may be a number or a GSM8K-style solution ending in '#### N'."""
    if answer is None:
        raise ValueError("builtin:exact_answer needs an `answer` column (dataset.answerField)")
    scores: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        expected = reference if isinstance(reference, int | float) else extract_answer(str(reference))
        if expected is None:
            scores.append(None)
            continue
        got = extract_answer(completion_text(completion), last_number_fallback=last_number_fallback)
        scores.append(1.0 if got is not None and abs(got - float(expected)) <= tolerance else 0.0)
    return scores


def format(  # noqa: A001 - the reward's public name is builtin:format
    prompts: Sequence[Any], completions: Sequence[Any], *, pattern: str = DEFAULT_FORMAT, **_: Any
) -> list[float]:
    """1.0 when the completion matches the regex (DOTALL), else 0.0. The default asks for a
    <think>...</think> block followed by an answer."""
    regex = re.compile(pattern, re.DOTALL)
    return [1.0 if regex.search(completion_text(completion)) else 0.0 for completion in completions]


def length(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    target: int = 256,
    scale: int | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
    **_: Any,
) -> list[float]:
    """A length penalty: 0 up to `target` tokens, then falling linearly to -1 at target + scale.
    Counts tokens when the trainer passes completion_ids, whitespace words otherwise."""
    scale = scale or target
    if completion_ids is not None:
        sizes = [len(ids) for ids in completion_ids]
    else:
        sizes = [len(completion_text(c).split()) for c in completions]
    return [-min(1.0, max(0.0, (size - target) / scale)) for size in sizes]


BUILTINS = {"exact_answer": exact_answer, "format": format, "length": length}
