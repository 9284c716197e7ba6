"""output.merged: final-merged/ is base + adapter folded in, loadable by transformers without peft."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from grpo_runtime.merge import merge_adapter
from grpo_runtime.model import ModelError
from grpo_runtime.rewards.builtin import completion_text
from tests.runtime.conftest import build_tiny_model
from tests.runtime.test_trainer import run_in_process, tiny_job

TEXT = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5"


def distinct_characters(prompts, completions, **columns):
    """A reward that differs between samples of a random model, so one step moves the adapter."""
    return [float(len(set(completion_text(c)))) for c in completions]


def token_logprobs(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]


def load_plain(path, dtype="auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def base_plus_adapter(base_dir, adapter_dir, dtype):
    from peft import PeftModel

    base, tokenizer = load_plain(base_dir, dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)), tokenizer


def random_adapter(base_dir, out_dir):
    """A LoRA whose B is not zero (init_lora_weights=False), so merging changes the outputs."""
    from peft import LoraConfig, get_peft_model

    base, _ = load_plain(base_dir, torch.float32)
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    return out_dir


def test_merged_folder_gives_the_log_probs_of_base_plus_adapter(tiny_model_dir, tmp_path):
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    out = merge_adapter(str(tiny_model_dir), adapter, tmp_path / "merged")

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not any(name.startswith("adapter_") for name in names)  # no peft needed
    merged, tokenizer = load_plain(out)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in key for key in merged.state_dict())
    tuned, _ = base_plus_adapter(tiny_model_dir, adapter, torch.float32)
    base, _ = load_plain(tiny_model_dir, torch.float32)

    got, want, before = (token_logprobs(m, tokenizer) for m in (merged, tuned, base))
    assert (want - before).abs().max() > 0.05  # the adapter matters...
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # ...and the merged model is base + adapter


def test_a_prequantized_base_is_refused_naming_the_field(tiny_model_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"spec\.output\.merged: the base model is stored pre-quantized"):
        merge_adapter(str(base), random_adapter(tiny_model_dir, tmp_path / "adapter"), tmp_path / "merged")


@pytest.fixture(scope="module")
def tiny_bf16_dir(tmp_path_factory):
    """The tiny Llama stored in bfloat16, like a hub base; hidden 64 (bitsandbytes' CPU kernels want
    rows of at least one 64-value quantization block)."""
    from transformers import AutoModelForCausalLM

    directory = build_tiny_model(tmp_path_factory.mktemp("tiny-bf16"), hidden_size=64)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    return directory


def test_qlora_job_merges_into_the_bf16_base_not_the_nf4_copy(tiny_bf16_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_ALLOW_CPU_4BIT", "1")
    out = tmp_path / "run"
    rewards = [{"name": "varied", "function": "tests.runtime.test_merge:distinct_characters"}]
    doc = tiny_job(tiny_bf16_dir, out, rewards=rewards, maxSteps=1)
    doc["spec"]["model"].update(loadIn4bit=True, dtype="bfloat16")
    doc["spec"]["output"]["merged"] = True
    assert run_in_process(doc) == 0

    merged_dir = out / "final-merged"
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    weights = load_file(str(merged_dir / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # the base's own dtype
    assert not any("absmax" in k or "quant" in k or "lora" in k for k in weights)

    # Each merged projection is the bf16 base weight + scale * B @ A, not the dequantized NF4 weight + delta.
    base = load_file(str(tiny_bf16_dir / "model.safetensors"))
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    lora_a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float()
    lora_b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].float()
    delta = (8 / 4) * lora_b @ lora_a  # zero when the step's gradient was (see the report: bnb CPU 4-bit)
    expected = base[key].float() + delta
    assert (weights[key].float() - expected).abs().max() <= 2 ** -7 * expected.abs().max()  # bf16 rounding
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(base[key], quant_type="nf4")
    nf4_error = (dequantize_4bit(packed, state).float() - base[key].float()).abs().max()
    assert (weights[key].float() - expected).abs().max() < nf4_error / 4

    merged, tokenizer = load_plain(merged_dir)
    tuned, _ = base_plus_adapter(tiny_bf16_dir, out / "final", torch.bfloat16)
    torch.testing.assert_close(token_logprobs(merged, tokenizer), token_logprobs(tuned, tokenizer), atol=0.05, rtol=0.02)
