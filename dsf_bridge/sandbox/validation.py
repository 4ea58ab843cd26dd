"""Validating resources against the StructureDefinitions in their ``meta.profile``, as the DSF
FHIR server does before it stores a Task or QuestionnaireResponse (HAPI validator; an invalid
resource is answered 403 with the issues in an OperationOutcome).

A profile is the merged differential of its chain of ``baseDefinition`` up to the core FHIR type
(a child's element overrides its base's element with the same id; invariants add up). The core
type itself is checked by the ``fhir.resources`` R4B model, plus the required codes of the
status-like elements the model leaves open. Per profile element:

- cardinality (``min``, ``max``) within each instance of the parent element;
- ``fixed[x]`` (equal) and ``pattern[x]`` (contained) values;
- allowed types of a choice element (``value[x]`` restricted to ``string``);
- slicing with ``value``, ``pattern``, ``exists`` and ``type`` discriminators (a ``value``
  discriminator the slice fixes no value for is left to the others; ``value`` of a primitive
  is the primitive itself)
  (``type.coding.system`` and ``type.coding.code``, ``url``, ``linkId``): each item belongs to
  the first slice whose discriminators it matches (else to ``@default`` when there is one),
  per-slice cardinality and the slice's own elements apply to its members, ``closed`` and
  ``openAtEnd`` rules are kept;
- ``required`` bindings to a ValueSet the validator was given (unknown ValueSets are skipped);
- invariants (``constraint`` of severity ``error`` with a FHIRPath ``expression``), evaluated with
  ``fhirpathpy`` on every instance of the element, ``%resource`` being the resource;
- extensions whose slice names an Extension profile the validator knows.

Not checked: ``mustSupport``, ``targetProfile`` of references (DSF references by identifier,
nothing to resolve), ``profile`` discriminators, re-slicing, ``ordered`` slicing, bindings that are
not ``required``, and invariants of the core FHIR definitions (``ele-1`` and friends).

An unknown profile in ``meta.profile`` is an error, as with DSF (HAPI's "Profile reference ... has
not been checked because it is unknown", ``errorForUnknownProfiles``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeAlias

from fhir.resources.R4B import get_fhir_model_class
from fhirpathpy import compile as fhirpath_compile
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as fhirpath_models
from pydantic import ValidationError

from dsf_bridge.dsf.profiles import pattern_contains, same_value
from dsf_bridge.dsf.publication import read_resource
from dsf_bridge.dsf.vocabulary import QUESTIONNAIRE_RESPONSE_PROFILE
from dsf_bridge.errors import ProcessModelError

__all__ = [
    "ProfileValidator",
    "attach_validator",
    "base_profiles",
    "find_reference_dir",
]

CORE_PREFIX = "http://hl7.org/fhir/StructureDefinition/"

# Where the DSF FHIR server's own profiles live in its repository, per major version.
_BASE_DIRS = {
    "2.1": "dsf/dsf-fhir/dsf-fhir-validation/src/main/resources/fhir",
    "1.9": "dsf/v1.9.0/dsf-fhir/dsf-fhir-validation/src/main/resources/fhir",
}
_BASE_TYPES = ("StructureDefinition", "ValueSet", "CodeSystem")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Required bindings of the core definitions that the fhir.resources models do not enforce.
_CORE_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Task", "status"): _words(
        "draft requested received accepted rejected ready cancelled in-progress on-hold failed "
        "completed entered-in-error"
    ),
    ("Task", "intent"): _words(
        "unknown proposal plan order original-order reflex-order filler-order instance-order option"
    ),
    ("Task", "priority"): _words("routine urgent asap stat"),
    ("QuestionnaireResponse", "status"): _words(
        "in-progress completed amended entered-in-error stopped"
    ),
}

_R4 = fhirpath_models["r4"]

_Evaluator: TypeAlias = Callable[[Any, Mapping[str, Any]], list[Any]]


# -- the merged element tree -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Constraint:
    key: str
    human: str
    expression: str


@dataclass(frozen=True, slots=True)
class _Type:
    code: str
    profiles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Discriminator:
    kind: str  # value, pattern, exists, type, profile
    path: str


@dataclass(frozen=True, slots=True)
class _Slicing:
    discriminators: tuple[_Discriminator, ...]
    rules: str  # open, closed, openAtEnd


@dataclass(slots=True)
class _Element:
    """One element of a profile with everything the chain of differentials says about it."""

    id: str
    path: str
    min: int | None = None
    max: str | None = None
    fixed: tuple[str, Any] | None = None
    pattern: tuple[str, Any] | None = None
    types: tuple[_Type, ...] = ()
    binding: str | None = None  # the ValueSet of a required binding
    constraints: tuple[_Constraint, ...] = ()
    slicing: _Slicing | None = None
    children: dict[str, _Element] = field(default_factory=dict)
    slices: dict[str, _Element] = field(default_factory=dict)
    # For a slice: how to recognise its members, None when it cannot be told (never matched).
    matchers: tuple[_Matcher, ...] | None = ()


@dataclass(frozen=True, slots=True)
class _Matcher:
    kind: str  # equal, contains, exists, absent, type
    path: tuple[str, ...]
    expected: Any = None


def _prefixed(element: Mapping[str, Any], prefix: str) -> tuple[str, Any] | None:
    for key, value in element.items():
        if key.startswith(prefix) and len(key) > len(prefix) and key[len(prefix)].isupper():
            return key, value
    return None


def _split_id(element_id: str) -> list[tuple[str, str | None]]:
    parts = []
    for part in element_id.split("."):
        name, _, slice_name = part.partition(":")
        parts.append((name, slice_name or None))
    return parts


def _element_from(raw: Mapping[str, Any], element_id: str, path: str) -> _Element:
    minimum = raw.get("min")
    maximum = raw.get("max")
    binding = raw.get("binding") or {}
    slicing = raw.get("slicing")
    return _Element(
        id=element_id,
        path=path,
        min=int(minimum) if minimum is not None else None,
        max=str(maximum) if maximum is not None else None,
        fixed=_prefixed(raw, "fixed"),
        pattern=_prefixed(raw, "pattern"),
        types=tuple(
            _Type(str(t.get("code") or ""), tuple(str(p) for p in t.get("profile") or ()))
            for t in raw.get("type") or ()
        ),
        binding=(
            str(binding["valueSet"])
            if binding.get("strength") == "required" and binding.get("valueSet")
            else None
        ),
        constraints=tuple(
            _Constraint(str(c.get("key")), str(c.get("human") or ""), str(c["expression"]))
            for c in raw.get("constraint") or ()
            if c.get("expression") and c.get("severity", "error") == "error"
        ),
        slicing=(
            _Slicing(
                tuple(
                    _Discriminator(str(d.get("type")), str(d.get("path")))
                    for d in slicing.get("discriminator") or ()
                ),
                str(slicing.get("rules") or "open"),
            )
            if slicing
            else None
        ),
    )


def _merge_raw(into: dict[str, Any], element: Mapping[str, Any]) -> None:
    """A derived profile's element over its base's: its values win, invariants add up."""
    constraints = {str(c.get("key")): c for c in into.get("constraint") or ()}
    for key, value in element.items():
        if key.startswith(("fixed", "pattern")):
            prefix = "fixed" if key.startswith("fixed") else "pattern"
            for old in [k for k in into if k.startswith(prefix) and k != key]:
                del into[old]
        into[key] = value
    constraints.update({str(c.get("key")): c for c in element.get("constraint") or ()})
    if constraints:
        into["constraint"] = list(constraints.values())


def _id_by_path(element_id: str, path: str) -> str:
    """The id an element's path says it has. DSF's ``meta`` profile (2.x) names the extension
    slice of a tag slice ``Meta.tag:read-access-parent-organization-role:role-extension`` with
    path ``Meta.tag.extension``; HAPI builds the snapshot by path, so the slice is
    ``Meta.tag:read-access-parent-organization-role.extension:role-extension``."""
    id_parts = element_id.split(".")
    path_parts = path.split(".")
    if len(path_parts) == len(id_parts) + 1:
        head, _, slice_name = id_parts[-1].rpartition(":")
        if ":" in head:
            return ".".join([*id_parts[:-1], head, f"{path_parts[-1]}:{slice_name}"])
    return element_id


def _with_ids(elements: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """Elements with their ids; a missing id is derived from path and the slice above it."""
    result: list[tuple[str, Mapping[str, Any]]] = []
    open_slices: dict[str, str] = {}  # path -> slice name, for elements that have no id
    for element in elements:
        path = str(element.get("path") or "")
        if element.get("id"):
            result.append((_id_by_path(str(element["id"]), path), element))
            continue
        if element.get("sliceName"):
            open_slices[path] = str(element["sliceName"])
        element_id = path
        for sliced, name in open_slices.items():
            if element_id == sliced or element_id.startswith(sliced + "."):
                element_id = f"{sliced}:{name}{element_id[len(sliced) :]}"
        result.append((element_id, element))
    return result


def _build_tree(root_type: str, merged: Mapping[str, Mapping[str, Any]]) -> _Element:
    root = _Element(id=root_type, path=root_type)
    for element_id in sorted(merged, key=lambda i: i.count(".")):
        raw = merged[element_id]
        parts = _split_id(element_id)
        node = root
        current_id = parts[0][0]
        path = parts[0][0]
        for name, slice_name in parts[1:]:
            current_id += f".{name}"
            path += f".{name}"
            node = node.children.setdefault(name, _Element(id=current_id, path=path))
            if slice_name is None:
                continue
            stem = name.removesuffix("[x]")
            if name.endswith("[x]") and slice_name.startswith(stem) and slice_name != stem:
                continue  # a type slice (value[x]:valueString) constrains the choice itself
            current_id += f":{slice_name}"
            node = node.slices.setdefault(slice_name, _Element(id=current_id, path=path))
        own = _element_from(raw, node.id, node.path)
        _assign(node, own)
        name, type_slice = parts[-1]
        stem = name.removesuffix("[x]")
        if type_slice and name.endswith("[x]") and type_slice.startswith(stem) and not own.types:
            node.types = (_Type(_type_of(type_slice, stem)),)
    return root


def _assign(node: _Element, own: _Element) -> None:
    for name in ("min", "max", "fixed", "pattern", "binding", "slicing"):
        value = getattr(own, name)
        if value is not None:
            setattr(node, name, value)
    if own.types:
        node.types = own.types
    if own.constraints:
        node.constraints = node.constraints + own.constraints


def _overlay(base: _Element, over: _Element, *, slice_root: bool = False) -> _Element:
    """``over`` (a slice, or an element inside one) completed by what ``base`` says."""
    children = dict(base.children)
    for name, child in over.children.items():
        children[name] = _overlay(base.children[name], child) if name in base.children else child
    if slice_root:
        slices = dict(over.slices)
    else:
        slices = dict(base.slices)
        for name, item in over.slices.items():
            slices[name] = _overlay(base.slices[name], item) if name in base.slices else item
    known = {c.key for c in over.constraints}
    return _Element(
        id=over.id,
        path=over.path,
        min=over.min if over.min is not None else (0 if slice_root else base.min),
        max=over.max if over.max is not None else base.max,
        fixed=over.fixed or base.fixed,
        pattern=over.pattern or base.pattern,
        types=over.types or base.types,
        binding=over.binding or base.binding,
        constraints=over.constraints + tuple(c for c in base.constraints if c.key not in known),
        slicing=over.slicing if slice_root else (over.slicing or base.slicing),
        children=children,
        slices=slices,
    )


def _materialize(node: _Element) -> _Element:
    """Give every slice the elements of the sliced element it does not restate, and the
    matchers that recognise its members."""
    children = {name: _materialize(child) for name, child in node.children.items()}
    plain = replace(node, children=children, slices={})
    slices: dict[str, _Element] = {}
    for name, item in node.slices.items():
        complete = _materialize(_overlay(plain, item, slice_root=True))
        complete.matchers = None if name == "@default" else _matchers(node, complete)
        slices[name] = complete
    return replace(plain, slices=slices)


def _matchers(sliced: _Element, item: _Element) -> tuple[_Matcher, ...] | None:
    discriminators = sliced.slicing.discriminators if sliced.slicing else ()
    if not discriminators:
        return None  # slices nothing can tell apart: no item is theirs
    matchers: list[_Matcher] = []
    unvalued = 0
    for discriminator in discriminators:
        steps = () if discriminator.path == "$this" else tuple(discriminator.path.split("."))
        target = _descend(item, steps)
        if target is None and steps == ("value",):
            # ``value`` of a primitive is the primitive itself (Endpoint.payloadMimeType).
            steps, target = (), item
        if target is None:
            return None
        if discriminator.kind in ("value", "pattern"):
            if target.fixed is not None:
                matchers.append(_Matcher("equal", steps, target.fixed[1]))
            elif target.pattern is not None:
                matchers.append(_Matcher("contains", steps, target.pattern[1]))
            elif steps[-1:] == ("url",) and _profile_urls(item):
                # An extension slice is known by the url of the Extension profile it names.
                matchers.append(_Matcher("equal", steps, _profile_urls(item)[0]))
            else:
                # A discriminator the slice gives no value for tells nothing apart (DSF's
                # identifier slices: system fixed, value free); the others decide.
                unvalued += 1
                continue
        elif discriminator.kind == "exists":
            if target.min:
                matchers.append(_Matcher("exists", steps))
            elif target.max == "0":
                matchers.append(_Matcher("absent", steps))
            else:
                return None
        elif discriminator.kind == "type" and target.types:
            matchers.append(_Matcher("type", steps, frozenset(t.code for t in target.types)))
        else:
            return None
    if unvalued and not matchers:
        return None
    return tuple(matchers)


def _profile_urls(node: _Element) -> list[str]:
    return [p.split("|", 1)[0] for t in node.types for p in t.profiles]


def _descend(node: _Element, steps: Sequence[str]) -> _Element | None:
    for step in steps:
        following = node.children.get(step) or node.children.get(f"{step}[x]")
        if following is None:
            if step == "url" and _profile_urls(node):
                return _Element(id=f"{node.id}.url", path=f"{node.path}.url")
            return None
        node = following
    return node


# -- reading instances -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Item:
    location: str
    value: Any
    key: str  # the JSON key it came from (valueString for value[x])


def _choice_keys(node: Mapping[str, Any], name: str) -> list[str]:
    stem = name.removesuffix("[x]")
    return [k for k in node if k.startswith(stem) and len(k) > len(stem) and k[len(stem)].isupper()]


def _items(parent: _Item, name: str) -> list[_Item]:
    node = parent.value
    if not isinstance(node, Mapping):
        return []
    keys = _choice_keys(node, name) if name.endswith("[x]") else [name]
    items: list[_Item] = []
    for key in keys:
        value = node.get(key)
        if isinstance(value, list):
            items.extend(
                _Item(f"{parent.location}.{key}[{i}]", v, key) for i, v in enumerate(value)
            )
        elif value is not None:
            items.append(_Item(f"{parent.location}.{key}", value, key))
    return items


def _values_at(value: Any, steps: Sequence[str]) -> list[Any]:
    current = [value]
    for step in steps:
        following: list[Any] = []
        for item in current:
            if not isinstance(item, Mapping):
                continue
            keys = [step] if step in item else _choice_keys(item, step)
            for key in keys:
                child = item[key]
                following.extend(child if isinstance(child, list) else [child])
        current = following
    return current


def _type_of(key: str, stem: str) -> str:
    name = key[len(stem) :]
    # valueString -> string, valueReference -> Reference, valueDateTime -> dateTime
    primitive = name[:1].lower() + name[1:]
    return primitive if primitive in _PRIMITIVES else name


_PRIMITIVES = _words(
    "base64Binary boolean canonical code date dateTime decimal id instant integer markdown oid "
    "positiveInt string time unsignedInt uri url uuid"
)


def _matches(item: _Item, matchers: Sequence[_Matcher]) -> bool:
    for matcher in matchers:
        values = _values_at(item.value, matcher.path)
        if matcher.kind == "equal":
            if not any(same_value(v, matcher.expected) for v in values):
                return False
        elif matcher.kind == "contains":
            if not any(pattern_contains(v, matcher.expected) for v in values):
                return False
        elif matcher.kind == "exists":
            if not values:
                return False
        elif matcher.kind == "absent":
            if values:
                return False
        elif not _has_type(item.value, matcher.path, matcher.expected):
            return False
    return True


def _has_type(value: Any, steps: Sequence[str], codes: frozenset[str]) -> bool:
    if not steps:
        return False
    parents = _values_at(value, steps[:-1])
    stem = steps[-1]
    return any(
        _type_of(key, stem) in codes
        for parent in parents
        if isinstance(parent, Mapping)
        for key in _choice_keys(parent, stem)
    )


# -- terminology -------------------------------------------------------------------------------


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-]", version))


class _Registry:
    """Canonical resources by ``url`` and ``url|version``; an unversioned canonical names the
    highest version."""

    def __init__(self) -> None:
        self._by_url: dict[str, dict[str, Mapping[str, Any]]] = {}

    def add(self, resource: Mapping[str, Any]) -> None:
        url = str(resource.get("url") or "")
        if url:
            self._by_url.setdefault(url, {})[str(resource.get("version") or "")] = resource

    def get(self, canonical: str) -> Mapping[str, Any] | None:
        url, _, version = canonical.partition("|")
        versions = self._by_url.get(url)
        if not versions:
            return None
        if version:
            return versions.get(version)
        return versions[max(versions, key=_version_key)]


def _codes_of(concepts: Iterable[Mapping[str, Any]]) -> Iterable[str]:
    for concept in concepts:
        yield str(concept.get("code"))
        yield from _codes_of(concept.get("concept") or ())


# -- the validator -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Profile:
    url: str
    type: str
    root: _Element


class ProfileValidator:
    """Checks resources against the profiles they claim, from a set of StructureDefinitions
    (and the ValueSets and CodeSystems their required bindings name).

    Resources of other types among the definitions are ignored. Merged element trees are
    built on first use of a profile and kept.
    """

    def __init__(
        self,
        definitions: Iterable[Mapping[str, Any]],
        terminology: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        self._structures = _Registry()
        self._value_sets = _Registry()
        self._code_systems = _Registry()
        self._profiles: dict[str, _Profile | str] = {}
        self._expansions: dict[str, frozenset[tuple[str, str]] | None] = {}
        for resource in [*definitions, *terminology]:
            self.add(resource)

    def add(self, resource: Mapping[str, Any]) -> None:
        """Know one more StructureDefinition, ValueSet or CodeSystem (as a DSF FHIR server
        knows what is published to it); other types are ignored."""
        registry = {
            "StructureDefinition": self._structures,
            "ValueSet": self._value_sets,
            "CodeSystem": self._code_systems,
        }.get(str(resource.get("resourceType")))
        if registry is not None:
            registry.add(resource)
            self._profiles.clear()
            self._expansions.clear()

    def knows(self, canonical: str) -> bool:
        """Whether ``canonical`` (``url`` or ``url|version``) names a known StructureDefinition."""
        return canonical.startswith(CORE_PREFIX) or self._structures.get(canonical) is not None

    def problem(self, canonical: str) -> str | None:
        """Why the profile ``canonical`` cannot be used (unknown, or a base of it unknown), or
        None; builds and keeps its merged element tree."""
        profile = self._profile(canonical)
        return profile if isinstance(profile, str) else None

    def validate(self, resource: Mapping[str, Any]) -> list[str]:
        """Every way ``resource`` breaks its FHIR type or the profiles in its ``meta.profile``,
        each naming the element (``Task.input:message-name: min 1, found 0``); empty when valid."""
        resource_type = str(resource.get("resourceType") or "")
        errors = _core_errors(resource_type, resource)
        root = _Item(resource_type, resource, resource_type)
        claimed = (resource.get("meta") or {}).get("profile") or ()
        for index, canonical in enumerate(str(c) for c in claimed):
            where = f"{resource_type}.meta.profile[{index}]"
            if canonical.split("|", 1)[0] == CORE_PREFIX + resource_type:
                continue
            profile = self._profile(canonical)
            if isinstance(profile, str):
                errors.append(f"{where}: {profile}")
            elif profile.type != resource_type:
                errors.append(f"{where}: profile {canonical} is for {profile.type}")
            else:
                _Check(self._profile, self.expansion, resource, errors).element(profile.root, root)
        return errors

    # -- profiles ----------------------------------------------------------------------------

    def _profile(self, canonical: str) -> _Profile | str:
        """The profile's merged element tree (built once), or why there is none."""
        cached = self._profiles.get(canonical)
        if cached is None:
            cached = self._compile(canonical)
            self._profiles[canonical] = cached
        return cached

    def _compile(self, canonical: str) -> _Profile | str:
        definition = self._structures.get(canonical)
        if definition is None:
            return f"profile {canonical} unknown, the resource cannot be checked against it"
        chain = [definition]
        while True:
            base = str(chain[-1].get("baseDefinition") or "")
            if not base or base.startswith(CORE_PREFIX):
                break
            parent = self._structures.get(base)
            if parent is None:
                return f"profile {canonical}: its base profile {base} unknown"
            if any(parent is seen for seen in chain):
                return f"profile {canonical}: its base profiles form a cycle at {base}"
            chain.append(parent)
        merged: dict[str, dict[str, Any]] = {}
        for structure in reversed(chain):
            elements = (structure.get("differential") or {}).get("element") or []
            for element_id, element in _with_ids(elements):
                _merge_raw(merged.setdefault(element_id, {}), element)
        resource_type = str(definition.get("type") or "")
        root = _materialize(_build_tree(resource_type, merged))
        try:
            for constraint in _constraints(root):
                _evaluator(constraint.expression)  # fail early and once on a bad expression
        except ProcessModelError as exc:
            return f"profile {canonical}: {exc}"
        return _Profile(str(definition.get("url")), resource_type, root)

    # -- terminology -------------------------------------------------------------------------

    def expansion(self, value_set: str) -> frozenset[tuple[str, str]] | None:
        """The ``(system, code)`` pairs of a ValueSet, None when it or a part is unknown."""
        if value_set not in self._expansions:
            self._expansions[value_set] = None  # a ValueSet including itself is unknown
            self._expansions[value_set] = self._expand(value_set)
        return self._expansions[value_set]

    def _expand(self, canonical: str) -> frozenset[tuple[str, str]] | None:
        value_set = self._value_sets.get(canonical)
        if value_set is None:
            return None
        contains = (value_set.get("expansion") or {}).get("contains")
        if contains:
            return frozenset((str(c.get("system")), str(c.get("code"))) for c in contains)
        compose = value_set.get("compose") or {}
        included: set[tuple[str, str]] = set()
        for include in compose.get("include") or ():
            codes = self._include(include)
            if codes is None:
                return None
            included |= codes
        for exclude in compose.get("exclude") or ():
            codes = self._include(exclude)
            if codes is None:
                return None
            included -= codes
        return frozenset(included)

    def _include(self, include: Mapping[str, Any]) -> set[tuple[str, str]] | None:
        if include.get("filter"):
            return None
        system = str(include.get("system") or "")
        codes: set[tuple[str, str]] | None = None
        if include.get("concept"):
            codes = {(system, str(c.get("code"))) for c in include["concept"]}
        elif system:
            version = str(include.get("version") or "")
            code_system = self._code_systems.get(f"{system}|{version}" if version else system)
            code_system = code_system or self._code_systems.get(system)
            if code_system is None:
                return None
            codes = {(system, code) for code in _codes_of(code_system.get("concept") or ())}
        for other in include.get("valueSet") or ():
            expanded = self.expansion(str(other))
            if expanded is None:
                return None
            codes = set(expanded) if codes is None else codes & expanded
        return codes if codes is not None else set()


