"""A tiny Llama that calls a tool: real weights, built so that its next token depends on its last token only.

A random tiny model never writes a well-formed tool call, so the episode tests use one that always does. Its
attention and MLP outputs are zeroed (the residual stream is the token's embedding), and its lm_head maps each
token of a script to the next one with a wide margin: after "\\n" (the end of Qwen's "<|im_start|>assistant\\n",
where every assistant turn starts) it writes `<tool_call>`, the call's JSON, `</tool_call>` and <|im_end|>,
three of them added tokens. It runs on both engines like any Llama; sampling at temperature 1 picks the
scripted token (its logit is ~hundreds above the others). Nothing trains through zeroed layers, so the
episode tests check the rollouts and the batch, not learning.
"""

from __future__ import annotations

import json
from pathlib import Path

CALL = {"name": "calculator", "arguments": {"expression": "6*7"}}
SCRIPT = ["<tool_call>", "\n" + json.dumps(CALL) + "\n", "</tool_call>"]  # then <|im_end|>


def qwen_templates() -> tuple[str, dict]:
    """Qwen 2.5's chat template (tools in the system turn, results as <tool_response> in a user turn) and the
    response template that parses its <tool_call> JSON, as TRL ships them (TRL is a dev dependency)."""
    from trl.chat_template_utils import qwen2_5_chat_template, qwen3_template

    return qwen2_5_chat_template, qwen3_template


def build_tool_caller(directory: Path, *, hidden_size: int = 64, heads: int = 2, kv_heads: int = 1) -> Path:
    """The scripted model (vLLM's CPU attention needs head_dim 32: the default shapes) with a byte-level ChatML
    tokenizer that also holds the script's three tokens, saved as a plain HF folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tests.runtime.tiny_model import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens(SCRIPT)
    chat_template, _ = qwen_templates()
    tokenizer.chat_template = chat_template

    config = LlamaConfig(
        hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads, intermediate_size=2 * hidden_size, vocab_size=len(tokenizer),
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ["Ċ", *SCRIPT]] + [tokenizer.eos_token_id]  # Ċ: "\n"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = torch.nn.functional.normalize(torch.randn(len(tokenizer), hidden_size), dim=-1) * hidden_size**0.5
        model.model.embed_tokens.weight.copy_(embeddings)
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(len(tokenizer), hidden_size)
        for current, following in zip(ids, ids[1:], strict=False):
            head[following] += 20.0 * embeddings[current] / hidden_size**0.5
        model.lm_head.weight.copy_(head)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
