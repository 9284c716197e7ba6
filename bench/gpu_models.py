"""Random-init models of the real shapes for the GPU suite: no hub on the GPU machine, and memory and speed
depend on the shapes, not on the weights.

Configs are those of the models the examples name (config.json on the hub); `build_model` saves a model
of one of them with a tokenizer of its whole vocabulary in which every letter is one token, so that a
prompt of N letters is exactly N tokens, and vLLM, TRL and our runtime all load the folder as they would
load the real model.
"""

from __future__ import annotations

from pathlib import Path

QWEN_1_5B = dict(  # Qwen/Qwen2.5-1.5B-Instruct config.json
    model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
LLAMA_8B = dict(  # meta-llama/Llama-3.1-8B-Instruct config.json (llama3 rope scaling left out: same cost)
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=5e5, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=4096)
# vLLM's CPU build has attention kernels for head sizes of 32 and up: the CPU twin of a vLLM run uses this one
TINY_VLLM = dict(TINY, num_attention_heads=2, num_key_value_heads=1, head_dim=32)

SPECIAL = ("<|pad|>", "<|im_start|>", "<|im_end|>")


def letters_tokenizer(vocab_size: int):
    """A byte-level BPE without merges, padded to exactly `vocab_size` ids: every byte is one token, the other
    ids are filler tokens that decode as themselves, the three special tokens last. Byte-level BPE because
    transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer whatever tokenizer_config names, and
    that class keeps a BPE's vocabulary and merges (a word-level vocabulary would encode every prompt to [])."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"<f{i}>": i for i in range(len(vocab), vocab_size - len(SPECIAL))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token="<|im_start|>")


def build_model(directory: Path, config: dict, *, device: str = "cpu", dtype: str = "bfloat16") -> Path:
    """A random-init causal LM of `config` (model_type included) with `letters_tokenizer`, saved as a plain HF
    folder (safetensors, config, generation config, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = dict(config)
    tokenizer = letters_tokenizer(config["vocab_size"])
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id)
    hf_config = AutoConfig.for_model(config.pop("model_type"), initializer_range=0.02, **config, **ids)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return Path(directory)


def letters_prompt(n_tokens: int, seed: int) -> str:
    """`n_tokens` random lowercase letters: exactly that many tokens of `letters_tokenizer`."""
    import random
    import string

    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n_tokens))


def param_count(config: dict) -> int:
    """Parameters of a decoder of `config` (attention, MLP, embeddings; norms left out)."""
    h, i, n, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return n * per_layer + v * h * (1 if config.get("tie_word_embeddings") else 2)


def scratch_dir(need_bytes: float) -> str:
    """Page-cache-backed /dev/shm when it has room (writing 16 GB to a VM disk costs a minute)."""
    import os
    import shutil
    import tempfile

    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > 1.3 * need_bytes:
        return shm
    return tempfile.gettempdir()

