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
- ``LOCAL_ALL_PRACTITIONER``, ``LOCAL_ORGANIZATION_PRACTITIONER``, ``LOCAL_ROLE_PRACTITIONER``
  (requesters only): a practitioner of the local organization (a user of the DSF FHIR UI, a
  client certificate of the server's role config) holding the practitioner role
  (``http://dsf.dev/fhir/CodeSystem/practitioner-role``) the coding names, in
  ``extension-process-authorization-practitioner``, ``...-organization-practitioner`` (with the
  organization) or ``...-parent-organization-role-practitioner`` (with parent organization and
  role). They never match an organization identity, and the codings without ``_PRACTITIONER``
  never match a practitioner, except that DSF 2.x lets a practitioner with the role
  ``DSF_ADMIN`` pass every local coding (``All``, ``Organization``, ``Role`` of its
  ``dev.dsf.fhir.authorization.process``; 1.9 has no such exception).

A practitioner requester is a :class:`Party` with ``practitioner`` set (its identifier, the
e-mail of its certificate or login) and the identifier of its organization, always the local
one. DSF 2.x names it in ``Task.requester`` (``type`` ``Practitioner``, identifier system
``http://dsf.dev/sid/practitioner-identifier``); DSF 1.9 names the practitioner's organization
instead, so a 1.9 Task does not tell a practitioner from its organization. Practitioner roles
live in the FHIR server's role config, not in FHIR resources: the bridge cannot see them and
passes ``practitioner_roles=None`` (unknown), which trusts the FHIR server's role check for
``*_PRACTITIONER`` codings and never assumes ``DSF_ADMIN``.

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
from dsf_bridge.dsf.tasks import TaskMessage, recipient_identifier, shortened
from dsf_bridge.dsf.versions import DsfRelease
from dsf_bridge.dsf.vocabulary import (
    ORGANIZATION_IDENTIFIER_SYSTEM,
    PRACTITIONER_IDENTIFIER_SYSTEM,
    PROCESS_AUTHORIZATION_EXTENSION,
    PROCESS_AUTHORIZATION_ORGANIZATION_EXTENSION,
    PROCESS_AUTHORIZATION_PARENT_ORGANIZATION_ROLE_EXTENSION,
    PROCESS_AUTHORIZATION_SYSTEM,
)

__all__ = [
    "DSF_ADMIN",
    "PRACTITIONER_ROLE_SYSTEM",
    "Party",
    "TaskAuthorizer",
    "authorization_denied",
    "authorization_entry",
    "coding_authorizes",
    "has_role",
    "identifier_values",
    "parent_organization_role",
]


PRACTITIONER_ROLE_SYSTEM = "http://dsf.dev/fhir/CodeSystem/practitioner-role"
DSF_ADMIN = (PRACTITIONER_ROLE_SYSTEM, "DSF_ADMIN")
_PRACTITIONER_EXTENSION = (
    "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization-practitioner"
)
_ORGANIZATION_PRACTITIONER_EXTENSION = "http://dsf.dev/fhir/StructureDefinition/extension-process-authorization-organization-practitioner"
_PARENT_ORGANIZATION_ROLE_PRACTITIONER_EXTENSION = (
    "http://dsf.dev/fhir/StructureDefinition/"
    "extension-process-authorization-parent-organization-role-practitioner"
)


@dataclass(frozen=True, slots=True)
class Party:
    """A requester or recipient as authorization sees it.

    ``identifier`` is the organization (for a practitioner: its organization); ``practitioner``
    the practitioner identifier when the party is a practitioner. ``practitioner_roles`` holds
    (system, code) pairs, or None when they are unknown (the bridge: roles live in the FHIR
    server's role config). ``dsf_admin``: a practitioner DSF 2.x lets pass every local coding.
    """

    identifier: str
    local: bool
    active: bool = True
    practitioner: str | None = None
    practitioner_roles: frozenset[tuple[str, str]] | None = frozenset()
    dsf_admin: bool = False

    def has_practitioner_role(self, role: tuple[str, str]) -> bool:
        """Whether this practitioner holds ``role``; unknown roles count as held (the FHIR
        server checked them when it accepted the Task)."""
        if self.practitioner is None:
            return False
        return self.practitioner_roles is None or role in self.practitioner_roles


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


def _value_coding(extension: Mapping[str, Any], url: str) -> tuple[str, str] | None:
    for part in extension.get("extension") or []:
        coding = part.get("valueCoding")
        if (
            part.get("url") == url
            and isinstance(coding, Mapping)
            and coding.get("system")
            and coding.get("code")
        ):
            return str(coding["system"]), str(coding["code"])
    return None


def _practitioner_detail(
    coding: Mapping[str, Any], kind: str
) -> tuple[tuple[str, str], Mapping[str, Any]] | None:
    """(practitioner role, the detail extension) of a ``*_PRACTITIONER`` coding; None when the
    coding lacks exactly one well-formed detail extension (DSF then ignores the coding)."""
    url = {
        "ALL": _PRACTITIONER_EXTENSION,
        "ORGANIZATION": _ORGANIZATION_PRACTITIONER_EXTENSION,
        "ROLE": _PARENT_ORGANIZATION_ROLE_PRACTITIONER_EXTENSION,
    }.get(kind)
    details = [e for e in coding.get("extension") or [] if e.get("url") == url]
    if url is None or len(details) != 1:
        return None
    detail = details[0]
    if kind == "ALL":
        value = detail.get("valueCoding")
        if isinstance(value, Mapping) and value.get("system") and value.get("code"):
            return (str(value["system"]), str(value["code"])), detail
        return None
    role = _value_coding(detail, "practitioner-role")
    return None if role is None else (role, detail)


def _organization_matches(extension: Mapping[str, Any], url: str, party: Party) -> bool:
    """``extension-process-authorization-organization`` (``valueIdentifier``) or the
    ``organization`` part of ``...-organization-practitioner`` names ``party``'s organization."""
    if extension.get("url") != url:
        return False
    values = [extension.get("valueIdentifier")] + [
        p.get("valueIdentifier")
        for p in extension.get("extension") or []
        if p.get("url") == "organization"
    ]
    return any(
        isinstance(v, Mapping)
        and v.get("system") == ORGANIZATION_IDENTIFIER_SYSTEM
        and v.get("value") == party.identifier
        for v in values
    )


def coding_authorizes(
    coding: Mapping[str, Any],
    party: Party,
    affiliations: Iterable[Mapping[str, Any]] = (),
    resolve: Mapping[str, str] | None = None,
) -> bool:
    """Whether one requester or recipient coding admits ``party`` (organization or
    practitioner), as DSF's ``All``, ``Organization`` and ``Role`` decide it."""
    if coding.get("system") != PROCESS_AUTHORIZATION_SYSTEM or not party.active:
        return False
    code = str(coding.get("code"))
    for_practitioner = code.endswith("_PRACTITIONER")
    base = code.removesuffix("_PRACTITIONER")
    wants_local = base.startswith("LOCAL_")
    if not wants_local and not base.startswith("REMOTE_"):
        return False
    if (for_practitioner and not wants_local) or party.local != wants_local:
        return False
    kind = base.split("_", 1)[1]
    if for_practitioner:
        detail = _practitioner_detail(coding, kind)
        if detail is None:
            return False
        role, detail_extension = detail
        if not (party.has_practitioner_role(role) or (party.practitioner and party.dsf_admin)):
            return False
        extensions: list[Mapping[str, Any]] = [detail_extension]
        organization_url = _ORGANIZATION_PRACTITIONER_EXTENSION
        role_url = _PARENT_ORGANIZATION_ROLE_PRACTITIONER_EXTENSION
    else:
        if party.practitioner is not None and not party.dsf_admin:
            return False
        extensions = list(coding.get("extension") or [])
        organization_url = PROCESS_AUTHORIZATION_ORGANIZATION_EXTENSION
        role_url = PROCESS_AUTHORIZATION_PARENT_ORGANIZATION_ROLE_EXTENSION
    if kind == "ALL":
        return True
    if kind == "ORGANIZATION":
        return any(_organization_matches(e, organization_url, party) for e in extensions)
    if kind == "ROLE":
        for extension in extensions:
            if extension.get("url") != role_url:
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
            f"with Task profile {shortened(list(profiles))}"
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
    who = "requester"
    if requester is not None and requester.practitioner is not None:
        who = (
            f"requester (practitioner {requester.practitioner}: no matching "
            "LOCAL_ALL_PRACTITIONER, LOCAL_ORGANIZATION_PRACTITIONER or LOCAL_ROLE_PRACTITIONER "
            "authorization)"
        )
    if not recipient_ok and not requester_ok:
        return f"process not allowed for {who} and recipient"
    if not recipient_ok:
        return "process not allowed for recipient (local organization)"
    if not requester_ok:
        return f"process not allowed for {who}"
    return None


def _requester_identifier(task: Mapping[str, Any]) -> tuple[str, str] | None:
    """(system, value) of ``Task.requester.identifier`` when it names an organization or a
    practitioner."""
    reference = task.get("requester")
    identifier = reference.get("identifier") if isinstance(reference, Mapping) else None
    if not isinstance(identifier, Mapping) or not identifier.get("value"):
        return None
    system = identifier.get("system")
    if system not in (ORGANIZATION_IDENTIFIER_SYSTEM, PRACTITIONER_IDENTIFIER_SYSTEM):
        return None
    return str(system), str(identifier["value"])


class TaskAuthorizer:
    """Checks received Tasks against the local FHIR server's ActivityDefinitions, Organizations
    and OrganizationAffiliations (fetched over the mTLS client and cached for ``cache_ttl``).

    A requester is an organization of the allow list or (DSF 2.x) a practitioner of this site
    (``Task.requester.identifier`` in ``http://dsf.dev/sid/practitioner-identifier``), admitted
    by a ``LOCAL_*_PRACTITIONER`` coding only: its practitioner roles are the FHIR server's to
    check, and ``DSF_ADMIN`` (which DSF 2.x lets pass the other local codings) cannot be seen
    here. With ``release`` 1.x, whose FHIR server writes the organization as requester of a
    practitioner's Task, the local organization as requester is also admitted by a
    ``LOCAL_*_PRACTITIONER`` coding.
    """

    def __init__(
        self,
        client: FhirClient,
        local_identifier: str,
        *,
        cache_ttl: dt.timedelta = dt.timedelta(seconds=60),
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        release: DsfRelease | None = None,
    ) -> None:
        self.client = client
        self.local_identifier = local_identifier
        self.cache_ttl = cache_ttl
        self.clock = clock
        self.release = release
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
        requester = _requester_identifier(task)
        if requester is None:
            return (
                f"Task.requester names no organization ({ORGANIZATION_IDENTIFIER_SYSTEM}) and no "
                f"practitioner ({PRACTITIONER_IDENTIFIER_SYSTEM})"
            )
        recipient = recipient_identifier(task)
        if recipient != self.local_identifier:
            return (
                f"Task.restriction.recipient is {shortened(recipient or '(missing)')}, not "
                f"this site's organization {self.local_identifier}"
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
        system, value = requester
        # A practitioner belongs to the local organization (DSF's PractitionerIdentity).
        organization = value if system == ORGANIZATION_IDENTIFIER_SYSTEM else self.local_identifier
        organizations = await self._cached(
            ("Organization", organization),
            lambda: self.client.search(
                "Organization",
                [("identifier", f"{ORGANIZATION_IDENTIFIER_SYSTEM}|{organization}")],
            ),
        )
        if not organizations:
            return f"requester {organization} is not an organization in this site's allow list"
        affiliations = await self._cached(
            ("OrganizationAffiliation",),
            lambda: self.client.search("OrganizationAffiliation", [("active", "true")]),
        )
        party = Party(
            organization,
            local=organization == self.local_identifier,
            active=organizations[0].get("active", True) is not False,
            practitioner=value if system == PRACTITIONER_IDENTIFIER_SYSTEM else None,
            practitioner_roles=None,
        )
        profiles = [message.profile] if message.profile else []

        def decide(requester_party: Party) -> str | None:
            return authorization_denied(
                usable[0],
                message_name=message.message_name,
                profiles=profiles,
                requester=requester_party,
                recipient=Party(self.local_identifier, local=True),
                affiliations=affiliations,
            )

        reason = decide(party)
        if (
            reason is not None
            and self.release is not None
            and self.release.major < 2
            and party.practitioner is None
            and party.local
            and decide(
                Party(
                    organization,
                    local=True,
                    practitioner="(a practitioner)",
                    practitioner_roles=None,
                )
            )
            is None
        ):
            # DSF 1.x: the local organization as requester may stand for one of its
            # practitioners, whom the FHIR server authorized.
            return None
        return reason
