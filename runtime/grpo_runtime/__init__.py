"""grpo_runtime: the GRPO learner that runs inside a GRPOJob pod, or locally via `grpo train`."""

__version__ = "0.1.0"
