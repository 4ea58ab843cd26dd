"""DSF's ``TaskIntegrationTest`` (2.1.0 and 1.9.0) replayed against the sandbox, organization and
practitioner identities (the role config of DSF's ``AbstractIntegrationTest``: practitioner,
admin and minimal users, see ``test_dsf_fixtures.role_config``): every parametrized id is
``<DSF version>-<Java test method>`` (with ``.<step>`` where the Java method tries several
Tasks in a row), so each case maps 1:1 to DSF's test.

The Java tests are read, never copied: each case states DSF's expected status (and the state the
Java test asserts afterwards). DSF's own setup is :class:`DsfIntegration` (its test bundle, its
Task and ActivityDefinition fixtures). Cases that need StructureDefinition validation to reach
DSF's verdict live in ``test_dsf_task_validation_cases.py``. Practitioner cases replayed: all of
2.1 (create, read/search, draft update, search by ``requester:identifier``) and 1.9 (creates).
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fhir.resources.R4B.activitydefinition import ActivityDefinition
from fhir.resources.R4B.codesystem import CodeSystem
from fhir.resources.R4B.structuredefinition import StructureDefinition
from fhir.resources.R4B.task import Task
from fhir.resources.R4B.valueset import ValueSet

from dsf_bridge.dsf.versions import DSF_1, DSF_2, DsfRelease
from tests.sandbox.test_dsf_fixtures import (
    ADMIN,
    EXTERNAL,
    LOCAL,
    MESSAGE_SYSTEM,
    MINIMAL,
    ORG_SYSTEM,
    PRACTITIONER,
    PRACTITIONER_SYSTEM,
    RELEASES,
    DsfIntegration,
    activity_definition,
    assert_forbidden,
    dsf_test_task,
    fixture,
    practitioner_task,
    test_task_profile,
)

TASK_IDENTIFIER_SYSTEM = "http://dsf.dev/sid/task-identifier"
V2 = "2.1"
V1 = "1.9"
_BY_NAME = {DSF_2.name: DSF_2, DSF_1.name: DSF_1}

Build = Callable[[DsfIntegration], dict[str, Any]]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _message(value: Any = "startPingProcessMessage", code: str = "message-name") -> dict[str, Any]:
    parameter: dict[str, Any] = {"type": {"coding": [{"system": MESSAGE_SYSTEM, "code": code}]}}
    if isinstance(value, dict):
        parameter["valueCoding"] = value
    elif value is not None:
        parameter["valueString"] = value
    return parameter


def _org(identifier: str) -> dict[str, Any]:
    return {"type": "Organization", "identifier": {"system": ORG_SYSTEM, "value": identifier}}


def _remote_literal() -> dict[str, Any]:
    return {"reference": f"http://foo.test/fhir/Organization/{uuid.uuid4()}"}


def _unknown_local_literal() -> dict[str, Any]:
    return {"reference": f"Organization/{uuid.uuid4()}"}


def ping_task(dsf: DsfIntegration, status: str | None = "draft") -> dict[str, Any]:
    """The Java tests' hand-built local Task (``task-start-ping-process``, ping|0.3)."""
    task: dict[str, Any] = {
        "resourceType": "Task",
        "meta": {"profile": ["http://dsf.dev/fhir/StructureDefinition/task-start-ping-process"]},
        "instantiatesCanonical": "http://dsf.dev/bpe/Process/ping|0.3",
        "intent": "order",
        "authoredOn": _now(),
        "requester": dsf.local_reference,
        "restriction": {"recipient": [dsf.local_reference]},
        "input": [_message()],
    }
    if status is not None:
        task["status"] = status
    return task


def ping_draft(dsf: DsfIntegration) -> dict[str, Any]:
    task = ping_task(dsf)
    task["identifier"] = [{"system": TASK_IDENTIFIER_SYSTEM, "value": "test"}]
    return task


def pong_task(
    dsf: DsfIntegration, canonical: str = "http://dsf.dev/bpe/Process/pong|0.3"
) -> dict[str, Any]:
    """The Java tests' hand-built external Task (``task-ping``, pingMessage)."""
    return {
        "resourceType": "Task",
        "meta": {"profile": ["http://dsf.dev/fhir/StructureDefinition/task-ping"]},
        "instantiatesCanonical": canonical,
        "status": "draft",
        "intent": "order",
        "authoredOn": _now(),
        "requester": _org(EXTERNAL),
        "restriction": {"recipient": [dsf.local_reference]},
        "input": [_message("pingMessage")],
    }


def _steps(*steps: tuple[str, Any]) -> list[tuple[str, Any]]:
    return list(steps)


def _with(build: Build, **fields: Any) -> Build:
    """``build`` then set (value) or remove (None) top-level fields; callables get ``dsf``."""

    def changed(dsf: DsfIntegration) -> dict[str, Any]:
        task = build(dsf)
        for name, value in fields.items():
            resolved = value(dsf) if callable(value) else copy.deepcopy(value)
            if resolved is None:
                task.pop(name, None)
            else:
                task[name] = resolved
        return task

    return changed


def _test_task(requester: str, recipient: str) -> Build:
    return lambda _dsf: dsf_test_task(requester, recipient)


def _practitioner(email: str) -> Build:
    """DSF 2.1's ``readTestTask(null, <mail>, "Test_Organization")``; 1.9's practitioner Tasks
    name its organization (``readTestTask("Test_Organization", "Test_Organization")``)."""

    def build(dsf: DsfIntegration) -> dict[str, Any]:
        if dsf.release.major < 2:
            return dsf_test_task(LOCAL, LOCAL)
        return practitioner_task(email)

    return build


