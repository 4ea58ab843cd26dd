"""Search parameters of the sandbox that the bridge and DSF use, on the service directly (no
sockets): identifiers, canonical url with version, profiles, reference ``:identifier`` through
literal references, ``_include``, ``_summary=count``, strict handling of unknown parameters."""

from __future__ import annotations

from typing import Any

import pytest

from dsf_bridge.sandbox.resources import SearchError, SearchQuery, matches, parse_instant
from dsf_bridge.sandbox.service import FhirService
from dsf_bridge.sandbox.sites import allow_list_bundle, build_service, organization_entry

ORG = "http://dsf.dev/sid/organization-identifier"
TAG = {"tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ALL"}]}


@pytest.fixture
def service() -> FhirService:
    entries = [
        *organization_entry("A", "a" * 128, "https://a.test/fhir"),
        *organization_entry("B", "b" * 128, "https://b.test/fhir"),
    ]
    service = build_service("A", allow_list_bundle(entries), "https://a.test/fhir")
    identity = service.local_identity()
    organizations = {
        o["identifier"][0]["value"]: o["id"] for o in service.store.all("Organization")
    }
    parent = service.create(
        identity,
        "Organization",
        {
            "resourceType": "Organization",
            "meta": TAG,
            "identifier": [{"system": ORG, "value": "P"}],
        },
        {},
    )
    assert parent.resource is not None
    service.create(
        identity,
        "OrganizationAffiliation",
        {
            "resourceType": "OrganizationAffiliation",
            "meta": TAG,
            "active": True,
            "organization": {"reference": f"Organization/{parent.resource['id']}"},
            "participatingOrganization": {"reference": f"Organization/{organizations['B']}"},
        },
        {},
    )
    for version in ("1.0", "1.1"):
        service.create(
            identity,
            "ActivityDefinition",
            {
                "resourceType": "ActivityDefinition",
                "meta": {
                    **TAG,
                    "profile": ["http://dsf.dev/fhir/StructureDefinition/activity-definition"],
                },
                "url": "http://dsf.dev/bpe/Process/ping",
                "version": version,
                "status": "active",
                "kind": "Task",
            },
            {},
        )
    return service


def _search(service: FhirService, resource_type: str, *params: tuple[str, str]) -> dict[str, Any]:
    response = service.handle(
        service.local_identity(), "GET", resource_type, list(params), headers={}, body=None
    )
    assert response.status == 200, response.resource
    assert response.resource is not None
    return response.resource


def _ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [
        e["resource"]["resourceType"]
        + ":"
        + str(e["resource"].get("version") or e["resource"].get("identifier", [{}])[0].get("value"))
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == mode
    ]


def test_canonical_url_with_version(service: FhirService) -> None:
    bundle = _search(service, "ActivityDefinition", ("url", "http://dsf.dev/bpe/Process/ping|1.1"))
    assert _ids(bundle) == ["ActivityDefinition:1.1"]
    both = _search(service, "ActivityDefinition", ("url", "http://dsf.dev/bpe/Process/ping"))
    assert both["total"] == 2
    versioned = _search(
        service,
        "ActivityDefinition",
        ("url", "http://dsf.dev/bpe/Process/ping"),
        ("version", "1.0"),
    )
    assert _ids(versioned) == ["ActivityDefinition:1.0"]


def test_identifier_token_forms(service: FhirService) -> None:
    assert _search(service, "Organization", ("identifier", f"{ORG}|B"))["total"] == 1
    assert _search(service, "Organization", ("identifier", "B"))["total"] == 1
    assert _search(service, "Organization", ("identifier", f"{ORG}|"))["total"] == 3
    assert _search(service, "Organization", ("identifier", "other|B"))["total"] == 0
    assert _search(service, "Organization", ("identifier", f"{ORG}|A,{ORG}|B"))["total"] == 2


def test_reference_identifier_through_literal_references(service: FhirService) -> None:
    bundle = _search(
        service,
        "OrganizationAffiliation",
        ("primary-organization:identifier", f"{ORG}|P"),
        ("participating-organization:identifier", f"{ORG}|B"),
    )
    assert bundle["total"] == 1
    none = _search(
        service, "OrganizationAffiliation", ("participating-organization:identifier", f"{ORG}|A")
    )
    assert none["total"] == 0


def test_a_search_answers_with_copies_of_its_page_and_skips_deleted_resources(
    service: FhirService,
) -> None:
    # The search matches the stored versions themselves and copies only its page: a change to
    # what it answered must not reach the store, and a deleted resource is not found.
    paged = _search(service, "ActivityDefinition", ("_count", "1"), ("_page", "2"))
    assert (paged["total"], len(paged["entry"])) == (2, 1)
    found = paged["entry"][0]["resource"]
    kept = found["version"]
    found["version"] = "changed"
    found["meta"]["versionId"] = "99"
    stored = service.store.read("ActivityDefinition", found["id"])
    assert stored is not None
    assert (stored["version"], stored["meta"]["versionId"]) == (kept, "1")
    again = _search(service, "ActivityDefinition")
    assert sorted(e["resource"]["version"] for e in again["entry"]) == ["1.0", "1.1"]
    service.store.delete("ActivityDefinition", found["id"])
    left = "1.0" if kept == "1.1" else "1.1"
    assert _ids(_search(service, "ActivityDefinition")) == [f"ActivityDefinition:{left}"]


def test_includes_and_profile_and_summary(service: FhirService) -> None:
    bundle = _search(
        service, "Organization", ("identifier", f"{ORG}|A"), ("_include", "Organization:endpoint")
    )
    assert _ids(bundle, "include") == ["Endpoint:A_Endpoint"]
    profiled = _search(
        service,
        "ActivityDefinition",
        ("_profile", "http://dsf.dev/fhir/StructureDefinition/activity-definition"),
    )
    assert profiled["total"] == 2
    counted = _search(service, "ActivityDefinition", ("_summary", "count"))
    assert counted["total"] == 2
    assert counted["entry"] == []


def test_unknown_parameters_warn_or_fail_in_strict_mode(service: FhirService) -> None:
    lenient = _search(service, "Organization", ("colour", "blue"))
    outcomes = [e for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    assert "colour" in outcomes[0]["resource"]["issue"][0]["diagnostics"]
    strict = service.handle(
        service.local_identity(),
        "GET",
        "Organization",
        [("colour", "blue")],
        headers={"prefer": "handling=strict"},
        body=None,
    )
    assert strict.status == 400


def test_subscription_criteria_matching_and_dates() -> None:
    task = {
        "resourceType": "Task",
        "status": "requested",
        "meta": {"lastUpdated": "2026-01-01T10:00:00.000+01:00"},
    }
    assert matches(task, "Task?status=requested")
    assert not matches(task, "Task?status=in-progress")
    assert not matches(task, "QuestionnaireResponse?status=requested")
    assert matches(task, "Task?_lastUpdated=ge2026-01-01T09:00:00Z")
    assert not matches(task, "Task?_lastUpdated=gt2026-01-01T09:00:00Z")
    assert parse_instant("2026-01-01T09:00:00") == parse_instant("2026-01-01T09:00:00+00:00")
    with pytest.raises(SearchError):
        SearchQuery.parse("Task", [("_lastUpdated", "gtyesterday")])
