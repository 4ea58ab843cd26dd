"""The parsed form of a process definition: compact immutable structures the interpreter walks.

A :class:`ProcessDefinition` is built once per BPMN file (see :mod:`dsf_bridge.engine.parser`)
and never touches lxml again: nodes are keyed by element id, outgoing flows are tuples, and
expressions are already compiled. Instance state refers to nodes by id only, so a definition is
never copied into state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from dsf_bridge.engine.expressions import Expression
from dsf_bridge.engine.timers import Duration, RetryPolicy

__all__ = [
    "EventKind",
    "Flow",
    "Listener",
    "MultiInstance",
    "Node",
    "NodeKind",
    "ProcessDefinition",
    "SendSpec",
    "TimerSpec",
]


class NodeKind(StrEnum):
    """The BPMN element types the engine executes."""

    START_EVENT = "startEvent"
    END_EVENT = "endEvent"
    INTERMEDIATE_CATCH_EVENT = "intermediateCatchEvent"
    INTERMEDIATE_THROW_EVENT = "intermediateThrowEvent"
    BOUNDARY_EVENT = "boundaryEvent"
    SERVICE_TASK = "serviceTask"
    SEND_TASK = "sendTask"
    USER_TASK = "userTask"
    RECEIVE_TASK = "receiveTask"
    EXCLUSIVE_GATEWAY = "exclusiveGateway"
    PARALLEL_GATEWAY = "parallelGateway"
    EVENT_BASED_GATEWAY = "eventBasedGateway"
    SUB_PROCESS = "subProcess"


class EventKind(StrEnum):
    """The event definition of an event node (NONE when it has none)."""

    NONE = "none"
    MESSAGE = "message"
    TIMER = "timer"
    SIGNAL = "signal"
    ERROR = "error"
    CONDITIONAL = "conditional"


@dataclass(frozen=True, slots=True)
class Flow:
    """A sequence flow; ``condition`` is None for an unconditional flow."""

    id: str
    source: str
    target: str
    condition: Expression | None
    line: int


@dataclass(frozen=True, slots=True)
class Listener:
    """An execution listener (``start``/``end``) or task listener (``create``...)."""

    event: str
    handler: str
    fields: Mapping[str, Expression]


@dataclass(frozen=True, slots=True)
class SendSpec:
    """The three ``camunda:field`` values every DSF message send element carries."""

    instantiates_canonical: Expression
    message_name: Expression
    profile: Expression


@dataclass(frozen=True, slots=True)
class TimerSpec:
    """A timer: exactly one of a fixed duration, a fixed date, or an expression to evaluate.

    ``kind`` is ``duration`` or ``date``; an expression yields the ISO 8601 text of that kind.
    """

    kind: str
    duration: Duration | None
    date: str | None
    expression: Expression | None


@dataclass(frozen=True, slots=True)
class MultiInstance:
    """Multi-instance loop characteristics over a collection."""

    sequential: bool
    collection: Expression
    element_variable: str | None
    async_before: bool
    async_after: bool
    retry: RetryPolicy | None


@dataclass(frozen=True, slots=True)
class Node:
    """One flow node. Fields that do not apply to a kind keep their empty default."""

    id: str
    kind: NodeKind
    line: int
    name: str = ""
    event: EventKind = EventKind.NONE
    parent: str | None = None
    incoming: tuple[str, ...] = ()
    outgoing: tuple[str, ...] = ()
    handler: str | None = None
    fields: Mapping[str, Expression] = field(default_factory=dict)
    message_name: str | None = None
    send: SendSpec | None = None
    timer: TimerSpec | None = None
    signal_name: str | None = None
    condition: Expression | None = None
    variable_name: str | None = None
    variable_events: frozenset[str] = frozenset()
    error_code: str | None = None
    error_code_variable: str | None = None
    error_message_variable: str | None = None
    attached_to: str | None = None
    cancel_activity: bool = True
    boundaries: tuple[str, ...] = ()
    default_flow: str | None = None
    form_key: str | None = None
    async_before: bool = False
    async_after: bool = False
    retry: RetryPolicy | None = None
    inputs: tuple[tuple[str, Expression], ...] = ()
    outputs: tuple[tuple[str, Expression], ...] = ()
    listeners: tuple[Listener, ...] = ()
    task_listeners: tuple[Listener, ...] = ()
    multi_instance: MultiInstance | None = None
    start_node: str | None = None
    targets: tuple[str, ...] = ()
    simple: bool = False
    """Precomputed: no async, I/O parameters, listeners, multi-instance or boundary events, so
    the interpreter can skip those stages (the hot path of every DSF process)."""


@dataclass(frozen=True, slots=True)
class ProcessDefinition:
    """One executable process: the unit the engine runs.

    ``message_starts`` maps a message name to the start event it triggers; ``none_start`` is the
    process-level start event without a trigger, if any.
    """

    key: str
    version_tag: str | None
    source: str
    nodes: Mapping[str, Node]
    flows: Mapping[str, Flow]
    message_starts: Mapping[str, str]
    none_start: str | None
    messages: Mapping[str, str]
    signals: Mapping[str, str]
    errors: Mapping[str, str | None]
    has_conditionals: bool = False

    def node(self, node_id: str) -> Node:
        return self.nodes[node_id]
