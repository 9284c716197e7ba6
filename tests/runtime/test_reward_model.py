"""A reward model as a reward (spec.rewards[].model), against TRL's own code: the lines of
GRPOTrainer._calculate_rewards (TRL 1.16) that score with a reward model are read from the installed
TRL's source and run on the same model and completions. One line is changed to run outside the trainer:
`super()._prepare_inputs(reward_inputs)` (which moves the tensors to the trainer's device, here the CPU
they are on) becomes `reward_inputs`."""

from __future__ import annotations

import contextlib
import inspect
import textwrap
from types import SimpleNamespace

import pytest
import torch

from grpo_runtime.rewards import RewardError, load_rewards, score
from grpo_runtime.spec import RewardSpec
from tests.runtime.test_trainer import read_metrics, run_in_process, tiny_job


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny random Llama sequence classifier with one output and the tiny model's ChatML tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=256,
                         initializer_range=0.2, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    directory = tmp_path_factory.mktemp("reward-model")
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def trl_reward_model_scores(model_dir, prompts, completions):
    """TRL's reward-model lines of _calculate_rewards, executed on a model loaded as TRL loads one."""
    trl = pytest.importorskip("trl")  # a dev dependency: always there in CI
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.data_utils import apply_chat_template, is_conversational

    source = textwrap.dedent(inspect.getsource(trl.GRPOTrainer._calculate_rewards))
    start = source.index("if isinstance(reward_func, nn.Module):")
    end = source.index("elif is_async_callable(reward_func):")
    lines = textwrap.dedent(source[start:end]).replace("super()._prepare_inputs(reward_inputs)", "reward_inputs")
    assert lines.count("reward_inputs") >= 3 and "logits[:, 0]" in lines
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # TRL's __init__ does this
    scope = {
        "torch": torch, "nn": torch.nn, "reward_func": model.eval(), "reward_processing_class": tokenizer,
        "reward_func_name": "rm", "prompts": prompts, "completions": completions, "i": 0,
        "rewards_per_func": torch.zeros(len(prompts), 1), "self": SimpleNamespace(chat_template_kwargs={}),
        "profiling_context": lambda *args: contextlib.nullcontext(), "is_conversational": is_conversational,
        "apply_chat_template": apply_chat_template,
    }
    exec(compile(lines, "trl:_calculate_rewards", "exec"), scope)
    return scope["rewards_per_func"][:, 0]


PROMPTS = ["What is 2 + 3?", "Name a colour.", "2 + 2?", "Say hi.", "Count to three, please."]
COMPLETIONS = ["5", "Blue, like the sky on a clear day.", "four", "hi", "one two three"]


@pytest.mark.parametrize("conversational", [False, True])
def test_reward_model_scores_are_trls(reward_model_dir, conversational):
    prompts, completions = PROMPTS, COMPLETIONS
    if conversational:  # as the trainer hands them over for chat-message prompts
        prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
        completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    (reward,) = load_rewards([RewardSpec(name="rm", model=str(reward_model_dir), args={"batchSize": 2})])
    scores = score([reward], prompts, completions, {})
    want = trl_reward_model_scores(reward_model_dir, prompts, completions)
    torch.testing.assert_close(scores.per_reward["rm"], want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0  # the completions score differently: the comparison can fail


def test_a_reward_model_that_cannot_load_names_the_field(tmp_path):
    with pytest.raises(RewardError, match=r"spec.rewards\[0\].model: cannot load reward model '.*nowhere'"):
        load_rewards([RewardSpec(name="rm", model=str(tmp_path / "nowhere"))])


@pytest.mark.parametrize("fields,message", [
    ({"function": "builtin:format", "model": "org/rm"}, "set exactly one of function and model"),
    ({}, "set exactly one of function and model"),
    ({"model": "org/rm", "args": {"pattern": "x"}}, "a reward model takes revision and batchSize, not pattern"),
])
def test_a_reward_is_a_function_or_a_model(fields, message):
    with pytest.raises(ValueError, match=message):
        RewardSpec(name="r", **fields)


def test_a_job_trains_with_a_reward_model(tiny_model_dir, reward_model_dir, tmp_path):
    out = tmp_path / "run"
    rewards = [{"name": "rm", "model": str(reward_model_dir)}, {"name": "correct", "function": "builtin:exact_answer"}]
    assert run_in_process(tiny_job(tiny_model_dir, out, rewards=rewards, maxSteps=1)) == 0
    (metrics,) = read_metrics(out)
    assert metrics["rewards/rm/std"] > 0 and metrics["reward_std"] > 0