@dataclass(frozen=True)
class CreateCase:
    """One create of a Java test: DSF's verdict for the caller's Task."""

    methods: dict[str, str]  # DSF version -> Java method name
    caller: str
    build: Build
    allowed: bool
    definition: int | None = None
    step: str = ""
    change_definition: Callable[[dict[str, Any]], None] | None = None
    versions: tuple[str, ...] = field(default=())


def _both(name: str) -> dict[str, str]:
    return {V2: name, V1: name}


_STATUSES = [
    None,
    "received",
    "accepted",
    "rejected",
    "ready",
    "cancelled",
    "in-progress",
    "on-hold",
    "failed",
    "completed",
    "entered-in-error",
]


def _role_ttp(definition: dict[str, Any]) -> None:
    for part in definition["extension"][0]["extension"]:
        if part["url"] == "recipient":
            part["valueCoding"]["extension"][0]["extension"][1]["valueCoding"]["code"] = "TTP"


def _profile_suffix(suffix: str) -> Build:
    def build(_dsf: DsfIntegration) -> dict[str, Any]:
        task = dsf_test_task(LOCAL, LOCAL)
        task["meta"]["profile"][0] += suffix
        return task

    return build


_INPUTS_INVALID: list[tuple[str, Callable[[str], list[dict[str, Any]] | None]]] = [
    ("input-empty", lambda _m: None),
    (
        "input-other-system",
        lambda _m: [
            {"type": {"coding": [{"system": "system", "code": "code"}]}, "valueString": "value"}
        ],
    ),
    ("two-message-names", lambda m: [_message(m), _message(m)]),
    ("message-name-without-value", lambda _m: [_message(None)]),
    ("message-name-code-empty", lambda m: [_message(m, code="")]),
    ("message-name-empty", lambda _m: [_message("")]),
    ("message-name-coding", lambda _m: [_message({"system": "system", "code": "code"})]),
]
_OUTPUT = [{"type": {"coding": [{"system": "system", "code": "code"}]}, "valueString": "value"}]


def _recipient_steps(base: Build, local_first: bool) -> list[tuple[str, Build]]:
    steps: list[tuple[str, Build]] = [
        ("restriction-missing", _with(base, restriction=None)),
        ("restriction-extension-only", _with(base, restriction={"extension": [{"url": "test"}]})),
        (
            "recipient-unknown-literal",
            _with(base, restriction=lambda _d: {"recipient": [_unknown_local_literal()]}),
        ),
        ("recipient-external", _with(base, restriction={"recipient": [_org(EXTERNAL)]})),
        (
            "recipient-remote-literal",
            _with(base, restriction=lambda _d: {"recipient": [_remote_literal()]}),
        ),
        (
            "two-recipients",
            _with(base, restriction=lambda _d: {"recipient": [_org(EXTERNAL), _remote_literal()]}),
        ),
    ]
    if local_first:
        steps.append(
            (
                "local-and-unknown-recipient",
                _with(
                    base,
                    restriction=lambda d: {
                        "recipient": [d.local_reference, _unknown_local_literal()]
                    },
                ),
            )
        )
    return steps


