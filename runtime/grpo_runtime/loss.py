"""The GRPO loss, computed without ever holding [batch, seq, vocab] logits.

Two parts, kept apart (Liger's fused_linear_ppo + grpo_loss shape):

- ``FusedLinearTokenLoss``: the chunking. It walks chunks of ``chunk_size`` token rows of the
  flattened hidden states, projects each chunk through the lm_head, takes log-softmax (and the
  entropy, in the same pass) and gathers the target's log-prob, asks a *per-token* loss for
  dL/dlogp of those tokens, and turns that into the gradients w.r.t. hidden states, weight and
  bias of the chunk. It knows nothing about GRPO.
- ``grpo_token_loss`` + ``NORMALISERS``: the GRPO maths of one token (TRL's, every variant:
  clipped or CISPO, token or sequence ratio, delta, KL estimator, sampler correction, top-entropy
  tokens) and how a loss type normalises the sum over the whole optimizer step. A new loss type
  is a normaliser entry (or a branch of the per-token function). The entropy bonus
  (``bonus_entropy``, its coefficient from ``EntropyBonus``) is a term over the tokens' entropies:
  the chunks then also take dL/dentropy, and the entropy's gradient joins the log-prob's.

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

Coupled tokens (``whole=True``). GSPO's sequence ratio exp(mean of a completion's log-ratios),
a sequence-level sampler correction and the top-entropy quantile make a token's loss depend on
other tokens' current log-probs, so dL/dlogp_i is not known when its chunk is. Those losses are
written over the vector of every selected token's log-prob (and entropy) and differentiated by
autograd on that [M] vector, which holds no vocabulary; the chunks then need dL/dlogp only:
- lm_head frozen (LoRA, this project's case): row i of grad_h is dlogp_i ((onehot - softmax) W / T)_i,
  so the one pass stores the bracket and the rows are scaled once dlogp is known: no extra cost
  (B=8, T=512, D=576, V=49152, fp32, CPU seconds: token level 8.5 s, sequence level 8.6 s).
- lm_head trainable: grad_W sums rows, so a first pass computes the log-probs (a projection and a
  log-sum-exp per chunk, no gradient work), then the usual pass: 10.8 s -> 16.1 s (+45%) on that
  shape. Reusing earlier log-probs instead would be wrong after the first optimizer update.

Only tokens with ``mask != 0`` do any vocabulary work: they are gathered first, so padding
costs nothing (completions of one group differ widely in length).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import kernels

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
KL_ESTIMATORS = ("k3_ratio", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SAMPLING_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "off")


@dataclass(frozen=True)
class LossConfig:
    """Knobs of the GRPO loss; the trainer fills them from TrainingSpec (documented there)."""

    loss_type: str = "dapo"  # one of LOSS_TYPES: the per-token loss and how its sum is normalised
    beta: float = 0.0  # KL coefficient; 0 skips the KL (ref_logps may be None)
    epsilon: float = 0.2  # ratio clipped below at 1 - epsilon
    epsilon_high: float | None = None  # ratio clipped above at 1 + this (cispo: at this); None -> epsilon
    temperature: float = 1.0  # logits are divided by it before the log-softmax (the sampling one)
    chunk_size: int = 512  # token rows per chunk: peak memory ~ chunk_size x vocab x 4 bytes
    max_completion_length: int | None = None  # dr_grpo normaliser B x this; None -> T
    kl_estimator: str = "k3_ratio"  # k3_ratio: k3 x the importance ratio (TRL's use_bias_correction_kl); k3: plain
    importance_sampling_level: str = "token"  # token | sequence (GSPO: the completion's mean log-ratio)
    delta: float | None = None  # two-sided clipping: the ratio is also capped at delta (INTELLECT-2); None: off
    sampling_correction: str = "token_truncate"  # how sampling_logps correct the loss when given; off: ignore them
    sampling_correction_max: float | None = 3.0  # its upper bound C_max (None: none)
    sampling_correction_min: float | None = None  # its lower bound C_min (None: none)
    top_entropy_quantile: float = 1.0  # policy loss only on this top share of tokens by entropy; 1 keeps all
    off_policy_mask_threshold: float | None = None  # drop A < 0 completions whose mean KL to the sampler exceeds it
    sapo_temperature_pos: float = 1.0  # sapo's gate temperature for tokens with A > 0 (TRL's default)
    sapo_temperature_neg: float = 1.05  # and for A <= 0
    vespo_k_pos: float = 2.0  # vespo's gamma weight w^k e^(lambda (1 - w)) for A >= 0 (TRL's defaults)
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0  # and for A < 0
    vespo_lambda_neg: float = 2.0
    fp32_logits: bool = False  # float32 logits from a bf16/fp16 lm_head (TRL's cast_lm_head_to_fp32); float32 heads: no-op

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("loss_type", self.loss_type, LOSS_TYPES),
            ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
            ("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS),
            ("sampling_correction", self.sampling_correction, SAMPLING_CORRECTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError("top_entropy_quantile must be in [0, 1]")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ValueError("off_policy_mask_threshold must be >= 0")


# --------------------------------------------------------------------------- the chunking


def float32_logits(h: torch.Tensor, weight: torch.Tensor, bias=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [..., V] in float32 of a bf16/fp16 head (training.castLmHeadToFp32): the products of bf16 values are
    exact in float32, so a matmul with a float32 result (CUDA) is what a float32 head computes, without a float32
    copy of the head; CPU has no such matmul and multiplies a float32 copy."""
    flat = h.reshape(-1, h.shape[-1]).to(weight.dtype)
    if weight.is_cuda:
        z = torch.mm(flat, weight.T, out_dtype=torch.float32, out=out)
    else:
        z = torch.mm(flat.float(), weight.float().T, out=out)
    if bias is not None:
        z.add_(bias.float())
    return z if out is not None else z.view(*h.shape[:-1], weight.shape[0])


