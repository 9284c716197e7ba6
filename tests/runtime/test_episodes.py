"""Episodes with tools (spec.tools): the model's tool calls parsed, run and answered, generation going on from
the whole sequence, on both engines; the token ids, the mask and the parsed messages as TRL's
_tool_call_loop makes them; only what the model wrote trained on; rewards, samples and metrics see the episode.

The model is tests/runtime/scripted_model.py's: a real tiny Llama whose weights make it call the calculator on
every assistant turn, so every episode runs to its limit (maxToolCalls, or the completion budget)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import yaml

from grpo_runtime.engines import SamplingConfig
from grpo_runtime.engines.hf import HFEngine
from grpo_runtime.episodes import Player, check_tool_support, episode_metrics, tool_suffix_ids
from grpo_runtime.model import load_policy
from grpo_runtime.spec import LoraSpec, ModelSpec
from grpo_runtime.tools import ToolError, ToolRunner, load_tools
from tests.runtime.scripted_model import CALL, SCRIPT, build_tool_caller, qwen_templates
from tests.runtime.test_trainer import grpo_train, read_metrics, tiny_job

trl = pytest.importorskip("trl")  # a dev dependency: always there in CI


@pytest.fixture(scope="module")
def caller_dir(tmp_path_factory):
    return build_tool_caller(tmp_path_factory.mktemp("tool-caller"))


@pytest.fixture(scope="module")
def policy(caller_dir):
    return load_policy(ModelSpec(name=str(caller_dir), responseTemplate=qwen_templates()[1]), LoraSpec(rank=4, alpha=8),
                       seed=0)


@pytest.fixture(scope="module")
def tools():
    return load_tools(["builtin:calculator"])


def prompt_ids(policy, tools) -> list[int]:
    ids = policy.tokenizer.apply_chat_template([{"role": "user", "content": "What is 6*7?"}], tools=tools,
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)[-48:]


def play(policy, tools, *, budget: int, max_tool_calls: int | None = 2, n: int = 2):
    prompt = prompt_ids(policy, tools)
    engine = HFEngine(policy)
    sampling = SamplingConfig(n=n, max_tokens=budget, seed=1)
    completions = engine.generate([prompt], sampling)
    Player(policy.tokenizer, tools, ToolRunner(tools), max_tool_calls=max_tool_calls, max_completion_length=budget,
           max_model_len=1024).play(engine, [prompt], completions, sampling)
    return prompt, completions


def trl_suffix_ids(tokenizer, tool_messages):
    """TRL's own GRPOTrainer._get_tool_suffix_ids, on a stand-in holding what it reads."""
    from trl import GRPOTrainer

    trainer = SimpleNamespace(processing_class=tokenizer, _tokenizer=tokenizer, chat_template=None,
                              chat_template_kwargs={}, _is_vlm=False)
    return GRPOTrainer._get_tool_suffix_ids(trainer, tool_messages)


def test_an_episode_is_trls_ids_mask_and_messages(policy, tools):
    """Each turn's reply, then the tool results as TRL renders them (its own suffix code), then the next reply:
    the ids, the mask (0 on the tool results and their markers), the parsed messages (TRL's parse_response), the
    sampler's log-probs on the model's tokens only."""
    from trl.chat_template_utils import parse_response

    tokenizer = policy.tokenizer
    prompt, completions = play(policy, tools, budget=200, max_tool_calls=2)
    reply = tokenizer.convert_tokens_to_ids(SCRIPT) + [tokenizer.eos_token_id]
    result = {"role": "tool", "name": "calculator", "content": "42"}
    suffix = trl_suffix_ids(tokenizer, [result])
    assert suffix == tool_suffix_ids(tokenizer, [result], {})
    for c in completions:
        assert c.completion_ids == reply + suffix + reply + suffix + reply
        assert c.mask == [1] * 4 + [0] * len(suffix) + [1] * 4 + [0] * len(suffix) + [1] * 4
        assert [math.isnan(lp) for lp in c.logprobs] == [m == 0 for m in c.mask]
        assert not c.truncated
        turn = parse_response(tokenizer, reply, prefix=prompt, tools=tools)
        assert turn["tool_calls"] == [{"type": "function", "function": CALL}]
        assert c.episode.messages == [turn, result, turn, result, turn]  # the last call is past maxToolCalls
        assert (c.episode.turns, c.episode.calls, c.episode.failures) == (3, 2, 0)
    assert episode_metrics(completions) == {"tools/call_frequency": 2.0, "tools/failure_frequency": 0.0,
                                            "tools/timeout_frequency": 0.0, "tools/turns": 3.0,
                                            "tools/truncated_episodes": 0.0}