def _constraints(node: _Element) -> Iterable[_Constraint]:
    yield from node.constraints
    for child in [*node.children.values(), *node.slices.values()]:
        yield from _constraints(child)


@functools.cache
def _evaluator(expression: str) -> _Evaluator:
    try:
        compiled: _Evaluator = fhirpath_compile(expression, _R4)
    except Exception as exc:  # the parser raises bare exceptions
        raise ProcessModelError(f"invariant expression {expression!r} is not FHIRPath") from exc
    return compiled


def _core_errors(resource_type: str, resource: Mapping[str, Any]) -> list[str]:
    """The core FHIR type's structure, by the fhir.resources R4B model."""
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        return [f"{resource_type or 'resource'}: unknown resource type {resource_type!r}"]
    errors = []
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        for error in exc.errors():
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown element"
            errors.append(f"{resource_type}{where}: {message}")
    for (owner, name), codes in _CORE_CODES.items():
        value = resource.get(name)
        if owner == resource_type and value is not None and value not in codes:
            errors.append(f"{resource_type}.{name}: {value!r} is not a code of the required set")
    return errors


class _Check:
    """One validation of one resource against one profile, collecting errors."""

    def __init__(
        self,
        profile: Callable[[str], _Profile | str],
        expansion: Callable[[str], frozenset[tuple[str, str]] | None],
        resource: Mapping[str, Any],
        errors: list[str],
    ) -> None:
        self.profile = profile
        self.expansion = expansion
        self.resource = resource
        self.errors = errors

    def element(self, node: _Element, item: _Item, prefix: str = "") -> None:
        """``item`` is an instance of ``node``: check its value, then its children."""
        self._value(node, item, prefix)
        for name, child in node.children.items():
            self.children(child, item, _items(item, name), prefix)

    def children(self, node: _Element, parent: _Item, items: list[_Item], prefix: str) -> None:
        where = (
            f" (in {parent.location})" if "." in parent.location or "[" in parent.location else ""
        )
        self._cardinality(node, len(items), prefix + node.id, where)
        if node.path.endswith("[x]") and node.types:
            stem = node.path.rsplit(".", 1)[-1].removesuffix("[x]")
            allowed = {t.code for t in node.types}
            for item in items:
                found = _type_of(item.key, stem)
                if found not in allowed:
                    self.errors.append(
                        f"{prefix}{node.id}: type {found} not allowed, expected "
                        f"{' or '.join(sorted(allowed))} (at {item.location})"
                    )
        if not node.slices:
            for item in items:
                self.element(node, item, prefix)
            return
        members: dict[str, list[_Item]] = {name: [] for name in node.slices}
        unmatched: list[int] = []
        matched: list[int] = []
        default = "@default" in node.slices
        for index, item in enumerate(items):
            name = next(
                (
                    name
                    for name, item_slice in node.slices.items()
                    if item_slice.matchers is not None and _matches(item, item_slice.matchers)
                ),
                "@default" if default else None,
            )
            if name is None:
                unmatched.append(index)
                self.element(node, item, prefix)
            else:
                matched.append(index)
                members[name].append(item)
        for name, item_slice in node.slices.items():
            self._cardinality(item_slice, len(members[name]), prefix + item_slice.id, where)
            for item in members[name]:
                self.element(item_slice, item, prefix)
        rules = node.slicing.rules if node.slicing else "open"
        if rules == "closed":
            for index in unmatched:
                self.errors.append(
                    f"{prefix}{node.id}: {items[index].location} matches no slice of "
                    f"{', '.join(node.slices)} and the slicing is closed"
                )
        elif rules == "openAtEnd" and unmatched and matched and max(matched) > min(unmatched):
            self.errors.append(
                f"{prefix}{node.id}: {items[min(unmatched)].location} matches no slice but "
                f"comes before {items[max(matched)].location}, which does (slicing openAtEnd)"
            )

    def _cardinality(self, node: _Element, count: int, label: str, where: str) -> None:
        if node.min and count < node.min:
            self.errors.append(f"{label}: min {node.min}, found {count}{where}")
        if node.max not in (None, "*") and count > int(str(node.max)):
            self.errors.append(f"{label}: max {node.max}, found {count}{where}")

    def _value(self, node: _Element, item: _Item, prefix: str) -> None:
        label = prefix + node.id
        at = f" (at {item.location})"
        value = item.value
        if node.fixed is not None and not same_value(value, node.fixed[1]):
            self.errors.append(f"{label}: {value!r} is not the fixed value {node.fixed[1]!r}{at}")
        if node.pattern is not None and not pattern_contains(value, node.pattern[1]):
            self.errors.append(
                f"{label}: {value!r} does not match the pattern {node.pattern[1]!r}{at}"
            )
        if node.binding is not None:
            self._binding(node.binding, label, item)
        for constraint in node.constraints:
            self._invariant(constraint, node, label, item)
        for type_ in node.types:
            for profile_url in type_.profiles:
                self._typed_profile(profile_url, label, item)

    def _binding(self, value_set: str, label: str, item: _Item) -> None:
        codes = self.expansion(value_set)
        if codes is None:
            return  # an unknown ValueSet is not checked
        value = item.value
        if isinstance(value, Mapping) and ("coding" in value or "text" in value):
            codings = [c for c in value.get("coding") or () if isinstance(c, Mapping)]
            ok = any((str(c.get("system")), str(c.get("code"))) in codes for c in codings)
        elif isinstance(value, Mapping):
            ok = (str(value.get("system")), str(value.get("code"))) in codes
        elif isinstance(value, str):
            ok = value in {code for _system, code in codes}
        else:
            return
        if not ok:
            self.errors.append(
                f"{label}: {value!r} is not in the required ValueSet {value_set}"
                f" (at {item.location})"
            )

    def _invariant(self, constraint: _Constraint, node: _Element, label: str, item: _Item) -> None:
        evaluate = _evaluator(constraint.expression)
        subject: Any = item.value
        if isinstance(subject, Mapping) and "resourceType" not in subject:
            path = node.path
            if path.endswith("[x]"):
                stem = path.rsplit(".", 1)[-1].removesuffix("[x]")
                path = path.removesuffix("[x]") + item.key[len(stem) :]
            subject = ResourceNode.create_node(subject, path)  # type: ignore[no-untyped-call]
        try:
            result = evaluate(subject, {"resource": self.resource})
        except Exception as exc:  # fhirpathpy raises bare exceptions on bad data
            self.errors.append(f"{label}: invariant {constraint.key} failed to evaluate: {exc}")
            return
        if result != [True] and not isinstance(subject, Mapping | list | ResourceNode):
            # A primitive also has a ``value`` (FHIR's model, as HAPI evaluates it:
            # ``value.matches(...)`` in DSF's thumbprint extension); fhirpathpy knows only the
            # bare value. An expression about the bare value fails on this form: its verdict
            # stands.
            with contextlib.suppress(Exception):
                result = evaluate({"value": subject}, {"resource": self.resource})
        # As HAPI: true passes; false, empty or anything else fails.
        if result != [True]:
            self.errors.append(
                f"{label}: invariant {constraint.key} failed: {constraint.human}"
                f" (at {item.location})"
            )

    def _typed_profile(self, canonical: str, label: str, item: _Item) -> None:
        profile = self.profile(canonical)
        if isinstance(profile, str):
            return  # an Extension profile we were not given: not checked
        self.element(profile.root, item, f"{label} > ")


