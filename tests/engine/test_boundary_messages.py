"""Message boundary events as Camunda 7 runs them, on small models of our own.

Interrupting: the message cancels the activity with everything below it (subprocess tokens,
multi-instance executions, their timers and user tasks) and the instance leaves by the boundary
event. Non-interrupting: the activity goes on, a new execution leaves by the boundary event, and
the subscription stays for further messages while the activity runs.
"""

from __future__ import annotations

import pytest

from dsf_bridge.engine import CorrelationError, start, step
from dsf_bridge.engine.events import (
    CallHandler,
    CancelTimer,
    CancelUserTask,
    CreateQuestionnaireResponse,
    HandlerCompleted,
    HandlerFailed,
    MessageReceived,
    Start,
    StartTimer,
)
from tests.engine.bpmn import NOW, START, flow, model

MESSAGES = '<bpmn:message id="stop" name="stop"/><bpmn:message id="reply" name="reply"/>'
FORM = 'camunda:formKey="http://x.org/fhir/Questionnaire/q|1.0"'


def _boundary(ident: str, attached: str, *, interrupting: bool = True) -> str:
    cancel = "" if interrupting else ' cancelActivity="false"'
    return (
        f'<bpmn:boundaryEvent id="{ident}" attachedToRef="{attached}"{cancel}>'
        '<bpmn:messageEventDefinition messageRef="stop"/></bpmn:boundaryEvent>'
    )


def _calls(effects: tuple[object, ...]) -> list[CallHandler]:
    return [effect for effect in effects if isinstance(effect, CallHandler)]


def test_interrupting_message_on_a_user_task_cancels_it_and_takes_the_boundary_path() -> None:
    definition = model(
        START
        + f'<bpmn:userTask id="u" {FORM}/>'
        + _boundary("stopped", "u")
        + '<bpmn:serviceTask id="cleanup" camunda:class="Cleanup"/>'
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "u")
        + flow("f2", "u", "e1")
        + flow("f3", "stopped", "cleanup")
        + flow("f4", "cleanup", "e2"),
        extra=MESSAGES,
    )
    first = start(definition, Start("start", "bk", NOW))
    [create] = [e for e in first.effects if isinstance(e, CreateQuestionnaireResponse)]
    stopped = step(definition, first.state, MessageReceived("stop", NOW, variables={"why": "x"}))
    assert CancelUserTask(create.token, "u") in stopped.effects
    [cleanup] = _calls(stopped.effects)
    assert cleanup.element_id == "cleanup"
    assert cleanup.variables["why"] == "x"
    # A new execution leaves by the boundary event: the user task's execution is gone.
    assert cleanup.token != create.token
    assert create.token not in stopped.state["tk"]
    # The subscription ended with the activity: a second message correlates to nothing.
    with pytest.raises(CorrelationError):
        step(definition, stopped.state, MessageReceived("stop", NOW))
    done = step(definition, stopped.state, HandlerCompleted(cleanup.token, NOW))
    assert done.state["st"] == "done"


def test_non_interrupting_message_fires_each_time_while_the_activity_runs() -> None:
    definition = model(
        START
        + '<bpmn:serviceTask id="work" camunda:class="Work"/>'
        + _boundary("note", "work", interrupting=False)
        + '<bpmn:serviceTask id="log" camunda:class="Log"/>'
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "work")
        + flow("f2", "work", "e1")
        + flow("f3", "note", "log")
        + flow("f4", "log", "e2"),
        extra=MESSAGES,
    )
    first = start(definition, Start("start", "bk", NOW))
    [work] = _calls(first.effects)
    once = step(definition, first.state, MessageReceived("stop", NOW))
    twice = step(definition, once.state, MessageReceived("stop", NOW))
    [log1] = _calls(once.effects)
    [log2] = _calls(twice.effects)
    assert (log1.element_id, log2.element_id) == ("log", "log")
    assert log1.token != log2.token
    # The activity was never interrupted: its handler's result is taken.
    after = step(definition, twice.state, HandlerCompleted(work.token, NOW))
    assert after.state["st"] == "run"
    # Once the activity has ended, the boundary no longer listens.
    with pytest.raises(CorrelationError):
        step(definition, after.state, MessageReceived("stop", NOW))
    state = step(definition, after.state, HandlerCompleted(log1.token, NOW)).state
    assert step(definition, state, HandlerCompleted(log2.token, NOW)).state["st"] == "done"


