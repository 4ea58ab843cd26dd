"""The consortium handlers one by one: how a coordinator reads a site's answer (strictly: a
broken or hostile one makes the site ``failed`` and nothing of it is kept), what a data site
refuses before anything runs, and what the result Task carries."""

from __future__ import annotations

import json
import re
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

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
    run_cohort_step,
    send_consortium_result,
    site_states,
)
from dsf_bridge.plugins.inference import SERVICE_OMI_SETTINGS
from dsf_bridge.plugins.registry import (
    SERVICE_CALL_RETRY,
    BpmnError,
    HandlerContext,
    SendContext,
)
from dsf_bridge.retry import RetryPolicy

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
        # A cell from fewer than 3 studies cannot have been under the k rule.
        (
            [_status("done"), _input("consortium-aggregates", json.dumps([_numeric(1)]))],
            "a figure from fewer than 3 studies",
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
        # Hostile shapes must fail the site, not the coordinator's whole request (a handler
        # that raises fails the instance): nesting past Python's recursion limit, and size.
        (
            [_status("done"), _input("consortium-aggregates", "[" * 100_000 + "]" * 100_000)],
            "nested too deeply",
        ),
        (
            [_status("done"), _input("consortium-aggregates", json.dumps([_numeric()] * 20_000))],
            "more than 1000000 characters",
        ),
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
    assert "1 studies" not in state["reason"]  # a refused figure is not kept in the reason


def test_a_refused_answer_s_reason_is_bounded() -> None:
    # The reason quotes the site's measurement name; it goes into the Bundle and the logs.
    named = _numeric() | {"measurement": "x" * 50_000}
    state = _answer(_status("done"), _input("consortium-aggregates", json.dumps([named])))
    assert state["status"] == "failed"
    assert len(state["reason"]) <= 500


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


# -- what a data site's failure tells the coordinator ---------------------------------------------

# What a hostile or chatty server might put in its error text: a name and a study UID.
LEAK = "DOE^JANE 1.2.826.0.1.3680043.8.498.4711"


def _run_cohort_context(base: str) -> HandlerContext:
    """RunCohort at a data site whose archive and inference server are both at ``base``."""
    settings = OmiSettings(
        catalogue=[{"id": "tissue-composition", "inference_url": base}],
        consortium={"dicomweb_url": f"{base}/dicom-web", "k": 3},
    )
    return HandlerContext(
        handler="RunCohort",
        element_id="RunCohort",
        business_key="bk",
        variables={"serviceId": "tissue-composition", "cohort": {"modalities": ["CT"]}, "k": 3},
        services={
            SERVICE_OMI_SETTINGS: settings,
            SERVICE_CALL_RETRY: RetryPolicy(attempts=1, initial_delay=0.01),
        },
    )


class _SiteServers(BaseHTTPRequestHandler):
    """A data site's archive (QIDO-RS: three studies) and inference server (readiness answers
    ``ready_status`` with ``LEAK`` in its error text), on one real loopback socket."""

    ready_status = 500

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/dicom-web/series":
            first = parse_qs(url.query).get("offset") == ["0"]
            items = [
                {
                    "0020000D": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.8.498.{n}"]},
                    "0020000E": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.8.498.{n}.1"]},
                    "00080060": {"vr": "CS", "Value": ["CT"]},
                    "00201209": {"vr": "IS", "Value": [1]},
                }
                for n in (1, 2, 3)
            ]
            self._answer(200, "application/dicom+json", items if first else [])
        elif url.path.endswith("/ready"):
            self._answer(type(self).ready_status, "application/json", {"error": LEAK})
        else:
            self._answer(404, "application/json", {"error": LEAK})

    def _answer(self, status: int, content_type: str, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def site_servers() -> Iterator[tuple[str, type[_SiteServers]]]:
    handler = type("Servers", (_SiteServers,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("status", "kind"),
    [(500, "failed"), (404, "does not serve the model"), (400, "not ready")],
)
async def test_an_inference_server_failure_reaches_the_coordinator_in_the_bridges_words(
    site_servers: tuple[str, type[_SiteServers]], status: int, kind: str
) -> None:
    base, handler = site_servers
    handler.ready_status = status
    ctx = _run_cohort_context(base)
    with pytest.raises(BpmnError) as raised:
        await run_cohort_step(ctx)
    assert raised.value.code == "failed"
    reason = raised.value.message
    assert "inference server" in reason and kind in reason
    # Neither the server's own text nor where this site's servers are goes to another site.
    for private in ("DOE", "1.2.826", "127.0.0.1", base):
        assert private not in reason


# -- class tables the coordinator must not store ------------------------------------------------


def _three_classes() -> OmiSettings:
    path = resources.files("dsf_bridge.omi") / "contracts" / "ct-density.toml"
    table = tomllib.loads(path.read_text(encoding="utf-8"))
    classes = table["outputs"]["classifications"][0]["classes"]
    system = classes[0]["code"]["system"]
    classes.append({"code": {"system": system, "code": "mixed", "display": "Mixed"}})
    table["name"] = "three-classes"
    return OmiSettings(catalogue=[{"id": "three-classes", "contract": table}])


def _classes(n: int, counts: dict[str, object]) -> dict[str, Any]:
    return {
        "measurement": "density-class",
        "kind": "classes",
        "suppressed": False,
        "n": n,
        "counts": counts,
        "obfuscated": False,
    }


def _class_answer(table: dict[str, Any], minimum_k: int = 5) -> dict[str, Any]:
    ctx = HandlerContext(
        handler="RecordResult",
        element_id="RecordResult",
        business_key="bk",
        variables={
            "task": {
                "id": "t1",
                "requester": "Site_A",
                "inputs": [_status("done"), _input("consortium-aggregates", json.dumps([table]))],
            },
            "target": TARGET,
            "consortiumRequest": {**REQUEST, "service": "three-classes", "minimumK": minimum_k},
            "sites": [TARGET],
        },
        services={SERVICE_OMI_SETTINGS: _three_classes()},
    )
    record_result(ctx)
    state = ctx.updates[f"site_{KEY}"]
    assert isinstance(state, dict)
    return state


HIDDEN = {"suppressed": True}


def test_a_class_table_hiding_enough_is_kept() -> None:
    # 20 studies, 'fatty' 12 shown, 'dense' and 'mixed' hidden: together 8, at least k = 5.
    state = _class_answer(_classes(20, {"fatty": 12, "dense": HIDDEN, "mixed": HIDDEN}))
    assert state["status"] == "done"


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        # The hidden classes hold 3 studies together: a figure from fewer than k by subtraction.
        (
            _classes(15, {"fatty": 12, "dense": HIDDEN, "mixed": HIDDEN}),
            "hidden classes of 'density-class' hold fewer than 5 studies",
        ),
        # A class left out of the table is hidden without saying so: 'mixed' = 20 - 12 - 7 = 1.
        (_classes(20, {"fatty": 12, "dense": 7}), "do not add up to its total"),
        (
            _classes(20, {"fatty": 10, "dense": 10}) | {"obfuscated": True},
            "leaves out class mixed",
        ),
        # Its classes hold more studies than its total.
        (_classes(10, {"fatty": 12, "dense": 7, "mixed": 6}), "more studies in its classes"),
        # Every class shown: they must add up to the total.
        (_classes(30, {"fatty": 12, "dense": 7, "mixed": 6}), "do not add up to its total"),
    ],
)
def test_a_class_table_leaking_a_small_figure_by_subtraction_is_refused(
    table: dict[str, Any], reason: str
) -> None:
    state = _class_answer(table)
    assert state["status"] == "failed"
    assert reason in state["reason"]
    assert "aggregates" not in state
    # The reason is stored at the coordinator: no figure of the refused table is in it.
    figures = {str(v) for v in table["counts"].values() if isinstance(v, int)} | {str(table["n"])}
    assert not figures & set(re.findall(r"\d+", state["reason"].replace("'density-class'", "")))


async def test_a_cohort_where_every_study_failed_is_failed_not_suppressed(
    site_servers: tuple[str, type[_SiteServers]],
) -> None:
    # The model is ready, but no study can be read (404): the site has no figure because
    # nothing worked, not because its cohort was small; 'suppressed' would say the latter.
    base, handler = site_servers
    handler.ready_status = 200
    ctx = _run_cohort_context(base)
    with pytest.raises(BpmnError) as raised:
        await run_cohort_step(ctx)
    assert raised.value.code == "failed"
    assert "no result for any study" in raised.value.message
    assert "study-not-found" in raised.value.message
    assert "3" not in raised.value.message  # the kinds, never how many (3 studies failed)
    assert "consortiumStatus" not in ctx.updates


@pytest.mark.parametrize(
    ("asked", "k"), [(None, 5), (3, 5), (6, 10), (10, 10), (11, 20), (95, 100)]
)
def test_with_obfuscation_a_requested_k_cannot_probe_a_count(asked: int | None, k: int) -> None:
    # Cells show iff n >= k: asking k = 6, 7, 8 ... would find the exact n that obfuscation
    # hides. A k above the site's own goes up to the obfuscation's tens.
    inputs = [SERVICE, CT] + ([] if asked is None else [_input("minimum-k", asked)])
    ctx = _request(*inputs, settings=_data_site(k=5, obfuscate=True))
    check_consortium_request(ctx)
    assert ctx.updates["k"] == k
    plain = _request(*inputs, settings=_data_site(k=5))
    check_consortium_request(plain)
    assert plain.updates["k"] == max(5, asked or 0)
