"""A pod promised a GPU fails clearly when it has none, instead of training on its CPU for days."""

from __future__ import annotations

import pytest
import torch

from grpo_runtime.device import DEVICE_ENV, DeviceError, job_device
from grpo_runtime.run import EXIT_FAILURE, exit_code

from tests.runtime.test_trainer import grpo_train, tiny_job, write_job

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA does")


def test_without_the_operators_setting_the_job_takes_the_cpu(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert job_device() == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert job_device() == torch.device("cpu")


def test_a_pod_that_requires_cuda_without_a_usable_gpu_fails_naming_the_cause(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(DeviceError, match="no usable CUDA GPU in this pod") as caught:
        job_device()
    message = str(caught.value)
    assert "nvidia.com/gpu: 1" in message and "driver" in message
    assert "CPU build" in message or "torch:" in message  # torch's own reason, whichever build runs here
    assert exit_code(caught.value) == EXIT_FAILURE  # the node's fault: the operator retries, maybe elsewhere


def test_a_mistyped_device_is_refused(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(DeviceError, match="must be cuda or cpu"):
        job_device()


def test_grpo_train_in_a_gpu_pod_without_a_gpu_exits_1_before_loading_anything(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = grpo_train(write_job(tmp_path, tiny_job(tiny_model_dir, out)), env={DEVICE_ENV: "cuda"})
    assert result.returncode == 1, result.stderr
    assert "no usable CUDA GPU in this pod" in result.stderr
    assert "loading" not in result.stderr  # failed before the model (and the dataset) were fetched
    assert "Traceback" not in result.stderr  # a known condition: its message, not a stack
    assert not (out / "spec.yaml").exists()
