"""Helpers of the packaging tests: paths, the helm/kubectl binaries, running and parsing.

helm (v4) and kubectl (v1.33) are the binaries `python tests/tools/fetch_k8s_binaries.py` puts
in .tools/bin/. The tests that need them fail, never skip, when they are missing: a green run
must mean the chart was really rendered and linted.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".tools" / "bin"
CHART = REPO / "charts" / "grpo-operator"
KUBERNETES_VERSION = "1.33"  # the schemas manifests are validated against (kubectl's version)


def tool(name: str) -> Path:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `python tests/tools/fetch_k8s_binaries.py` (README set-up)")
    return path


def run(args: list[Any], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, timeout=120, **kwargs)


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]
