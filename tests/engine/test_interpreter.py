"""Interpreter semantics on small inline models: gateways, multi-instance, boundaries, retries,
conditional and signal events, failures, and the state contract (version, purity, JSON)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import pytest

from dsf_bridge.engine import STATE_VERSION, CorrelationError, start, step
from dsf_bridge.engine.events import (
    CallHandler,
    CancelTimer,
    CancelUserTask,
    CreateQuestionnaireResponse,
    FailTasks,
    HandlerCompleted,
    HandlerFailed,
    JobDue,
    MessageReceived,
    ProcessCompleted,
    SignalReceived,
    Start,
    StartTimer,
    TimerFired,
)
from dsf_bridge.errors import ProcessExecutionError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry
from dsf_bridge.runtime.testing import ProcessHarness
from tests.engine.bpmn import NOW, START, flow, model


def _service(ident: str, handler: str, attrs: str = "", inner: str = "") -> str:
    return (
        f'<bpmn:serviceTask id="{ident}" camunda:class="{handler}" {attrs}>'
        f"{inner}</bpmn:serviceTask>"
    )


def _handlers(calls: list[str], **values: object) -> HandlerRegistry:
    registry = HandlerRegistry()
    for name in ("A", "B", "C", "D"):

        def _record(ctx: HandlerContext, name: str = name) -> None:
            calls.append(name)
            if name in values:
                ctx.set(name.lower(), values[name])

        registry.register(name, "service", _record)
    return registry


def test_parallel_fork_and_join() -> None:
    definition = model(
        START
        + '<bpmn:parallelGateway id="fork"/><bpmn:parallelGateway id="join"/>'
        + _service("a", "A")
        + _service("b", "B")
        + _service("c", "C")
        + '<bpmn:endEvent id="e"/>'
        + flow("f1", "s", "fork")
        + flow("f2", "fork", "a")
        + flow("f3", "fork", "b")
        + flow("f4", "a", "join")
        + flow("f5", "b", "join")
        + flow("f6", "join", "c")
        + flow("f7", "c", "e")
    )
    first = start(definition, Start("start", "bk", NOW))
    calls = [effect for effect in first.effects if isinstance(effect, CallHandler)]
    assert [call.handler for call in calls] == ["A", "B"]
    after_a = step(definition, first.state, HandlerCompleted(calls[0].token, NOW))
    assert after_a.effects == ()
    assert after_a.state["j"] == {"0:join": 1}
    after_b = step(definition, after_a.state, HandlerCompleted(calls[1].token, NOW))
    c_call = after_b.effects[0]
    assert isinstance(c_call, CallHandler)
    assert c_call.handler == "C"
    done = step(definition, after_b.state, HandlerCompleted(c_call.token, NOW))
    assert isinstance(done.effects[-1], ProcessCompleted)
    assert done.state["st"] == "done"


def test_step_does_not_modify_the_given_state() -> None:
    definition = model(
        START
        + _service("a", "A")
        + '<bpmn:endEvent id="e"/>'
        + flow("f1", "s", "a")
        + flow("f2", "a", "e")
    )
    first = start(definition, Start("start", "bk", NOW, {"x": {"nested": [1]}}))
    frozen = copy.deepcopy(first.state)
    call = first.effects[0]
    assert isinstance(call, CallHandler)
    step(definition, first.state, HandlerCompleted(call.token, NOW, {"x": 2}, {"y": 3}))
    assert first.state == frozen


def test_sequential_multi_instance_on_a_task() -> None:
    definition = model(
        START
        + _service(
            "a",
            "A",
            inner='<bpmn:multiInstanceLoopCharacteristics isSequential="true" '
            'camunda:collection="${items}" camunda:elementVariable="item"/>',
        )
        + _service("b", "B")
        + '<bpmn:endEvent id="e"/>'
        + flow("f1", "s", "a")
        + flow("f2", "a", "b")
        + flow("f3", "b", "e")
    )
    result = start(definition, Start("start", "bk", NOW, {"items": ["x", "y", "z"]}))
    seen = []
    while True:
        calls = [effect for effect in result.effects if isinstance(effect, CallHandler)]
        assert len(calls) == 1  # sequential: one instance at a time
        call = calls[0]
        if call.handler == "B":
            break
        seen.append((call.variables["item"], call.variables["loopCounter"]))
        result = step(definition, result.state, HandlerCompleted(call.token, NOW))
    assert seen == [("x", 0), ("y", 1), ("z", 2)]


def test_empty_multi_instance_collection_skips_the_activity() -> None:
    definition = model(
        START
        + _service(
            "a",
            "A",
            inner='<bpmn:multiInstanceLoopCharacteristics camunda:collection="${items}" '
            'camunda:elementVariable="item"/>',
        )
        + '<bpmn:endEvent id="e"/>'
        + flow("f1", "s", "a")
        + flow("f2", "a", "e")
    )
    result = start(definition, Start("start", "bk", NOW, {"items": []}))
    assert result.state["st"] == "done"


def test_exclusive_gateway_without_a_true_condition_fails_the_instance() -> None:
    definition = model(
        START
        + '<bpmn:exclusiveGateway id="g"/><bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "g")
        + flow("f2", "g", "e1", "${x == 1}")
        + flow("f3", "g", "e2", "${x == 2}")
    )
    result = start(definition, Start("start", "bk", NOW, {"x": 3}))
    assert result.state["st"] == "failed"
    failure = result.effects[0]
    assert isinstance(failure, FailTasks)
    assert "No outgoing sequence flow of exclusive gateway 'g'" in failure.message


def test_unset_variable_in_condition_fails_with_its_name() -> None:
    definition = model(
        START
        + '<bpmn:exclusiveGateway id="g" default="f3"/><bpmn:endEvent id="e1"/>'
        + '<bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "g")
        + flow("f2", "g", "e1", "${missing}")
        + flow("f3", "g", "e2")
    )
    result = start(definition, Start("start", "bk", NOW))
    assert result.state["st"] == "failed"
    assert any(
        isinstance(effect, FailTasks) and "'missing'" in effect.message for effect in result.effects
    )


def test_interrupting_timer_boundary_cancels_a_user_task() -> None:
    definition = model(
        START
        + '<bpmn:userTask id="u" camunda:formKey="http://x.org/fhir/Questionnaire/q|1.0"/>'
        + '<bpmn:boundaryEvent id="late" attachedToRef="u"><bpmn:timerEventDefinition>'
        + "<bpmn:timeDuration>PT1H</bpmn:timeDuration></bpmn:timerEventDefinition>"
        + "</bpmn:boundaryEvent>"
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "u")
        + flow("f2", "u", "e1")
        + flow("f3", "late", "e2")
    )
    first = start(definition, Start("start", "bk", NOW))
    timer = next(effect for effect in first.effects if isinstance(effect, StartTimer))
    assert timer.due == NOW + timedelta(hours=1)
    assert any(isinstance(effect, CreateQuestionnaireResponse) for effect in first.effects)
    fired = step(definition, first.state, TimerFired(timer.timer_id, timer.due))
    assert any(isinstance(effect, CancelUserTask) for effect in fired.effects)
    assert fired.state["st"] == "done"
    # The same timer firing again (a runtime race) changes nothing.
    again = step(definition, first.state | {"st": "run"}, TimerFired("nope/x/1", timer.due))
    assert again.effects == ()


def test_a_user_task_whose_form_cannot_be_created_fails_the_instance_as_dsf() -> None:
    """DSF's DefaultUserTaskListener: no Questionnaire, no user task; the instance fails and
    its Tasks with it, with DSF's "has fatal error in step" text."""
    definition = model(
        START
        + '<bpmn:userTask id="u" camunda:formKey="http://x.org/fhir/Questionnaire/q|1.0"/>'
        + '<bpmn:endEvent id="e1"/>'
        + flow("f1", "s", "u")
        + flow("f2", "u", "e1")
    )
    first = start(definition, Start("start", "bk", NOW))
    [create] = [e for e in first.effects if isinstance(e, CreateQuestionnaireResponse)]
    # A failure that is not the user task's own (a late one for work the token left behind)
    # and one for another element change nothing.
    for stale in (
        HandlerFailed(create.token, NOW, None, "Sending Task request failed"),
        HandlerFailed(create.token, NOW, None, "no form", user_task="elsewhere"),
    ):
        assert step(definition, first.state, stale).state["st"] == "run"
    failed = step(
        definition,
        first.state,
        HandlerFailed(
            create.token, NOW, None, "Could not find Questionnaire resource", user_task="u"
        ),
    )
    assert failed.state["st"] == "failed"
    [fail] = [e for e in failed.effects if isinstance(e, FailTasks)]
    assert fail.message.endswith(
        "has fatal error in step u, reason: Could not find Questionnaire resource"
    )


