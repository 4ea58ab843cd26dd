"""DSF message correlation over many instances: business key, then correlation key."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dsf_bridge.engine import (
    CorrelationError,
    MessageSubscription,
    correlate,
    message_subscriptions,
    start,
)
from dsf_bridge.engine.events import Start
from tests.engine.bpmn import model

NOW = datetime(2026, 1, 1, tzinfo=UTC)
WAITING = (
    '<bpmn:startEvent id="s"><bpmn:messageEventDefinition messageRef="start"/></bpmn:startEvent>'
    '<bpmn:intermediateCatchEvent id="wait"><bpmn:messageEventDefinition messageRef="reply"/>'
    '</bpmn:intermediateCatchEvent><bpmn:endEvent id="e"/>'
    '<bpmn:sequenceFlow id="f1" sourceRef="s" targetRef="wait"/>'
    '<bpmn:sequenceFlow id="f2" sourceRef="wait" targetRef="e"/>'
)


def _instances() -> list[tuple[str, list[MessageSubscription]]]:
    definition = model(WAITING, extra='<bpmn:message id="reply" name="reply"/>')
    states = {
        "one": start(definition, Start("start", "bk-1", NOW, {"correlationKey": "a"})).state,
        "two": start(definition, Start("start", "bk-1", NOW, {"correlationKey": "b"})).state,
        "three": start(definition, Start("start", "bk-2", NOW)).state,
    }
    return [(name, list(message_subscriptions(state))) for name, state in states.items()]


def test_subscriptions_list_message_business_and_correlation_key() -> None:
    subscriptions = dict(_instances())
    first = subscriptions["one"][0]
    assert first.message_name == "reply"
    assert first.business_key == "bk-1"
    assert first.correlation_key == "a"
    assert first.element_id == "wait"
    assert subscriptions["three"][0].correlation_key is None


def test_business_key_alone_when_unique() -> None:
    instance, subscription = correlate(
        _instances(),
        message_name="reply",
        business_key="bk-2",
        correlation_key=None,
    )
    assert instance == "three"
    assert subscription.element_id == "wait"


def test_correlation_key_picks_one_of_several() -> None:
    instance, _ = correlate(
        _instances(),
        message_name="reply",
        business_key="bk-1",
        correlation_key="b",
    )
    assert instance == "two"


@pytest.mark.parametrize(
    ("business_key", "correlation_key", "count"),
    [("bk-1", None, 2), ("bk-1", "zzz", 0), ("bk-9", None, 0)],
)
def test_zero_or_two_matches_cannot_correlate(
    business_key: str, correlation_key: str | None, count: int
) -> None:
    with pytest.raises(CorrelationError, match=f"Unable to correlate Task task-7: {count} waiting"):
        correlate(
            _instances(),
            message_name="reply",
            business_key=business_key,
            correlation_key=correlation_key,
            task_id="task-7",
        )


def test_wrong_message_name_does_not_match() -> None:
    with pytest.raises(CorrelationError, match="0 waiting"):
        correlate(
            _instances(),
            message_name="other",
            business_key="bk-2",
            correlation_key=None,
        )


def _nested(catch_in: str) -> list[tuple[str, list[MessageSubscription]]]:
    """An outer subprocess that sets ``correlationKey`` as its input, with the message catch
    either directly in it (``outer``) or in an inner subprocess (``inner``)."""
    catch = (
        '<bpmn:intermediateCatchEvent id="wait"><bpmn:messageEventDefinition messageRef="reply"/>'
        "</bpmn:intermediateCatchEvent>"
    )
    inner_body = '<bpmn:startEvent id="is"/><bpmn:endEvent id="ie"/>'
    inner_flows = '<bpmn:sequenceFlow id="if1" sourceRef="is" targetRef="ie"/>'
    outer_body = '<bpmn:startEvent id="os"/><bpmn:endEvent id="oe"/>'
    outer_flows = ""
    if catch_in == "inner":
        inner_body += catch
        inner_flows = (
            '<bpmn:sequenceFlow id="if1" sourceRef="is" targetRef="wait"/>'
            '<bpmn:sequenceFlow id="if2" sourceRef="wait" targetRef="ie"/>'
        )
        outer_flows = (
            '<bpmn:sequenceFlow id="of1" sourceRef="os" targetRef="inner"/>'
            '<bpmn:sequenceFlow id="of2" sourceRef="inner" targetRef="oe"/>'
        )
        outer_body += f'<bpmn:subProcess id="inner">{inner_body}{inner_flows}</bpmn:subProcess>'
    else:
        outer_body += catch
        outer_flows = (
            '<bpmn:sequenceFlow id="of1" sourceRef="os" targetRef="wait"/>'
            '<bpmn:sequenceFlow id="of2" sourceRef="wait" targetRef="oe"/>'
        )
    definition = model(
        '<bpmn:startEvent id="s"><bpmn:messageEventDefinition messageRef="start"/>'
        '</bpmn:startEvent><bpmn:subProcess id="outer"><bpmn:extensionElements>'
        '<camunda:inputOutput><camunda:inputParameter name="correlationKey">k-outer'
        "</camunda:inputParameter></camunda:inputOutput></bpmn:extensionElements>"
        f"{outer_body}{outer_flows}</bpmn:subProcess><bpmn:endEvent id='e'/>"
        '<bpmn:sequenceFlow id="f1" sourceRef="s" targetRef="outer"/>'
        '<bpmn:sequenceFlow id="f2" sourceRef="outer" targetRef="e"/>',
        extra='<bpmn:message id="reply" name="reply"/>',
    )
    state = start(definition, Start("start", "bk-n", NOW)).state
    return [("nested", message_subscriptions(state))]


def test_correlation_key_of_the_immediate_scope_correlates() -> None:
    instances = _nested("outer")
    assert [s.correlation_key for s in instances[0][1]] == ["k-outer"]
    instance, _ = correlate(
        instances, message_name="reply", business_key="bk-n", correlation_key="k-outer"
    )
    assert instance == "nested"


def test_correlation_key_of_an_outer_scope_does_not_correlate() -> None:
    # Camunda's localVariableEquals sees the waiting execution's own variables only: the
    # token waits in the inner subprocess, the key is a local of the outer one.
    instances = _nested("inner")
    assert [s.correlation_key for s in instances[0][1]] == [None]
    with pytest.raises(CorrelationError, match="0 waiting executions"):
        correlate(instances, message_name="reply", business_key="bk-n", correlation_key="k-outer")
    # Without a correlation key the business key alone still finds it.
    instance, _ = correlate(
        instances, message_name="reply", business_key="bk-n", correlation_key=None
    )
    assert instance == "nested"
