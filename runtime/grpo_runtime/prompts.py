"""Prompts as the model and the rewards take them: the chat a dataset prompt goes to the model as, its token
ids, how a rank samples its share of them (`sample`), what the rewards are called with for each completion,
and how the ranks put their scored shares together (`exchange`). Training (trainer.py) and evaluation
(evaluation.py) both roll out through these, so they live below both."""

from __future__ import annotations

from typing import Any

from grpo_runtime.data import DatasetError, is_conversational
from grpo_runtime.distributed import World
from grpo_runtime.engines import Completion, SamplingConfig
from grpo_runtime.model import Policy
from grpo_runtime.spec import GRPOJob


def chat_messages(job: GRPOJob, tokenizer, prompt: Any) -> list[dict[str, Any]] | None:
    """The chat a prompt goes to the model as, or None where it goes as raw text (the system prompt a paragraph
    before it): chat messages (TRL's conversational format) as they are, or a text prompt as a user message where
    model.useChatTemplate and the tokenizer has a template; spec.dataset.systemPrompt first unless they have a
    system message. This decides what the rewards get too (reward_inputs): TRL puts only chat messages through
    the template and then gives rewards the messages and each completion as an assistant message, so a text
    prompt we template is that case (bench/step_vs_trl.py gives TRL our templated prompts as [system, user])."""
    spec = job.spec
    if is_conversational(prompt):
        if not tokenizer.chat_template:
            raise DatasetError(
                f"spec.dataset.promptField: {spec.dataset.prompt_field!r} holds chat messages (TRL's conversational "
                f"format), which need a chat template; the tokenizer of {spec.model.name} has none"
            )
        messages = list(prompt)
    elif spec.model.use_chat_template and tokenizer.chat_template:
        messages = [{"role": "user", "content": str(prompt)}]
    else:
        return None
    if spec.dataset.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": spec.dataset.system_prompt})
    return messages


def encode_prompts(policy: Policy, job: GRPOJob, rows: list[dict[str, Any]], tools: list | None = None) -> list[list[int]]:
    """Prompt token ids of each row (encode_prompt)."""
    return [encode_prompt(policy, job, row, tools) for row in rows]


def encode_prompt(policy: Policy, job: GRPOJob, row: dict[str, Any], tools: list | None = None,
                  observation: Any = None) -> list[int]:
    """A row's prompt token ids, left-truncated: its chat (chat_messages) in the chat template (with `tools` shown
    to the model, an environment's reset() `observation` appended to the last message), a final assistant message
    continued rather than answered (as TRL), or the raw text with the system prompt before it."""
    from grpo_runtime.environments import with_observation

    spec, tokenizer = job.spec, policy.tokenizer
    prompt = row[spec.dataset.prompt_field]
    messages = chat_messages(job, tokenizer, prompt)
    if messages is None:
        prefix = f"{spec.dataset.system_prompt}\n\n" if spec.dataset.system_prompt else ""
        return tokenizer(prefix + str(prompt))["input_ids"][-spec.generation.max_prompt_length :]
    messages = with_observation(messages, observation)
    prefill = messages[-1]["role"] == "assistant"
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=not prefill, continue_final_message=prefill, tokenize=True,
        return_dict=False, **({"tools": tools} if tools else {}), **spec.model.chat_template_kwargs,
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)[-spec.generation.max_prompt_length :]


def sample(engine, player, rows: list[dict[str, Any]], prompt_ids: list[list[int]], sampling: SamplingConfig
           ) -> list[Completion]:
    """This rank's completions of `prompt_ids` (the prompts of `rows`), the first being the call's
    sampling.first_prompt-th prompt: the engine woken for them and put to sleep after; with a player
    (grpo_runtime.episodes), played out as episodes. Their prompt_index counts from first_prompt."""
    engine.wake()
    if player is not None:
        completions = player.rollout(engine, rows, prompt_ids, sampling, sampling.first_prompt * sampling.n)
    else:
        completions = engine.generate(prompt_ids, sampling)
    engine.sleep()
    for completion in completions:
        completion.prompt_index += sampling.first_prompt
    return completions


def exchange(world: World, completions: list[Completion], scores):
    """Every rank's scored completions, in rank order, on every rank: (completions, RewardScores). The episodes'
    environments stay behind (scored, they are done, and they need not pickle); a rank with no completions
    gives scores None."""
    from grpo_runtime.rewards import merge_scores

    for completion in completions:
        if completion.episode is not None:
            completion.episode.let_go()
    if world.size == 1:
        return completions, scores
    pieces = world.gather((completions, scores))
    return [c for piece, _ in pieces for c in piece], merge_scores([s for _, s in pieces if s is not None])


def reward_inputs(policy: Policy, job: GRPOJob, rows: list[dict[str, Any]], completions: list[Completion]):
    """What the rewards are called with: (prompts, completions, columns), one entry per completion, as TRL
    calls them. A prompt that went to the model as a chat (chat_messages) is that chat, its completion the
    assistant message [{"role": "assistant", "content": text}] (after the chat's own final assistant message, if
    any), or an episode's messages (assistant turns with their tool calls, the tool results between them); a
    prompt that went as raw text is the dataset's text, its completion the text. The dataset's prompt column is
    the prompt, its answer column is `answer`."""
    dataset = job.spec.dataset
    expanded = [rows[c.prompt_index] for c in completions]
    columns = {key: [row.get(key) for row in expanded] for key in expanded[0] if key != dataset.prompt_field}
    if dataset.answer_field != "answer" and dataset.answer_field in columns:
        columns["answer"] = columns[dataset.answer_field]
    columns["completion_ids"] = [c.completion_ids for c in completions]
    if any(c.episode is not None and c.episode.environment is not None for c in completions):
        columns["environments"] = [c.episode.environment for c in completions]  # TRL's reward kwarg
    prompts, texts = [], []
    for row, completion in zip(expanded, completions, strict=True):
        chat = chat_messages(job, policy.tokenizer, row[dataset.prompt_field])
        if chat is None:
            prompts.append(row[dataset.prompt_field])
            texts.append(completion.text)
            continue
        prefill = chat[-1]["content"] if chat[-1]["role"] == "assistant" else ""
        prompts.append(chat)
        if completion.episode is not None:
            texts.append(list(completion.episode.messages))
        else:
            texts.append([{"role": "assistant", "content": prefill + completion.text}])
    return prompts, texts, columns
