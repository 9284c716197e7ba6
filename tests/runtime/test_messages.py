"""How exceptions are quoted in messages: one line, never a traceback or an empty ': '."""

from __future__ import annotations

from grpo_runtime.messages import first_line, typed_first_line


def test_first_line_keeps_only_the_first_line_and_names_the_type_when_empty():
    assert first_line(ValueError("bad value\n  detail\n  more")) == "bad value"
    assert first_line(ConnectionError()) == "ConnectionError"
    assert first_line(OSError("  \n")) == "OSError"


def test_typed_first_line_prefixes_the_type_and_never_ends_in_a_colon():
    assert typed_first_line(ValueError("bad value\nsecond")) == "ValueError: bad value"
    assert typed_first_line(ConnectionError()) == "ConnectionError"
    assert typed_first_line(TimeoutError("\n")) == "TimeoutError"
