"""Read-access tags as DSF applies them, with DSF's own fixtures over real TLS.

Fixtures: ``dsf/dsf-fhir/dsf-fhir-server/src/test/resources/authorization/read-access/``
``tag_all.xml``, ``tag_local.xml``, ``tag_organization.xml`` (LOCAL + ORGANIZATION
organization.com) and ``tag_role.xml`` (LOCAL + ROLE DIC of parent.org), the CodeSystems DSF's
``ReadAccessHelperTest`` checks. Here each is created by the local organization and read by
organization.com (a DIC of parent.org) and organization2.com (no role). Result when written: all
12 reads as DSF's rules say (see ``EXPECTED``), search results filtered alike.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity, thumbprint
from dsf_bridge.dsf.vocabulary import ORGANIZATION_IDENTIFIER_SYSTEM, ORGANIZATION_ROLE_SYSTEM
from dsf_bridge.errors import RemoteError
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.sites import (
    READ_ACCESS_ALL,
    allow_list_bundle,
    build_service,
    organization_entry,
)
from tests.reference import reference_dir
from tests.sandbox.harness import FAST_RETRY

LOCAL = "local.org"
MEMBER = "organization.com"
OTHER = "organization2.com"
PARENT = "parent.org"

EXPECTED = {
    "tag_all.xml": {LOCAL: True, MEMBER: True, OTHER: True},
    "tag_local.xml": {LOCAL: True, MEMBER: False, OTHER: False},
    "tag_organization.xml": {LOCAL: True, MEMBER: True, OTHER: False},
    "tag_role.xml": {LOCAL: True, MEMBER: True, OTHER: False},
}


_REPEATING = frozenset({"extension", "tag", "coding", "profile"})
_FHIR = "{http://hl7.org/fhir}"


def _element(element: etree._Element) -> Any:
    """FHIR XML to JSON for the simple shapes of these fixtures (the files are minimal
    CodeSystems without status or content, which fhir.resources refuses to read)."""
    value = element.get("value")
    if value is not None and len(element) == 0:
        return value
    result: dict[str, Any] = {}
    if element.get("url") is not None:
        result["url"] = element.get("url")
    # "{*}*" selects elements only, skipping comments.
    for child in element.iterchildren("{*}*"):
        name = child.tag.removeprefix(_FHIR)
        if name in _REPEATING:
            result.setdefault(name, []).append(_element(child))
        else:
            result[name] = _element(child)
    return result


def _code_system(name: str) -> dict[str, Any]:
    path = reference_dir() / "dsf/dsf-fhir/dsf-fhir-server/src/test/resources/authorization"
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    root = etree.fromstring((path / "read-access" / name).read_bytes(), parser=parser)
    meta_element = root.find(f"{_FHIR}meta")
    assert meta_element is not None, f"{name} has no meta"
    meta = _element(meta_element)
    return {
        "resourceType": "CodeSystem",
        "meta": meta,
        "url": f"http://example.org/fhir/CodeSystem/{name}",
        "status": "active",
        "content": "not-present",
    }


def _allow_list(thumbprints: dict[str, str]) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    for organization, print_ in thumbprints.items():
        entries.extend(organization_entry(organization, print_, f"https://{organization}/fhir"))
    parent_url = f"urn:uuid:{uuid.uuid4()}"
    member_url = next(
        e["fullUrl"]
        for e in entries
        if e["resource"]["resourceType"] == "Organization"
        and e["resource"]["identifier"][0]["value"] == MEMBER
    )
    entries.append(
        {
            "fullUrl": parent_url,
            "resource": {
                "resourceType": "Organization",
                "meta": {"tag": [READ_ACCESS_ALL]},
                "identifier": [{"system": ORGANIZATION_IDENTIFIER_SYSTEM, "value": PARENT}],
                "active": True,
            },
            "request": {"method": "POST", "url": "Organization"},
        }
    )
    entries.append(
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": {
                "resourceType": "OrganizationAffiliation",
                "meta": {"tag": [READ_ACCESS_ALL]},
                "active": True,
                "organization": {"reference": parent_url},
                "participatingOrganization": {"reference": member_url},
                "code": [{"coding": [{"system": ORGANIZATION_ROLE_SYSTEM, "code": "DIC"}]}],
            },
            "request": {"method": "POST", "url": "OrganizationAffiliation"},
        }
    )
    return allow_list_bundle(entries)


@pytest.fixture
async def clients(tmp_path: Path) -> AsyncIterator[dict[str, FhirClient]]:
    ca = CertificateAuthority("read access test CA")
    ca_file = tmp_path / "ca.pem"
    ca.write(ca_file)
    server_files = (tmp_path / "server.pem", tmp_path / "server-key.pem")
    ca.issue_server("localhost").write(*server_files)
    thumbprints: dict[str, str] = {}
    contexts = {}
    for organization in (LOCAL, MEMBER, OTHER):
        issued = ca.issue_client(organization)
        files = (tmp_path / f"{organization}.pem", tmp_path / f"{organization}-key.pem")
        issued.write(*files)
        thumbprints[organization] = thumbprint(issued.certificate)
        contexts[organization] = build_ssl_context(load_identity(*files), [ca_file])
    service = build_service(LOCAL, _allow_list(thumbprints), f"https://{LOCAL}/fhir")
    async with SandboxServer(
        service, certificate=server_files[0], key=server_files[1], ca_files=[ca_file]
    ) as server:
        opened = {
            organization: FhirClient(server.base_url, ssl_context=context, retry=FAST_RETRY)
            for organization, context in contexts.items()
        }
        try:
            yield opened
        finally:
            for client in opened.values():
                await client.aclose()


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
async def test_read_access_tags_as_dsf(clients: dict[str, FhirClient], fixture: str) -> None:
    created = await clients[LOCAL].create(_code_system(fixture))
    assert created.id is not None
    for organization, allowed in EXPECTED[fixture].items():
        client = clients[organization]
        found = [r["id"] for r in await client.search("CodeSystem", {})]
        if allowed:
            assert (await client.read("CodeSystem", created.id))["id"] == created.id
            assert found == [created.id]
        else:
            with pytest.raises(RemoteError) as caught:
                await client.read("CodeSystem", created.id)
            assert caught.value.status == 403
            assert found == []
