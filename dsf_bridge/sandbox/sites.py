"""Sandbox sites on disk and in memory: ``sandbox init`` writes a CA, per organization its server
and client certificates and a ready ``bridge.toml``, and one allow list (a transaction Bundle
with every Organization, its thumbprint and Endpoint, and optionally parent organizations with
their members' OrganizationAffiliations); :func:`build_service` turns an allow list into a
running organization's FHIR service with DSF's two standard Subscriptions.

Layout::

    DIR/ca.pem
    DIR/allow-list.json
    DIR/sandbox.json                 the DSF version the sites run
    DIR/<ID>/server.pem  server-key.pem  client.pem  client-key.pem  bridge.toml
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from dsf_bridge.dsf.identity import thumbprint
from dsf_bridge.dsf.versions import DSF_2, DsfRelease, release
from dsf_bridge.dsf.vocabulary import (
    ENDPOINT_IDENTIFIER_SYSTEM,
    FHIR_JSON,
    ORGANIZATION_IDENTIFIER_SYSTEM,
    ORGANIZATION_ROLE_SYSTEM,
    READ_ACCESS_TAG_SYSTEM,
    THUMBPRINT_EXTENSION,
)
from dsf_bridge.sandbox import DEFAULT_BASE_PORT
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.resources import MemoryResourceStore
from dsf_bridge.sandbox.service import FhirService
from dsf_bridge.sandbox.validation import attach_validator

_log = structlog.get_logger()

__all__ = [
    "ORGANIZATION_ROLES",
    "Consortium",
    "SiteFiles",
    "affiliation_entry",
    "allow_list_bundle",
    "build_service",
    "check_consortium",
    "consortium_entries",
    "init_sandbox",
    "organization_entry",
    "parent_organization_entry",
    "sandbox_release",
    "standard_subscriptions",
]

READ_ACCESS_ALL = {"system": READ_ACCESS_TAG_SYSTEM, "code": "ALL"}
_ORGANIZATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SANDBOX_FILE = "sandbox.json"

PARENT_ORGANIZATION_PROFILE = "http://dsf.dev/fhir/StructureDefinition/organization-parent"
AFFILIATION_PROFILE = "http://dsf.dev/fhir/StructureDefinition/organization-affiliation"

# The codes of DSF's CodeSystem organization-role: version 1.0.0 in DSF 1.9, 2.0.0 in DSF 2.x
# (which adds five). An affiliation's binding to them is only "preferred" in DSF's profile, so a
# server would take others; ``sandbox init`` refuses them to catch typos.
_ROLES_1 = frozenset({"UAC", "COS", "CRR", "DIC", "DMS", "DTS", "HRP", "TTP", "AMS"})
ORGANIZATION_ROLES: Mapping[str, frozenset[str]] = {
    "1.9": _ROLES_1,
    "2.1": _ROLES_1 | {"ASP", "SPR", "TSP", "PPH", "BIO"},
}

Consortium = Mapping[str, Mapping[str, Sequence[str]]]
"""Parent organization identifier -> member organization identifier -> role codes."""


@dataclass(frozen=True)
class SiteFiles:
    """Where one organization's sandbox files are."""

    organization: str
    directory: Path
    ca: Path
    allow_list: Path
    port: int

    @property
    def server_certificate(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"

    @property
    def client_certificate(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client-key.pem"

    @property
    def bridge_config(self) -> Path:
        return self.directory / "bridge.toml"

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/fhir"


def organization_entry(
    identifier: str, client_thumbprint: str, address: str
) -> list[dict[str, Any]]:
    """Allow-list entries (conditional PUTs) for one Organization and its Endpoint."""
    organization_url = f"urn:uuid:{uuid.uuid4()}"
    endpoint_url = f"urn:uuid:{uuid.uuid4()}"
    endpoint_identifier = f"{identifier}_Endpoint"
    organization = {
        "resourceType": "Organization",
        "meta": {
            "profile": ["http://dsf.dev/fhir/StructureDefinition/organization"],
            "tag": [READ_ACCESS_ALL],
        },
        "extension": [{"url": THUMBPRINT_EXTENSION, "valueString": client_thumbprint}],
        "identifier": [{"system": ORGANIZATION_IDENTIFIER_SYSTEM, "value": identifier}],
        "active": True,
        "name": identifier,
        "endpoint": [{"reference": endpoint_url, "type": "Endpoint"}],
    }
    endpoint = {
        "resourceType": "Endpoint",
        "meta": {
            "profile": ["http://dsf.dev/fhir/StructureDefinition/endpoint"],
            "tag": [READ_ACCESS_ALL],
        },
        "identifier": [{"system": ENDPOINT_IDENTIFIER_SYSTEM, "value": endpoint_identifier}],
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "hl7-fhir-rest",
        },
        "name": endpoint_identifier,
        "managingOrganization": {"reference": organization_url, "type": "Organization"},
        "payloadType": [
            {"coding": [{"system": "http://hl7.org/fhir/resource-types", "code": "Task"}]}
        ],
        "payloadMimeType": [FHIR_JSON, "application/fhir+xml"],
        "address": address,
    }
    return [
        {
            "fullUrl": organization_url,
            "resource": organization,
            "request": {
                "method": "PUT",
                "url": f"Organization?identifier={ORGANIZATION_IDENTIFIER_SYSTEM}|{identifier}",
            },
        },
        {
            "fullUrl": endpoint_url,
            "resource": endpoint,
            "request": {
                "method": "PUT",
                "url": f"Endpoint?identifier={ENDPOINT_IDENTIFIER_SYSTEM}|{endpoint_identifier}",
            },
        },
    ]


def parent_organization_entry(identifier: str) -> dict[str, Any]:
    """The allow-list entry (a conditional PUT) for a parent organization: DSF's
    ``organization-parent`` profile, an identifier and ``active``; no thumbprint, no Endpoint
    (the profile asks for neither, as in DSF's own test allow list)."""
    organization = {
        "resourceType": "Organization",
        "meta": {"profile": [PARENT_ORGANIZATION_PROFILE], "tag": [READ_ACCESS_ALL]},
        "identifier": [{"system": ORGANIZATION_IDENTIFIER_SYSTEM, "value": identifier}],
        "active": True,
        "name": identifier,
    }
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": organization,
        "request": {
            "method": "PUT",
            "url": f"Organization?identifier={ORGANIZATION_IDENTIFIER_SYSTEM}|{identifier}",
        },
    }


