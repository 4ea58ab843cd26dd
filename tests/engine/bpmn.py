"""Small inline BPMN documents for engine unit tests."""

from __future__ import annotations

from datetime import UTC, datetime

from dsf_bridge.engine import ProcessDefinition, load_process

__all__ = ["NOW", "START", "flow", "model", "process_xml"]

NOW = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
"""The clock reading the engine tests step with."""
START = (
    '<bpmn:startEvent id="s"><bpmn:messageEventDefinition messageRef="start"/></bpmn:startEvent>'
)
"""A message start event for the message ``start`` that :func:`process_xml` declares."""

HEAD = (
    '<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL" '
    'xmlns:camunda="http://camunda.org/schema/1.0/bpmn" '
    'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" id="defs">\n'
)


def process_xml(body: str, *, extra: str = "", key: str = "testorg_test") -> bytes:
    """A definitions document with one executable process around ``body``."""
    return (
        HEAD
        + f'<bpmn:process id="{key}" isExecutable="true" camunda:versionTag="1.0">\n'
        + body
        + "\n</bpmn:process>\n"
        + '<bpmn:message id="start" name="start"/>\n'
        + extra
        + "</bpmn:definitions>\n"
    ).encode()


def model(body: str, *, extra: str = "") -> ProcessDefinition:
    return load_process(process_xml(body, extra=extra), "inline.bpmn", resource_version="1.0")


def flow(ident: str, source: str, target: str, condition: str | None = None) -> str:
    """A sequence flow, with a condition expression when ``condition`` is given."""
    if condition is None:
        return f'<bpmn:sequenceFlow id="{ident}" sourceRef="{source}" targetRef="{target}"/>'
    return (
        f'<bpmn:sequenceFlow id="{ident}" sourceRef="{source}" targetRef="{target}">'
        f'<bpmn:conditionExpression xsi:type="bpmn:tFormalExpression">{condition}'
        "</bpmn:conditionExpression></bpmn:sequenceFlow>"
    )