CREATE_CASES: list[CreateCase] = [
    # -- status on create -----------------------------------------------------------------------
    *[
        CreateCase(
            _both("testCreateForbiddenLocalUserIllegalStatus"),
            LOCAL,
            _with(ping_task, status=status),
            False,
            step=str(status or "null"),
        )
        for status in _STATUSES
    ],
    *[
        CreateCase(
            _both("testCreateForbiddenExternalUserIllegalStatus"),
            EXTERNAL,
            _with(
                lambda d: pong_task(d, "http://dsf.dev/bpe/Process/pong/0.3.0"),
                status=status,
            ),
            False,
            step=str(status or "null"),
        )
        for status in _STATUSES
    ],
    CreateCase(
        {V1: "testCreateTaskStartPingProcessNotAllowedForRemoteUser"},
        EXTERNAL,
        _with(ping_task, status="requested", requester=_org(EXTERNAL)),
        False,
    ),
    # -- requester ------------------------------------------------------------------------------
    *[
        CreateCase(
            {
                V2: "testCreateDarftTaskForbiddenLocalUserNotPartOfRequesterOrganization",
                V1: "testCreateForbiddenLocalUserNotPartOfRequesterOrganization",
            },
            LOCAL,
            _with(ping_draft if version == V2 else ping_task, requester=requester),
            False,
            step=step,
            versions=(version,),
        )
        for version in (V2, V1)
        for step, requester in _steps(
            ("requester-missing", None),
            ("requester-empty", {}),
            ("requester-external", _org(EXTERNAL)),
            ("requester-remote-literal", lambda _d: _remote_literal()),
        )
    ],
    *[
        CreateCase(
            {V2: "testCreateDarftTaskForbiddenExternalUserOrNonAdminPractitioner"},
            caller,
            lambda _d: {"resourceType": "Task", "status": "draft"},
            False,
            step=step,
        )
        for step, caller in [
            ("external", EXTERNAL),
            ("minimal", MINIMAL),
            ("practitioner", PRACTITIONER),
        ]
    ],
    *[
        CreateCase(
            {V2: "testCreateTaskForbiddenExternalUserNotPartOfRequesterOrganization"},
            EXTERNAL,
            _with(_test_task(LOCAL, LOCAL), requester=requester),
            False,
            definition=2,
            step=step,
        )
        for step, requester in _steps(
            ("requester-local", _org(LOCAL)),
            ("requester-missing", None),
            ("requester-empty", {}),
            ("requester-remote-literal", lambda _d: _remote_literal()),
        )
    ],
    *[
        CreateCase(
            {V1: "testCreateForbiddenExternalUserNotPartOfRequesterOrganization"},
            EXTERNAL,
            _with(pong_task, requester=requester),
            False,
            step=step,
        )
        for step, requester in _steps(
            ("requester-missing", None),
            ("requester-empty", {}),
            ("requester-local-literal", lambda d: d.local_reference),
            ("requester-remote-literal", lambda _d: _remote_literal()),
        )
    ],
    # -- recipient ------------------------------------------------------------------------------
    *[
        CreateCase(
            {
                V2: "testCreateDraftTaskForbiddenLocalUserRestrictionRecipientNotValidByLocalUser",
                V1: "testCreateForbiddenLocalUserRestrictionRecipientNotValidByLocalUser",
            },
            LOCAL,
            build,
            False,
            step=step,
            versions=(version,),
        )
        for version in (V2, V1)
        for step, build in _recipient_steps(ping_draft if version == V2 else ping_task, True)
    ],
    *[
        CreateCase(
            {V2: "testCreateForbiddenExternalUserRestrictionRecipientNotValid"},
            EXTERNAL,
            build,
            False,
            definition=2,
            step=step,
        )
        for step, build in _recipient_steps(_test_task(EXTERNAL, EXTERNAL), False)
    ],
    *[
        CreateCase(
            {V1: "testCreateForbiddenLocalUserRestrictionRecipientNotValidByExternalUser"},
            EXTERNAL,
            build,
            False,
            step=step,
        )
        for step, build in _recipient_steps(pong_task, True)
    ],
    # -- instantiatesCanonical ------------------------------------------------------------------
    *[
        CreateCase(
            {
                V2: "testCreateForbiddenLocalUserInstantiatesUriNotValid",
                V1: "testCreateForbiddenInstantiatesUriNotValidByLocalUser",
            },
            LOCAL,
            _with(
                _test_task(LOCAL, LOCAL) if version == V2 else ping_task,
                instantiatesCanonical=canonical,
            ),
            False,
            definition=1 if version == V2 else None,
            step=step,
            versions=(version,),
        )
        for version in (V2, V1)
        for step, canonical in [("missing", None), ("invalid", "not-a-valid-pattern")]
    ],
    *[
        CreateCase(
            {
                V2: "testCreateForbiddenExternalUserInstantiatesUriNotValid",
                V1: "testCreateForbiddenInstantiatesUriNotValidByExternalUser",
            },
            EXTERNAL,
            _with(
                _test_task(EXTERNAL, LOCAL) if version == V2 else pong_task,
                instantiatesCanonical=canonical,
            ),
            False,
            definition=2 if version == V2 else None,
            step=step,
            versions=(version,),
        )
        for version in (V2, V1)
        for step, canonical in [("missing", None), ("invalid", "not-a-valid-pattern")]
    ],
    # -- input and output -----------------------------------------------------------------------
    *[
        CreateCase(
            _both("testCreateForbiddenInputNotValidByLocalUser"),
            LOCAL,
            _with(ping_draft, input=lambda _d, i=inputs: i("startPingProcessMessage")),
            False,
            step=step,
        )
        for step, inputs in _INPUTS_INVALID
    ],
    *[
        CreateCase(
            {
                V2: "testCreateForbiddenExternalUserInputNotValid",
                V1: "testCreateForbiddenInputNotValidByExternalUser",
            },
            EXTERNAL,
            _with(
                _test_task(EXTERNAL, LOCAL) if version == V2 else pong_task,
                input=lambda _d, i=inputs: i("pingMessage"),
            ),
            False,
            definition=2 if version == V2 else None,
            step=step,
            versions=(version,),
        )
        for version in (V2, V1)
        for step, inputs in _INPUTS_INVALID
    ],
    CreateCase(
        _both("testCreateForbiddenOutputNotValidByLocalUser"),
        LOCAL,
        _with(ping_draft, output=_OUTPUT),
        False,
    ),
    *[
        CreateCase(
            {
                V2: "testCreateForbiddenExternalUserOutputNotValid",
                V1: "testCreateForbiddenOutputNotValidByExternalUser",
            },
            EXTERNAL,
            _with(_test_task(EXTERNAL, LOCAL) if version == V2 else pong_task, output=_OUTPUT),
            False,
            definition=2 if version == V2 else None,
            versions=(version,),
        )
        for version in (V2, V1)
    ],
    # -- process authorization of the ActivityDefinitions ---------------------------------------
    CreateCase(_both("testCreateTaskAllowedLocalUser"), LOCAL, _test_task(LOCAL, LOCAL), True, 1),
    CreateCase(
        _both("testCreateTaskNotAllowedRemoteUser"),
        EXTERNAL,
        _test_task(EXTERNAL, LOCAL),
        False,
        1,
    ),
    CreateCase(
        _both("testCreateTaskAllowedLocalUser11"), LOCAL, _test_task(LOCAL, LOCAL), True, 11
    ),
    CreateCase(
        _both("testCreateTaskAllowedLocalUser12"), LOCAL, _test_task(LOCAL, LOCAL), True, 12
    ),
    CreateCase(
        _both("testCreateTaskAllowedLocalUser13"), LOCAL, _test_task(LOCAL, LOCAL), True, 13
    ),
    CreateCase(
        _both("testCreateTaskNotAllowedLocalUser"), LOCAL, _test_task(LOCAL, LOCAL), False, 2
    ),
    CreateCase(
        _both("testCreateTaskAllowedRemoteUser"), EXTERNAL, _test_task(EXTERNAL, LOCAL), True, 2
    ),
    CreateCase(
        _both("testCreateTaskNotAllowedLocalUser2"), LOCAL, _test_task(LOCAL, LOCAL), False, 3
    ),
    CreateCase(
        _both("testCreateTaskAllowedRemoteUser2"), EXTERNAL, _test_task(EXTERNAL, LOCAL), True, 3
    ),
    CreateCase(
        _both("testCreateTaskNotAllowedRemoteUser2"),
        EXTERNAL,
        _test_task(EXTERNAL, LOCAL),
        False,
        3,
        change_definition=_role_ttp,
    ),
    CreateCase(
        _both("testCreateTaskAllowedRemoteUser3"), EXTERNAL, _test_task(EXTERNAL, LOCAL), True, 4
    ),
    CreateCase(
        _both("testCreateTaskAllowedLocalUserVersionSpecificProfile"),
        LOCAL,
        _profile_suffix("|1.0"),
        True,
        1,
    ),
    CreateCase(
        _both("testCreateTaskAllowedLocalUserVersionSpecificProfileBadVersion"),
        LOCAL,
        _profile_suffix("|0.x"),
        False,
        1,
    ),
    CreateCase(
        {
            V2: "testCreateTaskNotAllowedLocalOrganizationNotPractitionerWithCosUserRole",
            V1: "testCreateTaskNotAllowedLocalOrganizationWithoutRole2",
        },
        LOCAL,
        _test_task(LOCAL, LOCAL),
        False,
        8,
    ),
    CreateCase(
        _both("testCreateTaskNotAllowedLocalOrganizationWithoutRole3"),
        LOCAL,
        _test_task(LOCAL, LOCAL),
        False,
        10,
    ),
    CreateCase(
        _both("testCreateForbiddenDraftTaskExternalOrganization"),
        EXTERNAL,
        _with(_test_task(EXTERNAL, LOCAL), status="draft"),
        False,
    ),
    # -- practitioner identities (the role config of AbstractIntegrationTest) -------------------
    # 2.1: the Task names the practitioner as requester; 1.9: its organization.
    CreateCase({V2: "testCreateTaskAllowedMinimalUser"}, MINIMAL, _practitioner(MINIMAL), True, 5),
    *[
        CreateCase(
            {V2: name, V1: name_1},
            PRACTITIONER,
            _practitioner(PRACTITIONER),
            allowed,
            definition,
            versions=(version,),
        )
        for version in (V2, V1)
        for name, name_1, definition, allowed in [
            (
                "testCreateTaskAllowedLocalUserWithRole",
                "testCreateTaskAllowedLocalUserWithRole",
                5,
                True,
            ),
            (
                "testCreateTaskNotAllowedLocalUserWrongRole",
                "testCreateTaskNotAllowedLocalUserWithoutRole",
                6,
                False,
            ),
            (
                "testCreateTaskAllowedLocalUserWithRole2",
                "testCreateTaskAllowedLocalUserWithRole2",
                7,
                True,
            ),
            (
                "testCreateTaskNotAllowedLocalUserWithoutCosUserRole",
                "testCreateTaskNotAllowedLocalUserWithoutRole2",
                8,
                False,
            ),
            (
                "testCreateTaskAllowedLocalUserWithDicUserRoleAndLocalOrganizationIsDic",
                "testCreateTaskAllowedLocalUserWithRole3",
                9,
                True,
            ),
            (
                "testCreateTaskAllowedPractitioner13",
                "testCreateTaskAllowedPractitioner13",
                13,
                True,
            ),
        ]
    ],
    CreateCase(
        {V2: "testCreateTaskAllowedLocalUserWithAdminRole"}, ADMIN, _practitioner(ADMIN), True, 7
    ),
    # The Task names the organization: 2.1 wants the practitioner, 1.9 no such authorization.
    *[
        CreateCase(_both(name), PRACTITIONER, _test_task(LOCAL, LOCAL), False, definition)
        for name, definition in [
            ("testCreateTaskNotAllowedLocalUserWithoutRole3", 10),
            ("testCreateTaskNotAllowedPractitioner1", 1),
            ("testCreateTaskNotAllowedPractitioner11", 11),
            ("testCreateTaskNotAllowedPractitioner12", 12),
        ]
    ],
    CreateCase(
        _both("testCreateForbiddenDraftTaskPractitionerIdentity"),
        PRACTITIONER,
        _with(_test_task(LOCAL, LOCAL), status="draft"),
        False,
    ),
]


