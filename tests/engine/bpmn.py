"""Small inline BPMN documents for engine unit tests."""

from __future__ import annotations

from dsf_bridge.engine import ProcessDefinition, load_process

__all__ = ["model", "process_xml"]

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