def test_signal_and_conditional_catch_events() -> None:
    definition = model(
        START
        + '<bpmn:parallelGateway id="fork"/>'
        + '<bpmn:intermediateCatchEvent id="sig"><bpmn:signalEventDefinition signalRef="go"/>'
        + "</bpmn:intermediateCatchEvent>"
        + '<bpmn:intermediateCatchEvent id="cond"><bpmn:conditionalEventDefinition>'
        + '<bpmn:condition xsi:type="bpmn:tFormalExpression">${ready}</bpmn:condition>'
        + "</bpmn:conditionalEventDefinition></bpmn:intermediateCatchEvent>"
        + _service("a", "A")
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "fork")
        + flow("f2", "fork", "sig")
        + flow("f3", "fork", "cond")
        + flow("f4", "sig", "a")
        + flow("f5", "a", "e1")
        + flow("f6", "cond", "e2"),
        extra='<bpmn:signal id="go" name="go-signal"/>',
    )
    first = start(definition, Start("start", "bk", NOW, {"ready": False}))
    assert first.effects == ()
    signalled = step(definition, first.state, SignalReceived("go-signal", NOW))
    call = signalled.effects[0]
    assert isinstance(call, CallHandler)
    # The handler makes the condition true: the conditional event fires in the same step.
    done = step(definition, signalled.state, HandlerCompleted(call.token, NOW, {"ready": True}))
    assert done.state["st"] == "done"


