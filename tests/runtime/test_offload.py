"""Gradient checkpointing (and its offloaded form) changes memory, never the gradients."""

from __future__ import annotations

import logging

import pytest
import torch

from grpo_runtime.model import decoder_hidden_states, lm_head, load_policy
from grpo_runtime.offload import HostOffload, apply_gradient_checkpointing
from grpo_runtime.spec import LoraSpec, ModelSpec


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    loaded = load_policy(ModelSpec(name=str(tiny_model_dir)), LoraSpec(rank=4, alpha=8, dropout=0.0), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # nonzero B, so the A matrices get gradients too
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return loaded


def lora_grads(policy) -> dict[str, torch.Tensor]:
    """Gradients of a logsumexp loss over the decoder output, like the fused loss uses it."""
    model = policy.model
    model.train()
    model.zero_grad(set_to_none=True)
    encoded = policy.tokenizer(["checkpoint me please", "and me"], padding=True, return_tensors="pt").to(policy.device)
    hidden = decoder_hidden_states(model, encoded["input_ids"], encoded["attention_mask"])
    weight, _ = lm_head(model)
    logits = hidden @ weight.T
    (logits.logsumexp(-1) * encoded["attention_mask"]).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_are_identical_off_on_and_offloaded(policy):
    apply_gradient_checkpointing(policy.model, "off")
    reference = lora_grads(policy)
    assert all(g.abs().sum() > 0 for g in reference.values())

    for mode in ("on", "offload"):
        offload = apply_gradient_checkpointing(policy.model, mode, offload_on_cpu=True)
        grads = lora_grads(policy)
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-6, atol=1e-6, msg=f"{mode}: {name}")
        if mode == "offload":
            assert offload.packed == 2  # exactly one saved input per decoder layer went to host memory
    apply_gradient_checkpointing(policy.model, "off")


def test_checkpointed_layers_are_recomputed_in_backward(policy):
    layer = policy.model.get_base_model().get_decoder().layers[0]
    calls = []
    handle = layer.register_forward_pre_hook(lambda *args: calls.append(1))  # the recompute stops early
    try:
        for mode, expected in (("off", 1), ("on", 2), ("offload", 2)):
            apply_gradient_checkpointing(policy.model, mode, offload_on_cpu=True)
            calls.clear()
            lora_grads(policy)
            assert len(calls) == expected, mode
    finally:
        handle.remove()
        apply_gradient_checkpointing(policy.model, "off")


def test_offload_on_cpu_falls_back_to_checkpointing_and_says_so(policy, caplog):
    base = policy.model.get_base_model()
    with caplog.at_level(logging.INFO, logger="grpo_runtime.offload"):
        assert apply_gradient_checkpointing(policy.model, "offload") is None
    assert "on CPU it is the same as 'on'" in caplog.text
    assert base.is_gradient_checkpointing
    apply_gradient_checkpointing(policy.model, "off")
    assert not base.is_gradient_checkpointing
    with pytest.raises(ValueError, match="gradientCheckpointing"):
        apply_gradient_checkpointing(policy.model, "sometimes")


def test_load_policy_applies_the_mode(tiny_model_dir):
    loaded = load_policy(ModelSpec(name=str(tiny_model_dir)), LoraSpec(rank=2), gradient_checkpointing="on")
    assert loaded.model.get_base_model().is_gradient_checkpointing


def test_host_offload_round_trips_saved_tensors():
    hooks = HostOffload()
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        y = (x.sin() * x).sum()
    y.backward()
    torch.testing.assert_close(x.grad, x.detach().cos() * x.detach() + x.detach().sin())
    assert hooks.packed >= 1


def test_host_offload_leaves_empty_tensors_in_place_and_uncounted():
    """torch <= 2.11's non-reentrant checkpoint saves a 0-element dummy beside each layer input."""
    hooks = HostOffload()
    dummy = torch.empty((0,), requires_grad=True)
    packed = hooks.pack(dummy)
    assert hooks.packed == 0
    assert hooks.unpack(packed) is dummy
    hooks.unpack(hooks.pack(torch.ones(3)))
    assert hooks.packed == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned-memory offload needs CUDA")
def test_offload_on_cuda_moves_layer_inputs_to_pinned_host_memory(tiny_model_dir):
    loaded = load_policy(ModelSpec(name=str(tiny_model_dir), dtype="float32"), LoraSpec(rank=4), device="cuda")
    apply_gradient_checkpointing(loaded.model, "off")
    reference = lora_grads(loaded)
    offload = apply_gradient_checkpointing(loaded.model, "offload")
    packed = []
    original = offload.pack
    offload.pack = lambda t: packed.append(original(t)) or packed[-1]
    grads = lora_grads(loaded)
    moved = [host for _, host, _ in packed if host.numel()]  # torch <= 2.11 also saves an empty dummy per layer
    assert moved and all(host.is_pinned() and host.device.type == "cpu" for host in moved)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-6, atol=1e-6)
