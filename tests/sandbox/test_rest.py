"""The sandbox's FHIR REST semantics over real TLS: versions and ETags, If-Match, conditional
create, search with ``_lastUpdated``/``_sort``/paging/``_include``, Bundles, Binary, and the
local-only rule for writes other than Tasks."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import httpx
import pytest

from dsf_bridge.errors import RemoteError
from tests.sandbox.harness import LOCAL, REMOTE, Sandbox, forbidden_reasons

ALL: dict[str, Any] = {
    "meta": {"tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ALL"}]}
}
CODE_SYSTEM: dict[str, Any] = {
    "resourceType": "CodeSystem",
    **ALL,
    "url": "http://example.org/fhir/CodeSystem/test",
    "version": "1.0",
    "status": "active",
    "content": "complete",
}


async def test_update_with_if_match_bumps_the_version_and_stale_etag_gets_412(
    sandbox: Sandbox,
) -> None:
    async with sandbox.client(LOCAL) as client:
        created = await client.create(CODE_SYSTEM)
        assert created.status == 201
        assert created.etag == 'W/"1"'
        assert created.location is not None
        assert created.location.endswith(f"/CodeSystem/{created.id}/_history/1")
        resource: dict[str, Any] = dict(created.resource or {})
        resource["status"] = "retired"
        updated = await client.update(resource, if_match=1)
        assert updated.version == 2
        assert updated.resource is not None
        assert updated.resource["meta"]["versionId"] == "2"
        with pytest.raises(RemoteError) as caught:
            await client.update(resource, if_match=1)
        assert caught.value.status == 412
        assert "expected version 1 does not match latest version 2" in str(caught.value)
        current = await client.read("CodeSystem", str(created.id))
    assert current["status"] == "retired"
    assert current["meta"]["versionId"] == "2"


async def test_update_of_unknown_id_is_not_a_create(sandbox: Sandbox) -> None:
    async with sandbox.client(LOCAL) as client:
        with pytest.raises(RemoteError) as caught:
            await client.update({**CODE_SYSTEM, "id": "does-not-exist"})
    assert caught.value.status == 405


async def test_conditional_create_of_an_existing_resource_as_dsf(sandbox: Sandbox) -> None:
    """A direct create is authorized before DSF looks at If-None-Exist, so a second CodeSystem
    with the same url and version is forbidden (AbstractResourceServiceSecure.create); in a
    batch, CreateCommand looks first and answers 200 with the existing resource's location."""
    criteria = "url=http://example.org/fhir/CodeSystem/test&version=1.0"
    entry = {
        "fullUrl": "urn:uuid:3f1b2c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
        "resource": CODE_SYSTEM,
        "request": {"method": "POST", "url": "CodeSystem", "ifNoneExist": criteria},
    }
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [entry]}
    async with sandbox.client(LOCAL) as client:
        first = await client.create(CODE_SYSTEM, if_none_exist=criteria)
        with forbidden_reasons() as reasons, pytest.raises(RemoteError) as direct:
            await client.create(CODE_SYSTEM, if_none_exist=criteria)
        answer = await client.bundle(batch, return_minimal=True)
        found = await client.search("CodeSystem", {"url": CODE_SYSTEM["url"]})
    assert first.status == 201
    assert direct.value.status == 403
    assert "Operation create forbidden" in str(direct.value)
    assert any("and version 1.0 exists" in r for r in reasons), reasons
    [response] = [e["response"] for e in answer["entry"]]
    assert response["status"] == "200 OK"
    assert response["location"].split("/_history")[0].endswith(f"CodeSystem/{first.id}")
    assert len(found) == 1


async def test_a_document_reference_is_found_by_its_master_identifier_as_dsf(
    sandbox: Sandbox,
) -> None:
    """DSF's DocumentReference ``identifier`` parameter matches ``masterIdentifier`` too
    (``DocumentReferenceIdentifier``), and DocumentReference has no unique criteria: a
    conditional create by it finds the first one instead of making a second."""
    document = {
        "resourceType": "DocumentReference",
        **ALL,
        "masterIdentifier": {"system": "http://example.org/sid/transfer", "value": "bk/study"},
        "status": "current",
        "content": [{"attachment": {"contentType": "application/octet-stream"}}],
    }
    criteria = "identifier=http://example.org/sid/transfer|bk/study"
    async with sandbox.client(LOCAL) as client:
        first = await client.create(document, if_none_exist=criteria)
        second = await client.create(document, if_none_exist=criteria)
        found = await client.search(
            "DocumentReference", {"identifier": "http://example.org/sid/transfer|bk/study"}
        )
    assert second.id == first.id
    assert [d["id"] for d in found] == [first.id]


