"""TRL's own reward functions (trl.rewards) on our prompts. TRL 1.16's GRPOTrainer hands a reward, for a
conversational prompt (chat messages, put through the chat template), the messages as `prompts` and each
completion as [{"role": "assistant", "content": text}]; its bundled rewards read completion[0]["content"].
A text prompt the runtime puts in the chat template is such a chat too; one sent as raw text is not."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from grpo_runtime.engines import Completion
from grpo_runtime.rewards.builtin import exact_answer, length
from grpo_runtime.rewards.builtin import format as format_reward
from grpo_runtime.spec import parse_job
from grpo_runtime.prompts import reward_inputs
from tests.runtime.test_trainer import read_metrics, run_in_process, tiny_job

SYSTEM = "Answer with a number."  # tiny_job's systemPrompt


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def inputs(tiny_model_dir, tokenizer, **model):
    """What the rewards get for one text prompt and its completion, in a tiny_job with `model` settings."""
    doc = tiny_job(tiny_model_dir, "unused")
    doc["spec"]["model"].update(model)
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"}]
    return reward_inputs(SimpleNamespace(tokenizer=tokenizer), parse_job(doc), rows, [Completion(0, [1], "#### 5", False)])


def test_a_templated_text_prompt_gives_the_rewards_chat_messages(tiny_model_dir, tokenizer):
    from trl.rewards import think_format_reward

    prompts, completions, columns = inputs(tiny_model_dir, tokenizer)
    assert prompts == [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 3?"}]]
    assert completions == [[{"role": "assistant", "content": "#### 5"}]]
    assert think_format_reward(completions) == [0.0]  # reads completion[0]["content"]
    # the built-ins take this form as they take text
    assert exact_answer(prompts, completions, **columns) == [1.0]
    assert format_reward(prompts, completions, pattern="####") == [1.0]
    assert length(prompts, completions, target=1) == [-1.0]  # 2 words, counted from the message's text


def test_a_raw_text_prompt_gives_the_rewards_text(tiny_model_dir, tokenizer):
    """No chat template applied (model.useChatTemplate false, or a tokenizer without one): TRL's standard format."""
    assert inputs(tiny_model_dir, tokenizer, useChatTemplate=False)[:2] == (["What is 2 + 3?"], ["#### 5"])
    plain = tokenizer.__class__.from_pretrained(tiny_model_dir)
    plain.chat_template = None
    prompts, completions, _ = inputs(tiny_model_dir, plain)
    assert (prompts, completions) == (["What is 2 + 3?"], ["#### 5"])


def trained_with(tiny_model_dir, out, rewards, data=None):
    """One step of tiny_job (text prompts, systemPrompt, the chat template) and a held-out evaluation at steps 0
    and 1, with `rewards`; its metrics and the step's and last evaluation's samples."""
    doc = tiny_job(tiny_model_dir, out, rewards=rewards, maxSteps=1)
    doc["spec"]["evaluation"] = {"heldOut": 2}
    if data is not None:
        doc["spec"]["dataset"]["source"] = str(data)
    assert run_in_process(doc) == 0
    samples = [json.loads(line) for name in ("step-1", "eval-step-1")
               for line in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]
    return read_metrics(out), samples


def test_trls_think_format_reward_trains_and_evaluates(tiny_model_dir, tmp_path):
    """The issue's case: trl.rewards:think_format_reward beside a built-in stopped the first step with
    `TypeError: string indices must be integers`."""
    from trl.rewards import think_format_reward

    rewards = [{"name": "correct", "function": "builtin:exact_answer"},
               {"name": "think", "function": "trl.rewards:think_format_reward"}]
    metrics, samples = trained_with(tiny_model_dir, tmp_path / "run", rewards)
    assert [m["step"] for m in metrics] == [0, 1, 1]  # eval, step, eval
    assert "rewards/think/mean" in metrics[1] and "eval/think/mean" in metrics[2]
    for sample in samples:  # each score is TRL's reward of that completion's text
        assert sample["rewards"]["think"] == think_format_reward([[{"content": sample["completion"]}]])[0]


def test_trls_accuracy_reward_trains_and_evaluates(tiny_model_dir, tmp_path):
    """accuracy_reward (math_verify) on a `solution` column; what it logs with log_extra lands in the samples."""
    pytest.importorskip("math_verify")
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + 2?", "solution": f"${a + 2}$"}) + "\n"
                            for a in range(8)))
    rewards = [{"name": "math", "function": "trl.rewards:accuracy_reward"}]
    metrics, samples = trained_with(tiny_model_dir, tmp_path / "run", rewards, data)
    assert metrics[1]["rewards/math/mean"] == 0.0  # a random model: wrong, but every solution parsed (None if not)
    assert metrics[2]["eval/math/mean"] == 0.0
    assert all(sample["extra"]["answer_parsed"] == "[unparseable]" for sample in samples)
    assert all(sample["extra"]["gold_parsed"] != "[unparseable]" for sample in samples)
