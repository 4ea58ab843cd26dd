"""What the DSF FHIR server's parser keeps of a request body, before any rule reads it.

DSF reads request bodies with HAPI's parser (``FhirAdapter.readFrom``) and its default
``LenientErrorHandler``: a JSON value of the wrong kind for its element (a number or a string
where ``Task.input`` expects an object, an object where ``Task.status`` expects a string) is
logged (``incorrectJsonType``) and leaves an empty element, which HAPI drops; the rules and
the validator then see the resource without it. A lone value where the element repeats is read
as a list of one; a list where the element does not repeat leaves its last item. A body HAPI
cannot read at all (not JSON, nested deeper than Jackson's 1,000 levels, not a JSON object, a
resource, contained or in a Bundle, without a known ``resourceType``) raises
``DataFormatException``, which ``DataFormatExceptionHandler`` answers with 403 and "Unable to
parse resource" (2.1 and 1.9).

:func:`as_parsed` does the same for the sandbox, led by the element types of ``fhir.resources``
(R4B): wrong kinds are dropped, iteratively; elements the model does not know, and the
``_name`` extension partners of primitives, are kept as sent. It runs before authorization, so
a malformed Task meets the same rules as at a DSF server instead of crashing a rule. What it
does not model (HAPI also refuses invalid primitive values, such as a malformed date or code,
and drops blank ones) is listed in ``docs/sandbox.md``.
"""

from __future__ import annotations

import functools
import typing
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import BaseModel

__all__ = ["MAX_DEPTH", "UnparsableBodyError", "as_parsed"]

# Jackson's default StreamReadConstraints.maxNestingDepth, which HAPI's JSON parser meets.
MAX_DEPTH = 1_000

# What one element holds: a complex type (its model), a contained resource, or a primitive.
_Kind = type[BaseModel] | typing.Literal["resource", "primitive"]


class UnparsableBodyError(ValueError):
    """HAPI's ``DataFormatException``: the body is no FHIR resource at all."""


def as_parsed(body: object) -> dict[str, Any]:
    """``body`` as HAPI's lenient parser reads it; :class:`UnparsableBodyError` if it cannot."""
    if not isinstance(body, dict):
        raise UnparsableBodyError("the body is no JSON object")
    if _depth(body) > MAX_DEPTH:
        raise UnparsableBodyError(f"the body is nested deeper than {MAX_DEPTH} levels")
    model = _resource_model(body.get("resourceType"))
    if model is None:
        raise UnparsableBodyError(f"unknown resourceType {body.get('resourceType')!r}")
    return _element(model, body)


def _depth(value: object) -> int:
    """How deeply ``value`` nests (objects and arrays), counted without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        current, level = stack.pop()
        if isinstance(current, dict):
            children: Any = current.values()
        elif isinstance(current, list):
            children = current
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


@functools.lru_cache(maxsize=512)  # keyed by what clients send: bounded
def _resource_model(resource_type: object) -> type[BaseModel] | None:
    """The model of a concrete resource type; None for anything else (data types too)."""
    if not isinstance(resource_type, str) or not resource_type.isidentifier():
        return None
    if resource_type in ("Resource", "DomainResource"):
        return None
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError, ImportError, AttributeError):
        return None
    if isinstance(model, type) and issubclass(model, Resource):
        return model
    return None


def _element(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` read as an element of ``model``, iteratively (any depth :func:`_depth` lets
    through)."""
    root: dict[str, Any] = {}
    stack: list[tuple[type[BaseModel], dict[str, Any], dict[str, Any]]] = [(model, data, root)]
    # Complex elements in the order they were created: each after its parent.
    created: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
    while stack:
        current, source, target = stack.pop()
        fields = _fields(current)
        for key, value in source.items():
            found = fields.get(key)
            if found is None:
                target[key] = value
                continue
            kind, repeating = found
            items = value if isinstance(value, list) else [value]
            if not repeating and len(items) > 1:
                items = items[-1:]  # a list for a single element: its last item stands
            kept: list[object] = []
            for item in items:
                if kind == "primitive":
                    if item is not None and not isinstance(item, dict | list):
                        kept.append(item)
                    elif repeating and f"_{key}" in source:
                        kept.append(None)  # a position its _key partner may fill
                    continue
                if not isinstance(item, dict):
                    continue
                child: dict[str, Any] = {}
                if kind == "resource":
                    resource_model = _resource_model(item.get("resourceType"))
                    if resource_model is None:
                        raise UnparsableBodyError(
                            f"{key}: unknown resourceType {item.get('resourceType')!r}"
                        )
                    stack.append((resource_model, item, child))
                else:
                    stack.append((kind, item, child))
                    created.append((target, key, child))
                kept.append(child)
            if any(item is not None for item in kept):
                target[key] = kept if repeating else kept[0]
    # HAPI drops elements left empty: children first, so that a parent emptied by them goes too.
    for parent, key, child in reversed(created):
        if child:
            continue
        held = parent.get(key)
        if isinstance(held, list):
            remaining = [item for item in held if item is not child]
            if remaining:
                parent[key] = remaining
            else:
                del parent[key]
        elif held is child:
            del parent[key]
    return root


@functools.cache
def _fields(model: type[BaseModel]) -> dict[str, tuple[_Kind, bool]]:
    """Each element of ``model`` by its JSON name: its kind and whether it repeats. Names
    starting with ``_`` (the extensions of primitives) are left out: kept as sent."""
    fields: dict[str, tuple[_Kind, bool]] = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        if not key.startswith("_"):
            fields[key] = _kind_of(field.annotation)
    return fields


def _kind_of(annotation: Any) -> tuple[_Kind, bool]:
    repeating = False
    while True:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin is not None and args and origin is not dict:
            repeating = repeating or origin is list
            annotation = args[0]  # Optional[...], List[...], X | None
        else:
            break
    produce = getattr(annotation, "get_model_klass", None)
    klass = produce() if produce is not None else None
    if not (isinstance(klass, type) and issubclass(klass, BaseModel)):
        return "primitive", repeating
    if klass.__name__ in ("Resource", "DomainResource"):
        return "resource", repeating
    return klass, repeating
