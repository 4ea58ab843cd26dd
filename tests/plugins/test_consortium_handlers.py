"""The consortium handlers one by one: how a coordinator reads a site's answer (strictly: a
broken or hostile one makes the site ``failed`` and nothing of it is kept), what a data site
refuses before anything runs, and what the result Task carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.config import OmiSettings
from dsf_bridge.dsf.questionnaires import (
    QUESTIONNAIRE_ITEM_TEXTS,
    questionnaire_item_texts,
    questionnaire_response,
)
from dsf_bridge.plugins import consortium
from dsf_bridge.plugins.consortium import (
    CODESYSTEM_CONSORTIUM,
    CODESYSTEM_CONSORTIUM_STATUS,
    check_consortium_request,
    describe_request,
    record_result,
    send_consortium_result,
    site_states,
)
from dsf_bridge.plugins.inference import SERVICE_OMI_SETTINGS
from dsf_bridge.plugins.registry import BpmnError, HandlerContext, SendContext

REPO = Path(__file__).resolve().parents[2]
KEY = "3f1c9a52-0000-4000-8000-000000000001"
REQUEST = {"service": "tissue-composition", "cohort": {"modalities": ["CT"]}, "minimumK": None}
TARGET = {"organizationIdentifier": "Site_A", "correlationKey": KEY}
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def _input(code: str, value: object, system: str = CODESYSTEM_CONSORTIUM) -> dict[str, Any]:
    return {"system": system, "code": code, "value": value}


def _status(code: str) -> dict[str, Any]:
    return _input("consortium-status", {"system": CODESYSTEM_CONSORTIUM_STATUS, "code": code})


def _numeric(n: int = 7) -> dict[str, Any]:
    return {
        "measurement": "body-area",
        "kind": "numeric",
        "suppressed": False,
        "n": n,
        "mean": 50.0,
        "sd": 1.5,
        "median": 50.1,
        "q1": 49.0,
        "q3": 51.0,
        "obfuscated": False,
    }


def _answer(*inputs: dict[str, Any]) -> dict[str, Any]:
    ctx = HandlerContext(
        handler="RecordResult",
        element_id="RecordResult",
        business_key="bk",
        variables={
            "task": {"id": "t1", "requester": "Site_A", "inputs": list(inputs)},
            "target": TARGET,
            "consortiumRequest": REQUEST,
            "sites": [TARGET],
        },
    )
    record_result(ctx)
    state = ctx.updates[f"site_{KEY}"]
    assert isinstance(state, dict)
    return state


def test_a_good_answer_is_kept_with_its_aggregates() -> None:
    state = _answer(_status("done"), _input("consortium-aggregates", json.dumps([_numeric()])))
    assert state["status"] == "done"
    assert state["aggregates"] == [_numeric()]


@pytest.mark.parametrize(
    ("inputs", "reason"),
    [
        # A figure the coordinator did not ask for and cannot check: refused whole.
        (
            [_status("done"), _input("consortium-aggregates", json.dumps([_numeric() | {"x": 1}]))],
            "must have exactly",
        ),
        # A measurement the contract does not have.
        (
            [
                _status("done"),
                _input(
                    "consortium-aggregates",
                    json.dumps([_numeric() | {"measurement": "patient-age"}]),
                ),
            ],
            "not an output of contract",
        ),
        # A cell from fewer than 2 studies cannot have been under the k rule.
        (
            [_status("done"), _input("consortium-aggregates", json.dumps([_numeric(1)]))],
            "from 1 studies, fewer than 2",
        ),
        # 'suppressed' means nothing is shown.
        ([_status("suppressed"), _input("consortium-aggregates", json.dumps([_numeric()]))], ""),
        # A refusal carries no figures.
        (
            [_status("refused"), _input("consortium-aggregates", json.dumps([_numeric()]))],
            "carries aggregates",
        ),
        # 'timed-out' is the coordinator's verdict, never a site's answer.
        ([_status("timed-out")], "is not a site's answer"),
        ([_status("done")], "no single 'consortium-aggregates'"),
        ([_input("consortium-aggregates", "[]")], "no single 'consortium-status'"),
        ([_status("done"), _input("consortium-aggregates", "{not json")], ""),
    ],
)
def test_a_broken_answer_fails_the_site_and_keeps_nothing(
    inputs: list[dict[str, Any]], reason: str
) -> None:
    state = _answer(*inputs)
    assert state["status"] == "failed"
    assert state["reason"].startswith("the site's answer was refused: ")
    assert reason in state["reason"]
    assert "aggregates" not in state


def test_a_refusal_keeps_its_reason() -> None:
    state = _answer(_status("refused"), _input("error", "not approved by this site"))
    assert (state["status"], state["reason"]) == ("refused", "not approved by this site")
    rows = site_states({"sites": [TARGET], f"site_{KEY}": state})
    assert rows == [
        {"organization": "Site_A", "status": "refused", "reason": "not approved by this site"}
    ]


def _request(*inputs: dict[str, Any], settings: OmiSettings | None = None) -> HandlerContext:
    task = {
        "id": "t2",
        "requester": "Coordinator",
        "inputs": [
            _input("correlation-key", KEY, "http://dsf.dev/fhir/CodeSystem/bpmn-message"),
            *inputs,
        ],
    }
    return HandlerContext(
        handler="CheckConsortiumRequest",
        element_id="CheckRequest",
        business_key="bk",
        variables={"task": task},
        services={SERVICE_OMI_SETTINGS: settings or _data_site()},
    )


def _data_site(**consortium: Any) -> OmiSettings:
    return OmiSettings(
        catalogue=[{"id": "tissue-composition", "inference_url": "http://127.0.0.1:1"}],
        consortium={"dicomweb_url": "http://127.0.0.1:2/dicom-web", **consortium},
    )


SERVICE = _input("service", "tissue-composition")
CT = _input("cohort-modality", {"system": DCM, "code": "CT"})


def test_a_data_site_checks_the_request_and_answers_whoever_asked() -> None:
    ctx = _request(SERVICE, CT, _input("minimum-k", 9), settings=_data_site(k=5))
    check_consortium_request(ctx)
    assert ctx.updates["target"] == {"organizationIdentifier": "Coordinator", "correlationKey": KEY}
    assert ctx.updates["k"] == 9  # the coordinator may ask for more
    ctx = _request(SERVICE, CT, _input("minimum-k", 2), settings=_data_site(k=5))
    check_consortium_request(ctx)
    assert ctx.updates["k"] == 5  # never for less


@pytest.mark.parametrize(
    ("inputs", "settings", "reason"),
    [
        ([SERVICE, CT], OmiSettings(), "this site takes no consortium requests"),
        ([_input("service", "other"), CT], None, "service other is not run at this site"),
        ([SERVICE, _input("cohort-modality", {"system": DCM, "code": "MR"})], None, "not MR"),
        ([SERVICE, CT, _input("patient-id", "PID-1")], None, "'patient-id' is not part"),
        ([SERVICE, CT, _input("cohort-study-date-from", "last year")], None, "not a date"),
        ([SERVICE], None, "no 'cohort-modality'"),
    ],
)
def test_a_data_site_refuses_before_anything_runs(
    inputs: list[dict[str, Any]], settings: OmiSettings | None, reason: str
) -> None:
    ctx = _request(*inputs, settings=settings)
    with pytest.raises(BpmnError) as raised:
        check_consortium_request(ctx)
    assert reason in raised.value.message
    # Whatever was refused, the answer can still go to the coordinator with its key.
    assert ctx.updates["target"]["correlationKey"] == KEY  # type: ignore[index]


def _send(variables: dict[str, Any]) -> list[dict[str, object]]:
    ctx = SendContext(
        handler="SendConsortiumResult",
        element_id="SendResult",
        business_key="bk",
        variables=variables,
    )
    send_consortium_result(ctx)
    return ctx.inputs


def test_the_result_task_carries_aggregates_or_a_reason_never_both() -> None:
    done = _send({"consortiumStatus": "done", "consortiumAggregates": [_numeric()]})
    assert [i["code"] for i in done] == ["consortium-status", "consortium-aggregates"]
    assert json.loads(str(done[1]["value"])) == [_numeric()]
    refused = _send({"consortiumStatus": "refused", "errorMessage": "not approved"})
    assert [(i["code"], i["value"]) for i in refused][1] == ("error", "not approved")
    assert len(refused) == 2


def test_the_approval_form_shows_the_request_and_keeps_its_keys() -> None:
    """The user task's listener sets the text of the form's ``request`` item (DSF's
    ``beforeQuestionnaireResponseCreate``); ``business-key`` and ``user-task-id`` keep theirs."""
    ctx = HandlerContext(
        handler="DescribeRequest",
        element_id="Approve",
        business_key="bk",
        variables={
            "requester": "Coordinator",
            "serviceId": "tissue-composition",
            "cohort": {"modalities": ["CT"], "body_part": "ABDOMEN"},
            "k": 7,
        },
    )
    describe_request(ctx)
    texts = questionnaire_item_texts(
        {
            **ctx.local_updates,
            QUESTIONNAIRE_ITEM_TEXTS: {
                **ctx.local_updates[QUESTIONNAIRE_ITEM_TEXTS],  # type: ignore[dict-item]
                "business-key": "forged",
            },
        }
    )
    assert set(texts) == {"request"}
    assert "Coordinator asks this site to run the service tissue-composition" in texts["request"]
    assert "CT, body part ABDOMEN" in texts["request"]
    assert "fewer than 7 studies" in texts["request"]
    questionnaire = json.loads(
        (REPO / "profiles/consortium/Questionnaire/consortium-approval.json").read_text()
    )
    response = questionnaire_response(
        questionnaire,
        form_key="http://dsf-bridge.dev/fhir/Questionnaire/consortium-approval|1.0",
        business_key="bk",
        user_task_id="instance/1",
        organization="Site_A",
        item_texts={**texts, "business-key": "forged"},
    )
    items = {item["linkId"]: item for item in response["item"]}
    assert items["request"]["text"] == texts["request"]
    assert items["business-key"]["text"] == "The business-key of the process execution"
    assert items["approve"]["answer"] == [{"valueBoolean": False}]  # the placeholder


def test_one_obfuscator_per_setting_for_as_long_as_the_bridge_runs() -> None:
    """The same true count gets the same published count across requests (asking again does
    not average the noise away); no obfuscator unless configured."""
    assert consortium._obfuscator(_data_site().consortium) is None
    settings = _data_site(obfuscate=True, epsilon=0.25).consortium
    first = consortium._obfuscator(settings)
    assert first is not None
    assert consortium._obfuscator(settings) is first
    assert [first.obfuscate(7) for _ in range(5)] == [first.obfuscate(7)] * 5
    other = consortium._obfuscator(_data_site(obfuscate=True).consortium)
    assert other is not first
