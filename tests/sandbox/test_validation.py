"""The sandbox's profile validator against the DSF's own profiles (reference corpus): the
ping-pong plugin's Task profiles over DSF 1.9's ``task-base|1.0.0``, the tutorial's and the DSF
FHIR server's integration-test profiles over DSF 2.1's ``task|2.1.0``, and the
QuestionnaireResponse base profiles of both. Valid Tasks from the corpus pass; each kind of
mutation fails with the error a DSF FHIR server's validator would give (the sandbox answers 403).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.dsf.publication import read_resource
from dsf_bridge.plugins.placeholders import Placeholders
from dsf_bridge.sandbox.sites import allow_list_bundle, build_service, organization_entry
from dsf_bridge.sandbox.validation import ProfileValidator, base_profiles
from tests.dsf import test_profiles
from tests.reference import reference_dir

_VALUES = Placeholders("1.0", "2026-01-01", "Site_A", {})
PING_PONG = "dsf-process-ping-pong/src/main/resources/fhir"
TUTORIAL = "dsf-process-tutorial/main/tutorial-process/src/main/resources/fhir"
INTEGRATION = "dsf/dsf-fhir/dsf-fhir-server/src/test/resources/integration/task"
ORGANIZATION = "http://dsf.dev/sid/organization-identifier"
PRACTITIONER = "http://dsf.dev/sid/practitioner-identifier"
BPMN = "http://dsf.dev/fhir/CodeSystem/bpmn-message"
AUTHORED = "2026-01-01T00:00:00Z"

Mutation = Callable[[dict[str, Any]], object]


def ping_task() -> dict[str, Any]:
    """The ``ping`` Task the bridge sends (tests/dsf/test_profiles), a copy to mutate."""
    return copy.deepcopy(test_profiles.ping_task())


def pong_task() -> dict[str, Any]:
    return copy.deepcopy(test_profiles.pong_task())


def start_task() -> dict[str, Any]:
    return copy.deepcopy(test_profiles.start_task())


def _read(path: Path) -> dict[str, Any]:
    """A corpus file as the plugin loader reads it: placeholders replaced, then FHIR JSON."""
    return read_resource(path, _VALUES.replace_fhir_bytes(path.read_bytes(), source=str(path)))


def _definitions(folder: str) -> list[dict[str, Any]]:
    root = reference_dir() / folder
    return [
        _read(path)
        for kind in ("StructureDefinition", "ValueSet", "CodeSystem")
        for path in sorted((root / kind).glob("*.xml"))
    ]


@pytest.fixture(scope="module")
def dsf19() -> list[dict[str, Any]]:
    return base_profiles("1.9", reference_dir())


@pytest.fixture(scope="module")
def dsf21() -> list[dict[str, Any]]:
    return base_profiles("2.1", reference_dir())


@pytest.fixture(scope="module")
def ping_pong(dsf19: list[dict[str, Any]]) -> ProfileValidator:
    """DSF 1.9 with the ping-pong plugin's profiles, ValueSets and CodeSystems published."""
    return ProfileValidator([*dsf19, *_definitions(PING_PONG)])


@pytest.fixture(scope="module")
def tutorial(dsf21: list[dict[str, Any]]) -> ProfileValidator:
    """DSF 2.1 with the API v2 tutorial's Task profiles (its ValueSet is not published)."""
    return ProfileValidator([*dsf21, *_definitions(TUTORIAL)])


def _integration(dsf21: list[dict[str, Any]], *names: str) -> ProfileValidator:
    folder = reference_dir() / INTEGRATION
    return ProfileValidator([*dsf21, *(_read(folder / name) for name in names)])


def _has(errors: Iterable[str], *expected: str) -> bool:
    return any(all(part in error for part in expected) for error in errors)


def _reference(system: str, value: str, kind: str = "Organization") -> dict[str, Any]:
    return {"type": kind, "identifier": {"system": system, "value": value}}


def _input(system: str, code: str, **value: object) -> dict[str, Any]:
    return {"type": {"coding": [{"system": system, "code": code}]}, **value}


