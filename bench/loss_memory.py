"""Peak memory and time of the GRPO loss (forward + backward): naive full logits vs ours vs Liger.

Each measurement runs in a fresh process (this script calling itself), so one variant's
allocator state cannot flatter another's. What is measured, after the inputs are allocated
and a small warm-up (thread pools, kernels) is done:

- cpu: peak resident memory above that point. The child resets the kernel's high-water mark
  (``echo 5 > /proc/self/clear_refs`` sets VmHWM to the current VmRSS; checked at start) and
  reports VmHWM - VmRSS_before. glibc is told to mmap every allocation >= 64 KiB
  (MALLOC_MMAP_THRESHOLD_), so freed buffers leave RSS at once instead of hiding in the heap.
- cuda: torch.cuda.max_memory_allocated() above memory_allocated() (bf16), timed with CUDA events.

The lm_head is frozen by default, as it is under this project's LoRA training (--trainable-lm-head
gives it a gradient too). Gradients are allocated inside the measured step for every variant.
Loss values are printed to show the three agree. Wall time moves with whatever else runs on the
machine; the CPU time of the process (all threads) barely does, so both are printed.

    python bench/loss_memory.py                 # B=8 V=49152 D=576, T in 512 1024 2048 4096 (~15 min on 2 cores)
    python bench/loss_memory.py --T 512         # one length (~1-2 min)
    python bench/loss_memory.py --shape tiny    # smoke run in seconds (the tests run it)
    python bench/loss_memory.py --device cuda   # bf16, B=8 V=128256 D=4096, T in 2048 8192 20480 (--shape seeds)
    python bench/loss_memory.py --T 1024 --entropy-coef 0.01   # with TRL's entropy bonus (naive and ours)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPES = {  # name: (B, V, D, default T list)
    "smollm": (8, 49152, 576, [512, 1024, 2048, 4096]),
    "seeds": (8, 128256, 4096, [2048, 8192, 20480]),
    "tiny": (2, 512, 32, [64]),  # smoke run for tests
}
VARIANTS = ("naive", "ours", "liger")
BETA, EPS, IS_CAP = 0.04, 0.2, 3.0


# --------------------------------------------------------------------------- the three losses


def naive_loss(hidden, weight, targets, mask, adv, old, ref, sampling, entropy_coef=0.0):
    """Full [B, T, V] logits, TRL's formulas (dapo, beta 0.04 on k3 x the ratio, clip 0.2, the sampler
    correction truncated at 3, the entropy for its metric, 128 rows at a time as TRL's entropy_from_logits;
    with entropy_coef, TRL's entropy bonus on it, differentiated)."""
    import torch

    logps = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    with torch.set_grad_enabled(bool(entropy_coef) and torch.is_grad_enabled()):
        entropy = torch.cat([-(rows.exp() * rows).sum(-1) for rows in logps.view(-1, logps.shape[-1]).split(128)])
    bonus = entropy_coef * (entropy.view_as(mask) * mask).sum() / mask.sum().clamp(min=1)
    logp = logps.gather(-1, targets[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old)
    ptl = -torch.min(ratio * adv[:, None], ratio.clamp(1 - EPS, 1 + EPS) * adv[:, None])
    ptl = ptl * sampling_weight(old, sampling)
    d = ref - logp
    ptl = ptl + BETA * (torch.exp(d) - d - 1) * ratio
    return (ptl * mask).sum() / mask.sum().clamp(min=1) - bonus


def sampling_weight(old, sampling):
    """The sampler correction, token_truncate: min(pi_old / pi_sampler, cap) per token."""
    import torch

    return torch.exp(old - sampling).clamp(max=IS_CAP)


def ours_loss(hidden, weight, targets, mask, adv, old, ref, sampling, chunk_size, entropy_coef=0.0):
    from grpo_runtime.loss import LossConfig, grpo_loss

    cfg = LossConfig(loss_type="dapo", beta=BETA, epsilon=EPS, chunk_size=chunk_size, sampling_correction_max=IS_CAP)
    return grpo_loss(hidden, weight, targets, mask, adv, old_logps=old, ref_logps=ref, sampling_logps=sampling,
                     config=cfg, entropy_coef=entropy_coef)[0]


def liger_loss(hidden, weight, targets, mask, adv, old, ref, sampling):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # compiled=False: Liger compiles only its small per-chunk loss maths; its matmuls are the same either way.
    fn = LigerFusedLinearGRPOLoss(
        beta=BETA, use_ref_model=True, epsilon_low=EPS, epsilon_high=EPS, loss_type="dapo", compiled=False,
        use_bias_correction_kl=True,
    )
    return fn(hidden, weight, targets, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old,
              vllm_is_ratio=sampling_weight(old, sampling))[0]


# --------------------------------------------------------------------------- one measurement (child process)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _check_hwm_reset() -> None:
    """The measure is only honest if clear_refs really resets VmHWM: prove it on a 256 MB buffer."""
    import torch

    x = torch.ones(64 << 20)  # 256 MB, touched
    del x
    before = _status_kb("VmHWM")
    _reset_hwm()
    after, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    if not (before - after > 200_000 and after - rss < 10_000):
        raise RuntimeError(f"VmHWM reset does not work here (before {before} kB, after {after} kB, rss {rss} kB)")


def _inputs(B, T, D, V, device, dtype, frozen, mask_kind, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * D**-0.5).to(device, dtype).requires_grad_(not frozen)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    if mask_kind == "full":
        mask = torch.ones(B, T)
    else:  # completions of a group differ in length: uniform in [T/4, T]
        lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).float()
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 3 - 9  # near the log-probs of random logits (-log V ~ -10.8)
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    sampling = old + 0.1 * torch.randn(B, T, generator=g)  # the sampler's log-probs: the correction is on
    return hidden, weight, targets, mask.to(device), adv.to(device), old.to(device), ref.to(device), sampling.to(device)


