"""The sandbox against DSF's own Task fixtures: same setup, same allowed/forbidden outcomes.

Fixtures (from ``dsf/dsf-fhir/dsf-fhir-server/src/test/resources/``, read from the reference
directory, never copied):

- ``integration/test-bundle.xml``: the allow list of DSF's integration tests (Test_Organization
  local, External_Test_Organization, Parent_Organization; affiliations Test_Organization =
  DIC+COS and External_Test_Organization = TTP+DTS of Parent_Organization). Its placeholders get
  our minted thumbprints and the server's address.
- ``integration/task/dsf-test-task-1.0.xml``: the Task, completed like DSF's ``readTestTask``.
- ``integration/task/dsf-test-activity-definition{1,2,3,4,8,10,11,12,13,14}-1.0.xml``.

Cases mirror ``TaskIntegrationTest`` (dsf 2.x) for organization identities; each creates the
ActivityDefinition as the local organization, then the Task as the named caller, over real TLS.
Result when written: the sandbox agrees with DSF on all 48 parametrized creates (8 allowed with
201, 40 forbidden with 403 and nothing stored), on draft-then-requested
(``testCreateAllowViaDraftNotAllowedAsRequestedLocal``), on
``testUpdateRequestedToInProgressForbiddenForExternal`` (plus the local update DSF allows), and
the allow list loads with both affiliations. Practitioner identities (``role_config``: DSF's
test users by certificate thumbprint) are replayed in ``test_dsf_task_integration.py`` and
``test_dsf_questionnaire_response_integration.py``; ``*_PRACTITIONER`` authorizations never admit
an organization (activity definitions 8 and 10). Not mirrored: validation of Tasks against their
StructureDefinition (DSF validates, the sandbox does not), and ``authorization/``'s two
process-authorization files, which DSF's ``ProcessAuthorizationHelperTest`` feeds to the helper
directly (their version ``1.0.0`` can never be instantiated by a Task, whose canonical takes
``major.minor``).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.activitydefinition import ActivityDefinition
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.task import Task

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity, thumbprint
from dsf_bridge.dsf.versions import DSF_1, DSF_2, DsfRelease
from dsf_bridge.errors import RemoteError
from dsf_bridge.sandbox.authorization import OrganizationIdentity, PractitionerIdentity
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.service import FhirResponse, FhirService
from dsf_bridge.sandbox.sites import build_service
from tests.reference import reference_dir
from tests.sandbox.harness import FAST_RETRY

LOCAL = "Test_Organization"
EXTERNAL = "External_Test_Organization"
ORG_SYSTEM = "http://dsf.dev/sid/organization-identifier"
MESSAGE_SYSTEM = "http://dsf.dev/fhir/CodeSystem/bpmn-message"


def _resources() -> Path:
    return reference_dir() / "dsf/dsf-fhir/dsf-fhir-server/src/test/resources"


def _strip_comments(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_comments(v) for k, v in node.items() if k != "fhir_comments"}
    if isinstance(node, list):
        return [_strip_comments(v) for v in node]
    return node


def _json(model: Any) -> dict[str, Any]:
    result: dict[str, Any] = _strip_comments(model.model_dump(mode="json", exclude_none=True))
    return result


def activity_definition(number: int) -> dict[str, Any]:
    path = _resources() / f"integration/task/dsf-test-activity-definition{number}-1.0.xml"
    return _json(ActivityDefinition.model_validate_xml(path.read_bytes()))


def dsf_test_task(requester: str | None, recipient: str) -> dict[str, Any]:
    """``TaskIntegrationTest.readTestTask`` for an organization requester."""
    path = _resources() / "integration/task/dsf-test-task-1.0.xml"
    task = _json(Task.model_validate_xml(path.read_bytes()))
    task["authoredOn"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if requester is not None:
        task["requester"] = {
            "type": "Organization",
            "identifier": {"system": ORG_SYSTEM, "value": requester},
        }
    task["restriction"]["recipient"][0] = {
        "type": "Organization",
        "identifier": {"system": ORG_SYSTEM, "value": recipient},
    }
    return task


def allow_list(local_thumbprint: str, external_thumbprint: str) -> dict[str, Any]:
    text = (_resources() / "integration/test-bundle.xml").read_text()
    replacements = {
        "${dev.dsf.fhir.server.endpoint.address.external}": "https://external.test/fhir",
        "${dev.dsf.fhir.server.endpoint.address}": "https://localhost/fhir",
        "${dev.dsf.fhir.server.organization.thumbprint.external}": external_thumbprint,
        "${dev.dsf.fhir.server.organization.thumbprint}": local_thumbprint,
    }
    for placeholder, value in replacements.items():
        text = text.replace(placeholder, value)
    return _json(Bundle.model_validate_xml(text.encode()))


def fixture(name: str, model: Any) -> dict[str, Any]:
    """One XML resource of ``integration/task/`` as JSON (``model``: its fhir.resources class).

    DSF 1.9.0's copies of these files differ from 2.1.0's only in their licence header and an
    ActivityDefinition ``date``, so both versions load the 2.1.0 files."""
    return _json(model.model_validate_xml((_resources() / "integration/task" / name).read_bytes()))


def test_task_profile(release: DsfRelease) -> dict[str, Any]:
    """``readTestTaskProfile``: ``dsf-test-task-profile-1.0.xml``; DSF 1.9.0's copy differs only
    in its ``baseDefinition`` (``task-base`` instead of ``task``)."""
    from fhir.resources.R4B.structuredefinition import StructureDefinition

    profile = fixture("dsf-test-task-profile-1.0.xml", StructureDefinition)
    profile["baseDefinition"] = release.task_base_profile
    return profile


test_task_profile.__test__ = False  # type: ignore[attr-defined]


RELEASES = [pytest.param(DSF_2, id="2.1"), pytest.param(DSF_1, id="1.9")]
_LOCAL_THUMBPRINT = "a" * 128
_EXTERNAL_THUMBPRINT = "b" * 128

# The local users of AbstractIntegrationTest's role config, by the e-mail of their certificates
# (X509Certificates.*_CLIENT_MAIL).
PRACTITIONER = "practitioner@invalid"
ADMIN = "admin@invalid"
MINIMAL = "minimal@invalid"
PRACTITIONER_SYSTEM = "http://dsf.dev/sid/practitioner-identifier"
PRACTITIONER_ROLE_SYSTEM = "http://dsf.dev/fhir/CodeSystem/practitioner-role"
_PRACTITIONER_THUMBPRINTS = {PRACTITIONER: "c" * 128, ADMIN: "d" * 128, MINIMAL: "e" * 128}
_ALL_OPERATIONS = ["CREATE", "READ", "UPDATE", "DELETE", "SEARCH", "HISTORY"]


def role_config(release: DsfRelease, thumbprints: dict[str, str]) -> list[dict[str, Any]]:
    """``dev.dsf.fhir.server.roleConfig`` of DSF's ``AbstractIntegrationTest``: 2.1 has the
    practitioner (DIC_USER), admin (DSF_ADMIN) and minimal (DIC_USER, few roles) users, 1.9 the
    practitioner only."""
    practitioner = {
        "practitioner-test-user": {
            "thumbprint": thumbprints[PRACTITIONER],
            "dsf-role": list(_ALL_OPERATIONS),
            "practitioner-role": [f"{PRACTITIONER_ROLE_SYSTEM}|DIC_USER"],
        }
    }
    if release.major < 2:
        return [practitioner]
    read = ["Task", "Questionnaire", "QuestionnaireResponse"]
    return [
        practitioner,
        {
            "admin-user": {
                "thumbprint": thumbprints[ADMIN],
                "dsf-role": list(_ALL_OPERATIONS),
                "practitioner-role": [f"{PRACTITIONER_ROLE_SYSTEM}|DSF_ADMIN"],
            }
        },
        {
            "minimal-test-user": {
                "thumbprint": thumbprints[MINIMAL],
                "dsf-role": [
                    {"CREATE": ["Task"]},
                    {"READ": read},
                    {"UPDATE": ["QuestionnaireResponse"]},
                    {"SEARCH": read},
                    {"HISTORY": read},
                ],
                "practitioner-role": [f"{PRACTITIONER_ROLE_SYSTEM}|DIC_USER"],
            }
        },
    ]


def practitioner_reference(email: str) -> dict[str, Any]:
    """``readTestTask(null, <mail>, ...)``'s requester (DSF 2.x)."""
    return {"type": "Practitioner", "identifier": {"system": PRACTITIONER_SYSTEM, "value": email}}


