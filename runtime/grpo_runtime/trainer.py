"""The GRPO loop: prompts -> completions -> rewards -> advantages -> loss -> step.

Read it top to bottom: `Trainer.step` is one iteration of the algorithm; everything it calls
is a small function in this file or a module with one job (engines, rewards, loss, storage).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerState, get_scheduler

from grpo_runtime import checkpoints
from grpo_runtime.advantages import frac_zero_std_groups, group_advantages, nan_std
from grpo_runtime.batch import (  # noqa: F401 (callers take the batch's names from here too)
    Batch,
    batch_logprobs,
    build_batch,
    completion_hidden,
    loss_config,
    split_micro_batches,
)
from grpo_runtime.data import PromptSampler
from grpo_runtime.distributed import World
from grpo_runtime.engines import Completion, Engine, sampling_config
from grpo_runtime.episodes import episode_metrics
from grpo_runtime.evaluation import BEST, BestAdapter, is_eval_line, samples_jsonl
from grpo_runtime.host_memory import release_freed_heap
from grpo_runtime.loss import EntropyBonus, grpo_loss
from grpo_runtime.metrics_log import MetricsLog
from grpo_runtime.model import Policy, lm_head, save_adapter
from grpo_runtime.prompts import encode_prompts, exchange, reward_inputs, sample
from grpo_runtime.rewards import Reward, RewardScores, reward_metrics, score
from grpo_runtime.spec import GRPOJob
from grpo_runtime.storage import Storage

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


def lr_schedule(optimizer, training) -> torch.optim.lr_scheduler.LRScheduler:
    """training.lrScheduler after warmupRatio of the optimizer steps (maxSteps x numIterations). transformers'
    "constant" ignores the warm-up: ours is its "constant_with_warmup" (the same schedule without one)."""
    total = training.max_steps * training.num_iterations
    name = "constant_with_warmup" if training.lr_scheduler == "constant" else training.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=int(training.warmup_ratio * total), num_training_steps=total)


def reward_state(step: int, max_steps: int, sampler) -> TrainerState:
    """The transformers.TrainerState TRL gives rewards as trainer_state: global_step (optimizer steps done;
    ours count a generated batch as one, whatever numIterations), max_steps (training.maxSteps) and epoch
    (passes over the training prompts, fractional)."""
    epoch = sampler.epoch + sampler.position / max(len(sampler.rows), 1)
    return TrainerState(global_step=step, max_steps=max_steps, epoch=epoch)


# ---------------------------------------------------------------------------------------------
# The loop


def seed_streams(seed: int) -> None:
    """Start the process's RNG streams, the training's own, from training.seed (as transformers' set_seed, which
    TRL's trainer calls): torch's (every device's) is LoRA dropout's (peft's nn.Dropout draws from it), Python's and
    numpy's the rewards'. Without it two runs of one job start wherever the process's streams are. save_checkpoint
    keeps their state and resume restores it, so a resumed run draws what the uninterrupted one did."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32 bits
    torch.manual_seed(seed)


def _rng_streams() -> dict[str, Any]:
    """The process's RNG states, as a checkpoint keeps them."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _restore_rng_streams(streams: dict[str, Any]) -> None:
    torch.set_rng_state(streams["torch"])
    if streams["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(streams["cuda"])
    random.setstate(streams["python"])
    np.random.set_state(streams["numpy"])


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@dataclass
class Trainer:
    job: GRPOJob
    policy: Policy
    engine: Engine
    rewards: list[Reward]
    sampler: PromptSampler
    storage: Storage
    on_step: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    step: int = 0
    # small JSON-able state of others (e.g. the tracking run id) saved with each checkpoint
    checkpoint_extras: dict[str, Any] = field(default_factory=dict)
    evaluator: Any = None  # grpo_runtime.evaluation.Evaluator when spec.evaluation is set
    hub: Any = None  # grpo_runtime.hub.HubPusher when spec.output.hub is set
    on_eval: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    world: World = field(default_factory=World)  # this rank's place in a data-parallel job (distributed.py)
    player: Any = None  # grpo_runtime.episodes.Player when spec.tools is set: completions become episodes

    def __post_init__(self) -> None:
        spec = self.job.spec
        self.training = spec.training
        self.generation = spec.generation
        self.loss_config = loss_config(spec, self.engine.name)
        self.entropy_bonus = EntropyBonus(
            coef=spec.training.entropy_coef,
            adaptive=spec.training.use_adaptive_entropy,
            target=spec.training.entropy_target,
            delta=spec.training.entropy_coef_delta,
            low=spec.training.entropy_coef_min,
            high=spec.training.entropy_coef_max,
        )
        self.params = [p for p in self.policy.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=spec.training.learning_rate, weight_decay=spec.training.weight_decay
        )
        self.scheduler = lr_schedule(self.optimizer, spec.training)
        self.latest_checkpoint: str | None = None
        self.metrics_log = MetricsLog(self.storage)
        self.eval_history: list[dict[str, Any]] = []  # the eval records of the metrics, oldest first
        self.best = None  # grpo_runtime.evaluation.BestAdapter when checkpoint.keepBest is set
        self._at_max_lengths = True  # the first step of every process probes the worst-case memory
        self._clashes_told: set[str] = set()  # reward metrics named like built-in ones, warned about once
        self._last_step_metrics: dict[str, Any] | None = None  # the hub's cards: the record run_step wrote last
        self._generation_seconds = 0.0  # this rank's last generate(), wake included

    def rank_seed(self) -> int:
        """The seed of this rank's own streams (LoRA dropout, the rewards'): training.seed on rank 0, as one process."""
        return self.training.seed + 1_000_003 * self.world.rank

    # -- one step -------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], first_prompt: int = 0, rows: list[dict[str, Any]] | None = None
                 ) -> list[Completion]:
        """Completions of the step's prompts `prompt_ids`, the first being the step's `first_prompt`-th (their
        prompt_index counts from it): each prompt's samples are seeded by the step and that index, so a resumed
        run, or another split of the step over ranks, samples exactly what the uninterrupted one-process run did."""
        sampling = sampling_config(self.generation, seed=self.training.seed * 100_003 + self.step)
        started = time.perf_counter()
        completions = sample(self.engine, self.player, rows, prompt_ids,
                             dataclasses.replace(sampling, first_prompt=first_prompt))
        self._generation_seconds = time.perf_counter() - started
        return completions

    def score(self, rows: list[dict[str, Any]], completions: list[Completion]) -> RewardScores:
        """The rewards of `completions` (their prompt_index indexes `rows`, the step's prompts)."""
        state = reward_state(self.step, self.training.max_steps, self.sampler)
        return score(self.rewards, *reward_inputs(self.policy, self.job, rows, completions), trainer_state=state)

    def advantages(self, scores: RewardScores) -> torch.Tensor:
        """The step's advantages: group statistics over each prompt's whole group."""
        return group_advantages(
            scores.matrix,
            scores.weight_vector,
            self.generation.num_generations,
            self.training.scale_rewards,
            self.training.multi_objective_aggregation,
        )

    def rollout(self, rows: list[dict[str, Any]]) -> tuple[list[list[int]], list[Completion], RewardScores]:
        """The step's prompt ids, completions and scores, whole on every rank: each rank generates and scores its
        share of the prompts (whole groups), then the ranks exchange them."""
        prompt_ids = encode_prompts(self.policy, self.job, rows, self.player and self.player.tools)
        mine = self.world.share(len(rows))
        completions = self.generate(prompt_ids[mine.start : mine.stop], mine.start, rows[mine.start : mine.stop])
        completions, scores = exchange(self.world, completions, self.score(rows, completions))
        return prompt_ids, completions, scores

    def optimise(self, batch: Batch, advantages: torch.Tensor) -> dict[str, float]:
        """numIterations optimizer updates on one generated batch (the whole step's, on every rank); returns loss
        metrics. A rank runs its share of the step's micro-batches; the gradients and metrics are summed over the
        ranks before the clip and the optimizer step, which every rank then takes alike."""
        step_parts = split_micro_batches(
            batch.input_ids.shape[0], self.training.gradient_accumulation_steps, self.world.size
        )
        parts = step_parts[self.world.rank :: self.world.size]
        old = batch_logprobs(self.policy, batch, self.loss_config, parts) if self.training.num_iterations > 1 else None
        ref = None
        if self.training.beta > 0:
            with self.policy.model.disable_adapter():
                ref = batch_logprobs(self.policy, batch, self.loss_config, parts)
        advantages = advantages.to(self.policy.device)
        sums: dict[str, float] = {}
        self.policy.model.train()
        for _ in range(self.training.num_iterations):
            metrics = self.accumulate(batch, advantages, parts, old, ref, self.entropy_bonus.applied(), len(step_parts))
            metrics = self.world.sum_metrics(metrics, self.policy.device)
            self.world.sum_grads(self.params)
            metrics.setdefault("policy_loss", metrics["loss"])  # without a bonus this optimizer step
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + torch.nn.utils.clip_grad_norm_(
                self.params, self.training.max_grad_norm
            ).item()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.entropy_bonus.update(EntropyBonus.step_entropy(metrics))
        return {key: value / self.training.num_iterations for key, value in sums.items()}

    def accumulate(
        self, batch: Batch, advantages, parts, old=None, ref=None, entropy_coef=0.0, micro_batches: int | None = None
    ) -> dict[str, float]:
        """The gradients of micro-batches `parts` of the step, added into the parameters' .grad one at a time;
        returns their loss and metrics. Each micro-batch's loss is its share of the step's (the loss's
        normalisers are given the step's totals: its tokens, its completions, its `micro_batches`, default
        len(parts)), so the sum is the same for any split, and over ranks. entropy_coef: this optimizer step's
        bonus."""
        weight, bias = lm_head(self.policy.model)
        step = {
            "num_items_in_batch": batch.completion_mask.sum(),
            "num_sequences_in_batch": batch.input_ids.shape[0],
            "num_micro_batches": len(parts) if micro_batches is None else micro_batches,
        }
        sums: dict[str, float] = {}
        for rows in parts:
            micro = batch.rows(rows)
            loss, metrics = grpo_loss(
                completion_hidden(self.policy, micro),
                weight,
                micro.completion_ids,
                micro.completion_mask,
                advantages[rows],
                old_logps=None if old is None else old[rows],
                ref_logps=None if ref is None else ref[rows],
                sampling_logps=micro.sampling_logps,
                config=self.loss_config,
                bias=bias,
                entropy_coef=entropy_coef,
                **step,
            )
            release_freed_heap(self.policy.device)  # the forward's temporaries, before the backward adds its own
            loss.backward()
            release_freed_heap(self.policy.device)
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value.item()
        return sums

    def run_step(self) -> dict[str, Any]:
        started = time.perf_counter()
        rows = self.sampler.take(self.training.prompts_per_step)  # the step's, the same on every rank
        prompt_ids, completions, scores = self.rollout(rows)
        advantages = self.advantages(scores)
        pad_to = (self.generation.max_prompt_length, self.generation.max_completion_length) if self._at_max_lengths else None
        self._at_max_lengths = False
        batch = build_batch(prompt_ids, completions, self.policy.tokenizer.pad_token_id, self.policy.device, pad_to,
                            mask_truncated=self.training.mask_truncated_completions)
        learner_started = time.perf_counter()
        losses = self.optimise(batch, advantages)
        learner_seconds = time.perf_counter() - learner_started
        self.engine.sync(self.policy)
        self.step += 1
        seconds = time.perf_counter() - started
        lengths = torch.tensor([c.written for c in completions], dtype=torch.float32)
        metrics: dict[str, Any] = {
            "step": self.step,
            "loss": losses["loss"],
            "reward": scores.total.nanmean().item(),
            "reward_std": nan_std(scores.total).item(),
            **reward_metrics(scores),
            "kl": losses["kl"],
            "entropy": losses["entropy"],
            **self._entropy_bonus_metrics(losses),
            "clip_ratio": losses["clip_ratio"],
            "clip_ratio_low": losses["clip_ratio_low"],
            "clip_ratio_high": losses["clip_ratio_high"],
            **({"sampling_weight": losses["sampling_weight"]} if "sampling_weight" in losses else {}),
            "grad_norm": losses["grad_norm"],
            "learning_rate": self.scheduler.get_last_lr()[0],
            "frac_reward_zero_std": frac_zero_std_groups(scores.total, self.generation.num_generations),
            "completion_length/mean": lengths.mean().item(),
            "completion_length/max": lengths.max().item(),
            "clipped_ratio": sum(c.truncated for c in completions) / len(completions),
            **episode_metrics(completions),
            "tokens_per_second": lengths.sum().item() / seconds,
            "generation_seconds": self._generation_seconds,  # the wake and the previous step's weight push included
            # the weight push made in this step: at its wake when the engine sleeps (the previous update), else just now
            "sync_seconds": self.engine.last_sync_seconds,
            "learner_seconds": learner_seconds,  # old/ref log-probs, forward, backward, optimizer
            "step_seconds": seconds,
            "peak_memory_mb": _peak_memory_mb(self.policy.device),
        }
        self._tell_clashes(scores.add_logged(metrics))
        if self.world.main:
            self._write_samples(rows, completions, scores)
            self.metrics_log.append(metrics)
        self._last_step_metrics = metrics
        return metrics

    def _tell_clashes(self, clashes: list[str]) -> None:
        """Warn, once per name, of reward metrics (log_metric) named like built-in ones: not logged."""
        new = [name for name in clashes if name not in self._clashes_told]
        if new:
            log.warning("reward metrics %s clash with built-in metrics of the same names: not logged", new)
            self._clashes_told.update(new)

    def _entropy_bonus_metrics(self, losses: dict[str, float]) -> dict[str, float]:
        """With an entropy bonus, policy_loss (the loss without it) and entropy_coef (after this step's update), as
        TRL logs them."""
        if not (self.training.entropy_coef or self.entropy_bonus.adaptive):
            return {}
        return {"policy_loss": losses["policy_loss"], "entropy_coef": self.entropy_bonus.coef}

    def _write_samples(self, rows, completions: list[Completion], scores) -> None:
        count = min(self.training.log_samples, len(completions))
        if not count:
            return
        field_name = self.job.spec.dataset.prompt_field
        lines = []
        for i in range(count):
            record = {
                "prompt": rows[completions[i].prompt_index][field_name],
                "completion": completions[i].text,
                **({"episode": completions[i].episode.messages} if completions[i].episode is not None else {}),
                "reward": scores.total[i].item(),
                "rewards": {name: values[i].item() for name, values in scores.per_reward.items()},
                **scores.extra_of(i),
            }
            lines.append(json.dumps(record, default=str))
        self.storage.write_bytes(f"samples/step-{self.step}.jsonl", ("\n".join(lines) + "\n").encode())

    # -- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self) -> str | None:
        """Rank 0 writes the checkpoint, with every rank's RNG streams (each rank's LoRA dropout and rewards draw
        from its own); the other ranks only give theirs."""
        streams = self.world.gather(_rng_streams())
        if not self.world.main:
            return None
        with tempfile.TemporaryDirectory(prefix="grpo-ckpt-") as tmp:
            save_adapter(self.policy.model, tmp)
            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state(),
                "entropy_bonus": self.entropy_bonus.state(),
                "rng": streams[0],
                "rng_ranks": streams,  # rank r's at r
                "extras": dict(self.checkpoint_extras),
            }
            torch.save(state, Path(tmp) / STATE_FILE)
            self.latest_checkpoint = checkpoints.publish_checkpoint(
                self.storage, tmp, self.step, self.job.spec.checkpoint.keep
            )
            # after the store has it (the store is the record); the last step's adapter goes up as the final one
            if self.hub is not None and self.hub.spec.strategy == "checkpoint" and self.step < self.training.max_steps:
                self.hub.push(tmp, self.step, self._last_metrics(), final=False)
        return self.latest_checkpoint

    def resume(self) -> bool:
        """Continue from checkpoints/LATEST when there is one; False when starting fresh. Rank 0 reads it and
        hands it to the others: only rank 0 needs to reach the store."""
        found = self._read_latest() if self.world.main else None
        found = self.world.broadcast(found)
        if found is None:
            if self.world.main:
                self._drop_metrics_after(0)  # an attempt that died before its first checkpoint
            return False
        from peft import set_peft_model_state_dict

        adapter, state = found
        set_peft_model_state_dict(self.policy.model, {k: v.to(self.policy.device) for k, v in adapter.items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.restore(state["sampler"])
        if "entropy_bonus" in state:  # checkpoints written before the bonus existed start it afresh
            self.entropy_bonus.load(state["entropy_bonus"])
        self.step = state["step"]
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == self.world.size:
            _restore_rng_streams(ranks[self.world.rank])
        else:  # another world size: no stream of this rank's to continue; a fresh one, keyed by rank and step
            seed_streams(self.rank_seed() + self.step)
        self.checkpoint_extras.update(state.get("extras") or {})
        self.latest_checkpoint = f"{checkpoints.CHECKPOINTS}/step-{self.step}"
        if self.world.main:
            self._drop_metrics_after(self.step)
        self.engine.sync(self.policy)
        return True

    def _read_latest(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(adapter tensors, trainer state) of checkpoints/LATEST, on the CPU; None when there is none."""
        step = checkpoints.latest_checkpoint(self.storage)
        if step is None:
            return None
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory(prefix="grpo-resume-") as tmp:
            local = checkpoints.fetch_checkpoint(self.storage, step, tmp)
            adapter = load_file(str(Path(local) / "adapter_model.safetensors"))
            state = torch.load(Path(local) / STATE_FILE, weights_only=False, map_location="cpu")
        return adapter, state

    def _drop_metrics_after(self, step: int) -> None:
        """Steps after the checkpoint are re-run; their old records would be duplicates."""
        self.metrics_log.truncate_after(step)

    # -- held-out evaluation --------------------------------------------------------------

    def _start_history(self) -> None:
        """The metrics as this run continues them: none on a fresh start (records of an attempt that
        never checkpointed, step-0 evaluations included, would be duplicates), else as resume()
        trimmed them; their eval records so far."""
        from grpo_runtime.metrics_log import read_metrics

        if not self.world.main:  # rank 0's store, rank 0's history: the others ask whether a step was evaluated
            self.eval_history = self.world.broadcast(None)
            return
        if self.step == 0:
            self._drop_metrics_after(-1)
        self.eval_history = [record for record in read_metrics(self.storage) if is_eval_line(record)]
        self.world.broadcast(self.eval_history)
        if self.job.spec.checkpoint.keep_best:
            self.best = BestAdapter(self.storage, self.job.spec.checkpoint.keep_best)
            self.best.start(self.step, self.eval_history)

    def evaluate_if_due(self) -> dict[str, Any] | None:
        """Evaluate at this step when it is due and not done yet (a resumed step was evaluated
        before its checkpoint); keep the best adapter; report to the on_eval callbacks."""
        if self.evaluator is None or not self.evaluator.due(self.step):
            return None
        if any(line["step"] == self.step for line in self.eval_history):
            return None
        metrics, samples = self.evaluator.evaluate(self.step, reward_state(self.step, self.training.max_steps, self.sampler))
        self.eval_history.append(metrics)
        if not self.world.main:
            return metrics
        self.storage.write_bytes(f"samples/eval-step-{self.step}.jsonl", samples_jsonl(samples))
        self.metrics_log.append(metrics)
        if self.best is not None:
            self.best.offer(self.step, metrics, self.policy.model)
        for callback in self.on_eval:
            callback(metrics)
        return metrics

    # -- the whole run --------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        every = self.job.spec.checkpoint.every_steps
        metrics: dict[str, Any] = {}
        if self.step == 0:  # a fresh run; a resumed one continues the streams of its checkpoint (resume)
            seed_streams(self.rank_seed())
        self._start_history()
        self.evaluate_if_due()  # the step-0 baseline, before any update
        while self.step < self.training.max_steps:
            metrics = self.run_step()
            self.evaluate_if_due()  # before the checkpoint: a committed step has its evaluation
            if self.step % every == 0 or self.step == self.training.max_steps:
                self.save_checkpoint()
            metrics["latest_checkpoint"] = self.latest_checkpoint
            for callback in self.on_step:
                callback(metrics)
        if not self.world.main:  # the final adapter, merge and hub push are rank 0's
            return metrics
        with tempfile.TemporaryDirectory(prefix="grpo-final-") as tmp:
            save_adapter(self.policy.model, tmp)
            self.storage.upload_dir(tmp, "final")
            last = self._last_metrics() if self.hub is not None else None  # for the cards
            if self.job.spec.output.merged:
                self._write_merged(tmp, last)
            if self.hub is not None:
                self._push_final(tmp, last)
        return metrics

    def _push_final(self, final_dir: str, metrics: dict[str, Any] | None) -> None:
        """The final adapter to the hub, or with hub.adapter: best the best one (best/ in the store)."""
        if self.hub.spec.adapter != "best" or not self.storage.exists(f"{BEST}/best.json"):
            if self.hub.spec.adapter == "best":
                log.warning("hub: no evaluation scored %s, so the final adapter goes up instead of the best",
                            self.job.spec.checkpoint.keep_best)
            self.hub.push(final_dir, self.step, metrics, final=True)
            return
        best = json.loads(self.storage.read_bytes(f"{BEST}/best.json"))
        with tempfile.TemporaryDirectory(prefix="grpo-best-") as tmp:
            self.storage.download_dir(BEST, tmp)
            self.hub.push(tmp, self.step, metrics, final=True, best=best)

    def _last_metrics(self) -> dict[str, Any] | None:
        """The last training step's record: the one run_step wrote, or (a resumed process that has run no step
        yet) the store's."""
        if self._last_step_metrics is not None and self._last_step_metrics["step"] == self.step:
            return self._last_step_metrics
        from grpo_runtime.metrics_log import read_metrics

        records = [r for r in read_metrics(self.storage) if "reward" in r and r.get("step") == self.step]
        return records[-1] if records else None

    def _write_merged(self, adapter_dir: str, metrics: dict[str, Any] | None) -> None:
        from grpo_runtime.merge import merge_adapter

        model = self.job.spec.model
        with tempfile.TemporaryDirectory(prefix="grpo-merged-") as tmp:
            merge_adapter(
                self.policy.source,
                adapter_dir,
                tmp,
                revision=None if Path(self.policy.source).is_dir() else model.revision,
                trust_remote_code=model.trust_remote_code,
            )
            self.storage.delete_prefix("final-merged/")  # no file of an older merge survives
            self.storage.upload_dir(tmp, "final-merged")
            if self.hub is not None:
                self.hub.push_merged(tmp, self.step, metrics)
