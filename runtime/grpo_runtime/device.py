"""Which device a job trains on, and a clear failure where a pod was promised a GPU it cannot use.

The operator sets GRPO_DEVICE=cuda in every pod it runs (each asks for nvidia.com/gpu: 1). Without
it (`grpo train` on a laptop) the job takes CUDA when there is one, else the CPU. A pod with no
usable GPU would otherwise train on its CPU, hundreds of times slower, and say nothing.
"""

from __future__ import annotations

import os

import torch

from grpo_runtime.messages import first_line

DEVICE_ENV = "GRPO_DEVICE"  # cuda | cpu | unset (auto); operator/grpo_operator/render.py sets it


class DeviceError(RuntimeError):
    """The pod's GPU is not usable: the node's fault, not the job's (exit 1, retried by the operator)."""


def job_device() -> torch.device:
    """The job's device: for a rank of a data-parallel job (torchrun's LOCAL_RANK), the node's LOCAL_RANK-th GPU."""
    wanted = os.environ.get(DEVICE_ENV, "").strip().lower()
    if wanted == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if wanted == "cuda":
        raise DeviceError(
            f"no usable CUDA GPU in this pod ({_why_no_cuda()}), although it asked for nvidia.com/gpu: 1. "
            f"Check that the node's NVIDIA driver supports CUDA {torch.version.cuda or '13'} (CUDA 13 needs driver "
            "580 or newer) and that the NVIDIA device plugin and container toolkit run there"
        )
    if wanted:
        raise DeviceError(f"{DEVICE_ENV}={wanted!r}: must be cuda or cpu (or unset)")
    return torch.device("cpu")


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return "this torch is a CPU build"
    try:
        torch.cuda.init()  # raises with the driver's own reason (too old, none found)
    except Exception as exc:  # noqa: BLE001 (RuntimeError, AssertionError: whatever torch says)
        return f"torch: {first_line(exc)}"
    return "torch sees no CUDA device"