def test_the_budget_counts_every_token_after_the_prompt(policy, tools):
    """maxCompletionLength holds the tool results too: results that would not fit are dropped (the episode ends
    as it is, as TRL does); a reply that runs into the budget is cut there and the episode is truncated."""
    tokenizer = policy.tokenizer
    result = {"role": "tool", "name": "calculator", "content": "42"}
    suffix = len(tool_suffix_ids(tokenizer, [result], {}))
    _, dropped = play(policy, tools, budget=4 + suffix + 4 + suffix, max_tool_calls=None, n=1)
    (c,) = dropped
    assert len(c.completion_ids) == 4 + suffix + 4 and c.episode.calls == 2  # the second call ran, its result dropped
    assert [m["role"] for m in c.episode.messages] == ["assistant", "tool", "assistant"]
    _, cut = play(policy, tools, budget=4 + suffix + 2, max_tool_calls=None, n=1)
    (c,) = cut
    assert len(c.completion_ids) == 4 + suffix + 2 and c.truncated and c.mask[-2:] == [1, 1]
    assert episode_metrics(cut)["tools/truncated_episodes"] == 1.0


def test_a_template_that_cannot_hold_tools_is_refused_naming_the_field(caller_dir, tools):
    from tests.runtime.tiny_model import CHAT_TEMPLATE

    plain = load_policy(ModelSpec(name=str(caller_dir), chatTemplate=CHAT_TEMPLATE,
                                  responseTemplate=qwen_templates()[1]), LoraSpec(rank=4, alpha=8), seed=0)
    with pytest.raises(ToolError, match=r"spec.tools: the chat template of m does not show tools .* spec.model.chatTemplate"):
        check_tool_support(plain.tokenizer, tools, {}, "m")
    unparsed = load_policy(ModelSpec(name=str(caller_dir)), LoraSpec(rank=4, alpha=8), seed=0)
    with pytest.raises(ToolError, match=r"spec.model.responseTemplate: the tokenizer of m has no response_template"):
        check_tool_support(unparsed.tokenizer, tools, {}, "m")


def tool_job(caller_dir, output, engine: str) -> dict:
    doc = tiny_job(caller_dir, output, maxSteps=2, promptsPerStep=2,
                   rewards=[{"name": "answered", "function": "tests.runtime.episode_rewards:answered_42"},
                            {"name": "results", "function": "tests.runtime.episode_rewards:tool_results"}])
    spec = doc["spec"]
    spec["model"].update({"maxSeqLength": 512, "responseTemplate": qwen_templates()[1]})
    spec["tools"] = ["builtin:calculator"]
    spec["generation"].update({"engine": engine, "maxPromptLength": 48, "maxCompletionLength": 200, "maxToolCalls": 2})
    spec["training"]["logSamples"] = 2
    spec["evaluation"] = {"heldOut": 2}
    return doc


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_a_job_with_tools_trains_on_whole_episodes(caller_dir, tmp_path, engine):
    """grpo train on either engine: the rewards get the episode's messages, the samples show the episode, the
    step's metrics count the calls and turns (training and evaluation), and the completion length counts what the
    model wrote."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tool_job(caller_dir, tmp_path / "out", engine)))
    done = grpo_train(path)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(tmp_path / "out")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2
    for record in steps:
        assert record["rewards/answered/mean"] == 1.0 and record["rewards/results/mean"] == 2.0
        assert record["tools/call_frequency"] == 2.0 and record["tools/turns"] == 3.0
        assert record["tools/failure_frequency"] == 0.0
        assert record["completion_length/mean"] == 12.0  # 3 replies of 4 tokens; the tool results are not the model's
    evals = [r for r in records if "eval/accuracy" in r]
    assert evals and all(r["eval/tools/call_frequency"] == 2.0 for r in evals)
    sample = yaml.safe_load((tmp_path / "out" / "samples" / "step-1.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in sample["episode"]] == ["assistant", "tool", "assistant", "tool", "assistant"]


def test_a_missing_tool_fails_at_start_naming_the_field(caller_dir, tmp_path):
    doc = tool_job(caller_dir, tmp_path / "out", "hf")
    doc["spec"]["tools"] = ["builtin:calculator", "no_such_module_xyz:search"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    done = grpo_train(path)
    assert done.returncode == 2
    assert "spec.tools[1] (no_such_module_xyz:search): cannot import no_such_module_xyz" in done.stderr


# ----------------------------------------------------------------------------------------- environments


def env_job(caller_dir, output, engine: str) -> dict:
    doc = tool_job(caller_dir, output, engine)
    spec = doc["spec"]
    spec.pop("tools")
    spec["rewards"] = [{"name": "results", "function": "tests.runtime.episode_rewards:tool_results"}]
    spec["environment"] = {"factory": "tests.runtime.episode_envs:Abacus", "args": {"greeting": "Use the abacus."}}
    return doc


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_a_trl_environment_class_runs_unchanged(caller_dir, tmp_path, engine):
    """TRL's environment_factory contract: each rollout its own instance, reset with its row (the observation
    joins the prompt), its methods the rollout's tools (calls act on that instance), its get_reward a reward named
    after the class: 2 calls answered per episode, so 2 on every instance, on either engine."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(env_job(caller_dir, tmp_path / "out", engine)))
    done = grpo_train(path)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert len(steps) == 2
    for record in steps:
        assert record["rewards/Abacus/mean"] == 2.0 and record["rewards/results/mean"] == 2.0
        assert record["tools/call_frequency"] == 2.0