def _projection(weight, bias, fp32_logits: bool):
    """(weight, bias) the chunks project with. Float32 logits of a bf16/fp16 head on CPU take a float32 copy,
    made once a pass (CPU has no matmul with a float32 result from bf16 operands); on CUDA the head itself."""
    if fp32_logits and weight.dtype != torch.float32 and not weight.is_cuda:
        return weight.float(), None if bias is None else bias.float()
    return weight, bias


def _project(h, weight, bias, out: torch.Tensor, fp32_logits: bool = False) -> torch.Tensor:
    """Logits of a chunk of rows h [n, D], written into out [n, V] (float32, or the weight's dtype).

    One buffer reused by every chunk: a fresh [chunk, V] allocation pays its page faults again
    each time (~12% of the chunk's projection on CPU). fp32_logits: see float32_logits (on CPU the
    caller passes the float32 copy of _projection, made once a pass)."""
    h = h.to(weight.dtype)
    if out.dtype == weight.dtype:
        return torch.mm(h, weight.T, out=out) if bias is None else torch.addmm(bias, h, weight.T, out=out)
    if fp32_logits:
        return float32_logits(h, weight, bias, out=out)
    # bf16/fp16 matmul, then a float32 copy (the logits keep bf16's 8 bits): the torch path accumulates the
    # logsumexp in float32
    return out.copy_(h @ weight.T if bias is None else torch.addmm(bias, h, weight.T))


def _logp_(z: torch.Tensor, targets: torch.Tensor, inv_temp: float, entropy: bool = False):
    """log p(target) of each row of float32 logits z [n, V] at temperature 1 / inv_temp, and with
    ``entropy`` the entropy of each row's softmax. Overwrites z with exp(z / T - rowmax), kept for
    the gradient; returns (logp, the row sums of that, entropy or None).

    Entropy in the same pass: H = log s - sum(e y) / s with y = z / T - rowmax, e = exp(y),
    s = sum(e). The exponential goes into a small buffer a block of rows at a time, so that e and y
    are both at hand without a second [n, V] buffer; then y becomes e y (summed) and e is copied
    back. Rows, not columns: a column block of z is strided and torch's reductions over it are
    several times slower. Measured on 2 loaded CPU cores, a [512, 49152] chunk: 50-65 ms without
    the entropy, 150-210 ms with it (columns: 300-400 ms)."""
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    target_logit = z.gather(1, targets[:, None]).squeeze(1)
    row_max = z.amax(1, keepdim=True)
    z.sub_(row_max)
    if not entropy:
        z.exp_()
        row_sum = z.sum(1)
        return target_logit - row_max.squeeze(1) - row_sum.log(), row_sum, None
    ey = z.new_empty(z.shape[0])
    scratch = z.new_empty(min(_ENTROPY_ROWS, z.shape[0]), z.shape[1])
    for start in range(0, z.shape[0], _ENTROPY_ROWS):
        y = z[start : start + _ENTROPY_ROWS]
        e = torch.exp(y, out=scratch[: y.shape[0]])
        ey[start : start + _ENTROPY_ROWS] = y.mul_(e).sum(1)
        y.copy_(e)
    row_sum = z.sum(1)
    log_sum = row_sum.log()
    return target_logit - row_max.squeeze(1) - log_sum, row_sum, log_sum - ey / row_sum


_ENTROPY_ROWS = 64  # rows per exp block on the torch path when the entropy is wanted


