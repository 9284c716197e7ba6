"""hf vs vllm engine on SmolLM2 (CPU by default): generation tokens/s and the time of a whole GRPO step.

Each engine runs in a fresh process (this script calling itself) with the trainer's own pieces:
`run._prepare` loads the job (examples/local-cpu.yaml, engine overridden), the policy and the
engine; generation is timed on the job's chat-templated prompts with every completion forced to
its full length (min_tokens = max_tokens, understood by both engines), so both produce exactly
the same number of tokens; the step is `Trainer.run_step` (rollout, rewards, loss, backward,
optimizer step, weight push), averaged over the steps after the first (which pads to the job's
maximum lengths and pays one-off warm-ups). Peak RSS is the process's high-water mark: learner +
engine, set against the size of the base weights. Wall time moves with whatever else runs on the
machine; the process's CPU time (all threads) much less, so both are printed.

    python bench/engines.py                     # SmolLM2, 8 x 96 and 32 x 256, 3 steps (~10-15 min on 2 cores)
    python bench/engines.py --steps 2 --sizes 8x96
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checkout import REPO, child_env  # bench/ is on sys.path: the scripts run from it

JOB = REPO / "examples" / "local-cpu.yaml"
GROUP = 8  # completions per prompt in the generation runs (the job's numGenerations)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(engine_name: str, sizes: list[tuple[int, int]], steps: int) -> dict:
    import yaml
    from grpo_runtime.engines import SamplingConfig
    from grpo_runtime.run import _prepare
    from grpo_runtime.spec import parse_job
    from grpo_runtime.prompts import encode_prompts

    doc = yaml.safe_load(JOB.read_text())
    doc["spec"]["generation"]["engine"] = engine_name
    doc["spec"]["training"]["maxSteps"] = steps
    step_job = parse_job(doc)
    doc["spec"]["generation"]["maxCompletionLength"] = max(length for _, length in sizes)  # engine sized for the longest run
    engine_job = parse_job(doc)

    with tempfile.TemporaryDirectory(prefix="bench-engines-") as out:
        started = time.perf_counter()
        prepared = _prepare(engine_job, out)
        policy, engine, sampler = prepared.policy, prepared.engine, prepared.sampler
        load_seconds = time.perf_counter() - started
        rows = sampler.rows
        result: dict = {"engine": engine_name, "load_s": load_seconds, "generate": {}}

        def rollout(count: int, n: int, length: int) -> float:
            prompt_ids = encode_prompts(policy, step_job, [rows[i % len(rows)] for i in range(count)])
            sampling = SamplingConfig(n=n, max_tokens=length, seed=0, extra={"min_tokens": length})
            t0 = time.perf_counter()
            engine.wake()
            completions = engine.generate(prompt_ids, sampling)
            engine.sleep()
            seconds = time.perf_counter() - t0
            assert sum(len(c.completion_ids) for c in completions) == count * n * length
            return seconds

        rollout(1, 2, 8)  # warm-up: thread pools, the engine's first weight push
        for sequences, length in sizes:
            seconds = rollout(sequences // GROUP, GROUP, length)
            result["generate"][f"{sequences}x{length}"] = sequences * length / seconds

        trainer = prepared.trainer(step_job)
        walls, cpus, gens = [], [], []
        for _ in range(steps):
            cpu0 = _cpu_seconds()
            metrics = trainer.run_step()
            walls.append(metrics["step_seconds"])
            gens.append(metrics["generation_seconds"])
            cpus.append(_cpu_seconds() - cpu0)
        timed = slice(1, None) if steps > 1 else slice(0, None)
        mean = lambda values: sum(values[timed]) / len(values[timed])
        result.update(step_s=mean(walls), step_gen_s=mean(gens), step_cpu_s=mean(cpus), steps_s=walls)
        result["peak_rss"] = _peak_rss_bytes()
        result["weights"] = sum(p.stat().st_size for p in Path(policy.source).glob("*.safetensors"))
        result["sync_s"] = getattr(engine, "last_sync_seconds", 0.0)
    return result


def _run_child(engine: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", engine, "--steps", str(args.steps), "--sizes", *args.sizes]
    env = child_env((".", "runtime", "operator"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-5:]
        return {"engine": engine, "error": " | ".join(tail) or f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="GRPO steps per engine; the first is not averaged")
    p.add_argument("--sizes", nargs="+", default=["8x96", "32x256"], help="generation runs: SEQUENCESxTOKENS")
    p.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=("hf", "vllm"))
    p.add_argument("--_child", choices=("hf", "vllm"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes]
    if args._child:
        print(json.dumps(child(args._child, sizes, args.steps)))
        return

    load = os.getloadavg()
    print(f"engines on {JOB.name} (SmolLM2-135M fp32, {os.cpu_count()} cpus, load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    results = {}
    header = f"{'engine':<6}  {'load s':>6}  " + "  ".join(f"{s + ' tok/s':>13}" for s in args.sizes)
    header += f"  {'step s':>7}  {'of it gen s':>11}  {'sync s':>6}  {'step cpu s':>10}  {'peak RSS GiB':>12}  {'x weights':>9}"
    print(header)
    for engine in args.engines:
        r = results[engine] = _run_child(engine, args)
        if "error" in r:
            print(f"{engine:<6}  error: {r['error']}", flush=True)
            continue
        row = f"{engine:<6}  {r['load_s']:6.1f}  " + "  ".join(f"{r['generate'][s]:13.1f}" for s in args.sizes)
        row += f"  {r['step_s']:7.1f}  {r['step_gen_s']:11.1f}  {r['sync_s']:6.2f}  {r['step_cpu_s']:10.1f}"
        row += f"  {r['peak_rss'] / 2**30:12.2f}  {r['peak_rss'] / r['weights']:9.1f}"
        print(row, flush=True)
    load = os.getloadavg()
    print(f"load avg after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; base weights {results[args.engines[0]].get('weights', 0) / 2**20:.0f} MiB")
    hf, vllm = results.get("hf", {}), results.get("vllm", {})
    if "step_s" in hf and "step_s" in vllm:
        for size in args.sizes:
            print(f"generate {size} vllm/hf tokens/s = {vllm['generate'][size] / hf['generate'][size]:.2f}")
        print(f"step cpu vllm/hf = {vllm['step_cpu_s'] / hf['step_cpu_s']:.2f}")
        print(f"step vllm/hf = {vllm['step_s'] / hf['step_s']:.2f}")


if __name__ == "__main__":
    main()
