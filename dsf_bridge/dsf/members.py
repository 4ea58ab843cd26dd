"""Which organizations a process sends to: members of a parent organization by role, or named
organizations, each with the Endpoint its Tasks go to, as the local DSF FHIR server's allow list
holds them.

By role, as the Java BPE's ``EndpointProvider.getEndpoints(parent, role)`` and
``OrganizationProvider.getOrganizations(parent, role)`` ask (API v2, strict handling, paged)::

    GET OrganizationAffiliation?active=true
        &primary-organization:identifier=http://dsf.dev/sid/organization-identifier|<parent>
        &role=<system>|<code>
        &_include=OrganizationAffiliation:endpoint
        &_include=OrganizationAffiliation:participating-organization&_sort=_id

A member counts when its affiliation is active (the search says so), its Organization is
active (DSF's ``Organization::getActive`` filter) and the affiliation's Endpoint is active
(DSF's ``EndpointStatus.ACTIVE`` filter). By name: ``GET Organization?identifier=...
&_include=Organization:endpoint``, and the organization's one active Endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.vocabulary import ENDPOINT_IDENTIFIER_SYSTEM, ORGANIZATION_IDENTIFIER_SYSTEM
from dsf_bridge.errors import BridgeError

__all__ = [
    "Member",
    "MemberLookupError",
    "UnknownParentOrganizationError",
    "members_with_role",
    "organization_members",
]

_log = structlog.get_logger()


class MemberLookupError(BridgeError):
    """The targets cannot be selected as asked (bad parent or role); not retryable. A FHIR
    server that fails on the way raises :class:`~dsf_bridge.errors.RemoteError` instead."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class UnknownParentOrganizationError(MemberLookupError):
    """The parent organization is not an active Organization of the allow list."""

    def __init__(self, parent: str, reason: str) -> None:
        super().__init__(f"parent organization {parent}: {reason}")
        self.parent = parent


@dataclass(frozen=True)
class Member:
    """An organization a Task can be sent to, with the Endpoint that receives it."""

    organization: str
    endpoint_identifier: str
    endpoint_address: str


def _identifier(resource: Mapping[str, Any], system: str) -> str | None:
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, Mapping) and identifier.get("system") == system:
            value = identifier.get("value")
            if isinstance(value, str) and value:
                return value
    return None