# -- valid resources --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "dsf-task-start-ping.xml",
        "dsf-task-start-ping-autostart.xml",
        "dsf-task-stop-ping-autostart.xml",
    ],
)
def test_the_plugins_draft_tasks_are_valid(ping_pong: ProfileValidator, name: str) -> None:
    task = _read(reference_dir() / PING_PONG / "Task" / name)
    assert task["meta"]["profile"][0].endswith("|1.0")
    assert ping_pong.validate(task) == []


@pytest.mark.parametrize("make", [ping_task, pong_task, start_task])
def test_the_tasks_the_bridge_sends_are_valid(
    ping_pong: ProfileValidator, make: Callable[[], dict[str, Any]]
) -> None:
    assert ping_pong.validate(make()) == []


def test_a_task_in_progress_with_its_business_key_is_valid(ping_pong: ProfileValidator) -> None:
    task = pong_task()
    task["status"] = "in-progress"
    assert ping_pong.validate(task) == []


def test_dsf_integration_test_tasks_are_valid(dsf21: list[dict[str, Any]]) -> None:
    """``dsf-test-task-1.0.xml`` and ``-1.7.xml`` as ``TaskIntegrationTest`` creates them (it
    sets ``authoredOn``), each with the profile that test publishes."""
    task = _read(reference_dir() / INTEGRATION / "dsf-test-task-1.0.xml")
    task["authoredOn"] = AUTHORED
    assert _integration(dsf21, "dsf-test-task-profile-1.0.xml").validate(task) == []

    binary = _read(reference_dir() / INTEGRATION / "dsf-test-task-1.7.xml")
    binary["authoredOn"] = AUTHORED
    validator = _integration(
        dsf21,
        "dsf-test-task-profile-binary-ref-1.7.xml",
        "test-valueset-1.7.xml",
        "test-codesystem-1.7.xml",
    )
    assert validator.validate(binary) == []


def hello_hrp_task() -> dict[str, Any]:
    """A Task of the DSF 2.x tutorial's ``task-hello-hrp`` profile, as its DIC process sends it."""
    return {
        "resourceType": "Task",
        "meta": {"profile": ["http://example.org/fhir/StructureDefinition/task-hello-hrp|1.0"]},
        "instantiatesCanonical": "http://example.org/bpe/Process/hrpProcess|1.0",
        "status": "requested",
        "intent": "order",
        "authoredOn": AUTHORED,
        "requester": _reference(ORGANIZATION, "dic.dsf.test"),
        "restriction": {"recipient": [_reference(ORGANIZATION, "hrp.dsf.test")]},
        "input": [
            _input(BPMN, "message-name", valueString="helloHrp"),
            _input(BPMN, "business-key", valueString="bk-1"),
            _input(
                "http://example.org/fhir/CodeSystem/tutorial",
                "tutorial-input",
                valueString="Tutorial input",
            ),
        ],
    }


def test_a_v2_tutorial_task_is_valid(tutorial: ProfileValidator) -> None:
    assert tutorial.validate(hello_hrp_task()) == []


def test_a_practitioner_may_request_in_dsf_2(tutorial: ProfileValidator) -> None:
    task = hello_hrp_task()
    task["requester"] = _reference(PRACTITIONER, "dic-user@dic.dsf.test", "Practitioner")
    assert tutorial.validate(task) == []


# -- Task mutations against ping-pong over task-base 1.0.0 ------------------------------------


def _inputs_without(task: dict[str, Any], code: str) -> None:
    task["input"] = [i for i in task["input"] if i["type"]["coding"][0]["code"] != code]


def _second_message_name(task: dict[str, Any]) -> None:
    task["input"].append(copy.deepcopy(task["input"][0]))


def _business_key_integer(task: dict[str, Any]) -> None:
    business_key = next(
        i for i in task["input"] if i["type"]["coding"][0]["code"] == "business-key"
    )
    del business_key["valueString"]
    business_key["valueInteger"] = 7


