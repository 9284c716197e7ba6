"""Our loss against TRL's own: GRPOTrainer._compute_loss of the installed TRL (1.16), run on the same
tiny Llama and the same inputs, for every loss type and option, on one, two and four micro-batches.

TRL's method runs unchanged on a stand-in for its trainer that holds exactly the attributes the
method reads (its config comes from a real GRPOConfig, so TRL's defaults are the ones compared);
the model is patched with TRL's own fused lm head, as GRPOTrainer does. Ours: the same model's
last hidden states into ``grpo_loss``, with the sampler's log-probs as the trainer has them (the
completions through ``build_batch``: none when the engine gave none, as TRL without vLLM).
Compared: the loss, the gradient of every parameter, and the metrics. Where we differ from TRL on
purpose, the test says so:
- metrics over several micro-batches: TRL logs the plain mean of the micro-batches' means; ours
  are weighted by the micro-batches' tokens (completions for sequence-level clip counts), so the
  logged value does not depend on the split. Compared here against TRL's per-micro-batch values
  weighted the same way; with equal micro-batches the two agree.
- the sampling-correction weights are computed in TRL's generation code (inline, not a function):
  ``trl_sampling_ratio`` below is that code, copied, and its output goes into TRL's loss. So is
  ``trl_mask_truncated`` (mask_truncated_completions); ours is ``build_batch(mask_truncated=True)``,
  and the two masks are compared before both losses get them.
- the entropy bonus (entropy_coef): TRL's is each micro-batch's mean token entropy, averaged over the
  micro-batches; ours is the mean over the step's tokens, so the step's loss does not depend on the split
  (as TRL's documentation describes the bonus: "the mean per-token entropy"). The two agree on one
  micro-batch, so on two and four ours is compared with TRL's on one. With topEntropyQuantile < 1 both
  are per micro-batch (as the quantile is), and compared split as they are.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from grpo_runtime.engines import Completion
from grpo_runtime.loss import EntropyBonus, LossConfig, grpo_loss
from grpo_runtime.model import decoder_hidden_states, lm_head
from grpo_runtime.trainer import build_batch

trl = pytest.importorskip("trl")  # a dev dependency: always there in CI
from accelerate import Accelerator  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

B, P, C, V = 4, 5, 7, 61
LENGTHS = [7, 3, 5, 1]  # ragged completions (right-padded), one of a single token
EOS, PAD = V - 1, V - 2  # rows 0 and 2 end with EOS; rows 1 and 3 were cut off (truncated)


class TRLTrainer:
    """The attributes of GRPOTrainer that _compute_loss reads, and TRL's own methods."""

    _compute_loss = GRPOTrainer._compute_loss
    _get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask
    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)
    get_gamma_weights = staticmethod(GRPOTrainer.get_gamma_weights)

    def __init__(self, args: GRPOConfig, model, micro_batches: int, use_vllm: bool):
        self.args, self.model = args, model
        self.accelerator = Accelerator(cpu=True)
        self.beta, self.loss_type = args.beta, args.loss_type
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.importance_sampling_level = args.importance_sampling_level
        self.top_entropy_quantile = args.top_entropy_quantile
        self.off_policy_mask_threshold = args.off_policy_mask_threshold
        self.max_completion_length = args.max_completion_length
        self.use_vllm = use_vllm
        self.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
        self.current_gradient_accumulation_steps = micro_batches
        self.entropy_coef, self.use_adaptive_entropy = args.entropy_coef, args.use_adaptive_entropy
        self._entropy_bonus_enabled = self.entropy_coef != 0.0 or self.use_adaptive_entropy
        self._last_world_entropy, self._entropy_window_stats = math.inf, None
        self.aux_loss_enabled = False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}


