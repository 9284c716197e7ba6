"""The GRPO loss, computed without ever holding [batch, seq, vocab] logits.

Two parts, kept apart (Liger's fused_linear_ppo + grpo_loss shape):

- ``FusedLinearTokenLoss``: the chunking. It walks chunks of ``chunk_size`` token rows of the
  flattened hidden states, projects each chunk through the lm_head, takes log-softmax and
  gathers the target's log-prob, asks a *per-token* loss for dL/dlogp of those tokens, and
  turns that into the gradients w.r.t. hidden states, weight and bias of the chunk. It knows
  nothing about GRPO.
- ``grpo_token_loss`` + ``NORMALISERS``: the GRPO maths of one token and how a loss type
  normalises the sum. A new loss type is a normaliser entry (or a per-token function).

Gradient in forward, not recompute in backward. The loss is a sum over tokens of
``weight_i * f(logp_i)``: every normaliser (tokens per sequence, per micro-batch, per step,
batch x max length) is known before the first chunk, so dL/dlogp_i is known the moment logp_i
is. One pass per chunk therefore does everything with the logits it has just computed:
logits = h W^T, then dlogits = dlogp * (onehot - softmax) / temperature, grad_h = dlogits W,
grad_W += dlogits^T h. That is the naive implementation's three matmuls and nothing more.
Recomputing in backward needs a fourth (the forward projection twice). Measured here (2 CPU
cores, fp32, B=8, T=1024, D=576, V=49152, lm_head trainable, every token counted, CPU seconds
of the process, which other load on the machine barely moves): grad in forward 16.2 s,
recompute in backward 22.7 s, naive full logits 26.7 s; peak memory the same for both (one
[chunk, V] float32 buffer dominates). The price of grad in forward: a forward without backward
pays for the gradients, so under torch.no_grad() none are computed (and ``token_logprobs`` is
the call for log-probs alone).

Only tokens with ``mask != 0`` do any vocabulary work: they are gathered first, so padding
costs nothing (completions of one group differ widely in length).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import kernels

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class LossConfig:
    """Knobs of the GRPO loss; the trainer fills them from TrainingSpec."""

    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo: how the token sum is normalised
    beta: float = 0.0  # k3 KL coefficient; 0 skips the KL (ref_logps may be None)
    epsilon: float = 0.2  # ratio clipped below at 1 - epsilon
    epsilon_high: float | None = None  # ratio clipped above at 1 + epsilon_high; None -> epsilon
    temperature: float = 1.0  # logits are divided by it before the log-softmax (the sampling one)
    chunk_size: int = 512  # token rows per chunk: peak memory ~ chunk_size x vocab x 4 bytes
    max_completion_length: int | None = None  # dr_grpo normaliser B x this; None -> T

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {self.loss_type!r}")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")


# --------------------------------------------------------------------------- the chunking


def _project(h, weight, bias, out: torch.Tensor) -> torch.Tensor:
    """Logits of a chunk of rows h [n, D], written into out [n, V] (float32, or the weight's dtype).

    One buffer reused by every chunk: a fresh [chunk, V] allocation pays its page faults again
    each time (~12% of the chunk's projection on CPU)."""
    h = h.to(weight.dtype)
    if out.dtype == weight.dtype:
        return torch.mm(h, weight.T, out=out) if bias is None else torch.addmm(bias, h, weight.T, out=out)
    # bf16/fp16 matmul, then a float32 copy: the torch path accumulates the logsumexp in float32
    return out.copy_(h @ weight.T if bias is None else torch.addmm(bias, h, weight.T))


def _logp_(z: torch.Tensor, targets: torch.Tensor, inv_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) of each row of float32 logits z [n, V] at temperature 1 / inv_temp.
    Overwrites z with exp(z / T - rowmax), kept for the gradient, and returns its row sums too."""
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    target_logit = z.gather(1, targets[:, None]).squeeze(1)
    row_max = z.amax(1, keepdim=True)
    z.sub_(row_max).exp_()
    row_sum = z.sum(1)
    return target_logit - row_max.squeeze(1) - row_sum.log(), row_sum


def _dlogits_(e: torch.Tensor, targets: torch.Tensor, row_sum: torch.Tensor, dlogp: torch.Tensor, inv_temp: float):
    """In place: e = exp(z / T - rowmax) [n, V] becomes dL/dlogits = dlogp (onehot - softmax) / T."""
    g = dlogp * inv_temp
    e.mul_((-g / row_sum)[:, None])
    e.scatter_add_(1, targets[:, None], g[:, None])
    return e


_TRITON: bool | None = None  # None: the Triton kernels on CUDA when triton imports; True/False force it (tests)


def _chunk_ops(weight: torch.Tensor):
    """(logp_, dlogits_, buffer dtype) for the chunks: the Triton kernels (in place, in the weight's
    dtype, float32 statistics) on GPU, torch ops on a float32 buffer elsewhere."""
    use = _TRITON if _TRITON is not None else weight.is_cuda and kernels.available()
    if use:
        from .kernels import logsoftmax

        return logsoftmax.logp_, logsoftmax.dlogits_, weight.dtype
    return _logp_, _dlogits_, torch.float32


TokenLoss = Callable[[torch.Tensor, slice], torch.Tensor]
"""token_loss(logp of some selected tokens [n], their slice of the selection) -> the loss of those
tokens, already weighted by their share of the normaliser (the total loss is the sum over chunks)."""


class FusedLinearTokenLoss(torch.autograd.Function):
    """sum_i token_loss(log_softmax(hidden_i W^T + b) / T)[target_i]) over the selected rows.

    hidden [N, D], targets [N], rows [M] (the selected rows, e.g. mask != 0). Returns the loss
    and the selected tokens' log-probs [M] (float32, not differentiable: for metrics).
    Memory: one [chunk_size, V] buffer (float32; the weight's dtype on the Triton path), reused by
    every chunk, plus the gradients (the size of hidden, and of weight when it needs one).
    """

    @staticmethod
    @torch.autocast("cuda", enabled=False)  # dtypes are chosen here: bf16 matmuls, float32 statistics
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, hidden, weight, bias, targets, rows, token_loss: TokenLoss, temperature: float, chunk_size: int):
        inv_temp = 1.0 / temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        logps = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        logp_, dlogits_, buf_dtype = _chunk_ops(weight)
        buf = torch.empty(min(chunk_size, rows.numel()), weight.shape[0], dtype=buf_dtype, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            sl = slice(start, start + chunk_size)
            idx = rows[sl]
            h, t = hidden.index_select(0, idx), targets.index_select(0, idx)
            z = _project(h, weight, bias, buf[: idx.numel()])
            logp, stats = logp_(z, t, inv_temp)
            logps[sl] = logp
            with torch.enable_grad():
                leaf = logp.detach().requires_grad_()
                chunk_loss = token_loss(leaf, sl)
                (dlogp,) = torch.autograd.grad(chunk_loss, leaf)
            loss += chunk_loss.detach()
            if not (need_h or need_w or need_b):
                continue
            dz = dlogits_(z, t, stats, dlogp, inv_temp)
            dzc = dz.to(weight.dtype)  # no copy for float32
            if need_h:
                grad_h.index_copy_(0, idx, (dzc @ weight).to(hidden.dtype))
            if need_w:
                if weight.dtype == torch.float32:
                    grad_w.addmm_(dz.T, h.float())
                else:  # bf16 matmul (float32 accumulation inside), summed over chunks in float32
                    grad_w += (dzc.T @ h.to(weight.dtype)).float()
            if need_b:
                grad_b += dz.sum(0, dtype=torch.float32)
            del dzc
        # Not save_for_backward: these are neither inputs nor outputs, and backward scales them in place.
        ctx.grads = (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        ctx.mark_non_differentiable(logps)
        return loss, logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps):
        if ctx.grads is None:
            raise RuntimeError("FusedLinearTokenLoss: the gradients were computed in forward and used once already")
        grads, ctx.grads = ctx.grads, None
        if not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
            grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return *grads, None, None, None, None, None


@torch.no_grad()
def token_logprobs(hidden, weight, target_ids, *, temperature=1.0, chunk_size=512, bias=None) -> torch.Tensor:
    """log p(target_ids) [B, T] (float32, no grad), chunk by chunk: the old/ref log-probs."""
    batch, seq = target_ids.shape
    h, t = hidden.reshape(batch * seq, -1), target_ids.reshape(-1)
    out = torch.empty(batch * seq, dtype=torch.float32, device=hidden.device)
    logp_, _, buf_dtype = _chunk_ops(weight)
    buf = torch.empty(min(chunk_size, batch * seq), weight.shape[0], dtype=buf_dtype, device=hidden.device)
    for start in range(0, batch * seq, chunk_size):
        sl = slice(start, start + chunk_size)
        out[sl], _ = logp_(_project(h[sl], weight, bias, buf[: t[sl].numel()]), t[sl], 1.0 / temperature)
    return out.view(batch, seq)


# --------------------------------------------------------------------------- the GRPO maths


def k3_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_token_loss(logp, old_logp, ref_logp, advantage, config: LossConfig) -> torch.Tensor:
    """TRL's per-token GRPO loss: -min(r A, clip(r, 1-eps, 1+eps_high) A) + beta k3.

    old_logp None: on-policy (one optimisation pass), the ratio is exp(logp - logp.detach()):
    1 in value, the policy gradient in gradient.
    """
    eps_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    ratio = torch.exp(logp - (logp.detach() if old_logp is None else old_logp))
    clipped = ratio.clamp(1 - config.epsilon, 1 + eps_high)
    loss = -torch.minimum(ratio * advantage, clipped * advantage)
    if config.beta:
        loss = loss + config.beta * k3_kl(ref_logp, logp)
    return loss


# What the masked token sum is divided by, per loss type: (mask [B, T], config, num_items) -> broadcastable to mask.
NORMALISERS: dict[str, Callable[[torch.Tensor, LossConfig, object], torch.Tensor | float]] = {
    "grpo": lambda m, c, n: m.sum(-1, keepdim=True).clamp(min=1) * m.shape[0],  # mean over sequences of the token mean
    "bnpo": lambda m, c, n: m.sum().clamp(min=1),  # tokens of this micro-batch
    "dr_grpo": lambda m, c, n: m.shape[0] * (c.max_completion_length or m.shape[1]),  # batch x max length
    "dapo": lambda m, c, n: (m.sum() if n is None else torch.as_tensor(n, dtype=m.dtype, device=m.device)).clamp(min=1),
}


def grpo_loss(
    hidden,
    weight,
    target_ids,
    mask,
    advantages,
    *,
    old_logps=None,
    ref_logps=None,
    config: LossConfig,
    bias=None,
    num_items_in_batch=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a micro-batch and its metrics, never holding [B, T, V] logits.

    hidden [B, T, D]: last-layer states aligned with target_ids [B, T] (hidden[:, t] predicts
    target_ids[:, t]); weight [V, D] (+ bias [V]): the lm_head, trainable or frozen (no grad work
    then); mask [B, T]: 1 for completion tokens; advantages [B]; old_logps / ref_logps [B, T]
    (old None: on-policy; ref needed when beta > 0); num_items_in_batch: the step's completion
    tokens over all accumulation micro-batches (dapo), default mask.sum().
    Metrics (detached): kl (mean k3 over tokens, 0 when beta is 0), clip_ratio_low / _high
    (tokens where the clip is active: ratio below 1 - eps with A < 0 / above 1 + eps_high with
    A > 0, as TRL counts them), clip_ratio (either).
    """
    if config.beta and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps")
    batch, seq = target_ids.shape
    maskf = mask.to(torch.float32)
    weights = (maskf / NORMALISERS[config.loss_type](maskf, config, num_items_in_batch)).reshape(-1)
    rows = maskf.reshape(-1).nonzero().squeeze(1)

    def select(x):  # [B, T] -> the selected tokens [M], float32
        return None if x is None else x.reshape(-1).index_select(0, rows).float().detach()

    old, ref, w = select(old_logps), select(ref_logps), select(weights)
    adv = advantages.detach().float().reshape(batch, -1).expand(batch, seq).reshape(-1).index_select(0, rows)

    def token_loss(logp: torch.Tensor, sl: slice) -> torch.Tensor:
        def pick(x):
            return None if x is None else x[sl]

        return (grpo_token_loss(logp, pick(old), pick(ref), adv[sl], config) * w[sl]).sum()

    if not torch.is_grad_enabled():  # evaluation: the Function would still see requires_grad and do the work
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
    loss, logp = FusedLinearTokenLoss.apply(
        hidden.reshape(batch * seq, -1), weight, bias, target_ids.reshape(-1), rows, token_loss,
        config.temperature, config.chunk_size,
    )
    return loss, _metrics(logp, old, ref, adv, config)


@torch.no_grad()
def _metrics(logp, old, ref, adv, config: LossConfig) -> dict[str, torch.Tensor]:
    n = max(logp.numel(), 1)
    eps_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    ratio = torch.ones_like(logp) if old is None else torch.exp(logp - old)
    low = (ratio < 1 - config.epsilon) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    kl = k3_kl(ref, logp).sum() / n if config.beta else logp.new_zeros(())
    return {
        "kl": kl,
        "clip_ratio": (low | high).sum() / n,
        "clip_ratio_low": low.sum() / n,
        "clip_ratio_high": high.sum() / n,
    }
