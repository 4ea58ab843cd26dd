"""What happens when something fails, as Camunda 7 does it, where DSF changes it as DSF does.

- A handler that raises is fatal, as DSF's delegate wrappers make it: the instance's Tasks
  fail with "Process <key> has fatal error in step <element>, reason: <message>", no retry.
- An engine error (an expression, a gateway without a way on) in a step a job started undoes
  that step; the job is retried per ``failedJobRetryTimeCycle`` (``R3`` = three tries in all,
  no cycle = three at once), then parked as an incident that an operator retries or cancels.
- An engine error in a step a Task's message started undoes the step: the instance keeps
  waiting and the Task fails (``RolledBackError``).
- A BPMN error nobody catches ends its execution as a none end event would.
- A path that loops without a wait state stops at a bound with an incident naming the loop.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from dsf_bridge.engine import start, step
from dsf_bridge.engine.events import (
    CallHandler,
    CompleteTasks,
    FailTasks,
    HandlerCompleted,
    HandlerFailed,
    IncidentRetried,
    InstanceCancelled,
    JobDue,
    MessageReceived,
    ScheduleJob,
    Start,
    StartTimer,
    TimerFired,
    UserTaskCompleted,
)
from dsf_bridge.engine.exceptions import RolledBackError
from dsf_bridge.errors import ProcessExecutionError
from tests.engine.bpmn import NOW, START, flow, model

MESSAGES = '<bpmn:message id="go" name="go"/>'


def _calls(effects: tuple[object, ...]) -> list[CallHandler]:
    return [effect for effect in effects if isinstance(effect, CallHandler)]


# -- handlers that raise ------------------------------------------------------------------------


def test_a_raising_handler_is_fatal_at_once_even_at_an_async_element_with_retries() -> None:
    definition = model(
        START
        + '<bpmn:serviceTask id="a" camunda:class="A" camunda:asyncBefore="true">'
        + "<bpmn:extensionElements><camunda:failedJobRetryTimeCycle>R3/PT5S"
        + "</camunda:failedJobRetryTimeCycle></bpmn:extensionElements></bpmn:serviceTask>"
        + '<bpmn:endEvent id="e"/>'
        + flow("f1", "s", "a")
        + flow("f2", "a", "e")
    )
    first = start(definition, Start("start", "bk", NOW))
    [job] = first.effects
    assert isinstance(job, ScheduleJob)
    running = step(definition, first.state, JobDue(job.token, NOW))
    [call] = _calls(running.effects)
    failed = step(definition, running.state, HandlerFailed(call.token, NOW, None, "boom"))
    assert failed.state["st"] == "failed"
    assert not [e for e in failed.effects if isinstance(e, ScheduleJob)]
    [fail] = [e for e in failed.effects if isinstance(e, FailTasks)]
    assert fail.message == "Process testorg_test has fatal error in step a, reason: boom"


# -- BPMN errors nobody catches -----------------------------------------------------------------


def test_an_uncaught_bpmn_error_ends_its_execution_like_a_none_end_event() -> None:
    definition = model(
        START
        + '<bpmn:parallelGateway id="fork"/>'
        + '<bpmn:serviceTask id="a" camunda:class="A"/>'
        + '<bpmn:serviceTask id="after_a" camunda:class="AfterA"/>'
        + '<bpmn:receiveTask id="wait" messageRef="go"/>'
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "fork")
        + flow("f2", "fork", "a")
        + flow("f3", "fork", "wait")
        + flow("f4", "a", "after_a")
        + flow("f5", "after_a", "e1")
        + flow("f6", "wait", "e2"),
        extra=MESSAGES,
    )
    first = start(definition, Start("start", "bk", NOW))
    [a] = _calls(first.effects)
    erred = step(definition, first.state, HandlerFailed(a.token, NOW, "E1", "bad input"))
    # That path ends where it is (after_a never runs); the other goes on.
    assert erred.state["st"] == "run"
    assert not _calls(erred.effects)
    assert [t["n"] for t in erred.state["tk"].values()] == ["wait"]
    done = step(definition, erred.state, MessageReceived("go", NOW))
    assert done.state["st"] == "done"
    assert any(isinstance(e, CompleteTasks) for e in done.effects)


def test_an_uncaught_error_end_event_completes_its_subprocess_which_goes_on() -> None:
    definition = model(
        START
        + '<bpmn:subProcess id="sub"><bpmn:startEvent id="ss"/>'
        + '<bpmn:endEvent id="boom"><bpmn:errorEventDefinition errorRef="err"/></bpmn:endEvent>'
        + flow("g1", "ss", "boom")
        + "</bpmn:subProcess>"
        + '<bpmn:serviceTask id="next" camunda:class="Next"/><bpmn:endEvent id="e"/>'
        + flow("f1", "s", "sub")
        + flow("f2", "sub", "next")
        + flow("f3", "next", "e"),
        extra='<bpmn:error id="err" name="err" errorCode="E9"/>',
    )
    first = start(definition, Start("start", "bk", NOW))
    assert [c.element_id for c in _calls(first.effects)] == ["next"]


def test_an_uncaught_error_in_a_multi_instance_ends_that_instance_only() -> None:
    definition = model(
        START
        + '<bpmn:serviceTask id="a" camunda:class="A">'
        + '<bpmn:multiInstanceLoopCharacteristics camunda:collection="${items}" '
        + 'camunda:elementVariable="item"/></bpmn:serviceTask>'
        + '<bpmn:serviceTask id="after" camunda:class="After"/><bpmn:endEvent id="e"/>'
        + flow("f1", "s", "a")
        + flow("f2", "a", "after")
        + flow("f3", "after", "e")
    )
    first = start(definition, Start("start", "bk", NOW, {"items": [1, 2]}))
    one, two = _calls(first.effects)
    state = step(definition, first.state, HandlerFailed(one.token, NOW, "E1", "x")).state
    assert state["st"] == "run"
    last = step(definition, state, HandlerCompleted(two.token, NOW))
    assert [c.element_id for c in _calls(last.effects)] == ["after"]


def test_error_code_variable_is_set_as_set_variable_and_outlives_the_subprocess() -> None:
    definition = model(
        START
        + '<bpmn:subProcess id="outer"><bpmn:startEvent id="os"/>'
        + '<bpmn:subProcess id="inner"><bpmn:startEvent id="is"/>'
        + '<bpmn:serviceTask id="a" camunda:class="A"/><bpmn:endEvent id="ie"/>'
        + flow("h1", "is", "a")
        + flow("h2", "a", "ie")
        + "</bpmn:subProcess>"
        + '<bpmn:boundaryEvent id="caught" attachedToRef="inner"><bpmn:errorEventDefinition '
        + 'camunda:errorCodeVariable="code" camunda:errorMessageVariable="why"/>'
        + '</bpmn:boundaryEvent><bpmn:endEvent id="oe"/><bpmn:endEvent id="oe2"/>'
        + flow("g1", "os", "inner")
        + flow("g2", "inner", "oe")
        + flow("g3", "caught", "oe2")
        + "</bpmn:subProcess>"
        + '<bpmn:serviceTask id="report" camunda:class="Report"/><bpmn:endEvent id="e"/>'
        + flow("f1", "s", "outer")
        + flow("f2", "outer", "report")
        + flow("f3", "report", "e")
    )
    first = start(definition, Start("start", "bk", NOW))
    [a] = _calls(first.effects)
    caught = step(definition, first.state, HandlerFailed(a.token, NOW, "E7", "refused"))
    [report] = _calls(caught.effects)
    # Both subprocesses have ended; the variables live on the process instance.
    assert report.variables["code"] == "E7"
    assert report.variables["why"] == "refused"
    assert caught.state["vars"]["code"] == "E7"


# -- engine errors: rolled back, retried, incidents ---------------------------------------------


def _job_model(cycle: str = "R3/PT5S") -> str:
    retry = (
        f"<bpmn:extensionElements><camunda:failedJobRetryTimeCycle>{cycle}"
        "</camunda:failedJobRetryTimeCycle></bpmn:extensionElements>"
        if cycle
        else ""
    )
    return (
        START
        + '<bpmn:parallelGateway id="fork"/>'
        + '<bpmn:exclusiveGateway id="choose" camunda:asyncBefore="true">'
        + retry
        + "</bpmn:exclusiveGateway>"
        + '<bpmn:serviceTask id="a" camunda:class="A"/>'
        + '<bpmn:receiveTask id="wait" messageRef="go"/>'
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/><bpmn:endEvent id="e3"/>'
        + flow("f1", "s", "fork")
        + flow("f2", "fork", "choose")
        + flow("f3", "fork", "wait")
        + flow("f4", "choose", "a", "${mode == 'run'}")
        + flow("f7", "choose", "e3", "${mode == 'skip'}")
        + flow("f5", "a", "e1")
        + flow("f6", "wait", "e2")
    )


def test_an_engine_error_in_a_job_is_retried_per_cycle_then_becomes_an_incident() -> None:
    definition = model(_job_model(), extra=MESSAGES)
    first = start(definition, Start("start", "bk", NOW, {"mode": "idle"}))
    [job] = [e for e in first.effects if isinstance(e, ScheduleJob)]
    state, now, dues = first.state, NOW, []
    for _ in range(2):  # R3: the first try and two retries, 5 s apart
        result = step(definition, state, JobDue(job.token, now))
        [again] = result.effects
        assert isinstance(again, ScheduleJob)
        assert "choose" in [t["n"] for t in result.state["tk"].values()]
        dues.append(again.due - now)
        state, now = result.state, again.due
    assert dues == [timedelta(seconds=5)] * 2
    parked = step(definition, state, JobDue(job.token, now))
    assert parked.effects == ()
    assert parked.state["st"] == "run"
    [incident] = [t["x"] for t in parked.state["tk"].values() if "x" in t]
    assert incident["e"] == "choose"
    assert "exclusive gateway 'choose'" in incident["m"]
    # A late JobDue changes nothing; the other branch goes on.
    assert step(definition, parked.state, JobDue(job.token, now)).effects == ()
    went_on = step(definition, parked.state, MessageReceived("go", now, variables={"mode": "run"}))
    assert went_on.state["st"] == "run"
    # An operator retries it with new tries: now it takes its way on.
    with pytest.raises(ProcessExecutionError, match="at least 1"):
        step(definition, went_on.state, IncidentRetried(job.token, now, 0))
    retried = step(definition, went_on.state, IncidentRetried(job.token, now, 2))
    assert retried.effects == (ScheduleJob(job.token, "choose", now, 1),)
    ran = step(definition, retried.state, JobDue(job.token, now))
    assert [c.element_id for c in _calls(ran.effects)] == ["a"]
    with pytest.raises(ProcessExecutionError, match="no incident"):
        step(definition, ran.state, IncidentRetried(job.token, now, 1))


@pytest.mark.parametrize(("cycle", "tries"), [("", 3), ("R0/PT1S", 1), ("PT1S,PT2S", 3)])
def test_tries_in_all_as_camunda_counts_them(cycle: str, tries: int) -> None:
    definition = model(_job_model(cycle), extra=MESSAGES)
    state = start(definition, Start("start", "bk", NOW, {"mode": "idle"})).state
    [token] = [tid for tid, t in state["tk"].items() if t["n"] == "choose"]
    attempts = 0
    while not any("x" in t for t in state["tk"].values()):
        attempts += 1
        state = step(definition, state, JobDue(token, NOW)).state
    assert attempts == tries


def test_an_operator_cancels_an_instance_with_an_incident() -> None:
    definition = model(_job_model("R0/PT1S"), extra=MESSAGES)
    state = start(definition, Start("start", "bk", NOW, {"mode": "idle"})).state
    [token] = [tid for tid, t in state["tk"].items() if t["n"] == "choose"]
    state = step(definition, state, JobDue(token, NOW)).state
    cancelled = step(definition, state, InstanceCancelled(NOW, "cancelled by operator"))
    assert cancelled.state["st"] == "failed"
    assert cancelled.state["tk"] == {}
    [fail] = [e for e in cancelled.effects if isinstance(e, FailTasks)]
    assert fail.message == "cancelled by operator"


def test_an_engine_error_in_a_step_a_message_started_is_rolled_back() -> None:
    definition = model(
        START
        + '<bpmn:receiveTask id="wait" messageRef="go"/>'
        + '<bpmn:exclusiveGateway id="choose"/>'
        + '<bpmn:endEvent id="e"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "wait")
        + flow("f2", "wait", "choose")
        + flow("f3", "choose", "e", "${answer == 'yes'}")
        + flow("f4", "choose", "e2", "${answer == 'maybe'}"),
        extra=MESSAGES,
    )
    first = start(definition, Start("start", "bk", NOW))
    with pytest.raises(RolledBackError, match="exclusive gateway 'choose'"):
        step(definition, first.state, MessageReceived("go", NOW, variables={"answer": "no"}))
    # The instance still waits there: a good message goes through.
    done = step(definition, first.state, MessageReceived("go", NOW, variables={"answer": "yes"}))
    assert done.state["st"] == "done"


# -- loops without a wait state -----------------------------------------------------------------


def test_a_loop_without_a_wait_state_stops_with_an_incident_naming_it() -> None:
    definition = model(
        START
        + '<bpmn:intermediateThrowEvent id="again"/>'
        + '<bpmn:exclusiveGateway id="more" default="back"/>'
        + '<bpmn:endEvent id="e"/>'
        + flow("f1", "s", "again")
        + flow("f2", "again", "more")
        + flow("back", "more", "again")
        + flow("out", "more", "e", "${done}")
    )
    first = start(definition, Start("start", "bk", NOW, {"done": False}))
    assert first.state["st"] == "run"
    [(tid, token)] = first.state["tk"].items()
    assert "again -> more -> again" in token["x"]["m"] or "more -> again -> more" in token["x"]["m"]
    assert re.search(r"stopped after \d{5} steps", token["x"]["m"])
    # Retrying runs the loop again from there (it still loops: a new incident, no spinning).
    retried = step(definition, first.state, IncidentRetried(tid, NOW, 1))
    again = step(definition, retried.state, JobDue(tid, NOW))
    assert "x" in again.state["tk"][tid]


def test_an_engine_error_after_a_completed_user_task_is_rolled_back() -> None:
    """DSF's QuestionnaireResponseHandler completes the user task in one engine call: an error
    in it undoes the call, so the user task stays open (the handler only logs)."""
    definition = model(
        START
        + '<bpmn:userTask id="ask" camunda:formKey="http://x.org/fhir/Questionnaire/q|1.0"/>'
        + '<bpmn:exclusiveGateway id="choose"/>'
        + '<bpmn:endEvent id="e"/><bpmn:endEvent id="e2"/>'
        + flow("f1", "s", "ask")
        + flow("f2", "ask", "choose")
        + flow("f3", "choose", "e", "${answer == 'yes'}")
        + flow("f4", "choose", "e2", "${answer == 'no'}")
    )
    first = start(definition, Start("start", "bk", NOW))
    [token] = first.state["tk"]
    with pytest.raises(RolledBackError, match="'answer'"):
        step(definition, first.state, UserTaskCompleted(token, NOW))
    done = step(definition, first.state, UserTaskCompleted(token, NOW, {"answer": "no"}))
    assert done.state["st"] == "done"


@pytest.mark.parametrize("join", [True, False])
def test_a_loop_through_a_parallel_gateway_stops_too(join: bool) -> None:
    """A fork hands the loop to a new token each round (and a join keeps the last one): the
    bound counts the elements entered, not one token's moves."""
    if join:
        body = (
            '<bpmn:parallelGateway id="join"/>'
            + flow("a1", "fork", "join")
            + flow("a2", "fork", "join")
            + flow("f2", "join", "more")
        )
    else:
        body = flow("a1", "fork", "e") + flow("a2", "fork", "more")
    definition = model(
        START
        + '<bpmn:exclusiveGateway id="merge"/><bpmn:parallelGateway id="fork"/>'
        + '<bpmn:exclusiveGateway id="more" default="back"/><bpmn:endEvent id="e"/>'
        + flow("f0", "s", "merge")
        + flow("f1", "merge", "fork")
        + flow("back", "more", "merge")
        + flow("out", "more", "e", "${done}")
        + body
    )
    first = start(definition, Start("start", "bk", NOW, {"done": False}))
    assert first.state["st"] == "run"
    incidents = [t["x"] for t in first.state["tk"].values() if "x" in t]
    assert incidents
    assert "Path loops without a wait state (" in incidents[0]["m"]
    assert "fork" in incidents[0]["m"]