def trl_sampling_ratio(args: GRPOConfig, old, sampling, mask):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the vllm_importance_sampling_ratio lines."""
    per_token_logps_diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if args.vllm_importance_sampling_mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if args.vllm_importance_sampling_mode in ["sequence_truncate", "token_truncate"]:
        return torch.clamp(ratio, min=args.vllm_importance_sampling_clip_min,
                           max=args.vllm_importance_sampling_clip_max)
    low = args.vllm_importance_sampling_clip_min if args.vllm_importance_sampling_clip_min is not None else -math.inf
    high = args.vllm_importance_sampling_clip_max if args.vllm_importance_sampling_clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), value=0.0)


def trl_mask_truncated(completion_ids_list, completion_mask, eos_and_pad):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the mask_truncated_completions lines."""
    is_truncated = torch.tensor([ids[-1] in eos_and_pad for ids in completion_ids_list]).logical_not()
    return completion_mask * (~is_truncated).unsqueeze(1).int()


def masked_truncated(x):
    """The inputs with truncated completions masked, by TRL's code and by ours (which must agree)."""
    ids = [x.completion_ids[row, : LENGTHS[row]].tolist() for row in range(B)]
    trl_mask = trl_mask_truncated(ids, x.completion_mask, [EOS, PAD])
    completions = [Completion(prompt_index=row, completion_ids=ids[row], text="", truncated=ids[row][-1] != EOS)
                   for row in range(B)]
    ours = build_batch(x.prompt_ids.tolist(), completions, PAD, torch.device("cpu"), mask_truncated=True)
    assert ours.completion_mask.equal(trl_mask.long())
    assert trl_mask.sum(-1).tolist() == [LENGTHS[0], 0, LENGTHS[2], 0]
    return SimpleNamespace(**{**vars(x), "completion_mask": trl_mask.long()})


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=V, max_position_embeddings=64, initializer_range=0.2,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, V, (B, P), generator=g)
    completion_ids = torch.randint(0, PAD, (B, C), generator=g)
    for row in (0, 2):
        completion_ids[row, LENGTHS[row] - 1] = EOS
    completion_mask = (torch.arange(C)[None] < torch.tensor(LENGTHS)[:, None]).long()
    advantages = torch.tensor([1.1, -0.8, 0.5, -1.3])
    inputs = SimpleNamespace(prompt_ids=prompt_ids, prompt_mask=torch.ones(B, P, dtype=torch.long),
                             completion_ids=completion_ids, completion_mask=completion_mask, advantages=advantages)
    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, completion_ids], 1)).logits[:, P - 1 : -1]
    return model, inputs, logits, g


def logprobs_at(logits, ids, temperature):
    return torch.log_softmax(logits / temperature, -1).gather(-1, ids[..., None]).squeeze(-1)


def make_logps(setup, temperature, seed):
    """old (spread so both clips are active), ref and sampling log-probs (with one token the sampler could
    not score: NaN) around the model's own."""
    _, x, logits, _ = setup
    g = torch.Generator().manual_seed(seed)
    logp = logprobs_at(logits, x.completion_ids, temperature)
    old = logp + 0.35 * torch.randn(B, C, generator=g)
    ref = logp + 0.3 * torch.randn(B, C, generator=g)
    sampling = logp + 0.25 * torch.randn(B, C, generator=g)
    sampling[0, 1] = float("nan")
    return old, ref, sampling