async def test_search_by_last_updated_sorted_and_paged(sandbox: Sandbox) -> None:
    async with sandbox.client(LOCAL) as client:
        stamps = []
        for number in range(5):
            result = await client.create({**CODE_SYSTEM, "version": f"1.{number}"})
            assert result.resource is not None
            stamps.append(result.resource["meta"]["lastUpdated"])
            await asyncio.sleep(0.002)
        params = [("_lastUpdated", f"gt{stamps[1]}"), ("_sort", "_lastUpdated"), ("_count", "2")]
        pages = [bundle async for bundle in client.search_pages("CodeSystem", params)]
        ge = await client.search("CodeSystem", {"_lastUpdated": f"ge{stamps[1]}"})
        newest_first = await client.search("CodeSystem", {"_sort": "-_lastUpdated"})
        bounded = await client.search(
            "CodeSystem", [("_lastUpdated", f"ge{stamps[1]}"), ("_lastUpdated", f"lt{stamps[3]}")]
        )
    assert [len(p.get("entry", [])) for p in pages] == [2, 1]
    assert pages[0]["total"] == 3
    versions = [e["resource"]["version"] for p in pages for e in p["entry"]]
    assert versions == ["1.2", "1.3", "1.4"]
    assert len(ge) == 4
    assert [r["version"] for r in newest_first] == ["1.4", "1.3", "1.2", "1.1", "1.0"]
    assert sorted(r["version"] for r in bounded) == ["1.1", "1.2"]


async def test_subscription_search_with_criteria_exact(sandbox: Sandbox) -> None:
    async with sandbox.client(LOCAL) as client:
        found = await client.search(
            "Subscription",
            {
                "criteria:exact": "Task?status=requested",
                "status": "active",
                "type": "websocket",
                "payload": "application/fhir+json",
            },
        )
        prefix = await client.search("Subscription", {"criteria": "Task?status"})
        none = await client.search("Subscription", {"criteria:exact": "Task?status"})
    assert [s["criteria"] for s in found] == ["Task?status=requested"]
    assert len(prefix) == 1
    assert none == []


async def test_transaction_resolves_placeholders_and_is_atomic(sandbox: Sandbox) -> None:
    organization = "urn:uuid:6f0f8a4e-4f5c-4a53-a0a6-3f0d3c3c1a11"
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": organization,
                "resource": {
                    "resourceType": "Organization",
                    **ALL,
                    "identifier": [
                        {"system": "http://dsf.dev/sid/organization-identifier", "value": "Parent"}
                    ],
                    "active": True,
                },
                "request": {"method": "POST", "url": "Organization"},
            },
            {
                "fullUrl": "urn:uuid:0d5b7c1e-2a43-4d4b-9c59-6f8f3d0b7a22",
                "resource": {
                    "resourceType": "OrganizationAffiliation",
                    **ALL,
                    "active": True,
                    "organization": {"reference": organization},
                },
                "request": {"method": "POST", "url": "OrganizationAffiliation"},
            },
        ],
    }
    async with sandbox.client(LOCAL) as client:
        response = await client.bundle(bundle)
        affiliations = await client.search("OrganizationAffiliation", {})
        # Another parent (a second "Parent" would be refused as a duplicate right away), then an
        # entry that fails: the first two entries must be rolled back.
        entries: list[dict[str, Any]] = copy.deepcopy(bundle["entry"])
        entries[0]["resource"]["identifier"][0]["value"] = "Parent2"
        broken = {**bundle, "entry": [*entries, {"request": {"method": "PUT", "url": "Task/x"}}]}
        with pytest.raises(RemoteError, match="transaction entry 2 failed"):
            await client.bundle(broken)
        after = await client.search("OrganizationAffiliation", {})
        parents = await client.search("Organization", {"identifier": "Parent2"})
    assert response["type"] == "transaction-response"
    assert [e["response"]["status"] for e in response["entry"]] == ["201 Created", "201 Created"]
    organization_id = response["entry"][0]["resource"]["id"]
    assert affiliations[0]["organization"]["reference"] == f"Organization/{organization_id}"
    assert len(after) == 1
    assert parents == []


