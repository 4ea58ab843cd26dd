"""What goes into the interpreter (events) and what comes out of it (effects).

Every event carries ``now``: the engine never reads the clock. Tokens are named by the string
ids the engine gave them in effects (``token``); the runtime hands them back unchanged.
Effects are instructions for the runtime; it performs them after committing the new state.

Events and effects are slotted dataclasses and are never changed after construction; they are
not declared ``frozen`` because frozen dataclasses construct several times slower, and effects
are built on the engine's hot path (see ``bench/engine.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "CallHandler",
    "CancelTimer",
    "CancelUserTask",
    "CompleteTasks",
    "CreateQuestionnaireResponse",
    "Effect",
    "Event",
    "FailTasks",
    "HandlerCompleted",
    "HandlerFailed",
    "IncidentRetried",
    "InstanceCancelled",
    "JobDue",
    "MessageReceived",
    "ProcessCompleted",
    "ProcessFailed",
    "ScheduleJob",
    "SendTask",
    "SignalReceived",
    "Start",
    "StartTimer",
    "ThrowSignal",
    "TimerFired",
    "UserTaskCompleted",
]


# -- events ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Start:
    """Start an instance: by ``message_name`` (a message start event) or the none start event."""

    message_name: str | None
    business_key: str
    now: datetime
    variables: Mapping[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class MessageReceived:
    """A Task for a waiting instance; ``token`` pins the subscription found by correlation."""

    message_name: str
    now: datetime
    correlation_key: str | None = None
    variables: Mapping[str, object] = field(default_factory=dict)
    token: str | None = None
    task_id: str | None = None


@dataclass(slots=True)
class TimerFired:
    timer_id: str
    now: datetime


@dataclass(slots=True)
class SignalReceived:
    signal_name: str
    now: datetime


@dataclass(slots=True)
class HandlerCompleted:
    """A handler (service task, message send, listener) returned normally.

    ``variables`` are set like Camunda's ``setVariable`` (where the name already lives, else on
    the process instance); ``local_variables`` on the execution itself.
    """

    token: str
    now: datetime
    variables: Mapping[str, object] = field(default_factory=dict)
    local_variables: Mapping[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class HandlerFailed:
    """A handler failed: with a BPMN ``error_code`` (catchable by error boundary events) or
    technically (``error_code`` None: retried when the element is async, else the instance fails).
    """

    token: str
    now: datetime
    error_code: str | None = None
    message: str = ""
    variables: Mapping[str, object] = field(default_factory=dict)
    # Set when the failure is the user task's own (its QuestionnaireResponse could not be
    # created): the user task element it concerns, so a stale failure cannot hit a later one.
    user_task: str | None = None


@dataclass(slots=True)
class UserTaskCompleted:
    """The QuestionnaireResponse of a user task came back completed."""

    token: str
    now: datetime
    variables: Mapping[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class JobDue:
    """An async continuation (``asyncBefore``/``asyncAfter`` or a retry) is due."""

    token: str
    now: datetime


@dataclass(slots=True)
class IncidentRetried:
    """An operator gives the job parked in an incident ``retries`` new tries (Camunda's
    ``setJobRetries``): it runs again from where it was parked."""

    token: str
    now: datetime
    retries: int = 1


@dataclass(slots=True)
class InstanceCancelled:
    """An operator cancels the instance (Camunda's ``deleteProcessInstance``): every execution
    ends, and the Tasks it took in are failed with ``reason``."""

    now: datetime
    reason: str


Event = (
    Start
    | MessageReceived
    | TimerFired
    | SignalReceived
    | HandlerCompleted
    | HandlerFailed
    | UserTaskCompleted
    | JobDue
    | IncidentRetried
    | InstanceCancelled
)


# -- effects --------------------------------------------------------------------------------


@dataclass(slots=True)
class CallHandler:
    """Run the Python handler registered for ``handler`` (a ``camunda:class`` name).

    ``kind`` is ``service``, ``listener`` (execution listener, ``event`` start/end) or
    ``task_listener`` (``event`` create). ``variables`` is a snapshot of what the execution sees.
    """

    handler: str
    kind: str
    element_id: str
    token: str
    business_key: str
    variables: Mapping[str, object]
    fields: Mapping[str, object]
    event: str | None = None


@dataclass(slots=True)
class SendTask:
    """Send a Task to another process (send task, message throw or message end event)."""

    handler: str
    element_id: str
    token: str
    business_key: str
    instantiates_canonical: str
    message_name: str
    profile: str
    correlation_key: str | None
    target: Mapping[str, object] | None
    variables: Mapping[str, object]
    fields: Mapping[str, object]


@dataclass(slots=True)
class StartTimer:
    timer_id: str
    element_id: str
    token: str
    due: datetime


@dataclass(slots=True)
class CancelTimer:
    timer_id: str


@dataclass(slots=True)
class ScheduleJob:
    """Continue ``token`` at ``due`` by delivering :class:`JobDue` (async continuation/retry)."""

    token: str
    element_id: str
    due: datetime
    retries_left: int


@dataclass(slots=True)
class CreateQuestionnaireResponse:
    """A user task started: create a QuestionnaireResponse ``in-progress`` for ``form_key``;
    ``token`` is the user-task id that comes back with the completed response."""

    form_key: str
    element_id: str
    token: str
    business_key: str
    variables: Mapping[str, object]


@dataclass(slots=True)
class CancelUserTask:
    """A user task was cancelled (boundary event, instance failure)."""

    token: str
    element_id: str


@dataclass(slots=True)
class ThrowSignal:
    """Broadcast a signal to every instance waiting for it (this one included)."""

    signal_name: str


@dataclass(slots=True)
class CompleteTasks:
    """The instance ended normally: set its in-progress Tasks ``completed``."""

    business_key: str


@dataclass(slots=True)
class FailTasks:
    """The instance failed: set its in-progress Tasks ``failed`` with this error ``message``."""

    business_key: str
    message: str


@dataclass(slots=True)
class ProcessCompleted:
    business_key: str


@dataclass(slots=True)
class ProcessFailed:
    business_key: str
    message: str


Effect = (
    CallHandler
    | SendTask
    | StartTimer
    | CancelTimer
    | ScheduleJob
    | CreateQuestionnaireResponse
    | CancelUserTask
    | ThrowSignal
    | CompleteTasks
    | FailTasks
    | ProcessCompleted
    | ProcessFailed
)
