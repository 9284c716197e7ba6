"""Does a GRPOJob learn as well with us as with TRL's GRPOTrainer, and in how much time? Over several seeds.

For each seed (training.seed = the job's seed, +1, +2, ... unless --seeds lists them):
  base  the untrained model, scored on the job's held-out prompts
  ours  `grpo train` on the job as written (in a fresh process); its final adapter is scored
  trl   TRL's GRPOTrainer mapped from the same spec (in a fresh process): the same base weights, the
        same LoRA initialised under training.seed, the same training rows in our sampler's order
        (held-out prompts left out), the same rewards and weights, batch, lengths, temperature,
        loss type, clip, beta, learning rate and schedule, optimizer (AdamW), gradient clipping and
        checkpointing; TRL samples with transformers `generate` (its vLLM colocate mode does not run
        on vLLM's CPU build); its final adapter is scored
All three are scored by one routine: our evaluator on the transformers engine, greedy when
evaluation.numSamples is 1, so accuracy is pass@1 on the same held-out prompts (it reproduces the
job's own step-0 evaluation when the job's engine is hf).

Time is wall time of the training process, start to exit, model loading included. Ours has the
job's own held-out evaluations in it (spec.evaluation runs them); their measured seconds are
taken out, as TRL runs none.

Every result is appended to --results (JSON lines) as soon as it is measured, keyed by what it
depends on, and reused by a later run with the same job and options: a long run can be stopped and
continued, and an ablation (--set) reruns only the side it changes.

    python bench/learning_vs_trl.py                                   # examples/local-cpu.yaml, 3 seeds
    python bench/learning_vs_trl.py --set generation.engine=hf        # an ablation of ours
    python bench/learning_vs_trl.py --quick                           # 2 steps, 8 held-out prompts, smoke
Last line: `accuracy ours X trl Y (mean of N seeds) time ours/trl Z`.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from checkout import REPO, child_env  # bench/ is on sys.path: the scripts run from it

JOB = REPO / "examples" / "local-cpu.yaml"
RESULTS = REPO / "bench" / "results" / "learning_vs_trl.jsonl"
EXIT_BAD_INPUT = 2
# Spec fields TRL's mapping does not read: a change to them reruns ours only.
NOT_FOR_TRL = ("generation.engine", "generation.vllm", "training.samplingCorrection", "training.samplingCorrectionMax",
               "training.samplingCorrectionMin", "checkpoint", "output", "evaluation.everySteps", "training.logSamples")
QUICK = {"training.maxSteps": 2, "training.promptsPerStep": 2, "generation.numGenerations": 4,
         "generation.maxCompletionLength": 16, "evaluation.heldOut": 8, "evaluation.everySteps": None}


# ---------------------------------------------------------------------------------------------
# The job and its variants


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    """spec.<path> = value, the path in the manifest's own (camelCase) names; None removes the field."""
    *parents, leaf = path.split(".")
    node = doc["spec"]
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value


