"""The sandbox's resource store: versioned FHIR resources in memory, and FHIR search over them.

Versions count from 1 like DSF's; ``meta.lastUpdated`` carries milliseconds and a time zone.
Search implements what the bridge and DSF use: ``_id``, ``_lastUpdated`` (``eq``, ``gt``, ``ge``,
``lt``, ``le``), ``_profile``, ``_sort=(-)_lastUpdated``, ``_count``/``_page``, ``_include`` over
reference fields, and per type the token, uri, string and reference parameters listed in
:data:`SEARCH_PARAMETERS` (with ``:exact``, ``:contains`` and ``:identifier`` modifiers).
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

__all__ = [
    "INCLUDES",
    "RESOURCE_TYPES",
    "SEARCH_PARAMETERS",
    "TYPE_PARAMETERS",
    "MemoryResourceStore",
    "SearchError",
    "SearchQuery",
    "VersionConflictError",
    "matches",
    "parse_instant",
    "walk",
]

# The resource types the DSF FHIR server (2.x) supports; others answer 404 as there.
RESOURCE_TYPES = frozenset(
    {
        "ActivityDefinition",
        "Binary",
        "Bundle",
        "CodeSystem",
        "DocumentReference",
        "Endpoint",
        "Group",
        "HealthcareService",
        "Library",
        "Location",
        "Measure",
        "MeasureReport",
        "NamingSystem",
        "Organization",
        "OrganizationAffiliation",
        "Patient",
        "Practitioner",
        "PractitionerRole",
        "Provenance",
        "Questionnaire",
        "QuestionnaireResponse",
        "ResearchStudy",
        "StructureDefinition",
        "Subscription",
        "Task",
        "ValueSet",
    }
)

Kind = Literal["token", "uri", "string", "reference", "date"]

# Parameter -> (kind, dotted path). Shared by every type: a path that does not exist on a type
# simply matches nothing, which is what a typed server would answer for an empty field too.
SEARCH_PARAMETERS: dict[str, tuple[Kind, str]] = {
    "_id": ("token", "id"),
    "_lastUpdated": ("date", "meta.lastUpdated"),
    "_profile": ("uri", "meta.profile"),
    "_tag": ("token", "meta.tag"),
    # DocumentReference: masterIdentifier too (DSF's DocumentReferenceIdentifier).
    "identifier": ("token", "identifier|masterIdentifier"),
    "status": ("token", "status"),
    "active": ("token", "active"),
    "intent": ("token", "intent"),
    "version": ("token", "version"),
    "url": ("uri", "url"),
    "address": ("uri", "address"),
    "name": ("string", "name"),
    "title": ("string", "title"),
    "criteria": ("string", "criteria"),
    "payload": ("token", "channel.payload"),
    "type": ("token", "channel.type"),
    "requester": ("reference", "requester"),
    "author": ("reference", "author"),
    "recipient": ("reference", "restriction.recipient"),
    "owner": ("reference", "owner"),
    "authored-on": ("date", "authoredOn"),
    "modified": ("date", "lastModified"),
    "organization": ("reference", "managingOrganization|organization"),
    "participating-organization": ("reference", "participatingOrganization"),
    "primary-organization": ("reference", "organization"),
    "endpoint": ("reference", "endpoint"),
    "role": ("token", "code"),
    "questionnaire": ("uri", "questionnaire"),
    "subject": ("reference", "subject"),
    # Binary (DSF's BinaryContentType: the top-level contentType, compared exactly).
    "contentType": ("token", "contentType"),
}

# Types whose search parameters follow DSF's DAO exactly (others share the table above): every
# DSF type has _id, _lastUpdated and _profile (AbstractResourceDaoJdbc), Binary adds contentType
# (BinaryDaoJdbc), DocumentReference identifier (DocumentReferenceDaoJdbc); anything else is an
# unknown parameter there (ignored with a warning, 400 with handling=strict).
_COMMON_PARAMETERS = frozenset({"_id", "_lastUpdated", "_profile"})
# OrganizationAffiliation as OrganizationAffiliationDaoJdbc lists them (2.1 and 1.9 alike).
TYPE_PARAMETERS: dict[str, frozenset[str]] = {
    "Binary": _COMMON_PARAMETERS | {"contentType"},
    "DocumentReference": _COMMON_PARAMETERS | {"identifier"},
    "OrganizationAffiliation": _COMMON_PARAMETERS
    | {
        "active",
        "endpoint",
        "identifier",
        "participating-organization",
        "primary-organization",
        "role",
    },
}

# _include targets: "Type:param" -> dotted reference path on Type. DSF also takes each with its
# target type ("Type:param:Target"; the parameters' getIncludeParameterValues).
_INCLUDE_PATHS: dict[tuple[str, str, str], str] = {
    ("Endpoint", "organization", "Organization"): "managingOrganization",
    ("Organization", "endpoint", "Endpoint"): "endpoint",
    ("OrganizationAffiliation", "endpoint", "Endpoint"): "endpoint",
    ("OrganizationAffiliation", "participating-organization", "Organization"): (
        "participatingOrganization"
    ),
    ("OrganizationAffiliation", "primary-organization", "Organization"): "organization",
}
INCLUDES: dict[str, str] = {
    name: path
    for (source, parameter, target), path in _INCLUDE_PATHS.items()
    for name in (f"{source}:{parameter}", f"{source}:{parameter}:{target}")
}

_RESULT_PARAMETERS = frozenset(
    {"_count", "_page", "_sort", "_include", "_format", "_pretty", "_summary", "_revinclude"}
)
_PREFIXES = ("eq", "ne", "gt", "ge", "lt", "le")
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 1000


Resolver = Callable[[str], "dict[str, Any] | None"]


class SearchError(ValueError):
    """A search request the sandbox cannot answer (bad value, unsupported in strict mode)."""


def now_instant() -> str:
    """The current time as a FHIR instant with milliseconds and UTC offset."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def parse_instant(value: str) -> dt.datetime:
    """A FHIR date, dateTime or instant; values without time zone are read as UTC."""
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    if len(text) == 4:
        text += "-01-01"
    elif len(text) == 7:
        text += "-01"
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise SearchError(f"not a FHIR date/time: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@dataclass
class SearchQuery:
    """A parsed search: criteria, sorting, paging and includes."""

    resource_type: str
    criteria: list[tuple[str, str | None, str]] = field(default_factory=list)
    sort: list[tuple[str, bool]] = field(default_factory=list)
    count: int = DEFAULT_PAGE_SIZE
    page: int = 1
    includes: list[str] = field(default_factory=list)
    summary_count: bool = False
    unsupported: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, resource_type: str, params: Iterable[tuple[str, str]]) -> SearchQuery:
        query = cls(resource_type)
        for raw_name, value in params:
            name, _, modifier = raw_name.partition(":")
            if name == "_count":
                query.count = _int(value, "_count", 0, MAX_PAGE_SIZE)
            elif name == "_page":
                query.page = _int(value, "_page", 1, 10**9)
            elif name == "_sort":
                for raw_item in value.split(","):
                    item = raw_item.strip()
                    descending = item.startswith("-")
                    key = item.lstrip("-")
                    if key not in SEARCH_PARAMETERS:
                        raise SearchError(f"_sort by {key!r} is not supported")
                    query.sort.append((key, descending))
            elif name == "_include":
                # DSF knows an include only on the type it belongs to.
                if value not in INCLUDES or value.partition(":")[0] != resource_type:
                    query.unsupported.append(f"_include={value}")
                else:
                    query.includes.append(value)
            elif name == "_summary":
                query.summary_count = value == "count"
            elif name in _RESULT_PARAMETERS:
                continue
            elif name in SEARCH_PARAMETERS and name in TYPE_PARAMETERS.get(
                resource_type, SEARCH_PARAMETERS
            ):
                if SEARCH_PARAMETERS[name][0] == "date":
                    # Reject a bad date now, not only once some resource is compared with it.
                    parse_instant(value[2:] if value[:2] in _PREFIXES else value)
                query.criteria.append((name, modifier or None, value))
            else:
                query.unsupported.append(raw_name)
        return query

    def matches(self, resource: dict[str, Any], resolve: Resolver | None = None) -> bool:
        return all(
            _matches_parameter(resource, name, modifier, value, resolve)
            for name, modifier, value in self.criteria
        )


