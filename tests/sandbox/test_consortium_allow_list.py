"""An allow list with a parent organization and its members' OrganizationAffiliations
(``init_sandbox(consortium=...)``): valid against DSF's profiles of both releases, loaded by
conditional PUTs as DSF's allow lists are, and searchable with the parameters DSF's
``OrganizationAffiliationDaoJdbc`` has (and no others)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.dsf.versions import DSF_1, DSF_2, DsfRelease
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.service import FhirService
from dsf_bridge.sandbox.sites import build_service, init_sandbox
from dsf_bridge.sandbox.validation import ProfileValidator, base_profiles
from tests.reference import reference_dir

ORG = "http://dsf.dev/sid/organization-identifier"
ROLE = "http://dsf.dev/fhir/CodeSystem/organization-role"
SITES = ["Hub", "Site_1", "Site_2", "Site_3"]
CONSORTIUM = {
    "Consortium": {"Site_1": ["DIC", "COS"], "Site_2": ["DIC"], "Site_3": ["HRP"]},
    "Other_Net": {"Site_3": ["DIC"]},
}
RELEASES = [pytest.param(DSF_2, id="2.1"), pytest.param(DSF_1, id="1.9")]


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("consortium test CA")


_MINTED: dict[str, Any] = {}


def _allow_list(directory: Path, ca: CertificateAuthority, dsf_release: DsfRelease) -> Any:
    """A fresh copy of the allow list of ``dsf_release`` (minted once per module: keys are
    slow)."""
    if dsf_release.name not in _MINTED:
        sites = init_sandbox(
            directory, SITES, ca=ca, dsf_release=dsf_release, consortium=CONSORTIUM
        )
        _MINTED[dsf_release.name] = json.loads(sites[0].allow_list.read_text())
    return copy.deepcopy(_MINTED[dsf_release.name])


def _resources(allow_list: Any, resource_type: str) -> list[dict[str, Any]]:
    return [
        e["resource"] for e in allow_list["entry"] if e["resource"]["resourceType"] == resource_type
    ]


def _search(service: FhirService, resource_type: str, *params: tuple[str, str]) -> Any:
    response = service.handle(
        service.local_identity(),
        "GET",
        resource_type,
        list(params),
        headers={"prefer": "handling=strict"},
        body=None,
    )
    assert response.status == 200, response.resource
    return response.resource


def _names(bundle: Any, service: FhirService, mode: str = "match") -> list[str]:
    """Participating organization of each affiliation, or identifier of other resources."""
    names = []
    for entry in bundle["entry"]:
        if entry["search"]["mode"] != mode:
            continue
        resource = entry["resource"]
        if resource["resourceType"] == "OrganizationAffiliation":
            resource = service.store.resolve(resource["participatingOrganization"]["reference"])
            assert resource is not None
        names.append(f"{resource['resourceType']}:{resource['identifier'][0]['value']}")
    return sorted(names)


@pytest.mark.parametrize("dsf_release", RELEASES)
def test_every_allow_list_resource_is_valid_against_dsf_profiles(
    tmp_path: Path, ca: CertificateAuthority, dsf_release: DsfRelease
) -> None:
    allow_list = _allow_list(tmp_path, ca, dsf_release)
    validator = ProfileValidator(base_profiles(dsf_release.name, reference_dir()))
    checked = 0
    for entry in allow_list["entry"]:
        assert entry["request"]["method"] == "PUT"
        assert validator.validate(entry["resource"]) == [], entry["resource"]
        checked += 1
    # 4 Organizations and Endpoints, 2 parents, 4 affiliations
    assert checked == 14
    parents = [
        o
        for o in _resources(allow_list, "Organization")
        if o["meta"]["profile"] == ["http://dsf.dev/fhir/StructureDefinition/organization-parent"]
    ]
    assert sorted(p["identifier"][0]["value"] for p in parents) == ["Consortium", "Other_Net"]
    assert all("endpoint" not in p and "extension" not in p for p in parents)


@pytest.mark.parametrize("dsf_release", RELEASES)
def test_the_validator_still_refuses_broken_allow_list_resources(
    tmp_path: Path, ca: CertificateAuthority, dsf_release: DsfRelease
) -> None:
    """The allow list passes because it is right, not because nothing is checked."""
    allow_list = _allow_list(tmp_path, ca, dsf_release)
    validator = ProfileValidator(base_profiles(dsf_release.name, reference_dir()))
    affiliation = _resources(allow_list, "OrganizationAffiliation")[0]
    no_endpoint = {k: v for k, v in affiliation.items() if k != "endpoint"}
    assert validator.validate(no_endpoint) == ["OrganizationAffiliation.endpoint: min 1, found 0"]
    no_system = copy.deepcopy(affiliation)
    no_system["code"] = [{"coding": [{"code": "DIC"}]}]
    assert any("code.coding.system: min 1" in e for e in validator.validate(no_system))
    parent = next(o for o in _resources(allow_list, "Organization") if o["name"] == "Consortium")
    foreign = copy.deepcopy(parent)
    foreign["identifier"][0]["system"] = "urn:example:other"
    assert validator.validate(foreign) == ["Organization.identifier:dsfIdentifier: min 1, found 0"]
    endpoint = _resources(allow_list, "Endpoint")[0]
    json_only = dict(endpoint, payloadMimeType=["application/fhir+json", "text/plain"])
    assert validator.validate(json_only) == ["Endpoint.payloadMimeType:fhirXml: min 1, found 0"]


def test_a_thumbprint_must_be_lower_case_hex_in_dsf_2(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    allow_list = _allow_list(tmp_path, ca, DSF_2)
    organization = copy.deepcopy(_resources(allow_list, "Organization")[0])
    extension = organization["extension"][0]
    extension["valueString"] = extension["valueString"].upper()
    errors = ProfileValidator(base_profiles("2.1", reference_dir())).validate(organization)
    assert len(errors) == 1 and "invariant hex-128-length failed" in errors[0], errors


def test_a_read_access_role_tag_needs_its_role_extension_in_dsf_2(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """DSF's meta profile names the tag's extension slice by an id one level short of its
    path; the slice applies all the same."""
    allow_list = _allow_list(tmp_path, ca, DSF_2)
    affiliation = copy.deepcopy(_resources(allow_list, "OrganizationAffiliation")[0])
    affiliation["meta"]["tag"] = [
        {"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "LOCAL"},
        {"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ROLE"},
    ]
    errors = ProfileValidator(base_profiles("2.1", reference_dir())).validate(affiliation)
    assert errors == [
        "OrganizationAffiliation.meta > Meta.tag:read-access-parent-organization-role"
        ".extension:role-extension: min 1, found 0 (in OrganizationAffiliation.meta.tag[1])"
    ]


@pytest.mark.parametrize("dsf_release", RELEASES)
def test_affiliations_link_parent_member_and_endpoint(
    tmp_path: Path, ca: CertificateAuthority, dsf_release: DsfRelease
) -> None:
    service = build_service(
        "Hub",
        _allow_list(tmp_path, ca, dsf_release),
        "https://hub.test/fhir",
        dsf_release=dsf_release,
    )
    affiliations = service.store.all("OrganizationAffiliation")
    assert len(affiliations) == 4
    for affiliation in affiliations:
        assert affiliation["active"] is True
        parent = service.store.resolve(affiliation["organization"]["reference"])
        member = service.store.resolve(affiliation["participatingOrganization"]["reference"])
        (endpoint_reference,) = affiliation["endpoint"]
        endpoint = service.store.resolve(endpoint_reference["reference"])
        assert parent is not None and member is not None and endpoint is not None
        name = member["identifier"][0]["value"]
        roles = [c["coding"][0]["code"] for c in affiliation["code"]]
        assert all(c["coding"][0]["system"] == ROLE for c in affiliation["code"])
        assert roles == CONSORTIUM[parent["identifier"][0]["value"]][name]
        assert endpoint["managingOrganization"]["reference"] == f"Organization/{member['id']}"


def test_loading_the_allow_list_again_updates_instead_of_duplicating(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """Conditional PUTs by primary and participating organization, as DSF's test bundle."""
    allow_list = _allow_list(tmp_path, ca, DSF_2)
    service = build_service("Hub", allow_list, "https://hub.test/fhir")
    again = service.handle(service.local_identity(), "POST", "", headers={}, body=allow_list)
    assert again.status == 200, again.resource
    affiliations = service.store.all("OrganizationAffiliation")
    assert len(affiliations) == 4
    assert {a["meta"]["versionId"] for a in affiliations} == {"2"}
    assert len(service.store.all("Organization")) == 6


