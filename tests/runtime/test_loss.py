"""The fused GRPO loss equals the plain full-logits loss (TRL's formulas), value and gradients."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import zlib
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import grpo_runtime.loss as loss_module
from grpo_runtime import kernels
from grpo_runtime.loss import LossConfig, grpo_loss, token_logprobs

B, T, D, V = 3, 7, 16, 50
ROOT = Path(__file__).resolve().parents[2]

# This file also runs as a child of test_triton_path_*, with TRITON_INTERPRET=1: every check
# below then goes through the Triton kernels (the GPU fast path) on CPU.
TRITON_CHILD = os.environ.get("GRPO_TEST_TRITON_CHILD") == "1"
if TRITON_CHILD:
    loss_module._TRITON = True


# --------------------------------------------------------------------------- the reference, from the formulas


def naive_grpo(hidden, weight, targets, mask, adv, old, ref, cfg: LossConfig, bias=None, num_items=None):
    """(loss, metrics, magnitude): magnitude is the loss of |per-token loss|, the size of the terms
    the loss sums (terms of both signs: the rounding error scales with them, not with the sum)."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    logp = torch.log_softmax(logits.float() / cfg.temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = logp.detach() if old is None else old
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    coef1 = torch.exp(logp - old)
    coef2 = torch.clamp(coef1, 1 - cfg.epsilon, 1 + eps_high)
    a = adv[:, None]
    ptl = -torch.min(coef1 * a, coef2 * a)
    kl = torch.exp(ref - logp) - (ref - logp) - 1 if cfg.beta else torch.zeros_like(logp)
    ptl = ptl + cfg.beta * kl

    def normalise(ptl):
        if cfg.loss_type == "grpo":
            return ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        if cfg.loss_type == "bnpo":
            return (ptl * mask).sum() / mask.sum().clamp(min=1)
        if cfg.loss_type == "dr_grpo":
            return (ptl * mask).sum() / (mask.shape[0] * (cfg.max_completion_length or mask.shape[1]))
        return (ptl * mask).sum() / (mask.sum() if num_items is None else torch.tensor(float(num_items)))

    n = mask.sum().clamp(min=1)
    low = (coef1 < 1 - cfg.epsilon) & (a < 0)
    high = (coef1 > 1 + eps_high) & (a > 0)
    metrics = {
        "kl": (kl * mask).sum() / n,
        "clip_ratio": ((low | high) * mask).sum() / n,
        "clip_ratio_low": (low * mask).sum() / n,
        "clip_ratio_high": (high * mask).sum() / n,
    }
    return normalise(ptl), {k: v.detach() for k, v in metrics.items()}, normalise(ptl.detach().abs())


