"""docs/reference.md, the GRPOJob field reference, generated from the pydantic spec (`grpo docs`).

One table per section of the spec (`spec`, `spec.model`, `spec.rewards[]`, ...): each field's
camelCase name, its type, its default and its `Field(description=...)`, as the CRD's schema
and `kubectl explain` carry them. The page is checked in; a test keeps it equal to this output.
"""

from __future__ import annotations

import json
from typing import Any

from grpo_runtime.spec import API_VERSION, KIND, GRPOJobSpec

HEADER = f"""# GRPOJob field reference

Every field of a `{KIND}`'s `spec` (`apiVersion: {API_VERSION}`), generated from the pydantic
spec (`runtime/grpo_runtime/spec.py`), as the CRD is. Do not edit this page: after changing the
spec, regenerate it with `grpo docs > docs/reference.md` (a test fails while it is stale).
`kubectl explain grpojob.spec.training` shows the same descriptions on a cluster.
"""


def _ref_name(node: dict[str, Any]) -> str | None:
    ref = node.get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


def _type(node: dict[str, Any], defs: dict[str, Any]) -> str:
    """A short type name for one JSON-schema node: `string`, `integer or string`, `list of object`, ..."""
    if "anyOf" in node:
        names = [_type(v, defs) for v in node["anyOf"] if v.get("type") != "null"]
        return " or ".join(dict.fromkeys(names))
    if _ref_name(node):
        return "object"
    if "enum" in node:
        return " | ".join(f"`{value}`" for value in node["enum"])
    kind = node.get("type", "any")
    if kind == "array":
        return f"list of {_type(node.get('items', {}), defs)}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type(node['additionalProperties'], defs)}"
    return kind


def _default(node: dict[str, Any]) -> str:
    if "default" not in node or node["default"] is None:
        return ""
    return f"`{json.dumps(node['default'])}`"


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _child(node: dict[str, Any]) -> str | None:
    """The definition a field's value (or its list items) is an object of, if any."""
    for variant in node.get("anyOf", [node]):
        name = _ref_name(variant) or _ref_name(variant.get("items", {}))
        if name:
            return name
    return None


def _sections(path: str, schema: dict[str, Any], defs: dict[str, Any]) -> list[str]:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    children: list[tuple[str, dict[str, Any]]] = []
    required = set(schema.get("required", []))
    for name, node in schema.get("properties", {}).items():
        default = _default(node) or ("required" if name in required else "")
        rows.append(f"| `{name}` | {_cell(_type(node, defs))} | {default} | {_cell(node.get('description'))} |")
        child = _child(node)
        if child:
            is_list = node.get("type") == "array" or any(v.get("type") == "array" for v in node.get("anyOf", []))
            children.append((f"{path}.{name}{'[]' if is_list else ''}", defs[child]))
    out = [f"## `{path}`", ""]
    if schema.get("description") and path != "spec":
        out += [_cell(schema["description"]), ""]
    out += [*rows, ""]
    for child_path, child in children:
        out += _sections(child_path, child, defs)
    return out


def reference_markdown() -> str:
    raw = GRPOJobSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return "\n".join([HEADER, *_sections("spec", raw, defs)]).rstrip("\n") + "\n"