# -- DSF's own profiles ------------------------------------------------------------------------


def base_profiles(dsf_version: str, reference_dir: Path) -> list[dict[str, Any]]:
    """The DSF FHIR server's own StructureDefinitions, ValueSets and CodeSystems of DSF
    ``"2.1"`` or ``"1.9"``, read from a checkout of the DSF repository under ``reference_dir``
    (the files the server loads at start-up: those with a ``.post`` criteria file beside them).
    """
    relative = _BASE_DIRS.get(dsf_version)
    if relative is None:
        raise ValueError(f"DSF version {dsf_version!r} unknown, expected one of {list(_BASE_DIRS)}")
    folder = reference_dir / relative
    if not folder.is_dir():
        raise FileNotFoundError(f"DSF {dsf_version} profiles not found at {folder}")
    resources: list[dict[str, Any]] = []
    for kind in _BASE_TYPES:
        for path in sorted((folder / kind).glob("*.xml")):
            if path.with_name(path.name + ".post").is_file():
                resources.append(read_resource(path, path.read_bytes()))
    return resources


# The types DSF validates before its Task and QuestionnaireResponse rules; other resources of
# the sandbox (allow list, Subscriptions) are written by the sandbox itself.
VALIDATED_TYPES = frozenset({"Task", "QuestionnaireResponse"})
REFERENCE_DIR_VARIABLE = "DSF_BRIDGE_REFERENCE_DIR"


