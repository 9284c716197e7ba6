"""CRD validation rules (x-kubernetes-validations) as a Kubernetes API server applies them.

The API server's double (k8s_doubles.py) calls `violations(schema, new, old)` on every create
and update of a custom resource. The rules are evaluated by cel-python (a CEL implementation);
which rules run where follows the API server (k8s.io/apiextensions-apiserver, "Validation
rules" in the CRD documentation, as of v1.25):

- a rule sits on a schema node and runs once for each value at that node, with `self` bound to
  that value; a node absent from the object runs none of its rules;
- a rule that reads `oldSelf` is a *transition rule*: it runs only on update, and only where
  the old object has a value at the same node too. Under an array, old and new items are
  correlated only for `x-kubernetes-list-type: map` (by their keys); elsewhere under an array a
  transition rule never runs. (Ratcheting, which came after v1.25, is not emulated.)
- a failed rule is reported as `<path>: Invalid value: "<type>": <message>`, all of them at
  once in one 422.

`apply_defaults(schema, obj)` fills in the schema's `default`s where a field is absent, as the
API server does to every object it admits (structural defaulting: in objects that are present,
array items included); rules then see the defaulted object.

Not emulated: the rules' cost limits and the CEL extension libraries (lists, strings, regex
beyond CEL's own `matches`), which no rule of ours uses.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any

import celpy

_ABSENT = object()


@functools.lru_cache(maxsize=None)
def _program(rule: str) -> Any:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def _check(rule: dict[str, Any], new: Any, old: Any) -> bool:
    activation = {"self": celpy.json_to_cel(new)}
    if old is not _ABSENT:
        activation["oldSelf"] = celpy.json_to_cel(old)
    try:
        result = _program(rule["rule"]).evaluate(activation)
    except celpy.CELEvalError:
        return False
    return result is True or (isinstance(result, celpy.celtypes.BoolType) and bool(result))


def violations(schema: dict[str, Any], new: Any, old: Any = _ABSENT, path: str = "") -> list[str]:
    """Messages of the rules that fail for `new` (a create when `old` is not given)."""
    if new is None:
        return []
    found: list[str] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        transition = "oldSelf" in rule["rule"]
        if transition and old is _ABSENT:
            continue  # a create, or a node the old object lacks: the API server skips the rule
        if not _check(rule, new, old if transition else _ABSENT):
            message = rule.get("message") or f"failed rule: {rule['rule']}"
            found.append(f'{path.lstrip(".") or "<root>"}: Invalid value: "{_type_name(new)}": {message}')

    if isinstance(new, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, value in new.items():
            child = properties.get(key) or (extra if isinstance(extra, dict) else None)
            if child is None:
                continue
            old_value = old.get(key, _ABSENT) if isinstance(old, dict) else _ABSENT
            found += violations(child, value, old_value, f"{path}.{key}")
    elif isinstance(new, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        keys = schema.get("x-kubernetes-list-map-keys") if schema.get("x-kubernetes-list-type") == "map" else None
        olds: dict[Any, Any] = {}
        if keys and isinstance(old, list):
            olds = {tuple(item.get(k) for k in keys): item for item in old if isinstance(item, dict)}
        for index, item in enumerate(new):
            key = tuple(item.get(k) for k in keys) if keys and isinstance(item, dict) else None
            found += violations(items, item, olds.get(key, _ABSENT) if key else _ABSENT, f"{path}[{index}]")
    return found


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults filled in where fields are absent (in place; returned)."""
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key, child in properties.items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
        for key, item in value.items():
            child = properties.get(key)
            if child is None and isinstance(schema.get("additionalProperties"), dict):
                child = schema["additionalProperties"]
            if child is not None:
                apply_defaults(child, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value


# ---- OpenAPI schema validation and pruning (structural schemas) -------------------------------
#
# What the API server does with a custom resource before its CEL rules (apiextensions-apiserver:
# pruning, then validation against the version's openAPIV3Schema):
# - unknown fields (not in `properties`, under no `additionalProperties` and no
#   `x-kubernetes-preserve-unknown-fields`) are dropped; with `?fieldValidation=Strict` the
#   request is refused instead (400: `strict decoding error: unknown field "<path>"`). The root's
#   `metadata` is ObjectMeta, the server's own; embedded ones (a pod template's) are pruned too.
# - null where the schema is not `nullable` is dropped;
# - type, required, enum, pattern, min/maxLength, min/maxItems, minimum/maximum, maxProperties,
#   `x-kubernetes-int-or-string` and the keys of `x-kubernetes-list-type: map` lists are checked,
#   each failure reported as the API server words it (k8s.io/apimachinery field.Error). Formats
#   (date-time, int32, ...) are not checked.


def _quote(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _type_ok(schema: dict[str, Any], value: Any) -> str | None:
    """None when `value` has the schema's type; else the type name it was expected to have."""
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        return None if ok else "integer or string"
    want = schema.get("type")
    if want is None:
        return None
    ok = {
        "object": isinstance(value, dict), "array": isinstance(value, list),
        "string": isinstance(value, str), "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(want, True)
    return None if ok else want


def unknown_fields(schema: dict[str, Any], value: Any, path: str = "", root: bool = True) -> list[str]:
    """The paths of the fields pruning would drop."""
    found: list[str] = []
    if isinstance(value, dict) and _type_ok(schema, value) is None and isinstance(schema, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            child = properties.get(key) or (extra if isinstance(extra, dict) else None)
            if root and key == "metadata":
                continue
            if child is None:
                if not schema.get("x-kubernetes-preserve-unknown-fields") and extra is not True:
                    found.append(f"{path}.{key}".lstrip("."))
                continue
            found += unknown_fields(child, item, f"{path}.{key}", root=False)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_fields(schema["items"], item, f"{path}[{index}]", root=False)
    return found


def prune(schema: dict[str, Any], value: Any, root: bool = True) -> Any:
    """`value` without unknown fields and non-nullable nulls (in place; returned)."""
    if isinstance(value, dict) and _type_ok(schema, value) is None:
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key in list(value):
            child = properties.get(key) or (extra if isinstance(extra, dict) else None)
            if root and key == "metadata":
                continue
            if child is None:
                if not schema.get("x-kubernetes-preserve-unknown-fields") and extra is not True:
                    del value[key]
            elif value[key] is None and not child.get("nullable"):
                del value[key]
            else:
                prune(child, value[key], root=False)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            prune(schema["items"], item, root=False)
    return value


def schema_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """What the API server's OpenAPI validation says about `value` (after pruning)."""
    at = path.lstrip(".") or "<root>"
    if value is None:
        return [] if schema.get("nullable") else [f'{at}: Invalid value: "null": {at} in body must be of type '
                                                    f'{schema.get("type", "object")}: "null"']
    wrong = _type_ok(schema, value)
    if wrong is not None:
        return [f'{at}: Invalid value: "{_type_name(value)}": {at} in body must be of type {wrong}: '
                f'"{_type_name(value)}"']
    found: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(_quote(v) for v in schema["enum"])
        found.append(f"{at}: Unsupported value: {_quote(value)}: supported values: {supported}")
    if isinstance(value, str):
        if "pattern" in schema and not _go_regex(schema["pattern"]).search(value):
            found.append(f"{at}: Invalid value: \"{value}\": {at} in body should match '{schema['pattern']}'")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            found.append(f"{at}: Too long: may not be more than {schema['maxLength']} bytes")
        if "minLength" in schema and len(value) < schema["minLength"]:
            found.append(f'{at}: Invalid value: "{value}": {at} in body should be at least '
                         f'{schema["minLength"]} chars long')
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            found.append(f"{at}: Invalid value: {value}: {at} in body should be greater than or equal to "
                         f"{schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            found.append(f"{at}: Invalid value: {value}: {at} in body should be less than or equal to "
                         f"{schema['maximum']}")
    if isinstance(value, dict):
        for key in schema.get("required") or []:
            if key not in value:
                found.append(f"{path}.{key}".lstrip(".") + ": Required value")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            found.append(f"{at}: Too many: {len(value)}: must have at most {schema['maxProperties']} items")
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            child = properties.get(key) or (extra if isinstance(extra, dict) else None)
            if child is not None and not (path == "" and key == "metadata"):
                found += schema_errors(child, item, f"{path}.{key}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            found.append(f"{at}: Too many: {len(value)}: must have at most {schema['maxItems']} items")
        if "minItems" in schema and len(value) < schema["minItems"]:
            found.append(f"{at}: Invalid value: {len(value)}: {at} in body should have at least "
                         f"{schema['minItems']} items")
        items = schema.get("items")
        if isinstance(items, dict):
            for index, item in enumerate(value):
                found += schema_errors(items, item, f"{path}[{index}]")
        if schema.get("x-kubernetes-list-type") == "map":
            keys, seen = schema.get("x-kubernetes-list-map-keys") or [], set()
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                key = tuple(json.dumps(item.get(k)) for k in keys)
                if key in seen:
                    shown = ", ".join(f'"{k}":{json.dumps(item.get(k))}' for k in keys)
                    found.append(f"{path.lstrip('.')}[{index}]: Duplicate value: map[string]interface {{}}{{{shown}}}")
                seen.add(key)
    return found


@functools.lru_cache(maxsize=None)
def _go_regex(pattern: str) -> re.Pattern[str]:
    """A Go (RE2) pattern in Python: Kueue's `^(?i)[a-z0-9]...` puts a flag where Python 3.11 wants
    it first. The rest of these patterns mean the same in both."""
    flags = re.IGNORECASE if "(?i)" in pattern else 0
    return re.compile(pattern.replace("(?i)", ""), flags)
