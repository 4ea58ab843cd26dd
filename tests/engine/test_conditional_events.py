"""Conditional events as Camunda 7 evaluates them: on entering, then on variable changes,
filtered by ``camunda:variableName`` and ``camunda:variableEvents``; also behind an
event-based gateway, next to timers and messages."""

from __future__ import annotations

from typing import Any

import pytest

from dsf_bridge.engine import ProcessDefinition, start, step
from dsf_bridge.engine.events import (
    CallHandler,
    CancelTimer,
    HandlerCompleted,
    MessageReceived,
    Start,
    StartTimer,
)
from dsf_bridge.engine.interpreter import Step
from dsf_bridge.errors import ProcessModelError
from tests.engine.bpmn import NOW, START, flow, model

GUARDED = "${execution.hasVariable('ready') &amp;&amp; ready}"


def _conditional(ident: str, condition: str, attrs: str = "") -> str:
    return (
        f'<bpmn:intermediateCatchEvent id="{ident}"><bpmn:conditionalEventDefinition {attrs}>'
        f'<bpmn:condition xsi:type="bpmn:tFormalExpression">{condition}</bpmn:condition>'
        "</bpmn:conditionalEventDefinition></bpmn:intermediateCatchEvent>"
    )


def _beside_a_loop(condition: str, attrs: str = "") -> str:
    """A conditional catch on one branch; on the other, handler A runs (again and again)."""
    return (
        START
        + '<bpmn:parallelGateway id="fork"/>'
        + _conditional("cond", condition, attrs)
        + '<bpmn:serviceTask id="a" camunda:class="A"/>'
        + '<bpmn:exclusiveGateway id="again" default="f6"/>'
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "fork")
        + flow("f2", "fork", "cond")
        + flow("f3", "fork", "a")
        + flow("f4", "cond", "e1")
        + flow("f5", "a", "again")
        + flow("f6", "again", "a")
        + '<bpmn:sequenceFlow id="f7" sourceRef="again" targetRef="e2">'
        + '<bpmn:conditionExpression xsi:type="bpmn:tFormalExpression">${stop}'
        + "</bpmn:conditionExpression></bpmn:sequenceFlow>"
    )


def _run_a(definition: ProcessDefinition, state: dict[str, Any], **variables: object) -> Step:
    """Complete the running handler A with ``variables`` (A then runs again)."""
    call = _pending_call(state)
    return step(definition, state, HandlerCompleted(call, NOW, {"stop": False, **variables}))


def _pending_call(state: dict[str, Any]) -> str:
    [tid] = [str(tid) for tid, token in state["tk"].items() if token["p"] == "h"]
    return tid


def _cond_waiting(state: dict[str, Any]) -> bool:
    return any(token["n"] == "cond" for token in state["tk"].values())


def test_a_condition_that_holds_on_entering_passes_at_once() -> None:
    definition = model(_beside_a_loop("${ready}"))
    first = start(definition, Start("start", "bk", NOW, {"ready": True}))
    assert not _cond_waiting(first.state)


def test_variable_name_limits_evaluation_to_that_variable() -> None:
    definition = model(_beside_a_loop("${go}", 'camunda:variableName="trigger"'))
    first = start(definition, Start("start", "bk", NOW, {"go": False}))
    assert _cond_waiting(first.state)
    # go turns true, but only a change of 'trigger' makes Camunda look at the condition.
    state = _run_a(definition, first.state, go=True).state
    assert _cond_waiting(state)
    state = _run_a(definition, state, trigger=1).state
    assert not _cond_waiting(state)


def test_an_update_listener_does_not_fire_when_the_variable_is_created() -> None:
    definition = model(_beside_a_loop(GUARDED, 'camunda:variableEvents="update"'))
    first = start(definition, Start("start", "bk", NOW))
    created = _run_a(definition, first.state, ready=True).state
    assert _cond_waiting(created)  # 'ready' was created: no update event
    updated = _run_a(definition, created, ready=True).state
    assert not _cond_waiting(updated)


def test_a_create_listener_fires_on_creation() -> None:
    definition = model(_beside_a_loop(GUARDED, 'camunda:variableEvents="create"'))
    first = start(definition, Start("start", "bk", NOW))
    assert not _cond_waiting(_run_a(definition, first.state, ready=True).state)


def test_a_change_of_another_variable_does_not_evaluate_a_variable_name_condition() -> None:
    """A step that changes no variable evaluates no condition, even one that would now hold
    for another reason (here: a variable the handler result leaves untouched)."""
    definition = model(_beside_a_loop("${go}", 'camunda:variableName="go"'))
    first = start(definition, Start("start", "bk", NOW, {"go": False}))
    call = _pending_call(first.state)
    stopped = step(definition, first.state, HandlerCompleted(call, NOW, {"stop": True}))
    assert _cond_waiting(stopped.state)


