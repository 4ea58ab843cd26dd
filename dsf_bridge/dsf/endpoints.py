"""Where a Task goes: resolving a process target to the remote FHIR base URL and organization.

A target (the ``target`` variable a send handler or a multi-instance loop provides, as the Java
BPE's ``Target``) names the recipient by any of: ``endpointUrl`` (the remote FHIR base URL),
``endpointIdentifier`` (``http://dsf.dev/sid/endpoint-identifier``) or
``organizationIdentifier`` (``http://dsf.dev/sid/organization-identifier``). Endpoints and
Organizations are looked up on the local FHIR server, which holds the allow list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.vocabulary import ENDPOINT_IDENTIFIER_SYSTEM, ORGANIZATION_IDENTIFIER_SYSTEM
from dsf_bridge.errors import BridgeError

__all__ = ["ResolvedTarget", "TargetError", "resolve_target"]


class TargetError(BridgeError):
    """The target cannot be resolved from the allow list; not retryable."""


@dataclass(frozen=True, slots=True)
class ResolvedTarget:
    address: str
    organization: str


def _text(target: Mapping[str, object], *keys: str) -> str | None:
    for key in keys:
        value = target.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _identifier(resource: Mapping[str, Any], system: str) -> str | None:
    for identifier in resource.get("identifier") or []:
        if identifier.get("system") == system and identifier.get("value"):
            return str(identifier["value"])
    return None


async def _organization_of_endpoint(client: FhirClient, endpoint: Mapping[str, Any]) -> str:
    reference = endpoint.get("managingOrganization") or {}
    logical = (reference.get("identifier") or {}) if isinstance(reference, Mapping) else {}
    if logical.get("system") == ORGANIZATION_IDENTIFIER_SYSTEM and logical.get("value"):
        return str(logical["value"])
    literal = reference.get("reference") if isinstance(reference, Mapping) else None
    if isinstance(literal, str) and literal.startswith("Organization/"):
        organization = await client.read("Organization", literal.split("/", 1)[1])
        value = _identifier(organization, ORGANIZATION_IDENTIFIER_SYSTEM)
        if value:
            return value
    raise TargetError(f"Endpoint {endpoint.get('id')} names no managing organization")


async def resolve_target(client: FhirClient, target: Mapping[str, object] | None) -> ResolvedTarget:
    """The base URL and organization identifier ``target`` designates."""
    if not target:
        raise TargetError("the send element has no target (set the 'target' variable)")
    organization = _text(target, "organizationIdentifier", "organizationIdentifierValue")
    url = _text(target, "endpointUrl", "endpointAddress")
    endpoint_id = _text(target, "endpointIdentifier", "endpointIdentifierValue")
    endpoint: Mapping[str, Any] | None = None
    if endpoint_id is not None:
        found = await client.search(
            "Endpoint",
            [("identifier", f"{ENDPOINT_IDENTIFIER_SYSTEM}|{endpoint_id}"), ("status", "active")],
        )
        if not found:
            raise TargetError(f"no active Endpoint {endpoint_id} in the allow list")
        endpoint = found[0]
    elif url is None and organization is not None:
        organizations = await client.search(
            "Organization", [("identifier", f"{ORGANIZATION_IDENTIFIER_SYSTEM}|{organization}")]
        )
        if not organizations:
            raise TargetError(f"no Organization {organization} in the allow list")
        found = await client.search(
            "Endpoint",
            [("organization", f"Organization/{organizations[0]['id']}"), ("status", "active")],
        )
        if not found:
            raise TargetError(f"Organization {organization} has no active Endpoint")
        endpoint = found[0]
    if endpoint is not None:
        url = url or str(endpoint.get("address") or "")
        organization = organization or await _organization_of_endpoint(client, endpoint)
    if not url:
        raise TargetError(f"target {dict(target)} names no endpoint")
    if organization is None:
        found = await client.search("Endpoint", [("address", url), ("status", "active")])
        if not found:
            raise TargetError(f"no active Endpoint with address {url} in the allow list")
        organization = await _organization_of_endpoint(client, found[0])
    return ResolvedTarget(url.rstrip("/"), organization)
