"""A step's batch as the learner takes it: the completions left-padded behind their prompts (build_batch), the
loss a job's spec describes (loss_config), the step's micro-batches (split_micro_batches, over a data-parallel
job's ranks too) and the no-grad log-probs of a batch (batch_logprobs: the old and reference passes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_runtime.engines import Completion
from grpo_runtime.fused_linear import token_logprobs
from grpo_runtime.loss import LossConfig
from grpo_runtime.model import Policy, decoder_hidden_states, lm_head


@dataclass
class Batch:
    """Left-padded prompts followed by right-padded completions, one row per completion."""

    input_ids: torch.Tensor  # [N, P + C]
    attention_mask: torch.Tensor  # [N, P + C]
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C] 1: a token the loss trains on (the model's, not padding)
    prompt_width: int  # P
    # [N, C] the engine's log-prob of each sampled token (NaN: padding, or a completion the engine gave none for);
    # None when it gave none at all: then the loss's sampler is pi_old (see build_batch)
    sampling_logps: torch.Tensor | None

    def rows(self, index: torch.Tensor | slice) -> Batch:
        return Batch(
            self.input_ids[index],
            self.attention_mask[index],
            self.completion_ids[index],
            self.completion_mask[index],
            self.prompt_width,
            None if self.sampling_logps is None else self.sampling_logps[index],
        )


def build_batch(
    prompt_ids: list[list[int]],
    completions: list[Completion],
    pad_id: int,
    device: torch.device,
    pad_to: tuple[int, int] | None = None,
    mask_truncated: bool = False,
) -> Batch:
    """`pad_to` (prompt, completion) widens the batch to the job's maximum lengths: padding is
    masked out, so the maths is unchanged while the memory is the worst case. `mask_truncated`:
    a truncated completion's tokens are masked out of attention and loss (TRL's
    mask_truncated_completions: the row stays, so it still counts as a completion). Tokens a completion's
    `mask` marks as not the model's (a tool's result in an episode) stay in attention and out of
    completion_mask, so out of the loss, its normalisers, the KL, the ratios and the entropy (TRL's tool_mask).

    The engine's log-probs (Completion.logprobs) become `sampling_logps`, None when no completion has
    them: the loss then takes pi_old as the sampler (the off-policy mask's KL, as TRL without vLLM),
    where a tensor of NaN would read as tokens the sampler could not score and drop nothing. A
    completion without them in a batch of some with them gets NaN: TRL's unscored tokens (sampling
    weight 1, no KL evidence for the mask); with numIterations 1 that is the same as pi_old."""
    prompts = [prompt_ids[c.prompt_index] if c.prompt_ids is None else c.prompt_ids for c in completions]
    width_p = max(len(p) for p in prompts)
    width_c = max(1, max(len(c.completion_ids) for c in completions))
    if pad_to:
        width_p, width_c = max(width_p, pad_to[0]), max(width_c, pad_to[1])
    n = len(completions)
    input_ids = torch.full((n, width_p + width_c), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width_p + width_c), dtype=torch.long)
    sampling = torch.full((n, width_c), float("nan"))
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        ids = completion.completion_ids
        input_ids[row, width_p - len(prompt) : width_p] = torch.tensor(prompt)
        input_ids[row, width_p : width_p + len(ids)] = torch.tensor(ids, dtype=torch.long)
        kept = 0 if mask_truncated and completion.truncated else len(ids)
        attention[row, width_p - len(prompt) : width_p + kept] = 1
        if completion.logprobs is not None:
            sampling[row, : len(ids)] = torch.tensor(completion.logprobs, dtype=torch.float32)
    written = attention[:, width_p:].clone()
    for row, completion in enumerate(completions):
        if completion.mask is not None:
            written[row, : len(completion.mask)] *= torch.tensor(completion.mask, dtype=torch.long)
            sampling[row, : len(completion.mask)].masked_fill_(written[row, : len(completion.mask)] == 0, float("nan"))
    given = any(completion.logprobs is not None for completion in completions)
    return Batch(
        input_ids.to(device),
        attention.to(device),
        input_ids[:, width_p:].to(device),
        written.to(device),
        width_p,
        sampling.to(device) if given else None,
    )


def completion_hidden(policy: Policy, batch: Batch) -> torch.Tensor:
    """Last hidden states at the positions that predict each completion token."""
    hidden = decoder_hidden_states(policy.model, batch.input_ids, batch.attention_mask)
    return hidden[:, batch.prompt_width - 1 : -1]


def loss_config(spec, engine: str) -> LossConfig:
    """The loss a GRPOJobSpec describes, for a rollout engine named `engine`."""
    training = spec.training
    correction = training.sampling_correction
    if correction == "auto":  # vLLM samples from other weights (merged, maybe dequantized), dtype and kernels
        correction = "token_truncate" if engine == "vllm" else "off"
    return LossConfig(
        loss_type=training.loss_type,
        beta=training.beta,
        epsilon=training.epsilon,
        epsilon_high=training.epsilon_high,
        temperature=spec.generation.temperature,
        chunk_size=training.loss_chunk_size,
        max_completion_length=spec.generation.max_completion_length,
        kl_estimator=training.kl_estimator,
        importance_sampling_level=training.importance_sampling_level,
        delta=training.delta,
        sampling_correction=correction,
        sampling_correction_max=training.sampling_correction_max,
        sampling_correction_min=training.sampling_correction_min,
        top_entropy_quantile=training.top_entropy_quantile,
        off_policy_mask_threshold=training.off_policy_mask_threshold,
        sapo_temperature_pos=training.sapo_temperature_pos,
        sapo_temperature_neg=training.sapo_temperature_neg,
        vespo_k_pos=training.vespo_k_pos,
        vespo_lambda_pos=training.vespo_lambda_pos,
        vespo_k_neg=training.vespo_k_neg,
        vespo_lambda_neg=training.vespo_lambda_neg,
        fp32_logits=training.cast_lm_head_to_fp32,
    )


def split_micro_batches(completions: int, gradient_accumulation_steps: int, ranks: int = 1) -> list[torch.Tensor]:
    """The rows of each micro-batch of the step: min(gradientAccumulationSteps, completions) of them, at least
    one per rank (rounded up to a multiple of the ranks, so each runs as many), sizes differing by at most one
    (every one runs: the loss's normalisers count the step, not the micro-batches). A rank runs every
    ranks-th of them (`World.rank::World.size`). A job's prompts split evenly over its ranks, so there are
    never fewer completions than ranks."""
    count = min(gradient_accumulation_steps, completions)
    count = min(-(-count // ranks) * ranks, completions)
    return list(torch.arange(completions).tensor_split(count))


@torch.no_grad()
def batch_logprobs(
    policy: Policy, batch: Batch, config: LossConfig, micro_batches: int | list[torch.Tensor]
) -> torch.Tensor:
    """log-probs [N, C] of the completion tokens, no grad, a micro-batch (a count, or their rows) at a time; given
    the rows of some micro-batches (a rank's), the others' rows are NaN."""
    if isinstance(micro_batches, int):
        micro_batches = split_micro_batches(batch.input_ids.shape[0], micro_batches)
    weight, bias = lm_head(policy.model)
    out = torch.full(batch.completion_ids.shape, float("nan"), device=batch.completion_ids.device)
    for rows in micro_batches:
        micro = batch.rows(rows)
        out[rows.to(out.device)] = (
            token_logprobs(
                completion_hidden(policy, micro),
                weight,
                micro.completion_ids,
                temperature=config.temperature,
                chunk_size=config.chunk_size,
                bias=bias,
                fp32_logits=config.fp32_logits,
            )
        ).to(out.dtype)
    return out