def _dlogits_(e: torch.Tensor, targets: torch.Tensor, row_sum: torch.Tensor, dlogp: torch.Tensor, inv_temp: float,
              dentropy: torch.Tensor | None = None, entropy: torch.Tensor | None = None):
    """In place: e = exp(z / T - rowmax) [n, V] becomes dL/dlogits = dlogp (onehot - softmax) / T, and with
    dentropy (dL/dH of each row, H its entropy) plus the entropy's gradient - dentropy p (log p + H) / T.

    With log p = log e - log s that term is e (H - log s) / s + e log e / s (times - dentropy / T): the
    e log e goes into a small buffer a block of rows at a time, as in _logp_."""
    g = dlogp * inv_temp
    if dentropy is None:
        e.mul_((-g / row_sum)[:, None])
    else:
        gh = dentropy * inv_temp
        of_e = (-g - gh * (entropy - row_sum.log())) / row_sum
        of_elog = -gh / row_sum
        scratch = e.new_empty(min(_ENTROPY_ROWS, e.shape[0]), e.shape[1])
        for start in range(0, e.shape[0], _ENTROPY_ROWS):
            rows = slice(start, start + _ENTROPY_ROWS)
            block = e[rows]
            elog = torch.xlogy(block, block, out=scratch[: block.shape[0]])  # 0 where e underflowed to 0
            block.mul_(of_e[rows, None]).add_(elog.mul_(of_elog[rows, None]))
    e.scatter_add_(1, targets[:, None], g[:, None])
    return e


_TRITON: bool | None = None  # None: the Triton kernels on CUDA when triton imports; True/False force it (tests)


def _chunk_ops(weight: torch.Tensor, fp32_logits: bool = False):
    """(logp_, dlogits_, buffer dtype) for the chunks: the Triton kernels (in place, in the weight's
    dtype or with fp32_logits float32, float32 statistics) on GPU, torch ops on a float32 buffer elsewhere."""
    use = _TRITON if _TRITON is not None else weight.is_cuda and kernels.available()
    if use:
        from .kernels import logsoftmax

        return logsoftmax.logp_, logsoftmax.dlogits_, torch.float32 if fp32_logits else weight.dtype
    return _logp_, _dlogits_, torch.float32


TokenLoss = Callable[[torch.Tensor, torch.Tensor | None, slice], torch.Tensor]
"""token_loss(logp of some selected tokens [n], their entropies [n] or None, their slice of the selection) -> the
loss of those tokens, already weighted by their share of the normaliser (the total loss is the sum over chunks)."""