def make_inputs(seed=0, dtype=torch.float32, off_policy=True):
    """Random inputs with padding (a shorter row and one fully masked row) and old log-probs
    spread so that both clips are active on some tokens."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2] = 0
    adv = torch.tensor([1.3, -0.7, 0.4])
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = logp + 0.4 * torch.randn(B, T, generator=g) if off_policy else None
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    return {
        "hidden": hidden.to(dtype), "weight": weight.to(dtype), "bias": bias.to(dtype), "targets": targets,
        "mask": mask, "adv": adv, "old": old, "ref": ref,
    }


Result = namedtuple("Result", "loss magnitude metrics hidden weight bias")


def run(fn, x, cfg, *, with_bias=False, weight_grad=True, scale=1.0, **kw):
    """loss (and, for the reference, the size of its terms), metrics, and the grads of hidden /
    weight / bias after backward of scale * loss."""
    h = x["hidden"].clone().requires_grad_()
    w = x["weight"].clone().requires_grad_(weight_grad)
    b = x["bias"].clone().requires_grad_() if with_bias else None
    magnitude = None
    if fn is naive_grpo:
        loss, metrics, magnitude = naive_grpo(h, w, x["targets"], x["mask"], x["adv"], x["old"], x["ref"], cfg,
                                              bias=b, **kw)
    else:
        loss, metrics = grpo_loss(
            h, w, x["targets"], x["mask"], x["adv"], old_logps=x["old"], ref_logps=x["ref"], config=cfg, bias=b,
            num_items_in_batch=kw.get("num_items"),
        )
    (scale * loss).backward()
    bias_grad = None if b is None else b.grad
    return Result(loss.detach(), magnitude, metrics, h.grad, w.grad, bias_grad)


def assert_rel(actual, expected, tol=1e-5, scale=None):
    """|actual - expected| <= tol x max|expected| (elementwise relative error is meaningless near 0),
    or tol x scale (a loss: the size of the terms it sums)."""
    assert actual.shape == expected.shape
    scale = (expected if scale is None else scale).abs().max().clamp(min=1e-12)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x {scale:.3g}"


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "loss_type,beta,off_policy,epsilon_high,chunk_size",
    [
        (lt, beta, off, eh, cs)
        for lt, beta, off, eh in itertools.product(
            ("grpo", "bnpo", "dr_grpo", "dapo"), (0.0, 0.04), (False, True), (None, 0.28)
        )
        for cs in ((3,) if eh is None else (1024,))  # several chunks, or one chunk larger than B*T
    ],
)
def test_loss_and_grads_equal_full_logits(loss_type, beta, off_policy, epsilon_high, chunk_size):
    x = make_inputs(seed=zlib.crc32(repr((loss_type, beta, off_policy, epsilon_high)).encode()), off_policy=off_policy)
    cfg = LossConfig(loss_type=loss_type, beta=beta, epsilon_high=epsilon_high, chunk_size=chunk_size,
                     max_completion_length=10)
    ours, naive = run(grpo_loss, x, cfg), run(naive_grpo, x, cfg)
    assert_rel(ours.loss, naive.loss, scale=naive.magnitude)
    assert_rel(ours.hidden, naive.hidden)
    assert_rel(ours.weight, naive.weight)
    padding = x["mask"] == 0
    assert ours.hidden[padding].abs().max() == 0  # padding gets no gradient


def test_metrics_equal_full_logits_and_clips_are_exercised():
    x = make_inputs(seed=5)
    cfg = LossConfig(loss_type="bnpo", beta=0.04, epsilon=0.2, epsilon_high=0.28, chunk_size=4)
    ours, naive = run(grpo_loss, x, cfg).metrics, run(naive_grpo, x, cfg).metrics
    assert ours.keys() == naive.keys()
    for k in ours:
        assert not ours[k].requires_grad
        assert_rel(ours[k], naive[k])
    assert ours["clip_ratio_low"] > 0 and ours["clip_ratio_high"] > 0
    assert ours["clip_ratio"] == ours["clip_ratio_low"] + ours["clip_ratio_high"]


def test_metrics_on_policy_without_kl_are_zero():
    metrics = run(grpo_loss, make_inputs(off_policy=False), LossConfig(beta=0.0)).metrics
    assert all(v == 0 for v in metrics.values())


def test_beta_zero_needs_no_reference():
    x = make_inputs() | {"ref": None}
    ours, naive = run(grpo_loss, x, LossConfig(beta=0.0)), run(naive_grpo, x, LossConfig(beta=0.0))
    assert_rel(ours.loss, naive.loss, scale=naive.magnitude)
    assert_rel(ours.hidden, naive.hidden)
    with pytest.raises(ValueError, match="ref_logps"):
        run(grpo_loss, x, LossConfig(beta=0.1))


def test_temperature_and_bias():
    x = make_inputs(seed=7)
    cfg = LossConfig(loss_type="grpo", beta=0.04, temperature=0.7, chunk_size=4, epsilon_high=0.28)
    ours, naive = run(grpo_loss, x, cfg, with_bias=True), run(naive_grpo, x, cfg, with_bias=True)
    assert_rel(ours.loss, naive.loss, scale=naive.magnitude)
    assert_rel(ours.hidden, naive.hidden)
    assert_rel(ours.weight, naive.weight)
    assert_rel(ours.bias, naive.bias)


def test_per_token_advantages_broadcast_like_per_sequence_ones():
    x = make_inputs(seed=41)
    cfg = LossConfig(loss_type="grpo", beta=0.04, chunk_size=4)
    per_seq, per_token = run(grpo_loss, x, cfg), run(grpo_loss, x | {"adv": x["adv"][:, None].expand(B, T)}, cfg)
    assert torch.equal(per_seq.loss, per_token.loss) and torch.equal(per_seq.hidden, per_token.hidden)


def test_frozen_weight_has_no_grad_and_hidden_grad_is_unchanged():
    x = make_inputs(seed=3)
    cfg = LossConfig(beta=0.04, chunk_size=5)
    frozen, naive = run(grpo_loss, x, cfg, weight_grad=False), run(naive_grpo, x, cfg)
    assert frozen.weight is None
    assert_rel(frozen.hidden, naive.hidden)


def test_no_grad_does_no_gradient_work(monkeypatch):
    x = make_inputs(seed=37)
    cfg = LossConfig(beta=0.04, chunk_size=4)
    want, naive = run(grpo_loss, x, cfg), run(naive_grpo, x, cfg)
    logp_, _, dtype = loss_module._chunk_ops(x["weight"])

    def no_dlogits(*args):
        raise AssertionError("gradient work under no_grad")

    monkeypatch.setattr(loss_module, "_chunk_ops", lambda weight: (logp_, no_dlogits, dtype))
    h, w = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    with torch.no_grad():
        loss, metrics = grpo_loss(h, w, x["targets"], x["mask"], x["adv"], old_logps=x["old"], ref_logps=x["ref"],
                                  config=cfg)
    assert not loss.requires_grad
    assert_rel(loss, want.loss, scale=naive.magnitude)
    assert_rel(metrics["kl"], want.metrics["kl"])


def test_dapo_normalises_by_the_steps_tokens_so_accumulation_equals_one_batch():
    """Two accumulation micro-batches with num_items_in_batch = the step's tokens sum to the
    loss (and gradients) of the whole batch in one piece."""
    x = make_inputs(seed=11)
    cfg = LossConfig(loss_type="dapo", beta=0.04, chunk_size=4)
    whole, naive = run(grpo_loss, x, cfg), run(naive_grpo, x, cfg)
    n = x["mask"].sum()
    first, second = (
        run(grpo_loss, {k: v if k in ("weight", "bias") else v[rows] for k, v in x.items()}, cfg, num_items=n)
        for rows in (slice(0, 2), slice(2, 3))
    )
    assert_rel(first.loss + second.loss, whole.loss, scale=naive.magnitude)
    assert_rel(torch.cat([first.hidden, second.hidden]), whole.hidden)
    assert_rel(first.weight + second.weight, whole.weight)
    assert_rel(run(grpo_loss, x, cfg, num_items=3 * n).loss, whole.loss / 3, scale=naive.magnitude / 3)


def test_upstream_gradient_scales_the_gradients():
    x = make_inputs(seed=13)
    cfg = LossConfig(loss_type="bnpo", chunk_size=4)
    once, half = run(grpo_loss, x, cfg), run(grpo_loss, x, cfg, scale=0.5)
    assert_rel(half.hidden, once.hidden * 0.5)
    assert_rel(half.weight, once.weight * 0.5)


def test_padding_may_hold_anything():
    """Padded positions are never read: NaN hidden states or log-probs there change nothing."""
    x = make_inputs(seed=17)
    cfg = LossConfig(loss_type="grpo", beta=0.04, chunk_size=2)
    clean = run(grpo_loss, x, cfg)
    pad = x["mask"] == 0
    dirty = dict(x, hidden=x["hidden"].masked_fill(pad[..., None], float("nan")),
                 old=x["old"].masked_fill(pad, float("nan")), ref=x["ref"].masked_fill(pad, float("inf")))
    got = run(grpo_loss, dirty, cfg)
    assert torch.equal(got.loss, clean.loss)
    assert torch.equal(got.hidden, clean.hidden) and torch.equal(got.weight, clean.weight)


def test_all_padding_gives_zero_loss_and_zero_grads():
    x = make_inputs(seed=19) | {"mask": torch.zeros(B, T)}
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        got = run(grpo_loss, x, LossConfig(loss_type=loss_type, beta=0.04))
        assert got.loss == 0 and got.hidden.abs().max() == 0 and got.weight.abs().max() == 0
        assert all(v == 0 for v in got.metrics.values())


def test_bf16_is_close_to_fp32():
    x32 = make_inputs(seed=23)
    x16 = make_inputs(seed=23, dtype=torch.bfloat16)
    cfg = LossConfig(loss_type="dapo", beta=0.04, chunk_size=4, epsilon_high=0.28)
    fp32, bf16 = run(grpo_loss, x32, cfg), run(grpo_loss, x16, cfg)
    assert bf16.hidden.dtype == torch.bfloat16 and bf16.weight.dtype == torch.bfloat16
    assert_rel(bf16.loss, fp32.loss, tol=2e-2, scale=run(naive_grpo, x32, cfg).magnitude)
    assert_rel(bf16.hidden, fp32.hidden, tol=3e-2)
    assert_rel(bf16.weight, fp32.weight, tol=3e-2)


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_token_logprobs_equals_log_softmax_gather(chunk_size):
    x = make_inputs(seed=29)
    got = token_logprobs(x["hidden"], x["weight"], x["targets"], temperature=0.8, chunk_size=chunk_size, bias=x["bias"])
    logits = (x["hidden"] @ x["weight"].T + x["bias"]) / 0.8
    want = torch.log_softmax(logits, -1).gather(-1, x["targets"][..., None]).squeeze(-1)
    assert got.shape == (B, T) and got.dtype == torch.float32 and not got.requires_grad
    assert_rel(got, want)


def test_config_rejects_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        LossConfig(loss_type="ppo")


# --------------------------------------------------------------------------- the Triton fast path


def test_chunk_ops_are_triton_on_gpu_or_when_forced_else_torch():
    ops = loss_module._chunk_ops(torch.empty(V, D))
    if TRITON_CHILD:
        from grpo_runtime.kernels import logsoftmax

        assert ops == (logsoftmax.logp_, logsoftmax.dlogits_, torch.float32)
        assert loss_module._chunk_ops(torch.empty(V, D, dtype=torch.bfloat16))[2] == torch.bfloat16  # in place, no copy
    else:
        assert ops == (loss_module._logp_, loss_module._dlogits_, torch.float32)


@pytest.mark.skipif(not TRITON_CHILD, reason="runs in the TRITON_INTERPRET=1 child")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_equal_torch_over_several_vocab_blocks(dtype):
    from grpo_runtime.kernels import logsoftmax

    n, vocab = 4, 2 * logsoftmax.BLOCK + 123  # three blocks, the last one partial
    g = torch.Generator().manual_seed(31)
    z = (torch.randn(n, vocab, generator=g) * 3 + torch.linspace(0, 4, vocab)).to(dtype)  # the max moves on
    targets = torch.tensor([0, vocab - 1, 5000, 17])
    dlogp = torch.randn(n, generator=g)
    logits = z.float() / 0.7
    want_logp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(targets, vocab).float()
    want_dz = dlogp[:, None] * (onehot - torch.softmax(logits, -1)) / 0.7
    logp, lse = logsoftmax.logp_(z, targets, 1 / 0.7)
    assert_rel(logp, want_logp, tol=1e-6)
    assert_rel(lse, torch.logsumexp(logits, -1), tol=1e-6)
    dz = logsoftmax.dlogits_(z, targets, lse, dlogp, 1 / 0.7)
    assert dz.data_ptr() == z.data_ptr() and dz.dtype == dtype
    assert_rel(dz.float(), want_dz, tol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(TRITON_CHILD or not kernels.available(), reason="needs triton; the child is this test")
def test_triton_path_passes_this_file_under_the_interpreter():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not benchmark"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=dict(os.environ, TRITON_INTERPRET="1", GRPO_TEST_TRITON_CHILD="1"),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


# --------------------------------------------------------------------------- the benchmark runs


def test_benchmark_smoke_run_agrees_and_ends_with_the_ratio_line():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loss_memory.py"), "--shape", "tiny"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT / "runtime")),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    loss = {line.split()[1]: float(line.split()[-1]) for line in lines if line.split()[0] == "64"}
    assert loss.keys() == {"naive", "ours", "liger"}
    assert loss["ours"] == pytest.approx(loss["naive"], abs=2e-6), lines
    assert loss["liger"] == pytest.approx(loss["naive"], abs=2e-6), lines
    assert lines[-1].startswith("T=64 memory naive/ours = ") and " time ours/naive = " in lines[-1]
