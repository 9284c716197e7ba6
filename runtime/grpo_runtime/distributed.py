"""Data parallelism: a job's ranks (one per GPU, gpus x nodes of them) on torch.distributed.

Each rank co-hosts its own engine and learner, so memory per GPU is the one-GPU job's. A step:

1. every rank takes the same prompts from the same sampler (its cursor counts the step's prompts, so a job
   resumed with another world size continues the same sequence), and generates and scores its contiguous
   share of them: whole prompts, so whole groups (`share`);
2. the ranks exchange what they made (`gather`): every rank then holds the whole step, computes the same
   advantages (group statistics over each prompt's whole group) and the loss's normalisers over the step's
   tokens and completions, as one process would;
3. each rank runs its share of the step's micro-batches and one all-reduce sums the adapter's gradients and
   the loss metrics (`sum_`): the update is the one-process update of the same step.

Why an explicit all-reduce and not DistributedDataParallel: a step runs several forwards per optimizer step
(micro-batches, the no-grad old and reference passes), the learner's backward goes through our own chunked
loss and offloaded checkpointing, and only the adapter is trainable: DDP's per-bucket hooks would need
no_sync around every micro-batch but the last and find_unused_parameters for the frozen base. The adapter is
megabytes, so one flat all-reduce after the last micro-batch costs next to nothing and leaves nothing to
overlap.

torchrun starts the ranks (`launch_argv`: `grpo train` relaunches itself under it when the job has more than
one rank); `join` reads its environment. A collective that waits longer than resources.rankTimeoutSeconds
fails the rank, so a dead peer ends the job instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

# torchrun's environment, and ours: the operator's pods for a job on several nodes (render.py sets them)
NODE_RANK_ENV, MASTER_ADDR_ENV, MASTER_PORT_ENV = "GRPO_NODE_RANK", "GRPO_MASTER_ADDR", "GRPO_MASTER_PORT"
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank of size, and its GPU on the node (local_rank)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics, samples, status and tracking."""
        return self.rank == 0

    @property
    def label(self) -> str:
        """'rank 1 of 4 ' (with its space) in a job of several ranks, '' alone."""
        return f"rank {self.rank} of {self.size} " if self.size > 1 else ""

    def share(self, count: int) -> range:
        """This rank's contiguous share of `count` items, sizes differing by at most one (the first ranks the larger)."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place, in one all-reduce (one dtype and device)."""
        if self.size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Each parameter's .grad summed over the ranks (a rank without one adds zeros)."""
        if self.size == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for p in params:
            by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in by_kind.values():
            self.sum_(grads)

    def sum_metrics(self, metrics: dict[str, float], device: torch.device) -> dict[str, float]:
        """Each metric summed over the ranks (each rank's are its micro-batches' shares of the step's)."""
        if self.size == 1:
            return metrics
        names = sorted(metrics)
        values = torch.tensor([metrics[name] for name in names], dtype=torch.float64, device=device)
        self.sum_([values])
        return dict(zip(names, values.tolist(), strict=True))

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


def under_torchrun() -> bool:
    """Whether this process is a rank torchrun started (its agent sets these)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def join(timeout_seconds: float) -> World:
    """This process's World: alone, or (under torchrun) a rank of a process group, NCCL on GPUs, gloo on CPU,
    with its GPU the node's local_rank-th."""
    if not under_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        from grpo_runtime.device import DEVICE_ENV

        cuda = torch.cuda.is_available() and os.environ.get(DEVICE_ENV, "").strip().lower() != "cpu"
        if cuda:
            torch.cuda.set_device(world.local_rank)
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_seconds)
        )
    return world


def leave() -> None:
    """Tear the process group down. A vLLM engine built on it (external_launcher) made groups of its own, and
    its shutdown destroys them when the engine is collected: its own clean-up tears down both, in order (the
    default group first would leave its shutdown destroying groups that no longer exist)."""
    vllm_groups = sys.modules.get("vllm.distributed.parallel_state")
    if vllm_groups is not None and vllm_groups.model_parallel_is_initialized():
        vllm_groups.cleanup_dist_env_and_memory()
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch_argv(gpus: int, nodes: int) -> list[str]:
    """torchrun's arguments for this node of a job of `nodes` nodes x `gpus` ranks: one node rendezvouses on a
    free local port; several at GRPO_MASTER_ADDR:GRPO_MASTER_PORT (pod 0), this one being GRPO_NODE_RANK. No
    restarts of its own: a failed rank ends the job, which resumes from its last checkpoint (the operator's retry,
    or the same command again)."""
    argv = [f"--nproc-per-node={gpus}", "--max-restarts=0"]
    if nodes == 1:
        return argv + ["--standalone"]
    missing = [name for name in (NODE_RANK_ENV, MASTER_ADDR_ENV) if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"resources.nodes: {nodes}: run `grpo train` once per node with {' and '.join(missing)} set "
            f"(this node's index 0..{nodes - 1}, and the address of node 0); the operator sets them in its pods"
        )
    return argv + [
        f"--nnodes={nodes}",
        f"--node-rank={int(os.environ[NODE_RANK_ENV])}",
        f"--master-addr={os.environ[MASTER_ADDR_ENV]}",
        f"--master-port={int(os.environ.get(MASTER_PORT_ENV, DEFAULT_MASTER_PORT))}",
    ]
