"""Optional Triton kernels (the GPU fast path). ``available()`` says whether they can be used."""

from __future__ import annotations


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
