"""How an exception is quoted in a message: its first line, with or without its type's name."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of the exception's text, or its type's name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def typed_first_line(exc: BaseException) -> str:
    """`Type: first line`, or `Type` alone when the exception has no text (where the type is the news,
    e.g. a client library's ConnectionError behind a failed upload)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def one_line(exc: BaseException, limit: int = 500) -> str:
    """The whole text on one line (for a log line where the cause sits below a heading), cut at `limit`."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