def _create_params() -> list[Any]:
    params: list[Any] = []
    for case in CREATE_CASES:
        for version, method in case.methods.items():
            if case.versions and version not in case.versions:
                continue
            step = f".{case.step}" if case.step else ""
            params.append(pytest.param(_BY_NAME[version], case, id=f"{version}-{method}{step}"))
    return params


@pytest.mark.parametrize(("release", "case"), _create_params())
def test_create(release: DsfRelease, case: CreateCase) -> None:
    dsf = DsfIntegration.start(release)
    if case.definition is not None:
        definition = activity_definition(case.definition)
        if case.change_definition is not None:
            case.change_definition(definition)
        dsf.plugin(definition)
    response = dsf.create(case.caller, case.build(dsf))
    if case.allowed:
        assert response.status == 201, response.resource
        assert response.resource is not None and response.resource["id"]
    else:
        assert_forbidden(response, "create")
        assert dsf.service.store.all("Task") == []


# -- single scenarios ---------------------------------------------------------------------------


def _draft(dsf: DsfIntegration, definition: int = 14) -> dict[str, Any]:
    dsf.plugin(activity_definition(definition))
    task = dsf_test_task(LOCAL, LOCAL)
    task["identifier"] = [{"system": TASK_IDENTIFIER_SYSTEM, "value": "test"}]
    task["status"] = "draft"
    return dsf.created(LOCAL, task)


