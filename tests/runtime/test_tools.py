"""Tools for episodes (grpo_runtime.tools): loading TRL-style tool functions, the built-in calculator, and calling
them as TRL's _tool_call_loop does (its tool messages, its error texts), concurrently and within a time limit."""

from __future__ import annotations

import asyncio
import threading

import pytest

from grpo_runtime.tools import ToolError, ToolRunner, TurnCounts, calculator, load_tools

# ----------------------------------------------------------------------------------------- tools for the tests


def multiply(a: int, b: int) -> int:
    """Multiplies two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


async def shout(text: str) -> str:
    """Upper-cases a text, asynchronously.

    Args:
        text: The text.
    """
    await asyncio.sleep(0)
    return text.upper()


def fails(reason: str) -> str:
    """Always raises.

    Args:
        reason: What it raises with.
    """
    raise RuntimeError(reason)


MEET = threading.Barrier(2, timeout=60)  # two calls that only return once both are running


def meet(tag: str) -> str:
    """Waits for another call of itself.

    Args:
        tag: Returned as it is.
    """
    MEET.wait()
    return tag


NEVER = threading.Event()


def hangs(tag: str) -> str:
    """Never answers (until the test lets it).

    Args:
        tag: Unused.
    """
    NEVER.wait()
    return tag


def undocumented(a, b):
    return a + b


def call(name: str, **arguments) -> dict:
    """A tool call as transformers' parse_response gives it."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


HERE = __name__

# ----------------------------------------------------------------------------------------- the calculator


@pytest.mark.parametrize("expression,value", [
    ("3 + 4 * 2", "11"), ("(3 + 4) * 2", "14"), ("7 / 2", "3.5"), ("8 / 2", "4"), ("7 // 2", "3"), ("-2 ** 3", "-8"),
    ("2 ** 10 % 1000", "24"), (" 1.5 * 4 ", "6"), ("10 - -3", "13"),
])
def test_the_calculator_evaluates_arithmetic(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression,why", [
    ("__import__('os').system('true')", "only numbers"), ("x + 1", "only numbers"), ("(1).real", "only numbers"),
    ("[1, 2]", "only numbers"), ("1 / 0", "division by zero"), ("9 ** 9 ** 9", "too large"),
    ("2 +", "not an arithmetic expression"), ("'a' * 3", "only numbers"), ("1e308 * 10", "not a finite number"),
])
def test_the_calculator_refuses_anything_else(expression, why):
    with pytest.raises(ValueError, match=why):
        calculator(expression)


# ----------------------------------------------------------------------------------------- loading


def test_tools_load_by_reference_with_their_schemas():
    from transformers.utils import get_json_schema

    tools = load_tools(["builtin:calculator", f"{HERE}:multiply", f"{HERE}:shout"])
    assert tools == [calculator, multiply, shout]
    assert get_json_schema(multiply)["function"]["parameters"]["properties"]["a"] == {
        "type": "integer", "description": "The first factor."}


@pytest.mark.parametrize("refs,message", [
    (["builtin:abacus"], r"spec.tools\[0\] \(builtin:abacus\): no built-in tool 'abacus' \(built-in: calculator\)"),
    (["no_such_module_xyz:f"], r"spec.tools\[0\] \(no_such_module_xyz:f\): cannot import no_such_module_xyz"),
    ([f"{HERE}:multiply", f"{HERE}:nothing"], rf"spec.tools\[1\] \({HERE}:nothing\): {HERE} has no nothing"),
    ([f"{HERE}:HERE"], r"spec.tools\[0\] .*: str is not a function"),
    ([f"{HERE}:undocumented"], r"spec.tools\[0\] .*: the chat template cannot describe it to the model"),
    ([f"{HERE}:multiply", f"{HERE}:multiply"], r"spec.tools: two tools named multiply"),
])
def test_a_tool_that_cannot_be_used_is_refused_naming_the_field(refs, message):
    with pytest.raises(ToolError, match=message):
        load_tools(refs)


# ----------------------------------------------------------------------------------------- calling


@pytest.fixture
def runner():
    NEVER.clear()
    runner = ToolRunner([multiply, shout, fails, meet, hangs, calculator], timeout=5)
    yield runner
    NEVER.set()  # the hung call's thread may end now
    runner.close()


def test_calls_come_back_as_trls_tool_messages_in_order(runner):
    messages, counts = runner.run([
        [call("multiply", a=6, b=7), call("shout", text="hi")],
        [],
        [call("calculator", expression="2 ** 5")],
    ])
    assert messages == [
        [{"role": "tool", "name": "multiply", "content": "42"}, {"role": "tool", "name": "shout", "content": "HI"}],
        [],
        [{"role": "tool", "name": "calculator", "content": "32"}],
    ]
    assert [(c.calls, c.failures) for c in counts] == [(2, 0), (0, 0), (1, 0)]


def test_a_failing_call_is_an_error_the_model_sees_never_the_job_s(runner):
    messages, counts = runner.run([[
        call("fails", reason="the grader fell over"),
        call("nope"),
        {"type": "retrieval", "name": "search"},
        call("calculator", expression="1 / 0"),
        call("multiply", a=2),  # a missing argument
    ]])
    contents = [m["content"] for m in messages[0]]
    assert contents[:4] == [  # TRL's words: str({"error": str(exception)})
        "{'error': 'the grader fell over'}",
        "{'error': 'Tool nope not found.'}",
        "{'error': 'Unsupported tool call type: retrieval'}",
        "{'error': 'division by zero'}",
    ]
    assert contents[4].startswith("{'error': ") and "b" in contents[4]
    assert [m["name"] for m in messages[0]] == ["fails", "nope", "search", "calculator", "multiply"]
    total = TurnCounts.total(counts)
    assert (total.calls, total.failures, total.timeouts) == (5, 5, 0)


def test_calls_run_at_the_same_time_and_a_hung_one_times_out(runner):
    """Two calls that each wait for the other finish (they run concurrently, across episodes); a call that never
    answers becomes an error after the runner's timeout, counted as a timeout."""
    messages, counts = runner.run([[call("meet", tag="a")], [call("hangs", tag="x"), call("meet", tag="b")]])
    assert messages[0][0]["content"] == "a" and messages[1][1]["content"] == "b"
    assert messages[1][0]["content"] == "{'error': 'the tool did not answer within 5 seconds'}"
    assert [(c.calls, c.failures, c.timeouts) for c in counts] == [(1, 0, 0), (2, 1, 1)]
