"""The local organization: which Organization of the allow list this site is.

DSF finds it by the Endpoint whose address is the site's own FHIR base URL:
``GET Endpoint?status=active&address=<base URL>&_include=Endpoint:organization``. Its identifier
(system ``http://dsf.dev/sid/organization-identifier``) names the site in Tasks; its thumbprints
must include the one of the client certificate the bridge presents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.vocabulary import ORGANIZATION_IDENTIFIER_SYSTEM, THUMBPRINT_EXTENSION
from dsf_bridge.errors import BridgeError

__all__ = ["LocalOrganization", "LocalOrganizationError", "find_local_organization"]


class LocalOrganizationError(BridgeError):
    """The local FHIR server does not know this site as an organization; not retryable."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@dataclass(frozen=True)
class LocalOrganization:
    """The site's Organization and Endpoint as the local DSF FHIR server holds them."""

    identifier: str
    thumbprints: tuple[str, ...]
    organization: dict[str, Any]
    endpoint: dict[str, Any]

    def require_thumbprint(self, thumbprint: str) -> None:
        """Fail when the client certificate in use is not one of the organization's."""
        if thumbprint.lower() not in self.thumbprints:
            raise LocalOrganizationError(
                f"the client certificate (thumbprint {thumbprint}) is not registered for "
                f"organization {self.identifier}; add its thumbprint to the allow list"
            )


async def find_local_organization(client: FhirClient, base_url: str) -> LocalOrganization:
    """Look the site up by its Endpoint address on the local FHIR server."""
    address = base_url.rstrip("/")
    resources = await client.search(
        "Endpoint",
        [("status", "active"), ("address", address), ("_include", "Endpoint:organization")],
        include_mode=True,
    )
    endpoints = [r for r in resources if r.get("resourceType") == "Endpoint"]
    organizations = {
        f"Organization/{r.get('id')}": r
        for r in resources
        if r.get("resourceType") == "Organization"
    }
    if len(endpoints) != 1:
        raise LocalOrganizationError(
            f"expected exactly one active Endpoint with address {address} on the local FHIR "
            f"server, found {len(endpoints)}; dsf.fhir_base_url must equal the Endpoint.address "
            "of this site in the allow list"
        )
    endpoint = endpoints[0]
    reference = str((endpoint.get("managingOrganization") or {}).get("reference", ""))
    organization = organizations.get(reference) or next(
        (o for key, o in organizations.items() if reference.endswith(key)), None
    )
    if organization is None:
        raise LocalOrganizationError(
            f"Endpoint {endpoint.get('id')} with address {address} names no managing "
            "Organization the server returned"
        )
    identifiers = [
        str(i["value"])
        for i in organization.get("identifier") or []
        if i.get("system") == ORGANIZATION_IDENTIFIER_SYSTEM and i.get("value")
    ]
    if not identifiers:
        raise LocalOrganizationError(
            f"Organization {organization.get('id')} has no identifier with system "
            f"{ORGANIZATION_IDENTIFIER_SYSTEM}"
        )
    thumbprints = tuple(
        str(e["valueString"]).lower()
        for e in organization.get("extension") or []
        if e.get("url") == THUMBPRINT_EXTENSION and e.get("valueString")
    )
    return LocalOrganization(identifiers[0], thumbprints, organization, endpoint)