def find_reference_dir() -> Path | None:
    """The DSF reference corpus (a folder holding ``SOURCES.md`` and the DSF repository's
    validation resources): ``$DSF_BRIDGE_REFERENCE_DIR``, else ``shared/reference/dsf`` beside
    a folder above this package or the working directory; None when there is none."""
    configured = os.environ.get(REFERENCE_DIR_VARIABLE)
    if configured:
        return Path(configured)
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for folder in start.parents:
            candidate = folder / "shared" / "reference" / "dsf"
            if (candidate / "SOURCES.md").is_file():
                return candidate
    return None


@functools.cache
def _cached_base_profiles(dsf_version: str, reference_dir: Path) -> tuple[dict[str, Any], ...]:
    return tuple(base_profiles(dsf_version, reference_dir))


def attach_validator(service: Any, dsf_version: str, reference_dir: Path | None = None) -> bool:
    """Make ``service`` (a :class:`~dsf_bridge.sandbox.service.FhirService`) validate Tasks and
    QuestionnaireResponses as the DSF FHIR server of ``dsf_version`` does: against DSF's own
    base profiles of that version and every StructureDefinition, ValueSet and CodeSystem
    published to it. Returns False, validating nothing, when DSF's profiles are not found
    (the caller says so)."""
    folder = reference_dir or find_reference_dir()
    if folder is None or not (folder / _BASE_DIRS[dsf_version]).is_dir():
        return False
    validator = ProfileValidator(_cached_base_profiles(dsf_version, folder))
    for resource_type in _BASE_TYPES:
        for resource in service.store.all(resource_type):
            validator.add(resource)

    def validate(resource: dict[str, Any]) -> list[str]:
        if resource.get("resourceType") not in VALIDATED_TYPES:
            return []
        if dsf_version != "1.9":
            _set_default_profile(resource)
        errors = validator.validate(resource)
        if resource.get("resourceType") == "QuestionnaireResponse":
            errors.extend(_questionnaire_errors(service.store, resource))
        return errors

    def published(resource: dict[str, Any]) -> None:
        if resource.get("resourceType") in _BASE_TYPES:
            validator.add(resource)

    service.validator = validate
    service.store.add_listener(published)
    return True


