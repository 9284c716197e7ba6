"""How exceptions are quoted in messages: one line, never a traceback or an empty ': '."""

from __future__ import annotations

from grpo_runtime.messages import first_line, one_line, typed_first_line


def test_first_line_keeps_only_the_first_line_and_names_the_type_when_empty():
    assert first_line(ValueError("bad value\n  detail\n  more")) == "bad value"
    assert first_line(ConnectionError()) == "ConnectionError"
    assert first_line(OSError("  \n")) == "OSError"


def test_typed_first_line_prefixes_the_type_and_never_ends_in_a_colon():
    assert typed_first_line(ValueError("bad value\nsecond")) == "ValueError: bad value"
    assert typed_first_line(ConnectionError()) == "ConnectionError"
    assert typed_first_line(TimeoutError("\n")) == "TimeoutError"


def test_one_line_keeps_the_cause_below_a_heading_and_is_cut():
    exc = RuntimeError("spec.generation: vLLM refuses this configuration:\n  Device string must not be empty\n")
    assert one_line(exc) == "spec.generation: vLLM refuses this configuration: Device string must not be empty"
    assert one_line(KeyError()) == "KeyError"
    long = one_line(ValueError("x" * 1000), limit=50)
    assert len(long) == 50 and long.endswith("...")