def test_a_cancelled_handlers_late_result_never_reaches_the_boundary_path() -> None:
    definition = model(
        START
        + '<bpmn:serviceTask id="work" camunda:class="Work"/>'
        + _boundary("stopped", "work")
        + '<bpmn:serviceTask id="cleanup" camunda:class="Cleanup"/>'
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "work")
        + flow("f2", "work", "e1")
        + flow("f3", "stopped", "cleanup")
        + flow("f4", "cleanup", "e2"),
        extra=MESSAGES,
    )
    first = start(definition, Start("start", "bk", NOW))
    [work] = _calls(first.effects)
    stopped = step(definition, first.state, MessageReceived("stop", NOW))
    [cleanup] = _calls(stopped.effects)
    assert cleanup.element_id == "cleanup"
    for late in (
        HandlerCompleted(work.token, NOW, {"x": 1}),
        HandlerFailed(work.token, NOW, None, "boom"),
    ):
        result = step(definition, stopped.state, late)
        assert result.state == stopped.state
        assert result.effects == ()


def test_interrupting_message_on_a_receive_task_beats_its_own_message() -> None:
    definition = model(
        START
        + '<bpmn:receiveTask id="wait" messageRef="reply"/>'
        + _boundary("stopped", "wait")
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "wait")
        + flow("f2", "wait", "e1")
        + flow("f3", "stopped", "e2"),
        extra=MESSAGES,
    )
    first = start(definition, Start("start", "bk", NOW))
    stopped = step(definition, first.state, MessageReceived("stop", NOW))
    assert stopped.state["st"] == "done"
    with pytest.raises(CorrelationError):
        step(definition, stopped.state, MessageReceived("reply", NOW))
    # The other way round: the receive task's own message ends its boundary subscription.
    replied = step(definition, first.state, MessageReceived("reply", NOW))
    assert replied.state["st"] == "done"


def test_interrupting_message_on_a_subprocess_cancels_inner_timers_and_user_tasks() -> None:
    definition = model(
        START
        + '<bpmn:subProcess id="sub"><bpmn:startEvent id="ss"/>'
        + '<bpmn:parallelGateway id="fork"/>'
        + f'<bpmn:userTask id="u" {FORM}/>'
        + '<bpmn:intermediateCatchEvent id="t"><bpmn:timerEventDefinition>'
        + "<bpmn:timeDuration>PT1H</bpmn:timeDuration></bpmn:timerEventDefinition>"
        + "</bpmn:intermediateCatchEvent>"
        + '<bpmn:parallelGateway id="join"/><bpmn:endEvent id="se"/>'
        + flow("g1", "ss", "fork")
        + flow("g2", "fork", "u")
        + flow("g3", "fork", "t")
        + flow("g4", "u", "join")
        + flow("g5", "t", "join")
        + flow("g6", "join", "se")
        + "</bpmn:subProcess>"
        + _boundary("stopped", "sub")
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "sub")
        + flow("f2", "sub", "e1")
        + flow("f3", "stopped", "e2"),
        extra=MESSAGES,
    )
    first = start(definition, Start("start", "bk", NOW))
    [timer] = [e for e in first.effects if isinstance(e, StartTimer)]
    [create] = [e for e in first.effects if isinstance(e, CreateQuestionnaireResponse)]
    stopped = step(definition, first.state, MessageReceived("stop", NOW))
    assert CancelTimer(timer.timer_id) in stopped.effects
    assert CancelUserTask(create.token, "u") in stopped.effects
    assert stopped.state["st"] == "done"
    assert stopped.state["sc"] == {}


