"""Building vLLM's `LLM` in the training process, and sorting its failures by whose they are. Imported
through grpo_runtime.engines.vllm, which keeps vLLM's engine core in this process before vLLM is imported.

Failures: vLLM's configuration errors exit 2 with vLLM's whole message (`EngineError`); CUDA out
of memory, driver and compile errors exit 1, retried (`EngineResourceError`, naming the knob); a
model the engine cannot be given the learner's weights for (pre-quantized checkpoint, runtime
names that are not the checkpoint's, adapter modules vLLM has no LoRA layer for) is refused
before training.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from vllm import LLM

from grpo_runtime.engines.protocol import EngineError, EngineResourceError
from grpo_runtime.engines.vllm_sizing import KNOBS
from grpo_runtime.messages import first_line


def _build_llm(kwargs: dict[str, Any]):
    """LLM(**kwargs), leaving the training process as it found it, failures sorted by whose they are.

    The configuration is validated first on its own: whatever vLLM refuses there is the job's to
    fix (exit 2, vLLM's whole message). While the engine starts, running out of GPU memory, a
    driver error or a compile failure is the machine's (exit 1, retried); vLLM refusing the model
    (ValueError, NotImplementedError) is the job's again. In-process, vLLM's worker seeds the
    global RNGs, drops torch to one intra-op thread and replaces `torch.set_num_threads` with a
    no-op (settings meant for its own worker process): the learner's are put back.
    """
    from vllm.engine.arg_utils import EngineArgs

    try:
        EngineArgs(**kwargs).create_engine_config()
    except Exception as exc:  # noqa: BLE001  (pydantic, ValueError, AssertionError, TypeError...)
        raise EngineError(f"spec.generation: vLLM refuses this configuration:\n{_whole(exc)}") from exc

    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with _out_of_memory_names_the_knobs("starting vLLM"):
            return LLM(**kwargs)
    except (ValueError, NotImplementedError, TypeError) as exc:  # vLLM's word on the model or the machine's budget
        raise EngineError(f"spec.generation: vllm cannot run this model/configuration:\n{_whole(exc)}") from exc
    except RuntimeError as exc:
        if isinstance(exc, EngineResourceError):
            raise
        raise EngineResourceError(
            f"vLLM failed to start ({type(exc).__name__}: {_whole(exc)}); retried from the last checkpoint. "
            "A CUDA driver error is the node's; a torch.compile/Triton failure goes away with "
            "spec.generation.enforceEager: true"
        ) from exc
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


class _out_of_memory_names_the_knobs:
    """CUDA out of memory inside the block -> EngineResourceError (exit 1) naming the knobs."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not _is_out_of_memory(exc):
            return False
        held = ""
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            held = f" ({(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use, learner included)"
        raise EngineResourceError(
            f"CUDA out of memory {self.what}{held}: {first_line(exc)}. The learner and the engine do not fit "
            f"together; lower {KNOBS}, or set spec.training.gradientCheckpointing: offload"
        ) from exc


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _whole(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__