def _key(reference: object) -> str | None:
    """``Type/id`` of a literal reference (relative, absolute or versioned)."""
    if not isinstance(reference, Mapping):
        return None
    literal = reference.get("reference")
    if not isinstance(literal, str):
        return None
    parts = literal.split("/_history/", 1)[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def _by_key(resources: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {f"{r.get('resourceType')}/{r.get('id')}": r for r in resources}


def _member(organization: Mapping[str, Any], endpoint: Mapping[str, Any]) -> Member | str:
    """The member, or why it is not one."""
    name = _identifier(organization, ORGANIZATION_IDENTIFIER_SYSTEM)
    if name is None:
        return f"Organization {organization.get('id')} has no {ORGANIZATION_IDENTIFIER_SYSTEM}"
    if organization.get("active") is not True:
        return "inactive in the allow list"
    if endpoint.get("status") != "active":
        return f"its Endpoint is {endpoint.get('status') or 'without status'}, not active"
    endpoint_identifier = _identifier(endpoint, ENDPOINT_IDENTIFIER_SYSTEM)
    address = endpoint.get("address")
    if endpoint_identifier is None or not isinstance(address, str) or not address:
        return f"its Endpoint {endpoint.get('id')} has no identifier or no address"
    return Member(name, endpoint_identifier, address.rstrip("/"))


async def _require_parent(client: FhirClient, parent: str) -> None:
    found = await client.search(
        "Organization", [("identifier", f"{ORGANIZATION_IDENTIFIER_SYSTEM}|{parent}")], strict=True
    )
    if not found:
        raise UnknownParentOrganizationError(parent, "not in the allow list")
    if not any(o.get("active") is True for o in found):
        raise UnknownParentOrganizationError(parent, "inactive in the allow list")


async def members_with_role(client: FhirClient, parent: str, role: tuple[str, str]) -> list[Member]:
    """Every organization with ``role`` (``(system, code)``, e.g.
    ``("http://dsf.dev/fhir/CodeSystem/organization-role", "DIC")``) under ``parent`` (an
    organization identifier), with the Endpoint its affiliation names; sorted by organization.
    An empty list when the parent has no such member; :class:`UnknownParentOrganizationError`
    when the allow list holds no active Organization ``parent``."""
    system, code = role
    if not parent or not code:
        raise MemberLookupError("a parent organization and a role code are required")
    await _require_parent(client, parent)
    resources = await client.search(
        "OrganizationAffiliation",
        [
            ("active", "true"),
            ("primary-organization:identifier", f"{ORGANIZATION_IDENTIFIER_SYSTEM}|{parent}"),
            ("role", f"{system}|{code}" if system else code),
            ("_include", "OrganizationAffiliation:endpoint"),
            ("_include", "OrganizationAffiliation:participating-organization"),
            ("_sort", "_id"),
        ],
        include_mode=True,
        strict=True,
    )
    included = _by_key(resources)
    members: dict[str, Member] = {}
    for affiliation in resources:
        if affiliation.get("resourceType") != "OrganizationAffiliation":
            continue
        organization = included.get(_key(affiliation.get("participatingOrganization")) or "")
        endpoints = [
            included[key]
            for key in (_key(e) for e in affiliation.get("endpoint") or [])
            if key is not None and key in included
        ]
        if organization is None or not endpoints:
            _log.warning(
                "member.skipped",
                parent=parent,
                affiliation=affiliation.get("id"),
                reason="participating organization or endpoint not returned by the server",
            )
            continue
        found = _member(organization, endpoints[0])
        if isinstance(found, str):
            _log.info(
                "member.skipped",
                parent=parent,
                organization=_identifier(organization, ORGANIZATION_IDENTIFIER_SYSTEM),
                reason=found,
            )
            continue
        members.setdefault(found.organization, found)
    return [members[name] for name in sorted(members)]


async def organization_members(
    client: FhirClient, identifiers: Sequence[str]
) -> tuple[list[Member], list[tuple[str, str]]]:
    """The named organizations (identifiers of ``http://dsf.dev/sid/organization-identifier``)
    with their Endpoints, sorted by organization, and ``(identifier, reason)`` for each name
    that is not in the allow list, inactive, or has no single active Endpoint (in the order
    given). A name given twice counts once."""
    members: dict[str, Member] = {}
    rejected: list[tuple[str, str]] = []
    for name in dict.fromkeys(identifiers):
        if not name.strip():
            rejected.append((name, "not an organization identifier (empty)"))
            continue
        resources = await client.search(
            "Organization",
            [
                ("identifier", f"{ORGANIZATION_IDENTIFIER_SYSTEM}|{name}"),
                ("_include", "Organization:endpoint"),
            ],
            include_mode=True,
            strict=True,
        )
        organizations = [r for r in resources if r.get("resourceType") == "Organization"]
        if not organizations:
            rejected.append((name, "not in the allow list"))
            continue
        organization = organizations[0]
        if organization.get("active") is not True:
            rejected.append((name, "inactive in the allow list"))
            continue
        included = _by_key(resources)
        endpoints = [
            included[key]
            for key in (_key(e) for e in organization.get("endpoint") or [])
            if key is not None and key in included
        ]
        active = [e for e in endpoints if e.get("status") == "active"]
        if len(active) != 1:
            rejected.append(
                (
                    name,
                    "has no active Endpoint"
                    if not active
                    else f"has {len(active)} active Endpoints, which one is meant is unclear",
                )
            )
            continue
        found = _member(organization, active[0])
        if isinstance(found, str):
            rejected.append((name, found))
            continue
        members[found.organization] = found
    return [members[name] for name in sorted(members)], rejected