def affiliation_entry(
    parent: str,
    member: str,
    roles: Sequence[str],
    *,
    parent_url: str,
    member_url: str,
    endpoint_url: str,
    active: bool = True,
) -> dict[str, Any]:
    """The allow-list entry (a conditional PUT by parent and member, as DSF's test allow list
    writes it) for ``member``'s OrganizationAffiliation under ``parent``: one ``code`` per role
    (``http://dsf.dev/fhir/CodeSystem/organization-role``) and the member's Endpoint. The
    ``*_url`` arguments are the ``fullUrl``s of those resources in the same Bundle."""
    affiliation = {
        "resourceType": "OrganizationAffiliation",
        "meta": {"profile": [AFFILIATION_PROFILE], "tag": [READ_ACCESS_ALL]},
        "active": active,
        "organization": {"reference": parent_url, "type": "Organization"},
        "participatingOrganization": {"reference": member_url, "type": "Organization"},
        "code": [
            {"coding": [{"system": ORGANIZATION_ROLE_SYSTEM, "code": role}]} for role in roles
        ],
        "endpoint": [{"reference": endpoint_url, "type": "Endpoint"}],
    }
    criteria = (
        f"primary-organization:identifier={ORGANIZATION_IDENTIFIER_SYSTEM}|{parent}"
        f"&participating-organization:identifier={ORGANIZATION_IDENTIFIER_SYSTEM}|{member}"
    )
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": affiliation,
        "request": {"method": "PUT", "url": f"OrganizationAffiliation?{criteria}"},
    }