def practitioner_task(email: str) -> dict[str, Any]:
    """``readTestTask(null, email, "Test_Organization")``: the test Task requested by a
    practitioner."""
    task = dsf_test_task(LOCAL, LOCAL)
    task["requester"] = practitioner_reference(email)
    return task


@dataclass
class DsfIntegration:
    """DSF's ``AbstractIntegrationTest`` server (its test bundle, ``Test_Organization`` local,
    ``External_Test_Organization`` remote) as a sandbox :class:`FhirService` of one DSF release,
    called without HTTP (the TLS path is covered by :func:`dsf_test_server` below)."""

    service: FhirService
    release: DsfRelease

    @classmethod
    def start(cls, release: DsfRelease) -> DsfIntegration:
        bundle = allow_list(_LOCAL_THUMBPRINT, _EXTERNAL_THUMBPRINT)
        service = build_service(LOCAL, bundle, "https://localhost/fhir", dsf_release=release)
        service.configure_roles(role_config(release, _PRACTITIONER_THUMBPRINTS))
        return cls(service, release)

    def plugin(self, definition: dict[str, Any]) -> None:
        """What most Java tests do first: create the ActivityDefinition and the test Task
        profile as the local organization."""
        self.created(LOCAL, definition)
        self.created(LOCAL, test_task_profile(self.release))

    def identity(self, who: str) -> OrganizationIdentity:
        """``who``: an organization identifier or a practitioner's e-mail."""
        if who in _PRACTITIONER_THUMBPRINTS:
            identity = self.service.identify(_PRACTITIONER_THUMBPRINTS[who], who)
            assert isinstance(identity, PractitionerIdentity), who
            return identity
        identity = self.service.identify(
            _LOCAL_THUMBPRINT if who == LOCAL else _EXTERNAL_THUMBPRINT
        )
        assert isinstance(identity, OrganizationIdentity)
        return identity

    @property
    def local_organization_id(self) -> str:
        for organization in self.service.store.all("Organization"):
            if any(i.get("value") == LOCAL for i in organization.get("identifier") or []):
                return str(organization["id"])
        raise AssertionError("local organization missing")

    @property
    def local_reference(self) -> dict[str, Any]:
        """``new Reference(organizationProvider.getLocalOrganization().get())``: a literal."""
        return {"reference": f"Organization/{self.local_organization_id}"}

    def request(
        self,
        who: str,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> FhirResponse:
        return self.service.handle(
            self.identity(who), method, path, params or [], headers={}, body=copy.deepcopy(body)
        )

    def create(self, who: str, resource: dict[str, Any]) -> FhirResponse:
        return self.request(who, "POST", str(resource["resourceType"]), resource)

    def update(self, who: str, resource: dict[str, Any]) -> FhirResponse:
        return self.request(who, "PUT", f"{resource['resourceType']}/{resource['id']}", resource)

    def created(self, who: str, resource: dict[str, Any]) -> dict[str, Any]:
        response = self.create(who, resource)
        assert response.status == 201, response.resource
        assert response.resource is not None
        return response.resource

    def dao_create(self, resource: dict[str, Any]) -> dict[str, Any]:
        """``...Dao.create``: stored without authorization, as DSF's tests do."""
        return self.service.store.create(copy.deepcopy(resource))

    def search(
        self, who: str, resource_type: str, params: list[tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        response = self.request(who, "GET", resource_type, params=params or [])
        assert response.status == 200, response.resource
        assert response.resource is not None
        return response.resource


def assert_forbidden(response: FhirResponse, operation: str) -> None:
    """403 with exactly DSF's body: ``Operation <op> forbidden`` when the authorization rules
    refuse (``ResponseGenerator.forbiddenNotAllowed``), the validation messages when the resource
    is invalid against its profiles (``forbiddenNotValid``; DSF validates before it authorizes)."""
    assert response.status == 403, response.resource
    assert response.resource is not None
    issue = response.resource["issue"][0]
    assert issue["severity"] == "error"
    if issue["code"] == "forbidden":
        assert issue["diagnostics"] == f"Operation {operation} forbidden"
    else:
        assert issue["code"] == "processing" and issue["diagnostics"]


@dataclass
class DsfTestServer:
    server: SandboxServer
    clients: dict[str, FhirClient]


@asynccontextmanager
async def dsf_test_server(tmp_path: Path) -> AsyncIterator[DsfTestServer]:
    ca = CertificateAuthority("DSF integration test CA")
    ca_file = tmp_path / "ca.pem"
    ca.write(ca_file)
    server_files = (tmp_path / "server.pem", tmp_path / "server-key.pem")
    ca.issue_server("localhost").write(*server_files)
    thumbprints: dict[str, str] = {}
    contexts = {}
    for organization in (LOCAL, EXTERNAL):
        issued = ca.issue_client(organization)
        files = (tmp_path / f"{organization}.pem", tmp_path / f"{organization}-key.pem")
        issued.write(*files)
        thumbprints[organization] = thumbprint(issued.certificate)
        contexts[organization] = build_ssl_context(load_identity(*files), [ca_file])
    service = build_service(
        LOCAL, allow_list(thumbprints[LOCAL], thumbprints[EXTERNAL]), "https://localhost/fhir"
    )
    async with SandboxServer(
        service, certificate=server_files[0], key=server_files[1], ca_files=[ca_file]
    ) as server:
        clients = {
            organization: FhirClient(server.base_url, ssl_context=context, retry=FAST_RETRY)
            for organization, context in contexts.items()
        }
        try:
            yield DsfTestServer(server, clients)
        finally:
            for client in clients.values():
                await client.aclose()


Change = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Change:
    def change(task: dict[str, Any]) -> None:
        if value is None:
            task.pop(path, None)
        else:
            task[path] = copy.deepcopy(value)

    return change


def _profile_suffix(suffix: str) -> Change:
    def change(task: dict[str, Any]) -> None:
        task["meta"]["profile"][0] += suffix

    return change


def _message_input(**fields: Any) -> dict[str, Any]:
    parameter: dict[str, Any] = {
        "type": {"coding": [{"system": MESSAGE_SYSTEM, "code": fields.pop("code", "message-name")}]}
    }
    parameter.update(fields)
    return parameter


def _recipient_role_ttp(definition: dict[str, Any]) -> None:
    for part in definition["extension"][0]["extension"]:
        if part["url"] == "recipient":
            role = part["valueCoding"]["extension"][0]["extension"][1]["valueCoding"]
            role["code"] = "TTP"


_REMOTE_REF = {
    "reference": "http://foo.test/fhir/Organization/9f2c4a36-0000-4000-8000-000000000001"
}
_EXTERNAL_REF = {"type": "Organization", "identifier": {"system": ORG_SYSTEM, "value": EXTERNAL}}


@dataclass(frozen=True)
class Case:
    """One create of ``TaskIntegrationTest``: the AD, the Task, the caller, DSF's verdict."""

    name: str
    definition: int | None
    requester: str | None
    recipient: str
    caller: str
    allowed: bool
    change: Change | None = None
    change_definition: Callable[[dict[str, Any]], None] | None = None


CASES = [
    Case("testCreateTaskAllowedLocalUser", 1, LOCAL, LOCAL, LOCAL, True),
    Case("testCreateTaskNotAllowedRemoteUser", 1, EXTERNAL, LOCAL, EXTERNAL, False),
    Case("testCreateTaskAllowedLocalUser11", 11, LOCAL, LOCAL, LOCAL, True),
    Case("testCreateTaskAllowedLocalUser12", 12, LOCAL, LOCAL, LOCAL, True),
    Case("testCreateTaskAllowedLocalUser13", 13, LOCAL, LOCAL, LOCAL, True),
    Case("testCreateTaskNotAllowedLocalUser", 2, LOCAL, LOCAL, LOCAL, False),
    Case("testCreateTaskAllowedRemoteUser", 2, EXTERNAL, LOCAL, EXTERNAL, True),
    Case("testCreateTaskNotAllowedLocalUser2", 3, LOCAL, LOCAL, LOCAL, False),
    Case("testCreateTaskAllowedRemoteUser2", 3, EXTERNAL, LOCAL, EXTERNAL, True),
    Case(
        "testCreateTaskNotAllowedRemoteUser2",
        3,
        EXTERNAL,
        LOCAL,
        EXTERNAL,
        False,
        change_definition=_recipient_role_ttp,
    ),
    Case("testCreateTaskAllowedRemoteUser3", 4, EXTERNAL, LOCAL, EXTERNAL, True),
    Case(
        "testCreateTaskAllowedLocalUserVersionSpecificProfile",
        1,
        LOCAL,
        LOCAL,
        LOCAL,
        True,
        _profile_suffix("|1.0"),
    ),
    Case(
        "testCreateTaskAllowedLocalUserVersionSpecificProfileBadVersion",
        1,
        LOCAL,
        LOCAL,
        LOCAL,
        False,
        _profile_suffix("|0.x"),
    ),
    Case(
        "testCreateTaskNotAllowedLocalOrganizationNotPractitionerWithCosUserRole",
        8,
        LOCAL,
        LOCAL,
        LOCAL,
        False,
    ),
    Case("testCreateTaskNotAllowedLocalOrganizationWithoutRole3", 10, LOCAL, LOCAL, LOCAL, False),
    Case(
        "testCreateForbiddenDraftTaskExternalOrganization",
        None,
        EXTERNAL,
        LOCAL,
        EXTERNAL,
        False,
        _set("status", "draft"),
    ),
    # testCreateTaskForbiddenExternalUserNotPartOfRequesterOrganization
    Case("requester is another organization", 2, LOCAL, LOCAL, EXTERNAL, False),
    Case("requester missing", 2, LOCAL, LOCAL, EXTERNAL, False, _set("requester", None)),
    Case("requester empty", 2, LOCAL, LOCAL, EXTERNAL, False, _set("requester", {})),
    Case(
        "requester identifier missing",
        2,
        LOCAL,
        LOCAL,
        EXTERNAL,
        False,
        _set("requester", _REMOTE_REF),
    ),
    # testCreateForbiddenExternalUserRestrictionRecipientNotValid
    Case(
        "restriction not defined", 2, EXTERNAL, EXTERNAL, EXTERNAL, False, _set("restriction", None)
    ),
    Case(
        "restriction without recipient",
        2,
        EXTERNAL,
        EXTERNAL,
        EXTERNAL,
        False,
        _set("restriction", {"extension": [{"url": "test"}]}),
    ),
    Case(
        "recipient unresolvable literal",
        2,
        EXTERNAL,
        EXTERNAL,
        EXTERNAL,
        False,
        _set(
            "restriction",
            {"recipient": [{"reference": "Organization/0b9c0a9e-0000-4000-8000-000000000002"}]},
        ),
    ),
    Case("recipient not local organization", 2, EXTERNAL, EXTERNAL, EXTERNAL, False),
    Case(
        "recipient absolute reference",
        2,
        EXTERNAL,
        EXTERNAL,
        EXTERNAL,
        False,
        _set("restriction", {"recipient": [_REMOTE_REF]}),
    ),
    Case(
        "two recipients",
        2,
        EXTERNAL,
        EXTERNAL,
        EXTERNAL,
        False,
        _set("restriction", {"recipient": [_EXTERNAL_REF, _REMOTE_REF]}),
    ),
    # testCreateForbidden{Local,External}UserInstantiatesUriNotValid
    Case(
        "local instantiatesCanonical missing",
        1,
        LOCAL,
        LOCAL,
        LOCAL,
        False,
        _set("instantiatesCanonical", None),
    ),
    Case(
        "local instantiatesCanonical invalid",
        1,
        LOCAL,
        LOCAL,
        LOCAL,
        False,
        _set("instantiatesCanonical", "not-a-valid-pattern"),
    ),
    Case(
        "external instantiatesCanonical missing",
        2,
        EXTERNAL,
        LOCAL,
        EXTERNAL,
        False,
        _set("instantiatesCanonical", None),
    ),
    Case(
        "external instantiatesCanonical invalid",
        2,
        EXTERNAL,
        LOCAL,
        EXTERNAL,
        False,
        _set("instantiatesCanonical", "not-a-valid-pattern"),
    ),
    # testCreateForbiddenExternalUserInputNotValid
    Case("input empty", 2, EXTERNAL, LOCAL, EXTERNAL, False, _set("input", None)),
    Case(
        "input of another system",
        2,
        EXTERNAL,
        LOCAL,
        EXTERNAL,
        False,
        _set(
            "input",
            [{"type": {"coding": [{"system": "system", "code": "code"}]}, "valueString": "value"}],
        ),
    ),
    Case(
        "two message names",
        2,
        EXTERNAL,
        LOCAL,
        EXTERNAL,
        False,
        _set(
            "input",
            [_message_input(valueString="pingMessage"), _message_input(valueString="pingMessage")],
        ),
    ),
    Case(
        "message name without value",
        2,
        EXTERNAL,
        LOCAL,
        EXTERNAL,
        False,
        _set("input", [_message_input()]),
    ),
    Case(
        "message name input with empty code",
        2,
        EXTERNAL,
        LOCAL,
        EXTERNAL,
        False,
        _set("input", [_message_input(code="", valueString="pingMessage")]),
    ),
    Case(
        "message name empty",
        2,
        EXTERNAL,
        LOCAL,
        EXTERNAL,
        False,
        _set("input", [_message_input(valueString="")]),
    ),
    Case(
        "message name not a string",
        2,
        EXTERNAL,
        LOCAL,
        EXTERNAL,
        False,
        _set("input", [_message_input(valueCoding={"system": "system", "code": "code"})]),
    ),
    # testCreateForbiddenExternalUserOutputNotValid
    Case(
        "output not empty",
        2,
        EXTERNAL,
        LOCAL,
        EXTERNAL,
        False,
        _set(
            "output",
            [{"type": {"coding": [{"system": "system", "code": "code"}]}, "valueString": "value"}],
        ),
    ),
    # testCreateForbiddenExternalUserIllegalStatus (and the local variant)
    *[
        Case(
            f"external status {status}", 2, EXTERNAL, LOCAL, EXTERNAL, False, _set("status", status)
        )
        for status in ("received", "accepted", "in-progress", "completed", "failed", None)
    ],
    *[
        Case(f"local status {status}", 1, LOCAL, LOCAL, LOCAL, False, _set("status", status))
        for status in ("ready", "cancelled", "on-hold", "entered-in-error")
    ],
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_task_create_as_dsf_decides(case: Case, tmp_path: Path) -> None:
    async with dsf_test_server(tmp_path) as dsf:
        if case.definition is not None:
            definition = activity_definition(case.definition)
            if case.change_definition is not None:
                case.change_definition(definition)
            assert (await dsf.clients[LOCAL].create(definition)).status == 201
            profile = test_task_profile(DSF_2)
            assert (await dsf.clients[LOCAL].create(profile)).status == 201
        task = dsf_test_task(case.requester, case.recipient)
        if case.change is not None:
            case.change(task)
        client = dsf.clients[case.caller]
        if case.allowed:
            created = await client.create(task)
            assert created.status == 201
            assert created.id
        else:
            with pytest.raises(RemoteError) as caught:
                await client.create(task)
            assert caught.value.status == 403
            # DSF's body: "Operation create forbidden", or the validation messages.
            assert "Operation create forbidden" in str(caught.value) or "Task." in str(caught.value)
            assert dsf.server.service.store.all("Task") == []


async def test_draft_allowed_but_not_as_requested(tmp_path: Path) -> None:
    """``testCreateAllowViaDraftNotAllowedAsRequestedLocal`` with activity definition 14."""
    async with dsf_test_server(tmp_path) as dsf:
        local = dsf.clients[LOCAL]
        await local.create(activity_definition(14))
        await local.create(test_task_profile(DSF_2))
        task = dsf_test_task(LOCAL, LOCAL)
        draft = {
            **task,
            "status": "draft",
            "identifier": [{"system": "http://dsf.dev/sid/task-identifier", "value": "test"}],
        }
        assert (await local.create(draft)).status == 201
        with pytest.raises(RemoteError) as caught:
            await local.create(task)
        assert caught.value.status == 403
        # A second draft with the same task-identifier is refused as DSF does.
        with pytest.raises(RemoteError):
            await local.create(draft)


async def test_requested_to_in_progress_local_only(tmp_path: Path) -> None:
    """``testUpdateRequestedToInProgressForbiddenForExternal``, and the local update allowed."""
    async with dsf_test_server(tmp_path) as dsf:
        await dsf.clients[LOCAL].create(activity_definition(2))
        await dsf.clients[LOCAL].create(test_task_profile(DSF_2))
        created = await dsf.clients[EXTERNAL].create(dsf_test_task(EXTERNAL, LOCAL))
        assert created.resource is not None
        in_progress = {**created.resource, "status": "in-progress"}
        with pytest.raises(RemoteError) as caught:
            await dsf.clients[EXTERNAL].update(in_progress)
        assert caught.value.status == 403
        business_key = {
            "type": {"coding": [{"system": MESSAGE_SYSTEM, "code": "business-key"}]},
            "valueString": "7a1b2c3d",
        }
        with_key = {**in_progress, "input": [*in_progress["input"], business_key]}
        updated = await dsf.clients[LOCAL].update(with_key, if_match=1)
        assert updated.version == 2
        assert updated.resource is not None
        changed = {
            **updated.resource,
            "status": "completed",
            "instantiatesCanonical": "http://dsf.dev/bpe/Process/other|1.0",
        }
        with pytest.raises(RemoteError, match="Operation update forbidden"):
            await dsf.clients[LOCAL].update(changed)
        back = {**updated.resource, "status": "requested"}
        with pytest.raises(RemoteError, match="Operation update forbidden"):
            await dsf.clients[LOCAL].update(back)


def test_allow_list_fixture_loads_with_affiliations(tmp_path: Path) -> None:
    bundle = allow_list("a" * 128, "b" * 128)
    service = build_service(LOCAL, bundle, "https://localhost/fhir")
    affiliations = service.store.all("OrganizationAffiliation")
    assert len(affiliations) == 2
    assert all(a["organization"]["reference"].startswith("Organization/") for a in affiliations)
    # Loading the allow list again updates instead of duplicating (conditional PUTs).
    identity = service.local_identity()
    again = service.handle(identity, "POST", "", headers={}, body=json.loads(json.dumps(bundle)))
    assert again.status == 200
    assert len(service.store.all("OrganizationAffiliation")) == 2
    assert len(service.store.all("Organization")) == 3
