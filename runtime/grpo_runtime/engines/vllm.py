"""Sampling with vLLM's offline `LLM`, in the training process, pushed the learner's weights every step.

One process, one device: the engine core runs in this process (V1 multiprocessing off), loads the
learner's own base folder (`Policy.source`, the safetensors cache for a `.gguf`) in the learner's
dtype, and samples from whatever weights it was last pushed.

Weight sync: merged weights, pushed in place. `sync` (after every optimizer step) streams every
base weight, its LoRA delta (B @ A * alpha / r) added, one tensor at a time into
`collective_rpc("reload_weights")`, which runs them through the model's own loaders (stacked
qkv / gate_up, CPU repacking) into the existing storage; then the prefix cache is reset (its KV
belongs to the old weights). Everything is pushed, not only the LoRA targets: vLLM stacks q/k/v
and gate/up into one layer, and a layer given part of its weights is rebuilt with the rest unset.
The other way, a LoRA adapter by request with a new id each step (Unsloth's), was built and
measured against it on SmolLM2 (LoRA r16 on all 7 projections, fp32, 2 busy CPU cores):
  - sync: adapter saved ~0.1 s; merged push 0.4 s (bench/engines.py).
  - rollout of 8 x 48 tokens: 86-140 s through vLLM's LoRA kernels, 25 s on the same engine
    without the adapter (merged weights run exactly that way): 3.5-5.5x slower, every step.
  - peak RSS, learner + engine (1 GiB KV cache each): 2.95 GB with LoRA slots, 3.34 GB merged
    (the push's transient tensors): 0.4 GB more, against minutes saved per step.
Merged wins the step by far and keeps vLLM's plain kernels on GPU as well (no punica, no
max_lora_rank ladder, CUDA graphs as they are); it also lets a 4-bit learner be pushed exactly its
dequantized base plus delta, so the engine samples from the weights the learner computes with.

Memory. CUDA: sleep mode is on; `sleep()` is level 1 (KV cache dropped, weights offloaded to host)
for the learner's phase; a `sync` while asleep is kept pending, and `wake()` brings the weights
back, pushes it, then re-allocates the KV cache. `gpuMemoryUtilization` is vLLM's share of the
GPU. CPU: vLLM's CPU build has no sleep mode (its worker ignores it), so `sleep`/`wake` do nothing
and `sync` pushes at once; it reads `gpu_memory_utilization` as a share of host RAM, so the KV
cache is sized to the job instead (4 groups of numGenerations at full length;
VLLM_CPU_KVCACHE_SPACE, in GiB, overrides). `float8KvCache` asks for an fp8 KV cache, which vLLM
honours on CUDA and on CPU alike. The CUDA paths (sleep/wake, gpuMemoryUtilization, CUDA graphs)
are checked against vLLM 0.32's API by review only: its CUDA wheel cannot reach the lent GPU.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from grpo_runtime.engines import Completion, EngineError, SamplingConfig, eos_token_ids, sampling_config

# The engine core must live in this process: weights are pushed from the learner's tensors.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

# An ImportError here is how make_engine learns that vllm is not usable.
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

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
KV_CACHE_GROUPS_ON_CPU = 4  # rollouts of this many prompts x numGenerations fit the CPU KV cache at full length


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
            raise EngineError(f"{where}: {_first_line(exc)}") from None
    return dict(extra)


class VLLMEngine:
    name = "vllm"

    def __init__(self, generation_spec, policy):
        self.tokenizer = policy.tokenizer
        self.eos_ids = eos_token_ids(policy.model, policy.tokenizer, self.name)
        try:  # refuse bad samplingParams, alone or with the rest of the section, before loading anything
            self._sampling_params(sampling_config(generation_spec, seed=0), 0)
        except (ValueError, VLLMValidationError) as exc:
            raise EngineError(f"spec.generation.samplingParams: {_first_line(exc)}") from None
        self.cuda = policy.device.type == "cuda"
        if self.cuda and policy.device.index not in (None, 0):
            raise EngineError(
                f"spec.generation.engine: vllm runs on cuda:0 and the learner is on {policy.device}; "
                "select the GPU with CUDA_VISIBLE_DEVICES instead"
            )
        max_model_len = generation_spec.max_prompt_length + generation_spec.max_completion_length
        kwargs: dict[str, Any] = {
            "model": policy.source,
            "dtype": str(policy.dtype).removeprefix("torch."),
            "max_model_len": max_model_len,
            "generation_config": "vllm",  # exactly the distribution asked for, not the model's defaults
            "seed": 0,
            "logprobs_mode": "processed_logprobs",  # the sampled tokens' log-probs after temperature, top-k/p
        }
        if generation_spec.float8_kv_cache:
            kwargs["kv_cache_dtype"] = "fp8"
        if self.cuda:
            kwargs.update(gpu_memory_utilization=generation_spec.gpu_memory_utilization, enable_sleep_mode=True)
        else:
            groups = KV_CACHE_GROUPS_ON_CPU * generation_spec.num_generations
            kwargs.update(
                enforce_eager=True,  # no torch.compile warm-up (minutes on a small CPU)
                kv_cache_memory_bytes=groups * max_model_len * _kv_bytes_per_token(policy, generation_spec.float8_kv_cache),
            )
            log.info(
                "vllm on CPU: no sleep mode (the KV cache stays allocated between rollouts); "
                "spec.generation.gpuMemoryUtilization does not apply, KV cache sized for %d sequences "
                "of %d tokens (VLLM_CPU_KVCACHE_SPACE overrides, in GiB)",
                groups,
                max_model_len,
            )
        self.llm = _build_llm(kwargs)
        self.asleep = False
        self.policy = policy
        self.pending = True  # push once before the first rollout: whatever the adapter starts as
        self.last_sync_seconds = 0.0

    # -- the Engine protocol ----------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        if any(len(ids) == 0 for ids in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        self.wake()
        if self.pending:
            self._push()
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        params = [self._sampling_params(sampling, index) for index in range(len(prompt_ids))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
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
        """Push the learner's merged weights now, or at wake() when asleep (sleeping weights live on the host)."""
        self.policy, self.pending = policy, True
        if not self.asleep:
            self._push()

    def sleep(self) -> None:
        if self.cuda and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if not self.asleep:
            return
        self.llm.wake_up(tags=["weights"])
        if self.pending:
            self._push(reset_prefix_cache=False)  # sleeping dropped the KV cache and its prefix index
        self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False

    def close(self) -> None:
        """Free the engine now. vLLM keeps its parallel state per process and an engine's shutdown
        (this, or garbage collection) tears it down: open one engine at a time, close it first."""
        self.llm.llm_engine.engine_core.shutdown()

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
            stop_token_ids=self.eos_ids + list(extra.pop("stop_token_ids", None) or []),
            # one generator per prompt, derived from the call's seed: reproducible, independent of batching
            seed=None if sampling.seed is None else (sampling.seed * 1_000_003 + index) % 2**63,
            **extra,
        )

    def _push(self, *, reset_prefix_cache: bool = True) -> None:
        started = time.perf_counter()
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": merged_weights(self.policy.model)})
        if reset_prefix_cache:
            self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.pending = False
        self.last_sync_seconds = time.perf_counter() - started
        log.debug("pushed merged weights to vllm in %.2fs", self.last_sync_seconds)


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


def _dense(param: torch.Tensor) -> torch.Tensor:
    quant_state = getattr(param, "quant_state", None)
    if quant_state is None:
        return param.detach()
    import bitsandbytes.functional as bnb

    return bnb.dequantize_4bit(param.data, quant_state)


def _build_llm(kwargs: dict[str, Any]):
    """LLM(**kwargs), leaving the training process as it found it.

    In-process, vLLM's worker seeds the global RNGs, drops torch to one intra-op thread and
    replaces `torch.set_num_threads` with a no-op (settings meant for its own worker process):
    the learner's RNG streams, thread count and function are put back.
    """
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return LLM(**kwargs)
    except (ValueError, NotImplementedError, RuntimeError) as exc:  # vLLM's word on an unusable configuration
        raise EngineError(f"spec.generation: vllm cannot run this model/configuration ({_first_line(exc)})") from exc
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _kv_bytes_per_token(policy, fp8: bool) -> int:
    """Keys and values of one token in every layer."""
    config = policy.model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    element = 1 if fp8 else policy.dtype.itemsize
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