def our_config(trl_args: GRPOConfig) -> LossConfig:
    return LossConfig(
        loss_type=trl_args.loss_type, beta=trl_args.beta, epsilon=trl_args.epsilon, epsilon_high=trl_args.epsilon_high,
        temperature=trl_args.temperature, chunk_size=5, max_completion_length=trl_args.max_completion_length,
        kl_estimator="k3_ratio" if trl_args.use_bias_correction_kl else "k3",
        importance_sampling_level=trl_args.importance_sampling_level, delta=trl_args.delta,
        sampling_correction=trl_args.vllm_importance_sampling_mode,
        sampling_correction_max=trl_args.vllm_importance_sampling_clip_max,
        sampling_correction_min=trl_args.vllm_importance_sampling_clip_min,
        top_entropy_quantile=trl_args.top_entropy_quantile,
        sapo_temperature_pos=trl_args.sapo_temperature_pos, sapo_temperature_neg=trl_args.sapo_temperature_neg,
        off_policy_mask_threshold=trl_args.off_policy_mask_threshold,
        vespo_k_pos=trl_args.vespo_k_pos, vespo_lambda_pos=trl_args.vespo_lambda_pos,
        vespo_k_neg=trl_args.vespo_k_neg, vespo_lambda_neg=trl_args.vespo_lambda_neg,
    )


def grads_of(model):
    out = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def run_trl(setup, x, args, micro_batches, old, ref, sampling, trainer=None):
    """One optimizer step of TRL's loss; ``trainer`` carries TRL's adaptive-entropy state from a step before."""
    model = setup[0]
    model.zero_grad(set_to_none=True)
    add_fused_lm_head(model, temperature=args.temperature, outputs=("log_probs", "entropy"))
    trainer = trainer or TRLTrainer(args, model, micro_batches, use_vllm=sampling is not None)
    model.train()
    total = 0.0
    tokens, per_micro = loss_mask(x).sum(), []
    parts = torch.arange(B).chunk(micro_batches)
    for index, rows in enumerate(parts):
        trainer.accelerator.gradient_state._set_sync_gradients(index == len(parts) - 1)  # the step's last
        inputs = {key: getattr(x, key)[rows] for key in vars(x)}
        inputs["num_items_in_batch"] = tokens
        if old is not None:
            inputs["old_per_token_logps"] = old[rows]
        if args.beta:
            inputs["ref_per_token_logps"] = ref[rows]
        if sampling is not None:
            learner = old[rows] if old is not None else logprobs_now(setup, x, args.temperature)[rows]
            inputs["importance_sampling_ratio"] = trl_sampling_ratio(args, learner, sampling[rows],
                                                                     loss_mask(x)[rows])
            inputs["sampling_per_token_logps"] = sampling[rows]  # TRL's output with vLLM: the off-policy mask's
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        total += loss.item()
        per_micro.append((loss_mask(x)[rows].sum().item(), len(rows)))
    del model.forward  # TRL patched the instance; back to the class's forward
    metrics, trainer._metrics = trainer._metrics["train"], {"train": defaultdict(list), "eval": defaultdict(list)}
    return total, grads_of(model), metrics, per_micro, trainer


@torch.no_grad()
def logprobs_now(setup, x, temperature):
    model = setup[0]
    logits = model(torch.cat([x.prompt_ids, x.completion_ids], 1)).logits[:, P - 1 : -1]
    return logprobs_at(logits, x.completion_ids, temperature)


def loss_mask(x):
    """The tokens the loss trains on: TRL's completion_mask x tool_mask (an episode's tool results are not)."""
    return x.completion_mask * x.tool_mask if hasattr(x, "tool_mask") else x.completion_mask


def trainer_sampling(x, sampling):
    """The sampler's log-probs as the trainer hands them to the loss: the completions through build_batch, each
    with the engine's log-probs of its tokens, or (sampling None) without any; an episode's with its mask (its
    tool results' log-probs are TRL's 0.0, which neither loss reads)."""
    completions = [Completion(prompt_index=row, completion_ids=x.completion_ids[row, : LENGTHS[row]].tolist(), text="",
                              truncated=False,
                              logprobs=None if sampling is None else sampling[row, : LENGTHS[row]].tolist(),
                              mask=x.tool_mask[row, : LENGTHS[row]].tolist() if hasattr(x, "tool_mask") else None)
                   for row in range(B)]
    batch = build_batch(x.prompt_ids.tolist(), completions, PAD, torch.device("cpu"))
    if hasattr(x, "tool_mask"):  # the episodes' loss mask is build_batch's; the attention keeps every token
        assert batch.completion_mask.equal(loss_mask(x))
    return batch.sampling_logps