def child(args) -> dict:
    import torch

    B, V, D, _ = SHAPES[args.shape]
    T, device = args.T[0], args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    losses = {
        "naive": lambda *a: naive_loss(*a, entropy_coef=args.entropy_coef),
        "ours": lambda *a: ours_loss(*a, chunk_size=args.chunk_size, entropy_coef=args.entropy_coef),
        "liger": liger_loss,
    }
    fn = losses[args.variant]

    def step(inputs):
        hidden, weight = inputs[0], inputs[1]
        hidden.grad = weight.grad = None
        loss = fn(*inputs)
        loss.backward()
        return loss.item()

    step(_inputs(B, min(T, 64), D, V, device, dtype, not args.trainable_lm_head, args.mask, seed=1))  # warm-up
    inputs = _inputs(B, T, D, V, device, dtype, not args.trainable_lm_head, args.mask)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step(inputs)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
        peak = torch.cuda.max_memory_allocated() - base
    else:
        _check_hwm_reset()
        _reset_hwm()
        base = _status_kb("VmRSS") * 1024
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        loss = step(inputs)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        peak = _status_kb("VmHWM") * 1024 - base
    return {"variant": args.variant, "T": T, "peak_bytes": peak, "seconds": seconds, "loss": loss,
            "cpu_seconds": cpu if device == "cpu" else None}


