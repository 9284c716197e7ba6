"""Sampling with transformers `generate` on the learner's own model (no copy, nothing to sync).

The batch is left-padded with an attention mask; `generate` derives position ids from the mask,
so a prompt sees the same positions and context alone or beside longer ones (greedy output is
identical either way). A stop string counts only in the generated text (as in vLLM), never
across the prompt boundary, so it is matched by our own stopping criterion rather than
transformers' `stop_strings` (which also matches a stop string straddling the prompt's end).

Sampling is ours, on top of greedy `generate`: a logits processor applies transformers' own warpers
(temperature, top-k, top-p, min-p, in generate's order) to the scores after its processors (repetition
penalty, min_new_tokens), draws each row's token from that row's own torch.Generator, keeps the token's
log-prob (for the loss's sampling correction, without `output_scores`' [sequences, vocab] per step) and
leaves the drawn token as the only choice for greedy search. A row's generator is seeded by its
(prompt, sample) as vLLM seeds a request's samples (protocol.prompt_seed): a prompt's completions are
the same in any batch, with any neighbours, on whichever rank of a data-parallel job draws them.
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

from grpo_runtime.engines.protocol import Completion, EngineError, SamplingConfig, eos_token_ids, prompt_seed
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
        seeds = row_seeds(sampling, len(prompt_ids))
        try:
            with torch.no_grad(), _rng_untouched(self.device):  # generate's own draws leave the trainer's stream alone
                for start in range(0, len(prompt_ids), per_call):
                    # Each prompt repeated n times (grouped); greedy generate has no num_return_sequences > 1.
                    rows = [ids for ids in prompt_ids[start : start + per_call] for _ in range(sampling.n)]
                    input_ids, attention_mask = _left_pad(rows, pad_id, self.device)
                    stopping = StoppingCriteriaList()
                    if sampling.stop:
                        stopping.append(_StopStrings(self.tokenizer, sampling.stop, input_ids.shape[1]))
                    sampler = _RowSampler(sampling, seeds[start * sampling.n : start * sampling.n + len(rows)], self.device)
                    output = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        stopping_criteria=stopping,
                        logits_processor=LogitsProcessorList([sampler]),
                        **kwargs,
                    )
                    generated = output[:, input_ids.shape[1] :]
                    logprobs = sampler.finish(generated).tolist()
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
        # greedy search over what _RowSampler leaves: the drawing is its own (no warper of the model's generation config)
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
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


def row_seeds(sampling: SamplingConfig, prompts: int) -> list[int]:
    """The generator seed of each row (prompt-major, n samples each): vLLM's per-request rule, keyed by the
    step's prompt index; unseeded calls draw theirs from the global stream."""
    if sampling.seed is None:
        return torch.randint(0, 2**62, (prompts * sampling.n,)).tolist()
    return [prompt_seed(sampling.seed, sampling.prompt_key(p)) + j for p in range(prompts) for j in range(sampling.n)]


class _RowSampler(LogitsProcessor):
    """Draws each row's next token from the distribution asked for, with the row's own generator, records
    its log-prob, and returns scores where it is the only finite one (greedy search then takes it).

    Called once per step with the scores after transformers' logits processors (repetition penalty,
    min_new_tokens); the warpers are those generate would append for these settings, in its order
    (GenerationMixin._get_logits_processor): temperature, top-k, top-p, min-p. Greedy (temperature <= 0): the
    argmax, and the log-prob under the unwarped distribution."""

    def __init__(self, sampling: SamplingConfig, seeds: list[int], device: torch.device):
        self.greedy = sampling.temperature <= 0
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            if sampling.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                self.warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
            if sampling.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
            if sampling.min_p is not None:
                self.warpers.append(MinPLogitsWarper(min_p=sampling.min_p))
        self.generators = [] if self.greedy else [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.logprobs: list[torch.Tensor] = []  # [rows] per generated position

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.warpers(input_ids, scores).float(), -1)
        if self.greedy:
            tokens = logp.argmax(-1)
        else:
            probs = logp.exp()
            tokens = torch.cat([torch.multinomial(probs[row], 1, generator=g) for row, g in enumerate(self.generators)])
        self.logprobs.append(logp.gather(1, tokens[:, None]).squeeze(1))
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """[rows, generated tokens] log-probs (NaN past a row's end: generate pads finished rows)."""
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
def _rng_untouched(device: torch.device):
    """generate's own draws (none that matter: every choice is _RowSampler's) leave the global streams as they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
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