WholeLoss = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""whole_loss(logp of every selected token [M], their entropies [M] or None) -> the loss, for losses
in which a token's gradient depends on other tokens' log-probs (``whole=True``)."""


class FusedLinearTokenLoss(torch.autograd.Function):
    """sum_i token_loss(log_softmax(hidden_i W^T + b) / T)[target_i]) over the selected rows.

    hidden [N, D], targets [N], rows [M] (the selected rows, e.g. mask != 0). Returns the loss
    and the selected tokens' log-probs [M] (float32, not differentiable: for metrics), and with
    ``with_entropy`` also their entropies [M] (of softmax(logits / T), from the same pass).
    ``whole``: token_loss is a WholeLoss, given every token at once (see the module docstring).
    ``entropy_grad``: the loss also depends on the entropies (an entropy bonus), so they are given to it
    differentiable and their gradient joins the log-probs' in each chunk (needs ``with_entropy``).
    ``fp32_logits``: float32 logits from a bf16/fp16 head (see _project); the backward's matmuls stay in
    the head's dtype, as the hidden state's gradient is.
    Memory: one [chunk_size, V] buffer (float32; the weight's dtype on the Triton path unless fp32_logits),
    reused by every chunk, plus the gradients (the size of hidden, and of weight when it needs one); with
    fp32_logits on CPU, a float32 copy of a bf16 head.
    """

    @staticmethod
    @torch.autocast("cuda", enabled=False)  # dtypes are chosen here: bf16 matmuls, float32 statistics
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, hidden, weight, bias, targets, rows, token_loss, temperature: float, chunk_size: int,
                with_entropy: bool = False, whole: bool = False, entropy_grad: bool = False, fp32_logits: bool = False):
        if entropy_grad and not with_entropy:
            raise ValueError("entropy_grad needs with_entropy")
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grads = (
            torch.zeros_like(hidden) if need_h else None,
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None,
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None,
        )
        walk = _Walk(hidden, weight, bias, targets, rows, 1.0 / temperature, chunk_size, with_entropy, fp32_logits)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)

        def differentiate(loss_of, logp, entropy):
            """(the loss, dL/dlogp, dL/dentropy or None) of loss_of(logp, entropy)."""
            with torch.enable_grad():
                leaves = [logp.detach().requires_grad_()]
                if entropy_grad:
                    leaves.append(entropy.detach().requires_grad_())
                value = loss_of(*leaves, *([] if entropy_grad else [entropy]))
                dlogp, *dentropy = torch.autograd.grad(value, leaves, allow_unused=True)
            dlogp = torch.zeros_like(logp) if dlogp is None else dlogp
            return value.detach(), dlogp, (dentropy[0] if dentropy else None)

        if not whole:

            def grads_of(logp, entropy, sl):
                nonlocal loss
                chunk_loss, dlogp, dentropy = differentiate(lambda lp, ent: token_loss(lp, ent, sl), logp, entropy)
                loss += chunk_loss
                return dlogp, dentropy

            logps, entropies = walk(grads, grads_of)
        else:
            # A frozen lm_head needs only grad_h, and row i of it is dlogp_i x ((onehot - softmax) W / T)_i:
            # one pass stores the brackets (dlogp = 1), the rows are scaled once dlogp is known. A trainable
            # head (grad_W sums over rows), or an entropy term (a second bracket per row), takes a first pass
            # for the log-probs, then the usual one.
            deferred = need_h and not (need_w or need_b or entropy_grad)
            ones = torch.ones(min(chunk_size, rows.numel()), dtype=torch.float32, device=hidden.device)
            logps, entropies = walk(grads if deferred else (None, None, None),
                                    lambda logp, entropy, sl: (ones[: logp.numel()], None))
            whole_loss, dlogp, dentropy = differentiate(token_loss, logps, entropies)
            loss += whole_loss
            if deferred:
                grads[0].index_copy_(0, rows, grads[0].index_select(0, rows) * dlogp[:, None].to(hidden.dtype))
            elif need_h or need_w or need_b:
                walk(grads, lambda logp, entropy, sl: (dlogp[sl], None if dentropy is None else dentropy[sl]))
        grad_h, grad_w, grad_b = grads
        # Not save_for_backward: these are neither inputs nor outputs, and backward scales them in place.
        ctx.grads = (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        ctx.mark_non_differentiable(logps, *([entropies] if with_entropy else []))
        return (loss, logps, entropies) if with_entropy else (loss, logps)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_metrics):
        if ctx.grads is None:
            raise RuntimeError("FusedLinearTokenLoss: the gradients were computed in forward and used once already")
        grads, ctx.grads = ctx.grads, None
        if not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
            grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return *grads, *[None] * (len(ctx.needs_input_grad) - len(grads))


@dataclass
class _Walk:
    """One pass over the chunks of the selected rows: logits, log-probs (and entropies), and with the
    chunk's (dlogp, dentropy or None) from grads_of, the gradients added into grads (grad_h, grad_W,
    grad_b: each None if unwanted)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    rows: torch.Tensor
    inv_temp: float
    chunk_size: int
    with_entropy: bool
    fp32_logits: bool = False

    def __call__(self, grads, grads_of: Callable[[torch.Tensor, torch.Tensor | None, slice], tuple]):
        hidden, weight, bias, rows, inv_temp = self.hidden, self.weight, self.bias, self.rows, self.inv_temp
        grad_h, grad_w, grad_b = grads
        logps = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        entropies = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device) if self.with_entropy else None
        logp_, dlogits_, buf_dtype = _chunk_ops(weight, self.fp32_logits)
        proj_w, proj_b = _projection(weight, bias, self.fp32_logits)
        buf = torch.empty(min(self.chunk_size, rows.numel()), weight.shape[0], dtype=buf_dtype, device=hidden.device)
        for start in range(0, rows.numel(), self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            idx = rows[sl]
            h, t = hidden.index_select(0, idx), self.targets.index_select(0, idx)
            z = _project(h, proj_w, proj_b, buf[: idx.numel()], self.fp32_logits)
            logp, stats, entropy = logp_(z, t, inv_temp, self.with_entropy)
            logps[sl] = logp
            if self.with_entropy:
                entropies[sl] = entropy
            dlogp, dentropy = grads_of(logp, entropy, sl)
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            dz = dlogits_(z, t, stats, dlogp, inv_temp, dentropy, entropy)
            dzc = dz.to(weight.dtype)  # no copy for float32
            if grad_h is not None:
                grad_h.index_copy_(0, idx, (dzc @ weight).to(hidden.dtype))
            if grad_w is not None:
                if weight.dtype == torch.float32:
                    grad_w.addmm_(dz.T, h.float())
                else:  # bf16 matmul (float32 accumulation inside), summed over chunks in float32
                    grad_w += (dzc.T @ h.to(weight.dtype)).float()
            if grad_b is not None:
                grad_b += dz.sum(0, dtype=torch.float32)
            del dzc
        return logps, entropies


@torch.no_grad()
def token_logprobs(hidden, weight, target_ids, *, temperature=1.0, chunk_size=512, bias=None,
                   fp32_logits=False) -> torch.Tensor:
    """log p(target_ids) [B, T] (float32, no grad), chunk by chunk: the old/ref log-probs."""
    batch, seq = target_ids.shape
    h, t = hidden.reshape(batch * seq, -1), target_ids.reshape(-1)
    out = torch.empty(batch * seq, dtype=torch.float32, device=hidden.device)
    logp_, _, buf_dtype = _chunk_ops(weight, fp32_logits)
    proj_w, proj_b = _projection(weight, bias, fp32_logits)
    buf = torch.empty(min(chunk_size, batch * seq), weight.shape[0], dtype=buf_dtype, device=hidden.device)
    for start in range(0, batch * seq, chunk_size):
        sl = slice(start, start + chunk_size)
        z = _project(h[sl], proj_w, proj_b, buf[: t[sl].numel()], fp32_logits)
        out[sl] = logp_(z, t[sl], 1.0 / temperature)[0]
    return out.view(batch, seq)


# --------------------------------------------------------------------------- the GRPO maths


def k3_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


class Sequences:
    """Which completion each selected token belongs to: per-completion sums and means, broadcast
    back onto its tokens (differentiable, for the terms that couple a completion's tokens)."""

    def __init__(self, index: torch.Tensor, count: int):
        self.index, self.count = index, count  # index [M]: the row of each selected token; count: rows
        self.lengths = torch.bincount(index, minlength=count).clamp(min=1).float()

    def totals(self, x: torch.Tensor) -> torch.Tensor:
        """[count] sums of x [M] per completion."""
        return x.new_zeros(self.count).index_add(0, self.index, x)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.totals(x)[self.index]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return (self.totals(x) / self.lengths)[self.index]


def log_importance_ratio(logp, old_logp, config: LossConfig, seq: Sequences | None = None) -> torch.Tensor:
    """log pi / pi_old per token; at sequence level (GSPO) the completion's mean of it, on each of its
    tokens. old_logp None: on-policy, logp.detach() (1 in value, the policy gradient in gradient)."""
    log_ratio = logp - (logp.detach() if old_logp is None else old_logp)
    if config.importance_sampling_level == "sequence":
        if seq is None:
            raise ValueError("importance_sampling_level 'sequence' needs the completions' tokens together")
        log_ratio = seq.mean(log_ratio)
    return log_ratio


@torch.no_grad()
def sampling_weights(learner_logp, sampling_logp, config: LossConfig, seq: Sequences | None = None) -> torch.Tensor:
    """The correction for sampling from another engine than the learner: pi_learner / pi_sampler at the
    sampled tokens (TRL's vllm_importance_sampling_*), per token or per completion (the product over its
    tokens), truncated to [min, max] or set to 0 outside it. Tokens without a sampling log-prob (NaN)
    get weight 1. learner_logp: the learner's log-probs at sampling time (old, or the current detached)."""
    log_ratio = torch.nan_to_num(learner_logp - sampling_logp, nan=0.0)
    if config.sampling_correction.startswith("sequence"):
        if seq is None:
            raise ValueError("a sequence-level sampling correction needs the completions' tokens together")
        log_ratio = seq.sum(log_ratio)
    ratio = torch.exp(log_ratio)
    low, high = config.sampling_correction_min, config.sampling_correction_max
    if config.sampling_correction.endswith("truncate"):
        return ratio.clamp(min=low, max=high)
    outside = torch.zeros_like(ratio, dtype=torch.bool)
    if low is not None:
        outside |= ratio < low
    if high is not None:
        outside |= ratio > high
    return ratio.masked_fill(outside, 0.0)


@torch.no_grad()
def vespo_weights(logp, old_logp, advantage, config: LossConfig, seq: Sequences, sampling_weight=None) -> torch.Tensor:
    """VESPO's phi(w) = exp(lambda + k log w - lambda w) (TRL's get_gamma_weights, phi(1) = 1), on each token of
    a completion: w = prod of its tokens' ratios pi / pi_old (log-ratios clamped to +-20) times its sampler
    correction (log clamped to [log 1e-8, 20]); k, lambda by the sign of A (>= 0: _pos)."""
    floor = math.log(1e-8)
    log_w = seq.sum((logp - (logp if old_logp is None else old_logp)).clamp(-20.0, 20.0))
    if sampling_weight is not None:
        log_is = torch.log(sampling_weight).clamp(floor, 20.0)
        # a sequence-level correction is one weight per completion (on each of its tokens): count it once
        log_w = log_w + (seq.mean(log_is) if config.sampling_correction.startswith("sequence") else seq.sum(log_is))
    log_w = log_w.clamp(floor, 20.0)
    nonneg = advantage >= 0
    k = torch.where(nonneg, config.vespo_k_pos, config.vespo_k_neg)
    lam = torch.where(nonneg, config.vespo_lambda_pos, config.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def off_policy_mask(logp, old_logp, behaviour_logp, advantage, threshold: float, seq: Sequences) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's get_off_policy_mask): 0 on the tokens of a completion
    with a negative advantage whose mean KL(sampler || current), sum of (log pi_sampler - log pi) over its
    tokens / its length, is above `threshold`; 1 elsewhere. The sampler's log-probs are the engine's when
    given, else the old ones (on-policy: the current, so nothing is dropped). Unscored tokens (NaN) add 0."""
    behaviour = behaviour_logp if behaviour_logp is not None else (logp if old_logp is None else old_logp)
    kl = seq.mean(torch.nan_to_num(behaviour - logp, nan=0.0))
    return ((advantage >= 0) | (kl <= threshold)).float()


def grpo_token_loss(
    logp, old_logp, ref_logp, advantage, config: LossConfig, *, sampling_logp=None, keep=None, seq=None,
    behaviour_logp=None,
) -> torch.Tensor:
    """TRL's per-token loss (GRPOTrainer._compute_loss, TRL 1.16) before its normaliser:

        r = exp(log_importance_ratio)                    token, or the completion's mean (GSPO)
        clipped:  -min(min(r, delta) A, clip(r, 1 - eps, 1 + eps_high) A)     grpo bnpo dr_grpo dapo luspo
        cispo:    -min(r, eps_high).detach() A logp
        sapo:     -sigmoid(tau (r - 1)) 4 / tau A, tau by the sign of A          (a soft gate, no clip)
        vespo:    -phi(w).detach() A logp, phi the gamma weight of the completion's whole ratio w (the
                  sampler correction inside w, not a factor of its own)
        x off_policy_mask (offPolicyMaskThreshold) x keep (top-entropy tokens) x sampling_weights (sampler correction)
        + beta k3(ref, logp) [x r when kl_estimator is k3_ratio]

    old_logp None: on-policy. sampling_logp: the engine's log-probs of the sampled tokens when the sampling
    correction is on; behaviour_logp: the same whether it is on or not (the off-policy mask's). seq: the
    tokens' completions, needed when a term couples a completion's tokens (then logp holds every
    selected token of the micro-batch, see ``couples_tokens``).
    """
    eps_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    ratio = torch.exp(log_importance_ratio(logp, old_logp, config, seq))
    learner = logp.detach() if old_logp is None else old_logp  # the learner's log-probs at sampling time
    correction = None if sampling_logp is None else sampling_weights(learner, sampling_logp, config, seq)
    if config.loss_type == "cispo":
        loss = -ratio.clamp(max=eps_high).detach() * advantage * logp
    elif config.loss_type == "vespo":
        if seq is None:
            raise ValueError("lossType vespo needs the completions' tokens together")
        loss = -vespo_weights(logp.detach(), old_logp, advantage, config, seq, correction) * advantage * logp
        correction = None  # inside phi
    elif config.loss_type == "sapo":
        tau = torch.where(advantage > 0, config.sapo_temperature_pos, config.sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantage
    else:
        clipped = ratio.clamp(1 - config.epsilon, 1 + eps_high)
        capped = ratio if config.delta is None else ratio.clamp(max=config.delta)
        loss = -torch.minimum(capped * advantage, clipped * advantage)
    if config.off_policy_mask_threshold is not None:
        if seq is None:
            raise ValueError("the off-policy mask needs the completions' tokens together")
        loss = loss * off_policy_mask(logp, old_logp, behaviour_logp, advantage, config.off_policy_mask_threshold, seq)
    if keep is not None:
        loss = loss * keep
    if correction is not None:
        loss = loss * correction
    if config.beta:
        kl = k3_kl(ref_logp, logp)
        loss = loss + config.beta * (kl * ratio if config.kl_estimator == "k3_ratio" else kl)
    return loss


def couples_tokens(config: LossConfig, sampling_correction: bool) -> bool:
    """Whether a token's loss depends on other tokens' current log-probs: GSPO's sequence ratio, the
    off-policy mask, a sequence-level sampling correction, the top-entropy quantile. Those go to FusedLinearTokenLoss whole
    (see the module docstring: free with a frozen lm_head, a first pass of log-probs with a trainable one)."""
    return (
        config.importance_sampling_level == "sequence"
        or config.loss_type == "vespo"
        or config.off_policy_mask_threshold is not None
        or config.top_entropy_quantile < 1.0
        or (sampling_correction and config.sampling_correction.startswith("sequence"))
    )


@dataclass(frozen=True)
class Step:
    """The optimizer step a micro-batch belongs to: what the normalisers divide by."""

    tokens: torch.Tensor  # completion tokens of the whole step (all its micro-batches)
    sequences: int  # completions of the whole step
    micro_batches: int  # micro-batches the step runs in


# What the masked token sum of a micro-batch is divided by, per loss type: (mask [B, T], config, step) ->
# broadcastable to mask. Each is the whole step's normaliser, so the micro-batches' losses sum to the step's
# loss for any split; bnpo alone is defined per micro-batch (TRL's: the mean over the micro-batch's tokens,
# averaged over the micro-batches), so it changes with the split.
def _mean_of_completion_means(m: torch.Tensor, c: LossConfig, s: Step) -> torch.Tensor:
    return m.sum(-1, keepdim=True).clamp(min=1) * s.sequences


def _step_tokens(m: torch.Tensor, c: LossConfig, s: Step) -> torch.Tensor:
    return s.tokens.clamp(min=1)


NORMALISERS: dict[str, Callable[[torch.Tensor, LossConfig, Step], torch.Tensor | float]] = {
    "grpo": _mean_of_completion_means,
    "sapo": _mean_of_completion_means,
    "bnpo": lambda m, c, s: m.sum().clamp(min=1) * s.micro_batches,  # tokens of this micro-batch, x micro-batches
    "dr_grpo": lambda m, c, s: s.sequences * (c.max_completion_length or m.shape[1]),  # completions x max length
    "luspo": lambda m, c, s: s.sequences,  # each completion's token sum (its length weighs it), mean over completions
    "dapo": _step_tokens,
    "cispo": _step_tokens,
    "vespo": _step_tokens,
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
    sampling_logps=None,
    num_sequences_in_batch=None,
    num_micro_batches=1,
    entropy_coef=0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a micro-batch and its metrics, never holding [B, T, V] logits.

    hidden [B, T, D]: last-layer states aligned with target_ids [B, T] (hidden[:, t] predicts
    target_ids[:, t]); weight [V, D] (+ bias [V]): the lm_head, trainable or frozen (no grad work
    then); mask [B, T]: 1 for completion tokens; advantages [B] (or [B, T]); old_logps / ref_logps
    [B, T] (old None: on-policy; ref needed when beta > 0); sampling_logps [B, T]: the engine's
    log-probs of the sampled tokens, turns on the sampling correction (config.sampling_correction,
    unless that is off) and are the off-policy mask's sampler; NaN marks a token the engine could not
    score (weight 1, no KL evidence: TRL's). Without them pass None, not NaN: the mask's sampler is
    then pi_old, or with old None the current log-probs (TRL's fallbacks), where NaN would drop nothing.

    The step this micro-batch belongs to: num_items_in_batch (its completion tokens, default
    mask.sum()), num_sequences_in_batch (its completions, default B), num_micro_batches (default 1).
    With them the loss is this micro-batch's share of the step's loss: summed over the micro-batches
    it is the loss of the whole step in one piece, whatever the split (bnpo and topEntropyQuantile
    excepted, which TRL defines per micro-batch). The metrics are shares the same way (sum them):
    kl (TRL's: the mean over tokens of the KL term as the loss has it, ratio-weighted for k3_ratio;
    0 when beta is 0), entropy (mean token entropy of softmax(logits / T)), clip_ratio_low / _high
    (tokens where the clip is active: ratio below 1 - eps with A < 0 / above 1 + eps_high with A > 0,
    per completion at sequence level, as TRL counts them; cispo: its cap with A > 0 is _high),
    clip_ratio (either), and with a sampling correction sampling_weight (its mean over tokens).

    entropy_coef: the entropy bonus, TRL's entropy_coef (the coefficient of this step: EntropyBonus
    says which): minus entropy_coef x ``bonus_entropy``. Then also policy_loss, the loss without it.
    With topEntropyQuantile < 1 also entropy_kept and kept_tokens: the entropy sum and the count of the
    tokens the policy loss and the bonus act on, each divided by the step's tokens.
    """
    if config.beta and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps")
    batch, seq = target_ids.shape
    maskf = mask.to(torch.float32)
    tokens = maskf.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=maskf.device)
    step = Step(tokens.float(), batch if num_sequences_in_batch is None else int(num_sequences_in_batch),
                int(num_micro_batches))
    weights = (maskf / NORMALISERS[config.loss_type](maskf, config, step)).reshape(-1)
    rows = maskf.reshape(-1).nonzero().squeeze(1)
    sequences = Sequences(rows // seq, batch)

    def select(x):  # [B, T] -> the selected tokens [M], float32
        return None if x is None else x.reshape(-1).index_select(0, rows).float().detach()

    behaviour = select(sampling_logps)  # the off-policy mask's, whether the sampling correction is on or not
    sampling = None if config.sampling_correction == "off" else behaviour
    old, ref, w = select(old_logps), select(ref_logps), select(weights)
    adv = advantages.detach().float().reshape(batch, -1).expand(batch, seq).reshape(-1).index_select(0, rows)
    hidden, targets = hidden.reshape(batch * seq, -1), target_ids.reshape(-1)
    if not torch.is_grad_enabled():  # evaluation: the Function would still see requires_grad and do the work
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()

    bonus = entropy_coef != 0.0
    if couples_tokens(config, sampling is not None):

        def whole_loss(logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
            keep = high_entropy(entropy, config.top_entropy_quantile)
            per_token = grpo_token_loss(logp, old, ref, adv, config, sampling_logp=sampling, keep=keep, seq=sequences,
                                        behaviour_logp=behaviour)
            loss = (per_token * w).sum()
            return loss - entropy_coef * bonus_entropy(entropy, keep, step) if bonus else loss

        loss, logp, entropy = FusedLinearTokenLoss.apply(
            hidden, weight, bias, targets, rows, whole_loss, config.temperature, config.chunk_size, True, True, bonus,
            config.fp32_logits,
        )
    else:

        def token_loss(logp: torch.Tensor, entropy: torch.Tensor, sl: slice) -> torch.Tensor:
            def pick(x):
                return None if x is None else x[sl]

            per_token = grpo_token_loss(logp, pick(old), pick(ref), adv[sl], config, sampling_logp=pick(sampling))
            loss = (per_token * w[sl]).sum()
            return loss - entropy_coef * bonus_entropy(entropy, None, step) if bonus else loss

        loss, logp, entropy = FusedLinearTokenLoss.apply(
            hidden, weight, bias, targets, rows, token_loss, config.temperature, config.chunk_size, True, False, bonus,
            config.fp32_logits,
        )
    keep = high_entropy(entropy, config.top_entropy_quantile)  # as the loss kept them (no gradient here)
    metrics = _metrics(logp, entropy, keep, old, ref, adv, sampling, sequences, config, step)
    if bonus:
        metrics["policy_loss"] = loss.detach() + entropy_coef * bonus_entropy(entropy, keep, step)
    return loss, metrics


def bonus_entropy(entropy: torch.Tensor, keep: torch.Tensor | None, step: Step) -> torch.Tensor:
    """The entropy the bonus rewards (TRL's entropy_coef term, before its coefficient), as this micro-batch's
    share: the mean entropy of the step's tokens; with the top-entropy quantile, the mean over the tokens it
    keeps, of this micro-batch, divided by the micro-batches (TRL's: per micro-batch, as the quantile is).
    Given some of the tokens, their share of it (the chunks' values sum to it)."""
    if keep is None:
        return entropy.sum() / step.tokens.clamp(min=1)
    return (entropy * keep).sum() / keep.sum().clamp(min=1) / step.micro_batches


def high_entropy(entropy: torch.Tensor, quantile: float) -> torch.Tensor | None:
    """1.0 for the tokens in the top ``quantile`` of entropy (at or above the 1 - quantile quantile of
    ``entropy``, TRL's get_high_entropy_mask), 0.0 for the others; None when quantile >= 1 (all kept)."""
    if quantile >= 1.0:
        return None
    if entropy.numel() == 0:
        return entropy
    return (entropy >= torch.quantile(entropy, 1.0 - quantile)).float()


@torch.no_grad()
def _metrics(logp, entropy, keep, old, ref, adv, sampling, seq: Sequences, config: LossConfig, step: Step):
    eps_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    ratio = torch.exp(log_importance_ratio(logp, old, config, seq))
    if config.loss_type == "cispo":
        high = (ratio > eps_high) & (adv > 0)
        low = torch.zeros_like(high)
    elif config.loss_type in ("sapo", "vespo"):  # soft weights clip nothing (TRL logs no clip ratios for them)
        low = high = torch.zeros_like(ratio, dtype=torch.bool)
    else:
        capped = ratio if config.delta is None else ratio.clamp(max=config.delta)  # as TRL counts: after delta
        low = (capped < 1 - config.epsilon) & (adv < 0)
        high = (capped > 1 + eps_high) & (adv > 0)

    def share(flags):  # per token, or per completion at sequence level (as TRL counts them)
        if config.importance_sampling_level == "sequence":
            return (seq.totals(flags.float()) > 0).sum() / step.sequences
        return flags.sum() / step.tokens.clamp(min=1)

    tokens = step.tokens.clamp(min=1)
    metrics = {
        "kl": logp.new_zeros(()),
        "entropy": entropy.sum() / tokens,
        "clip_ratio": share(low | high),
        "clip_ratio_low": share(low),
        "clip_ratio_high": share(high),
    }
    if config.beta:
        kl = k3_kl(ref, logp)
        metrics["kl"] = (kl * ratio if config.kl_estimator == "k3_ratio" else kl).sum() / tokens
    if sampling is not None:
        learner = logp if old is None else old
        metrics["sampling_weight"] = sampling_weights(learner, sampling, config, seq).sum() / tokens
    if keep is not None:  # the tokens the bonus acts on, for the adaptive controller (see EntropyBonus.step_entropy)
        metrics["entropy_kept"] = (entropy * keep).sum() / tokens
        metrics["kept_tokens"] = keep.sum() / tokens
    return metrics


@dataclass
class EntropyBonus:
    """TRL's entropy bonus: the loss minus coef x the mean token entropy (``bonus_entropy``), to keep the
    policy exploring. With ``adaptive``, Skywork-OR1's controller (TRL's use_adaptive_entropy): after each
    optimizer step, coef moves by ``delta`` towards more bonus when that step's mean entropy (over the
    tokens the bonus acts on) was at or below ``target``, and towards less otherwise, within [low, high];
    the bonus is applied only while the last step's entropy was at or below the target (not on the first
    step, which has no last one)."""

    coef: float = 0.0
    adaptive: bool = False
    target: float = 0.2
    delta: float = 0.005
    low: float = 0.0
    high: float = 1.0
    last_entropy: float = math.inf

    def applied(self) -> float:
        """The coefficient of the coming optimizer step."""
        if self.adaptive and self.last_entropy > self.target:
            return 0.0
        return self.coef

    def update(self, entropy: float) -> None:
        """After an optimizer step whose bonus tokens had this mean entropy."""
        if not self.adaptive:
            return
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.high)
        else:
            self.coef = max(self.coef - self.delta, self.low)
        self.last_entropy = entropy

    @staticmethod
    def step_entropy(metrics: dict[str, float]) -> float:
        """The mean entropy of the tokens the bonus acted on, from a step's summed grpo_loss metrics."""
        return metrics.get("entropy_kept", metrics["entropy"]) / max(metrics.get("kept_tokens", 1.0), 1e-12)

    def state(self) -> dict[str, float]:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load(self, state: dict[str, float]) -> None:
        self.coef, self.last_entropy = state["coef"], state["last_entropy"]
