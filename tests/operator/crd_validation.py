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
