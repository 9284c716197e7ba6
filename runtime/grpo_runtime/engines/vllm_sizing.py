"""What the vLLM engine is built as: pure functions of the job and the policy. The weight sync mode
(sync_mode), the engine's sizing (EngineSizing, engine_sizing, kv_bytes_per_token, lora_slot_rank) and the
kwargs `LLM` is built with (llm_kwargs). Imported through grpo_runtime.engines.vllm, which keeps vLLM's
engine core in this process before vLLM is imported.

Memory, from the job rather than vLLM's defaults: `max_num_seqs` = promptsPerStep x
numGenerations (one rollout), `max_num_batched_tokens` = that many prompts of maxPromptLength
(capped at 8192 on CUDA), the KV cache = those sequences at full length (keys and values of every layer;
fp8 halves it), CUDA graphs captured up to max_num_seqs only. `gpuMemoryUtilization` is vLLM's
budget: weights + that KV cache must fit in it (else exit 2 naming the knobs), and vLLM checks at
start that so much is free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from vllm.config.lora import MaxLoRARanks

from grpo_runtime.engines.protocol import EngineError
from grpo_runtime.engines.vllm_weights import _adapter_ranks

log = logging.getLogger("grpo_runtime.engines.vllm")  # the engine's one logger, whichever of its modules logs

MERGED, LORA = "merged", "lora"
LORA_RANKS = tuple(sorted(get_args(MaxLoRARanks)))  # the ranks vLLM allocates LoRA slots for
MAX_BATCHED_TOKENS = 8192  # prefill budget per engine step: bounds vLLM's activation peak
KV_BLOCK = 16  # vLLM's KV block size in tokens on CUDA
# On CPU vLLM defaults to 128-token blocks (its attention kernel takes multiples of 32): a cache sized
# in 16-token blocks then holds fewer sequences than the rollout. The engine asks for 32 there.
CPU_KV_BLOCK = 32
KNOBS = (
    "spec.generation.gpuMemoryUtilization, spec.training.promptsPerStep x spec.generation.numGenerations, "
    "spec.generation.maxPromptLength + maxCompletionLength, spec.generation.float8KvCache"
)


def sync_mode(dtype: torch.dtype) -> str:
    """merged only where W + delta is exact to the learner's own rounding (float32); lora elsewhere."""
    return MERGED if dtype == torch.float32 else LORA


@dataclass(frozen=True)
class EngineSizing:
    max_num_seqs: int  # one rollout: promptsPerStep x numGenerations
    max_num_batched_tokens: int
    max_model_len: int
    kv_cache_bytes: int  # every sequence of the rollout at full length


def engine_sizing(
    generation_spec,
    prompts_per_step: int,
    kv_bytes_per_token: int,
    *,
    cap: int | None = MAX_BATCHED_TOKENS,
    block: int = KV_BLOCK,
) -> EngineSizing:
    """The rollout's sequences, their prefill in one engine step (each of the n samples of a prompt
    is prefilled on its own), up to `cap` tokens: on CUDA that bounds vLLM's activation peak and
    longer prefills are chunked. The CPU build cannot chunk a seeded request's prefill (its CPU
    generators have no offset to rewind): no cap there."""
    seqs = prompts_per_step * generation_spec.num_generations
    max_model_len = generation_spec.max_prompt_length + generation_spec.max_completion_length
    blocks = -(-max_model_len // block) + 1  # whole blocks, plus one for the token being written
    prefill = seqs * generation_spec.max_prompt_length
    batched = max(seqs, prefill if cap is None else min(prefill, cap))
    return EngineSizing(
        max_num_seqs=seqs,
        max_num_batched_tokens=batched,
        max_model_len=max_model_len,
        kv_cache_bytes=seqs * blocks * block * kv_bytes_per_token,
    )


def kv_bytes_per_token(config, dtype: torch.dtype, fp8: bool) -> int:
    """Keys and values of one token in every layer."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * (1 if fp8 else dtype.itemsize)


def lora_slot_rank(rank: int) -> int:
    """The smallest LoRA slot vLLM allocates that holds `rank`; EngineError past the largest."""
    for slot in LORA_RANKS:
        if slot >= rank:
            return slot
    raise EngineError(
        f"spec.lora.rank: vLLM serves LoRA adapters up to rank {LORA_RANKS[-1]}, got {rank}; "
        "lower it, train in float32 (spec.model.dtype: float32, merged weights) or use engine: hf"
    )


def llm_kwargs(
    generation_spec, policy, model_spec, *, sizing: EngineSizing, mode: str, cuda: bool, model_path: str
) -> dict[str, Any]:
    """What `LLM` is built with: the learner's model as the spec names it, sized from the job.

    `model_path` is `policy.source`, or for a 4-bit learner served by LoRA the folder holding its
    NF4 weights (`write_nf4_checkpoint`); the tokenizer is always the source's.
    """
    nf4 = model_path != policy.source
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tokenizer": policy.source,
        "dtype": str(policy.dtype).removeprefix("torch."),
        "max_model_len": sizing.max_model_len,
        "max_num_seqs": sizing.max_num_seqs,
        "max_num_batched_tokens": sizing.max_num_batched_tokens,
        "kv_cache_memory_bytes": sizing.kv_cache_bytes,
        "generation_config": "vllm",  # exactly the distribution asked for, not the model's defaults
        "trust_remote_code": model_spec.trust_remote_code,
        "seed": 0,
        "logprobs_mode": "processed_logprobs",  # the sampled tokens' log-probs after temperature, top-k/p
        # an episode's next turn is the episode so far: its KV blocks are reused, not prefilled again (vLLM's
        # default, relied on here; the engine resets the cache whenever the weights change)
        "enable_prefix_caching": True,
    }
    if model_spec.revision and not Path(policy.source).is_dir():
        kwargs["tokenizer_revision"] = model_spec.revision
        if not nf4:
            kwargs["revision"] = model_spec.revision
    if generation_spec.float8_kv_cache:
        kwargs["kv_cache_dtype"] = "fp8"
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # a rank of a data-parallel job (torchrun): an engine of its own on its GPU, in this process, as TRL's colocate
        # mode builds it; vLLM then takes the node's LOCAL_RANK-th GPU instead of spawning workers. Seeds are per
        # request (prompt_seed), so the engine's own seed changes nothing.
        kwargs["distributed_executor_backend"] = "external_launcher"
    if mode == LORA:
        kwargs.update(
            enable_lora=True,
            max_loras=1,
            max_lora_rank=lora_slot_rank(max(_adapter_ranks(policy.model))),
        )
    if cuda:
        kwargs.update(gpu_memory_utilization=generation_spec.gpu_memory_utilization, enable_sleep_mode=True)
        if generation_spec.enforce_eager:
            kwargs["enforce_eager"] = True
        else:
            from vllm.config import CompilationConfig

            kwargs["compilation_config"] = CompilationConfig(max_cudagraph_capture_size=sizing.max_num_seqs)
        if nf4:
            kwargs["quantization"] = "bitsandbytes"
    else:
        kwargs["enforce_eager"] = True  # no torch.compile warm-up (minutes on a small CPU)
        kwargs["block_size"] = CPU_KV_BLOCK  # the block engine_sizing sized the cache in
        log.info(
            "vllm on CPU: no sleep mode (the KV cache stays allocated between rollouts); "
            "KV cache sized for %d sequences of %d tokens",
            sizing.max_num_seqs,
            sizing.max_model_len,
        )
    return kwargs
