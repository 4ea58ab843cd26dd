"""Sequence-flow structure checked at load, rule by rule as Camunda 7's ``BpmnParse`` does it.

Refused models must name the file, the line and the element; the structures Camunda accepts
(sometimes with a warning) must load, and run as Camunda runs them.
"""

from __future__ import annotations

import pytest

from dsf_bridge.engine import DsfValidationError, ProcessDefinition, load_process, start, step
from dsf_bridge.engine.events import CallHandler, HandlerCompleted, ProcessCompleted, Start
from dsf_bridge.engine.structure import check_structure, structure_warnings
from tests.engine.bpmn import NOW, START, flow, model, process_xml

REPLY = '<bpmn:message id="reply" name="reply"/>\n'


def _service(ident: str, handler: str) -> str:
    return f'<bpmn:serviceTask id="{ident}" camunda:class="{handler}"/>'


def _body(*elements: str) -> str:
    """One element per line, so every element has a line of its own."""
    return "\n".join(elements)


def _line_of(body: str, text: str) -> int:
    """The line of ``text`` in the document :func:`process_xml` builds around ``body``."""
    for number, line in enumerate(process_xml(body).decode().splitlines(), start=1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not in the model")


def _refused(body: str, *, extra: str = "") -> DsfValidationError:
    with pytest.raises(DsfValidationError) as caught:
        model(body, extra=extra)
    return caught.value


def _run(definition: ProcessDefinition, variables: dict[str, object]) -> list[str]:
    """Start an instance, complete every handler call, return the handlers called in order."""
    result = start(definition, Start("start", "bk", NOW, variables))
    called: list[str] = []
    while True:
        calls = [effect for effect in result.effects if isinstance(effect, CallHandler)]
        if not calls:
            return called
        called.append(calls[0].handler)
        result = step(definition, result.state, HandlerCompleted(calls[0].token, NOW))


# -- refused, as BpmnParse.validateExclusiveGateway ------------------------------------------


def test_exclusive_gateway_without_outgoing_flows_is_refused() -> None:
    body = _body(START, '<bpmn:exclusiveGateway id="g"/>', flow("f1", "s", "g"))
    error = _refused(body)
    assert error.line == _line_of(body, 'id="g"')
    assert error.message == (
        f'inline.bpmn:{error.line}: <bpmn:exclusiveGateway id="g">: '
        "exclusive gateway has no outgoing flows"
    )


def test_exclusive_gateway_whose_only_flow_has_a_condition_is_refused() -> None:
    body = _body(
        START,
        '<bpmn:exclusiveGateway id="g"/>',
        '<bpmn:endEvent id="e"/>',
        flow("f1", "s", "g"),
        flow("f2", "g", "e", "${x == 1}"),
    )
    error = _refused(body)
    assert error.line == _line_of(body, 'id="g"')
    assert error.detail == (
        "<bpmn:exclusiveGateway id=\"g\">: the only outgoing flow 'f2' of an exclusive gateway "
        "must not have a condition"
    )


def test_default_flow_with_a_condition_is_refused() -> None:
    body = _body(
        START,
        '<bpmn:exclusiveGateway id="g" default="f3"/>',
        '<bpmn:endEvent id="e1"/>',
        '<bpmn:endEvent id="e2"/>',
        flow("f1", "s", "g"),
        flow("f2", "g", "e1", "${x == 1}"),
        flow("f3", "g", "e2", "${x == 2}"),
    )
    error = _refused(body)
    assert error.line == _line_of(body, 'id="g"')
    assert error.detail == (
        "<bpmn:exclusiveGateway id=\"g\">: outgoing flow 'f3' is the default flow but has a "
        "condition too"
    )


def test_unconditional_flow_beside_the_default_is_refused() -> None:
    body = _body(
        START,
        '<bpmn:exclusiveGateway id="g" default="f3"/>',
        '<bpmn:endEvent id="e1"/>',
        '<bpmn:endEvent id="e2"/>',
        flow("f1", "s", "g"),
        flow("f2", "g", "e1"),
        flow("f3", "g", "e2"),
    )
    error = _refused(body)
    assert error.line == _line_of(body, 'id="g"')
    assert error.detail == (
        "<bpmn:exclusiveGateway id=\"g\">: outgoing flow 'f2' has no condition and is not the "
        "default flow"
    )


def test_two_unconditional_flows_without_default_are_refused_each() -> None:
    body = _body(
        START,
        '<bpmn:exclusiveGateway id="g"/>',
        '<bpmn:endEvent id="e1"/>',
        '<bpmn:endEvent id="e2"/>',
        '<bpmn:endEvent id="e3"/>',
        flow("f1", "s", "g"),
        flow("f2", "g", "e1"),
        flow("f3", "g", "e2", "${x == 1}"),
        flow("f4", "g", "e3"),
    )
    error = _refused(body)
    assert error.line == _line_of(body, 'id="g"')
    # All problems joined, as Camunda lists every parse error of a deployment.
    assert "'f2' has no condition and is not the default flow; " in error.detail
    assert error.detail.endswith("'f4' has no condition and is not the default flow")
    assert "'f3'" not in error.detail


# -- refused, as BpmnParse.parseEventBasedGateway and parseSequenceFlow ----------------------


def test_event_based_gateway_followed_by_a_receive_task_is_refused() -> None:
    body = _body(
        START,
        '<bpmn:eventBasedGateway id="g"/>',
        '<bpmn:receiveTask id="r" messageRef="reply"/>',
        '<bpmn:intermediateCatchEvent id="t"><bpmn:timerEventDefinition>'
        "<bpmn:timeDuration>PT1H</bpmn:timeDuration></bpmn:timerEventDefinition>"
        "</bpmn:intermediateCatchEvent>",
        '<bpmn:endEvent id="e"/>',
        flow("f1", "s", "g"),
        flow("f2", "g", "r"),
        flow("f3", "g", "t"),
        flow("f4", "r", "e"),
        flow("f5", "t", "e"),
    )
    error = _refused(body, extra=REPLY)
    assert error.line == _line_of(body, 'id="g"')
    assert error.detail == (
        '<bpmn:eventBasedGateway id="g">: an event-based gateway can only be connected to '
        "intermediateCatchEvent elements, flow 'f2' leads to bpmn:receiveTask 'r'"
    )


def test_async_after_on_an_event_based_gateway_is_refused() -> None:
    timer = (
        '<bpmn:intermediateCatchEvent id="{}"><bpmn:timerEventDefinition>'
        "<bpmn:timeDuration>PT1H</bpmn:timeDuration></bpmn:timerEventDefinition>"
        "</bpmn:intermediateCatchEvent>"
    )
    body = _body(
        START,
        '<bpmn:eventBasedGateway id="g" camunda:asyncAfter="true"/>',
        timer.format("t1"),
        timer.format("t2"),
        '<bpmn:endEvent id="e"/>',
        flow("f1", "s", "g"),
        flow("f2", "g", "t1"),
        flow("f3", "g", "t2"),
        flow("f4", "t1", "e"),
        flow("f5", "t2", "e"),
    )
    error = _refused(body)
    assert error.line == _line_of(body, 'id="g"')
    assert error.detail == (
        '<bpmn:eventBasedGateway id="g">: camunda:asyncAfter is not supported on event-based '
        "gateways"
    )


def test_another_incoming_flow_into_a_catch_event_after_an_event_gateway_is_refused() -> None:
    body = _body(
        START,
        '<bpmn:eventBasedGateway id="g"/>',
        '<bpmn:intermediateCatchEvent id="m"><bpmn:messageEventDefinition messageRef="reply"/>'
        "</bpmn:intermediateCatchEvent>",
        '<bpmn:intermediateCatchEvent id="t"><bpmn:timerEventDefinition>'
        "<bpmn:timeDuration>PT1H</bpmn:timeDuration></bpmn:timerEventDefinition>"
        "</bpmn:intermediateCatchEvent>",
        _service("a", "A"),
        '<bpmn:endEvent id="e"/>',
        flow("f1", "s", "g"),
        flow("f2", "g", "m"),
        flow("f3", "g", "t"),
        flow("f4", "t", "a"),
        flow("f5", "a", "m"),
        flow("f6", "m", "e"),
    )
    error = _refused(body, extra=REPLY)
    assert error.line == _line_of(body, 'id="f5"')
    assert error.detail == (
        "<bpmn:sequenceFlow id=\"f5\">: invalid incoming flow into intermediateCatchEvent 'm', "
        "which is connected to an event-based gateway"
    )


def test_structure_problems_follow_the_dsf_rules_in_one_message() -> None:
    xml = process_xml(
        _body(START, '<bpmn:exclusiveGateway id="g"/>', flow("f1", "s", "g")), key="nounderscore"
    )
    with pytest.raises(DsfValidationError) as caught:
        load_process(xml, "inline.bpmn", resource_version="1.0")
    assert caught.value.line is None  # the first problem, the process id, has no line
    assert "does not match <domainWithoutDots>_<name>; " in caught.value.detail
    assert caught.value.detail.endswith("exclusive gateway has no outgoing flows")


# -- accepted by Camunda ---------------------------------------------------------------------


def _one_unconditional(first: str) -> ProcessDefinition:
    flows = [flow("fu", "g", "a"), flow("fc", "g", "b", "${x == 1}")]
    if first == "conditional":
        flows.reverse()
    return model(
        _body(
            START,
            '<bpmn:exclusiveGateway id="g"/>',
            _service("a", "A"),
            _service("b", "B"),
            '<bpmn:endEvent id="e"/>',
            flow("f1", "s", "g"),
            *flows,
            flow("f2", "a", "e"),
            flow("f3", "b", "e"),
        )
    )


def test_single_unconditional_non_default_flow_loads_with_camundas_warning() -> None:
    definition = _one_unconditional("unconditional")
    check_structure(definition)  # no error
    [warning] = structure_warnings(definition)
    assert warning.startswith('inline.bpmn:4: <bpmn:exclusiveGateway id="g">: outgoing flow')
    assert "We assume it to be the default flow" in warning
    assert 'better set default="fu"' in warning


def test_single_unconditional_flow_is_taken_in_document_order_as_camunda() -> None:
    # ExclusiveGatewayActivityBehavior.doLeave takes the first flow, in document order, that has
    # no condition (and is not the default) or whose condition is true: first in the document,
    # the unconditional flow wins even over a true condition; last, it acts as a default.
    unconditional_first = _one_unconditional("unconditional")
    assert _run(unconditional_first, {"x": 1}) == ["A"]
    conditional_first = _one_unconditional("conditional")
    assert _run(conditional_first, {"x": 1}) == ["B"]
    assert _run(conditional_first, {"x": 2}) == ["A"]


def test_exclusive_gateway_with_one_unconditional_flow_loads_without_warning() -> None:
    definition = model(
        _body(
            START,
            '<bpmn:exclusiveGateway id="g"/>',
            _service("a", "A"),
            '<bpmn:endEvent id="e"/>',
            flow("f1", "s", "g"),
            flow("f2", "g", "a"),
            flow("f3", "a", "e"),
        )
    )
    assert structure_warnings(definition) == []
    assert _run(definition, {}) == ["A"]


def test_start_event_without_outgoing_flow_loads_and_ends_the_instance() -> None:
    # Camunda: no parse check; at run time "No outgoing sequence flow found for activity 's'.
    # Ending execution." (BpmnBehaviorLogger 003), so the instance completes at once.
    definition = model(START)
    result = start(definition, Start("start", "bk", NOW))
    assert isinstance(result.effects[-1], ProcessCompleted)
    assert result.state["st"] == "done"


def test_parallel_gateway_without_outgoing_flow_ends_only_its_path() -> None:
    definition = model(
        _body(
            START,
            '<bpmn:parallelGateway id="fork"/>',
            '<bpmn:parallelGateway id="dead"/>',
            _service("a", "A"),
            '<bpmn:endEvent id="e"/>',
            flow("f1", "s", "fork"),
            flow("f2", "fork", "dead"),
            flow("f3", "fork", "a"),
            flow("f4", "a", "e"),
        )
    )
    first = start(definition, Start("start", "bk", NOW))
    [call] = [effect for effect in first.effects if isinstance(effect, CallHandler)]
    assert call.handler == "A"
    assert first.state["st"] != "done"
    done = step(definition, first.state, HandlerCompleted(call.token, NOW))
    assert isinstance(done.effects[-1], ProcessCompleted)


def _unreachable_join() -> ProcessDefinition:
    return model(
        _body(
            START,
            _service("orphan", "O"),
            '<bpmn:parallelGateway id="join"/>',
            _service("a", "A"),
            '<bpmn:endEvent id="e"/>',
            flow("f1", "s", "join"),
            flow("f2", "orphan", "join"),
            flow("f3", "join", "a"),
            flow("f4", "a", "e"),
        )
    )


def test_parallel_join_with_an_unreachable_incoming_flow_loads() -> None:
    definition = _unreachable_join()
    assert structure_warnings(definition) == []
    result = start(definition, Start("start", "bk", NOW))
    # The join never gets its second arrival: nothing after it runs.
    assert not [effect for effect in result.effects if isinstance(effect, CallHandler)]


def test_parallel_join_with_an_unreachable_incoming_flow_keeps_the_instance_waiting() -> None:
    """Camunda keeps the arrived execution, inactive, at the join: the instance stays open."""
    result = start(_unreachable_join(), Start("start", "bk", NOW))
    assert [token["p"] for token in result.state["tk"].values()] == ["j"]
    assert result.state["st"] == "run"
    assert not [effect for effect in result.effects if isinstance(effect, ProcessCompleted)]