PING_MUTATIONS: list[tuple[str, Mutation, tuple[str, ...]]] = [
    (
        "missing message-name",
        lambda t: _inputs_without(t, "message-name"),
        ("Task.input:message-name: min 1, found 0",),
    ),
    ("two message-names", _second_message_name, ("Task.input:message-name: max 1, found 2",)),
    (
        "wrong message-name",
        lambda t: t["input"][0].update(valueString="pong"),
        ("Task.input:message-name.value[x]: 'pong' is not the fixed value 'ping'",),
    ),
    (
        "business-key not a string",
        _business_key_integer,
        ("Task.input:business-key.value[x]: type integer not allowed, expected string",),
    ),
    (
        "missing endpoint-identifier",
        lambda t: _inputs_without(t, "endpoint-identifier"),
        ("Task.input:endpoint-identifier: min 1, found 0",),
    ),
    ("missing requester", lambda t: t.pop("requester"), ("Task.requester: min 1, found 0",)),
    (
        "requester by literal reference",
        lambda t: t["requester"].update(reference="Organization/1"),
        ("Task.requester.reference: max 0, found 1",),
    ),
    (
        "wrong requester identifier system",
        lambda t: t["requester"]["identifier"].update(system="http://example.org/sid/other"),
        ("Task.requester.identifier.system", "is not the fixed value", ORGANIZATION),
    ),
    (
        "two recipients",
        lambda t: t["restriction"]["recipient"].append(_reference(ORGANIZATION, "Site_C")),
        ("Task.restriction.recipient: max 1, found 2",),
    ),
    (
        "wrong intent",
        lambda t: t.update(intent="plan"),
        ("Task.intent: 'plan' is not the fixed value 'order'",),
    ),
    (
        "other process",
        lambda t: t.update(instantiatesCanonical="http://dsf.dev/bpe/Process/ping|1.0"),
        ("Task.instantiatesCanonical", "is not the fixed value"),
    ),
    ("no authoredOn", lambda t: t.pop("authoredOn"), ("Task.authoredOn: min 1, found 0",)),
    (
        "endpoint reference of the wrong type",
        lambda t: t["input"][-1]["valueReference"].update(type="Organization"),
        ("Task.input:endpoint-identifier.value[x].type", "is not the fixed value 'Endpoint'"),
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [pytest.param(m, e, id=name) for name, m, e in PING_MUTATIONS],
)
def test_broken_ping_tasks_are_refused(
    ping_pong: ProfileValidator, mutate: Mutation, expected: tuple[str, ...]
) -> None:
    task = ping_task()
    assert ping_pong.validate(task) == []
    mutate(task)
    errors = ping_pong.validate(task)
    assert _has(errors, *expected), errors


def test_a_start_task_must_not_carry_a_correlation_key(ping_pong: ProfileValidator) -> None:
    task = start_task()
    task["input"].append(_input(BPMN, "correlation-key", valueString="ck"))
    errors = ping_pong.validate(task)
    assert _has(errors, "Task.input:correlation-key: max 0, found 1"), errors


def test_an_extra_input_at_the_end_is_allowed_by_open_at_end(ping_pong: ProfileValidator) -> None:
    task = start_task()
    task["input"].append(_input("http://example.org/fhir/CodeSystem/other", "x", valueString="y"))
    assert ping_pong.validate(task) == []


def test_an_extra_input_before_sliced_ones_breaks_open_at_end(
    ping_pong: ProfileValidator,
) -> None:
    task = start_task()
    task["input"].insert(
        0, _input("http://example.org/fhir/CodeSystem/other", "x", valueString="y")
    )
    errors = ping_pong.validate(task)
    assert _has(errors, "Task.input: Task.input[0] matches no slice", "openAtEnd"), errors


def test_an_extra_input_is_refused_by_a_closed_slicing(dsf19: list[dict[str, Any]]) -> None:
    """A profile deriving from ``task-start-ping`` that closes the slicing of Task.input."""
    closed = {
        "resourceType": "StructureDefinition",
        "url": "http://example.org/fhir/StructureDefinition/task-start-ping-closed",
        "version": "1.0",
        "type": "Task",
        "baseDefinition": "http://dsf.dev/fhir/StructureDefinition/task-start-ping|1.0",
        "differential": {
            "element": [
                {
                    "id": "Task.input",
                    "path": "Task.input",
                    "slicing": {
                        "discriminator": [
                            {"type": "value", "path": "type.coding.system"},
                            {"type": "value", "path": "type.coding.code"},
                        ],
                        "rules": "closed",
                    },
                }
            ]
        },
    }
    validator = ProfileValidator([*dsf19, *_definitions(PING_PONG), closed])
    task = start_task()
    task["meta"]["profile"] = [f"{closed['url']}|1.0"]
    assert validator.validate(task) == []
    task["input"].append(_input("http://example.org/fhir/CodeSystem/other", "x", valueString="y"))
    errors = validator.validate(task)
    assert _has(errors, "Task.input: Task.input[2] matches no slice", "closed"), errors


def test_output_slices_and_their_extension_profile(ping_pong: ProfileValidator) -> None:
    task = start_task()
    status = task["output"][0]
    status["valueCoding"]["code"] = "pong-sent"
    errors = ping_pong.validate(task)
    assert _has(
        errors,
        "Task.output:ping-status.value[x].code",
        "not in the required ValueSet http://dsf.dev/fhir/ValueSet/ping-status|1.0",
    ), errors

    task = start_task()
    extension = task["output"][0]["extension"][0]
    extension["extension"] = [e for e in extension["extension"] if e["url"] != "correlation-key"]
    errors = ping_pong.validate(task)
    assert _has(
        errors,
        "Task.output:ping-status.extension:ping-status-extension > ",
        "Extension.extension:correlation-key: min 1, found 0",
    ), errors

    task = start_task()
    del task["output"][0]["extension"]
    errors = ping_pong.validate(task)
    assert _has(
        errors, "Task.output:ping-status.extension:ping-status-extension: min 1, found 0"
    ), errors


def test_unknown_value_sets_are_not_checked(dsf19: list[dict[str, Any]]) -> None:
    profiles = [d for d in _definitions(PING_PONG) if d["resourceType"] == "StructureDefinition"]
    validator = ProfileValidator([*dsf19, *profiles])
    task = start_task()
    task["output"][0]["valueCoding"]["code"] = "pong-sent"
    assert validator.validate(task) == []


def test_an_input_of_no_slice_counts_against_the_maximum(ping_pong: ProfileValidator) -> None:
    """A bpmn-message code the base profile has no slice for is allowed at the end (openAtEnd),
    but ``task-ping`` allows four inputs in all."""
    task = ping_task()
    task["input"].append(_input(BPMN, "no-such-code", valueString="x"))
    errors = ping_pong.validate(task)
    assert errors == ["Task.input: max 4, found 5"], errors


# -- invariants -------------------------------------------------------------------------------


def test_invariant_business_key_in_dsf_1(ping_pong: ProfileValidator) -> None:
    task = start_task()
    task["status"] = "in-progress"
    errors = ping_pong.validate(task)
    assert _has(
        errors,
        "Task: invariant business-key-if-status-inprogress-completed-failed failed",
        "Business key must be set",
    ), errors
    task["input"].append(_input(BPMN, "business-key", valueString="bk"))
    assert ping_pong.validate(task) == []


def test_invariant_timer_interval_of_the_plugin(ping_pong: ProfileValidator) -> None:
    task = _read(reference_dir() / PING_PONG / "Task" / "dsf-task-start-ping-autostart.xml")
    task["input"][-1]["valueString"] = "every day"
    errors = ping_pong.validate(task)
    assert _has(
        errors,
        "Task.input:timer-interval.value[x]: invariant timer-interval-regex failed",
        "(at Task.input[2].valueString)",
    ), errors


def _draft_without_identifier(task: dict[str, Any]) -> None:
    task["status"] = "draft"
    task.pop("identifier", None)


def _completed_without_business_key(task: dict[str, Any]) -> None:
    task["status"] = "completed"
    _inputs_without(task, "business-key")


TASK_INVARIANTS_2: list[tuple[str, Mutation]] = [
    ("business-key-if-status-inprogress-completed-failed", _completed_without_business_key),
    ("identifier-if-status-draft", _draft_without_identifier),
    (
        "requester-identifier-type-organization",
        lambda t: t["requester"].update(type="Practitioner"),
    ),
    (
        "requester-identifier-type-practitioner",
        lambda t: t.update(requester=_reference(PRACTITIONER, "user@dic.dsf.test")),
    ),
    (
        "requester-identifier-system",
        lambda t: t["requester"]["identifier"].update(system="http://example.org/sid/other"),
    ),
    (
        "restriction-recipient-identifier-type-organization",
        lambda t: t["restriction"]["recipient"][0].update(type="Practitioner"),
    ),
]


@pytest.mark.parametrize(
    ("key", "mutate"), TASK_INVARIANTS_2, ids=[k for k, _ in TASK_INVARIANTS_2]
)
def test_task_invariants_of_dsf_2(tutorial: ProfileValidator, key: str, mutate: Mutation) -> None:
    task = hello_hrp_task()
    mutate(task)
    errors = tutorial.validate(task)
    assert _has(errors, f"invariant {key} failed"), errors


def test_a_draft_with_its_task_identifier_is_valid(tutorial: ProfileValidator) -> None:
    task = hello_hrp_task()
    task["status"] = "draft"
    task["identifier"] = [
        {"system": "http://dsf.dev/sid/task-identifier", "value": "http://example.org/x"}
    ]
    assert tutorial.validate(task) == []


def test_an_output_identifier_the_profile_forbids(dsf21: list[dict[str, Any]]) -> None:
    """``Task.output:binary-ref.value[x].identifier`` has max 0 in the DSF integration test
    profile ``test-task|1.0``."""
    task = _read(reference_dir() / INTEGRATION / "dsf-test-task-1.0.xml")
    task["authoredOn"] = AUTHORED
    task["status"] = "completed"
    task["input"].append(_input(BPMN, "business-key", valueString="bk-1"))
    binary = _read(reference_dir() / INTEGRATION / "dsf-test-task-1.7.xml")["input"][-1]
    task["output"] = [binary]
    validator = _integration(
        dsf21, "dsf-test-task-profile-1.0.xml", "test-valueset-1.7.xml", "test-codesystem-1.7.xml"
    )
    assert validator.validate(task) == []
    binary["valueReference"]["identifier"] = {"system": "urn:ietf:rfc:3986", "value": "urn:x"}
    errors = validator.validate(task)
    assert _has(
        errors,
        "Task.output:binary-ref.value[x].identifier: max 0, found 1",
        "(in Task.output[0].valueReference)",
    ), errors
    binary["type"]["coding"][0]["version"] = "1.8"
    errors = validator.validate(task)
    assert _has(errors, "Task.output:binary-ref.type.coding.version", "fixed value '1.7'"), errors


# -- QuestionnaireResponse --------------------------------------------------------------------


def questionnaire_response(profile: str) -> dict[str, Any]:
    return {
        "resourceType": "QuestionnaireResponse",
        "meta": {"profile": [profile]},
        "questionnaire": "http://dsf.dev/fhir/Questionnaire/hello-user|1.0",
        "status": "in-progress",
        "item": [
            {
                "linkId": "business-key",
                "text": "The business-key of the process execution",
                "answer": [{"valueString": "bk-1"}],
            },
            {
                "linkId": "user-task-id",
                "text": "The user-task-id of the process execution",
                "answer": [{"valueString": "42"}],
            },
            {"linkId": "release", "text": "Release the data?", "answer": [{"valueBoolean": True}]},
        ],
    }


QR_1 = "http://dsf.dev/fhir/StructureDefinition/questionnaire-response|1.0.0"
QR_2 = "http://dsf.dev/fhir/StructureDefinition/questionnaire-response|2.0.0"


def _completed(qr: dict[str, Any], *, authored: bool = True, author: bool = True) -> None:
    qr["status"] = "completed"
    if authored:
        qr["authored"] = AUTHORED
    if author:
        qr["author"] = _reference(ORGANIZATION, "Site_A")


QR_CASES: list[tuple[str, str, Mutation, tuple[str, ...]]] = [
    ("1.9", QR_1, lambda q: _completed(q, authored=False), ("invariant authored-if-completed",)),
    ("1.9", QR_1, lambda q: _completed(q, author=False), ("invariant author-if-completed",)),
    (
        "2.1",
        QR_2,
        lambda q: _completed(q, authored=False),
        ("invariant authored-if-completed-or-amended",),
    ),
    (
        "2.1",
        QR_2,
        lambda q: _completed(q, author=False),
        ("invariant author-if-completed-or-amended",),
    ),
    (
        "2.1",
        QR_2,
        lambda q: q.update(author=_reference(ORGANIZATION, "Site_A", "Practitioner")),
        ("invariant author-identifier-type-organization",),
    ),
    (
        "2.1",
        QR_2,
        lambda q: q.update(author=_reference(PRACTITIONER, "user@site-a", "Organization")),
        ("invariant author-identifier-type-practitioner",),
    ),
    (
        "2.1",
        QR_2,
        lambda q: q.update(author=_reference("http://example.org/sid/x", "a", "Organization")),
        ("invariant author-identifier-system",),
    ),
    (
        "2.1",
        QR_2,
        lambda q: q["item"].pop(1),
        ("QuestionnaireResponse.item:user-task-id: min 1, found 0",),
    ),
    (
        "1.9",
        QR_1,
        lambda q: q["item"][1].update(text="Something else"),
        ("QuestionnaireResponse.item:user-task-id.text", "is not the fixed value"),
    ),
    (
        "2.1",
        QR_2,
        lambda q: q["item"][2].update(answer=[{"valueAttachment": {"title": "x"}}]),
        ("QuestionnaireResponse.item:@default.answer.value[x]: type Attachment not allowed",),
    ),
    (
        "2.1",
        QR_2,
        lambda q: q["item"][2].pop("text"),
        ("QuestionnaireResponse.item:@default.text: min 1, found 0",),
    ),
    (
        "2.1",
        QR_2,
        lambda q: q.pop("questionnaire"),
        ("QuestionnaireResponse.questionnaire: min 1, found 0",),
    ),
]


@pytest.mark.parametrize(
    ("version", "profile", "mutate", "expected"),
    [pytest.param(*case, id=f"{case[0]}-{case[3][0]}") for case in QR_CASES],
)
def test_questionnaire_responses(
    request: pytest.FixtureRequest,
    version: str,
    profile: str,
    mutate: Mutation,
    expected: tuple[str, ...],
) -> None:
    validator = ProfileValidator(request.getfixturevalue("dsf19" if version == "1.9" else "dsf21"))
    qr = questionnaire_response(profile)
    assert validator.validate(qr) == []
    completed = copy.deepcopy(qr)
    _completed(completed)
    assert validator.validate(completed) == []
    mutate(qr)
    errors = validator.validate(qr)
    assert _has(errors, *expected), errors


# -- what is not a profile question -----------------------------------------------------------


def test_an_unknown_profile_is_an_error(ping_pong: ProfileValidator) -> None:
    task = ping_task()
    task["meta"]["profile"] = ["http://dsf.dev/fhir/StructureDefinition/task-ping|9.9"]
    assert ping_pong.validate(task) == [
        "Task.meta.profile[0]: profile http://dsf.dev/fhir/StructureDefinition/task-ping|9.9 "
        "unknown, the resource cannot be checked against it"
    ]
    assert not ping_pong.knows("http://dsf.dev/fhir/StructureDefinition/task-ping|9.9")
    assert ping_pong.knows("http://dsf.dev/fhir/StructureDefinition/task-ping|1.0")


def test_an_unknown_base_profile_is_an_error() -> None:
    profiles = [d for d in _definitions(PING_PONG) if d["resourceType"] == "StructureDefinition"]
    errors = ProfileValidator(profiles).validate(ping_task())
    assert _has(errors, "base profile http://dsf.dev/fhir/StructureDefinition/task-base unknown"), (
        errors
    )


def test_a_profile_published_later_is_used(dsf19: list[dict[str, Any]]) -> None:
    validator = ProfileValidator(dsf19)
    assert _has(validator.validate(ping_task()), "task-ping|1.0 unknown")
    for definition in _definitions(PING_PONG):
        validator.add(definition)
    assert validator.validate(ping_task()) == []


def test_the_core_type_is_checked_first(ping_pong: ProfileValidator) -> None:
    task = ping_task()
    task["status"] = "waiting"
    task["colour"] = "blue"
    task["authoredOn"] = "yesterday"
    errors = ping_pong.validate(task)
    assert _has(errors, "Task.status: 'waiting' is not a code"), errors
    assert _has(errors, "Task.colour: unknown element"), errors
    assert _has(errors, "Task.authoredOn:"), errors
    assert ProfileValidator([]).validate({"resourceType": "Nonsense"}) == [
        "Nonsense: unknown resource type 'Nonsense'"
    ]


def test_a_task_without_profile_is_checked_as_a_core_task(ping_pong: ProfileValidator) -> None:
    task = ping_task()
    del task["meta"]
    assert ping_pong.validate(task) == []


def test_base_profiles_loads_what_the_dsf_server_loads(
    dsf19: list[dict[str, Any]], dsf21: list[dict[str, Any]]
) -> None:
    def canonicals(resources: list[dict[str, Any]]) -> set[str]:
        return {f"{r['url']}|{r['version']}" for r in resources}

    assert {
        "http://dsf.dev/fhir/StructureDefinition/task-base|1.0.0",
        "http://dsf.dev/fhir/StructureDefinition/questionnaire-response|1.0.0",
        "http://dsf.dev/fhir/ValueSet/bpmn-message|1.0.0",
        "http://dsf.dev/fhir/CodeSystem/bpmn-message|1.0.0",
    } <= canonicals(dsf19)
    found = canonicals(dsf21)
    assert "http://dsf.dev/fhir/StructureDefinition/task|2.1.0" in found
    assert "http://dsf.dev/fhir/StructureDefinition/task|2.0.0" not in found  # .ignore'd
    with pytest.raises(ValueError, match=r"DSF version '3\.0' unknown"):
        base_profiles("3.0", reference_dir())
    with pytest.raises(FileNotFoundError, match=r"DSF 2\.1 profiles not found"):
        base_profiles("2.1", Path("/nonexistent"))


def test_every_dsf_and_tutorial_profile_compiles(dsf21: list[dict[str, Any]]) -> None:
    """Every DSF 2.1 profile and the tutorial's can be used (speed is measured in bench/, not
    here)."""
    definitions = [*dsf21, *_definitions(TUTORIAL)]
    validator = ProfileValidator(definitions)
    for definition in definitions:
        if definition["resourceType"] == "StructureDefinition":
            assert validator.problem(f"{definition['url']}|{definition['version']}") is None
    assert validator.validate(hello_hrp_task()) == []


def test_a_sandbox_without_dsfs_profiles_refuses_to_serve_unless_told_to_go_lenient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test oracle must never turn lenient quietly: without the DSF corpus, building a
    validating sandbox fails; only the demo's "if available" goes on, without validation."""
    monkeypatch.setenv("DSF_BRIDGE_REFERENCE_DIR", str(tmp_path / "nowhere"))
    allow_list = allow_list_bundle(organization_entry("A", "ab" * 64, "https://a.test/fhir"))
    with pytest.raises(FileNotFoundError, match="DSF_BRIDGE_REFERENCE_DIR"):
        build_service("A", allow_list, "https://a.test/fhir")
    lenient = build_service("A", allow_list, "https://a.test/fhir", validate=None)
    assert lenient.validator is None