def check_consortium(
    consortium: Consortium, organizations: Sequence[str], dsf_release: DsfRelease = DSF_2
) -> None:
    """Raise :class:`ValueError` naming what is wrong with ``consortium`` (see
    :func:`init_sandbox`) for a sandbox of ``organizations`` running ``dsf_release``."""
    known_roles = ORGANIZATION_ROLES[dsf_release.name]
    for parent, affiliated in consortium.items():
        if not _ORGANIZATION_ID.match(parent):
            raise ValueError(
                f"parent organization identifier {parent!r} must be letters, digits, '.', '_' "
                "or '-'"
            )
        if parent in organizations:
            raise ValueError(
                f"{parent!r} is a site of the sandbox and cannot also be a parent organization"
            )
        if not affiliated:
            raise ValueError(f"parent organization {parent!r} has no members")
        for member, roles in affiliated.items():
            if member not in organizations:
                raise ValueError(
                    f"member {member!r} of parent organization {parent!r} is not an "
                    "organization of the sandbox"
                )
            if isinstance(roles, str) or not roles:
                raise ValueError(f"member {member!r} of {parent!r} needs a list of role codes")
            unknown = sorted(set(roles) - known_roles)
            if unknown:
                raise ValueError(
                    f"role {', '.join(unknown)} of member {member!r} is not a code of DSF "
                    f"{dsf_release.name}'s CodeSystem {ORGANIZATION_ROLE_SYSTEM} (known: "
                    f"{', '.join(sorted(known_roles))})"
                )
            if len(set(roles)) != len(roles):
                raise ValueError(f"member {member!r} of {parent!r} names a role twice")


def consortium_entries(
    consortium: Consortium,
    members: Mapping[str, tuple[str, str]],
    dsf_release: DsfRelease = DSF_2,
) -> list[dict[str, Any]]:
    """Allow-list entries for ``consortium``: each parent organization, then one
    OrganizationAffiliation per member. ``members``: organization identifier -> the
    ``fullUrl``s of its Organization and Endpoint in the same Bundle."""
    check_consortium(consortium, list(members), dsf_release)
    entries: list[dict[str, Any]] = []
    for parent, affiliated in consortium.items():
        parent_entry = parent_organization_entry(parent)
        entries.append(parent_entry)
        for member, roles in affiliated.items():
            member_url, endpoint_url = members[member]
            entries.append(
                affiliation_entry(
                    parent,
                    member,
                    roles,
                    parent_url=str(parent_entry["fullUrl"]),
                    member_url=member_url,
                    endpoint_url=endpoint_url,
                )
            )
    return entries