@pytest.mark.parametrize("release", RELEASES)
def test_create_allow_via_draft_not_allowed_as_requested_local(release: DsfRelease) -> None:
    """testCreateAllowViaDraftNotAllowedAsRequestedLocal"""
    dsf = DsfIntegration.start(release)
    _draft(dsf)
    assert_forbidden(dsf.create(LOCAL, dsf_test_task(LOCAL, LOCAL)), "create")
    assert len(dsf.service.store.all("Task")) == 1


@pytest.mark.parametrize("release", RELEASES)
def test_update_requested_to_in_progress_forbidden_for_external(release: DsfRelease) -> None:
    """testUpdateRequestedToInProgressForbiddenForExternal"""
    dsf = DsfIntegration.start(release)
    created = dsf.dao_create(dsf_test_task(LOCAL, LOCAL))
    assert_forbidden(dsf.update(EXTERNAL, {**created, "status": "in-progress"}), "update")
    assert dsf.service.store.read("Task", created["id"]) == created


@pytest.mark.parametrize("release", RELEASES)
def test_search_task_by_requester_id(release: DsfRelease) -> None:
    """testSearchTaskByRequesterId: ``requester=<id>`` finds a Task by literal reference."""
    dsf = DsfIntegration.start(release)
    organization = dsf.dao_create({"resourceType": "Organization", "name": "Test Organization"})
    task = dsf.dao_create(
        {
            "resourceType": "Task",
            "restriction": {"recipient": [dsf.local_reference]},
            "requester": {"reference": f"Organization/{organization['id']}"},
        }
    )
    response = dsf.service.handle(
        dsf.identity(LOCAL),
        "GET",
        "Task",
        [("requester", organization["id"])],
        headers={"prefer": "handling=strict"},
        body=None,
    )
    assert response.status == 200
    assert response.resource is not None
    assert response.resource["total"] == 1
    assert response.resource["entry"][0]["resource"]["id"] == task["id"]


@pytest.mark.parametrize("release", RELEASES)
def test_create_via_bundle_not_valid(release: DsfRelease) -> None:
    """testCreateViaBundleNotValid: a transaction creating an empty Task answers 403."""
    dsf = DsfIntegration.start(release)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Task",
                    "meta": {"profile": ["http://dsf.dev/fhir/StructureDefinition/test-task"]},
                },
                "request": {"method": "POST", "url": "Task"},
            }
        ],
    }
    response = dsf.request(LOCAL, "POST", "", bundle)
    assert response.status == 403
    assert dsf.service.store.all("Task") == []


def _deleted_draft(dsf: DsfIntegration, *, delete: bool) -> str:
    task = dsf_test_task(EXTERNAL, LOCAL)
    task["status"] = "draft"
    task_id = str(dsf.dao_create(task)["id"])
    if delete:
        dsf.service.store.delete("Task", task_id)
    return task_id


@pytest.mark.parametrize("release", RELEASES)
def test_delete_permanently_by_local_deletion_user(release: DsfRelease) -> None:
    """testDeletePermanentlyByLocalDeletionUser"""
    dsf = DsfIntegration.start(release)
    task_id = _deleted_draft(dsf, delete=True)
    response = dsf.request(LOCAL, "POST", f"Task/{task_id}/$permanent-delete")
    assert response.status == 200, response.resource
    assert dsf.service.store.read_version("Task", task_id, 1) is None
    assert not dsf.service.store.is_deleted("Task", task_id)


@pytest.mark.parametrize("release", RELEASES)
def test_delete_permanently_by_local_deletion_user_not_marked_as_deleted(
    release: DsfRelease,
) -> None:
    """testDeletePermanentlyByLocalDeletionUserNotMarkedAsDeleted"""
    dsf = DsfIntegration.start(release)
    task_id = _deleted_draft(dsf, delete=False)
    response = dsf.request(LOCAL, "POST", f"Task/{task_id}/$permanent-delete")
    assert response.status == 400
    # ExceptionHandler.notMarkedDeleted's text, both versions.
    assert f"Task with id {task_id} is not marked deleted" in str(response.resource)
    assert dsf.service.store.read("Task", task_id) is not None


@pytest.mark.parametrize("release", RELEASES)
def test_delete_permanently_by_external_user(release: DsfRelease) -> None:
    """testDeletePermanentlyByExternalUser (the Task is not even marked deleted)."""
    dsf = DsfIntegration.start(release)
    task = dsf_test_task(EXTERNAL, LOCAL)
    task_id = dsf.dao_create(task)["id"]
    response = dsf.request(EXTERNAL, "POST", f"Task/{task_id}/$permanent-delete")
    assert_forbidden(response, "delete")
    assert dsf.service.store.read("Task", task_id) is not None


@pytest.mark.parametrize("release", RELEASES)
def test_history_literal_reference_clean(release: DsfRelease) -> None:
    """testHistoryLiteralReferenceClean: logical references come back as sent, in the created
    Task and in its history (a Bundle of type history with one entry)."""
    dsf = DsfIntegration.start(release)
    dsf.plugin(activity_definition(1))
    created = dsf.created(LOCAL, dsf_test_task(LOCAL, LOCAL))
    for task in (created,):
        assert "reference" not in task["requester"]
        assert task["requester"]["identifier"]["value"] == LOCAL
        assert "reference" not in task["restriction"]["recipient"][0]
    response = dsf.request(LOCAL, "GET", f"Task/{created['id']}/_history")
    assert response.status == 200, response.resource
    history = response.resource
    assert history is not None
    assert (history["type"], history["total"], len(history["entry"])) == ("history", 1, 1)
    from_history = history["entry"][0]["resource"]
    assert from_history["resourceType"] == "Task"
    assert "reference" not in from_history["requester"]
    assert from_history["requester"]["type"] == "Organization"
    assert "reference" not in from_history["restriction"]["recipient"][0]


