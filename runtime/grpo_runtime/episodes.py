"""Episodes: the model calls tools, their results go into the sequence, and it goes on writing (TRL's
GRPOTrainer._tool_call_loop, on either engine).

A completion of the first turn is parsed into an assistant message with transformers' `parse_response` (the
tokenizer's response_template, or spec.model.responseTemplate); while its last message calls tools, the calls
run (grpo_runtime.tools), their tool messages are rendered by the chat template into token ids appended to the
sequence (`tool_suffix_ids`, the same ids the template gives the whole conversation), and the engine continues
from the whole sequence: one more completion per episode, seeded by the episode and the turn, so an episode
samples the same in any batch and on any rank. On vLLM the continuation's prompt is the episode so far, whose
KV blocks its prefix cache still holds: a turn does not prefill the episode again.

An episode ends when its last message calls no tool, after generation.maxToolCalls answered turns, or when
its next tool results would not fit maxCompletionLength, which counts every token after the prompt (those
results are then dropped, as TRL does). Everything after the prompt is the completion; Completion.mask marks
what the model wrote (1) against what was put in for it (0): only the former is trained on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from grpo_runtime.engines.protocol import Completion, SamplingConfig, prompt_seed
from grpo_runtime.tools import ToolError, ToolRunner

TURN_SEED_OFFSET = 2**40  # a continuation's seed stream is apart from every first turn's (keyed by prompt index)


@dataclass
class Episode:
    """What a completion's episode was, beside its tokens: the messages (TRL's completion for rewards and
    samples: assistant messages, with their tool_calls, and the tool messages in between) and its counts."""

    messages: list[dict[str, Any]]
    turns: int = 1  # times the model wrote: the first turn and each continuation
    calls: int = 0
    failures: int = 0
    timeouts: int = 0
    # the rollout's environment instance and its tools (spec.tools and its methods); both None without one, and
    # after scoring (the rollout's own process keeps them: they need not pickle)
    environment: Any = None
    tools: list | None = None

    def let_go(self) -> None:
        self.environment = self.tools = None


def parse_reply(tokenizer, ids: list[int], prefix: list[int], tools: list) -> dict[str, Any]:
    """An assistant message of the reply `ids` after `prefix` (TRL's parse_response): content and tool_calls by
    the response template; a reply it cannot parse (a malformed call) is plain text, and so is a tool call
    without a name."""
    try:
        parsed = tokenizer.parse_response(ids, prefix=prefix, tools=tools)
        if parsed is None:
            raise ValueError("nothing parsed")
        calls = parsed.get("tool_calls")
        if calls is not None and not all(
            isinstance(call, dict) and isinstance(call.get("function"), dict) and call["function"].get("name")
            for call in calls
        ):
            raise ValueError("a tool call without a name")
    except (ValueError, TypeError):
        return {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
    content = parsed.get("content")
    parsed["content"] = content.removesuffix(tokenizer.eos_token or "") if isinstance(content, str) else ""
    return parsed


def tool_suffix_ids(tokenizer, tool_messages: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> list[int]:
    """The token ids the chat template puts after an assistant turn for these tool messages and the next
    assistant turn's opening: the template's rendering of a conversation with them, less its rendering
    without them (cut at the assistant turn's last EOS, the token the model itself wrote to end its turn)."""
    calls = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
    before = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    prefix = _ids(tokenizer.apply_chat_template(before, add_generation_prompt=False, tokenize=True, return_dict=False,
                                                **template_kwargs))
    full = _ids(tokenizer.apply_chat_template(before + tool_messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False, **template_kwargs))
    ends = [i for i, token in enumerate(prefix) if token == tokenizer.eos_token_id]
    if ends:
        prefix = prefix[: ends[-1] + 1]
    if full[: len(prefix)] != prefix:
        raise ToolError("spec.model.chatTemplate: rendering tool results changes the conversation before them, so "
                        "they cannot be appended to an episode")
    return full[len(prefix):]


def _ids(rendered) -> list[int]:
    return list(rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "input_ids") else rendered)


def check_tool_support(tokenizer, tools: list, template_kwargs: dict[str, Any], model_name: str) -> None:
    """Refuse, naming the field, a chat template that cannot show the tools or render their results, and a
    tokenizer that cannot parse tool calls."""
    if not tokenizer.chat_template:
        raise ToolError(f"spec.tools: the tokenizer of {model_name} has no chat template to show tools in; give one "
                        "as spec.model.chatTemplate")
    name = tools[0].__name__
    shown = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=tools, tokenize=False,
                                          add_generation_prompt=True, **template_kwargs)
    if name not in shown:
        raise ToolError(f"spec.tools: the chat template of {model_name} does not show tools to the model (no "
                        f"{name!r} in a prompt rendered with them); give one that does as spec.model.chatTemplate")
    if getattr(tokenizer, "response_template", None) is None:
        raise ToolError(f"spec.model.responseTemplate: the tokenizer of {model_name} has no response_template, so "
                        "its tool calls cannot be parsed; give one (transformers' format)")
    tool_suffix_ids(tokenizer, [{"role": "tool", "name": name, "content": "1"}], template_kwargs)


