"""grpo_operator: the kopf operator that turns GRPOJob resources into single-GPU training pods."""