def test_interrupting_message_on_a_multi_instance_body_cancels_every_instance() -> None:
    definition = model(
        START
        + '<bpmn:subProcess id="sub">'
        + '<bpmn:multiInstanceLoopCharacteristics camunda:collection="${targets}" '
        + 'camunda:elementVariable="target"/>'
        + '<bpmn:startEvent id="ss"/>'
        + f'<bpmn:userTask id="u" {FORM}/>'
        + '<bpmn:boundaryEvent id="late" attachedToRef="u"><bpmn:timerEventDefinition>'
        + "<bpmn:timeDuration>PT1H</bpmn:timeDuration></bpmn:timerEventDefinition>"
        + '</bpmn:boundaryEvent><bpmn:endEvent id="se"/><bpmn:endEvent id="se2"/>'
        + flow("g1", "ss", "u")
        + flow("g2", "u", "se")
        + flow("g3", "late", "se2")
        + "</bpmn:subProcess>"
        + _boundary("stopped", "sub")
        + '<bpmn:serviceTask id="after" camunda:class="After"/>'
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "sub")
        + flow("f2", "sub", "e1")
        + flow("f3", "stopped", "after")
        + flow("f4", "after", "e2"),
        extra=MESSAGES,
    )
    first = start(definition, Start("start", "bk", NOW, {"targets": ["a", "b", "c"]}))
    timers = [e for e in first.effects if isinstance(e, StartTimer)]
    creates = [e for e in first.effects if isinstance(e, CreateQuestionnaireResponse)]
    assert len(timers) == len(creates) == 3
    # Only the body subscribes, once: one message, one boundary path.
    stopped = step(definition, first.state, MessageReceived("stop", NOW))
    assert {e.timer_id for e in stopped.effects if isinstance(e, CancelTimer)} == {
        t.timer_id for t in timers
    }
    assert {e.token for e in stopped.effects if isinstance(e, CancelUserTask)} == {
        c.token for c in creates
    }
    [after] = _calls(stopped.effects)
    assert after.element_id == "after"
    assert [t["n"] for t in stopped.state["tk"].values()] == ["after"]
    assert stopped.state["sc"] == {}


def test_message_boundary_correlates_by_the_local_correlation_key() -> None:
    """DSF correlates a Task's correlation-key with localVariableEquals: the waiting execution's
    own variable. A key the execution only inherits from the process does not match."""
    definition = model(
        START
        + '<bpmn:subProcess id="sub">'
        + '<bpmn:multiInstanceLoopCharacteristics camunda:collection="${targets}" '
        + 'camunda:elementVariable="correlationKey"/>'
        + '<bpmn:startEvent id="ss"/><bpmn:receiveTask id="wait" messageRef="reply"/>'
        + '<bpmn:endEvent id="se"/>'
        + flow("g1", "ss", "wait")
        + flow("g2", "wait", "se")
        + "</bpmn:subProcess>"
        + '<bpmn:receiveTask id="top" messageRef="stop"/>'
        + '<bpmn:parallelGateway id="fork"/><bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "fork")
        + flow("f2", "fork", "sub")
        + flow("f3", "fork", "top")
        + flow("f4", "sub", "e1")
        + flow("f5", "top", "e2"),
        extra=MESSAGES,
    )
    first = start(
        definition, Start("start", "bk", NOW, {"targets": ["k1", "k2"], "correlationKey": "p"})
    )
    # Each multi-instance execution has its own key in its scope.
    one = step(definition, first.state, MessageReceived("reply", NOW, correlation_key="k2"))
    waiting = [t for t in one.state["tk"].values() if t.get("p") == "w" and t["n"] == "wait"]
    assert len(waiting) == 1
    # The process-level key "p" is local to the top-level execution only, so it correlates
    # there and not inside the subprocesses.
    top = step(definition, one.state, MessageReceived("stop", NOW, correlation_key="p"))
    assert not any(t["n"] == "top" for t in top.state["tk"].values())
    with pytest.raises(CorrelationError):
        step(definition, one.state, MessageReceived("reply", NOW, correlation_key="p"))


def test_a_boundary_on_a_subprocess_correlates_by_the_subprocess_own_key() -> None:
    """An input parameter correlationKey of the subprocess is its own execution's variable:
    the message boundary on it correlates by it."""
    definition = model(
        START
        + '<bpmn:subProcess id="sub"><bpmn:extensionElements><camunda:inputOutput>'
        + '<camunda:inputParameter name="correlationKey">k-sub</camunda:inputParameter>'
        + "</camunda:inputOutput></bpmn:extensionElements>"
        + '<bpmn:startEvent id="ss"/><bpmn:receiveTask id="wait" messageRef="reply"/>'
        + '<bpmn:endEvent id="se"/>'
        + flow("g1", "ss", "wait")
        + flow("g2", "wait", "se")
        + "</bpmn:subProcess>"
        + _boundary("stopped", "sub")
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "sub")
        + flow("f2", "sub", "e1")
        + flow("f3", "stopped", "e2"),
        extra=MESSAGES,
    )
    first = start(definition, Start("start", "bk", NOW))
    with pytest.raises(CorrelationError):
        step(definition, first.state, MessageReceived("stop", NOW, correlation_key="other"))
    stopped = step(definition, first.state, MessageReceived("stop", NOW, correlation_key="k-sub"))
    assert stopped.state["st"] == "done"
