"""`grpo train`: wire a validated GRPOJob to storage, model, engine, rewards and the loop.

Failures are sorted by whose they are: bad input (spec, model, dataset, reward import, an
unreachable bucket, a reward that raises) exits 2 and is not retried by the operator; anything
else exits 1 and the pod is retried from the last checkpoint.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import yaml

from grpo_runtime.spec import GRPOJob

log = logging.getLogger("grpo")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def output_uri(job: GRPOJob, override: str | None) -> str:
    return override or job.spec.output.uri or f"./grpo-runs/{job.metadata.name}"


class ProgressBar:
    """A tqdm bar with step, reward and tokens/s; a plain line per step when not a terminal."""

    def __init__(self, total: int, initial: int, quiet: bool):
        from tqdm import tqdm

        self.quiet = quiet
        self.bar = None if quiet else tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.eval_accuracy: float | None = None

    def __call__(self, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            return
        shown = {} if self.eval_accuracy is None else {"eval": f"{self.eval_accuracy:.3f}"}
        self.bar.set_postfix(
            reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}", **shown
        )
        self.bar.update(1)
        if not sys.stderr.isatty():
            rewards = " ".join(
                f"{key.split('/')[1]}={value:.2f}" for key, value in metrics.items() if key.endswith("/mean") and key.startswith("rewards/")
            )
            self.bar.write(
                f"step {metrics['step']}: reward {metrics['reward']:.3f} ({rewards}) kl {metrics['kl']:.4f} "
                f"len {metrics['completion_length/mean']:.0f} {metrics['tokens_per_second']:.1f} tok/s "
                f"{metrics['step_seconds']:.1f}s",
                file=sys.stderr,
            )

    def eval(self, metrics: dict[str, Any]) -> None:
        """One line per evaluation, terminal or not."""
        self.eval_accuracy = metrics["eval/accuracy"]
        if self.bar is not None:
            self.bar.write(eval_line(metrics), file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def eval_line(metrics: dict[str, Any]) -> str:
    """'eval step 10: accuracy 0.250 (correct 0.250, format 0.900) on 100 held-out prompts, greedy'."""
    k = metrics["eval/num_samples"]
    per_reward = ", ".join(
        f"{key.split('/')[1]} {value:.3f}" for key, value in metrics.items() if key.count("/") == 2 and key.endswith("/accuracy")
    )
    passed = f", pass@{k} {metrics[f'eval/pass@{k}']:.3f}" if k > 1 else ""
    how = "greedy" if k == 1 else f"{k} samples each (accuracy is mean@{k})"
    return (
        f"eval step {metrics['step']}: accuracy {metrics['eval/accuracy']:.3f}{passed} ({per_reward}) "
        f"on {metrics['eval/num_prompts']} held-out prompts, {how}"
    )


def status_progress(job: GRPOJob):
    """The in-pod status sink as (step callback, eval callback), or None outside a pod."""
    from grpo_runtime.status import eval_progress, sink_from_env

    sink = sink_from_env()
    if sink is None:
        return None

    def update(metrics: dict[str, Any]) -> None:
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        sink.update(
            {
                "step": metrics["step"],
                "totalSteps": job.spec.training.max_steps,
                "reward": clean(metrics["reward"]),
                "rewards": {
                    key.split("/")[1]: clean(value)
                    for key, value in metrics.items()
                    if key.startswith("rewards/") and key.endswith("/mean")
                },
                "kl": clean(metrics["kl"]),
                "completionLength": metrics["completion_length/mean"],
                "tokensPerSecond": round(metrics["tokens_per_second"], 2),
                **({"tools": {"callFrequency": metrics["tools/call_frequency"],
                              "failureFrequency": metrics["tools/failure_frequency"],
                              "turns": metrics["tools/turns"]}} if "tools/call_frequency" in metrics else {}),
                "latestCheckpoint": metrics.get("latest_checkpoint"),
            }
        )

    return update, lambda line: sink.update({"eval": eval_progress(line)})


@dataclass
class Prepared:
    """What a job trains with (read by name: callers outside this module, the benches, take what they need)."""

    storage: Any
    rewards: list
    policy: Any
    engine: Any
    sampler: Any
    evaluator: Any  # None without spec.evaluation
    hub: Any  # None without spec.output.hub

    world: Any = None  # grpo_runtime.distributed.World; None: alone
    player: Any = None  # grpo_runtime.episodes.Player with spec.tools; None without

    def trainer(self, job: GRPOJob):
        from grpo_runtime.distributed import World
        from grpo_runtime.trainer import Trainer

        return Trainer(job, self.policy, self.engine, self.rewards, self.sampler, self.storage,
                       evaluator=self.evaluator, hub=self.hub, world=self.world or World(), player=self.player)


def _prepare(job: GRPOJob, uri: str, world=None) -> Prepared:
    """Everything that can be wrong with the user's input is found here, before training. Every rank of a
    data-parallel job prepares its own model and engine; the store and the hub are rank 0's."""
    from grpo_runtime.distributed import World

    from grpo_runtime.data import PromptSampler, load_rows
    from grpo_runtime.device import job_device
    from grpo_runtime.engines import make_engine
    from grpo_runtime.evaluation import Evaluator, split_rows
    from grpo_runtime.model import load_policy
    from grpo_runtime.rewards import load_rewards
    from grpo_runtime.storage import open_storage

    spec = job.spec
    world = world or World()
    device = job_device()  # first: a pod without its GPU fails at once, before any download
    storage = open_storage(uri, endpoint=spec.output.endpoint, region=spec.output.region)
    if world.main:
        storage.check()
    hub = None
    if spec.output.hub is not None and world.main:  # before the model: a token that cannot write fails in the first minute
        from grpo_runtime.hub import HubPusher

        hub = HubPusher(job)
        hub.prepare()
    rewards = load_rewards(spec.rewards, chat_template_kwargs=spec.model.chat_template_kwargs)
    rows = load_rows(spec.dataset, endpoint=spec.output.endpoint, region=spec.output.region)
    rows, held_out = split_rows(job, rows, endpoint=spec.output.endpoint, region=spec.output.region)
    log.info("loading %s on %s", spec.model.name, device)
    policy = load_policy(
        spec.model,
        spec.lora,
        device=device,
        seed=spec.training.seed,
        gradient_checkpointing=spec.training.gradient_checkpointing,
        endpoint=spec.output.endpoint,
        region=spec.output.region,
    )
    player = _player(job, policy, rewards)  # before the engine: a template that cannot hold tools fails in seconds
    engine = make_engine(spec.generation, policy, training_spec=spec.training, model_spec=spec.model)
    sampler = PromptSampler(rows, seed=spec.training.seed, shuffle=spec.dataset.shuffle)
    evaluator = Evaluator(job, policy, engine, rewards, held_out, world, player) if spec.evaluation else None
    return Prepared(storage, rewards, policy, engine, sampler, evaluator, hub, world, player)


