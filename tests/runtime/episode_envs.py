"""TRL-style environment classes the episode tests run (environment_factory): reset, tools as methods, get_reward."""

from grpo_runtime.tools import calculator as evaluate


class Abacus:
    """Counts the calculations asked of it; rewarded by how many it made (so each rollout must have its own)."""

    made = 0  # instances created, over the whole process: the pool reuses them

    def __init__(self, greeting: str = "Use the abacus."):
        Abacus.made += 1
        self.greeting = greeting
        self.calls = 0

    def reset(self, **row) -> str:
        self.calls = 0
        return " " + self.greeting

    def calculator(self, expression: str) -> str:
        """Evaluates an arithmetic expression on the abacus.

        Args:
            expression: The expression, e.g. "6*7".
        """
        self.calls += 1
        return evaluate(expression)

    def get_reward(self) -> float:
        return float(self.calls)


class NoReset:
    def calculator(self, expression: str) -> str:
        """Evaluates.

        Args:
            expression: The expression.
        """
        return expression
