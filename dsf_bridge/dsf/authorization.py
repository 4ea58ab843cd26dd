"""Process authorization as DSF defines it: may this requester ask this recipient to run this
message of this process? Judged by the ``extension-process-authorization`` entries of the
process's ActivityDefinition (facts from DSF's ``ProcessAuthorizationHelperImpl``).

One entry per message name: the message name, the Task profiles it admits, and requester and
recipient codings from ``http://dsf.dev/fhir/CodeSystem/process-authorization``:

- ``LOCAL_ALL`` / ``REMOTE_ALL``: any local / remote organization;
- ``LOCAL_ORGANIZATION`` / ``REMOTE_ORGANIZATION``: the one named in the coding's
  ``extension-process-authorization-organization``;
- ``LOCAL_ROLE`` / ``REMOTE_ROLE``: any organization that holds the role under the parent
  organization named in ``extension-process-authorization-parent-organization-role``, by an
  active OrganizationAffiliation;
- ``*_PRACTITIONER`` variants: never match an organization identity (as in DSF).

A Task profile matches an admitted one exactly, or when it equals the admitted profile without
its version (a Task may name ``.../task-ping`` where ``.../task-ping|1.0`` is admitted). The DSF
FHIR server checks this when a Task is created; the bridge checks it again before any process
step (defence in depth). The functions are pure (the
caller supplies the ActivityDefinition and the OrganizationAffiliations); :class:`TaskAuthorizer`
fetches those from the local FHIR server for the bridge's intake.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.tasks import TaskMessage, recipient_identifier, requester_identifier
from dsf_bridge.dsf.vocabulary import (
    ORGANIZATION_IDENTIFIER_SYSTEM,
    PROCESS_AUTHORIZATION_EXTENSION,
    PROCESS_AUTHORIZATION_ORGANIZATION_EXTENSION,
    PROCESS_AUTHORIZATION_PARENT_ORGANIZATION_ROLE_EXTENSION,
    PROCESS_AUTHORIZATION_SYSTEM,
)

__all__ = [
    "Party",
    "TaskAuthorizer",
    "authorization_denied",
    "authorization_entry",
    "coding_authorizes",
    "has_role",
    "identifier_values",
    "parent_organization_role",
]


@dataclass(frozen=True, slots=True)
class Party:
    """An organization as authorization sees it: identifier, local or remote, active or not."""

    identifier: str
    local: bool
    active: bool = True


def identifier_values(resource: Mapping[str, Any], system: str) -> list[str]:
    return [
        str(i["value"])
        for i in resource.get("identifier") or []
        if isinstance(i, Mapping) and i.get("system") == system and i.get("value")
    ]


def authorization_entry(
    activity_definition: Mapping[str, Any], message_name: str, profiles: Sequence[str]
) -> Mapping[str, Any] | None:
    """The process-authorization extension for ``message_name`` admitting one of ``profiles``."""
    for extension in activity_definition.get("extension") or []:
        if extension.get("url") != PROCESS_AUTHORIZATION_EXTENSION:
            continue
        parts = extension.get("extension") or []
        names = [p.get("valueString") for p in parts if p.get("url") == "message-name"]
        admitted = [str(p.get("valueCanonical")) for p in parts if p.get("url") == "task-profile"]
        if message_name not in names:
            continue
        if any(
            profile == allowed or profile == allowed.split("|")[0]
            for profile in profiles
            for allowed in admitted
        ):
            return dict(extension)
    return None


def _codings(entry: Mapping[str, Any], url: str) -> list[Mapping[str, Any]]:
    return [
        e["valueCoding"]
        for e in entry.get("extension") or []
        if e.get("url") == url and isinstance(e.get("valueCoding"), Mapping)
    ]


def _organization_identifiers(reference: object) -> set[str]:
    if not isinstance(reference, Mapping):
        return set()
    identifier = reference.get("identifier")
    if (
        isinstance(identifier, Mapping)
        and identifier.get("system") == ORGANIZATION_IDENTIFIER_SYSTEM
        and identifier.get("value")
    ):
        return {str(identifier["value"])}
    return set()


def has_role(
    party: Party,
    parent: str,
    role: Mapping[str, Any],
    affiliations: Iterable[Mapping[str, Any]],
    resolve: Mapping[str, str] | None = None,
) -> bool:
    """Whether an active OrganizationAffiliation gives ``party`` ``role`` under ``parent``.

    References in affiliations may be logical (by organization identifier) or literal
    (``Organization/<id>``); ``resolve`` maps literal references to identifiers.
    """
    lookup = resolve or {}
    for affiliation in affiliations:
        if affiliation.get("active") is False:
            continue
        parents = _organization_identifiers(affiliation.get("organization"))
        members = _organization_identifiers(affiliation.get("participatingOrganization"))
        for name, found in (("organization", parents), ("participatingOrganization", members)):
            literal = (affiliation.get(name) or {}).get("reference")
            if isinstance(literal, str) and literal in lookup:
                found.add(lookup[literal])
        if parent not in parents or party.identifier not in members:
            continue
        for concept in affiliation.get("code") or []:
            for coding in concept.get("coding") or []:
                if coding.get("system") == role.get("system") and coding.get("code") == role.get(
                    "code"
                ):
                    return True
    return False


def parent_organization_role(
    extension: Mapping[str, Any],
) -> tuple[str, Mapping[str, Any]] | None:
    """The (parent organization identifier, role coding) of a DSF parent-organization-role
    extension (used by process authorization and by read-access tags alike)."""
    parts = extension.get("extension") or []
    parent = next(
        (p.get("valueIdentifier") for p in parts if p.get("url") == "parent-organization"), None
    )
    role = next((p.get("valueCoding") for p in parts if p.get("url") == "organization-role"), None)
    if (
        isinstance(parent, Mapping)
        and parent.get("system") == ORGANIZATION_IDENTIFIER_SYSTEM
        and parent.get("value")
        and isinstance(role, Mapping)
        and role.get("system")
        and role.get("code")
    ):
        return str(parent["value"]), role
    return None


def coding_authorizes(
    coding: Mapping[str, Any],
    party: Party,
    affiliations: Iterable[Mapping[str, Any]] = (),
    resolve: Mapping[str, str] | None = None,
) -> bool:
    """Whether one requester or recipient coding admits ``party``."""
    if coding.get("system") != PROCESS_AUTHORIZATION_SYSTEM or not party.active:
        return False
    code = str(coding.get("code"))
    if code.endswith("_PRACTITIONER"):
        return False
    wants_local = code.startswith("LOCAL_")
    if not wants_local and not code.startswith("REMOTE_"):
        return False
    if party.local != wants_local:
        return False
    kind = code.split("_", 1)[1]
    extensions = coding.get("extension") or []
    if kind == "ALL":
        return True
    if kind == "ORGANIZATION":
        return any(
            e.get("url") == PROCESS_AUTHORIZATION_ORGANIZATION_EXTENSION
            and (e.get("valueIdentifier") or {}).get("system") == ORGANIZATION_IDENTIFIER_SYSTEM
            and (e.get("valueIdentifier") or {}).get("value") == party.identifier
            for e in extensions
        )
    if kind == "ROLE":
        for extension in extensions:
            if extension.get("url") != PROCESS_AUTHORIZATION_PARENT_ORGANIZATION_ROLE_EXTENSION:
                continue
            parent_role = parent_organization_role(extension)
            if parent_role is not None and has_role(
                party, parent_role[0], parent_role[1], affiliations, resolve
            ):
                return True
    return False


def authorization_denied(
    activity_definition: Mapping[str, Any],
    *,
    message_name: str,
    profiles: Sequence[str],
    requester: Party | None,
    recipient: Party,
    affiliations: Iterable[Mapping[str, Any]] = (),
    resolve: Mapping[str, str] | None = None,
) -> str | None:
    """Why the ActivityDefinition does not authorize this Task, or ``None`` when it does.

    ``requester`` ``None`` skips the requester check (DSF does so on the in-progress update).
    """
    entry = authorization_entry(activity_definition, message_name, profiles)
    if entry is None:
        return (
            f"ActivityDefinition {activity_definition.get('url')}|"
            f"{activity_definition.get('version')} authorizes no message {message_name!r} "
            f"with Task profile {list(profiles)}"
        )
    affiliations = list(affiliations)
    recipient_ok = any(
        coding_authorizes(coding, recipient, affiliations, resolve)
        for coding in _codings(entry, "recipient")
    )
    requester_ok = requester is None or any(
        coding_authorizes(coding, requester, affiliations, resolve)
        for coding in _codings(entry, "requester")
    )
    if not recipient_ok and not requester_ok:
        return "process not allowed for requester and recipient"
    if not recipient_ok:
        return "process not allowed for recipient (local organization)"
    if not requester_ok:
        return "process not allowed for requester"
    return None


class TaskAuthorizer:
    """Checks received Tasks against the local FHIR server's ActivityDefinitions, Organizations
    and OrganizationAffiliations (fetched over the mTLS client and cached for ``cache_ttl``)."""

    def __init__(
        self,
        client: FhirClient,
        local_identifier: str,
        *,
        cache_ttl: dt.timedelta = dt.timedelta(seconds=60),
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.client = client
        self.local_identifier = local_identifier
        self.cache_ttl = cache_ttl
        self.clock = clock
        self._cache: dict[tuple[str, ...], tuple[dt.datetime, Any]] = {}

    async def _cached(self, key: tuple[str, ...], fetch: Callable[[], Awaitable[Any]]) -> Any:
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = await fetch()
        self._cache[key] = (now + self.cache_ttl, value)
        return value

    async def denied(self, task: Mapping[str, Any], message: TaskMessage) -> str | None:
        """Why this site must not run ``task``, in words an administrator can act on."""
        requester = requester_identifier(task)
        if requester is None:
            return f"Task.requester names no organization ({ORGANIZATION_IDENTIFIER_SYSTEM})"
        recipient = recipient_identifier(task)
        if recipient != self.local_identifier:
            return (
                f"Task.restriction.recipient is {recipient or '(missing)'}, not this site's "
                f"organization {self.local_identifier}"
            )
        process_url, _, version = message.process.canonical.partition("|")
        definitions = await self._cached(
            ("ActivityDefinition", process_url, version),
            lambda: self.client.search(
                "ActivityDefinition", [("url", process_url), ("version", version)]
            ),
        )
        usable = [d for d in definitions if d.get("status") in ("draft", "active")]
        if not usable:
            return (
                f"no ActivityDefinition {process_url}|{version} on this site's FHIR server: "
                "the process is not installed here"
            )
        organizations = await self._cached(
            ("Organization", requester),
            lambda: self.client.search(
                "Organization", [("identifier", f"{ORGANIZATION_IDENTIFIER_SYSTEM}|{requester}")]
            ),
        )
        if not organizations:
            return f"requester {requester} is not an organization in this site's allow list"
        affiliations = await self._cached(
            ("OrganizationAffiliation",),
            lambda: self.client.search("OrganizationAffiliation", [("active", "true")]),
        )
        party = Party(
            requester,
            local=requester == self.local_identifier,
            active=organizations[0].get("active", True) is not False,
        )
        profiles = [message.profile] if message.profile else []
        return authorization_denied(
            usable[0],
            message_name=message.message_name,
            profiles=profiles,
            requester=party,
            recipient=Party(self.local_identifier, local=True),
            affiliations=affiliations,
        )
