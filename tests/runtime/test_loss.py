"""The fused GRPO loss equals the plain full-logits loss (TRL's formulas), value and gradients."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import zlib
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import grpo_runtime.fused_linear as fused_linear
from grpo_runtime import kernels
from grpo_runtime.loss import LossConfig, grpo_loss, token_logprobs

B, T, D, V = 3, 7, 16, 50
ROOT = Path(__file__).resolve().parents[2]

# This file also runs as a child of test_triton_path_*, with TRITON_INTERPRET=1: every check
# below then goes through the Triton kernels (the GPU fast path) on CPU.
TRITON_CHILD = os.environ.get("GRPO_TEST_TRITON_CHILD") == "1"
if TRITON_CHILD:
    fused_linear._TRITON = True


# --------------------------------------------------------------------------- the reference, from the formulas


def naive_grpo(hidden, weight, targets, mask, adv, old, ref, cfg: LossConfig, bias=None, num_items=None,
               sampling=None, num_sequences=None, micro_batches=1, entropy_coef=0.0):
    """(loss, metrics, magnitude), TRL's formulas on full logits: magnitude is the loss of |per-token loss|,
    the size of the terms the loss sums (terms of both signs: the rounding error scales with them, not with
    the sum). With num_items / num_sequences / micro_batches: this micro-batch's share of the step's.
    entropy_coef: TRL's entropy bonus, the mean entropy of the step's tokens (of the kept ones of this
    micro-batch with the top-entropy quantile, as TRL)."""
    logits = (hidden @ weight.T + (0 if bias is None else bias)).float() / cfg.temperature
    logps = torch.log_softmax(logits, -1)
    logp = logps.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logps.exp() * logps).sum(-1)
    old = logp.detach() if old is None else old
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    log_ratio = logp - old
    if cfg.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1))[:, None]
    coef1 = torch.exp(log_ratio)
    a = adv[:, None] if adv.dim() == 1 else adv
    kl = torch.exp(ref - logp) - (ref - logp) - 1 if cfg.beta else torch.zeros_like(logp)
    if cfg.kl_estimator == "k3_ratio":
        kl = kl * coef1
    weight_is = None
    if sampling is not None:
        diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
        if cfg.sampling_correction.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        weight_is = torch.exp(diff)
        low = cfg.sampling_correction_min if cfg.sampling_correction_min is not None else -float("inf")
        high = cfg.sampling_correction_max if cfg.sampling_correction_max is not None else float("inf")
        if cfg.sampling_correction.endswith("truncate"):
            weight_is = weight_is.clamp(min=cfg.sampling_correction_min, max=cfg.sampling_correction_max)
        else:
            weight_is = weight_is.masked_fill((weight_is < low) | (weight_is > high), 0.0)
    if cfg.loss_type == "cispo":
        ptl = -torch.clamp(coef1, max=eps_high).detach() * a * logp
        capped = coef1
    elif cfg.loss_type == "vespo":  # TRL's get_gamma_weights
        floor = math.log(1e-8)
        log_w = ((logp.detach() - old).clamp(-20, 20) * mask).sum(-1, keepdim=True)
        if weight_is is not None:
            log_w = log_w + torch.log(weight_is).clamp(floor, 20).sum(-1, keepdim=True)
        log_w = log_w.clamp(floor, 20)
        k = torch.where(a >= 0, cfg.vespo_k_pos, cfg.vespo_k_neg)
        lam = torch.where(a >= 0, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg)
        phi = torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        ptl = -phi * a * logp
        capped = coef1
    elif cfg.loss_type == "sapo":
        tau = torch.where(a > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        ptl = -torch.sigmoid(tau * (coef1 - 1)) * 4 / tau * a
        capped = coef1
    else:
        coef2 = torch.clamp(coef1, 1 - cfg.epsilon, 1 + eps_high)
        capped = coef1 if cfg.delta is None else torch.clamp(coef1, max=cfg.delta)
        ptl = -torch.min(capped * a, coef2 * a)
    if cfg.off_policy_mask_threshold is not None:
        behaviour = sampling if sampling is not None else old
        seq_kl = (torch.nan_to_num(behaviour - logp.detach()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
        ptl = ptl * ((a >= 0) | (seq_kl <= cfg.off_policy_mask_threshold))
    keep = torch.ones_like(entropy)
    if cfg.top_entropy_quantile < 1:
        keep = (entropy >= torch.quantile(entropy[mask.bool()], 1 - cfg.top_entropy_quantile)).float()
        ptl = ptl * keep
    if weight_is is not None and cfg.loss_type != "vespo":  # vespo has it inside phi
        ptl = ptl * weight_is
    ptl = ptl + cfg.beta * kl
    rows = mask.shape[0] if num_sequences is None else num_sequences
    tokens = mask.sum() if num_items is None else torch.tensor(float(num_items))

    def normalise(ptl):
        if cfg.loss_type in ("grpo", "sapo"):
            return ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / rows
        if cfg.loss_type == "luspo":
            return (ptl * mask).sum() / rows
        if cfg.loss_type == "bnpo":
            return (ptl * mask).sum() / mask.sum().clamp(min=1) / micro_batches
        if cfg.loss_type == "dr_grpo":
            return (ptl * mask).sum() / (rows * (cfg.max_completion_length or mask.shape[1]))
        return (ptl * mask).sum() / tokens.clamp(min=1)

    n = tokens.clamp(min=1)
    if cfg.loss_type == "cispo":
        high, low = (coef1 > eps_high) & (a > 0), torch.zeros_like(coef1 > 0)
    elif cfg.loss_type in ("sapo", "vespo"):
        high = low = torch.zeros_like(coef1 > 0)
    else:
        low, high = (capped < 1 - cfg.epsilon) & (a < 0), (capped > 1 + eps_high) & (a > 0)

    def share(flags):
        if cfg.importance_sampling_level == "sequence":
            return ((flags.expand_as(mask) * mask).sum(-1) > 0).sum() / rows
        return (flags * mask).sum() / n

    kept = mask * keep
    if cfg.top_entropy_quantile < 1:
        bonus = (entropy * kept).sum() / kept.sum().clamp(min=1) / micro_batches
    else:
        bonus = (entropy * mask).sum() / n
    metrics = {
        "kl": (kl * mask).sum() / n,
        "entropy": (entropy * mask).sum() / n,
        "clip_ratio": share(low | high),
        "clip_ratio_low": share(low),
        "clip_ratio_high": share(high),
    }
    if weight_is is not None:
        metrics["sampling_weight"] = (weight_is.expand_as(mask) * mask).sum() / n
    if cfg.top_entropy_quantile < 1:
        metrics |= {"entropy_kept": (entropy * kept).sum() / n, "kept_tokens": kept.sum() / n}
    if entropy_coef:
        metrics["policy_loss"] = normalise(ptl)
    loss = normalise(ptl) - entropy_coef * bonus
    magnitude = normalise(ptl.detach().abs()) + abs(entropy_coef) * bonus.detach()
    return loss, {k: v.detach() for k, v in metrics.items()}, magnitude


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
    sampling = logp + 0.3 * torch.randn(B, T, generator=g)
    sampling[1, 2] = float("nan")  # a token the sampler gave no log-prob for
    return {
        "hidden": hidden.to(dtype), "weight": weight.to(dtype), "bias": bias.to(dtype), "targets": targets,
        "mask": mask, "adv": adv, "old": old, "ref": ref, "sampling": sampling,
    }


Result = namedtuple("Result", "loss magnitude metrics hidden weight bias")


def run(fn, x, cfg, *, with_bias=False, weight_grad=True, scale=1.0, correction=False, **kw):
    """loss (and, for the reference, the size of its terms), metrics, and the grads of hidden /
    weight / bias after backward of scale * loss."""
    h = x["hidden"].clone().requires_grad_()
    w = x["weight"].clone().requires_grad_(weight_grad)
    b = x["bias"].clone().requires_grad_() if with_bias else None
    magnitude = None
    sampling = x["sampling"] if correction else None
    if fn is naive_grpo:
        loss, metrics, magnitude = naive_grpo(h, w, x["targets"], x["mask"], x["adv"], x["old"], x["ref"], cfg,
                                              bias=b, sampling=sampling, **kw)
    else:
        loss, metrics = grpo_loss(
            h, w, x["targets"], x["mask"], x["adv"], old_logps=x["old"], ref_logps=x["ref"], config=cfg, bias=b,
            num_items_in_batch=kw.get("num_items"), sampling_logps=sampling,
            num_sequences_in_batch=kw.get("num_sequences"), num_micro_batches=kw.get("micro_batches", 1),
            entropy_coef=kw.get("entropy_coef", 0.0),
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


VARIANTS = {  # name: (LossConfig fields, sampling correction on)
    "k3": ({"loss_type": "dapo", "kl_estimator": "k3"}, False),
    "cispo": ({"loss_type": "cispo", "epsilon_high": 1.3}, False),
    "cispo-gspo": ({"loss_type": "cispo", "epsilon_high": 1.1, "importance_sampling_level": "sequence"}, False),
    "gspo": ({"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 0.05}, False),
    "gspo-k3-dr_grpo": ({"loss_type": "dr_grpo", "importance_sampling_level": "sequence", "kl_estimator": "k3"},
                        False),
    "delta": ({"loss_type": "bnpo", "delta": 1.3}, False),
    "entropy-mask": ({"loss_type": "grpo", "top_entropy_quantile": 0.3}, False),
    "token-truncate": ({"loss_type": "dapo", "sampling_correction_max": 1.2}, True),
    "token-mask": ({"loss_type": "grpo", "sampling_correction": "token_mask", "sampling_correction_max": 1.3,
                    "sampling_correction_min": 0.8}, True),
    "sequence-truncate": ({"loss_type": "dr_grpo", "sampling_correction": "sequence_truncate",
                           "sampling_correction_min": 0.5, "sampling_correction_max": 1.5}, True),
    "sequence-mask": ({"loss_type": "dapo", "sampling_correction": "sequence_mask",
                       "sampling_correction_max": 1.5}, True),
    "sapo": ({"loss_type": "sapo", "sapo_temperature_pos": 0.8, "sapo_temperature_neg": 1.4}, False),
    "sapo-gspo-truncate": ({"loss_type": "sapo", "importance_sampling_level": "sequence", "epsilon": 0.05,
                            "sampling_correction_max": 1.2}, True),
    "luspo-gspo": ({"loss_type": "luspo", "importance_sampling_level": "sequence", "epsilon": 0.05}, False),
    "luspo-token-delta": ({"loss_type": "luspo", "delta": 1.3}, False),
    "opsm": ({"loss_type": "dapo", "off_policy_mask_threshold": 0.05}, False),
    "opsm-token-truncate": ({"loss_type": "grpo", "off_policy_mask_threshold": 0.0, "sampling_correction_max": 1.5},
                            True),
    "vespo": ({"loss_type": "vespo"}, False),
    "vespo-token-truncate": ({"loss_type": "vespo", "vespo_k_neg": 2.5, "sampling_correction_max": 1.3}, True),
    "vespo-sequence-truncate": ({"loss_type": "vespo", "sampling_correction": "sequence_truncate",
                                 "sampling_correction_max": 1.5, "sampling_correction_min": 0.5}, True),
    "all": ({"loss_type": "grpo", "importance_sampling_level": "sequence", "delta": 1.1, "epsilon": 0.05,
             "top_entropy_quantile": 0.5, "sampling_correction": "sequence_truncate", "temperature": 0.7}, True),
}


@pytest.mark.parametrize("off_policy", [True, False])
@pytest.mark.parametrize("chunk_size", [3, 1024])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_equal_full_logits(variant, chunk_size, off_policy):
    fields, correction = VARIANTS[variant]
    x = make_inputs(seed=zlib.crc32(variant.encode()), off_policy=off_policy)
    cfg = LossConfig(beta=0.04, chunk_size=chunk_size, max_completion_length=10, **fields)
    ours, naive = run(grpo_loss, x, cfg, correction=correction), run(naive_grpo, x, cfg, correction=correction)
    assert_rel(ours.loss, naive.loss, scale=naive.magnitude)
    assert_rel(ours.hidden, naive.hidden)
    assert_rel(ours.weight, naive.weight)
    assert ours.metrics.keys() == naive.metrics.keys()
    for key in ours.metrics:
        assert_rel(ours.metrics[key], naive.metrics[key])


SPLITS = [(slice(0, 3),), (slice(0, 2), slice(2, 3)), (slice(0, 1), slice(1, 3)),
          (slice(0, 1), slice(1, 2), slice(2, 3))]


@pytest.mark.parametrize(
    "fields,correction",
    [({"loss_type": lt}, False) for lt in ("grpo", "dr_grpo", "dapo", "cispo")]
    + [({"loss_type": "dapo", "delta": 1.3}, False)]
    + [VARIANTS[name] for name in ("gspo", "cispo-gspo", "token-truncate", "sequence-mask", "k3")]
    + [VARIANTS[name] for name in ("sapo", "luspo-gspo", "luspo-token-delta", "vespo-token-truncate")]
    + [({"loss_type": "dapo", "entropy_coef": 0.1}, False), ({"loss_type": "grpo", "importance_sampling_level":
                                                              "sequence", "epsilon": 0.05, "entropy_coef": 0.1}, False)]
    + [({"loss_type": "bnpo"}, False), VARIANTS["entropy-mask"]],
    ids=["grpo", "dr_grpo", "dapo", "cispo", "delta", "gspo", "cispo-gspo", "token-truncate", "sequence-mask", "k3",
         "sapo", "luspo-gspo", "luspo-token", "vespo-token-truncate", "entropy-bonus", "entropy-bonus-gspo", "bnpo",
         "entropy-mask"],
)
def test_a_step_has_the_same_loss_and_gradients_however_it_is_split(fields, correction):
    """Micro-batches given the step's totals sum to the unsplit step: even, uneven, one row each.
    bnpo and topEntropyQuantile are defined per micro-batch (TRL's), so only the one-piece split must
    agree for them: they are checked on the other splits to change, as the spec says they do."""
    x = make_inputs(seed=43)
    x["mask"][1, 5:] = 0
    x["mask"][2, :6] = 1  # three different lengths
    cfg = LossConfig(beta=0.04, chunk_size=4, max_completion_length=10, epsilon_high=fields.get("epsilon_high"),
                     **{k: v for k, v in fields.items() if k not in ("epsilon_high", "entropy_coef")})
    step = {"num_items": x["mask"].sum(), "num_sequences": B, "entropy_coef": fields.get("entropy_coef", 0.0)}
    results = []
    for split in SPLITS:
        parts = [run(grpo_loss, {k: v if k in ("weight", "bias") or v is None else v[rows] for k, v in x.items()},
                     cfg, correction=correction, micro_batches=len(split), **step) for rows in split]
        results.append((sum(p.loss for p in parts), torch.cat([p.hidden for p in parts]), sum(p.weight for p in parts),
                        {k: sum(p.metrics[k] for p in parts) for k in parts[0].metrics}))
    naive = run(naive_grpo, x, cfg, correction=correction, entropy_coef=step["entropy_coef"])
    whole = results[0]
    assert_rel(whole[0], naive.loss, scale=naive.magnitude)
    assert_rel(whole[2], naive.weight)
    if cfg.loss_type == "bnpo" or cfg.top_entropy_quantile < 1:
        assert any((weight - whole[2]).abs().max() > 1e-3 * whole[2].abs().max() for _, _, weight, _ in results[1:])
        return
    for loss, hidden, weight, metrics in results[1:]:
        assert_rel(loss, whole[0], scale=naive.magnitude)
        assert_rel(hidden, whole[1])
        assert_rel(weight, whole[2])
        for key in metrics:
            assert_rel(metrics[key], whole[3][key])


BONUS_VARIANTS = {
    # name: LossConfig fields, sampling correction, entropy_coef
    "dapo": ({"loss_type": "dapo"}, False, 0.1),
    "grpo-temperature": ({"loss_type": "grpo", "temperature": 0.7}, False, 0.2),
    "penalty-truncate": ({"loss_type": "dr_grpo", "sampling_correction_max": 1.2}, True, -0.05),
    "gspo": ({"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 0.05}, False, 0.1),
    "entropy-mask": ({"loss_type": "dapo", "top_entropy_quantile": 0.4}, False, 0.1),
}


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("chunk_size", [3, 1024])
@pytest.mark.parametrize("variant", list(BONUS_VARIANTS))
def test_entropy_bonus_equals_full_logits(variant, chunk_size, weight_grad):
    """TRL's entropy_coef: the entropy's own gradient in each chunk (torch path; the Triton kernel in the
    TRITON_INTERPRET child), token by token and with the tokens coupled (whole), lm_head trainable or frozen."""
    fields, correction, coef = BONUS_VARIANTS[variant]
    x = make_inputs(seed=zlib.crc32(variant.encode()))
    cfg = LossConfig(beta=0.04, chunk_size=chunk_size, **fields)
    ours = run(grpo_loss, x, cfg, correction=correction, weight_grad=weight_grad, entropy_coef=coef)
    naive = run(naive_grpo, x, cfg, correction=correction, weight_grad=weight_grad, entropy_coef=coef)
    without = run(naive_grpo, x, cfg, correction=correction, weight_grad=weight_grad)
    assert_rel(ours.loss, naive.loss, scale=naive.magnitude)
    assert_rel(ours.hidden, naive.hidden)
    if weight_grad:
        assert_rel(ours.weight, naive.weight)
    assert (naive.hidden - without.hidden).abs().max() > 1e-2 * naive.hidden.abs().max()  # the bonus moves them
    assert ours.metrics.keys() == naive.metrics.keys() and "policy_loss" in ours.metrics
    for key in ours.metrics:
        assert_rel(ours.metrics[key], naive.metrics[key], scale=naive.magnitude if key == "policy_loss" else None)


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


def test_metrics_on_policy_without_kl_are_zero_but_the_entropy():
    metrics = run(grpo_loss, make_inputs(off_policy=False), LossConfig(beta=0.0)).metrics
    assert all(v == 0 for k, v in metrics.items() if k != "entropy")
    assert 0 < metrics["entropy"] < torch.log(torch.tensor(float(V)))


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


@pytest.mark.parametrize("variant", ["dapo", "gspo", "all"])
def test_frozen_weight_has_no_grad_and_hidden_grad_is_unchanged(variant):
    """A frozen lm_head (LoRA) takes one pass even when tokens are coupled: grad_h rows scaled afterwards."""
    x = make_inputs(seed=3)
    fields, correction = VARIANTS.get(variant, ({"loss_type": variant}, False))
    cfg = LossConfig(beta=0.04, chunk_size=5, **fields)
    frozen, naive = run(grpo_loss, x, cfg, weight_grad=False, correction=correction), run(naive_grpo, x, cfg,
                                                                                          correction=correction)
    assert frozen.weight is None
    assert_rel(frozen.loss, naive.loss, scale=naive.magnitude)
    assert_rel(frozen.hidden, naive.hidden)


@pytest.mark.parametrize("variant", ["dapo", "all"])
def test_no_grad_does_no_gradient_work(monkeypatch, variant):
    x = make_inputs(seed=37)
    fields, correction = VARIANTS.get(variant, ({"loss_type": variant}, False))
    cfg = LossConfig(beta=0.04, chunk_size=4, **fields)
    want, naive = run(grpo_loss, x, cfg, correction=correction), run(naive_grpo, x, cfg, correction=correction)
    logp_, _, dtype = fused_linear._chunk_ops(x["weight"])

    def no_dlogits(*args):
        raise AssertionError("gradient work under no_grad")

    monkeypatch.setattr(fused_linear, "_chunk_ops", lambda weight, fp32_logits=False: (logp_, no_dlogits, dtype))
    h, w = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    with torch.no_grad():
        loss, metrics = grpo_loss(h, w, x["targets"], x["mask"], x["adv"], old_logps=x["old"], ref_logps=x["ref"],
                                  sampling_logps=x["sampling"] if correction else None, config=cfg)
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


@pytest.mark.parametrize("variant", ["grpo", "all"])
def test_padding_may_hold_anything(variant):
    """Padded positions are never read: NaN hidden states or log-probs there change nothing."""
    x = make_inputs(seed=17)
    fields, correction = VARIANTS.get(variant, ({"loss_type": variant}, False))
    cfg = LossConfig(beta=0.04, chunk_size=2, **fields)
    clean = run(grpo_loss, x, cfg, correction=correction)
    pad = x["mask"] == 0
    dirty = dict(x, hidden=x["hidden"].masked_fill(pad[..., None], float("nan")),
                 old=x["old"].masked_fill(pad, float("nan")), ref=x["ref"].masked_fill(pad, float("inf")),
                 sampling=x["sampling"].masked_fill(pad, float("-inf")))
    got = run(grpo_loss, dirty, cfg, correction=correction)
    assert torch.equal(got.loss, clean.loss)
    assert torch.equal(got.hidden, clean.hidden) and torch.equal(got.weight, clean.weight)


@pytest.mark.parametrize("variant", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", *VARIANTS])
def test_all_padding_gives_zero_loss_and_zero_grads(variant):
    x = make_inputs(seed=19) | {"mask": torch.zeros(B, T)}
    fields, correction = VARIANTS.get(variant, ({"loss_type": variant}, False))
    got = run(grpo_loss, x, LossConfig(beta=0.04, **fields), correction=correction)
    assert got.loss == 0 and got.hidden.abs().max() == 0 and got.weight.abs().max() == 0
    assert all(v == 0 for v in got.metrics.values())


@pytest.mark.parametrize("variant,weight_grad", [("dapo", True), ("all", True), ("all", False)])
def test_bf16_is_close_to_fp32(variant, weight_grad):
    x32 = make_inputs(seed=23)
    x16 = make_inputs(seed=23, dtype=torch.bfloat16)
    fields, correction = VARIANTS.get(variant, ({"loss_type": variant, "epsilon_high": 0.28}, False))
    cfg = LossConfig(beta=0.04, chunk_size=4, **fields)
    fp32 = run(grpo_loss, x32, cfg, correction=correction, weight_grad=weight_grad)
    bf16 = run(grpo_loss, x16, cfg, correction=correction, weight_grad=weight_grad)
    assert bf16.hidden.dtype == torch.bfloat16
    assert_rel(bf16.loss, fp32.loss, tol=2e-2, scale=run(naive_grpo, x32, cfg, correction=correction).magnitude)
    assert_rel(bf16.hidden, fp32.hidden, tol=3e-2)
    if weight_grad:
        assert bf16.weight.dtype == torch.bfloat16
        assert_rel(bf16.weight, fp32.weight, tol=3e-2)


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_token_logprobs_equals_log_softmax_gather(chunk_size):
    x = make_inputs(seed=29)
    got = token_logprobs(x["hidden"], x["weight"], x["targets"], temperature=0.8, chunk_size=chunk_size, bias=x["bias"])
    logits = (x["hidden"] @ x["weight"].T + x["bias"]) / 0.8
    want = torch.log_softmax(logits, -1).gather(-1, x["targets"][..., None]).squeeze(-1)
    assert got.shape == (B, T) and got.dtype == torch.float32 and not got.requires_grad
    assert_rel(got, want)


def _upcast(x: dict) -> dict:
    """The same values in float32: what a float32 head (TRL's cast_lm_head_to_fp32) multiplies."""
    return {k: v.float() if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v for k, v in x.items()}


def test_fp32_logits_of_a_bf16_head_are_a_float32_heads_and_bf16_ones_are_not():
    x16 = make_inputs(seed=31, dtype=torch.bfloat16)
    up = _upcast(x16)
    logits = (up["hidden"] @ up["weight"].T + up["bias"]) / 0.8
    want = torch.log_softmax(logits, -1).gather(-1, x16["targets"][..., None]).squeeze(-1)
    kw = dict(temperature=0.8, chunk_size=4, bias=x16["bias"])
    exact = token_logprobs(x16["hidden"], x16["weight"], x16["targets"], fp32_logits=True, **kw)
    rounded = token_logprobs(x16["hidden"], x16["weight"], x16["targets"], **kw)
    err_exact, err_rounded = (exact - want).abs().max(), (rounded - want).abs().max()
    assert err_exact < 1e-4
    assert err_rounded > 10 * err_exact  # bf16 logits keep 8 bits: the option changes what the loss sees


@pytest.mark.parametrize("variant", ["dapo", "all", "gspo"])
def test_fp32_logits_loss_is_the_float32_heads_loss(variant):
    """The loss of a bf16 head with fp32_logits is the loss of its values in float32; the backward's matmuls
    stay bf16, so the hidden state's gradient (bf16 itself) is as close as bf16 allows."""
    x16 = make_inputs(seed=37, dtype=torch.bfloat16)
    fields, correction = VARIANTS.get(variant, ({"loss_type": variant, "epsilon_high": 0.28}, False))
    cfg = LossConfig(beta=0.04, chunk_size=4, fp32_logits=True, **fields)
    ours = run(grpo_loss, x16, cfg, correction=correction, weight_grad=False)
    want = run(naive_grpo, _upcast(x16), cfg, correction=correction, weight_grad=False)
    assert_rel(ours.loss, want.loss, tol=1e-4, scale=want.magnitude)
    assert ours.hidden.dtype == torch.bfloat16
    assert_rel(ours.hidden, want.hidden, tol=3e-2)


@pytest.mark.parametrize("field,value", [("loss_type", "ppo"), ("kl_estimator", "k2"),
                                         ("importance_sampling_level", "group"), ("sampling_correction", "token"),
                                         ("top_entropy_quantile", 1.5)])
def test_config_rejects_unknown_values(field, value):
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})


