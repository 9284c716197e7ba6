"""A reward written for TRL that uses what TRL gives a reward besides the columns: trainer_state, log_metric and
log_extra (TRL 1.16's GRPOTrainer._calculate_rewards), for the trainer tests."""


def progress_shaped(prompts, completions, trainer_state, log_metric, log_extra, **kwargs):
    """Scores like a length reward, shaped by training progress, and logs what it saw. The trainer tests' prompts
    go through the chat template, so each completion is an assistant message, as TRL gives it."""
    texts = [completion[0]["content"] for completion in completions]
    progress = trainer_state.global_step / trainer_state.max_steps
    log_metric("shaping/progress", progress)
    log_metric("shaping/epoch", trainer_state.epoch)
    log_extra("chars", [len(text) for text in texts])
    return [float(len(text) % 7) * (1.0 - progress) for text in texts]