def run_ours(setup, x, config, micro_batches, old, ref, sampling, entropy_coef=0.0):
    model = setup[0]
    model.zero_grad(set_to_none=True)
    sampling = trainer_sampling(x, sampling)
    model.train()
    total, metrics = 0.0, defaultdict(float)
    for rows in torch.arange(B).chunk(micro_batches):
        ids = torch.cat([x.prompt_ids[rows], x.completion_ids[rows]], 1)
        attention = torch.cat([x.prompt_mask[rows], x.completion_mask[rows]], 1)
        hidden = decoder_hidden_states(model, ids, attention)[:, P - 1 : -1]
        weight, bias = lm_head(model)
        loss, m = grpo_loss(
            hidden, weight, x.completion_ids[rows], loss_mask(x)[rows], x.advantages[rows],
            old_logps=None if old is None else old[rows], ref_logps=ref[rows] if config.beta else None,
            sampling_logps=None if sampling is None else sampling[rows], config=config, bias=bias,
            num_items_in_batch=loss_mask(x).sum(), num_sequences_in_batch=B, num_micro_batches=micro_batches,
            entropy_coef=entropy_coef,
        )
        loss.backward()
        total += loss.item()
        for key, value in m.items():
            metrics[key] += value.item()
    return total, grads_of(model), metrics


def trl_step_metric(values, per_micro, per_sequence=False):
    """TRL's per-micro-batch means, weighted by the micro-batches' tokens (completions when per_sequence)."""
    weights = [seqs if per_sequence else toks for toks, seqs in per_micro]
    # a micro-batch of masked completions only has no tokens (TRL logs 0/0 = nan for it): weight 0
    return sum(v * w for v, w in zip(values, weights, strict=True) if w) / sum(weights)