# --------------------------------------------------------------------------- the Triton fast path


def test_chunk_ops_are_triton_on_gpu_or_when_forced_else_torch():
    ops = fused_linear._chunk_ops(torch.empty(V, D))
    if TRITON_CHILD:
        from grpo_runtime.kernels import logsoftmax

        assert ops == (logsoftmax.logp_, logsoftmax.dlogits_, torch.float32)
        assert fused_linear._chunk_ops(torch.empty(V, D, dtype=torch.bfloat16))[2] == torch.bfloat16  # in place, no copy
    else:
        assert ops == (fused_linear._logp_, fused_linear._dlogits_, torch.float32)


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
    logp, lse, entropy = logsoftmax.logp_(z, targets, 1 / 0.7, entropy=True)
    assert_rel(logp, want_logp, tol=1e-6)
    assert_rel(lse, torch.logsumexp(logits, -1), tol=1e-6)
    want_entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    assert_rel(entropy, want_entropy, tol=1e-5)
    assert logsoftmax.logp_(z.clone(), targets, 1 / 0.7)[2] is None  # not asked, not computed
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


def test_benchmark_with_the_entropy_bonus_agrees_and_leaves_liger_out():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loss_memory.py"), "--shape", "tiny", "--entropy-coef", "0.1"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT / "runtime")),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    loss = {line.split()[1]: float(line.split()[-1]) for line in lines if line.split()[0] == "64" and "n/a" not in line}
    assert loss.keys() == {"naive", "ours"}
    assert loss["ours"] == pytest.approx(loss["naive"], rel=1e-6, abs=2e-6), lines
    assert any("liger" in line and "n/a (no entropy bonus)" in line for line in lines)
    without = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loss_memory.py"), "--shape", "tiny", "--variants", "ours"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT / "runtime")),
    )
    plain = next(float(line.split()[-1]) for line in without.stdout.splitlines() if line.split()[:1] == ["64"])
    assert plain - loss["ours"] > 0.1  # minus 0.1 x an entropy of several nats


def test_benchmark_smoke_run_agrees_and_ends_with_the_ratio_line():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loss_memory.py"), "--shape", "tiny"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT / "runtime")),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    loss = {line.split()[1]: float(line.split()[-1]) for line in lines if line.split()[0] == "64"}
    assert loss.keys() == {"naive", "ours", "liger"}
    assert loss["ours"] == pytest.approx(loss["naive"], rel=1e-6, abs=2e-6), lines
    assert loss["liger"] == pytest.approx(loss["naive"], rel=1e-6, abs=2e-6), lines
    assert lines[-1].startswith("T=64 memory naive/ours = ") and " time ours/naive = " in lines[-1]
