"""Rollout engines: sample `n` completions per tokenised prompt from the current policy.

`hf` runs transformers `generate` on the learner's own model (CPU, or where vLLM is absent);
`vllm` (grpo_runtime.engines.vllm) runs vLLM in the training process and is pushed the
learner's weights after every optimizer step. Both return the same plain data.
"""

from __future__ import annotations

import logging

from grpo_runtime.engines.protocol import (
    Completion,
    Engine,
    EngineError,
    EngineResourceError,
    SamplingConfig,
    eos_token_ids,
    sampling_config,
)
from grpo_runtime.messages import first_line, one_line

__all__ = [
    "Completion",
    "Engine",
    "EngineError",
    "EngineResourceError",
    "SamplingConfig",
    "auto_engine",
    "eos_token_ids",
    "make_engine",
    "sampling_config",
]

log = logging.getLogger(__name__)


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
    one and safe (grpo_runtime.engines.vllm_refusals.cpu_unfit_reason), else hf."""
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

