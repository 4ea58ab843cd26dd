"""Checking a Task against a DSF Task profile: the differential of a StructureDefinition and of
the profiles it derives from (``task-base``), read as DSF plugins write them.

What is checked, per element of the merged differential (a profile's element overrides its
base's element of the same id):

- cardinality (``min``, ``max``) within each instance of the parent element;
- ``fixed[x]`` (equal) and ``pattern[x]`` (contained) values;
- the type of a choice element (``value[x]`` with ``type`` ``string`` must be ``valueString``);
- slices (``Task.input:message-name``): an item belongs to a slice when it has the slice's
  fixed values at every discriminator path of the slicing (DSF: ``type.coding.system`` and
  ``type.coding.code``; for extensions ``url``, or the profile the slice names). The slice's
  own cardinality and child elements are then checked on its members.

Not checked: FHIRPath invariants, terminology bindings, elements of the core FHIR Task
definition (status codes and the like). This is a focused check that the Tasks the bridge sends
are the ones a DSF FHIR server's validator accepts, not a full FHIR validator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsf_bridge.errors import BridgeError

__all__ = ["ProfileError", "TaskProfile"]

# DSF's task-base slices inputs and outputs by these paths; used when no base is given.
_DEFAULT_DISCRIMINATORS = ("type.coding.system", "type.coding.code")


class ProfileError(BridgeError):
    """A resource does not conform to a profile; the message lists every problem."""


@dataclass(frozen=True, slots=True)
class _Segment:
    name: str
    slice: str | None


def _segments(element_id: str) -> list[_Segment]:
    segments = []
    for part in element_id.split("."):
        name, _, slice_name = part.partition(":")
        segments.append(_Segment(name, slice_name or None))
    return segments


def _join(segments: Sequence[_Segment]) -> str:
    return ".".join(s.name + (f":{s.slice}" if s.slice else "") for s in segments)


def _prefixed(element: Mapping[str, Any], prefix: str) -> tuple[str, Any] | None:
    for key, value in element.items():
        if key.startswith(prefix) and len(key) > len(prefix) and key[len(prefix)].isupper():
            return key, value
    return None


def _choice_keys(node: Mapping[str, Any], name: str) -> list[str]:
    stem = name.removesuffix("[x]")
    return [k for k in node if k.startswith(stem) and len(k) > len(stem) and k[len(stem)].isupper()]


def _children(node: object, name: str) -> list[Any]:
    if not isinstance(node, Mapping):
        return []
    keys = _choice_keys(node, name) if name.endswith("[x]") else [name]
    values: list[Any] = []
    for key in keys:
        value = node.get(key)
        if isinstance(value, list):
            values.extend(value)
        elif value is not None:
            values.append(value)
    return values


def _values_at(node: object, path: str) -> list[Any]:
    current = [node]
    for name in path.split("."):
        current = [child for item in current for child in _children(item, name)]
    return current


def pattern_contains(value: object, pattern: object) -> bool:
    """FHIR pattern matching (``pattern[x]``): every property of the pattern is present with
    that value; a repeating element matches when one of its items does."""
    if isinstance(pattern, Mapping):
        return isinstance(value, Mapping) and all(
            _contains_any(value.get(key), item) for key, item in pattern.items()
        )
    if isinstance(pattern, list):
        return all(_contains_any(value, item) for item in pattern)
    return same_value(value, pattern)


def _contains_any(value: object, pattern: object) -> bool:
    if isinstance(value, list) and not isinstance(pattern, list):
        return any(pattern_contains(item, pattern) for item in value)
    return pattern_contains(value, pattern)


def same_value(value: object, expected: object) -> bool:
    """Equal, numbers compared with their text too (decimals read from XML come back as
    strings)."""
    if value == expected:
        return True
    numbers = (int, float)
    if isinstance(value, numbers) and isinstance(expected, numbers | str):
        return str(value) == str(expected)
    return False


class TaskProfile:
    """The merged differential of a Task profile and its bases, ready to check Tasks."""

    def __init__(self, elements: Mapping[str, Mapping[str, Any]], url: str = "") -> None:
        self.elements = dict(elements)
        self.url = url

    @classmethod
    def from_definitions(
        cls, profile: Mapping[str, Any], bases: Iterable[Mapping[str, Any]] = ()
    ) -> TaskProfile:
        """``profile`` and the StructureDefinitions it derives from (as FHIR JSON), base first
        in ``bases``; each element of a later one overrides the same element of an earlier."""
        merged: dict[str, dict[str, Any]] = {}
        for definition in [*bases, profile]:
            if definition.get("type") != "Task":
                raise ProfileError(f"{definition.get('url')} is not a Task profile")
            for element in (definition.get("differential") or {}).get("element") or []:
                merged.setdefault(str(element["id"]), {}).update(element)
        return cls(merged, str(profile.get("url") or ""))

    # -- checking ---------------------------------------------------------------------------

    def problems(self, task: Mapping[str, Any]) -> list[str]:
        """Every way ``task`` breaks the profile (empty when it conforms)."""
        found: list[str] = []
        for element_id in sorted(self.elements, key=lambda i: (i.count("."), i)):
            if "." in element_id:
                found.extend(self._check(task, element_id))
        return found

    def check(self, task: Mapping[str, Any]) -> None:
        problems = self.problems(task)
        if problems:
            raise ProfileError(
                f"Task/{task.get('id')} does not conform to {self.url}: " + "; ".join(problems)
            )

    def _check(self, task: Mapping[str, Any], element_id: str) -> list[str]:
        element = self.elements[element_id]
        segments = _segments(element_id)
        parents = self._nodes(task, segments[:-1])
        if parents is None:
            return []  # a slice above cannot be told apart: nothing to say about its children
        last = segments[-1]
        problems: list[str] = []
        minimum = element.get("min")
        maximum = element.get("max")
        for parent in parents:
            children = self._members(parent, segments[:-1], last)
            if children is None:
                return []
            if isinstance(minimum, int) and len(children) < minimum:
                problems.append(f"{element_id}: {len(children)} present, at least {minimum}")
            if maximum not in (None, "*") and len(children) > int(str(maximum)):
                problems.append(f"{element_id}: {len(children)} present, at most {maximum}")
            for child in children:
                problems.extend(self._check_value(element_id, element, child))
            if last.name.endswith("[x]") and element.get("type"):
                problems.extend(self._check_type(element_id, element, parent))
        return problems

    def _check_value(self, element_id: str, element: Mapping[str, Any], value: Any) -> list[str]:
        fixed = _prefixed(element, "fixed")
        if fixed is not None and value != fixed[1]:
            return [f"{element_id}: {value!r} is not the fixed value {fixed[1]!r}"]
        pattern = _prefixed(element, "pattern")
        if pattern is not None and not pattern_contains(value, pattern[1]):
            return [f"{element_id}: {value!r} does not match the pattern {pattern[1]!r}"]
        return []

    def _check_type(self, element_id: str, element: Mapping[str, Any], parent: Any) -> list[str]:
        if not isinstance(parent, Mapping):
            return []
        name = element_id.rsplit(".", 1)[-1]
        allowed = {
            name.removesuffix("[x]") + code[0].upper() + code[1:]
            for code in (str(t.get("code") or "") for t in element["type"])
            if code
        }
        present = _choice_keys(parent, name)
        wrong = [key for key in present if key not in allowed]
        if wrong:
            return [f"{element_id}: {', '.join(wrong)} given, allowed {', '.join(sorted(allowed))}"]
        return []

    def _nodes(self, task: Mapping[str, Any], segments: Sequence[_Segment]) -> list[Any] | None:
        """The instances of the element ``segments`` names, or None when a slice on the way
        cannot be recognised (its discriminator values are not in the profile)."""
        nodes: list[Any] = [task]
        for index in range(1, len(segments)):
            following: list[Any] = []
            for node in nodes:
                members = self._members(node, segments[:index], segments[index])
                if members is None:
                    return None
                following.extend(members)
            nodes = following
        return nodes

    def _members(
        self, parent: Any, parent_segments: Sequence[_Segment], segment: _Segment
    ) -> list[Any] | None:
        children = _children(parent, segment.name)
        if segment.slice is None:
            return children
        slicing_id = _join([*parent_segments, _Segment(segment.name, None)])
        slice_id = _join([*parent_segments, segment])
        expected = self._discriminator_values(slicing_id, slice_id)
        if expected is None:
            return None
        return [
            child
            for child in children
            if all(value in _values_at(child, path) for path, value in expected)
        ]

    def _discriminator_values(
        self, slicing_id: str, slice_id: str
    ) -> list[tuple[str, object]] | None:
        slicing = (self.elements.get(slicing_id) or {}).get("slicing") or {}
        paths = [str(d.get("path")) for d in slicing.get("discriminator") or []]
        if not paths:
            paths = list(_DEFAULT_DISCRIMINATORS)
        expected: list[tuple[str, object]] = []
        for path in paths:
            element = self.elements.get(f"{slice_id}.{path}") or {}
            value = _prefixed(element, "fixed") or _prefixed(element, "pattern")
            if value is not None:
                expected.append((path, value[1]))
                continue
            profiles = [
                str(p)
                for t in (self.elements.get(slice_id) or {}).get("type") or []
                for p in t.get("profile") or []
            ]
            if path == "url" and profiles:
                # An extension slice is known by the url of the extension profile it names.
                expected.append((path, profiles[0].split("|", 1)[0]))
                continue
            return None
        return expected