def _questionnaire_errors(store: Any, response: Mapping[str, Any]) -> list[str]:
    """HAPI validates a QuestionnaireResponse against its Questionnaire and reports one it
    cannot find as an error (DSF's
    ``testCreateNotAllowedByLocalUserQuestionnaireDoesNotExists``)."""
    canonical = response.get("questionnaire")
    if not isinstance(canonical, str) or not canonical:
        return []  # the profile's cardinality speaks for a missing one
    url, _, version = canonical.partition("|")
    for questionnaire in store.all("Questionnaire"):
        if questionnaire.get("url") == url and (
            not version or questionnaire.get("version") == version
        ):
            return []
    return [f"QuestionnaireResponse.questionnaire: Questionnaire {canonical} not found"]


# DSF 2.x's DefaultProfileProviderImpl: a resource of these types that names none of the type's
# DSF profiles gets the default one first in meta.profile before validation (and is stored so).
# Tasks have none; 1.x has no such provider.
_DEFAULT_PROFILES = {"QuestionnaireResponse": QUESTIONNAIRE_RESPONSE_PROFILE}


def _set_default_profile(resource: dict[str, Any]) -> None:
    default = _DEFAULT_PROFILES.get(str(resource.get("resourceType")))
    if default is None:
        return
    meta = resource.setdefault("meta", {})
    profiles = [str(p) for p in meta.get("profile") or []]
    if any(p.partition("|")[0] == default for p in profiles):
        return
    meta["profile"] = [default, *[p for p in profiles if p != default]]
