"""grpo_operator: the kopf operator that turns GRPOJob resources into GPU training pods, one per node."""
