"""Errors of the engine, refining the two engine branches of :mod:`dsf_bridge.errors`::

ProcessModelError
└── ModelError                 carries the file (``source``) and ``line`` when known
    ├── UnsafeXmlError         DOCTYPE, entities, oversized or malformed XML
    ├── UnsupportedElementError  an element or attribute outside the DSF subset
    └── DsfValidationError     breaks a DSF plugin rule (process id, versionTag, send fields)
ProcessExecutionError
├── CorrelationError           a message matched zero or several waiting executions
└── NoOutgoingFlowError        an exclusive gateway found no condition true and no default
"""

from __future__ import annotations

from dsf_bridge.errors import ProcessExecutionError, ProcessModelError

__all__ = [
    "CorrelationError",
    "DsfValidationError",
    "ModelError",
    "NoOutgoingFlowError",
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


class NoOutgoingFlowError(ProcessExecutionError):
    """No outgoing sequence flow of an exclusive gateway could be taken."""