def test_error_end_event_in_subprocess_is_caught_by_its_boundary() -> None:
    definition = model(
        START
        + '<bpmn:subProcess id="sub"><bpmn:startEvent id="ss"/>'
        + '<bpmn:endEvent id="boom"><bpmn:errorEventDefinition errorRef="err"/></bpmn:endEvent>'
        + flow("sf", "ss", "boom")
        + "</bpmn:subProcess>"
        + '<bpmn:boundaryEvent id="caught" attachedToRef="sub"><bpmn:errorEventDefinition '
        + 'errorRef="err" camunda:errorCodeVariable="code"/></bpmn:boundaryEvent>'
        + _service("a", "A")
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "sub")
        + flow("f2", "sub", "e1")
        + flow("f3", "caught", "a")
        + flow("f4", "a", "e2"),
        extra='<bpmn:error id="err" name="err" errorCode="E42"/>',
    )
    first = start(definition, Start("start", "bk", NOW))
    call = first.effects[0]
    assert isinstance(call, CallHandler)
    assert call.element_id == "a"
    assert call.variables["code"] == "E42"
    assert first.state["sc"] == {}


def test_state_is_json_and_versioned() -> None:
    definition = model(
        START
        + _service("a", "A")
        + '<bpmn:endEvent id="e"/>'
        + flow("f1", "s", "a")
        + flow("f2", "a", "e")
    )
    first = start(definition, Start("start", "bk", NOW))
    assert json.loads(json.dumps(first.state)) == first.state
    assert first.state["v"] == STATE_VERSION
    with pytest.raises(ProcessExecutionError, match="Unsupported instance state version 99"):
        step(definition, first.state | {"v": 99}, JobDue("1", NOW))
    with pytest.raises(ProcessExecutionError, match="given with definition"):
        step(definition, first.state | {"k": "other_process"}, JobDue("1", NOW))
    with pytest.raises(ProcessExecutionError, match="finish on the version they began on"):
        step(definition, first.state | {"vt": "0.9"}, JobDue("1", NOW))
    broken = first.state | {"tk": {"1": {"n": "gone", "s": 0, "p": "h"}}}
    with pytest.raises(ProcessExecutionError, match="element 'gone'"):
        step(definition, broken, JobDue("1", NOW))


