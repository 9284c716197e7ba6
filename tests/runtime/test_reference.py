"""docs/reference.md: generated from the pydantic spec (`grpo docs`), checked in, never stale."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from grpo_runtime.cli import main as grpo
from grpo_runtime.reference import reference_markdown
from grpo_runtime.spec import GRPOJobSpec, Section

CHECKED_IN = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def test_checked_in_reference_is_what_grpo_docs_prints():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert grpo(["docs"]) == 0
    assert out.getvalue() == CHECKED_IN.read_text(), (
        "docs/reference.md is stale: regenerate it with `grpo docs > docs/reference.md`"
    )


def leaves(annotation) -> set:
    """The classes inside an annotation: X of `X`, `X | None`, `list[X]`, `list[X] | None`."""
    args = getattr(annotation, "__args__", ())
    return {annotation} if not args else set().union(*(leaves(arg) for arg in args))


def sections(model: type[Section], path: str = "spec"):
    """(path, section) for the spec and every section inside it, as the page heads its tables."""
    yield path, model
    for field in model.model_fields.values():
        for leaf in leaves(field.annotation):
            if isinstance(leaf, type) and issubclass(leaf, Section):
                is_list = "list" in str(field.annotation)
                yield from sections(leaf, f"{path}.{field.alias}{'[]' if is_list else ''}")


def test_every_field_of_every_section_has_a_row_with_its_description():
    page = reference_markdown()
    for path, model in sections(GRPOJobSpec):
        (table,) = re.findall(rf"^## `{re.escape(path)}`\n(.*?)(?=^## |\Z)", page, re.DOTALL | re.MULTILINE)
        for name, field in model.model_fields.items():
            assert field.description, f"{path}.{field.alias} has no description"
            row = next((line for line in table.splitlines() if line.startswith(f"| `{field.alias}` |")), None)
            assert row is not None, f"{path}.{field.alias} ({name}) is not in the reference"
            assert field.description.split("|")[0].strip()[:40] in row.replace("\\|", "|")
