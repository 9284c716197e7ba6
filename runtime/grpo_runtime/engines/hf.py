"""Sampling with transformers `generate` on the learner's own model (no copy, nothing to sync).

The batch is left-padded with an attention mask; `generate` derives position ids from the mask,
so a prompt sees the same positions and context alone or beside longer ones (greedy output is
identical either way). A stop string counts only in the generated text (as in vLLM), never
across the prompt boundary, so it is matched by our own stopping criterion rather than
transformers' `stop_strings` (which also matches a stop string straddling the prompt's end).

Each completion carries the log-prob of each of its tokens under the distribution it was drawn
from (temperature, top-k, top-p, min-p applied), for the loss's sampling correction. Without
`output_scores` (which keeps a [sequences, vocab] tensor per step, GBs for long completions): a
logits processor, which sees the scores before transformers' warpers, keeps one step's scores and,
once the next token is drawn, applies the same warpers (transformers' own classes, in generate's
order) and takes that token's log-softmax. Sampling itself is untouched.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from grpo_runtime.engines.protocol import Completion, EngineError, SamplingConfig, eos_token_ids
from grpo_runtime.fused_linear import float32_logits
from grpo_runtime.model import base_model

# spec.generation.samplingParams the hf engine understands (vLLM name -> generate() name).
HF_EXTRA_PARAMS = {"repetition_penalty": "repetition_penalty", "min_tokens": "min_new_tokens"}


def hf_sampling_kwargs(extra: dict[str, Any]) -> dict[str, Any]:
    """generate() kwargs for spec.generation.samplingParams; EngineError for any it cannot honour."""
    unknown = sorted(set(extra) - set(HF_EXTRA_PARAMS))
    if unknown:
        raise EngineError(
            f"spec.generation.samplingParams: {', '.join(unknown)} not supported by the hf engine "
            f"(supported: {', '.join(HF_EXTRA_PARAMS)}; the rest need engine: vllm)"
        )
    return {HF_EXTRA_PARAMS[key]: value for key, value in extra.items()}


class HFEngine:
    name = "hf"
    last_sync_seconds = 0.0  # generation runs on the learner's own model: nothing is pushed

    def __init__(self, policy, *, max_batch_sequences: int = 64, fp32_logits: bool = False):
        self.model = policy.model
        self.tokenizer = policy.tokenizer
        self.device = policy.device
        self.max_batch_sequences = max_batch_sequences  # sequences per generate() call
        self.fp32_logits = fp32_logits  # training.castLmHeadToFp32: sample from the logits the learner scores

    def sync(self, policy) -> None:
        """Nothing to copy: generation runs on the learner's model itself (rebound in case it changed)."""
        self.model, self.tokenizer, self.device = policy.model, policy.tokenizer, policy.device

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        if any(len(ids) == 0 for ids in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        eos_ids = eos_token_ids(self.model, self.tokenizer, self.name)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_ids[0]
        kwargs = self._generate_kwargs(sampling, eos_ids, pad_id)
        per_call = max(1, self.max_batch_sequences // sampling.n)

        completions: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        head = base_model(self.model).get_output_embeddings()
        # With float32 logits in the learner, so in the sampler: the hf engine samples the learner's own policy
        hook = head.register_forward_hook(_float32_head) if self.fp32_logits and head.weight.dtype != torch.float32 else None
        try:
            with torch.no_grad(), _seeded(sampling.seed, self.device):
                for start in range(0, len(prompt_ids), per_call):
                    # Each prompt repeated n times (grouped); greedy generate has no num_return_sequences > 1.
                    rows = [ids for ids in prompt_ids[start : start + per_call] for _ in range(sampling.n)]
                    input_ids, attention_mask = _left_pad(rows, pad_id, self.device)
                    stopping = StoppingCriteriaList()
                    if sampling.stop:
                        stopping.append(_StopStrings(self.tokenizer, sampling.stop, input_ids.shape[1]))
                    recorder = _SampledLogprobs(sampling)
                    output = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        stopping_criteria=stopping,
                        logits_processor=LogitsProcessorList([recorder]),
                        **kwargs,
                    )
                    generated = output[:, input_ids.shape[1] :]
                    logprobs = recorder.finish(generated).tolist()
                    for row, ids in enumerate(generated.tolist()):
                        completion = self._completion(start + row // sampling.n, ids, set(eos_ids), sampling)
                        completion.logprobs = logprobs[row][: len(completion.completion_ids)]
                        completions.append(completion)
        finally:
            self.model.train(was_training)
            if hook is not None:
                hook.remove()
        return completions

    def _generate_kwargs(self, sampling: SamplingConfig, eos_ids: list[int], pad_id: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "eos_token_id": eos_ids,
            "pad_token_id": pad_id,
            "use_cache": True,  # training turns it off in the config; sampling wants the KV cache
            "repetition_penalty": 1.0,  # exactly the distribution asked for, not the model's defaults
        }
        if sampling.temperature <= 0:
            kwargs["do_sample"] = False
        else:
            kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or 0,  # 0 disables top-k (transformers' default would be 50)
                min_p=sampling.min_p,
                # no other warper from the model's generation config: exactly the distribution asked for
                typical_p=1.0,
                epsilon_cutoff=0.0,
                eta_cutoff=0.0,
            )
        kwargs.update(hf_sampling_kwargs(sampling.extra))
        return kwargs

    def _completion(self, prompt_index: int, ids: list[int], eos: set[int], sampling: SamplingConfig) -> Completion:
        ended = False
        for i, token in enumerate(ids):
            if token in eos:
                ids, ended = ids[: i + 1], True
                break
        if sampling.stop:
            cut = _first_stop(self.tokenizer, ids, sampling.stop)
            if cut is not None:
                ids, ended = ids[:cut], True
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(prompt_index=prompt_index, completion_ids=ids, text=text, truncated=not ended)


class _SampledLogprobs(LogitsProcessor):
    """Records log p(token) of each drawn token under the distribution generate drew it from.

    Called once per step with the scores after transformers' logits processors (repetition penalty,
    min_new_tokens) and before its warpers; the token of step k is known at step k + 1 (the last of
    input_ids) or, for the last step, in the output. The warpers are those generate appends for
    these settings, in its order (GenerationMixin._get_logits_processor): temperature, top-k, top-p, min-p.
    """

    def __init__(self, sampling: SamplingConfig):
        self.warpers = LogitsProcessorList()
        if sampling.temperature > 0:
            if sampling.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                self.warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
            if sampling.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
            if sampling.min_p is not None:
                self.warpers.append(MinPLogitsWarper(min_p=sampling.min_p))
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # a step's (input_ids, scores), no token yet
        self.logprobs: list[torch.Tensor] = []  # [rows] per generated position

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._record(input_ids[:, -1])
        self.pending = (input_ids, scores.clone())
        return scores

    def _record(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            input_ids, scores = self.pending
            logp = torch.log_softmax(self.warpers(input_ids, scores).float(), -1)
            self.logprobs.append(logp.gather(1, tokens[:, None]).squeeze(1))
            self.pending = None

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """[rows, generated tokens] log-probs (generate may have dropped a last step it ran: not recorded)."""
        if self.pending is not None and generated.shape[1] > len(self.logprobs):
            self._record(generated[:, len(self.logprobs)])
        self.pending = None
        out = torch.full(generated.shape, float("nan"))
        for position, logp in enumerate(self.logprobs[: generated.shape[1]]):
            out[:, position] = logp.cpu()
        return out


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Sample from `seed` without disturbing the global RNG streams (the trainer's own)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _first_stop(tokenizer, ids: list[int], stops: tuple[str, ...]) -> int | None:
    """Length of the shortest prefix of `ids` whose text contains a stop string, or None."""

    def hit(length: int) -> bool:
        text = tokenizer.decode(ids[:length], skip_special_tokens=True)
        return any(stop in text for stop in stops)

    if not ids or not hit(len(ids)):
        return None
    low, high = 1, len(ids)  # hit(high) holds; find the smallest such length
    while low < high:
        middle = (low + high) // 2
        if hit(middle):
            high = middle
        else:
            low = middle + 1
    return high


class _StopStrings(StoppingCriteria):
    """Marks a row done once its generated text (not the prompt) contains a stop string.

    Only the last few tokens are decoded each step: a stop string of b bytes spans at most b
    tokens, plus one token of context so tokenizers that drop a leading space still show it.
    The exact cut is made afterwards by `_first_stop` on the whole completion.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_width: int):
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_width = prompt_width
        self.window = max(len(stop.encode()) for stop in stops) + 2

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.prompt_width :]
        tails = generated[:, -self.window :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _float32_head(module, args, output):
    """Forward hook on the lm_head: its logits in float32 (fused_linear.float32_logits), instead of its dtype's."""
    return float32_logits(args[0], module.weight, getattr(module, "bias", None))