def matches(resource: dict[str, Any], criteria: str) -> bool:
    """Whether ``resource`` matches a search URL like ``Task?status=requested``."""
    resource_type, _, query_string = criteria.partition("?")
    if resource.get("resourceType") != resource_type:
        return False
    query = SearchQuery.parse(resource_type, parse_qsl(query_string, keep_blank_values=True))
    return query.matches(resource)


def _int(value: str, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SearchError(f"{name} must be an integer, got {value!r}") from None
    return max(low, min(high, number))


def walk(node: Any, path: str) -> list[Any]:
    values: list[Any] = []
    for alternative in path.split("|"):
        current: list[Any] = [node]
        for part in alternative.split("."):
            following: list[Any] = []
            for item in current:
                if isinstance(item, dict) and part in item:
                    child = item[part]
                    following.extend(child if isinstance(child, list) else [child])
            current = following
        values.extend(current)
    return values


def _tokens(value: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str | int | float):
        yield None, str(value)
    elif isinstance(value, dict):
        if "coding" in value:
            for coding in value["coding"] or []:
                yield from _tokens(coding)
        elif "code" in value:
            yield value.get("system"), str(value["code"])
        elif "value" in value:
            yield value.get("system"), str(value["value"])


def _token_matches(candidate: tuple[str | None, str], wanted: str) -> bool:
    system, code = candidate
    if "|" not in wanted:
        return code == wanted
    wanted_system, wanted_code = wanted.split("|", 1)
    if wanted_system == "":
        return system is None and code == wanted_code
    if wanted_code == "":
        return system == wanted_system
    return system == wanted_system and code == wanted_code


def _matches_parameter(
    resource: dict[str, Any],
    name: str,
    modifier: str | None,
    value: str,
    resolve: Resolver | None,
) -> bool:
    kind, path = SEARCH_PARAMETERS[name]
    if name == "_id":
        return resource.get("id") in value.split(",")
    values = walk(resource, path)
    if kind == "date":
        return any(_date_matches(candidate, item) for candidate in values for item in [value])
    alternatives = value.split(",")
    if kind == "token":
        candidates = [token for item in values for token in _tokens(item)]
        return any(_token_matches(c, wanted) for c in candidates for wanted in alternatives)
    if kind == "uri":
        return _uri_matches(resource, name, values, alternatives, below=modifier == "below")
    if kind == "string":
        texts = [str(item) for item in values if isinstance(item, str)]
        for wanted in alternatives:
            for text in texts:
                if modifier == "exact" and text == wanted:
                    return True
                if modifier == "contains" and wanted.lower() in text.lower():
                    return True
                if modifier is None and text.lower().startswith(wanted.lower()):
                    return True
        return False
    # reference
    for item in values:
        if not isinstance(item, dict):
            continue
        for wanted in alternatives:
            if modifier == "identifier":
                identifiers: list[Any] = [item.get("identifier")]
                # A literal reference matches by the identifiers of the resource it points to.
                literal = item.get("reference")
                if resolve is not None and isinstance(literal, str):
                    target = resolve(literal)
                    identifiers.extend((target or {}).get("identifier") or [])
                if any(
                    _token_matches(token, wanted)
                    for identifier in identifiers
                    if isinstance(identifier, dict)
                    for token in _tokens(identifier)
                ):
                    return True
                continue
            reference = item.get("reference")
            if isinstance(reference, str) and (
                reference == wanted or reference.endswith("/" + wanted)
            ):
                return True
    return False


def _uri_matches(
    resource: dict[str, Any],
    name: str,
    values: list[Any],
    alternatives: list[str],
    *,
    below: bool = False,
) -> bool:
    """Exact uri match (``url`` with ``|version`` against the resource's version); ``:below``
    as DSF's ``ResourceProfile``: the value (``url`` or ``url|version``) is a prefix."""
    for alternative in alternatives:
        if below:
            if any(isinstance(item, str) and item.startswith(alternative) for item in values):
                return True
            continue
        wanted, version = alternative, None
        if name == "url" and "|" in alternative:
            wanted, version = alternative.split("|", 1)
        for item in values:
            if item == wanted and (version is None or resource.get("version") == version):
                return True
    return False


def _date_matches(candidate: Any, value: str) -> bool:
    if not isinstance(candidate, str):
        return False
    prefix = value[:2] if value[:2] in _PREFIXES else "eq"
    wanted = parse_instant(value[2:] if value[:2] in _PREFIXES else value)
    actual = parse_instant(candidate)
    comparisons: dict[str, Callable[[dt.datetime, dt.datetime], bool]] = {
        "eq": lambda a, b: a == b,
        "ne": lambda a, b: a != b,
        "gt": lambda a, b: a > b,
        "ge": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "le": lambda a, b: a <= b,
    }
    return comparisons[prefix](actual, wanted)


class VersionConflictError(Exception):
    """If-Match named a version that is not the current one."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"expected version {expected} does not match latest version {current}")
        self.expected = expected
        self.current = current


Listener = Callable[[dict[str, Any]], None]


class MemoryResourceStore:
    """Every resource version, kept in memory; listeners hear about creates and updates."""

    def __init__(self) -> None:
        self._versions: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self._deleted: set[tuple[str, str]] = set()
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # Snapshots make transactions atomic: a failing entry restores the state before the Bundle.
    def snapshot(self) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], set[tuple[str, str]]]:
        return copy.deepcopy(self._versions), set(self._deleted)

    def restore(
        self, state: tuple[dict[str, dict[str, list[dict[str, Any]]]], set[tuple[str, str]]]
    ) -> None:
        self._versions, self._deleted = state

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        versions = self._versions.get(resource_type, {}).get(resource_id)
        if not versions or (resource_type, resource_id) in self._deleted:
            return None
        return copy.deepcopy(versions[-1])

    def read_version(
        self, resource_type: str, resource_id: str, version: int
    ) -> dict[str, Any] | None:
        versions = self._versions.get(resource_type, {}).get(resource_id)
        if not versions or not 1 <= version <= len(versions):
            return None
        return copy.deepcopy(versions[version - 1])

    def is_deleted(self, resource_type: str, resource_id: str) -> bool:
        return (resource_type, resource_id) in self._deleted

    def create(self, resource: dict[str, Any], *, resource_id: str | None = None) -> dict[str, Any]:
        stored = copy.deepcopy(resource)
        resource_type = str(stored["resourceType"])
        stored["id"] = resource_id or str(uuid.uuid4())
        meta = dict(stored.get("meta") or {})
        meta["versionId"] = "1"
        meta["lastUpdated"] = now_instant()
        stored["meta"] = meta
        self._versions.setdefault(resource_type, {})[stored["id"]] = [stored]
        self._notify(stored)
        return copy.deepcopy(stored)

    def update(
        self, resource: dict[str, Any], *, expected_version: int | None = None
    ) -> dict[str, Any]:
        resource_type, resource_id = str(resource["resourceType"]), str(resource["id"])
        versions = self._versions[resource_type][resource_id]
        current = len(versions)
        if expected_version is not None and expected_version != current:
            raise VersionConflictError(expected_version, current)
        stored = copy.deepcopy(resource)
        meta = dict(stored.get("meta") or {})
        meta["versionId"] = str(current + 1)
        meta["lastUpdated"] = now_instant()
        stored["meta"] = meta
        versions.append(stored)
        self._deleted.discard((resource_type, resource_id))
        self._notify(stored)
        return copy.deepcopy(stored)

    def delete(self, resource_type: str, resource_id: str) -> bool:
        if self.read(resource_type, resource_id) is None:
            return False
        self._deleted.add((resource_type, resource_id))
        return True

    def purge(self, resource_type: str, resource_id: str) -> None:
        """Remove every version of a resource (DSF's ``$permanent-delete``)."""
        self._versions.get(resource_type, {}).pop(resource_id, None)
        self._deleted.discard((resource_type, resource_id))

    def history(
        self, resource_type: str | None = None, resource_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Every stored version, newest first: of one resource, one type, or all types."""
        types = [resource_type] if resource_type is not None else sorted(self._versions)
        found: list[dict[str, Any]] = []
        for name in types:
            for stored_id, versions in self._versions.get(name, {}).items():
                if resource_id is None or stored_id == resource_id:
                    found.extend(copy.deepcopy(v) for v in versions)
        found.sort(key=lambda r: str(r["meta"]["lastUpdated"]), reverse=True)
        return found

    def all(self, resource_type: str) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(versions[-1])
            for resource_id, versions in self._versions.get(resource_type, {}).items()
            if (resource_type, resource_id) not in self._deleted
        ]

    def search(self, query: SearchQuery) -> list[dict[str, Any]]:
        """All matches of ``query``, sorted, as copies; paging is the caller's business."""
        return [copy.deepcopy(r) for r in self.stored_matches(query)]

    def stored_matches(self, query: SearchQuery) -> list[dict[str, Any]]:
        """All matches of ``query``, sorted: the stored versions themselves, not copies, so that
        a search over many resources copies only the page it answers with (as a database reads
        only the rows of its page). The caller must not change them; it copies what it hands
        out."""
        found = [
            versions[-1]
            for resource_id, versions in self._versions.get(query.resource_type, {}).items()
            if (query.resource_type, resource_id) not in self._deleted
            and query.matches(versions[-1], self.resolve)
        ]
        for key, descending in reversed(query.sort):
            kind, path = SEARCH_PARAMETERS[key]

            def sort_key(resource: dict[str, Any], path: str = path, kind: Kind = kind) -> Any:
                values = walk(resource, path)
                if not values:
                    return (1, "")
                if kind == "date":
                    return (0, parse_instant(str(values[0])).timestamp())
                return (0, str(values[0]))

            found.sort(key=sort_key, reverse=descending)
        return found

    def resolve(self, reference: str) -> dict[str, Any] | None:
        """A literal relative reference ``Type/id`` (``/_history/n`` ignored)."""
        parts = reference.split("/")
        if len(parts) < 2 or parts[0] not in RESOURCE_TYPES:
            return None
        return self.read(parts[0], parts[1])

    def _notify(self, resource: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            listener(copy.deepcopy(resource))
