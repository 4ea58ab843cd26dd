"""What the DSF FHIR server's parser keeps of a request body, before any rule reads it.

DSF reads request bodies with HAPI's parser (``FhirAdapter.readFrom``) and its default
``LenientErrorHandler``: a JSON value of the wrong kind for its element (a number or a string
where ``Task.input`` expects an object, an object where ``Task.status`` expects a string) is
logged (``incorrectJsonType``) and leaves an empty element, which HAPI drops; the rules and
the validator then see the resource without it. Only a body HAPI cannot read at all (not
JSON, not a JSON object, no known ``resourceType``) raises ``DataFormatException``, which
``DataFormatExceptionHandler`` answers with 403 and "Unable to parse resource" (2.1 and 1.9).

:func:`as_parsed` does the same for the sandbox, led by the element types of ``fhir.resources``
(R4B): wrong kinds are dropped, recursively; elements the model does not know are kept as they
are (the sandbox's rules and validator read them). It runs before authorization, so a
malformed Task meets the same rules as at a DSF server instead of crashing a rule.
"""

from __future__ import annotations

import functools
import typing
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import BaseModel

__all__ = ["UnparsableBodyError", "as_parsed"]

# What one element holds: a complex type (its model), a contained resource, or a primitive.
_Kind = type[BaseModel] | typing.Literal["resource", "primitive"]


class UnparsableBodyError(ValueError):
    """HAPI's ``DataFormatException``: the body is no FHIR resource at all."""


def as_parsed(body: object) -> dict[str, Any]:
    """``body`` as HAPI's lenient parser reads it; :class:`UnparsableBodyError` if it cannot."""
    if not isinstance(body, dict):
        raise UnparsableBodyError("the body is no JSON object")
    model = _resource_model(body.get("resourceType"))
    if model is None:
        raise UnparsableBodyError(f"unknown resourceType {body.get('resourceType')!r}")
    return _element(model, body)


def _resource_model(resource_type: object) -> type[BaseModel] | None:
    if not isinstance(resource_type, str) or not resource_type.isidentifier():
        return None
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError, ImportError, AttributeError):
        return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _element(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` read as an element of ``model``; iterative, so that no nesting depth a JSON
    parser accepts can exhaust Python's stack (Jackson, under HAPI, allows 1,000 levels)."""
    root: dict[str, Any] = {}
    stack: list[tuple[type[BaseModel], dict[str, Any], dict[str, Any]]] = [(model, data, root)]
    # Complex elements in the order they were created: each after its parent.
    created: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
    while stack:
        current, source, target = stack.pop()
        for key, value in source.items():
            kind = _kind(current, key)
            if kind is None:
                target[key] = value
                continue
            kept: list[object] = []
            for item in value if isinstance(value, list) else [value]:
                if kind == "primitive":
                    if item is not None and not isinstance(item, dict | list):
                        kept.append(item)
                    continue
                if not isinstance(item, dict):
                    continue
                child: dict[str, Any] = {}
                if kind == "resource":
                    resource_model = _resource_model(item.get("resourceType"))
                    if resource_model is None:
                        kept.append(item)
                        continue
                    stack.append((resource_model, item, child))
                else:
                    stack.append((kind, item, child))
                    created.append((target, key, child))
                kept.append(child)
            if kept:
                target[key] = kept if isinstance(value, list) else kept[0]
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
def _kind(model: type[BaseModel], key: str) -> _Kind | None:
    """The kind of element ``key`` of ``model``; None for names the model does not know
    (extensions of primitives such as ``_status`` included: they are kept as sent)."""
    field = next(
        (f for name, f in model.model_fields.items() if (f.alias or name) == key),
        None,
    )
    if field is None:
        return None
    annotation = field.annotation
    while True:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin is not None and args and origin is not dict:
            annotation = args[0]  # Optional[...], List[...], X | None
        else:
            break
    produce = getattr(annotation, "get_model_klass", None)
    if produce is None:
        return "primitive"
    klass = produce()
    if not (isinstance(klass, type) and issubclass(klass, BaseModel)):
        return "primitive"
    if klass.__name__ in ("Resource", "DomainResource"):
        return "resource"
    return klass
