"""The BPMN engine for DSF process plugins: safe parsing, validation, the interpreter.

Pure: given a process definition, an instance state and an event, it returns the new state and
the effects to perform. No I/O, no SQL, no HTTP (enforced by import-linter). Module map:

- :mod:`~dsf_bridge.engine.safexml` reads XML without DTDs, entities or network;
- :mod:`~dsf_bridge.engine.parser` turns BPMN into :mod:`~dsf_bridge.engine.model` structures;
- :mod:`~dsf_bridge.engine.validation` applies the DSF plugin rules;
- :mod:`~dsf_bridge.engine.interpreter` runs instances (:mod:`~dsf_bridge.engine.events`);
- :mod:`~dsf_bridge.engine.state` is how everyone else reads an instance state (status,
  tokens, what it waits for, incidents) and loads stored ones;
- :mod:`~dsf_bridge.engine.correlation` matches incoming Tasks to waiting executions;
- :mod:`~dsf_bridge.engine.expressions` and :mod:`~dsf_bridge.engine.timers` evaluate JUEL
  and ISO 8601.
"""

from __future__ import annotations

from dsf_bridge.engine.correlation import (
    MessageSubscription,
    SignalWait,
    correlate,
    message_subscriptions,
    signal_waits,
)
from dsf_bridge.engine.exceptions import (
    CorrelationError,
    DsfValidationError,
    ModelError,
    NoOutgoingFlowError,
    StateError,
    UnsafeXmlError,
    UnsupportedElementError,
)
from dsf_bridge.engine.interpreter import STATE_VERSION, Step, start, step
from dsf_bridge.engine.model import ProcessDefinition
from dsf_bridge.engine.parser import BpmnDocument, parse_bpmn, parse_bpmn_file
from dsf_bridge.engine.validation import validate_document, validate_process

__all__ = [
    "STATE_VERSION",
    "BpmnDocument",
    "CorrelationError",
    "DsfValidationError",
    "MessageSubscription",
    "ModelError",
    "NoOutgoingFlowError",
    "ProcessDefinition",
    "SignalWait",
    "StateError",
    "Step",
    "UnsafeXmlError",
    "UnsupportedElementError",
    "correlate",
    "load_process",
    "message_subscriptions",
    "parse_bpmn",
    "parse_bpmn_file",
    "signal_waits",
    "start",
    "step",
    "validate_document",
    "validate_process",
]


def load_process(data: bytes, source: str, *, resource_version: str) -> ProcessDefinition:
    """Parse and validate one BPMN file whose placeholders are already replaced."""
    return validate_document(parse_bpmn(data, source), resource_version)
