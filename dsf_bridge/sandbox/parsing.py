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
    kept: dict[str, Any] = {}
    for key, value in data.items():
        kind = _kind(model, key)
        if kind is None:
            kept[key] = value
            continue
        if isinstance(value, list):
            items = [item for item in (_value(kind, item) for item in value) if item is not None]
            if items:
                kept[key] = items
        else:
            single = _value(kind, value)
            if single is not None:
                kept[key] = single
    return kept


def _value(kind: _Kind, value: object) -> object | None:
    """The value HAPI keeps for one element of ``kind``, or None if it drops it."""
    if kind == "primitive":
        return None if isinstance(value, dict | list) else value
    if not isinstance(value, dict):
        return None
    if kind == "resource":
        model = _resource_model(value.get("resourceType"))
        return value if model is None else _element(model, value)
    return _element(kind, value) or None


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
