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

The chunking lives in grpo_runtime.fused_linear (how its gradient is computed in the forward pass, and how
coupled tokens, ``whole=True``, are handled); this module is the GRPO objective over it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# token_logprobs, float32_logits and the torch chunk ops are re-exported for callers of grpo_runtime.loss; the
# switch the chunks read (_TRITON) and _chunk_ops are set or patched on grpo_runtime.fused_linear itself
from grpo_runtime.fused_linear import (  # noqa: F401
    FusedLinearTokenLoss,
    _dlogits_,
    _logp_,
    float32_logits,
    token_logprobs,
)

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
