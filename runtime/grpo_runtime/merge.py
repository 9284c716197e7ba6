"""`output.merged`: the base model with the trained LoRA folded in, as a plain HF folder.

The merge starts from the base as stored (its own dtype, e.g. bfloat16), never from the
training copy: a QLoRA job trained on a 4-bit NF4 base, and folding the adapter into
dequantized NF4 weights would bake the quantization error into the served model. The base
is loaded fresh on the CPU (the training copy may fill the GPU), the adapter is applied with
peft, merged, and saved with safetensors beside the base's tokenizer and config: vLLM and
transformers load the folder without peft.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def merge_adapter(
    base_source: str,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write base + adapter (merged) to `out_dir`: safetensors weights in the base's stored
    dtype, config, generation config and tokenizer. Returns `out_dir`."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from grpo_runtime.model import ModelError

    out_dir = Path(out_dir)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    if getattr(AutoConfig.from_pretrained(base_source, **kwargs), "quantization_config", None):
        raise ModelError(
            "spec.output.merged: the base model is stored pre-quantized; merging needs its unquantized "
            "weights (name the bf16/fp16 base in spec.model.name and set loadIn4bit: true instead)"
        )
    log.info("merging the adapter into %s (on the CPU, in the base's dtype)", base_source)
    base = AutoModelForCausalLM.from_pretrained(base_source, dtype="auto", device_map={"": "cpu"}, **kwargs)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True  # a serving model
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_source, **kwargs).save_pretrained(out_dir)
    return out_dir