@pytest.fixture
def service(tmp_path: Path, ca: CertificateAuthority) -> FhirService:
    allow_list = _allow_list(tmp_path, ca, DSF_2)
    service = build_service("Hub", allow_list, "https://hub.test/fhir")
    # Site_2 leaves the consortium: its affiliation turns inactive.
    (site_2,) = [
        a
        for a in service.store.all("OrganizationAffiliation")
        if (service.store.resolve(a["participatingOrganization"]["reference"]) or {})
        .get("identifier", [{}])[0]
        .get("value")
        == "Site_2"
    ]
    service.store.update({**site_2, "active": False})
    return service


def test_search_by_parent_role_and_active_as_dsf(service: FhirService) -> None:
    parent = ("primary-organization:identifier", f"{ORG}|Consortium")
    every = _search(service, "OrganizationAffiliation", parent)
    assert _names(every, service) == [
        "Organization:Site_1",
        "Organization:Site_2",
        "Organization:Site_3",
    ]
    dic = _search(service, "OrganizationAffiliation", parent, ("role", f"{ROLE}|DIC"))
    assert _names(dic, service) == ["Organization:Site_1", "Organization:Site_2"]
    active_dic = _search(
        service, "OrganizationAffiliation", parent, ("role", f"{ROLE}|DIC"), ("active", "true")
    )
    assert _names(active_dic, service) == ["Organization:Site_1"]
    assert _search(service, "OrganizationAffiliation", parent, ("role", "urn:x|DIC"))["total"] == 0
    by_code = _search(service, "OrganizationAffiliation", parent, ("role", "HRP"))
    assert _names(by_code, service) == ["Organization:Site_3"]
    member = _search(
        service,
        "OrganizationAffiliation",
        ("participating-organization:identifier", f"{ORG}|Site_3"),
    )
    assert member["total"] == 2


