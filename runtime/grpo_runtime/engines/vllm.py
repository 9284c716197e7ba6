"""Sampling with vLLM's offline `LLM`, in the training process, from the learner's current policy.

One process, one device: the engine core and its worker run in this process (V1 multiprocessing
off, world size 1), so `collective_rpc` hands the worker our own tensors, unserialised. The engine
loads the learner's own base (`Policy.source`; for a 4-bit learner, the learner's NF4 weights
written out once) in the learner's dtype, and is given the learner's update after every step.

Sleep (CUDA; the CPU build has none, its worker ignores it). The engine sleeps right after it is
built, so its first push happens with the KV cache released. Level 2 (weights discarded, nothing
copied to host) wherever the weights can be refilled from the learner's own GPU tensors at wake:
merged (every weight is pushed anyway) and lora over a bf16/fp16 base (the base is pushed back
device to device through `reload_weights`, then the adapter; vLLM drops adapters on a reload).
Level 1 (weights to pinned host RAM and back) only for a 4-bit learner, whose NF4 bytes and quant
states cannot go through the checkpoint loaders again, and for an architecture whose runtime
weight names are not the checkpoint's: a 4-bit 8B base is ~4.5 GiB of pinned host RAM, against
~16 GiB for bf16. `wake()` maps the weights, pushes, then maps the KV cache.

The engine's other parts, each in its module: what it is built as (vllm_sizing: sync mode, sizing, `LLM`'s
kwargs), the learner's weights as it takes them (vllm_weights), when it is not chosen or refuses a model
(vllm_refusals), and building vLLM with its failures sorted (vllm_build). The names callers used from this
module are imported here.

CUDA-only and checked here against vLLM 0.32's source only (the CPU build has no sleep, no CUDA
graphs, no bitsandbytes): sleep levels, the CUDA sizing and memory check, the NF4 base, OOM at
wake. The sleep/wake order is tested on CPU with a double that discards weights at level 2.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from grpo_runtime.engines.protocol import (
    Completion,
    EngineError,
    SamplingConfig,
    eos_token_ids,
    prompt_seed,
    sampling_config,
)
from grpo_runtime.messages import first_line

# The engine core must live in this process: weights are pushed from the learner's tensors.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

# An ImportError here is how make_engine learns that vllm is not usable.
import vllm  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402

# The engine's parts (vLLM imported first, above), and the names callers take from this module.
from grpo_runtime.engines.vllm_build import _build_llm, _out_of_memory_names_the_knobs  # noqa: E402
from grpo_runtime.engines.vllm_refusals import (  # noqa: E402, F401
    bitsandbytes_loader,
    cpu_unfit_reason,
    refuse_prequantized,
    weight_name_mismatch,
)
from grpo_runtime.engines.vllm_sizing import (  # noqa: E402, F401
    CPU_KV_BLOCK,
    KNOBS,
    KV_BLOCK,
    LORA,
    MAX_BATCHED_TOKENS,
    MERGED,
    engine_sizing,
    kv_bytes_per_token,
    llm_kwargs,
    sync_mode,
)
from grpo_runtime.engines.vllm_weights import (  # noqa: E402, F401
    _PUSH_INFO_LOGGERS,
    _RELOAD_LOGGER,
    _base_parameters,
    _ExpectedReloadGaps,
    _install_adapter,
    _routine_push_logs_quiet,
    adapter_state,
    base_weights,
    is_four_bit,
    merged_weights,
    write_nf4_checkpoint,
)

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
ADAPTER_ID, ADAPTER_NAME = 1, "grpo-policy"


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
            seed=None if sampling.seed is None else prompt_seed(sampling.seed, sampling.prompt_key(index)),
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
