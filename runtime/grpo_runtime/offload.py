"""Activation memory: gradient checkpointing per decoder layer, optionally offloaded.

on:      each decoder layer keeps only its input; its activations are recomputed in backward
         (torch.utils.checkpoint, non-reentrant, through transformers' per-layer switch).
offload: the same, and those saved layer inputs (layers x batch x seq x hidden: what remains
         at long context) go to pinned host memory, copied on a side CUDA stream so the
         forward does not wait for them, and come back to the GPU for the recompute.

Wrapping a non-reentrant checkpoint in `saved_tensors_hooks` sees exactly the checkpoint's
inputs: inside, checkpoint's own hooks take over and store nothing. So the hooks move only
the layer inputs, never per-op activations.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

Mode = Literal["off", "on", "offload"]


class HostOffload:
    """saved_tensors_hooks pair that parks saved tensors in host memory until backward needs them.

    CUDA tensors: copied into pinned memory on a side stream (which first waits for the compute
    stream), non_blocking; the source stays allocated until that copy has run (record_stream).
    The copy back is queued on the compute stream after the side stream's event, so the host
    never blocks. CPU tensors (only when forced, for testing) are copied, with the same bookkeeping.
    """

    def __init__(self) -> None:
        self.packed = 0  # tensors offloaded so far (tests and logs)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def pack(self, tensor: torch.Tensor):
        if tensor.numel() == 0:
            # torch <= 2.11's checkpoint saves an empty dummy beside each layer's input: moving it
            # would cost a stream sync and an event per layer for no bytes.
            return tensor.device, tensor, None
        self.packed += 1
        if tensor.device.type != "cuda":
            return tensor.device, tensor.detach().clone(), None
        stream = self._streams.get(tensor.device)
        if stream is None:
            stream = self._streams[tensor.device] = torch.cuda.Stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
            host.copy_(tensor.detach(), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        tensor.record_stream(stream)
        return tensor.device, host, copied

    def unpack(self, packed) -> torch.Tensor:
        device, host, copied = packed
        if copied is None:
            return host.to(device)
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)

    def checkpoint(self, function, *args, **kwargs):
        """torch.utils.checkpoint with the layer inputs offloaded (the per-layer checkpoint function)."""
        kwargs.setdefault("use_reentrant", False)
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return checkpoint(function, *args, **kwargs)


def apply_gradient_checkpointing(model, mode: Mode, *, offload_on_cpu: bool = False) -> HostOffload | None:
    """Set the activation strategy of a transformers model (or a PeftModel around one).

    `offload` needs CUDA: on CPU the activations already live in host memory, so it falls back
    to `on` with a log line, unless `offload_on_cpu` (tests) forces the offload hooks anyway.
    Returns the HostOffload in use, or None.
    """
    if mode not in ("off", "on", "offload"):
        raise ValueError(f"spec.training.gradientCheckpointing: must be off, on or offload, got {mode!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.is_gradient_checkpointing:
        base.gradient_checkpointing_disable()
    base.disable_input_require_grads()
    if mode == "off":
        return None
    if not base.supports_gradient_checkpointing:
        raise ValueError(f"spec.training.gradientCheckpointing: {type(base).__name__} does not support it; use off")

    # Non-reentrant: gradients reach the LoRA weights even though the frozen embeddings'
    # output needs no grad; transformers also hooks the input embeddings to require grad.
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "on":
        return None

    on_cuda = next(base.parameters()).device.type == "cuda"
    if not on_cuda and not offload_on_cpu:
        log.info("gradientCheckpointing: offload moves activations off a GPU; on CPU it is the same as 'on'")
        return None
    from transformers.modeling_layers import GradientCheckpointingLayer

    offload = HostOffload()
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        log.warning("gradientCheckpointing: %s has no per-layer checkpointing; offload falls back to 'on'",
                    type(base).__name__)
        return None
    for layer in layers:
        # The documented per-layer hook of GradientCheckpointingLayer: the function it checkpoints through.
        layer._gradient_checkpointing_func = offload.checkpoint
    log.info("gradientCheckpointing: offload (%d layer inputs to pinned host memory)", len(layers))
    return offload