def test_an_engine_error_after_a_timer_fires_retries_the_timer_then_parks_it() -> None:
    """Camunda's timer jobs retry like any job: the step is undone, the timer fires again (no
    cycle: three tries in all, at once), then an incident; the token still waits there, and an
    operator's retry fires it again."""
    definition = model(
        START
        + '<bpmn:parallelGateway id="fork"/>'
        + '<bpmn:intermediateCatchEvent id="later"><bpmn:timerEventDefinition>'
        + "<bpmn:timeDuration>PT1H</bpmn:timeDuration></bpmn:timerEventDefinition>"
        + "</bpmn:intermediateCatchEvent>"
        + '<bpmn:exclusiveGateway id="choose"/>'
        + '<bpmn:receiveTask id="wait" messageRef="go"/>'
        + '<bpmn:endEvent id="e1"/><bpmn:endEvent id="e2"/><bpmn:endEvent id="e3"/>'
        + flow("f1", "s", "fork")
        + flow("f2", "fork", "later")
        + flow("f3", "fork", "wait")
        + flow("f4", "later", "choose")
        + flow("f5", "choose", "e1", "${mode == 'a'}")
        + flow("f6", "choose", "e2", "${mode == 'b'}")
        + flow("f7", "wait", "e3"),
        extra=MESSAGES,
    )
    first = start(definition, Start("start", "bk", NOW))
    [timer] = [e for e in first.effects if isinstance(e, StartTimer)]
    state, fired, ids = first.state, timer, []
    for _ in range(2):
        result = step(definition, state, TimerFired(fired.timer_id, fired.due))
        assert result.error is not None and "'mode'" in result.error
        [fired] = [e for e in result.effects if isinstance(e, StartTimer)]
        ids.append(fired.timer_id)
        state = result.state
    assert len(set(ids)) == 2 and timer.timer_id not in ids
    parked = step(definition, state, TimerFired(fired.timer_id, fired.due))
    assert parked.effects == ()
    [(tid, token)] = [(k, t) for k, t in parked.state["tk"].items() if "x" in t]
    assert token["n"] == "later" and token["p"] == "w"
    went_on = step(definition, parked.state, MessageReceived("go", NOW, variables={"mode": "b"}))
    retried = step(definition, went_on.state, IncidentRetried(tid, NOW, 1))
    [again] = [e for e in retried.effects if isinstance(e, StartTimer)]
    assert again.due == NOW
    done = step(definition, retried.state, TimerFired(again.timer_id, NOW))
    assert done.state["st"] == "done"
