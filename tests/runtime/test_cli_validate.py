"""`grpo validate`: exit 0 and a summary for good files, exit 2 and every error for bad ones."""

import subprocess
import sys
from pathlib import Path

import yaml

from tests.runtime.test_spec import MINIMAL, with_spec

REPO = Path(__file__).resolve().parents[2]


def grpo(*args):
    return subprocess.run([sys.executable, "-m", "grpo_runtime.cli", *args], capture_output=True, text=True)


def test_valid_file_prints_one_line_summary(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    result = grpo("validate", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("GRPOJob tiny: model Qwen/Qwen2.5-0.5B-Instruct, 100 steps x 4 prompts x 8 generations")


def test_invalid_file_lists_every_error_and_exits_2(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(with_spec(generation={"numGenerations": 1}, training={"lossType": "x"})))
    result = grpo("validate", str(path))
    assert result.returncode == 2
    assert "2 error(s)" in result.stderr
    assert "spec.generation.numGenerations: must be >= 2, got 1" in result.stderr
    assert "spec.training.lossType: must be one of" in result.stderr


def test_empty_file_exits_2(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("")
    result = grpo("validate", str(path))
    assert result.returncode == 2 and "file is empty" in result.stderr


def test_local_example_validates():
    result = grpo("validate", str(REPO / "examples" / "local-cpu.yaml"))
    assert result.returncode == 0, result.stderr
    assert "smollm2-arithmetic" in result.stdout


def test_the_summary_says_in_which_form_rewards_get_completions(tmp_path):
    """TRL's conversational format (chat messages) where the prompts go through the chat template, text where
    they go as raw text (grpo_runtime.prompts.chat_messages decides it per prompt)."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    templated = grpo("validate", str(path)).stdout.strip()
    assert templated.endswith(
        "rewards [correctx1], completions as chat messages (as text if the tokenizer has no chat template)")
    path.write_text(yaml.safe_dump(with_spec(model={"name": "gpt2", "useChatTemplate": False})))
    raw = grpo("validate", str(path)).stdout.strip()
    assert raw.endswith("rewards [correctx1], completions as text (as chat messages if the prompts are)")