def test_unknown_start_message_is_a_correlation_error() -> None:
    definition = model(START + '<bpmn:endEvent id="e"/>' + flow("f1", "s", "e"))
    with pytest.raises(CorrelationError, match="no message start event for 'other'"):
        start(definition, Start("other", "bk", NOW))


def test_message_to_an_ended_instance_is_refused() -> None:
    definition = model(START + '<bpmn:endEvent id="e"/>' + flow("f1", "s", "e"))
    done = start(definition, Start("start", "bk", NOW))
    assert done.state["st"] == "done"
    with pytest.raises(CorrelationError, match="Unable to correlate Task t1"):
        step(definition, done.state, MessageReceived("m", NOW, task_id="t1"))


def test_event_based_gateway_message_cancels_the_timer() -> None:
    definition = model(
        START
        + '<bpmn:eventBasedGateway id="g"/>'
        + '<bpmn:intermediateCatchEvent id="msg"><bpmn:messageEventDefinition messageRef="reply"/>'
        + "</bpmn:intermediateCatchEvent>"
        + '<bpmn:intermediateCatchEvent id="tmo"><bpmn:timerEventDefinition><bpmn:timeDate>'
        + "2026-05-02T00:00:00Z</bpmn:timeDate></bpmn:timerEventDefinition>"
        + "</bpmn:intermediateCatchEvent>"
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "g")
        + flow("f2", "g", "msg")
        + flow("f3", "g", "tmo")
        + flow("f4", "msg", "e1")
        + flow("f5", "tmo", "e2"),
        extra='<bpmn:message id="reply" name="reply"/>',
    )
    first = start(definition, Start("start", "bk", NOW))
    timer = first.effects[0]
    assert isinstance(timer, StartTimer)
    assert timer.due == datetime(2026, 5, 2, tzinfo=UTC)
    done = step(definition, first.state, MessageReceived("reply", NOW, variables={"r": 1}))
    assert done.effects[0] == CancelTimer(timer.timer_id)
    assert done.state["vars"]["r"] == 1
    assert done.state["st"] == "done"


async def test_the_harness_refuses_a_missing_handler_as_deployment_does() -> None:
    definition = model(
        START
        + _service("a", "Missing")
        + '<bpmn:endEvent id="e"/>'
        + flow("f1", "s", "a")
        + flow("f2", "a", "e")
    )
    with pytest.raises(ProcessExecutionError, match="does not register: Missing"):
        async with ProcessHarness([definition], HandlerRegistry()):
            pass
    # Stubs instead: the step that reaches one fails, as a handler that raises does.
    async with ProcessHarness([definition], HandlerRegistry(), stub_missing=True) as harness:
        instance = await harness.start("testorg_test", "start", business_key="bk")
        assert instance.status == "failed"
        assert "handler Missing is a stub of the test harness" in harness.task_status["bk"]


def test_non_interrupting_timer_boundary_runs_alongside() -> None:
    definition = model(
        START
        + _service("a", "A")
        + '<bpmn:boundaryEvent id="remind" attachedToRef="a" cancelActivity="false">'
        + "<bpmn:timerEventDefinition><bpmn:timeDuration>PT10M</bpmn:timeDuration>"
        + "</bpmn:timerEventDefinition></bpmn:boundaryEvent>"
        + _service("b", "B")
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "a")
        + flow("f2", "a", "e1")
        + flow("f3", "remind", "b")
        + flow("f4", "b", "e2")
    )
    first = start(definition, Start("start", "bk", NOW))
    timer = next(effect for effect in first.effects if isinstance(effect, StartTimer))
    fired = step(definition, first.state, TimerFired(timer.timer_id, timer.due))
    reminder = fired.effects[0]
    assert isinstance(reminder, CallHandler)
    assert reminder.handler == "B"
    task_a = next(effect for effect in first.effects if isinstance(effect, CallHandler))
    # The activity is still running: its handler result is accepted.
    after_a = step(definition, fired.state, HandlerCompleted(task_a.token, NOW))
    assert after_a.state["st"] == "run"
    done = step(definition, after_a.state, HandlerCompleted(reminder.token, NOW))
    assert done.state["st"] == "done"


