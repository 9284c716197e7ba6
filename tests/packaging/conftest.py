"""Fixtures of the packaging tests: the helm and kubectl binaries, and rendering the chart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.packaging.helpers import CHART, documents, run, tool


@pytest.fixture(scope="session")
def helm() -> Path:
    return tool("helm")


@pytest.fixture(scope="session")
def kubectl() -> Path:
    return tool("kubectl")


@pytest.fixture(scope="session")
def render(helm: Path) -> Callable[..., list[dict[str, Any]]]:
    """render(*helm-args) -> the manifests `helm template` prints (CRDs included), cached."""
    cache: dict[tuple[str, ...], list[dict[str, Any]]] = {}

    def _render(*args: str) -> list[dict[str, Any]]:
        if args not in cache:
            result = run([helm, "template", "grpo", CHART, "--namespace", "grpo-system", "--include-crds", *args])
            assert result.returncode == 0, result.stderr
            cache[args] = documents(result.stdout)
        return cache[args]

    return _render
