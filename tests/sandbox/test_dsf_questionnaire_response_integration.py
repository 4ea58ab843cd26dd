"""DSF's ``QuestionnaireResponseIntegrationTest`` (2.1.0 and 1.9.0) replayed against the sandbox,
organization and (2.1) practitioner identities; each id names the Java test method
(``<version>-<method>``).

``createQuestionnaire`` and ``createQuestionnaireResponse`` of DSF's
``AbstractQuestionnaireIntegrationTest`` are rebuilt below (a Questionnaire tagged ``ALL`` with
the user-task-id and business-key items; an in-progress response authored by the local
organization).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest

from dsf_bridge.dsf.versions import DSF_2, DsfRelease
from tests.sandbox.test_dsf_fixtures import (
    ADMIN,
    EXTERNAL,
    LOCAL,
    MINIMAL,
    ORG_SYSTEM,
    PRACTITIONER,
    PRACTITIONER_ROLE_SYSTEM,
    PRACTITIONER_SYSTEM,
    RELEASES,
    DsfIntegration,
    assert_forbidden,
    practitioner_reference,
)

QUESTIONNAIRE_URL = "http://dsf.dev/fhir/Questionnaire/userTask/foo"
QUESTIONNAIRE_VERSION = "2.0"
TEST_SYSTEM = "http://dsf.dev/fhir/CodeSystem/test"


def _item(link_id: str, text: str, answer: str) -> dict[str, Any]:
    return {"linkId": link_id, "text": text, "answer": [{"valueString": answer}]}


def questionnaire() -> dict[str, Any]:
    return {
        "resourceType": "Questionnaire",
        "meta": {
            "profile": ["http://dsf.dev/fhir/StructureDefinition/questionnaire"],
            "tag": [{"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "ALL"}],
        },
        "url": QUESTIONNAIRE_URL,
        "version": QUESTIONNAIRE_VERSION,
        "identifier": [{"system": TEST_SYSTEM, "value": "foo"}],
        "status": "active",
        "date": "2022-01-01T00:00:00+00:00",
        "item": [
            {
                "linkId": "user-task-id",
                "text": "The user-task-id of the process execution",
                "type": "string",
                "required": True,
            },
            {
                "linkId": "business-key",
                "text": "The business-key of the process execution",
                "type": "string",
                "required": True,
            },
        ],
    }


def questionnaire_response(dsf: DsfIntegration) -> dict[str, Any]:
    return {
        "resourceType": "QuestionnaireResponse",
        "meta": {"profile": ["http://dsf.dev/fhir/StructureDefinition/questionnaire-response"]},
        "identifier": {"system": TEST_SYSTEM, "value": "foo"},
        "questionnaire": f"{QUESTIONNAIRE_URL}|{QUESTIONNAIRE_VERSION}",
        "status": "in-progress",
        "authored": "2022-01-02T00:00:00+00:00",
        "author": {
            "type": "Organization",
            "reference": f"Organization/{dsf.local_organization_id}",
            "identifier": {"system": ORG_SYSTEM, "value": LOCAL},
        },
        "item": [
            _item("user-task-id", "The user-task-id of the process execution", str(uuid.uuid4())),
            _item("business-key", "The business-key of the process execution", str(uuid.uuid4())),
        ],
    }


def _stored(
    release: DsfRelease, *, with_questionnaire: bool = True
) -> tuple[DsfIntegration, dict[str, Any]]:
    """A running server with the Questionnaire and an in-progress response, both stored by the
    DAO (as the Java tests do)."""
    dsf = DsfIntegration.start(release)
    if with_questionnaire:
        dsf.dao_create(questionnaire())
    return dsf, dsf.dao_create(questionnaire_response(dsf))


@pytest.mark.parametrize("release", RELEASES)
def test_create_valid_by_local_user(release: DsfRelease) -> None:
    """testCreateValidByLocalUser"""
    dsf = DsfIntegration.start(release)
    dsf.dao_create(questionnaire())
    created = dsf.created(LOCAL, questionnaire_response(dsf))
    assert created["id"] and created["meta"]["versionId"] == "1"


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize(
    ("caller", "status"),
    [
        pytest.param(LOCAL, "completed", id="testCreateNotAllowedByLocalUserStatusCompleted"),
        pytest.param(EXTERNAL, "in-progress", id="testCreateNotAllowedByRemoteUser"),
    ],
)
def test_create_not_allowed(release: DsfRelease, caller: str, status: str) -> None:
    dsf = DsfIntegration.start(release)
    response = dsf.create(caller, {**questionnaire_response(dsf), "status": status})
    assert_forbidden(response, "create")
    assert dsf.service.store.all("QuestionnaireResponse") == []


@pytest.mark.parametrize("release", RELEASES)
def test_update_allowed_by_local_user(release: DsfRelease) -> None:
    """testUpdateAllowedByLocalUser: in-progress -> completed, version 2."""
    dsf, created = _stored(release)
    response = dsf.update(LOCAL, {**created, "status": "completed"})
    assert response.status == 200, response.resource
    assert response.resource is not None
    assert (response.resource["id"], response.resource["meta"]["versionId"]) == (created["id"], "2")


def _no_items(resource: dict[str, Any]) -> dict[str, Any]:
    return {**resource, "status": "stopped", "item": []}


def _other_user_task_id(resource: dict[str, Any]) -> dict[str, Any]:
    item = _item("user-task-id", "The user-task-id of the process execution", str(uuid.uuid4()))
    return {**resource, "status": "stopped", "item": [item]}


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize(
    ("caller", "change"),
    [
        pytest.param(LOCAL, lambda r: r, id="testUpdateNotAllowedByLocalUser"),
        pytest.param(LOCAL, _no_items, id="testUpdateNotAllowedByLocalUserNoUserTaskId"),
        pytest.param(
            LOCAL, _other_user_task_id, id="testUpdateNotAllowedByLocalUserChangedUserTaskId"
        ),
        pytest.param(
            EXTERNAL, lambda r: {**r, "status": "completed"}, id="testUpdateNotAllowedByRemoteUser"
        ),
    ],
)
def test_update_not_allowed(release: DsfRelease, caller: str, change: Any) -> None:
    dsf, created = _stored(release, with_questionnaire=False)
    assert_forbidden(dsf.update(caller, change(dict(created))), "update")
    stored = dsf.service.store.read("QuestionnaireResponse", created["id"])
    assert stored == created


@pytest.mark.parametrize("release", RELEASES)
def test_second_update_not_allowed_by_local_user(release: DsfRelease) -> None:
    """testSecondUpdateNotAllowedByLocalUser: completed -> completed."""
    dsf, created = _stored(release, with_questionnaire=False)
    updated = dsf.service.store.update({**created, "status": "completed"})
    assert_forbidden(dsf.update(LOCAL, updated), "update")


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize(
    ("caller", "status"),
    [
        pytest.param(LOCAL, 200, id="testDeleteAllowedByLocalUser"),
        pytest.param(EXTERNAL, 403, id="testDeleteNotAllowedByRemoteUser"),
    ],
)
def test_delete(release: DsfRelease, caller: str, status: int) -> None:
    dsf, created = _stored(release, with_questionnaire=False)
    response = dsf.request(caller, "DELETE", f"QuestionnaireResponse/{created['id']}")
    if status == 403:
        assert_forbidden(response, "delete")
        assert dsf.service.store.read("QuestionnaireResponse", created["id"]) is not None
    else:
        assert response.status == 200
        assert dsf.service.store.is_deleted("QuestionnaireResponse", created["id"])


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize(
    ("caller", "allowed"),
    [
        pytest.param(LOCAL, True, id="testDeletePermanentlyAllowedByLocalUser"),
        pytest.param(EXTERNAL, False, id="testDeletePermanentlyNotAllowedByRemoteUser"),
    ],
)
def test_delete_permanently(release: DsfRelease, caller: str, allowed: bool) -> None:
    dsf, created = _stored(release, with_questionnaire=False)
    dsf.service.store.delete("QuestionnaireResponse", created["id"])
    path = f"QuestionnaireResponse/{created['id']}/$permanent-delete"
    response = dsf.request(caller, "POST", path)
    if allowed:
        assert response.status == 200
        assert dsf.service.store.history("QuestionnaireResponse", created["id"]) == []
    else:
        assert_forbidden(response, "delete")


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize(
    ("caller", "path"),
    [
        pytest.param(LOCAL, "", id="testReadAllowedByLocalUser"),
        pytest.param(EXTERNAL, "", id="testReadNotAllowedByRemoteUser"),
        pytest.param(EXTERNAL, "/_history/1", id="testReadNotAllowedByRemoteUserWithVersion"),
    ],
)
def test_read(release: DsfRelease, caller: str, path: str) -> None:
    dsf, created = _stored(release, with_questionnaire=False)
    response = dsf.request(caller, "GET", f"QuestionnaireResponse/{created['id']}{path}")
    if caller == LOCAL:
        assert response.status == 200 and response.resource is not None
        assert (response.resource["id"], response.resource["meta"]["versionId"]) == (
            created["id"],
            "1",
        )
    else:
        assert_forbidden(response, "read")


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize(
    ("caller", "count"),
    [
        pytest.param(LOCAL, 1, id="testHistory"),
        pytest.param(EXTERNAL, 0, id="testHistoryRemoteUser"),
    ],
)
def test_history(release: DsfRelease, caller: str, count: int) -> None:
    dsf, created = _stored(release, with_questionnaire=False)
    for path in (
        f"QuestionnaireResponse/{created['id']}/_history",
        "QuestionnaireResponse/_history",
    ):
        response = dsf.request(caller, "GET", path)
        assert response.status == 200 and response.resource is not None
        assert response.resource["type"] == "history"
        assert len(response.resource["entry"]) == count
    everything = dsf.request(caller, "GET", "_history")
    assert everything.resource is not None
    responses = [
        e
        for e in everything.resource["entry"]
        if e["resource"]["resourceType"] == "QuestionnaireResponse"
    ]
    assert len(responses) == count
    if caller == EXTERNAL:
        assert everything.resource["entry"]  # the allow list is readable by all


@pytest.mark.parametrize("release", RELEASES)
def test_search_by_identifier(release: DsfRelease) -> None:
    """testSearchByIdentifier and testSearchByIdentifierRemoteUser."""
    dsf, created = _stored(release, with_questionnaire=False)
    criteria = [("identifier", f"{TEST_SYSTEM}|foo")]
    local = dsf.search(LOCAL, "QuestionnaireResponse", criteria)
    assert [e["resource"]["id"] for e in local["entry"]] == [created["id"]]
    assert dsf.search(EXTERNAL, "QuestionnaireResponse", criteria)["entry"] == []


@pytest.mark.parametrize("release", RELEASES)
def test_search_by_status(release: DsfRelease) -> None:
    """testSearchByStatus"""
    dsf, _created = _stored(release, with_questionnaire=False)
    found = dsf.search(LOCAL, "QuestionnaireResponse", [("status", "in-progress")])
    assert [e["resource"]["status"] for e in found["entry"]] == ["in-progress"]


def _completed_by_practitioner(dsf: DsfIntegration) -> dict[str, Any]:
    dsf.dao_create(questionnaire())
    response = questionnaire_response(dsf)
    response["status"] = "completed"
    response["author"] = {
        "type": "Practitioner",
        "identifier": {
            "system": "http://dsf.dev/sid/practitioner-identifier",
            "value": "minimal@test.org",
        },
    }
    return dsf.dao_create(response)


def test_update_completed_amended_allowed_organization_user() -> None:
    """testUpdateCompletedAmendedAllowedOrganizationUser (2.1): completed -> amended by the local
    organization, the author (a practitioner) left as it is."""
    dsf = DsfIntegration.start(DSF_2)
    created = _completed_by_practitioner(dsf)
    response = dsf.update(LOCAL, {**created, "status": "amended"})
    assert response.status == 200, response.resource


def test_update_completed_amended_not_allowed() -> None:
    """testUpdateCompletedAmendedNotAllowed (2.1), its organization step: the external
    organization."""
    dsf = DsfIntegration.start(DSF_2)
    created = _completed_by_practitioner(dsf)
    assert_forbidden(dsf.update(EXTERNAL, {**created, "status": "amended"}), "update")


# -- practitioner identities (2.1) --------------------------------------------------------------

AUTHORIZATION_EXTENSION = (
    "http://dsf.dev/fhir/StructureDefinition/extension-questionnaire-authorization"
)


def _authorized(dsf: DsfIntegration, part: dict[str, Any]) -> dict[str, Any]:
    """An in-progress response whose extension-questionnaire-authorization has ``part``, stored
    by the DAO with the Questionnaire."""
    dsf.dao_create(questionnaire())
    response = questionnaire_response(dsf)
    response["extension"] = [{"url": AUTHORIZATION_EXTENSION, "extension": [part]}]
    return dsf.dao_create(response)


def _role(code: str) -> dict[str, Any]:
    return {
        "url": "practitioner-role",
        "valueCoding": {"system": PRACTITIONER_ROLE_SYSTEM, "code": code},
    }


def _practitioner(email: str) -> dict[str, Any]:
    return {
        "url": "practitioner",
        "valueIdentifier": {"system": PRACTITIONER_SYSTEM, "value": email},
    }


def _completed_by(created: dict[str, Any], email: str) -> dict[str, Any]:
    return {
        **created,
        "status": "completed",
        "authored": "2022-01-03T00:00:00+00:00",
        "author": practitioner_reference(email),
    }


def _found(dsf: DsfIntegration, who: str, resource_id: str) -> int:
    result = dsf.search(who, "QuestionnaireResponse", [("_id", resource_id)])
    assert result["total"] == len(result["entry"])
    return int(result["total"])


@pytest.mark.parametrize(
    ("part", "allowed"),
    [
        pytest.param(_role("DIC_USER"), True, id="testUpdateAllowedByMinimalUserWithRole"),
        pytest.param(_role("UAC_USER"), False, id="testUpdateNotAllowedByMinimalUserWithoutRole"),
    ],
)
def test_update_by_minimal_user(part: dict[str, Any], allowed: bool) -> None:
    dsf = DsfIntegration.start(DSF_2)
    created = _authorized(dsf, part)
    response = dsf.update(MINIMAL, _completed_by(created, MINIMAL))
    if allowed:
        assert response.status == 200, response.resource
        assert response.resource is not None and response.resource["meta"]["versionId"] == "2"
    else:
        assert_forbidden(response, "update")
        assert dsf.service.store.read("QuestionnaireResponse", created["id"]) == created


@pytest.mark.parametrize(
    ("part", "readable"),
    [
        pytest.param(
            _role("UAC_USER"), False, id="testReadNotAllowedByPractitionerUserWithoutRole"
        ),
        pytest.param(_role("DIC_USER"), True, id="testReadAllowedByPractitionerUserWithRole"),
        pytest.param(
            _practitioner(PRACTITIONER),
            False,
            id="testReadNotAllowedByPractitionerUserWithoutIdentifier",
        ),
        pytest.param(
            _practitioner(MINIMAL), True, id="testReadAllowedByPractitionerUserWithIdentifier"
        ),
    ],
)
def test_read_by_practitioner(part: dict[str, Any], readable: bool) -> None:
    """Read and ``_id`` search by the minimal user before and after the response is completed
    (by the minimal user when it may, else by the admin); the local organization and the admin
    always find it."""
    dsf = DsfIntegration.start(DSF_2)
    created = _authorized(dsf, part)
    path = f"QuestionnaireResponse/{created['id']}/_history/1"
    first = dsf.request(MINIMAL, "GET", path)
    assert _found(dsf, LOCAL, created["id"]) == 1
    completer = MINIMAL if readable else ADMIN
    updated = dsf.update(completer, _completed_by(created, completer))
    assert updated.status == 200, updated.resource
    assert updated.resource is not None and updated.resource["meta"]["versionId"] == "2"
    second = dsf.request(MINIMAL, "GET", f"QuestionnaireResponse/{created['id']}/_history/2")
    assert _found(dsf, ADMIN, created["id"]) == 1
    if readable:
        assert first.status == 200 and second.status == 200
        assert second.resource is not None and second.resource["meta"]["versionId"] == "2"
        assert _found(dsf, MINIMAL, created["id"]) == 1
    else:
        assert_forbidden(first, "read")
        assert_forbidden(second, "read")
        assert _found(dsf, MINIMAL, created["id"]) == 0


def test_update_completed_amended_allowed_dsf_admin() -> None:
    """testUpdateCompletedAmendedAllowedDsfAdmin"""
    dsf = DsfIntegration.start(DSF_2)
    created = _completed_by_practitioner(dsf)
    response = dsf.update(ADMIN, {**created, "status": "amended"})
    assert response.status == 200, response.resource


@pytest.mark.parametrize("caller", [MINIMAL, PRACTITIONER])
def test_update_completed_amended_not_allowed_practitioner(caller: str) -> None:
    """testUpdateCompletedAmendedNotAllowed, its practitioner steps (minimal, practitioner)."""
    dsf = DsfIntegration.start(DSF_2)
    created = _completed_by_practitioner(dsf)
    assert_forbidden(dsf.update(caller, {**created, "status": "amended"}), "update")
    assert dsf.service.store.read("QuestionnaireResponse", created["id"]) == created


def test_search_allowed_by_minimal_user_with_role() -> None:
    """testSearchAllowedByMinimalUserWithRole: completed by the minimal user, found by
    ``author:identifier`` (strict handling, so an unknown parameter cannot pass unnoticed)."""
    dsf = DsfIntegration.start(DSF_2)
    created = _authorized(dsf, _role("DIC_USER"))
    updated = dsf.update(MINIMAL, _completed_by(created, MINIMAL))
    assert updated.status == 200, updated.resource
    response = dsf.service.handle(
        dsf.identity(MINIMAL),
        "GET",
        "QuestionnaireResponse",
        [("author:identifier", f"{PRACTITIONER_SYSTEM}|{MINIMAL}")],
        headers={"prefer": "handling=strict"},
        body=None,
    )
    assert response.status == 200, response.resource
    assert response.resource is not None and response.resource["total"] == 1
    assert [e["resource"]["id"] for e in response.resource["entry"]] == [created["id"]]


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize(
    ("caller", "modified"),
    [
        pytest.param(LOCAL, False, id="testNotModifiedCheckAllowedByLocalUser"),
        pytest.param(EXTERNAL, False, id="testNotModifiedCheckNotAllowedByRemoteUser"),
        pytest.param(LOCAL, True, id="testNotModifiedCheckAllowedByLocalUserWithModification"),
        pytest.param(
            EXTERNAL, True, id="testNotModifiedCheckNotAllowedByRemoteUserWithModification"
        ),
    ],
)
def test_not_modified_check(release: DsfRelease, caller: str, modified: bool) -> None:
    """The client reads with If-None-Match of the version it holds: 304 while current, the
    newer version once updated (by the DAO, as DSF's test does), 403 for a remote caller."""
    dsf, created = _stored(release, with_questionnaire=False)
    if modified:
        stored = dsf.service.store.update(copy.deepcopy(created))
        assert stored["meta"]["versionId"] == "2"
    response = dsf.service.handle(
        dsf.identity(caller),
        "GET",
        f"QuestionnaireResponse/{created['id']}",
        [],
        headers={"if-none-match": 'W/"1"'},
        body=None,
    )
    if caller == EXTERNAL:
        assert_forbidden(response, "read")
    elif modified:
        assert response.status == 200 and response.resource is not None
        assert response.resource["meta"]["versionId"] == "2"
    else:
        assert response.status == 304
        assert response.resource is None
        assert response.headers["ETag"] == 'W/"1"'
