"""Triton kernels for one chunk of the fused loss: the GPU fast path of grpo_runtime.fused_linear.

They work in place on the chunk's logits in the lm_head's own dtype (bf16 on GPU), so the
chunk needs no float32 copy of its logits and the temperature scaling, log-sum-exp, gather and
softmax gradient are two passes over the chunk instead of the torch path's six:

- ``logp_(z, targets, inv_temp, entropy=False)``: per row, an online (running max) float32
  log-sum-exp of z / T over the vocabulary and the target's log-prob; with ``entropy``, in the
  same pass, the entropy of softmax(z / T) as log s - sum(e x') / s, with x' = z / T - max and
  e = exp(x') (both sums rescaled as the running max moves). Returns (logp, lse, entropy or
  None), float32.
- ``dlogits_(z, targets, lse, dlogp, inv_temp, dentropy=None, entropy=None)``: overwrites z with
  dL/dlogits = dlogp (onehot(target) - softmax(z / T)) / T, in z's dtype; with dentropy (dL/dH of
  each row, H its entropy) plus the entropy's gradient - dentropy p (log p + H) / T, in the same pass.

On CPU they run under TRITON_INTERPRET=1 (that is how the tests check them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _logp_kernel(z_ptr, z_stride, t_ptr, logp_ptr, lse_ptr, ent_ptr, V, inv_temp, BLOCK: tl.constexpr,
                 ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)  # sum of exp(x - m)
    u = tl.zeros((), tl.float32)  # sum of exp(x - m) (x - m): the entropy's second term, times s
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        x = tl.load(z_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, 0))
        scale = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        if ENTROPY:
            shift = tl.where(s > 0, m - m_new, 0.0)  # m is -inf before the first block (s = 0 then)
            u = scale * (u + shift * s) + tl.sum(e * tl.where(inside, x - m_new, 0.0), 0)
        s = s * scale + tl.sum(e, 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(t_ptr + row)
    z_target = tl.load(z_row + target).to(tl.float32) * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_target - lse)
    if ENTROPY:
        tl.store(ent_ptr + row, tl.log(s) - u / s)


@triton.jit
def _dlogits_kernel(z_ptr, z_stride, t_ptr, lse_ptr, g_ptr, gh_ptr, h_ptr, V, inv_temp, BLOCK: tl.constexpr,
                    ENTROPY_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row) * inv_temp
    target = tl.load(t_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        x = tl.load(z_row + cols, mask=inside, other=0.0).to(tl.float32) * inv_temp
        log_p = x - lse
        p = tl.exp(log_p)
        d = g * (tl.where(cols == target, 1.0, 0.0) - p)
        if ENTROPY_GRAD:
            d -= tl.load(gh_ptr + row) * inv_temp * p * (log_p + tl.load(h_ptr + row))
        tl.store(z_row + cols, d.to(z_ptr.dtype.element_ty), mask=inside)


def logp_(z: torch.Tensor, targets: torch.Tensor, inv_temp: float, entropy: bool = False):
    n, vocab = z.shape
    assert z.stride(1) == 1 and targets.shape == (n,)
    logp = torch.empty(n, dtype=torch.float32, device=z.device)
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    ent = torch.empty(n, dtype=torch.float32, device=z.device) if entropy else None
    if n:
        block = min(BLOCK, triton.next_power_of_2(vocab))
        _logp_kernel[(n,)](z, z.stride(0), targets, logp, lse, lse if ent is None else ent, vocab, inv_temp,
                           BLOCK=block, ENTROPY=entropy)
    return logp, lse, ent


def dlogits_(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, dlogp: torch.Tensor, inv_temp: float,
             dentropy: torch.Tensor | None = None, entropy: torch.Tensor | None = None):
    n, vocab = z.shape
    assert z.stride(1) == 1 and lse.shape == dlogp.shape == (n,)
    if n:
        block = min(BLOCK, triton.next_power_of_2(vocab))
        g = dlogp.float().contiguous()
        gh, h = (g, g) if dentropy is None else (dentropy.float().contiguous(), entropy.float().contiguous())
        _dlogits_kernel[(n,)](z, z.stride(0), targets, lse, g, gh, h, vocab, inv_temp, BLOCK=block,
                              ENTROPY_GRAD=dentropy is not None)
    return z