def test_environments_are_pooled_per_rollout_and_checked_at_start(tools):
    from grpo_runtime.environments import Environments
    from grpo_runtime.spec import EnvironmentSpec
    from tests.runtime.episode_envs import Abacus

    spec = EnvironmentSpec(factories={"a": "tests.runtime.episode_envs:Abacus"}, column="env")
    environments = Environments(spec, tools)
    made = Abacus.made
    first = environments.take([{"env": "a"}] * 3)
    assert len({id(e) for e in first}) == 3 and Abacus.made == made + 2  # the probe is the first
    assert environments.take([{"env": "a"}] * 2) == first[:2]  # reused, not made again
    assert environments.reset(first[0], {"env": "a", "answer": "4"}) == " Use the abacus."
    assert [t.__name__ for t in environments.tools_of(first[0])] == ["calculator", "calculator"]
    with pytest.raises(ToolError, match=r"spec.environment.column: a row has env='b', not one of 'a'"):
        environments.take([{"env": "b"}])
    with pytest.raises(ToolError, match=r"spec.environment.factory: NoReset has no reset\(\)"):
        Environments(EnvironmentSpec(factory="tests.runtime.episode_envs:NoReset"), [])
    with pytest.raises(ToolError, match=r"spec.environment.factory \(tests.runtime.episode_envs:Nothing\): .* has no"):
        Environments(EnvironmentSpec(factory="tests.runtime.episode_envs:Nothing"), [])


def test_episodes_over_two_ranks_are_the_one_process_ones(caller_dir, tmp_path):
    """A data-parallel job's episodes: each rank plays its prompts' (environments stay in the rank that made them,
    seeds keyed by the step's episode index); the metrics are the one-process run's."""
    logs = []
    for ranks in (1, 2):
        doc = env_job(caller_dir, tmp_path / f"out{ranks}", "hf")
        doc["spec"]["resources"] = {"gpus": ranks}
        path = tmp_path / f"job{ranks}.yaml"
        path.write_text(yaml.safe_dump(doc))
        done = grpo_train(path)
        assert done.returncode == 0, done.stderr[-3000:]
        logs.append([{k: v for k, v in r.items() if not k.endswith(("seconds", "per_second", "memory_mb"))}
                     for r in read_metrics(tmp_path / f"out{ranks}")])
    assert logs[0] == logs[1]
    assert any(r.get("rewards/Abacus/mean") == 2.0 for r in logs[1])


def test_the_status_progress_carries_the_episodes(caller_dir, tmp_path, monkeypatch):
    """The pod's status report (status.progress.tools, which the operator exports to Prometheus) has the step's
    episode figures; a step without tools has none."""
    import grpo_runtime.status as status
    from grpo_runtime.run import status_progress
    from grpo_runtime.spec import parse_job

    sent = []
    monkeypatch.setattr(status, "sink_from_env", lambda: SimpleNamespace(update=sent.append))  # the API server's stand-in
    update, _ = status_progress(parse_job(tool_job(caller_dir, tmp_path, "hf")))
    step = {"step": 1, "reward": 1.0, "kl": 0.0, "completion_length/mean": 12.0, "tokens_per_second": 3.0,
            "rewards/answered/mean": 1.0}
    update({**step, "tools/call_frequency": 2.0, "tools/failure_frequency": 0.25, "tools/turns": 3.0})
    update(step)
    assert sent[0]["tools"] == {"callFrequency": 2.0, "failureFrequency": 0.25, "turns": 3.0}
    assert "tools" not in sent[1]


def test_a_reply_that_does_not_parse_is_text_and_ends_the_episode(policy, tools):
    """A malformed call (TRL's parse_response falls back the same way) is the reply's text, with no tool call."""
    from grpo_runtime.episodes import parse_reply

    tokenizer = policy.tokenizer
    prompt = prompt_ids(policy, tools)
    for text in ['<tool_call>\n{"name": "calculator", "arguments": {"expression": </tool_call><|im_end|>',
                 '<tool_call>\n{"arguments": {"expression": "1+1"}}\n</tool_call><|im_end|>']:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        reply = parse_reply(tokenizer, ids, prompt, tools)
        assert reply == {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
