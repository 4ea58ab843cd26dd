"""The typed state codec: what the runtime, the API and the harness read of an instance state.

``data/states_v1.json`` holds two states written by the engine as it was before this codec
existed (git c7a6a6d), for ``data/state_v1.bpmn`` started with targets org-a and org-b:
``started`` right after the start, ``working`` after the async job of ``work`` ran. They are
literal on purpose: never regenerate them; they prove that stored rows keep loading.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dsf_bridge.engine import load_process, start, step
from dsf_bridge.engine import state as codec
from dsf_bridge.engine.correlation import message_subscriptions, signal_waits
from dsf_bridge.engine.events import MessageReceived, Start, TimerFired
from dsf_bridge.engine.exceptions import StateError
from dsf_bridge.engine.interpreter import STATE_VERSION
from dsf_bridge.engine.state import Incident, InstanceStatus, Phase, TokenView, Wait, WaitKind
from dsf_bridge.errors import ProcessExecutionError
from tests.engine.bpmn import model

DATA = Path(__file__).parent / "data"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
INTERPRETER = Path(codec.__file__).with_name("interpreter.py")


def _fixtures() -> dict[str, dict[str, Any]]:
    states: dict[str, dict[str, Any]] = json.loads((DATA / "states_v1.json").read_text())
    return states


def _fixture(name: str) -> dict[str, Any]:
    return codec.loads(json.dumps(_fixtures()[name]))


# -- enums ------------------------------------------------------------------------------------


def test_enum_values_are_the_stored_codes() -> None:
    assert [s.value for s in InstanceStatus] == ["run", "done", "failed"]
    assert [p.value for p in Phase] == [
        "",
        "ab",
        "aa",
        "sl",
        "el",
        "tl",
        "h",
        "u",
        "j",
        "w",
        "sp",
        "mi",
    ]
    assert [k.value for k in WaitKind] == ["m", "t", "s", "c"]
    # StrEnum: a member is its code, so it serializes to the same compact JSON.
    assert json.dumps({"st": InstanceStatus.RUNNING}) == '{"st": "run"}'


def test_status_labels_are_the_words_the_store_uses() -> None:
    assert [s.label for s in InstanceStatus] == ["running", "completed", "failed"]
    assert InstanceStatus.from_label("completed") is InstanceStatus.COMPLETED
    with pytest.raises(ValueError, match="not an instance status"):
        InstanceStatus.from_label("run")


def test_every_phase_and_status_the_interpreter_writes_has_a_member() -> None:
    source = INTERPRETER.read_text()
    phases = set(re.findall(r'\["p"\] = "(\w*)"', source))
    phases |= set(re.findall(r'"p": "(\w*)"', source))
    phases |= set(re.findall(r'self\.schedule\(\w+, \w+, "(\w+)"', source))
    assert {"", "ab", "aa", "h", "u", "w", "sp", "mi"} <= phases  # the scan finds them
    assert phases <= {p.value for p in Phase}
    statuses = set(re.findall(r'\["st"\] = "(\w+)"', source)) | {"run"}
    assert statuses == {s.value for s in InstanceStatus}


# -- codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["started", "working"])
def test_states_written_before_the_codec_load_and_round_trip(name: str) -> None:
    raw = _fixtures()[name]
    text = json.dumps(raw, separators=(",", ":"))
    state = codec.loads(text)
    assert state == raw
    assert codec.dumps(state) == text
    assert codec.loads(codec.dumps(state)) == state
    assert state["v"] == STATE_VERSION


def test_loads_accepts_bytes_and_checks_the_version() -> None:
    raw = _fixtures()["started"]
    assert codec.loads(json.dumps(raw).encode()) == raw
    with pytest.raises(StateError, match="Unsupported instance state version 2"):
        codec.loads(json.dumps(raw | {"v": 2}))
    with pytest.raises(StateError, match="not JSON"):
        codec.loads("{")


def _broken(change: Any) -> dict[str, Any]:
    state = copy.deepcopy(_fixtures()["working"])
    change(state)
    return state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(st="paused"), "Unknown instance status 'paused'"),
        (lambda s: s.pop("tk"), "'tk' must be dict"),
        (lambda s: s["tk"]["4"].update(p="zz"), "token 4 has an unknown phase 'zz'"),
        (lambda s: s["tk"]["7"].update(w=[["waitReply", "q", "x"]]), "malformed wait"),
        (lambda s: s["tk"]["7"].update(s=99), "scope 99, which the state does not have"),
        (lambda s: s["tk"]["4"].update(x={"e": "review"}), "malformed incident"),
        (lambda s: s["tk"]["4"].update(x={"m": "boom", "at": "yesterday"}), "not ISO 8601"),
        (lambda s: s["sc"]["9"].update(v=None), "scope 9: 'v' must be dict"),
    ],
)
def test_check_names_what_is_wrong(change: Any, message: str) -> None:
    with pytest.raises(StateError, match=re.escape(message)) as caught:
        codec.check(_broken(change))
    assert isinstance(caught.value, ProcessExecutionError)


def test_check_refuses_what_is_not_a_state() -> None:
    with pytest.raises(StateError, match="must be a JSON object, not list"):
        codec.check([])


# -- queries over a state written before the codec --------------------------------------------


def test_queries_over_an_old_state() -> None:
    state = _fixture("working")
    assert codec.instance_status(state) is InstanceStatus.RUNNING
    assert codec.is_running(state)
    assert codec.process_key(state) == "testorg_stateFixture"
    assert codec.business_key(state) == "bk-fixture"
    assert codec.alternative_business_key(state) == "alt-fixture"
    assert codec.process_variables(state)["targets"] == ["org-a", "org-b"]
    assert codec.incidents(state) == []
    views = codec.tokens(state)
    assert [t.id for t in views] == ["1", "2", "3", "4", "7", "8", "10", "11", "13", "16"]
    assert [t.phase for t in views] == [
        Phase.SUBPROCESS,
        Phase.MULTI_INSTANCE,
        Phase.MULTI_INSTANCE,
        Phase.USER_TASK,
        Phase.WAITING,
        Phase.SUBPROCESS,
        Phase.WAITING,
        Phase.SUBPROCESS,
        Phase.WAITING,
        Phase.HANDLER,
    ]
    assert codec.token(state, "10") == TokenView(
        id="10",
        element="race",
        scope=9,
        phase=Phase.WAITING,
        waits=(
            Wait("10", "waitAnswer", WaitKind.MESSAGE, "answer"),
            Wait("10", "timeout", WaitKind.TIMER, "10/timeout/14"),
        ),
        incident=None,
    )
    # The multi-instance child's element variable is local; the process's are not its locals
    # once it runs in its own scope.
    assert codec.local_variable(state, "16", "target") == "org-a"
    assert codec.local_variable(state, "10", "correlationKey") == "org-a"
    assert codec.local_variable(state, "10", "targets", "none") == "none"
    assert codec.local_variable(state, "4", "targets") == ["org-a", "org-b"]


def test_waiting_for_lists_catches_gateways_and_boundary_timers() -> None:
    state = _fixture("started")
    assert codec.waiting_for(state) == [
        Wait("1", "subLate", WaitKind.TIMER, "1/subLate/5", boundary=True),
        Wait("7", "waitReply", WaitKind.MESSAGE, "reply"),
        Wait("10", "waitAnswer", WaitKind.MESSAGE, "answer"),
        Wait("10", "timeout", WaitKind.TIMER, "10/timeout/14"),
        Wait("13", "waitAnswer", WaitKind.MESSAGE, "answer"),
        Wait("13", "timeout", WaitKind.TIMER, "13/timeout/15"),
    ]
    ended = state | {"st": "done"}
    assert codec.waiting_for(ended) == []
    assert codec.instance_status(ended).label == "completed"


def test_message_subscriptions_of_an_old_state() -> None:
    state = _fixture("started")
    found = {
        (s.message_name, s.business_key, s.correlation_key, s.token, s.element_id)
        for s in message_subscriptions(state)
    }
    assert found == {
        (message, key, correlation, token, element)
        for key in ("bk-fixture", "alt-fixture")
        for message, correlation, token, element in [
            ("reply", None, "7", "waitReply"),
            ("answer", "org-a", "10", "waitAnswer"),
            ("answer", "org-b", "13", "waitAnswer"),
        ]
    }
    assert signal_waits(state) == []


def test_todays_engine_continues_an_old_state() -> None:
    source = DATA / "state_v1.bpmn"
    definition = load_process(source.read_bytes(), source.name, resource_version="1.0")
    state = _fixture("started")
    answered = step(
        definition, state, MessageReceived("answer", NOW, "org-b", {}, None, "task-1")
    ).state
    assert "13" not in answered["tk"]  # org-b's execution got its answer and ended
    timed_out = step(definition, answered, TimerFired("10/timeout/14", NOW)).state
    # Both executions of "each" ended and it went on: what is left to wait for is the reply
    # in "sub" and its boundary timer (and "work" and "review", which do not wait for events).
    elements = {view.element for view in codec.tokens(timed_out)}
    assert {"sub", "work", "review", "waitReply"} <= elements
    assert not elements & {"each", "race"}
    assert codec.waiting_for(timed_out) == [
        Wait("1", "subLate", WaitKind.TIMER, "1/subLate/5", boundary=True),
        Wait("7", "waitReply", WaitKind.MESSAGE, "reply"),
    ]
    assert codec.is_running(timed_out)


# -- additions: boundary message waits and incidents ------------------------------------------


def _with_boundaries_and_incident() -> dict[str, Any]:
    """The old state with what the interpreter now writes: a message boundary on the user task
    and on the handler's activity, and an incident on the handler's token."""
    state = copy.deepcopy(_fixture("working"))
    state["tk"]["4"]["bw"] = [["cancelReview", "m", "cancel"]]
    state["tk"]["16"]["bw"] = [["stopWork", "m", "stop"], ["abortWork", "m", "abort"]]
    state["tk"]["16"]["x"] = {
        "m": "RuntimeError: service down",
        "e": "work",
        "at": "2026-01-01T00:05:00+00:00",
    }
    return codec.check(state)


def test_boundary_message_waits_in_any_phase_are_waits_and_subscriptions() -> None:
    state = _with_boundaries_and_incident()
    assert codec.loads(codec.dumps(state)) == state
    boundary = [w for w in codec.waiting_for(state) if w.kind is WaitKind.MESSAGE and w.boundary]
    assert boundary == [
        Wait("4", "cancelReview", WaitKind.MESSAGE, "cancel", boundary=True),
        Wait("16", "stopWork", WaitKind.MESSAGE, "stop", boundary=True),
        Wait("16", "abortWork", WaitKind.MESSAGE, "abort", boundary=True),
    ]
    assert codec.token(state, "4").phase is Phase.USER_TASK
    assert codec.token(state, "4").waits == (boundary[0],)
    subscriptions = message_subscriptions(state)
    by_message: dict[str, set[tuple[str, str | None, str]]] = {}
    for s in subscriptions:
        by_message.setdefault(s.message_name, set()).add(
            (s.business_key, s.correlation_key, s.token)
        )
    assert by_message["cancel"] == {("bk-fixture", None, "4"), ("alt-fixture", None, "4")}
    # The key of the handler's execution is its own local: none here.
    assert by_message["stop"] == {("bk-fixture", None, "16"), ("alt-fixture", None, "16")}
    assert {"reply", "answer", "cancel", "stop", "abort"} == set(by_message)
    assert [s.element_id for s in subscriptions if s.message_name == "abort"] == ["abortWork"] * 2


def test_a_boundary_message_wait_takes_the_executions_local_correlation_key() -> None:
    state = _with_boundaries_and_incident()
    state["tk"]["16"]["v"]["correlationKey"] = "org-a"
    keys = {s.correlation_key for s in message_subscriptions(state) if s.message_name == "stop"}
    assert keys == {"org-a"}


def test_incidents_are_listed_and_leave_the_instance_running() -> None:
    state = _with_boundaries_and_incident()
    incident = Incident(
        token="16",
        element="work",
        message="RuntimeError: service down",
        at=datetime(2026, 1, 1, 0, 5, tzinfo=UTC),
    )
    assert codec.incidents(state) == [incident]
    assert codec.token(state, "16").incident == incident
    assert codec.token(state, "16").phase is Phase.HANDLER
    assert codec.instance_status(state) is InstanceStatus.RUNNING
    # Without "e" the incident is at the token's element; without "at" its time is unknown.
    state["tk"]["4"]["x"] = {"m": "no Questionnaire"}
    assert codec.incidents(codec.check(state))[0] == Incident(
        "4", "review", "no Questionnaire", None
    )


def test_signal_waits_are_read_through_the_codec() -> None:
    state = copy.deepcopy(_fixture("started"))
    state["tk"]["7"]["w"] = [["stopAll", "s", "stop"], ["waitReply", "m", "reply"]]
    assert [(w.signal_name, w.token, w.element_id) for w in signal_waits(state)] == [
        ("stop", "7", "stopAll")
    ]


def test_the_engine_writes_boundary_message_waits_the_codec_reads() -> None:
    definition = model(
        '<bpmn:startEvent id="s"><bpmn:messageEventDefinition messageRef="start"/>'
        '</bpmn:startEvent><bpmn:userTask id="review" camunda:formKey="q|1.0"/>'
        '<bpmn:boundaryEvent id="cancelled" attachedToRef="review">'
        '<bpmn:messageEventDefinition messageRef="cancel"/></bpmn:boundaryEvent>'
        '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        '<bpmn:sequenceFlow id="f1" sourceRef="s" targetRef="review"/>'
        '<bpmn:sequenceFlow id="f2" sourceRef="review" targetRef="e1"/>'
        '<bpmn:sequenceFlow id="f3" sourceRef="cancelled" targetRef="e2"/>',
        extra='<bpmn:message id="cancel" name="cancel"/>',
    )
    state = codec.loads(codec.dumps(start(definition, Start("start", "bk", NOW)).state))
    (view,) = codec.tokens(state)
    assert view.phase is Phase.USER_TASK
    assert codec.waiting_for(state) == [
        Wait(view.id, "cancelled", WaitKind.MESSAGE, "cancel", boundary=True)
    ]
    assert [(s.message_name, s.element_id) for s in message_subscriptions(state)] == [
        ("cancel", "cancelled")
    ]
