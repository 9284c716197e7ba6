"""Rewards the episode tests train with: they read the episode as TRL gives it (the completion's messages)."""


def tool_results(prompts, completions, **kwargs):
    """How many tool results the episode holds."""
    return [float(sum(message["role"] == "tool" for message in completion)) for completion in completions]


def answered_42(prompts, completions, **kwargs):
    """1 when a tool said 42."""
    return [float(any(m["role"] == "tool" and m["content"] == "42" for m in completion)) for completion in completions]
