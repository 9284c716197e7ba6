"""Environments (spec.environment): TRL's environment_factory, an episode's own stateful world.

An environment is a class whose instances TRL's GRPOTrainer creates once and resets for every rollout: `reset(**row)`
(the dataset row's columns) may return an observation, appended to the prompt's last message; its public
methods are the rollout's tools (beside spec.tools), bound to that instance, so a call acts on that rollout's
state; an optional `get_reward()` scores the rollout, as a reward named after the class (weight 1), and every
reward gets the rollouts' instances as `environments=`. One class for every row (`factory`), or one per name
chosen by a dataset column (`factories`, `column`), as TRL's dict form. The same classes run unchanged here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from grpo_runtime.tools import ToolError, check_schema, import_reference

HIDDEN = ("reset", "get_reward")  # an environment's methods that are not tools


def tool_methods(instance: Any) -> list[Callable[..., Any]]:
    """An environment's tools: its public methods but reset and get_reward, bound to the instance (listed on its
    class, as TRL does, so properties are not evaluated)."""
    return [getattr(instance, name) for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
            if name not in HIDDEN and not name.startswith("_")]


class Environments:
    """The job's environment classes, a pool of instances per class (created once, reset for each rollout)."""

    def __init__(self, spec, standalone: list[Callable[..., Any]]):
        self.spec, self.standalone = spec, standalone
        if spec.factory is not None:
            self.factories = {None: self._factory(spec.factory, "spec.environment.factory")}
        else:
            self.factories = {name: self._factory(ref, f"spec.environment.factories.{name}")
                              for name, ref in spec.factories.items()}
        self.pool: dict[str | None, list[Any]] = {}
        self.rewarded: list[type] = []  # classes with get_reward, in the order first seen: one reward each
        for name, factory in self.factories.items():
            where = "spec.environment.factory" if name is None else f"spec.environment.factories.{name}"
            instance = factory()
            if not callable(getattr(instance, "reset", None)):
                raise ToolError(f"{where}: {type(instance).__name__} has no reset(); an environment needs one")
            for method in tool_methods(instance):
                check_schema(method, f"{where}: method {method.__name__}")
            if callable(getattr(instance, "get_reward", None)) and type(instance) not in self.rewarded:
                self.rewarded.append(type(instance))
            self.pool[name] = [instance]

    def _factory(self, ref: str, where: str) -> Callable[[], Any]:
        factory = import_reference(ref, f"{where} ({ref})")
        if not callable(factory):
            raise ToolError(f"{where} ({ref}): {type(factory).__name__} is not a class or factory")
        args = dict(self.spec.args)
        return (lambda: factory(**args)) if args else factory

    def name_of(self, row: dict[str, Any]) -> str | None:
        """The environment a dataset row selects (None: the single one)."""
        if None in self.factories:
            return None
        name = row.get(self.spec.column)
        if name not in self.factories:
            raise ToolError(f"spec.environment.column: a row has {self.spec.column}={name!r}, not one of "
                            f"{', '.join(map(repr, self.factories))}")
        return name

    def take(self, rows: list[dict[str, Any]]) -> list[Any]:
        """An instance for each rollout (its row), reset with the row's columns; the pool grows only when a step
        needs more instances of a class than it made before."""
        handed: dict[str | None, int] = {}
        instances = []
        for row in rows:
            name = self.name_of(row)
            index = handed.get(name, 0)
            if index == len(self.pool[name]):
                self.pool[name].append(self.factories[name]())
            handed[name] = index + 1
            instances.append(self.pool[name][index])
        return instances

    def reset(self, instance: Any, row: dict[str, Any]) -> Any:
        """reset(**row) (without the column that chose the class), its observation or None."""
        kwargs = {k: v for k, v in row.items() if k != self.spec.column} if None not in self.factories else dict(row)
        return instance.reset(**kwargs)

    def tools_of(self, instance: Any) -> list[Callable[..., Any]]:
        return self.standalone + tool_methods(instance)

    def reward_functions(self) -> list[tuple[str, Callable[..., Any]]]:
        """(class name, reward function) of each class with get_reward: it scores the rollouts of exactly that class
        (None for the others), sync or async as get_reward is."""
        out = []
        for cls in self.rewarded:
            if inspect.iscoroutinefunction(cls.get_reward):

                async def reward(environments, _cls=cls, **kwargs):
                    return [await e.get_reward() if type(e) is _cls else None for e in environments]
            else:

                def reward(environments, _cls=cls, **kwargs):
                    return [e.get_reward() if type(e) is _cls else None for e in environments]

            out.append((cls.__name__, reward))
        return out


def with_observation(messages: list[dict[str, Any]], observation: Any) -> list[dict[str, Any]]:
    """The chat with reset()'s observation appended to its last message (TRL's rule), the chat left as it was."""
    if observation is None:
        return messages
    content = messages[-1]["content"]
    if isinstance(observation, list) and isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if isinstance(observation, str) and isinstance(content, list):
        observation = [{"type": "text", "text": observation}]
    return messages[:-1] + [{**messages[-1], "content": content + observation}]
