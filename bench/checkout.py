"""This checkout, as the bench scripts and the processes they start see it.

A bench script may run from a clone that pip never installed (the GPU machine unpacks a bundle and
puts it on PYTHONPATH), and a measurement must run this checkout's code, not an installed copy's:
so a child process gets this checkout's folders first on its PYTHONPATH, then whatever it inherited.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(folders: tuple[str, ...] = ("runtime", "operator"), **extra: str) -> dict[str, str]:
    """os.environ for a child process: REPO's `folders` ("." for the root) ahead of the inherited
    PYTHONPATH, and the `extra` variables set."""
    path = [str(REPO / folder) for folder in folders] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}