def _cpu_seconds() -> float:
    """CPU time of this process, all threads: unlike wall time, barely moved by other load on the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- the table (parent process)


def _available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _run_child(args, variant: str, T: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--variant", variant, "--T", str(T),
           "--shape", args.shape, "--device", args.device, "--chunk-size", str(args.chunk_size), "--mask", args.mask,
           "--entropy-coef", str(args.entropy_coef)]
    if args.trainable_lm_head:
        cmd.append("--trainable-lm-head")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(T: int, variant: str, r: dict) -> str:
    if "peak_bytes" not in r:
        return f"{T:>6}  {variant:<6}  {r.get('skip') or 'error: ' + r.get('error', '?')}"
    cpu = f"{r['cpu_seconds']:8.2f}" if r.get("cpu_seconds") is not None else f"{'-':>8}"
    return f"{T:>6}  {variant:<6}  {r['peak_bytes'] / 2**30:9.3f}  {r['seconds']:8.2f}  {cpu}  {r['loss']:+.6f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", choices=tuple(SHAPES), default=None,
                   help="smollm (cpu default), seeds (cuda default) or tiny (smoke run)")
    p.add_argument("--T", type=int, nargs="+", default=None, help="completion lengths (default: the shape's list)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--chunk-size", type=int, default=512, help="ours: token rows per chunk (LossConfig default)")
    p.add_argument("--mask", choices=("full", "ragged"), default="full",
                   help="full: every token counted (our worst case); ragged: lengths uniform in [T/4, T]")
    p.add_argument("--trainable-lm-head", action="store_true",
                   help="give the lm_head weight a gradient too (default: frozen, as under this project's LoRA)")
    p.add_argument("--entropy-coef", type=float, default=0.0,
                   help="TRL's entropy bonus in naive and ours (Liger has none: it is left out)")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("seeds" if args.device == "cuda" else "smollm")
    B, V, D, default_T = SHAPES[args.shape]
    args.T = args.T or default_T
    if args._child:
        print(json.dumps(child(args)))
        return

    load = os.getloadavg()
    print(f"GRPO loss fwd+bwd, {args.device}, B={B} V={V} D={D}, mask={args.mask}, "
          f"lm_head {'trainable' if args.trainable_lm_head else 'frozen'}, ours chunk_size={args.chunk_size}, "
          f"entropy_coef={args.entropy_coef:g}, "
          f"{os.cpu_count()} cpus, load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    bytes_per = 14 if args.device == "cuda" else 16
    results: dict[tuple[str, int], dict] = {}
    print(f"{'T':>6}  {'':<6}  {'peak GiB':>9}  {'wall s':>8}  {'cpu s':>8}  loss")
    for T in args.T:
        for variant in args.variants:
            need = B * T * V * bytes_per  # naive: logits, log-softmax, its grad, a temporary (+ a bf16 copy)
            if variant == "liger" and args.entropy_coef:
                results[variant, T] = {"skip": "n/a (no entropy bonus)"}
            elif variant == "naive" and need > 0.9 * _available_bytes(args.device):
                results[variant, T] = {"skip": f"n/a (needs ~{need / 1e9:.0f} GB)"}
            else:
                results[variant, T] = _run_child(args, variant, T)
            print(_row(T, variant, results[variant, T]), flush=True)
    load = os.getloadavg()
    print(f"load avg after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    lines = []
    for T in args.T:
        naive, ours = results.get(("naive", T), {}), results.get(("ours", T), {})
        if "peak_bytes" in naive and "peak_bytes" in ours:
            if ours.get("cpu_seconds"):
                print(f"T={T} cpu time ours/naive = {ours['cpu_seconds'] / naive['cpu_seconds']:.2f}")
            # at tiny shapes ours can stay inside memory already mapped: a peak of 0 (the high-water mark
            # moves by pages) is below what this can measure, not an infinite ratio
            memory = (f"{naive['peak_bytes'] / ours['peak_bytes']:.1f}" if ours["peak_bytes"] > 0
                      else "n/a (ours below the resolution)")
            lines.append((T == 2048, f"T={T} memory naive/ours = {memory} "
                                     f"time ours/naive = {ours['seconds'] / naive['seconds']:.2f}"))
    for _, line in sorted(lines, key=lambda x: x[0]):  # the T=2048 line last
        print(line)


if __name__ == "__main__":
    main()
