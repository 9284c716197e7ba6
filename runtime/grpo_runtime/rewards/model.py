"""A reward model as a reward: TRL's reward_funcs given a model id. A sequence-classification model with
one output scores each prompt + completion, as TRL 1.16's GRPOTrainer._calculate_rewards does it (checked
against those lines in tests/runtime/test_reward_model.py): text prompts are joined to their completions,
chat messages go through the reward model's own chat template; right padding, no added special tokens,
the first logit."""

from __future__ import annotations

from typing import Any

import torch

from grpo_runtime.data import is_conversational
from grpo_runtime.messages import first_line
from grpo_runtime.rewards.errors import RewardError


class RewardModel:
    """Callable like any reward: fn(prompts, completions, **columns) -> list[float]. Loaded on the job's
    device (bfloat16 on CUDA, float32 elsewhere) when constructed, so a wrong id fails before training."""

    def __init__(self, source: str, *, where: str, revision: str | None = None, batch_size: int = 8,
                 chat_template_kwargs: dict[str, Any] | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from grpo_runtime.device import job_device

        if not isinstance(batch_size, int) or batch_size < 1:
            raise RewardError(f"{where}: args.batchSize must be a whole number >= 1, got {batch_size!r}")
        self.device = job_device()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, revision=revision,
                                                                       dtype=dtype)
        except Exception as exc:  # OSError (no such model, refused token), ValueError (not a classifier), ...
            raise RewardError(f"{where}: cannot load reward model {source!r} ({first_line(exc)})") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # the model scores the last token that is not padding: it must know which id pads
        model.config.get_text_config().pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.chat_template_kwargs = chat_template_kwargs or {}

    def texts(self, prompts: list[Any], completions: list[Any]) -> list[str]:
        if is_conversational(prompts[0]):
            return [self.tokenizer.apply_chat_template(p + c, tokenize=False, **self.chat_template_kwargs)
                    for p, c in zip(prompts, completions, strict=True)]
        return [p + c for p, c in zip(prompts, completions, strict=True)]

    @torch.inference_mode()
    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        texts = self.texts(prompts, completions)
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(text=texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                    padding_side="right", add_special_tokens=False).to(self.device)
            scores += self.model(**inputs).logits[:, 0].float().tolist()
        return scores