@dataclass
class Player:
    """Plays a step's completions out as episodes with the job's tools."""

    tokenizer: Any
    tools: list
    runner: ToolRunner
    max_tool_calls: int | None  # answered turns per episode; None: until the budget
    max_completion_length: int  # every token after the prompt
    max_model_len: int  # prompt + completion
    template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    environments: Any = None  # grpo_runtime.environments.Environments with spec.environment
    encode: Any = None  # (row, tools, observation) -> prompt ids: a rollout's own prompt, with an environment

    def rollout(self, engine, rows: list[dict[str, Any]], prompt_ids: list[list[int]], sampling: SamplingConfig,
                first_episode: int = 0) -> list[Completion]:
        """The episodes of `rows` (their prompt ids `prompt_ids`), sampling.n each. With environments, every rollout
        has its own instance, reset with its row: its prompt is the row's with the observation and the instance's
        tools, generated once each (seeded by the rollout)."""
        if self.environments is None:
            completions = engine.generate(prompt_ids, sampling)
            self.play(engine, prompt_ids, completions, sampling, first_episode)
            return completions
        owners = [index for index in range(len(rows)) for _ in range(sampling.n)]
        instances = self.environments.take([rows[index] for index in owners])
        own_ids, own_tools = [], []
        for index, instance in zip(owners, instances, strict=True):
            observation = self.environments.reset(instance, rows[index])
            own_tools.append(self.environments.tools_of(instance))
            own_ids.append(self.encode(rows[index], own_tools[-1], observation))
        keys = tuple(first_episode + k for k in range(len(own_ids)))
        completions = engine.generate(own_ids, dataclasses.replace(sampling, n=1, prompt_keys=keys))
        for completion, index, ids in zip(completions, owners, own_ids, strict=True):
            completion.prompt_index, completion.prompt_ids = index, ids
        self.play(engine, prompt_ids, completions, sampling, first_episode, instances, own_tools)
        return completions

    def play(self, engine, prompt_ids: list[list[int]], completions: list[Completion], sampling: SamplingConfig,
             first_episode: int = 0, environments: list | None = None, tools: list[list] | None = None) -> None:
        """Turn the first turn's `completions` (grouped, sampling.n per prompt; prompt_index into prompt_ids, or their
        own prompt_ids) into whole episodes, in place. `first_episode`: the step's index of the first of them (the
        seeds' key); `environments`, `tools`: each episode's own, with spec.environment."""
        for k, c in enumerate(completions):
            c.mask = [1] * len(c.completion_ids)
            mine = None if tools is None else tools[k]
            prompt = prompt_ids[c.prompt_index] if c.prompt_ids is None else c.prompt_ids
            c.episode = Episode([parse_reply(self.tokenizer, c.completion_ids, prompt, mine or self.tools)],
                                environment=None if environments is None else environments[k], tools=mine)
        keys = {id(c): first_episode + position for position, c in enumerate(completions)}
        active = [c for c in completions if c.episode.messages[-1].get("tool_calls")]
        turn = 0
        while active and (self.max_tool_calls is None or turn < self.max_tool_calls):
            results, counts = self.runner.run([c.episode.messages[-1]["tool_calls"] for c in active],
                                              [c.episode.tools for c in active])
            going, contexts = [], []
            for c, messages, count in zip(active, results, counts, strict=True):
                c.episode.calls += count.calls
                c.episode.failures += count.failures
                c.episode.timeouts += count.timeouts
                suffix = tool_suffix_ids(self.tokenizer, messages, self.template_kwargs)
                prompt = prompt_ids[c.prompt_index] if c.prompt_ids is None else c.prompt_ids
                written = len(c.completion_ids) + len(suffix)
                if written >= self.max_completion_length or len(prompt) + written >= self.max_model_len:
                    continue  # the results would not fit: the episode ends as it is (TRL drops them too)
                c.episode.messages.extend(messages)
                going.append((c, suffix))
                contexts.append(prompt + c.completion_ids + suffix)
            if not going:
                break
            room = self.max_completion_length - min(len(c.completion_ids) + len(s) for c, s in going)
            turn_sampling = dataclasses.replace(
                sampling, n=1, max_tokens=room, seed=None if sampling.seed is None else prompt_seed(
                    sampling.seed, TURN_SEED_OFFSET + turn),
                first_prompt=0, prompt_keys=tuple(keys[id(c)] for c, _ in going),
            )
            outs = engine.generate(contexts, turn_sampling)
            active = []
            for (c, suffix), context, out in zip(going, contexts, outs, strict=True):
                left = self.max_completion_length - len(c.completion_ids) - len(suffix)
                new = out.completion_ids[:left]
                given = out.logprobs if out.logprobs is not None else [math.nan] * len(out.completion_ids)
                before = c.logprobs if c.logprobs is not None else [math.nan] * len(c.completion_ids)
                c.logprobs = before + [math.nan] * len(suffix) + list(given[:left])
                c.completion_ids = c.completion_ids + suffix + new
                c.mask = c.mask + [0] * len(suffix) + [1] * len(new)
                c.truncated = out.truncated or len(out.completion_ids) > left
                c.episode.turns += 1
                if new:
                    reply = parse_reply(self.tokenizer, new, context, c.episode.tools or self.tools)
                    c.episode.messages.append(reply)
                    if reply.get("tool_calls") and not c.truncated:
                        active.append(c)
            turn += 1
        for c in completions:
            c.text = self.tokenizer.decode(c.completion_ids, skip_special_tokens=True)


def episode_metrics(completions: list[Completion]) -> dict[str, float]:
    """The step's tools/* metrics (TRL's call_frequency and failure_frequency, and ours): calls per episode, the
    share of calls that failed and that timed out, turns per episode, the share of episodes cut short."""
    episodes = [c.episode for c in completions if c.episode is not None]
    if not episodes:
        return {}
    calls = sum(e.calls for e in episodes)
    return {
        "tools/call_frequency": calls / len(episodes),
        "tools/failure_frequency": sum(e.failures for e in episodes) / calls if calls else 0.0,
        "tools/timeout_frequency": sum(e.timeouts for e in episodes) / calls if calls else 0.0,
        "tools/turns": sum(e.turns for e in episodes) / len(episodes),
        "tools/truncated_episodes": sum(c.truncated for c in completions if c.episode is not None) / len(episodes),
    }
