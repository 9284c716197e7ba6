"""Prompts as TRL datasets hold them: text (standard) or chat messages (conversational), and what the rewards
get back for each (TRL 1.16's GRPOTrainer: a conversational prompt's completion is an assistant message)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from grpo_runtime.data import DatasetError, is_conversational
from grpo_runtime.engines import Completion
from grpo_runtime.rewards.builtin import exact_answer, length
from grpo_runtime.rewards.builtin import format as format_reward
from grpo_runtime.spec import parse_job
from grpo_runtime.prompts import encode_prompts, reward_inputs
from tests.runtime.test_trainer import read_metrics, run_in_process, tiny_job


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def job_of(tiny_model_dir, system_prompt=None, **model):
    doc = tiny_job(tiny_model_dir, "unused")
    doc["spec"]["dataset"]["systemPrompt"] = system_prompt
    doc["spec"]["model"].update(maxSeqLength=512, **model)
    doc["spec"]["generation"]["maxPromptLength"] = 256  # none of these prompts is cut
    return parse_job(doc)


def decoded(tokenizer, job, prompt):
    ids = encode_prompts(SimpleNamespace(tokenizer=tokenizer), job, [{"prompt": prompt}])[0]
    return tokenizer.decode(ids)


def test_a_conversational_prompt_is_templated_as_its_text_would_be(tiny_model_dir, tokenizer):
    job = job_of(tiny_model_dir, system_prompt="Be brief.")
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = decoded(tokenizer, job, "What is 2 + 3?")
    assert decoded(tokenizer, job, messages) == text
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    own_system = [{"role": "system", "content": "Think."}, *messages]  # its own system prompt wins
    assert decoded(tokenizer, job, own_system).startswith("<|im_start|>system\nThink.<|im_end|>")
    assert "Be brief." not in decoded(tokenizer, job, own_system)


def test_a_final_assistant_message_is_continued(tiny_model_dir, tokenizer):
    job = job_of(tiny_model_dir)
    prompt = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "<think>"}]
    assert decoded(tokenizer, job, prompt).endswith("<|im_start|>assistant\n<think>")  # no end, no new turn


def test_chat_template_kwargs_reach_the_template(tiny_model_dir, tokenizer):
    thinking = tokenizer.__class__.from_pretrained(tiny_model_dir)
    thinking.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if enable_thinking is defined and not enable_thinking %}"
        " /no_think{% endif %}"
    )
    assert decoded(thinking, job_of(tiny_model_dir, chatTemplateKwargs={"enable_thinking": False}), "hi") == "hi /no_think"
    assert decoded(thinking, job_of(tiny_model_dir), "hi") == "hi"


def test_chat_messages_without_a_template_name_the_field(tiny_model_dir, tokenizer):
    plain = tokenizer.__class__.from_pretrained(tiny_model_dir)
    plain.chat_template = None
    with pytest.raises(DatasetError, match=r"spec.dataset.promptField: 'prompt' holds chat messages .* has none"):
        decoded(plain, job_of(tiny_model_dir), [{"role": "user", "content": "hi"}])
    assert decoded(plain, job_of(tiny_model_dir, system_prompt="S"), "hi") == "S\n\nhi"  # text: as before


def test_rewards_get_assistant_messages_for_conversational_prompts(tiny_model_dir, tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "2 + 3?"}], "answer": "5"},
            {"prompt": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "<think>"}],
             "answer": "4"},
            {"prompt": "1 + 1?", "answer": "2"}]
    completions = [Completion(i, [1, 2], text, False) for i, text in enumerate(["5", "add</think> 4", "2"])]
    job = job_of(tiny_model_dir, useChatTemplate=False)  # the text prompt goes as raw text: its completion is text
    prompts, texts, columns = reward_inputs(SimpleNamespace(tokenizer=tokenizer), job, rows, completions)
    assert prompts == [row["prompt"] for row in rows] and is_conversational(prompts[0]) and not is_conversational("x")
    assert texts == [[{"role": "assistant", "content": "5"}],
                     [{"role": "assistant", "content": "<think>add</think> 4"}], "2"]
    assert exact_answer(prompts, texts, **columns) == [1.0, 1.0, 1.0]
    assert format_reward(prompts, texts) == [0.0, 1.0, 0.0]
    assert length(prompts, texts, target=1) == [0.0, -1.0, 0.0]


def test_a_job_trains_on_a_conversational_dataset(tiny_model_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {a} + 2?"}],
                                        "answer": str(a + 2)}) + "\n" for a in range(8)))
    out = tmp_path / "run"
    doc = tiny_job(tiny_model_dir, out, maxSteps=1)
    doc["spec"]["dataset"] = {"source": str(data)}
    assert run_in_process(doc) == 0
    (metrics,) = read_metrics(out)
    assert metrics["completion_length/mean"] > 0
    sample = json.loads((out / "samples" / "step-1.jsonl").read_text().splitlines()[0])
    assert sample["prompt"][0]["role"] == "user"
