"""Part h of the GPU suite: TRL's GRPOTrainer beside our job, on the same machine, model, batch and lengths.

TRL 1.16's `GRPOTrainer` with `use_vllm=True, vllm_mode="colocate"` (vLLM in the trainer's process, as ours),
mapped from part g's Qwen job: the same random-init Qwen2.5-1.5B folder loaded in NF4 (QLoRA) with LoRA r16 on
all 7 projections, 1 prompt of 256 tokens x 8 completions of exactly 768 (`generation_kwargs: ignore_eos`),
2 completions per micro-batch x 4 accumulation steps (the example's gradientAccumulationSteps), gradient
checkpointing, bf16, dapo, beta 0, the example's learning rate, vLLM's share of the GPU as the example's
(`vllm_gpu_memory_utilization` 0.3) and sleep mode on (TRL's lower-memory setting; its default is off).
Two steps; the second (warm) step's time and the process's peak device memory over its whole life, read
from outside it as part g reads ours (NVML's used memory of the device). Where TRL cannot run a setting,
the exact error is reported and the next setting is tried (QLoRA, then a bf16 base).

On CPU (--smoke) TRL's vLLM colocate mode cannot run (vLLM's CPU build): its `generate` path stands in,
on the smoke job's tiny bf16 model, and the rows say so.

    python bench/gpu_trl_part.py REQUEST.json RESULT.json     # one TRL run, as `run` starts it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trl_settings(case, example_spec: dict, smoke: bool) -> dict:
    """GRPOConfig's keywords for the job of part g's `case` (prompt and completion lengths, generations)
    and the example's training knobs."""
    training, generation = example_spec["training"], example_spec["generation"]
    accumulation = training.get("gradientAccumulationSteps", 1)
    settings = dict(
        max_steps=2, per_device_train_batch_size=case.generations // accumulation,
        gradient_accumulation_steps=accumulation, num_generations=case.generations,
        max_completion_length=case.completion_tokens, generation_kwargs={"ignore_eos": True},
        learning_rate=training["learningRate"], lr_scheduler_type="constant", warmup_steps=0,
        beta=training.get("beta", 0.0), loss_type=training.get("lossType", "dapo"),
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=not smoke, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        shuffle_dataset=False, seed=0,
    )
    if smoke:
        settings.update(use_cpu=True)
    else:
        settings.update(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True,
                        vllm_gpu_memory_utilization=generation.get("gpuMemoryUtilization", 0.3),
                        vllm_max_model_length=case.prompt_tokens + case.completion_tokens)
    return settings


def run_trl(model_dir: str, prompts: list[str], settings: dict, four_bit: bool, rank: int, alpha: int) -> dict:
    """One TRL training run in this process; the per-step times."""
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import GRPOConfig, GRPOTrainer

    from step_vs_trl import step_timer  # bench/, this script's folder

    def len7(prompts, completions, **kwargs):  # our job's reward (tests/runtime/crash_rewards.die_on_call)
        return [float(len(c) % 7) for c in completions]

    cuda = torch.cuda.is_available() and not settings.get("use_cpu")
    kwargs = {"dtype": torch.bfloat16}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cuda" if cuda else "cpu", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(
            model=model, reward_funcs=[len7], args=GRPOConfig(output_dir=out, **settings),
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer,
            peft_config=LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, task_type="CAUSAL_LM"),
            callbacks=[timer],
        )
        trainer.train()
    return {"step_seconds": timer.times, "torch_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def run(smoke: bool, workdir: Path, deadline: float = float("inf"), ours: dict | None = None) -> dict:
    """TRL on part g's Qwen job (ours from part g when given, else run here first), QLoRA first and a bf16
    base where TRL cannot run QLoRA; each TRL run in a process of its own, its peak read from outside."""
    import yaml

    sys.path[:0] = [p for p in (str(REPO / "bench"),) if p not in sys.path]
    from device_memory import budget_timeout, run_watched
    from gpu_job_part import REAL, SMOKE, CaseRuns
    from gpu_models import letters_prompt
    from gpu_train_part import train_env

    case = (SMOKE if smoke else REAL)[0]
    device = "cpu" if smoke else "cuda"
    spec = yaml.safe_load((REPO / case.example).read_text())["spec"]
    runs = CaseRuns(case, workdir, device, smoke)
    result: dict = {"case": case, "trl": []}
    try:
        if ours is None:
            runs.run("straight", deadline)
            ours = runs.runs["straight"]
        result["ours"] = ours
        prompts = [letters_prompt(case.prompt_tokens, seed) for seed in range(case.steps + 2)]
        for four_bit in (False,) if smoke else (True, False):
            label = ("QLoRA (NF4 base)" if four_bit else "LoRA, bf16 base") + ("" if smoke else ", vLLM colocate")
            if time.monotonic() > deadline:
                result["trl"].append({"setting": label, "error": "not run: time budget spent"})
                break
            request, answer = runs.folder / f"trl-{int(four_bit)}.json", runs.folder / f"trl-{int(four_bit)}-result.json"
            request.write_text(json.dumps({
                "model_dir": str(runs.model), "prompts": prompts, "four_bit": four_bit,
                "settings": trl_settings(case, spec, smoke),
                "rank": spec["lora"]["rank"], "alpha": spec["lora"]["alpha"],
            }))
            run = run_watched([sys.executable, __file__, str(request), str(answer)], train_env(device), not smoke,
                              budget_timeout(deadline))
            if run.timed_out:
                outcome = {"error": "not run: cut short at the time budget", "traceback": run.stderr[-3000:]}
            else:
                outcome = json.loads(answer.read_text()) if answer.exists() else {
                    "error": f"exited {run.returncode} without a result", "traceback": run.stderr[-3000:]}
            result["trl"].append({"setting": label, "exit_code": run.returncode, "peak_bytes": run.peak_bytes, **outcome})
            if "error" not in outcome or run.timed_out:
                break
    finally:
        runs.close()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("request", help="JSON file: model_dir, prompts, settings, four_bit, rank, alpha")
    p.add_argument("result", help="where the JSON result goes")
    args = p.parse_args(argv)
    request = json.loads(Path(args.request).read_text())
    try:
        result = run_trl(request["model_dir"], request["prompts"], request["settings"], request["four_bit"],
                         request["rank"], request["alpha"])
    except Exception as exc:  # noqa: BLE001  - what TRL says is the finding
        result = {"error": f"{type(exc).__name__}: {str(exc).strip()[:600]}", "traceback": traceback.format_exc()[-3000:]}
    Path(args.result).write_text(json.dumps(result, default=str))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(min(8, os.cpu_count() or 1)))
    sys.exit(main())