@pytest.mark.parametrize("release", RELEASES)
def test_date_time_query_parameter(release: DsfRelease) -> None:
    """testDateTimeQueryParameter: two ``_lastUpdated`` bounds in either order, no match."""
    dsf = DsfIntegration.start(release)
    for bounds in (
        ["gt2021-12-02T10:00:00", "lt2021-12-02T12:00:00"],
        ["lt2021-12-02T12:00:00", "gt2021-12-02T10:00:00"],
    ):
        result = dsf.search(LOCAL, "Task", [("_lastUpdated", b) for b in bounds])
        assert (result["total"], result["entry"]) == (0, [])


@pytest.mark.parametrize("release", RELEASES)
def test_search_by_profile(release: DsfRelease) -> None:
    """testSearchByProfile: ``_profile`` exact with and without version, ``_profile:below``."""
    dsf = DsfIntegration.start(release)
    profile = "http://foo.bar/fhir/StructureDefinition/baz"
    for value in (profile, f"{profile}|0.1.0"):
        dsf.dao_create(
            {
                "resourceType": "Task",
                "meta": {"profile": [value]},
                "requester": dsf.local_reference,
                "restriction": {"recipient": [dsf.local_reference]},
            }
        )
    expected = [
        ("_profile", profile, 1),
        ("_profile", f"{profile}|0.1.0", 1),
        ("_profile", "http://foo.bar/fhir/StructureDefinition/test", 0),
        ("_profile", f"{profile}|0.2.0", 0),
        ("_profile:below", "http://foo.bar/fhir/StructureDefinition", 2),
        ("_profile:below", "http://foo.bar/fhir/StructureDefinition|0.1.0", 0),
    ]
    for name, value, total in expected:
        result = dsf.search(LOCAL, "Task", [(name, value)])
        assert result["total"] == total, (name, value)
        assert len(result["entry"]) == total
    versioned = dsf.search(LOCAL, "Task", [("_profile", f"{profile}|0.1.0")])
    assert versioned["entry"][0]["resource"]["meta"]["profile"] == [f"{profile}|0.1.0"]


# -- updates of Tasks with references to Binaries -----------------------------------------------


def _plugin_resources(dsf: DsfIntegration, definition: str, profile: str) -> None:
    dsf.created(LOCAL, fixture(definition, ActivityDefinition))
    dsf.created(LOCAL, fixture("test-codesystem-1.7.xml", CodeSystem))
    dsf.created(LOCAL, fixture("test-valueset-1.7.xml", ValueSet))
    structure = fixture(profile, StructureDefinition)
    # DSF 1.9.0's copies of the test profiles differ only in this base profile.
    structure["baseDefinition"] = dsf.release.task_base_profile
    dsf.created(LOCAL, structure)


def _binary_task(dsf: DsfIntegration, status: str, plugin_resources: bool) -> dict[str, Any]:
    """``createTaskBinary``: dsf-test-task-1.7 (External requester, input referencing a Binary on
    another server) stored with ``status`` by the DAO."""
    if plugin_resources:
        _plugin_resources(
            dsf,
            "dsf-test-activity-definition2-1.7.xml",
            "dsf-test-task-profile-binary-ref-1.7.xml",
        )
    task = fixture("dsf-test-task-1.7.xml", Task)
    task["authoredOn"] = _now()
    task["status"] = status
    return dsf.dao_create(task)


# DSF fetches an external literal reference from the remote server when it checks a Task's
# references after requested -> in-progress, and answers 403 for this non-existing Binary; the
# sandbox does not fetch external references (known gap, listed in docs/sandbox.md).
_EXTERNAL_FETCH = pytest.mark.xfail(
    strict=True, reason="the sandbox does not resolve external literal references"
)
_BINARY_UPDATES: list[tuple[Any, ...]] = [
    ("testUpdateTaskFromInProgressToCompletedWithNonExistingInputReferenceToExternalBinary",
     "in-progress", "completed", True, True),
    ("testUpdateTaskFromRequestedToInProgressWithNonExistingInputReferenceToExternalBinary",
     "requested", "in-progress", True, False, _EXTERNAL_FETCH),
    ("testUpdateTaskFromRequestedToFailedWithNonExistingInputReferenceToExternalBinary",
     "requested", "failed", True, True),
    ("testUpdateTaskFromRequestedToFailedWithNonExistingInputReferenceToExternalBinary"
     "AndNonExistingPluginValidationResource",
     "requested", "failed", False, True),
]  # fmt: skip


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize(
    ("old", "new", "plugin_resources", "allowed"),
    [pytest.param(*case[1:5], id=case[0], marks=case[5:]) for case in _BINARY_UPDATES],
)
def test_update_task_with_external_binary(
    release: DsfRelease, old: str, new: str, plugin_resources: bool, allowed: bool
) -> None:
    dsf = DsfIntegration.start(release)
    created = _binary_task(dsf, old, plugin_resources)
    response = dsf.update(LOCAL, {**created, "status": new})
    if allowed:
        assert response.status == 200, response.resource
        assert response.resource is not None and response.resource["status"] == new
    else:
        assert_forbidden(response, "update")
        assert dsf.service.store.read("Task", created["id"]) == created


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize(
    ("old", "new", "plugin_resources", "allowed"),
    [
        pytest.param(*case[1:5], id=f"{case[0]}ViaBundle", marks=case[5:])
        for case in _BINARY_UPDATES
    ],
)
def test_update_task_with_external_binary_via_bundle(
    release: DsfRelease, old: str, new: str, plugin_resources: bool, allowed: bool
) -> None:
    dsf = DsfIntegration.start(release)
    created = _binary_task(dsf, old, plugin_resources)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"{dsf.service.base_url}/Task/{created['id']}",
                "resource": {**created, "status": new},
                "request": {"method": "PUT", "url": f"Task/{created['id']}"},
            }
        ],
    }
    response = dsf.request(LOCAL, "POST", "", bundle)
    if allowed:
        assert response.status == 200, response.resource
        assert response.resource is not None
        assert response.resource["type"] == "transaction-response"
        (entry,) = response.resource["entry"]
        assert entry["response"]["status"] == "200 OK"
        assert entry["resource"]["resourceType"] == "Task"
    else:
        assert response.status == 403, response.resource
        assert dsf.service.store.read("Task", created["id"]) == created