def _player(job: GRPOJob, policy, rewards: list):
    """The episodes' player of a job with spec.tools or spec.environment (None without): the tools loaded, the
    environment classes probed (their get_reward added to `rewards`), the chat template and response template
    checked to hold them."""
    spec = job.spec
    if not spec.tools and spec.environment is None:
        return None

    from grpo_runtime.environments import Environments, tool_methods
    from grpo_runtime.episodes import Player, check_tool_support
    from grpo_runtime.prompts import encode_prompt
    from grpo_runtime.rewards import Reward
    from grpo_runtime.tools import ToolError, ToolRunner, load_tools

    tools = load_tools(spec.tools)
    environments = Environments(spec.environment, tools) if spec.environment is not None else None
    if environments is not None:
        names = {reward.name for reward in rewards}
        for name, fn in environments.reward_functions():
            if name in names:
                raise ToolError(f"spec.rewards: {name!r} is also the reward of the environment class {name}; rename it")
            rewards.append(Reward(name=name, weight=1.0, fn=fn, ref=f"{name}.get_reward"))
        if not rewards:
            raise ToolError("spec.environment: no reward: its classes have no get_reward() and spec.rewards is empty")
    shown = tools + [m for pool in (environments.pool.values() if environments else []) for m in tool_methods(pool[0])]
    if not shown:
        raise ToolError("spec.environment: its classes have no public method to offer the model as a tool")
    if not spec.model.use_chat_template:
        raise ToolError("spec.tools: the model is shown its tools through the chat template, which "
                        "spec.model.useChatTemplate: false turns off")
    check_tool_support(policy.tokenizer, shown, spec.model.chat_template_kwargs, spec.model.name)
    return Player(policy.tokenizer, tools, ToolRunner(tools, timeout=spec.generation.tool_timeout_seconds),
                  max_tool_calls=spec.generation.max_tool_calls,
                  max_completion_length=spec.generation.max_completion_length,
                  max_model_len=spec.model.max_seq_length, template_kwargs=dict(spec.model.chat_template_kwargs),
                  environments=environments,
                  encode=lambda row, own, observation: encode_prompt(policy, job, row, own, observation))


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from grpo_runtime.data import DatasetError
    from grpo_runtime.engines import EngineError
    from grpo_runtime.hub import HubError
    from grpo_runtime.model import ModelError
    from grpo_runtime.rewards import RewardError
    from grpo_runtime.storage import StorageError
    from grpo_runtime.tools import ToolError

    return (DatasetError, ModelError, RewardError, StorageError, EngineError, HubError, ToolError)


