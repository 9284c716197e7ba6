"""Each image's lock against pyproject.toml (drift). Offline: nothing is resolved."""

from __future__ import annotations

import pytest

from tests.packaging.locks import IMAGE_EXTRAS, PYPROJECT, drift, lock_command, lock_extras, lock_path

# ---------------------------------------------------------------- pyproject <-> lock


@pytest.mark.parametrize("image", sorted(IMAGE_EXTRAS))
def test_the_lock_agrees_with_pyproject(image):
    problems = drift(PYPROJECT.read_text(), lock_path(image).read_text())
    assert not problems, f"requirements/{image}.lock and pyproject.toml drifted apart (README: Regenerating " \
        "the locks):\n" + "\n".join(problems)  # fmt: skip


@pytest.mark.parametrize("image", sorted(IMAGE_EXTRAS))
def test_the_lock_header_says_how_it_was_made(image):
    command = lock_command(lock_path(image).read_text())
    assert lock_extras(lock_path(image).read_text()) == IMAGE_EXTRAS[image]
    assert command.startswith("uv pip compile pyproject.toml ") and f"-o requirements/{image}.lock" in command
    for option in ("--python-version 3.12", "--python-platform x86_64-manylinux_2_", "--generate-hashes"):
        assert option in command, option


PYPROJECT_TEXT = PYPROJECT.read_text()


@pytest.mark.parametrize(
    ("image", "old", "new", "expected"),
    [
        ("runtime", '"vllm>=0.32"', '"vllm>=0.34"', "lock pins vllm==0.33.0"),  # raised past the lock
        ("runtime", '"tqdm>=4.66",', '"tqdm>=4.66", "polars>=1",', "polars>=1, not pinned"),  # added, not locked
        ("operator", '"pyyaml>=6"', '"pyyaml>=6", "rich>=13"', "dependencies: rich>=13, not pinned"),
        ("runtime", '"lupa>=2.0"', '"lupa>=2.0", "triton<3"', "dev: triton<3, but the lock pins"),  # another extra
        ("operator", '"kopf>=1.45"', '"kopf>=1.46"', "lock pins kopf=="),
        ("operator", "operator = [", "controller = [", "extra 'operator', which pyproject.toml lacks"),  # renamed
    ],
)
def test_drift_is_caught(image, old, new, expected):
    assert old in PYPROJECT_TEXT
    problems = drift(PYPROJECT_TEXT.replace(old, new, 1), lock_path(image).read_text())
    assert any(expected in p for p in problems), problems


def test_requirements_for_other_platforms_are_not_drift():
    edited = PYPROJECT_TEXT.replace('"tqdm>=4.66",', "\"tqdm>=4.66\", \"pywin32>=300; sys_platform == 'win32'\",")
    assert edited != PYPROJECT_TEXT and drift(edited, lock_path("runtime").read_text()) == []
