"""The end-to-end part of the GPU suite: `grpo train` itself on the job's device, killed and resumed.

Parts a-d call the learner's pieces; this runs the CLI a user runs, in subprocesses, on a tiny
random Llama (tests/runtime/tiny_model.py) with the hf engine (vLLM cannot travel to a bare GPU
machine), offloaded checkpointing, a checkpoint every 2 steps, and a reward that kills its process
inside step 4 on demand (tests/runtime/crash_rewards.py, as the CPU resume test does):

    straight   4 steps, uninterrupted
    again      the same, a second time: the yardstick (GPU kernels need not be deterministic run to run)
    resumed    killed inside step 4 (exit 137, after step-2's checkpoint), then the same command again

`run(smoke, workdir)` returns a dict; the suite turns it into rows and checks. On CPU (--smoke) the
same runs go to the CPU, where they are deterministic and the yardstick is 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from checkout import REPO, child_env  # bench/ is on sys.path: the scripts run from it

COMPARED = ("loss", "reward", "kl", "grad_norm", "completion_length/mean", "rewards/len7/mean")


def job_manifest(model_dir: Path, output: Path) -> dict:
    return {
        "apiVersion": "grpo.dev/v1alpha1",
        "kind": "GRPOJob",
        "metadata": {"name": "gpu-suite-e2e"},
        "spec": {
            "model": {"name": str(model_dir), "maxSeqLength": 128},
            "lora": {"rank": 4, "alpha": 8},  # all 7 projections, as the examples
            "dataset": {"source": "builtin:arithmetic", "systemPrompt": "Answer with a number."},
            "rewards": [{"name": "len7", "function": "tests.runtime.crash_rewards:die_on_call"}],
            "generation": {"engine": "hf", "numGenerations": 4, "maxPromptLength": 48, "maxCompletionLength": 16},
            "training": {"maxSteps": 4, "promptsPerStep": 2, "learningRate": 5e-3, "lossChunkSize": 16,
                         "gradientCheckpointing": "offload", "warmupRatio": 0.0},
            "checkpoint": {"everySteps": 2, "keep": 2},
            "output": {"uri": str(output)},
        },
    }


def train_env(device: str, die_on_call: int | None = None) -> dict[str, str]:
    """The environment `grpo train` runs in: the bundle's PYTHONPATH kept, the repository's runtime/ and root
    (for tests.runtime.crash_rewards) first."""
    env = child_env(("runtime", "."), GRPO_DEVICE=device, GRPO_TEST_DIE_ON_CALL=str(die_on_call or 0))
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    return env


TRAIN = [sys.executable, "-m", "grpo_runtime.cli", "train"]


def _train(job: Path, device: str, die_on_call: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TRAIN, str(job), "--quiet"], capture_output=True, text=True,
                          env=train_env(device, die_on_call), timeout=300)


def read_metrics(output: Path) -> list[dict]:
    from grpo_runtime import metrics_log
    from grpo_runtime.storage import open_storage

    return metrics_log.read_metrics(open_storage(str(output))) if output.exists() else []


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def worst_difference(a: list[dict], b: list[dict], keys: tuple[str, ...] = COMPARED) -> float:
    """Largest relative difference of the compared metrics over the steps both runs logged."""
    worst = 0.0
    for x, y in zip(a, b):
        for key in keys:
            scale = max(abs(x[key]), abs(y[key]), 1e-6)
            worst = max(worst, abs(x[key] - y[key]) / scale)
    return worst


def run(smoke: bool, workdir: Path) -> dict:
    sys.path[:0] = [p for p in (str(REPO / "runtime"), str(REPO)) if p not in sys.path]
    from tests.runtime.tiny_model import build_tiny_model

    device = "cpu" if smoke else "cuda"
    model = build_tiny_model(workdir / "model")
    result: dict = {"device": device, "runs": {}}
    for name in ("straight", "again", "resumed"):
        folder = workdir / name
        folder.mkdir()
        job = folder / "job.yaml"
        job.write_text(yaml.safe_dump(job_manifest(model, folder / "out")))
        attempts = [_train(job, device, die_on_call=4)] if name == "resumed" else []
        attempts.append(_train(job, device))
        result["runs"][name] = {
            "exit_codes": [a.returncode for a in attempts],
            "loaded_on_device": f"loading {model} on {device}" in attempts[0].stderr,
            "resumed_at_2": "resumed from checkpoints/step-2 at step 2" in attempts[-1].stderr,
            "metrics": read_metrics(folder / "out"),
            "stderr_tail": tail(attempts[-1].stderr),
        }
    return result
