"""Tools a model may call during an episode: TRL's tool functions, called as TRL's GRPOTrainer calls them.

A tool is a plain function with typed, documented arguments (sync or async): its JSON schema, which the chat
template shows the model, comes from its signature and docstring (transformers' get_json_schema, as
`apply_chat_template(tools=...)` reads it). `ToolRunner.run` executes one turn's calls of many episodes at once
and gives back each call's tool message, `{"role": "tool", "name": ..., "content": ...}`, as TRL's
_tool_call_loop builds them: the result as text, or a failure as the text of `{"error": "..."}` (an exception
the tool raised, an unknown tool, a call that is not a function call), which the model sees and may recover
from. Unlike TRL, a call has a time limit: a hung tool becomes an error for the model, never a hung job (a sync
tool's thread cannot be stopped, so it is left to finish on its own).

Tools run in the job's own process, with its permissions and its network: a pod's tools can do what its pod can.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import importlib
import inspect
import math
import operator
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class ToolError(Exception):
    """A tool the spec names cannot be used (missing, not importable, no schema): exit 2, naming the field."""


# --------------------------------------------------------------------------------------------- built-in tools

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPONENT = 1000  # 10 ** 1000 is still instant; 9 ** 9 ** 9 would not be
_MAX_DIGITS = 4300  # Python's own limit on int -> str


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression and returns its value.

    Args:
        expression: The expression, with numbers, + - * / // % ** and parentheses, e.g. "(3 + 4) * 12 / 5".
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _evaluate(tree.body)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("the result is not a finite number")
        if value.is_integer():
            value = int(value)
    return str(value)


def _evaluate(node: ast.AST) -> int | float:
    """The value of an arithmetic AST node; anything but numbers and the operators above is refused (no eval)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {_MAX_EXPONENT})")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        if isinstance(value, int) and value.bit_length() > _MAX_DIGITS * 3.33:
            raise ValueError("the result is too large")
        return value
    raise ValueError(f"only numbers and + - * / // % ** are allowed, not {ast.unparse(node)!r}")


BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator}


# --------------------------------------------------------------------------------------------- loading


def check_schema(tool: Callable[..., Any], where: str) -> None:
    """ToolError naming `where` unless the chat template can describe `tool` (typed arguments, a docstring with an
    Args: section: transformers' get_json_schema)."""
    from transformers.utils import get_json_schema

    try:
        get_json_schema(tool)
    except Exception as exc:  # noqa: BLE001 (transformers raises its own TypeError/ValueError subclasses)
        raise ToolError(f"{where}: the chat template cannot describe it to the model: {exc}") from None