GSPO_CLIP = {"epsilon": 0.02, "epsilon_high": 0.03}  # a completion's mean log-ratio moves less than a token's
CASES = {
    # name: GRPOConfig overrides (beyond the defaults below), off-policy old log-probs, sampling correction
    "grpo": ({"loss_type": "grpo"}, True, False),
    "bnpo": ({"loss_type": "bnpo"}, True, False),
    "dr_grpo": ({"loss_type": "dr_grpo"}, True, False),
    "dapo": ({"loss_type": "dapo"}, True, False),
    "cispo": ({"loss_type": "cispo", "epsilon_high": 1.2}, True, False),
    "dapo-on-policy": ({"loss_type": "dapo"}, False, False),
    "grpo-temperature": ({"loss_type": "grpo", "temperature": 0.7}, True, False),
    "dapo-plain-k3": ({"loss_type": "dapo", "use_bias_correction_kl": False}, True, False),
    "grpo-on-policy-plain-k3": ({"loss_type": "grpo", "use_bias_correction_kl": False}, False, False),
    "gspo": ({"loss_type": "grpo", "importance_sampling_level": "sequence", **GSPO_CLIP}, True, False),
    "gspo-dapo": ({"loss_type": "dapo", "importance_sampling_level": "sequence", **GSPO_CLIP}, True, False),
    "gspo-on-policy": ({"loss_type": "grpo", "importance_sampling_level": "sequence"}, False, False),
    "delta": ({"loss_type": "dapo", "delta": 1.3}, True, False),
    "dr_grpo-delta-temperature": ({"loss_type": "dr_grpo", "delta": 1.25, "temperature": 0.7}, True, False),
    "entropy-mask": ({"loss_type": "dapo", "top_entropy_quantile": 0.4}, True, False),
    "entropy-mask-grpo": ({"loss_type": "grpo", "top_entropy_quantile": 0.2}, False, False),
    "tis-token-truncate": ({"loss_type": "dapo", "vllm_importance_sampling_mode": "token_truncate",
                            "vllm_importance_sampling_clip_max": 1.2}, True, True),
    "tis-token-truncate-on-policy": ({"loss_type": "grpo", "vllm_importance_sampling_mode": "token_truncate",
                                      "vllm_importance_sampling_clip_max": 1.2}, False, True),
    "tis-token-mask": ({"loss_type": "bnpo", "vllm_importance_sampling_mode": "token_mask",
                        "vllm_importance_sampling_clip_max": 1.2, "vllm_importance_sampling_clip_min": 0.8},
                       True, True),
    "tis-sequence-truncate": ({"loss_type": "dapo", "vllm_importance_sampling_mode": "sequence_truncate",
                               "vllm_importance_sampling_clip_max": 1.5, "vllm_importance_sampling_clip_min": 0.7},
                              True, True),
    "tis-sequence-mask-on-policy": ({"loss_type": "dr_grpo", "vllm_importance_sampling_mode": "sequence_mask",
                                     "vllm_importance_sampling_clip_max": 1.5}, False, True),
    "cispo-tis-entropy": ({"loss_type": "cispo", "epsilon_high": 1.1, "top_entropy_quantile": 0.5,
                           "vllm_importance_sampling_mode": "token_truncate"}, True, True),
    "sapo": ({"loss_type": "sapo"}, True, False),
    "sapo-temperatures-tis": ({"loss_type": "sapo", "sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.6,
                               "vllm_importance_sampling_mode": "token_truncate"}, True, True),
    "luspo": ({"loss_type": "luspo", "importance_sampling_level": "sequence", **GSPO_CLIP}, True, False),
    "luspo-token-delta-entropy": ({"loss_type": "luspo", "delta": 1.3, "top_entropy_quantile": 0.5}, True, False),
    "vespo": ({"loss_type": "vespo"}, True, False),
    "vespo-on-policy": ({"loss_type": "vespo"}, False, False),
    "vespo-tis-params": ({"loss_type": "vespo", "vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.0,
                          "vespo_lambda_neg": 1.5, "vllm_importance_sampling_mode": "token_truncate",
                          "vllm_importance_sampling_clip_max": 1.2}, True, True),
    "vespo-sequence-mask-entropy": ({"loss_type": "vespo", "vllm_importance_sampling_mode": "sequence_mask",
                                     "vllm_importance_sampling_clip_max": 1.5, "top_entropy_quantile": 0.5},
                                    True, True),
    # the off-policy mask: names (their lengths seed the log-probs) and thresholds drop one completion each
    "opsm-dr_grpo": ({"loss_type": "dr_grpo", "off_policy_mask_threshold": 0.2}, True, False),
    "opsm-tis-grpo": ({"loss_type": "grpo", "off_policy_mask_threshold": 0.01,
                       "vllm_importance_sampling_mode": "token_truncate"}, True, True),
    "opsm-on-policy-gspo-tmask": ({"loss_type": "grpo", "importance_sampling_level": "sequence", **GSPO_CLIP,
                                   "off_policy_mask_threshold": 0.1, "vllm_importance_sampling_mode": "token_mask",
                                   "vllm_importance_sampling_clip_max": 1.5}, False, True),
    # without the engine's log-probs TRL's sampler is pi_old (numIterations > 1), else the current log-probs
    # detached (numIterations 1: every KL exactly 0, so even threshold 0 drops nothing)
    "opsm-pi-old-gspo": ({"loss_type": "dapo", "importance_sampling_level": "sequence", **GSPO_CLIP,
                          "off_policy_mask_threshold": 0.05}, True, False),
    "opsm-on-policy-dapo": ({"loss_type": "dapo", "off_policy_mask_threshold": 0.0}, False, False),
    "mask-truncated-grpo": ({"loss_type": "grpo", "mask_truncated_completions": True}, True, False),
    "mask-truncated-bnpo": ({"loss_type": "bnpo", "mask_truncated_completions": True}, True, False),
    "mask-truncated-dr_grpo-tis": ({"loss_type": "dr_grpo", "mask_truncated_completions": True,
                                   "vllm_importance_sampling_mode": "sequence_truncate"}, True, True),
    "mask-truncated-gspo-dapo": ({"loss_type": "dapo", "importance_sampling_level": "sequence", **GSPO_CLIP,
                                 "mask_truncated_completions": True}, False, False),
    # the entropy bonus: token by token, with the tokens coupled (GSPO), with the top-entropy tokens (per
    # micro-batch), as a penalty (a negative coefficient)
    "entropy-bonus-dapo": ({"loss_type": "dapo", "entropy_coef": 0.1}, True, False),
    "entropy-bonus-grpo-temperature": ({"loss_type": "grpo", "entropy_coef": 0.2, "temperature": 0.7}, False, False),
    "entropy-bonus-gspo-tis": ({"loss_type": "grpo", "importance_sampling_level": "sequence", **GSPO_CLIP,
                                "entropy_coef": 0.1, "vllm_importance_sampling_mode": "token_truncate"}, True, True),
    "entropy-bonus-top-entropy": ({"loss_type": "dr_grpo", "top_entropy_quantile": 0.5, "entropy_coef": 0.1},
                                  True, False),
    "entropy-penalty-cispo": ({"loss_type": "cispo", "epsilon_high": 1.2, "entropy_coef": -0.05}, True, False),
    "everything": ({"loss_type": "grpo", "importance_sampling_level": "sequence", "delta": 1.1, **GSPO_CLIP,
                    "top_entropy_quantile": 0.5, "vllm_importance_sampling_mode": "sequence_truncate",
                    "temperature": 0.7}, True, True),
}