def allow_list_bundle(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def standard_subscriptions() -> list[dict[str, Any]]:
    """The two Subscriptions a DSF FHIR server holds for its process engine."""
    return [
        {
            "resourceType": "Subscription",
            "meta": {
                "profile": ["http://dsf.dev/fhir/StructureDefinition/subscription"],
                "tag": [{"system": READ_ACCESS_TAG_SYSTEM, "code": "LOCAL"}],
            },
            "status": "active",
            "reason": "Business Process Engine",
            "criteria": criteria,
            "channel": {"type": "websocket", "payload": FHIR_JSON},
        }
        for criteria in ("Task?status=requested", "QuestionnaireResponse?status=completed")
    ]


def build_service(
    local_organization: str,
    allow_list: dict[str, Any],
    base_url: str,
    *,
    dsf_release: DsfRelease = DSF_2,
    validate: bool | None = True,
) -> FhirService:
    """A FHIR service for ``local_organization`` with the allow list and Subscriptions loaded,
    answering as the DSF FHIR server of ``dsf_release`` does: Tasks and QuestionnaireResponses
    are validated against their profiles (DSF's base profiles of that version, read from the
    DSF reference corpus, and every profile published to it).

    ``validate``: True requires the corpus (a test oracle must never quietly turn lenient: a
    missing corpus raises :class:`FileNotFoundError`); None validates if the corpus is there
    and says so in the log otherwise (the demo on a machine without it); False validates
    nothing."""
    service = FhirService(MemoryResourceStore(), local_organization, base_url, release=dsf_release)
    if validate is not False and not attach_validator(service, dsf_release.name):
        reason = (
            "DSF's base profiles not found; set DSF_BRIDGE_REFERENCE_DIR to the DSF reference "
            "corpus (the folder with SOURCES.md)"
        )
        if validate:
            raise FileNotFoundError(f"the sandbox cannot validate as DSF does: {reason}")
        _log.warning("sandbox.validation_off", reason=reason)
    identity = service.local_identity()
    result = service.handle(identity, "POST", "", headers={}, body=allow_list)
    if result.status != 200:
        raise ValueError(f"allow list rejected: {result.resource}")
    for subscription in standard_subscriptions():
        service.create(identity, "Subscription", subscription, {})
    service.set_base_url(base_url)
    return service


def init_sandbox(
    directory: Path,
    organizations: Sequence[str],
    *,
    base_port: int = DEFAULT_BASE_PORT,
    ports: Sequence[int] | None = None,
    ca: CertificateAuthority | None = None,
    dsf_release: DsfRelease = DSF_2,
    consortium: Consortium | None = None,
) -> list[SiteFiles]:
    """Mint certificates and write the layout above; ports count up from ``base_port`` unless
    ``ports`` names one per organization. ``sandbox.json`` records the DSF version the sites
    run (``sandbox serve`` reads it).

    ``consortium``: parent organization identifier -> member organization (one of
    ``organizations``) -> DSF organization-role codes (``DIC``, ``HRP``, ``TTP``, ...). The
    allow list then also holds each parent Organization and one active OrganizationAffiliation
    per member, pointing at the member's Endpoint (as DSF's allow lists do)."""
    if ports is not None and len(ports) != len(organizations):
        raise ValueError("give one port per organization")
    for organization in organizations:
        if not _ORGANIZATION_ID.match(organization):
            raise ValueError(
                f"organization identifier {organization!r} must be letters, digits, '.', '_' "
                "or '-' (it names a directory)"
            )
    if len(set(organizations)) != len(organizations):
        raise ValueError("organization identifiers must be unique")
    if consortium:
        check_consortium(consortium, organizations, dsf_release)
    directory.mkdir(parents=True, exist_ok=True)
    ca = ca or CertificateAuthority()
    ca_path = directory / "ca.pem"
    ca.write(ca_path)
    allow_list_path = directory / "allow-list.json"
    sites: list[SiteFiles] = []
    entries: list[dict[str, Any]] = []
    members: dict[str, tuple[str, str]] = {}
    for index, organization in enumerate(organizations):
        port = ports[index] if ports is not None else base_port + index
        site = SiteFiles(organization, directory / organization, ca_path, allow_list_path, port)
        site.directory.mkdir(exist_ok=True)
        server = ca.issue_server(f"{organization} sandbox FHIR server")
        client = ca.issue_client(f"{organization} client")
        server.write(site.server_certificate, site.server_key)
        client.write(site.client_certificate, site.client_key)
        organization_entries = organization_entry(
            organization, thumbprint(client.certificate), site.base_url
        )
        entries.extend(organization_entries)
        members[organization] = (
            str(organization_entries[0]["fullUrl"]),
            str(organization_entries[1]["fullUrl"]),
        )
        site.bridge_config.write_text(bridge_toml(site))
        sites.append(site)
    if consortium:
        entries.extend(consortium_entries(consortium, members, dsf_release))
    allow_list_path.write_text(json.dumps(allow_list_bundle(entries), indent=2) + "\n")
    (directory / SANDBOX_FILE).write_text(
        json.dumps({"dsf_version": dsf_release.name}, indent=2) + "\n"
    )
    return sites


def sandbox_release(directory: Path) -> DsfRelease:
    """The DSF version ``sandbox init`` recorded for ``directory`` (2.1 for older sandboxes)."""
    path = directory / SANDBOX_FILE
    if not path.is_file():
        return DSF_2
    recorded = json.loads(path.read_text()).get("dsf_version")
    return release(str(recorded))


def bridge_toml(site: SiteFiles) -> str:
    """A bridge configuration for ``site``; keys as in :mod:`dsf_bridge.config` (``[dsf]``)."""

    def quoted(value: object) -> str:
        return json.dumps(str(value))

    return (
        f"# dsf-bridge configuration for sandbox organization {site.organization}\n"
        "[dsf]\n"
        f"fhir_base_url = {quoted(site.base_url)}\n"
        f"client_certificate = {quoted(site.client_certificate.resolve())}\n"
        f"client_key = {quoted(site.client_key.resolve())}\n"
        f"ca_certificates = [{quoted(site.ca.resolve())}]\n"
    )
