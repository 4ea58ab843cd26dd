"""Target selection from the allow list against a running sandbox (real TLS, DSF 2.1 and 1.9):
members of a parent organization by role (OrganizationAffiliation), and named organizations
with their Endpoints; what is inactive, of another role or unknown is left out or refused."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.dsf.members import (
    Member,
    MemberLookupError,
    UnknownParentOrganizationError,
    members_with_role,
    organization_members,
)
from dsf_bridge.dsf.versions import DSF_1, DSF_2, DsfRelease
from dsf_bridge.errors import RemoteError
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.sites import build_service, init_sandbox
from tests.sandbox.harness import Sandbox

ROLE = "http://dsf.dev/fhir/CodeSystem/organization-role"
ORG = "http://dsf.dev/sid/organization-identifier"
HUB = "Hub"
SITES = [HUB, "Site_1", "Site_2", "Site_3", "Site_4", "Site_5", "Site_6"]
CONSORTIUM = {
    "Consortium": {
        "Site_1": ["DIC", "COS"],
        "Site_2": ["DIC"],
        "Site_3": ["HRP"],
        "Site_4": ["DIC"],  # its affiliation is made inactive below
        "Site_5": ["DIC"],  # its Endpoint is turned off below
        "Site_6": ["DIC"],  # its Organization is made inactive below
    },
    "Closed_Net": {"Site_1": ["DIC"]},  # the parent is made inactive below
}


def _identifier(resource: dict[str, Any]) -> str:
    return str(resource["identifier"][0]["value"])


def _alter(allow_list: dict[str, Any]) -> None:
    """Site_4 leaves the consortium, Site_5's Endpoint is off, Site_6 and Closed_Net are
    inactive: the allow list as an operator would change it."""
    resources = [e["resource"] for e in allow_list["entry"]]
    by_url = {e["fullUrl"]: e["resource"] for e in allow_list["entry"]}
    for resource in resources:
        kind = resource["resourceType"]
        if kind == "OrganizationAffiliation":
            member = by_url[resource["participatingOrganization"]["reference"]]
            if _identifier(member) == "Site_4":
                resource["active"] = False
        elif kind == "Endpoint" and _identifier(resource) == "Site_5_Endpoint":
            resource["status"] = "off"
        elif kind == "Organization" and _identifier(resource) in {"Site_6", "Closed_Net"}:
            resource["active"] = False


@pytest.fixture(params=[pytest.param(DSF_2, id="2.1"), pytest.param(DSF_1, id="1.9")])
async def network(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    dsf_release: DsfRelease = request.param
    ca = CertificateAuthority("members test CA")
    sites = {
        s.organization: s
        for s in init_sandbox(
            tmp_path / "net", SITES, ca=ca, dsf_release=dsf_release, consortium=CONSORTIUM
        )
    }
    allow_list: dict[str, Any] = json.loads(sites[HUB].allow_list.read_text())
    _alter(allow_list)
    service = build_service(HUB, allow_list, sites[HUB].base_url, dsf_release=dsf_release)
    async with SandboxServer(
        service,
        certificate=sites[HUB].server_certificate,
        key=sites[HUB].server_key,
        ca_files=[sites[HUB].ca],
    ) as server:
        yield Sandbox(ca, sites, server, tmp_path)


def _member(network: Sandbox, name: str) -> Member:
    return Member(name, f"{name}_Endpoint", network.sites[name].base_url)


async def test_members_with_a_role_are_the_active_ones_sorted(network: Sandbox) -> None:
    async with network.client(HUB) as client:
        members = await members_with_role(client, "Consortium", (ROLE, "DIC"))
    assert members == [_member(network, "Site_1"), _member(network, "Site_2")]
    # the Endpoint is the member's own, as its affiliation names it
    assert members[0].endpoint_address.startswith("https://127.0.0.1:")


async def test_another_role_selects_other_members(network: Sandbox) -> None:
    async with network.client(HUB) as client:
        hrp = await members_with_role(client, "Consortium", (ROLE, "HRP"))
        cos = await members_with_role(client, "Consortium", (ROLE, "COS"))
        none = await members_with_role(client, "Consortium", (ROLE, "TTP"))
        foreign = await members_with_role(client, "Consortium", ("urn:example:roles", "DIC"))
        by_code = await members_with_role(client, "Consortium", ("", "HRP"))
    assert hrp == [_member(network, "Site_3")]
    assert cos == [_member(network, "Site_1")]
    assert none == []
    assert foreign == []
    assert by_code == hrp


async def test_an_unknown_or_inactive_parent_is_an_error_naming_it(network: Sandbox) -> None:
    async with network.client(HUB) as client:
        with pytest.raises(UnknownParentOrganizationError) as unknown:
            await members_with_role(client, "No_Such_Net", (ROLE, "DIC"))
        with pytest.raises(UnknownParentOrganizationError) as inactive:
            await members_with_role(client, "Closed_Net", (ROLE, "DIC"))
        with pytest.raises(MemberLookupError, match="role code"):
            await members_with_role(client, "Consortium", (ROLE, ""))
    assert unknown.value.parent == "No_Such_Net"
    assert str(unknown.value) == "parent organization No_Such_Net: not in the allow list"
    assert str(inactive.value) == "parent organization Closed_Net: inactive in the allow list"
    assert not unknown.value.retryable


async def test_named_organizations_resolve_to_their_endpoint_or_a_reason(
    network: Sandbox,
) -> None:
    async with network.client(HUB) as client:
        members, rejected = await organization_members(
            client, ["Site_3", "Nobody", "Site_6", "Site_1", "Site_5", "Site_3", " "]
        )
    assert members == [_member(network, "Site_1"), _member(network, "Site_3")]
    assert rejected == [
        ("Nobody", "not in the allow list"),
        ("Site_6", "inactive in the allow list"),
        ("Site_5", "has no active Endpoint"),
        (" ", "not an organization identifier (empty)"),
    ]


async def test_a_parent_organization_is_no_target(network: Sandbox) -> None:
    """A parent has no Endpoint (DSF's organization-parent profile): it cannot receive Tasks."""
    async with network.client(HUB) as client:
        members, rejected = await organization_members(client, ["Consortium"])
    assert members == []
    assert rejected == [("Consortium", "has no active Endpoint")]


async def test_strict_search_refuses_a_parameter_dsf_lacks(network: Sandbox) -> None:
    """The lookups search with ``Prefer: handling=strict`` as DSF's providers do: a parameter
    the server does not know fails instead of silently widening the result."""
    async with network.client(HUB) as client:
        with pytest.raises(RemoteError) as refused:
            await client.search("OrganizationAffiliation", [("name", "Site_1")], strict=True)
        lenient = await client.search("OrganizationAffiliation", [("name", "Site_1")])
    assert refused.value.status == 400
    assert len(lenient) == 7  # every affiliation: the unknown parameter was ignored


def _add_member(store: Any, parent_id: str, name: str) -> None:
    """An Organization, its Endpoint and its affiliation under ``parent_id``, put into the
    sandbox's store directly (as an allow list would; no certificates needed)."""
    tag = {"tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ALL"}]}
    organization = store.create(
        {
            "resourceType": "Organization",
            "meta": tag,
            "identifier": [{"system": ORG, "value": name}],
            "active": True,
        }
    )
    endpoint = store.create(
        {
            "resourceType": "Endpoint",
            "meta": tag,
            "identifier": [
                {"system": "http://dsf.dev/sid/endpoint-identifier", "value": f"{name}_Endpoint"}
            ],
            "status": "active",
            "managingOrganization": {"reference": f"Organization/{organization['id']}"},
            "address": f"https://{name.lower()}.test/fhir",
        }
    )
    store.create(
        {
            "resourceType": "OrganizationAffiliation",
            "meta": tag,
            "active": True,
            "organization": {"reference": f"Organization/{parent_id}"},
            "participatingOrganization": {"reference": f"Organization/{organization['id']}"},
            "code": [{"coding": [{"system": ROLE, "code": "DIC"}]}],
            "endpoint": [{"reference": f"Endpoint/{endpoint['id']}"}],
        }
    )


async def test_members_over_several_result_pages(network: Sandbox) -> None:
    """More members than one page holds (the sandbox's 20, as DSF's default): every page's
    includes resolve its own affiliations."""
    store = network.server.service.store
    parent = store.create(
        {
            "resourceType": "Organization",
            "meta": {
                "tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ALL"}]
            },
            "identifier": [{"system": ORG, "value": "Big_Net"}],
            "active": True,
        }
    )
    names = [f"Member_{i:02d}" for i in range(45)]
    for name in reversed(names):
        _add_member(store, parent["id"], name)
    async with network.client(HUB) as client:
        members = await members_with_role(client, "Big_Net", (ROLE, "DIC"))
    assert [m.organization for m in members] == names
    assert members[7] == Member("Member_07", "Member_07_Endpoint", "https://member_07.test/fhir")