def import_reference(ref: str, where: str) -> Any:
    """The object `module:attribute` names (a tool, an environment class); ToolError naming `where` when the module
    cannot be imported (missing, or failing as it imports) or has no such attribute."""
    module_name, _, attribute = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 (ImportError, or the module's own code failing at import time)
        raise ToolError(f"{where}: cannot import {module_name} ({exc})") from None
    if not hasattr(module, attribute):
        raise ToolError(f"{where}: {module_name} has no {attribute}")
    return getattr(module, attribute)


def load_tools(refs: Sequence[str], field_name: str = "spec.tools") -> list[Callable[..., Any]]:
    """The functions `refs` name (`builtin:NAME` or `module:function`), each with a schema the chat template can
    show; ToolError naming `field_name[i]` otherwise."""
    tools = []
    for index, ref in enumerate(refs):
        where = f"{field_name}[{index}] ({ref})"
        if ref.startswith("builtin:"):
            name = ref.removeprefix("builtin:")
            if name not in BUILTIN_TOOLS:
                raise ToolError(f"{where}: no built-in tool {name!r} (built-in: {', '.join(sorted(BUILTIN_TOOLS))})")
            tool = BUILTIN_TOOLS[name]
        else:
            tool = import_reference(ref, where)
        if not callable(tool):
            raise ToolError(f"{where}: {type(tool).__name__} is not a function")
        check_schema(tool, where)
        tools.append(tool)
    names = [tool.__name__ for tool in tools]
    clashing = sorted({name for name in names if names.count(name) > 1})
    if clashing:
        raise ToolError(f"{field_name}: two tools named {', '.join(clashing)}; the model calls tools by name")
    return tools


# --------------------------------------------------------------------------------------------- running calls


@dataclass
class TurnCounts:
    """What a turn's calls did, for the step's tools/* metrics."""

    calls: int = 0
    failures: int = 0  # raised, unknown tool, not a function call, timed out
    timeouts: int = 0

    @staticmethod
    def total(counts: Sequence[TurnCounts]) -> TurnCounts:
        return TurnCounts(sum(c.calls for c in counts), sum(c.failures for c in counts), sum(c.timeouts for c in counts))


@dataclass
class ToolRunner:
    """Runs tool calls, every episode's at once: sync tools on a thread pool, async ones on an event loop of the
    runner's own (TRL runs them on one too), each call within `timeout` seconds."""

    tools: list[Callable[..., Any]]
    timeout: float = 30.0
    workers: int = 16
    _by_name: dict[str, Callable[..., Any]] = field(init=False)

    def __post_init__(self) -> None:
        self._by_name = {tool.__name__: tool for tool in self.tools}
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="grpo-tool")
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="grpo-tool-loop", daemon=True).start()

    def run(
        self, calls: Sequence[Sequence[dict[str, Any]]], tools: Sequence[Sequence[Callable[..., Any]] | None] | None = None
    ) -> tuple[list[list[dict[str, Any]]], list[TurnCounts]]:
        """Each episode's tool messages, one per call in its order (`calls[i]`: episode i's parsed tool_calls, in
        transformers' parse_response form), and each episode's counts of the turn. `tools[i]`: episode i's own
        tools where they are not the runner's (an environment's methods, bound to its instance)."""
        deadline = time.monotonic() + self.timeout  # every call starts now: each has `timeout` from its start
        own = [None] * len(calls) if tools is None else tools
        pending = [[self._start(call, None if mine is None else {t.__name__: t for t in mine}) for call in episode]
                   for episode, mine in zip(calls, own, strict=True)]
        messages, counts = [], []
        for started in pending:
            out, count = [], TurnCounts()
            for name, future in started:
                content, failed, timed_out = self._finish(future, deadline)
                count.calls, count.failures, count.timeouts = count.calls + 1, count.failures + failed, count.timeouts + timed_out
                out.append({"role": "tool", "name": name, "content": content})
            messages.append(out)
            counts.append(count)
        return messages, counts

    def _start(self, call: dict[str, Any], by_name: dict[str, Callable[..., Any]] | None
               ) -> tuple[str, concurrent.futures.Future | BaseException]:
        """(the tool's name, its running call, or why it could not start); by_name: the episode's tools."""
        if call.get("type") != "function":
            return call.get("name", "unknown"), ValueError(f"Unsupported tool call type: {call.get('type')}")
        function = call["function"]
        name, arguments = function["name"], function.get("arguments") or {}
        tool = (self._by_name if by_name is None else by_name).get(name)
        if tool is None:
            return name, ValueError(f"Tool {name} not found.")
        if not isinstance(arguments, dict):
            return name, ValueError(f"arguments must be an object, not {type(arguments).__name__}")
        if inspect.iscoroutinefunction(tool):
            return name, asyncio.run_coroutine_threadsafe(self._call_async(tool, arguments), self._loop)
        return name, self._pool.submit(tool, **arguments)

    async def _call_async(self, tool, arguments):
        return await tool(**arguments)

    def _finish(self, future: concurrent.futures.Future | BaseException, deadline: float) -> tuple[Any, bool, bool]:
        """(the tool message's content, failed, timed out), as TRL words them: str(result) (a list of content
        blocks as it is), or str({"error": ...})."""
        if isinstance(future, BaseException):
            return str({"error": str(future)}), True, False
        try:
            result = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            future.cancel()  # an async call is cancelled; a sync one's thread runs on, its result dropped
            return str({"error": f"the tool did not answer within {self.timeout:g} seconds"}), True, True
        except Exception as exc:  # noqa: BLE001 (whatever the user's tool raises goes back to the model)
            return str({"error": str(exc)}), True, False
        return (result if isinstance(result, list) else str(result)), False, False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
