"""Errors of the engine, refining the two engine branches of :mod:`dsf_bridge.errors`::

ProcessModelError
└── ModelError                 carries the file (``source``) and ``line`` when known
    ├── UnsafeXmlError         DOCTYPE, entities, oversized or malformed XML
    ├── UnsupportedElementError  an element or attribute outside the DSF subset
    └── DsfValidationError     breaks a DSF plugin rule (process id, versionTag, send fields)
ProcessExecutionError
├── CorrelationError           a message matched zero or several waiting executions
├── RolledBackError            a step a Task started failed: undone, the Task fails with it
├── NoOutgoingFlowError        an exclusive gateway found no condition true and no default
└── StateError                 a stored instance state this engine cannot read (version, shape)
"""

from __future__ import annotations

from dsf_bridge.errors import ProcessExecutionError, ProcessModelError

__all__ = [
    "CorrelationError",
    "DsfValidationError",
    "ModelError",
    "NoOutgoingFlowError",
    "RolledBackError",
    "StateError",
    "UnsafeXmlError",
    "UnsupportedElementError",
]


class ModelError(ProcessModelError):
    """A problem in one model file; the message starts with ``file:line:`` when known."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None):
        prefix = ""
        if source is not None:
            prefix = f"{source}:{line}: " if line is not None else f"{source}: "
        super().__init__(prefix + message, retryable=False)
        self.source = source
        self.line = line
        self.detail = message


class UnsafeXmlError(ModelError):
    """The XML is malformed, too large, or uses DTD features we never process."""


class UnsupportedElementError(ModelError):
    """The model uses a BPMN element or Camunda extension the engine does not execute."""


class DsfValidationError(ModelError):
    """The model breaks a rule the DSF BPE enforces when it loads a plugin."""


class CorrelationError(ProcessExecutionError):
    """A message could not be correlated to exactly one waiting execution."""


class RolledBackError(ProcessExecutionError):
    """The step a message started failed in the engine (an expression, a gateway): as in
    Camunda, its transaction is rolled back, so the instance stays where it waited, and the
    Task that carried the message fails with this error (DSF's ``TaskHandler``)."""


class NoOutgoingFlowError(ProcessExecutionError):
    """No outgoing sequence flow of an exclusive gateway could be taken."""


class StateError(ProcessExecutionError):
    """An instance state of an unknown schema version, or one that is not a state at all."""