async def test_batch_entries_fail_independently(sandbox: Sandbox) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "fullUrl": "urn:uuid:5b0b1c52-8a3e-4c8f-9f3e-2d7c3a9e4b10",
                "resource": CODE_SYSTEM,
                "request": {"method": "POST", "url": "CodeSystem"},
            },
            {"request": {"method": "GET", "url": "CodeSystem/unknown"}},
        ],
    }
    async with sandbox.client(LOCAL) as client:
        response = await client.bundle(bundle, return_minimal=True)
    statuses = [e["response"]["status"] for e in response["entry"]]
    assert statuses == ["201 Created", "404 Not Found"]
    assert "resource" not in response["entry"][0]
    assert response["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"


async def test_remote_organization_may_not_write_definitions(sandbox: Sandbox) -> None:
    async with sandbox.client(REMOTE) as client:
        with forbidden_reasons() as reasons, pytest.raises(RemoteError) as caught:
            await client.create(CODE_SYSTEM)
    assert caught.value.status == 403
    assert "Operation create forbidden" in str(caught.value)
    assert any("allowed for the local organization only" in r for r in reasons), reasons


async def test_binary_round_trip_in_its_own_media_type(sandbox: Sandbox) -> None:
    """A raw upload needs ``X-Security-Context`` (DSF: bare 400 without); the Binary then reads
    as FHIR JSON with ``data`` or as its own media type."""
    local_organization = next(
        o
        for o in sandbox.server.service.store.all("Organization")
        if any(i.get("value") == LOCAL for i in o.get("identifier") or [])
    )
    async with sandbox.client(LOCAL) as client:
        with pytest.raises(RemoteError) as refused:
            await client.request(
                "POST", "Binary", headers={"Content-Type": "application/pdf"}, json_body=None
            )
        raw = await client.request(
            "POST",
            "Binary",
            headers={
                "Content-Type": "application/octet-stream",
                "Prefer": "return=minimal",
                "X-Security-Context": f"Organization/{local_organization['id']}",
            },
        )
        location = raw.headers["location"]
        binary_id = location.split("/Binary/")[1].split("/")[0]
        as_json = await client.read("Binary", binary_id)
        as_bytes = await client.request(
            "GET", f"Binary/{binary_id}", headers={"Accept": "application/octet-stream"}
        )
    assert refused.value.status == 400
    assert as_json["contentType"] == "application/octet-stream"
    assert as_json["securityContext"] == {"reference": f"Organization/{local_organization['id']}"}
    assert as_bytes.headers["content-type"].startswith("application/octet-stream")
    assert as_bytes.content == b""


async def test_bad_search_in_a_batch_fails_only_its_entry(sandbox: Sandbox) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "CodeSystem?_lastUpdated=gtnot-a-date"}},
            {"request": {"method": "GET", "url": "CodeSystem?status=active"}},
        ],
    }
    async with sandbox.client(LOCAL) as client:
        response = await client.bundle(bundle)
        with pytest.raises(RemoteError) as caught:
            await client.search("CodeSystem", {"_sort": "color"})
    assert [e["response"]["status"] for e in response["entry"]] == ["400 Bad Request", "200 OK"]
    assert caught.value.status == 400
    assert "_sort by 'color' is not supported" in str(caught.value)


async def test_tagged_types_need_valid_read_access_tags(sandbox: Sandbox) -> None:
    untagged = {k: v for k, v in CODE_SYSTEM.items() if k != "meta"}
    tag = {"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag"}
    organization_extension = {
        "url": "http://dsf.dev/fhir/StructureDefinition/extension-read-access-organization",
        "valueIdentifier": {
            "system": "http://dsf.dev/sid/organization-identifier",
            "value": REMOTE,
        },
    }
    # ORGANIZATION needs LOCAL beside it (DSF ReadAccessHelperImpl.isValid).
    organization_alone = {
        **untagged,
        "meta": {"tag": [{**tag, "code": "ORGANIZATION", "extension": [organization_extension]}]},
    }
    local_only = {**untagged, "meta": {"tag": [{**tag, "code": "LOCAL"}]}}
    async with sandbox.client(LOCAL) as local, sandbox.client(REMOTE) as remote:
        for invalid in (untagged, organization_alone):
            with forbidden_reasons() as reasons, pytest.raises(RemoteError) as caught:
                await local.create(invalid)
            assert caught.value.status == 403
            assert any("read-access tags" in r for r in reasons), reasons
        created = await local.create(local_only)
        assert created.id is not None
        assert (await local.read("CodeSystem", created.id))["id"] == created.id
        with pytest.raises(RemoteError) as hidden:
            await remote.read("CodeSystem", created.id)
        assert hidden.value.status == 403
        assert await remote.search("CodeSystem", {}) == []


async def test_concurrent_updates_with_the_same_if_match_have_one_winner(sandbox: Sandbox) -> None:
    """Task intake relies on this: two replicas PUT in-progress with If-Match, one wins."""
    async with sandbox.client(LOCAL) as first, sandbox.client(LOCAL) as second:
        created = await first.create(CODE_SYSTEM)
        assert created.resource is not None
        retired = {**created.resource, "status": "retired"}
        results = await asyncio.gather(
            first.update(retired, if_match=1),
            second.update(retired, if_match=1),
            return_exceptions=True,
        )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, RemoteError)]
    assert len(winners) == 1
    assert len(losers) == 1
    assert losers[0].status == 412