def variant(doc: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(doc)
    for path, value in values.items():
        set_path(changed, path, value)
    return changed


def parse_sets(items: list[str]) -> dict[str, Any]:
    values = {}
    for item in items:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise SystemExit(f"bench/learning_vs_trl.py: --set {item!r}: expected spec.path=value, e.g. generation.engine=hf")
        values[path.removeprefix("spec.")] = yaml.safe_load(raw)
    return values


def key_of(doc: dict[str, Any], side: str) -> str:
    """What a result depends on: the validated spec (defaults filled in), less what that side does not read."""
    from grpo_runtime.spec import parse_job

    spec = {"spec": parse_job(doc).to_manifest()["spec"]}
    if side != "ours":
        for path in NOT_FOR_TRL:
            set_path(spec, path, None)
    blob = json.dumps({"side": "trl" if side == "trl" else side, "spec": spec["spec"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Roles, each in a fresh process: the common evaluation, and TRL's training


def evaluate(doc: dict[str, Any], adapter: str | None) -> dict[str, Any]:
    """Held-out scores of the base model (adapter None) or of a saved PEFT adapter on it, by our evaluator on the
    transformers engine."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from grpo_runtime.data import load_rows
    from grpo_runtime.engines import make_engine
    from grpo_runtime.evaluation import Evaluator, split_rows
    from grpo_runtime.model import load_policy
    from grpo_runtime.rewards import load_rewards
    from grpo_runtime.spec import parse_job

    job = parse_job(variant(doc, {"generation.engine": "hf"}))
    spec = job.spec
    _, held_out = split_rows(job, load_rows(spec.dataset))
    policy = load_policy(spec.model, spec.lora, seed=spec.training.seed)
    if adapter is not None:
        missing = set_peft_model_state_dict(policy.model, load_file(str(Path(adapter) / "adapter_model.safetensors")))
        if missing.unexpected_keys:
            raise RuntimeError(f"{adapter}: weights of another adapter: {missing.unexpected_keys[:3]}")
    engine = make_engine(spec.generation, policy, training_spec=spec.training, model_spec=spec.model)
    rewards = load_rewards(spec.rewards, chat_template_kwargs=spec.model.chat_template_kwargs)
    metrics, _ = Evaluator(job, policy, engine, rewards, held_out).evaluate(spec.training.max_steps if adapter else 0)
    return {"accuracy": metrics["eval/accuracy"], "prompts": metrics["eval/num_prompts"],
            "completion_length": metrics["eval/completion_length"]}


def trl_rows(job) -> list[dict[str, Any]]:
    """The rows the job trains on, in the order our sampler hands them out: maxSteps x promptsPerStep of them."""
    from grpo_runtime.data import PromptSampler, load_rows
    from grpo_runtime.evaluation import split_rows

    spec = job.spec
    rows, _ = split_rows(job, load_rows(spec.dataset))
    sampler = PromptSampler(rows, seed=spec.training.seed, shuffle=spec.dataset.shuffle)
    return sampler.take(spec.training.max_steps * spec.training.prompts_per_step)


def trl_config(job, output_dir: str, *, cpu: bool) -> dict[str, Any]:
    """GRPOConfig's arguments for the job."""
    training, generation = job.spec.training, job.spec.generation
    per_step = training.prompts_per_step * generation.num_generations
    if per_step % training.gradient_accumulation_steps:
        raise ValueError("TRL needs training.gradientAccumulationSteps to divide promptsPerStep x numGenerations")
    return dict(
        output_dir=output_dir, use_cpu=cpu, bf16=job.spec.model.dtype == "bfloat16", seed=training.seed,
        max_steps=training.max_steps, shuffle_dataset=False,  # the rows come in our sampler's order
        per_device_train_batch_size=per_step // training.gradient_accumulation_steps,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        num_generations=generation.num_generations, max_completion_length=generation.max_completion_length,
        temperature=generation.temperature, top_p=generation.top_p, top_k=generation.top_k or 0,
        beta=training.beta, loss_type=training.loss_type, epsilon=training.epsilon,
        epsilon_high=training.epsilon_high, num_iterations=training.num_iterations,
        scale_rewards=training.scale_rewards, mask_truncated_completions=training.mask_truncated_completions,
        learning_rate=training.learning_rate, lr_scheduler_type=training.lr_scheduler,
        warmup_steps=int(training.warmup_ratio * training.max_steps), weight_decay=training.weight_decay, max_grad_norm=training.max_grad_norm,
        optim="adamw_torch",  # ours: torch.optim.AdamW with its default betas and eps; warm-up: as our lr_schedule counts it
        gradient_checkpointing=training.gradient_checkpointing != "off",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        reward_weights=[reward.weight for reward in job.spec.rewards],
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
    )


def train_trl(doc: dict[str, Any], adapter: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from grpo_runtime.model import load_policy, save_adapter
    from grpo_runtime.prompts import chat_messages
    from grpo_runtime.rewards import load_rewards
    from grpo_runtime.spec import parse_job

    job = parse_job(doc)
    spec = job.spec
    policy = load_policy(spec.model, spec.lora, seed=spec.training.seed)  # our LoRA init: the same starting adapter
    policy.model.config.use_cache = True  # as from_pretrained leaves it: TRL's generate keeps its KV cache
    field = spec.dataset.prompt_field
    prefix = f"{spec.dataset.system_prompt}\n\n" if spec.dataset.system_prompt else ""
    dataset = Dataset.from_list([
        {**{k: v for k, v in row.items() if k != field},
         "prompt": chat_messages(job, policy.tokenizer, row[field]) or prefix + str(row[field]),
         "answer": row.get(spec.dataset.answer_field)}
        for row in trl_rows(job)
    ])

    firsts = []  # each step's first prompt, as our samples/step-N.jsonl records it: the data order, checked

    def as_trl(reward, index):
        def call(prompts, completions, **columns):
            if index == 0:
                firsts.append(prompt_text(prompts[0]))
            return reward.fn(prompts, completions, **columns)
        call.__name__ = reward.name
        return call

    rewards = load_rewards(spec.rewards, chat_template_kwargs=spec.model.chat_template_kwargs)
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(
            model=policy.model, reward_funcs=[as_trl(r, i) for i, r in enumerate(rewards)], train_dataset=dataset,
            args=GRPOConfig(**trl_config(job, out, cpu=not torch.cuda.is_available())), processing_class=policy.tokenizer,
        )
        trainer.train()
    save_adapter(trainer.model, adapter)
    logs = [line for line in trainer.state.log_history if "reward" in line]
    return {"steps": trainer.state.global_step, "prompt_order": digest(firsts), **tail_means(logs)}


def prompt_text(prompt: Any) -> str:
    """The dataset's prompt in what a reward gets: the last user message of a chat, or the text after the system
    prompt."""
    if isinstance(prompt, list):
        return next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    return str(prompt).rpartition("\n\n")[2]


def digest(texts: list[str]) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


def tail_means(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean reward and entropy over the last quarter of the steps: where the two runs ended up."""
    tail = records[-max(1, len(records) // 4):]
    return {name: statistics.fmean(r[name] for r in tail) for name in ("reward", "entropy") if all(name in r for r in tail)}


def role(args) -> int:
    doc = yaml.safe_load(Path(args.job).read_text())
    result = train_trl(doc, args.adapter) if args.role == "trl" else evaluate(doc, args.adapter)
    print("RESULT " + json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# The runs


def run_role(name: str, job: Path, adapter: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--role", name, "--job", str(job)] + (["--adapter", str(adapter)] if adapter else [])
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(TOKENIZERS_PARALLELISM="false"), check=False)
    seconds = time.perf_counter() - started
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{name} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return {**json.loads(line.removeprefix("RESULT ")), "seconds": seconds}


def train_ours(job: Path, output: Path) -> dict[str, Any]:
    sys.path[:0] = [str(REPO / "runtime")]
    from grpo_runtime.report import read_metrics

    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "grpo_runtime.cli", "train", str(job), "--output", str(output)],
                         env=child_env(TOKENIZERS_PARALLELISM="false"), stdout=sys.stderr, check=False)
    seconds = time.perf_counter() - started
    if run.returncode:
        raise RuntimeError(f"grpo train exited {run.returncode}")
    records = read_metrics(str(output))
    evals = [r for r in records if "eval/accuracy" in r]
    steps = [r for r in records if "reward" in r and "eval/accuracy" not in r]
    eval_seconds = sum(r["eval/seconds"] for r in evals)
    samples = [output / "samples" / f"step-{r['step']}.jsonl" for r in steps]
    firsts = [json.loads(path.read_text().splitlines()[0])["prompt"] for path in samples if path.exists()]
    own = {f"own_{when}": {"accuracy": r["eval/accuracy"], "completion_length": r["eval/completion_length"]}
           for when, r in (("base", evals[0]), ("final", evals[-1]))}  # the job's own evaluations, on its engine
    return {"seconds": seconds - eval_seconds, "eval_seconds": eval_seconds, "steps": len(steps),
            "prompt_order": digest(firsts) if len(firsts) == len(steps) else None, **own, **tail_means(steps)}


class Results:
    """The results file: one JSON line per measurement, found again by (key, seed)."""

    def __init__(self, path: Path):
        self.path = path
        self.lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []

    def get(self, key: str, seed: int) -> dict[str, Any] | None:
        return next((l for l in reversed(self.lines) if l["key"] == key and l["seed"] == seed), None)

    def add(self, line: dict[str, Any]) -> dict[str, Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
        self.lines.append(line)
        return line


def measure(results: Results, doc: dict[str, Any], seed: int, work: Path) -> dict[str, dict[str, Any]]:
    """base, ours and trl of one seed: from the results file where they are there, else run now."""
    job = work / f"seed-{seed}.yaml"
    job.write_text(yaml.safe_dump(doc, sort_keys=False))
    rows = {}
    for side in ("base", "ours", "trl"):
        key = key_of(doc, side)
        found = results.get(key, seed)
        if found is not None:
            print(f"seed {seed} {side}: from {results.path.name} ({found['when']})", file=sys.stderr)
            rows[side] = found
            continue
        print(f"seed {seed} {side}: running", file=sys.stderr)
        adapter = work / f"seed-{seed}-{side}"
        if side == "base":
            line = run_role("eval", job, None)
        else:
            line = train_ours(job, adapter) if side == "ours" else run_role("trl", job, adapter / "final")
            scored = run_role("eval", job, adapter / "final")
            line = {**line, "accuracy": scored["accuracy"], "prompts": scored["prompts"],
                    "completion_length": scored["completion_length"]}
        rows[side] = results.add({"key": key, "seed": seed, "side": side, "cores": os.cpu_count(),
                                  "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **line})
    return rows


def spread(values: list[float]) -> str:
    return f"+-{statistics.stdev(values):.3f}" if len(values) > 1 else ""


def report(doc: dict[str, Any], per_seed: dict[int, dict[str, dict[str, Any]]]) -> None:
    spec = doc["spec"]
    training, generation = spec.get("training", {}), spec.get("generation", {})
    first = next(iter(per_seed.values()))
    print(f"{doc['metadata']['name']}: {training.get('maxSteps')} steps x {training.get('promptsPerStep', 4)} prompts x "
          f"{generation.get('numGenerations')} completions, {first['base']['prompts']} held-out prompts, "
          f"{os.cpu_count()} cores; ours engine {generation.get('engine', 'auto')}, TRL {trl_version()} with generate")
    header = f"{'seed':>5} {'base':>6} {'ours':>6} {'trl':>6} {'ours s':>8} {'trl s':>8} {'ours/trl':>9} " \
             f"{'ours H':>7} {'trl H':>7}"
    print(header)
    for seed, rows in per_seed.items():
        base, ours, trl = rows["base"], rows["ours"], rows["trl"]
        print(f"{seed:>5} {base['accuracy']:>6.3f} {ours['accuracy']:>6.3f} {trl['accuracy']:>6.3f} "
              f"{ours['seconds']:>8.0f} {trl['seconds']:>8.0f} {ours['seconds'] / trl['seconds']:>9.2f} "
              f"{ours.get('entropy', float('nan')):>7.3f} {trl.get('entropy', float('nan')):>7.3f}")
    columns = {side: [rows[side]["accuracy"] for rows in per_seed.values()] for side in ("base", "ours", "trl")}
    ours_s = [rows["ours"]["seconds"] for rows in per_seed.values()]
    trl_s = [rows["trl"]["seconds"] for rows in per_seed.values()]
    ratio = statistics.fmean(ours_s) / statistics.fmean(trl_s)
    print(f"{'mean':>5} {statistics.fmean(columns['base']):>6.3f} {statistics.fmean(columns['ours']):>6.3f} "
          f"{statistics.fmean(columns['trl']):>6.3f} {statistics.fmean(ours_s):>8.0f} {statistics.fmean(trl_s):>8.0f} "
          f"{ratio:>9.2f}")
    if len(per_seed) > 1:
        print(f"{'std':>5} {spread(columns['base']):>6} {spread(columns['ours']):>6} {spread(columns['trl']):>6}")
        # the same prompts and initial adapter per seed: the paired difference is what the seeds can tell apart
        paired = [rows["ours"]["accuracy"] - rows["trl"]["accuracy"] for rows in per_seed.values()]
        print(f"ours - trl by seed: {' '.join(f'{d:+.3f}' for d in paired)}; mean {statistics.fmean(paired):+.3f} "
              f"{spread(paired)}")
    for seed, rows in per_seed.items():
        orders = {rows[side].get("prompt_order") for side in ("ours", "trl")}
        if None not in orders and len(orders) > 1:
            print(f"seed {seed}: TRL was given other prompts, or in another order, than ours trained on")
    print("(H: mean token entropy over the last quarter of the steps; time: training wall time, evaluations excluded)")
    print(f"accuracy ours {statistics.fmean(columns['ours']):.3f} trl {statistics.fmean(columns['trl']):.3f} "
          f"(mean of {len(per_seed)} seeds) time ours/trl {ratio:.2f}")


def trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default=str(JOB), help="the GRPOJob (default: examples/local-cpu.yaml)")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds: the job's training.seed and the next ones")
    parser.add_argument("--seed", type=int, action="append", help="run this seed (repeatable; instead of --seeds)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="change a spec field for this run, e.g. generation.engine=hf (repeatable)")
    parser.add_argument("--results", default=str(RESULTS), help="results file to reuse and append to (JSON lines)")
    parser.add_argument("--quick", action="store_true", help="2 steps, 2 prompts x 4 completions of 16 tokens, 8 held out")
    parser.add_argument("--role", choices=["eval", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        return role(args)

    sys.path[:0] = [str(REPO / "runtime")]
    from grpo_runtime.spec import SpecError, parse_job

    doc = next(d for d in yaml.safe_load_all(Path(args.job).read_text()) if d and d.get("kind") == "GRPOJob")
    doc = variant(doc, {**(QUICK if args.quick else {}), **parse_sets(args.set)})
    try:
        job = parse_job(doc)
    except SpecError as exc:
        print(f"bench/learning_vs_trl.py: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if job.spec.evaluation is None:
        print(f"bench/learning_vs_trl.py: {args.job} has no spec.evaluation: nothing would be scored", file=sys.stderr)
        return EXIT_BAD_INPUT
    if job.spec.environment is not None or job.spec.tools:
        print("bench/learning_vs_trl.py: jobs with tools or an environment are not mapped to TRL here", file=sys.stderr)
        return EXIT_BAD_INPUT
    seeds = args.seed or [job.spec.training.seed + i for i in range(args.seeds)]
    results = Results(Path(args.results))
    with tempfile.TemporaryDirectory(prefix="bench-learning-vs-trl-") as tmp:
        per_seed = {seed: measure(results, variant(doc, {"training.seed": seed}), seed, Path(tmp)) for seed in seeds}
    report(doc, per_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
