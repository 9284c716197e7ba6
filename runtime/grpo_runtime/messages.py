"""How an exception is quoted in a message that names a spec field: its first line."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of the exception's text, or its type's name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
