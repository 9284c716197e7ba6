"""What every rollout engine is and returns: the Engine protocol, the sampling it is asked for
(SamplingConfig, from a GenerationSpec by sampling_config), the completions it gives back, and its errors.
The engines (hf.py, vllm.py) import these from here; grpo_runtime.engines re-exports them and picks one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class EngineError(Exception):
    """The generation section cannot be honoured (engine missing, unsupported parameter): exit 2."""


class EngineResourceError(RuntimeError):
    """The engine ran out of something the machine may have next time (GPU memory at start or at
    wake, a driver or compiler failure): exit 1, retried from the last checkpoint. The message
    names the spec knob that makes it fit."""


@dataclass(frozen=True)
class SamplingConfig:
    n: int  # completions per prompt
    max_tokens: int
    temperature: float = 1.0  # <= 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    stop: tuple[str, ...] = ()  # strings that end a completion (kept in it)
    seed: int | None = None  # None: draw from the global RNG
    extra: dict[str, Any] = field(default_factory=dict)  # spec.generation.samplingParams
    # the index of the call's first prompt among the step's (a rank generates a share of them): seeds are keyed by
    # the step's prompt index, so a prompt's samples are the same whichever rank, or batch, draws them
    first_prompt: int = 0
    # each prompt's key for its seed, where the prompts are not the step's consecutive ones (an episode's next turn:
    # its episode's index); None: first_prompt + position
    prompt_keys: tuple[int, ...] | None = None

    def prompt_key(self, position: int) -> int:
        """The seed key of the call's `position`-th prompt."""
        return self.prompt_keys[position] if self.prompt_keys is not None else self.first_prompt + position


@dataclass
class Completion:
    prompt_index: int
    completion_ids: list[int]  # ends with EOS or the token completing a stop string, unless truncated
    text: str  # completion_ids decoded, special tokens skipped
    truncated: bool  # hit max_tokens without EOS or a stop string
    # log-prob of each completion token under the distribution it was sampled from (after temperature and
    # top-k/top-p/min-p), as the engine computed it; None when the engine gives none. The loss's sampling
    # correction compares it with the learner's.
    logprobs: list[float] | None = None
    # 1 for each token the model wrote, 0 for one put into the episode for it (a tool's result, the chat template's
    # turn markers around it): those are attended to but never trained on. None: the model wrote every token.
    mask: list[int] | None = None
    episode: Any = None  # grpo_runtime.episodes.Episode of a job with tools: the messages and the calls made
    # the prompt it continued where that is not its row's own (an environment's observation and tools in it)
    prompt_ids: list[int] | None = None

    @property
    def written(self) -> int:
        """Tokens the model wrote (an episode's tool results are not its), as TRL counts completion lengths."""
        return len(self.completion_ids) if self.mask is None else sum(self.mask)


class Engine(Protocol):
    name: str
    # seconds the last push of the learner's weights took (0 where generation runs on the learner's own
    # model); a sleeping engine pushes at its next wake, so a step reads it after generating
    last_sync_seconds: float

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """len(prompt_ids) * n completions, grouped: all n of prompt 0, then prompt 1, ..."""
        ...

    def sync(self, policy) -> None:
        """Make the engine sample from the learner's current weights."""
        ...

    def sleep(self) -> None:
        """Release what generation holds (KV cache, weights) while the learner trains."""
        ...

    def wake(self) -> None:
        """Take it back before the next rollout."""
        ...


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index` of a call seeded `seed`; its n samples are seeded seed, seed + 1, ...,
    seed + n - 1 (vLLM's rule for a request's n samples, which the hf engine follows). Hashed seeds keep every
    (prompt, sample) apart, where consecutive ones (seed + index) would give prompt i+1's sample j the
    generator of prompt i's sample j+1. Depends on (seed, index) only: independent of batching, reproducible."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(2))  # below 2**62: room for + n under vLLM's int64


def eos_token_ids(model, tokenizer, engine: str) -> list[int]:
    """The tokens that end a completion: the generation config's EOS and the tokenizer's, deduplicated."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for token in source if isinstance(source, list) else [source]:
            if token is not None and token not in ids:
                ids.append(token)
    if not ids:
        raise EngineError(f"spec.model.name: the tokenizer has no EOS token; the {engine} engine needs one")
    return ids


def sampling_config(generation_spec, *, seed: int | None = None, n: int | None = None) -> SamplingConfig:
    """The SamplingConfig a GenerationSpec describes."""
    return SamplingConfig(
        n=n if n is not None else generation_spec.num_generations,
        max_tokens=generation_spec.max_completion_length,
        temperature=generation_spec.temperature,
        top_p=generation_spec.top_p,
        top_k=generation_spec.top_k,
        min_p=generation_spec.min_p,
        stop=tuple(generation_spec.stop),
        seed=seed,
        extra=dict(generation_spec.sampling_params),
    )
