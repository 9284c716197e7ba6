"""Rollout engines: sample `n` completions per tokenised prompt from the current policy.

`hf` runs transformers `generate` on the learner's own model (CPU, or where vLLM is absent);
`vllm` (grpo_runtime.engines.vllm) runs vLLM in the training process and is pushed the
learner's weights after every optimizer step. Both return the same plain data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from grpo_runtime.messages import first_line, one_line

log = logging.getLogger(__name__)


class EngineError(Exception):
    """The generation section cannot be honoured (engine missing, unsupported parameter): exit 2."""


class EngineResourceError(RuntimeError):
    """The engine ran out of something the machine may have next time (GPU memory at start or at
    wake, a driver or compiler failure): exit 1, retried from the last checkpoint. The message
    names the spec knob that makes it fit."""


@dataclass(frozen=True)
class SamplingConfig:
    n: int  # completions per prompt
    max_tokens: int
    temperature: float = 1.0  # <= 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    stop: tuple[str, ...] = ()  # strings that end a completion (kept in it)
    seed: int | None = None  # None: draw from the global RNG
    extra: dict[str, Any] = field(default_factory=dict)  # spec.generation.samplingParams


@dataclass
class Completion:
    prompt_index: int
    completion_ids: list[int]  # ends with EOS or the token completing a stop string, unless truncated
    text: str  # completion_ids decoded, special tokens skipped
    truncated: bool  # hit max_tokens without EOS or a stop string
    # log-prob of each completion token under the distribution it was sampled from (after temperature and
    # top-k/top-p/min-p), as the engine computed it; None when the engine gives none. The loss's sampling
    # correction compares it with the learner's.
    logprobs: list[float] | None = None


class Engine(Protocol):
    name: str
    # seconds the last push of the learner's weights took (0 where generation runs on the learner's own
    # model); a sleeping engine pushes at its next wake, so a step reads it after generating
    last_sync_seconds: float

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """len(prompt_ids) * n completions, grouped: all n of prompt 0, then prompt 1, ..."""
        ...

    def sync(self, policy) -> None:
        """Make the engine sample from the learner's current weights."""
        ...

    def sleep(self) -> None:
        """Release what generation holds (KV cache, weights) while the learner trains."""
        ...

    def wake(self) -> None:
        """Take it back before the next rollout."""
        ...


def eos_token_ids(model, tokenizer, engine: str) -> list[int]:
    """The tokens that end a completion: the generation config's EOS and the tokenizer's, deduplicated."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for token in source if isinstance(source, list) else [source]:
            if token is not None and token not in ids:
                ids.append(token)
    if not ids:
        raise EngineError(f"spec.model.name: the tokenizer has no EOS token; the {engine} engine needs one")
    return ids


def sampling_config(generation_spec, *, seed: int | None = None, n: int | None = None) -> SamplingConfig:
    """The SamplingConfig a GenerationSpec describes."""
    return SamplingConfig(
        n=n if n is not None else generation_spec.num_generations,
        max_tokens=generation_spec.max_completion_length,
        temperature=generation_spec.temperature,
        top_p=generation_spec.top_p,
        top_k=generation_spec.top_k,
        min_p=generation_spec.min_p,
        stop=tuple(generation_spec.stop),
        seed=seed,
        extra=dict(generation_spec.sampling_params),
    )


def make_engine(generation_spec, policy, *, training_spec=None, model_spec=None) -> Engine:
    """The engine spec.generation.engine names; `auto` is resolved by `auto_engine`.

    The vLLM engine is sized from the job (prompts per step x numGenerations, the lengths) and
    loads the model as the spec names it (revision, trustRemoteCode): pass the job's sections.
    """
    choice = generation_spec.engine
    if choice == "auto":
        choice, why = auto_engine(policy, model_spec)
        log.info("generation engine: %s (engine: auto)%s", choice, f": {why}" if why else "")
        if choice == "vllm" and policy.device.type == "cpu":
            try:
                return _vllm_engine(generation_spec, policy, training_spec, model_spec)
            except Exception as exc:  # noqa: BLE001  on CPU vLLM is a speed-up only: hf samples the same policy
                log.warning("generation engine: hf (engine: auto): vLLM could not start on CPU (%s)", one_line(exc))
                choice = "hf"
    if choice == "vllm":
        return _vllm_engine(generation_spec, policy, training_spec, model_spec)
    if choice != "hf":
        raise EngineError(f"spec.generation.engine: must be auto, vllm or hf, got {choice!r}")
    from grpo_runtime.engines.hf import HFEngine, hf_sampling_kwargs

    hf_sampling_kwargs(generation_spec.sampling_params)  # refuse vLLM-only parameters before training starts
    return HFEngine(policy, fp32_logits=bool(training_spec and training_spec.cast_lm_head_to_fp32))


def auto_engine(policy, model_spec=None) -> tuple[str, str | None]:
    """(engine, why not vllm): vLLM on CUDA whenever it imports; on CPU only where it is the faster
    one and safe (grpo_runtime.engines.vllm.cpu_unfit_reason), else hf."""
    try:
        from grpo_runtime.engines import vllm as vllm_engine
    except Exception as exc:  # ImportError, or a broken install failing at import: as good as none
        return "hf", f"vllm is not usable here ({first_line(exc)})"
    if policy.device.type == "cuda":
        return "vllm", None
    from grpo_runtime.spec import ModelSpec

    why = vllm_engine.cpu_unfit_reason(policy, model_spec or ModelSpec(name=policy.source))
    return ("hf", why) if why else ("vllm", None)


def _vllm_engine(generation_spec, policy, training_spec, model_spec) -> Engine:
    try:
        from grpo_runtime.engines.vllm import VLLMEngine
    except Exception as exc:  # ImportError, or a broken install failing at import: the user's to fix
        raise EngineError(
            f"spec.generation.engine: vllm is not usable here ({first_line(exc)}); install the gpu extra or use engine: hf"
        ) from None
    return VLLMEngine(generation_spec, policy, training_spec=training_spec, model_spec=model_spec)