def _task_in_progress(dsf: DsfIntegration) -> dict[str, Any]:
    """``createTaskInProgress``: AD 1 and the plugin resources, the test Task stored in-progress
    with a business-key."""
    _plugin_resources(dsf, "dsf-test-activity-definition1-1.0.xml", "dsf-test-task-profile-1.0.xml")
    task = dsf_test_task(LOCAL, LOCAL)
    task["status"] = "in-progress"
    task["input"].append(_message(str(uuid.uuid4()), code="business-key"))
    return dsf.dao_create(task)


def _binary_output(reference: str) -> dict[str, Any]:
    return {
        "type": {
            "coding": [
                {
                    "system": "http://dsf.dev/fhir/CodeSystem/test",
                    "code": "binary-ref",
                    "version": "1.7",
                }
            ]
        },
        "valueReference": {"reference": reference},
    }


def test_update_in_progress_to_in_progress_with_non_existing_binary_not_allowed() -> None:
    """testUpdateTaskFromInProgressToInProgressWithNonExistingInputReferenceToBinaryNotAllowed
    (2.1; 1.9 forbids in-progress -> in-progress altogether)"""
    dsf = DsfIntegration.start(DSF_2)
    created = _task_in_progress(dsf)
    updated = {**created, "output": [_binary_output(f"Binary/{uuid.uuid4()}")]}
    assert_forbidden(dsf.update(LOCAL, updated), "update")
    assert dsf.service.store.read("Task", created["id"]) == created


def test_update_in_progress_to_in_progress_with_existing_binary_allowed() -> None:
    """testUpdateTaskFromInProgressToInProgressWithExistingInputReferencesToBinaryAllowed (2.1)"""
    dsf = DsfIntegration.start(DSF_2)
    binary = dsf.created(
        LOCAL,
        {
            "resourceType": "Binary",
            "meta": {
                "tag": [
                    {"system": "http://dsf.dev/fhir/CodeSystem/read-access-tag", "code": "LOCAL"}
                ]
            },
            "contentType": "text/plain",
            "data": "SGVsbG8=",
        },
    )
    created = _task_in_progress(dsf)
    with_output = {**created, "output": [_binary_output(f"Binary/{binary['id']}")]}
    first = dsf.update(LOCAL, with_output)
    assert first.status == 200, first.resource
    assert first.resource is not None
    without_output = {k: v for k, v in first.resource.items() if k != "output"}
    second = dsf.update(LOCAL, without_output)
    assert second.status == 200, second.resource
    assert second.resource is not None and second.resource["meta"]["versionId"] == "3"


def test_update_in_progress_to_in_progress_forbidden_in_1_9() -> None:
    """1.9's TaskAuthorizationRule has no in-progress -> in-progress (the counterpart of the
    2.1-only cases above)."""
    dsf = DsfIntegration.start(DSF_1)
    created = _task_in_progress(dsf)
    assert_forbidden(dsf.update(LOCAL, dict(created)), "update")


# -- read, search and update by organization (2.1 only) -----------------------------------------


def test_read_search_local_organization_draft_task() -> None:
    """testReadSearchLocalOrganizationDraftTask"""
    dsf = DsfIntegration.start(DSF_2)
    draft = _draft(dsf)
    read = dsf.request(LOCAL, "GET", f"Task/{draft['id']}")
    assert read.status == 200 and read.resource is not None
    assert read.resource["id"] == draft["id"]
    result = dsf.search(LOCAL, "Task")
    assert result["total"] == 1
    assert [e["resource"]["id"] for e in result["entry"]] == [draft["id"]]


def test_read_search_external_organization_draft_task() -> None:
    """testReadSearchExternalOrganizationDraftTask"""
    dsf = DsfIntegration.start(DSF_2)
    draft = _draft(dsf)
    assert_forbidden(dsf.request(EXTERNAL, "GET", f"Task/{draft['id']}"), "read")
    result = dsf.search(EXTERNAL, "Task")
    assert (result["total"], result["entry"]) == (0, [])


@pytest.mark.parametrize(
    ("requester", "definition", "reader", "readable"),
    [
        pytest.param(LOCAL, 1, LOCAL, True, id="testReadSearchLocalOrganizationUserIsRequester"),
        pytest.param(
            EXTERNAL, 2, EXTERNAL, True, id="testReadSearchExternalOrganizationUserIsRequester"
        ),
        pytest.param(
            EXTERNAL, 2, LOCAL, True, id="testReadSearchLocalOrganizationUserIsNotRequester"
        ),
        pytest.param(
            LOCAL, 1, EXTERNAL, False, id="testReadSearchExternalOrganizationUserIsNotRequester"
        ),
    ],
)
def test_read_search_by_requester(
    requester: str, definition: int, reader: str, readable: bool
) -> None:
    dsf = DsfIntegration.start(DSF_2)
    dsf.plugin(activity_definition(definition))
    created = dsf.created(requester, dsf_test_task(requester, LOCAL))
    read = dsf.request(reader, "GET", f"Task/{created['id']}")
    result = dsf.search(reader, "Task")
    if readable:
        assert read.status == 200 and read.resource is not None
        assert read.resource["id"] == created["id"]
        assert result["total"] == 1
        assert result["entry"][0]["resource"]["id"] == created["id"]
    else:
        assert_forbidden(read, "read")
        assert (result["total"], result["entry"]) == (0, [])