@pytest.mark.parametrize("micro_batches", [1, 2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_gradients_and_metrics_equal_trls(setup, case, micro_batches):
    args = trl_config(CASES[case][0], micro_batches)
    x = masked_truncated(setup[1]) if args.mask_truncated_completions else setup[1]
    compare_with_trl(setup, x, case, micro_batches)


# an episode's tool results (with the template's markers around them) inside the completions: attended, not trained
TOOL_RESULTS = {0: range(2, 5), 2: range(1, 3)}  # row: completion positions (inside LENGTHS)


def episodes(x):
    tool_mask = torch.ones_like(x.completion_mask)
    for row, positions in TOOL_RESULTS.items():
        tool_mask[row, list(positions)] = 0
    return SimpleNamespace(**vars(x), tool_mask=tool_mask)


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("case", ["grpo", "dapo", "bnpo", "dr_grpo", "gspo", "tis-token-truncate",
                                  "tis-sequence-mask-on-policy", "entropy-mask", "opsm-tis-grpo"])
def test_tool_results_are_out_of_the_loss_as_in_trls(setup, case, micro_batches):
    """TRL's tool_mask (GRPOTrainer._tool_call_loop's): the tokens a tool wrote are in the sequence the model
    attends to, and out of the loss, its normalisers, the KL, the ratios, the sampling correction and the
    entropy; ours are Completion.mask through build_batch. Loss, every gradient and the metrics agree."""
    x = episodes(setup[1])
    assert 0 < loss_mask(x).sum() < x.completion_mask.sum()
    compare_with_trl(setup, x, case, micro_batches)


def compare_with_trl(setup, x, case, micro_batches):
    overrides, off_policy, correction = CASES[case]
    args = trl_config(overrides, micro_batches)
    old, ref, sampling = make_logps(setup, args.temperature, seed=len(case))
    old = old if off_policy else None
    sampling = sampling if correction else None
    if args.off_policy_mask_threshold is not None:  # TRL's own mask: the cases drop at least one completion
        now = logprobs_now(setup, x, args.temperature)
        behaviour = next(logps for logps in (sampling, old, now) if logps is not None)  # as TRL picks the sampler's
        kept = GRPOTrainer.get_off_policy_mask(x.advantages[:, None], now, behaviour, loss_mask(x),
                                               args.off_policy_mask_threshold)
        assert (0 < kept.sum() < B) if behaviour is not now else kept.sum() == B  # on-policy, no sampler: none
    # TRL's entropy bonus is per micro-batch; ours (without the top-entropy quantile) is the step's: TRL's on one
    trl_micro = 1 if args.entropy_coef and args.top_entropy_quantile == 1.0 else micro_batches
    trl_args = args if trl_micro == micro_batches else trl_config(overrides, trl_micro)
    trl_loss, trl_grads, trl_metrics, per_micro, _ = run_trl(setup, x, trl_args, trl_micro, old, ref, sampling)
    loss, grads, metrics = run_ours(setup, x, our_config(args), micro_batches, old, ref, sampling, args.entropy_coef)

    assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-7)
    for name, want in trl_grads.items():
        scale = want.abs().max().clamp(min=1e-8)
        assert (grads[name] - want).abs().max() <= 2e-5 * scale, name
    assert any(g.abs().max() > 0 for g in grads.values())
    if args.entropy_coef:  # the step's loss without the bonus: TRL logs each micro-batch's own (its share, for
        # the loss types normalised by the step's tokens), and the step's is their mean (their sum)
        values = trl_metrics["policy_loss"]
        want = sum(values) if args.loss_type in ("dapo", "cispo", "vespo") else sum(values) / len(values)
        assert metrics["policy_loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert abs(metrics["policy_loss"] - loss) > 1e-3 * abs(loss)  # the bonus is in the loss

    sequence_level = args.importance_sampling_level == "sequence"
    pairs = [("kl", "kl", False), ("entropy", "entropy", False)]
    if args.loss_type == "cispo":
        pairs.append(("clip_ratio_high", "cispo_clip_ratio", sequence_level))
    elif args.loss_type in ("sapo", "vespo"):  # no clip: TRL logs no clip ratio, ours are 0
        assert metrics["clip_ratio"] == metrics["clip_ratio_low"] == metrics["clip_ratio_high"] == 0
    else:
        pairs += [("clip_ratio_low", "clip_ratio/low_mean", sequence_level),
                  ("clip_ratio_high", "clip_ratio/high_mean", sequence_level),
                  ("clip_ratio", "clip_ratio/region_mean", sequence_level)]
    for ours_key, trl_key, per_sequence in pairs:
        want = trl_step_metric(trl_metrics[trl_key], per_micro, per_sequence)
        assert metrics[ours_key] == pytest.approx(want, rel=1e-5, abs=1e-6), ours_key
    if off_policy and args.loss_type not in ("cispo", "sapo", "vespo"):
        assert metrics["clip_ratio"] > 0  # the clips are exercised


def trl_config(overrides, micro_batches) -> GRPOConfig:
    args = GRPOConfig(
        output_dir="unused", use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=B // micro_batches,
        num_generations=2, gradient_accumulation_steps=micro_batches, max_completion_length=9,
        **{"beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.28, **overrides},
    )
    assert args.steps_per_generation == micro_batches  # TRL's dapo/cispo normaliser assumes it
    return args


@pytest.mark.parametrize("micro_batches,quantile,target", [(1, 1.0, 5.0), (2, 0.5, 5.0), (2, 1.0, 0.01)])
def test_adaptive_entropy_control_is_trls(setup, micro_batches, quantile, target):
    """TRL's use_adaptive_entropy over two optimizer steps: no bonus on the first (no entropy measured yet),
    the coefficient moved by the step's mean entropy over the tokens the bonus acts on (up below the target,
    down above it, within [min, max]), then the second step's loss and gradients with that coefficient."""
    overrides = {"loss_type": "grpo", "top_entropy_quantile": quantile, "entropy_coef": 0.05,
                 "use_adaptive_entropy": True, "entropy_target": target, "entropy_coef_delta": 0.03,
                 "entropy_coef_min": 0.03}
    args = trl_config(overrides, micro_batches)
    old, ref, _ = make_logps(setup, args.temperature, seed=3)
    x = setup[1]
    ours = EntropyBonus(coef=args.entropy_coef, adaptive=True, target=args.entropy_target,
                        delta=args.entropy_coef_delta, low=args.entropy_coef_min, high=args.entropy_coef_max)
    trainer = None
    for step in range(2):
        applied = ours.applied()
        trl_loss, trl_grads, _, _, trainer = run_trl(setup, x, args, micro_batches, old, ref, None, trainer)
        loss, grads, metrics = run_ours(setup, x, our_config(args), micro_batches, old, ref, None, applied)
        ours.update(EntropyBonus.step_entropy(metrics))
        assert loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-7), step
        for name, want in trl_grads.items():
            assert (grads[name] - want).abs().max() <= 2e-5 * want.abs().max().clamp(min=1e-8), (step, name)
        assert ours.last_entropy == pytest.approx(trainer._last_world_entropy, rel=1e-5)
        assert ours.coef == pytest.approx(trainer.entropy_coef, rel=1e-9)
    below = target > ours.last_entropy
    assert applied == (0.08 if below else 0.0)  # the second step: the coefficient after the first, or none
    assert ours.coef == pytest.approx(0.11 if below else 0.03)  # 0.05 + 2 x 0.03, or down to the minimum


def test_cases_exercise_every_option():
    """The table above covers every loss type and every option of the loss."""
    seen = defaultdict(set)
    for overrides, off_policy, correction in CASES.values():
        for key, value in overrides.items():
            seen[key].add(value)
        seen["off_policy"].add(off_policy)
        seen["correction"].add(correction)
    assert seen["loss_type"] == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"}
    assert seen["vllm_importance_sampling_mode"] == {"token_truncate", "token_mask", "sequence_truncate",
                                                     "sequence_mask"}
    assert {"importance_sampling_level", "delta", "top_entropy_quantile", "use_bias_correction_kl",
            "temperature", "mask_truncated_completions", "sapo_temperature_pos", "sapo_temperature_neg",
            "off_policy_mask_threshold", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
            "vespo_lambda_neg", "entropy_coef"} <= seen.keys()
    assert seen["off_policy"] == seen["correction"] == {True, False}


@pytest.mark.parametrize("cast", [True, False])
def test_cast_lm_head_to_fp32_log_probs_are_trls(tmp_path, cast):
    """TRL's cast_lm_head_to_fp32 on a bf16 model: TRL's own fused lm head (add_fused_lm_head, as GRPOTrainer
    patches the model) against ours (fp32_logits), both ways. The option matters: bf16 logits move log-probs
    by ~1e-2 on this tiny model, the two implementations agree to float32 rounding."""
    from trl.trainer.utils import add_fused_lm_head
    from transformers import AutoModelForCausalLM

    from grpo_runtime.loss import token_logprobs
    from tests.runtime.tiny_model import build_tiny_model

    folder = build_tiny_model(tmp_path / "model", hidden_size=64)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    add_fused_lm_head(model, temperature=0.7, cast_lm_head_to_fp32=cast)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        hidden = model.model(input_ids=ids).last_hidden_state
        ours = token_logprobs(hidden[:, :-1], model.lm_head.weight, ids[:, 1:], temperature=0.7, chunk_size=5,
                              fp32_logits=cast)
        other = token_logprobs(hidden[:, :-1], model.lm_head.weight, ids[:, 1:], temperature=0.7, chunk_size=5,
                               fp32_logits=not cast)
    assert (ours - theirs).abs().max() < 1e-5
    assert (other - theirs).abs().max() > 1e-3