@pytest.mark.parametrize(
    "include", ["OrganizationAffiliation:endpoint", "OrganizationAffiliation:endpoint:Endpoint"]
)
def test_include_of_endpoints_and_members_in_both_forms(service: FhirService, include: str) -> None:
    bundle = _search(
        service,
        "OrganizationAffiliation",
        ("primary-organization:identifier", f"{ORG}|Consortium"),
        ("role", f"{ROLE}|DIC"),
        ("active", "true"),
        ("_include", include),
        ("_include", "OrganizationAffiliation:participating-organization:Organization"),
        ("_sort", "_id"),
    )
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == [
        "OrganizationAffiliation",
        "Endpoint",
        "Organization",
    ]
    assert _names(bundle, service, "include") == ["Endpoint:Site_1_Endpoint", "Organization:Site_1"]


@pytest.mark.parametrize(
    "parameter",
    [
        ("status", "active"),
        ("name", "Site"),
        ("organization", "Organization/x"),
        ("_include", "Organization:endpoint"),
        ("_include", "OrganizationAffiliation:endpoint:Organization"),
    ],
)
def test_parameters_dsf_has_not_for_affiliations_are_refused_in_strict_mode(
    service: FhirService, parameter: tuple[str, str]
) -> None:
    response = service.handle(
        service.local_identity(),
        "GET",
        "OrganizationAffiliation",
        [parameter],
        headers={"prefer": "handling=strict"},
        body=None,
    )
    assert response.status == 400, response.resource
    assert response.resource is not None
    assert parameter[0] in json.dumps(response.resource)


@pytest.mark.parametrize(
    ("consortium", "message"),
    [
        ({"Net": {"Nobody": ["DIC"]}}, "member 'Nobody' of parent organization 'Net' is not"),
        ({"Hub": {"Site_1": ["DIC"]}}, "'Hub' is a site of the sandbox"),
        ({"Net": {"Site_1": ["DIX"]}}, "role DIX of member 'Site_1' is not a code of DSF 2.1"),
        ({"Net": {"Site_1": []}}, "needs a list of role codes"),
        ({"Net": {"Site_1": "DIC"}}, "needs a list of role codes"),
        ({"Net": {}}, "parent organization 'Net' has no members"),
        ({"a b": {"Site_1": ["DIC"]}}, "parent organization identifier 'a b'"),
    ],
)
def test_a_bad_consortium_is_refused_before_anything_is_written(
    tmp_path: Path, consortium: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        init_sandbox(tmp_path / "net", SITES, consortium=consortium)
    assert not (tmp_path / "net").exists()


def test_roles_follow_the_release(tmp_path: Path, ca: CertificateAuthority) -> None:
    """BIO is in DSF 2.x's organization-role CodeSystem (2.0.0), not in 1.9's (1.0.0)."""
    consortium = {"Net": {"Site_1": ["BIO"]}}
    init_sandbox(tmp_path / "two", SITES, ca=ca, consortium=consortium)
    with pytest.raises(
        ValueError, match=re.escape("role BIO of member 'Site_1' is not a code of DSF 1.9")
    ):
        init_sandbox(tmp_path / "one", SITES, ca=ca, consortium=consortium, dsf_release=DSF_1)