def test_update_draft_task_local_organization() -> None:
    """testUpdateDraftTaskLocalOrganization: same draft again, version + 1."""
    dsf = DsfIntegration.start(DSF_2)
    draft = _draft(dsf)
    response = dsf.update(LOCAL, draft)
    assert response.status == 200, response.resource
    assert response.resource is not None
    assert response.resource["id"] == draft["id"]
    assert response.resource["meta"]["versionId"] == "2"


def test_update_draft_task_external_organization() -> None:
    """testUpdateDraftTaskExternalOrganization"""
    dsf = DsfIntegration.start(DSF_2)
    draft = _draft(dsf)
    assert_forbidden(dsf.update(EXTERNAL, draft), "update")
    assert dsf.service.store.read("Task", draft["id"]) == draft


# -- practitioner identities: read, search, update (2.1) ---------------------------------------


def test_create_task_allowed_minimal_user_not_its_plugin() -> None:
    """testCreateTaskAllowedMinimalUser, its first steps: the minimal user (CREATE only for Task)
    may create neither the ActivityDefinition nor the StructureDefinition."""
    dsf = DsfIntegration.start(DSF_2)
    assert_forbidden(dsf.create(MINIMAL, activity_definition(5)), "create")
    assert_forbidden(dsf.create(MINIMAL, test_task_profile(DSF_2)), "create")
    assert dsf.service.store.all("ActivityDefinition") == []


def _requested_by(dsf: DsfIntegration, requester: str, definition: int) -> dict[str, Any]:
    dsf.plugin(activity_definition(definition))
    if requester in (LOCAL, EXTERNAL):
        return dsf.created(requester, dsf_test_task(requester, LOCAL))
    return dsf.created(requester, practitioner_task(requester))


@pytest.mark.parametrize(
    ("setup", "reader", "readable"),
    [
        pytest.param("draft", ADMIN, True, id="testReadSearchPractitionerDsfAdminDraftTask"),
        pytest.param("draft", PRACTITIONER, True, id="testReadSearchPractitionerDicUserDraftTask"),
        pytest.param(
            "draft", MINIMAL, True, id="testReadSearchPractitionerDicUserMinimalDraftTask"
        ),
        pytest.param(
            (ADMIN, 1), ADMIN, True, id="testReadSearchPractitionerDsfAdminUserIsRequester"
        ),
        pytest.param(
            (PRACTITIONER, 5),
            PRACTITIONER,
            True,
            id="testReadSearchPractitionerDicUserUserIsRequester",
        ),
        pytest.param(
            (MINIMAL, 5),
            MINIMAL,
            True,
            id="testReadSearchPractitionerDicUserMinimalUserIsRequester",
        ),
        pytest.param(
            (EXTERNAL, 2), ADMIN, True, id="testReadSearchPractitionerDsfAdminUserIsNotRequester"
        ),
        pytest.param(
            (LOCAL, 1),
            PRACTITIONER,
            False,
            id="testReadSearchPractitionerDicUserUserIsNotRequester",
        ),
        pytest.param(
            (LOCAL, 1),
            MINIMAL,
            False,
            id="testReadSearchPractitionerDicUserMinimalUserIsNotRequester",
        ),
    ],
)
def test_read_search_practitioner(setup: Any, reader: str, readable: bool) -> None:
    dsf = DsfIntegration.start(DSF_2)
    created = _draft(dsf) if setup == "draft" else _requested_by(dsf, *setup)
    read = dsf.request(reader, "GET", f"Task/{created['id']}")
    result = dsf.search(reader, "Task")
    if readable:
        assert read.status == 200 and read.resource is not None
        assert read.resource["id"] == created["id"]
        assert result["total"] == 1
        assert [e["resource"]["id"] for e in result["entry"]] == [created["id"]]
    else:
        assert_forbidden(read, "read")
        assert (result["total"], result["entry"]) == (0, [])


@pytest.mark.parametrize(
    ("caller", "allowed"),
    [
        pytest.param(ADMIN, True, id="testUpdateDraftTaskPractitionerDsfAdmin"),
        pytest.param(PRACTITIONER, False, id="testUpdateDraftTaskPractitionerDicUser"),
        pytest.param(MINIMAL, False, id="testUpdateDraftTaskPractitionerDicUserMinimal"),
    ],
)
def test_update_draft_task_practitioner(caller: str, allowed: bool) -> None:
    dsf = DsfIntegration.start(DSF_2)
    draft = _draft(dsf)
    response = dsf.update(caller, draft)
    if allowed:
        assert response.status == 200, response.resource
        assert response.resource is not None
        assert response.resource["meta"]["versionId"] == "2"
    else:
        assert_forbidden(response, "update")
        assert dsf.service.store.read("Task", draft["id"]) == draft


def test_search_task_with_practitioner_user_by_requester() -> None:
    """testSerachTaskWithPractitionerUserByRequester"""
    dsf = DsfIntegration.start(DSF_2)
    created = _requested_by(dsf, PRACTITIONER, 5)
    result = dsf.search(
        PRACTITIONER, "Task", [("requester:identifier", f"{PRACTITIONER_SYSTEM}|{PRACTITIONER}")]
    )
    assert result["total"] == 1
    assert [e["resource"]["id"] for e in result["entry"]] == [created["id"]]