def test_unknown_variable_events_are_refused_at_load() -> None:
    with pytest.raises(ProcessModelError, match="variableEvents change"):
        model(_beside_a_loop("${go}", 'camunda:variableEvents="change"'))


def _gateway_model() -> str:
    return (
        START
        + '<bpmn:parallelGateway id="fork"/>'
        + '<bpmn:eventBasedGateway id="gw"/>'
        + _conditional("cond", "${ready}")
        + '<bpmn:intermediateCatchEvent id="late"><bpmn:timerEventDefinition>'
        + "<bpmn:timeDuration>PT1H</bpmn:timeDuration></bpmn:timerEventDefinition>"
        + "</bpmn:intermediateCatchEvent>"
        + '<bpmn:intermediateCatchEvent id="msg"><bpmn:messageEventDefinition messageRef="go"/>'
        + "</bpmn:intermediateCatchEvent>"
        + '<bpmn:serviceTask id="a" camunda:class="A"/>'
        + '<bpmn:serviceTask id="on_cond" camunda:class="OnCond"/>'
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/><bpmn:endEvent id="e3"/>'
        + '<bpmn:endEvent id="e4"/>'
        + flow("f1", "s", "fork")
        + flow("f2", "fork", "gw")
        + flow("f3", "fork", "a")
        + flow("f4", "gw", "cond")
        + flow("f5", "gw", "late")
        + flow("f6", "gw", "msg")
        + flow("f7", "cond", "on_cond")
        + flow("f8", "on_cond", "e1")
        + flow("f9", "late", "e2")
        + flow("f10", "msg", "e3")
        + flow("f11", "a", "e4")
    )


def test_conditional_event_after_an_event_based_gateway_wins_on_a_variable_change() -> None:
    definition = model(_gateway_model(), extra='<bpmn:message id="go" name="go"/>')
    first = start(definition, Start("start", "bk", NOW, {"ready": False}))
    [timer] = [e for e in first.effects if isinstance(e, StartTimer)]
    [a] = [e for e in first.effects if isinstance(e, CallHandler)]
    fired = step(definition, first.state, HandlerCompleted(a.token, NOW, {"ready": True}))
    assert CancelTimer(timer.timer_id) in fired.effects
    assert [e.element_id for e in fired.effects if isinstance(e, CallHandler)] == ["on_cond"]
    # The message behind the same gateway is no longer awaited.
    assert not any(t.get("p") == "w" for t in fired.state["tk"].values())


def test_conditional_event_after_an_event_based_gateway_that_holds_wins_at_once() -> None:
    definition = model(_gateway_model(), extra='<bpmn:message id="go" name="go"/>')
    first = start(definition, Start("start", "bk", NOW, {"ready": True}))
    assert not [e for e in first.effects if isinstance(e, StartTimer)]
    assert sorted(e.element_id for e in first.effects if isinstance(e, CallHandler)) == [
        "a",
        "on_cond",
    ]


def test_the_message_behind_the_gateway_still_wins_while_the_condition_is_false() -> None:
    definition = model(_gateway_model(), extra='<bpmn:message id="go" name="go"/>')
    first = start(definition, Start("start", "bk", NOW, {"ready": False}))
    [timer] = [e for e in first.effects if isinstance(e, StartTimer)]
    got = step(definition, first.state, MessageReceived("go", NOW))
    assert CancelTimer(timer.timer_id) in got.effects
    [a] = [e for e in first.effects if isinstance(e, CallHandler)]
    # Later changes find no conditional wait any more.
    after = step(definition, got.state, HandlerCompleted(a.token, NOW, {"ready": True}))
    assert after.state["st"] == "done"
    assert not [e for e in after.effects if isinstance(e, CallHandler)]


def test_a_condition_on_a_variable_not_set_yet_waits_as_camunda() -> None:
    """Camunda's tryEvaluate takes an unknown variable as false: the event waits, also behind
    an event-based gateway, and fires once the variable is set and true."""
    definition = model(_beside_a_loop("${ready}"))
    first = start(definition, Start("start", "bk", NOW))
    assert first.state["st"] == "run"
    assert _cond_waiting(first.state)
    assert not _cond_waiting(_run_a(definition, first.state, ready=True).state)
    gateway = model(_gateway_model(), extra='<bpmn:message id="go" name="go"/>')
    waiting = start(gateway, Start("start", "bk", NOW))
    assert waiting.state["st"] == "run"
    [a] = [e for e in waiting.effects if isinstance(e, CallHandler)]
    fired = step(gateway, waiting.state, HandlerCompleted(a.token, NOW, {"ready": True}))
    assert [e.element_id for e in fired.effects if isinstance(e, CallHandler)] == ["on_cond"]