def exit_code(exc: BaseException) -> int:
    """The exit code `grpo train` gives a failure: bad input 2 (not retried), anything else 1."""
    return EXIT_BAD_INPUT if isinstance(exc, _bad_input_errors()) else EXIT_FAILURE


def run_ranks(job: GRPOJob, train_args: list[str]) -> int:
    """`grpo train` of a job of several ranks, on this node: torchrun runs `grpo train train_args` once per GPU
    (resources.gpus; CPU processes on gloo where there is no GPU), rendezvousing with the job's other nodes.
    A rank that fails ends them all: the exit code is the first failure's (2, bad input, when any rank's is)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from grpo_runtime.distributed import launch_argv

    resources = job.spec.resources
    try:
        torchrun = launch_argv(resources.gpus, resources.nodes)
    except ValueError as exc:
        print(f"grpo train: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    where = f"{resources.nodes} nodes x {resources.gpus}" if resources.nodes > 1 else f"{resources.gpus}"
    print(f"grpo train: {resources.world_size} ranks ({where} per node), torchrun {' '.join(torchrun)}", file=sys.stderr)
    try:
        run(parse_args([*torchrun, "--module", "grpo_runtime.cli", "train", *train_args]))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        codes = {f.exitcode for f in exc.failures.values()}
        print(
            f"grpo train: rank {rank} of {resources.world_size} failed first (exit code {failure.exitcode}); "
            "its error is above; the others were stopped. The same command resumes from the last checkpoint",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT if EXIT_BAD_INPUT in codes else EXIT_FAILURE
    return EXIT_OK


def run_job(job: GRPOJob, *, output: str | None = None, max_steps: int | None = None, quiet: bool = False) -> int:
    from grpo_runtime.distributed import join, leave

    world = join(job.spec.resources.rank_timeout_seconds)
    rank = f"rank {world.rank} " if world.size > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {rank}%(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return _run_job(job, world, output=output, max_steps=max_steps, quiet=quiet or not world.main)
    finally:
        leave()


def _run_job(job: GRPOJob, world, *, output: str | None, max_steps: int | None, quiet: bool) -> int:
    if max_steps is not None:
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"training": job.spec.training.model_copy(update={"max_steps": max_steps})})})
    uri = output_uri(job, output)
    bad_input = _bad_input_errors()
    from grpo_runtime.device import DeviceError

    try:
        from grpo_runtime.tracking import open_tracking

        prepared = _prepare(job, uri, world)
        storage, trainer = prepared.storage, prepared.trainer(job)
        if world.main:
            storage.write_bytes("spec.yaml", yaml.safe_dump(job.to_manifest(), sort_keys=False).encode())
        if job.spec.checkpoint.resume and trainer.resume() and world.main:
            log.info("resumed from %s at step %d", trainer.latest_checkpoint, trainer.step)
        bar = ProgressBar(job.spec.training.max_steps, trainer.step, quiet)
        trainer.on_step.append(bar)
        trainer.on_eval.append(bar.eval)
        sinks = status_progress(job) if world.main else None
        if sinks:
            trainer.on_step.append(sinks[0])
            trainer.on_eval.append(sinks[1])
        tracking = open_tracking(job, storage, step=trainer.step, extras=trainer.checkpoint_extras) if world.main else None
        if tracking:
            trainer.on_step.append(tracking)
            trainer.on_eval.append(tracking)  # eval records: the same step axis, eval/... names
        started = time.perf_counter()
        first_step = trainer.step
        ok = False
        try:
            last = trainer.train()
            ok = True
        finally:
            bar.close()
            if tracking:
                tracking.finish(ok)
    except bad_input as exc:
        print(f"grpo train: {world.label}{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DeviceError as exc:  # the node's, retried; its message says what to check, a traceback would not
        print(f"grpo train: {world.label}{exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("grpo train: interrupted; resume from the last checkpoint with the same command", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # the operator retries these from LATEST
        log.exception("training failed")
        print(f"grpo train: {world.label}failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if not world.main:
        return EXIT_OK
    elapsed = time.perf_counter() - started
    ran = trainer.step - first_step
    history = trainer.eval_history
    if history:
        first_eval, last_eval = history[0], history[-1]
        print(
            f"eval accuracy: {first_eval['eval/accuracy']:.3f} at step {first_eval['step']} -> "
            f"{last_eval['eval/accuracy']:.3f} at step {last_eval['step']} on {last_eval['eval/num_prompts']} held-out prompts"
        )
    if last:
        print(
            f"done: {ran} steps in {elapsed:.0f}s, final reward {last['reward']:.3f}, kl {last['kl']:.4f}; "
            f"adapter at {uri.rstrip('/')}/final, metrics under {uri.rstrip('/')}/metrics/"
        )
    else:
        print(f"done: nothing to run, step {trainer.step} of {job.spec.training.max_steps} already reached; adapter at {uri.rstrip('/')}/final")
    return EXIT_OK