async def test_async_handlers_run_in_the_harness() -> None:
    definition = model(
        START
        + _service("a", "A")
        + '<bpmn:endEvent id="e"/>'
        + flow("f1", "s", "a")
        + flow("f2", "a", "e")
    )
    handlers = HandlerRegistry()

    @handlers.service("A")
    async def handler(ctx: HandlerContext) -> None:
        ctx.set("ran", "async")

    async with ProcessHarness([definition], handlers) as harness:
        instance = await harness.start("testorg_test", "start", business_key="bk")
        assert instance.status == "completed"
        assert instance.variables["ran"] == "async"


def test_input_parameters_are_local_and_outputs_reach_the_scope() -> None:
    io = (
        "<bpmn:extensionElements><camunda:inputOutput>"
        '<camunda:inputParameter name="greeting">${name}</camunda:inputParameter>'
        '<camunda:inputParameter name="fixed">constant</camunda:inputParameter>'
        '<camunda:outputParameter name="done">yes</camunda:outputParameter>'
        "</camunda:inputOutput>"
        '<camunda:executionListener class="L" event="end"/>'
        "</bpmn:extensionElements>"
    )
    definition = model(
        START
        + _service("a", "A", inner=io)
        + _service("b", "B")
        + '<bpmn:endEvent id="e"/>'
        + flow("f1", "s", "a")
        + flow("f2", "a", "b")
        + flow("f3", "b", "e")
    )
    first = start(definition, Start("start", "bk", NOW, {"name": "Ada"}))
    call = first.effects[0]
    assert isinstance(call, CallHandler)
    assert call.variables["greeting"] == "Ada"
    assert call.variables["fixed"] == "constant"
    done_a = step(definition, first.state, HandlerCompleted(call.token, NOW))
    listener = done_a.effects[0]
    assert isinstance(listener, CallHandler)
    assert (listener.handler, listener.kind, listener.event) == ("L", "listener", "end")
    after_listener = step(definition, done_a.state, HandlerCompleted(listener.token, NOW))
    call_b = after_listener.effects[0]
    assert isinstance(call_b, CallHandler)
    assert call_b.handler == "B"
    assert "greeting" not in call_b.variables  # inputs were local to "a"
    assert after_listener.state["vars"]["done"] == "yes"


def test_sequential_multi_instance_subprocess_gets_its_own_scope() -> None:
    definition = model(
        START
        + '<bpmn:subProcess id="sub"><bpmn:multiInstanceLoopCharacteristics isSequential="true" '
        + 'camunda:collection="${items}" camunda:elementVariable="item"/>'
        + '<bpmn:startEvent id="ss"/>'
        + _service("a", "A")
        + '<bpmn:endEvent id="se"/>'
        + flow("sf1", "ss", "a")
        + flow("sf2", "a", "se")
        + "</bpmn:subProcess>"
        + '<bpmn:endEvent id="e"/>'
        + flow("f1", "s", "sub")
        + flow("f2", "sub", "e")
    )
    result = start(definition, Start("start", "bk", NOW, {"items": [10, 20]}))
    seen = []
    while result.state["st"] == "run":
        call = result.effects[0]
        assert isinstance(call, CallHandler)
        seen.append(call.variables["item"])
        assert len(result.state["sc"]) == 1  # one instance (scope) at a time
        result = step(definition, result.state, HandlerCompleted(call.token, NOW, {}, {"x": 1}))
    assert seen == [10, 20]
    assert "x" not in result.state["vars"]  # local variables died with their scope
    assert result.state["sc"] == {}


def test_long_chains_of_pass_through_nodes_do_not_exhaust_the_stack() -> None:
    count = 2000
    gateways = "".join(f'<bpmn:exclusiveGateway id="g{i}"/>' for i in range(count))
    flows = flow("f-start", "s", "g0") + "".join(
        flow(f"f{i}", f"g{i}", f"g{i + 1}") for i in range(count - 1)
    )
    definition = model(
        START + gateways + '<bpmn:endEvent id="e"/>' + flows + flow("f-end", f"g{count - 1}", "e")
    )
    result = start(definition, Start("start", "bk", NOW))
    assert result.state["st"] == "done"
