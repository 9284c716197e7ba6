"""The chunked linear + log-softmax pass: log-probs of target tokens through an lm_head, and a per-token loss's
gradients w.r.t. the hidden states, weight and bias, without ever holding [batch, seq, vocab] logits. It knows
nothing about GRPO (Liger's fused_linear_ppo shape): ``FusedLinearTokenLoss`` walks chunks of ``chunk_size``
token rows, projects each chunk through the lm_head, takes log-softmax (and the entropy, in the same pass),
gathers the target's log-prob, asks a *per-token* loss (grpo_runtime.loss) for dL/dlogp of those tokens and
turns that into the chunk's gradients; ``token_logprobs`` is the pass for log-probs alone. The Triton kernels
(grpo_runtime.kernels) are its GPU fast path.

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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import kernels


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