async def test_unique_criteria_as_dsf(sandbox: Sandbox) -> None:
    async with sandbox.client(LOCAL) as client:
        await client.create(CODE_SYSTEM)
        with forbidden_reasons() as reasons, pytest.raises(RemoteError) as same:
            await client.create(CODE_SYSTEM)
        assert same.value.status == 403
        assert any("and version 1.0 exists" in r for r in reasons), reasons
        with forbidden_reasons() as reasons, pytest.raises(RemoteError):
            await client.create(
                {
                    **ALL,
                    "resourceType": "Subscription",
                    "status": "active",
                    "criteria": "Task?status=requested",
                    "channel": {"type": "websocket", "payload": "application/fhir+json"},
                }
            )
        assert any("same criteria, type and payload" in r for r in reasons), reasons
        newer = await client.create({**CODE_SYSTEM, "version": "1.1"})
    assert newer.status == 201


@pytest.mark.parametrize(
    ("entry", "diagnostics"),
    [
        pytest.param(
            {"request": {"method": "POST", "url": "CodeSystem"}},
            "Bad crete request url CodeSystem at bundle index 0",
            id="no-fullUrl",
        ),
        pytest.param(
            {
                "fullUrl": "https://elsewhere.test/fhir/CodeSystem/1",
                "request": {"method": "POST", "url": "CodeSystem"},
            },
            "Bad crete request url CodeSystem at bundle index 0",
            id="fullUrl-not-urn-uuid",
        ),
        pytest.param(
            {
                "fullUrl": "urn:uuid:9d1f2a8e-5b1c-4f62-8a0e-3c7d2b6e1f00",
                "request": {"method": "POST", "url": "CodeSystem?url=x"},
            },
            "Bad crete request url CodeSystem?url=x at bundle index 0",
            id="url-with-query",
        ),
        pytest.param(
            {
                "fullUrl": "urn:uuid:9d1f2a8e-5b1c-4f62-8a0e-3c7d2b6e1f00",
                "resource_id": "plain-id",
                "request": {"method": "POST", "url": "CodeSystem"},
            },
            "id value not starting with urn:uuid:",
            id="resource-id-not-urn-uuid",
        ),
        pytest.param(
            {
                "fullUrl": "urn:uuid:9d1f2a8e-5b1c-4f62-8a0e-3c7d2b6e1f00",
                "resource_id": "urn:uuid:11111111-5b1c-4f62-8a0e-3c7d2b6e1f00",
                "request": {"method": "POST", "url": "CodeSystem"},
            },
            "Resource id not equal to entry fullUrl",
            id="resource-id-not-fullUrl",
        ),
    ],
)
async def test_batch_create_entries_follow_dsf_create_command(
    sandbox: Sandbox, entry: dict[str, Any], diagnostics: str
) -> None:
    """DSF's CreateCommand: 400 for that entry; the valid entry beside it is created."""
    resource = dict(CODE_SYSTEM)
    resource_id = entry.pop("resource_id", None)
    if resource_id is not None:
        resource["id"] = resource_id
    good = {
        "fullUrl": "urn:uuid:7a3e9c10-1b2d-4e5f-8a9b-0c1d2e3f4a5b",
        "resource": {**CODE_SYSTEM, "url": "http://example.test/fhir/CodeSystem/other"},
        "request": {"method": "POST", "url": "CodeSystem"},
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{**entry, "resource": resource}, good],
    }
    async with sandbox.client(LOCAL) as client:
        response = await client.bundle(bundle, return_minimal=True)
        transaction = {**bundle, "type": "transaction"}
        with pytest.raises(RemoteError) as caught:
            await client.bundle(transaction, return_minimal=True)
    first, second = response["entry"]
    assert first["response"]["status"] == "400 Bad Request"
    assert diagnostics in first["response"]["outcome"]["issue"][0]["diagnostics"]
    assert second["response"]["status"] == "201 Created"
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"resourceType": "Task", ', "not JSON"),
        (b"[1, 2]", "no JSON object"),
        (b'{"resourceType": "NoSuchType"}', "unknown resourceType"),
        (b'{"resourceType": "Task", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}", "too deep"),
        (b'{"resourceType": "Bundle", "entry": [{"resource": {"id": "1"}}]}', "no type inside"),
    ],
)
async def test_a_body_hapi_cannot_parse_is_403_unable_to_parse(
    sandbox: Sandbox, body: bytes, why: str
) -> None:
    """DSF's DataFormatExceptionHandler (2.1 and 1.9): 403, "Unable to parse resource"."""
    async with httpx.AsyncClient(verify=sandbox.context(LOCAL)) as http:
        response = await http.post(
            f"{sandbox.base_url}/Task",
            content=body,
            headers={"content-type": "application/fhir+json", "accept": "application/fhir+json"},
        )
    assert response.status_code == 403, (why, response.text)
    issue = response.json()["issue"][0]
    assert (issue["code"], issue["diagnostics"]) == ("structure", "Unable to parse resource")
