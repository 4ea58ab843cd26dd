"""Reading BPMN 2.0 files with Camunda extensions, as DSF plugins write them, into definitions.

The parser walks the XML once and builds :class:`~dsf_bridge.engine.model.ProcessDefinition`
objects. Every element of an executable process must be in the supported subset (see
``docs/bpmn.md``); anything else is an :class:`UnsupportedElementError` naming the element, its
id and line, because silently dropping what a model relies on is how engines go wrong.
Diagram interchange (``bpmndi``), documentation and non-executable processes are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from lxml import etree

from dsf_bridge.engine.exceptions import UnsupportedElementError
from dsf_bridge.engine.expressions import (
    Expression,
    ExpressionError,
    VariableSource,
    compile_expression,
    compile_value,
    is_expression,
)
from dsf_bridge.engine.model import (
    EventKind,
    Flow,
    Listener,
    MultiInstance,
    Node,
    NodeKind,
    ProcessDefinition,
    SendSpec,
    TimerSpec,
)
from dsf_bridge.engine.safexml import MAX_XML_BYTES, parse_xml, read_xml_file
from dsf_bridge.engine.timers import (
    RetryPolicy,
    TimerError,
    parse_date,
    parse_duration,
    parse_retry_cycle,
)

__all__ = ["BPMN_NS", "CAMUNDA_NS", "BpmnDocument", "parse_bpmn", "parse_bpmn_file"]

BPMN_NS = "http://www.omg.org/spec/BPMN/20100524/MODEL"
CAMUNDA_NS = "http://camunda.org/schema/1.0/bpmn"
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_B = "{" + BPMN_NS + "}"
_C = "{" + CAMUNDA_NS + "}"

# Definition-level elements that only draw or document; they never execute.
_IGNORED_TOP = {"collaboration", "category", "documentation", "extensionElements"}
_IGNORED_IN_PROCESS = {
    "documentation",
    "laneSet",
    "textAnnotation",
    "association",
    "group",
    "dataObject",
    "dataObjectReference",
    "dataStoreReference",
}
_SUBPROCESS_OWN = {"incoming", "outgoing", "extensionElements", "multiInstanceLoopCharacteristics"}
_FLOW_NODE_KINDS = {kind.value: kind for kind in NodeKind}
_EVENT_DEFINITIONS = {
    "messageEventDefinition": EventKind.MESSAGE,
    "timerEventDefinition": EventKind.TIMER,
    "signalEventDefinition": EventKind.SIGNAL,
    "errorEventDefinition": EventKind.ERROR,
    "conditionalEventDefinition": EventKind.CONDITIONAL,
}
# Which event definitions each event kind may carry (NONE = no definition).
_ALLOWED_EVENTS: dict[NodeKind, set[EventKind]] = {
    NodeKind.START_EVENT: {EventKind.NONE, EventKind.MESSAGE},
    NodeKind.END_EVENT: {EventKind.NONE, EventKind.MESSAGE, EventKind.SIGNAL, EventKind.ERROR},
    NodeKind.INTERMEDIATE_CATCH_EVENT: {
        EventKind.MESSAGE,
        EventKind.TIMER,
        EventKind.SIGNAL,
        EventKind.CONDITIONAL,
    },
    NodeKind.INTERMEDIATE_THROW_EVENT: {EventKind.NONE, EventKind.MESSAGE, EventKind.SIGNAL},
    NodeKind.BOUNDARY_EVENT: {EventKind.ERROR, EventKind.TIMER, EventKind.MESSAGE},
}
# Camunda attributes that select an implementation we do not have.
_REJECTED_CAMUNDA_ATTRS = {
    "delegateExpression",
    "expression",
    "type",
    "topic",
    "resultVariable",
    "decisionRef",
    "calledElement",
    "candidateStarterGroups",
    "candidateStarterUsers",
}
_VARIABLE_EVENTS = frozenset({"create", "update", "delete"})
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class BpmnDocument:
    """One BPMN file: its executable processes and the ids of non-executable ones."""

    source: str
    processes: tuple[ProcessDefinition, ...]
    non_executable: tuple[str, ...]


def parse_bpmn_file(path: Path, *, max_bytes: int = MAX_XML_BYTES) -> BpmnDocument:
    """Parse a BPMN file from disk (size checked before reading)."""
    root = read_xml_file(path, max_bytes=max_bytes)
    return _Builder(str(path)).document(root)


def parse_bpmn(data: bytes, source: str, *, max_bytes: int = MAX_XML_BYTES) -> BpmnDocument:
    """Parse BPMN XML bytes; ``source`` names the file in errors."""
    root = parse_xml(data, source, max_bytes=max_bytes)
    return _Builder(source).document(root)


def _is_element(node: etree._Element) -> bool:
    """False for comments and processing instructions, whose ``tag`` is not a string."""
    tag: object = node.tag
    return isinstance(tag, str)


def _line(node: etree._Element) -> int | None:
    line: object = node.sourceline
    return line if isinstance(line, int) else None


def _camunda_attributes(element: etree._Element) -> list[str]:
    names = [str(key) for key in element.attrib]
    return [name[len(_C) :] for name in names if name.startswith(_C)]


def _local(element: etree._Element) -> tuple[str, str]:
    """(namespace, local name) of an element."""
    tag: object = element.tag
    if not isinstance(tag, str):
        return "", ""
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return "", tag


class _Builder:
    """Builds definitions from one document; holds the file name for error messages."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.messages: dict[str, str] = {}
        self.signals: dict[str, str] = {}
        self.errors: dict[str, str | None] = {}

    # -- errors -------------------------------------------------------------------------------

    def _unsupported(self, element: etree._Element, what: str) -> UnsupportedElementError:
        ns, name = _local(element)
        prefix = "bpmn:" if ns == BPMN_NS else "camunda:" if ns == CAMUNDA_NS else ""
        ident = element.get("id")
        label = f"<{prefix}{name}" + (f' id="{ident}"' if ident else "") + ">"
        return UnsupportedElementError(f"{label}: {what}", source=self.source, line=_line(element))

    def _expr(self, element: etree._Element, text: str, *, value: bool = False) -> Expression:
        try:
            return compile_value(text) if value else compile_expression(text)
        except ExpressionError as exc:
            raise self._unsupported(element, exc.message) from exc

    # -- document -----------------------------------------------------------------------------

    def document(self, root: etree._Element) -> BpmnDocument:
        ns, name = _local(root)
        if ns != BPMN_NS or name != "definitions":
            raise UnsupportedElementError(
                f"root element must be bpmn:definitions, found {root.tag!r}",
                source=self.source,
                line=_line(root),
            )
        messages = self.messages
        signals = self.signals
        errors = self.errors
        process_elements: list[etree._Element] = []
        for child in root:
            if not _is_element(child):
                continue  # comments and processing instructions
            ns, name = _local(child)
            if ns != BPMN_NS:
                continue  # bpmndi diagrams and vendor extensions draw, they do not execute
            if name == "process":
                process_elements.append(child)
            elif name == "message":
                messages[child.get("id", "")] = child.get("name", "")
            elif name == "signal":
                signals[child.get("id", "")] = child.get("name", "")
            elif name == "error":
                errors[child.get("id", "")] = child.get("errorCode")
            elif name not in _IGNORED_TOP:
                raise self._unsupported(child, "not supported at definitions level")
        processes: list[ProcessDefinition] = []
        skipped: list[str] = []
        for element in process_elements:
            if element.get("isExecutable", "false").strip().lower() != "true":
                skipped.append(element.get("id", ""))
                continue
            processes.append(self.process(element))
        return BpmnDocument(self.source, tuple(processes), tuple(skipped))

    # -- process ------------------------------------------------------------------------------

    def process(self, element: etree._Element) -> ProcessDefinition:
        for attr in _camunda_attributes(element):
            if attr in _REJECTED_CAMUNDA_ATTRS:
                raise self._unsupported(element, f"attribute camunda:{attr}")
        nodes: dict[str, Node] = {}
        flows: dict[str, Flow] = {}
        self._scope(element, None, nodes, flows)
        nodes = self._link(nodes, flows)
        message_starts: dict[str, str] = {}
        none_start: str | None = None
        for node in nodes.values():
            if node.kind is not NodeKind.START_EVENT or node.parent is not None:
                continue
            if node.event is EventKind.MESSAGE:
                message = _required(node.message_name)
                if message in message_starts:
                    raise UnsupportedElementError(
                        f"two start events for message {message!r}",
                        source=self.source,
                        line=node.line,
                    )
                message_starts[message] = node.id
            else:
                if none_start is not None:
                    raise UnsupportedElementError(
                        "more than one none start event in the process",
                        source=self.source,
                        line=node.line,
                    )
                none_start = node.id
        return ProcessDefinition(
            key=element.get("id", ""),
            version_tag=element.get(_C + "versionTag"),
            source=self.source,
            nodes=nodes,
            flows=flows,
            message_starts=message_starts,
            none_start=none_start,
            messages=dict(self.messages),
            signals=dict(self.signals),
            errors=dict(self.errors),
            has_conditionals=any(node.condition is not None for node in nodes.values()),
        )

    def _scope(
        self,
        scope: etree._Element,
        parent: str | None,
        nodes: dict[str, Node],
        flows: dict[str, Flow],
    ) -> None:
        for child in scope:
            if not _is_element(child):
                continue
            ns, name = _local(child)
            if ns != BPMN_NS:
                raise self._unsupported(child, "unknown element in a process")
            if name in _IGNORED_IN_PROCESS:
                continue
            if parent is not None and name in _SUBPROCESS_OWN:
                continue  # the subprocess's own children, read by _node
            if name == "extensionElements":
                # Process-level listeners would run outside any token; we have none to run them.
                self._check_extensions(child, allowed={"properties"})
                continue
            if name == "sequenceFlow":
                flow = self._flow(child)
                flows[flow.id] = flow
                continue
            kind = _FLOW_NODE_KINDS.get(name)
            if kind is None:
                raise self._unsupported(child, "element not supported by dsf-bridge")
            node = self._node(child, kind, parent)
            if node.id in nodes:
                raise UnsupportedElementError(
                    f"duplicate element id {node.id!r}", source=self.source, line=node.line
                )
            nodes[node.id] = node
            if kind is NodeKind.SUB_PROCESS:
                self._scope(child, node.id, nodes, flows)

    def _flow(self, element: etree._Element) -> Flow:
        condition: Expression | None = None
        for child in element:
            if not _is_element(child):
                continue
            ns, name = _local(child)
            if ns == BPMN_NS and name == "conditionExpression":
                if child.get("language"):
                    raise self._unsupported(child, "script conditions are not supported")
                condition = self._expr(child, (child.text or "").strip())
            elif ns == BPMN_NS and name == "documentation":
                continue
            elif ns == BPMN_NS and name == "extensionElements":
                self._check_extensions(child, allowed={"properties"})
            else:
                raise self._unsupported(child, "not supported in a sequence flow")
        ident = element.get("id", "")
        source, target = element.get("sourceRef"), element.get("targetRef")
        if not ident or not source or not target:
            raise self._unsupported(element, "sequence flow needs id, sourceRef and targetRef")
        return Flow(ident, source, target, condition, _line(element) or 0)

    def _check_extensions(self, extension: etree._Element, *, allowed: set[str]) -> None:
        for child in extension:
            if not _is_element(child):
                continue
            ns, name = _local(child)
            if ns != CAMUNDA_NS or name not in allowed:
                raise self._unsupported(child, "extension not supported here")

    # -- nodes --------------------------------------------------------------------------------

    def _node(self, element: etree._Element, kind: NodeKind, parent: str | None) -> Node:
        ident = element.get("id", "")
        if not ident:
            raise self._unsupported(element, "element without id")
        for attr in _camunda_attributes(element):
            if attr in _REJECTED_CAMUNDA_ATTRS:
                raise self._unsupported(element, f"attribute camunda:{attr}")
        if element.get("isForCompensation", "false") == "true":
            raise self._unsupported(element, "compensation is not supported")
        attrs: dict[str, object] = {
            "id": ident,
            "kind": kind,
            "line": _line(element) or 0,
            "name": element.get("name", ""),
            "parent": parent,
            "async_before": element.get(_C + "asyncBefore") == "true",
            "async_after": element.get(_C + "asyncAfter") == "true",
        }
        event_definitions: list[etree._Element] = []
        fields: dict[str, Expression] = {}
        listeners: list[Listener] = []
        task_listeners: list[Listener] = []
        for child in element:
            if not _is_element(child):
                continue
            ns, name = _local(child)
            if ns != BPMN_NS:
                raise self._unsupported(child, "unknown element")
            if name in ("incoming", "outgoing", "documentation"):
                continue  # flows are linked from sequenceFlow elements, the truth of the graph
            if name == "extensionElements":
                self._node_extensions(child, kind, attrs, (fields, listeners, task_listeners))
            elif name in _EVENT_DEFINITIONS:
                event_definitions.append(child)
            elif name == "multiInstanceLoopCharacteristics":
                attrs["multi_instance"] = self._multi_instance(child)
            elif kind is NodeKind.SUB_PROCESS and (
                name in _FLOW_NODE_KINDS or name == "sequenceFlow" or name in _IGNORED_IN_PROCESS
            ):
                continue  # children of the subprocess scope, read by _scope
            else:
                raise self._unsupported(child, f"not supported inside bpmn:{kind.value}")
        attrs["listeners"] = tuple(listeners)
        attrs["task_listeners"] = tuple(task_listeners)
        attrs["fields"] = fields
        if kind in _ALLOWED_EVENTS:
            self._event(element, kind, event_definitions, attrs)
        elif event_definitions:
            raise self._unsupported(event_definitions[0], "event definition on a non-event")
        handler = element.get(_C + "class")
        if kind in (NodeKind.SERVICE_TASK, NodeKind.SEND_TASK):
            if not handler:
                raise self._unsupported(
                    element, f"bpmn:{kind.value} needs camunda:class (the handler name)"
                )
            attrs["handler"] = handler
        elif handler:
            raise self._unsupported(element, f"camunda:class is not supported on {kind.value}")
        if kind is NodeKind.SEND_TASK:
            attrs["send"] = self._send_spec(element, fields)
        if kind is NodeKind.USER_TASK:
            form_key = element.get(_C + "formKey")
            if not form_key:
                raise self._unsupported(element, "bpmn:userTask needs camunda:formKey")
            attrs["form_key"] = form_key
        if kind is NodeKind.RECEIVE_TASK:
            attrs["message_name"] = self._message_name(element, element)
        if kind is NodeKind.EXCLUSIVE_GATEWAY:
            attrs["default_flow"] = element.get("default")
        if kind is NodeKind.BOUNDARY_EVENT:
            attached = element.get("attachedToRef")
            if not attached:
                raise self._unsupported(element, "boundary event without attachedToRef")
            attrs["attached_to"] = attached
            attrs["cancel_activity"] = element.get("cancelActivity", "true") != "false"
            if attrs["event"] is EventKind.ERROR and not attrs["cancel_activity"]:
                raise self._unsupported(element, "error boundary events always interrupt")
        if kind is NodeKind.SUB_PROCESS and element.get("triggeredByEvent") == "true":
            raise self._unsupported(element, "event subprocesses are not supported")
        return Node(**attrs)  # type: ignore[arg-type]

    def _node_extensions(
        self,
        extension: etree._Element,
        kind: NodeKind,
        attrs: dict[str, object],
        collected: tuple[dict[str, Expression], list[Listener], list[Listener]],
    ) -> None:
        fields, listeners, task_listeners = collected
        for child in extension:
            if not _is_element(child):
                continue
            ns, name = _local(child)
            if ns != CAMUNDA_NS:
                raise self._unsupported(child, "extension not supported")
            if name == "field":
                field_name, value = self._field(child)
                fields[field_name] = value
            elif name == "executionListener":
                listeners.append(self._listener(child))
            elif name == "taskListener" and kind is NodeKind.USER_TASK:
                task_listeners.append(self._listener(child))
            elif name == "inputOutput":
                inputs, outputs = self._input_output(child)
                attrs["inputs"] = inputs
                attrs["outputs"] = outputs
            elif name == "failedJobRetryTimeCycle":
                attrs["retry"] = self._retry(child)
            elif name == "properties":
                continue  # documentation for the modeler
            else:
                raise self._unsupported(child, "extension not supported")

    def _retry(self, element: etree._Element) -> RetryPolicy:
        try:
            return parse_retry_cycle(element.text or "")
        except TimerError as exc:
            raise self._unsupported(element, exc.message) from exc

    def _field(self, element: etree._Element) -> tuple[str, Expression]:
        name = element.get("name")
        if not name:
            raise self._unsupported(element, "camunda:field without name")
        if element.get("stringValue") is not None:
            return name, compile_value(element.get("stringValue", ""))
        if element.get("expression") is not None:
            return name, self._expr(element, element.get("expression", ""))
        for child in element:
            if not _is_element(child):
                continue
            ns, local = _local(child)
            if ns == CAMUNDA_NS and local == "string":
                text = child.text or ""
                # A camunda:string is literal even when it contains "${"; keep it verbatim.
                return name, _constant(text)
            if ns == CAMUNDA_NS and local == "expression":
                return name, self._expr(child, (child.text or "").strip(), value=True)
            raise self._unsupported(child, "field value must be camunda:string/expression")
        return name, _constant("")

    def _listener(self, element: etree._Element) -> Listener:
        handler = element.get("class")
        if not handler:
            raise self._unsupported(element, "listeners need a class attribute")
        fields: dict[str, Expression] = {}
        for child in element:
            if not _is_element(child):
                continue
            ns, name = _local(child)
            if ns == CAMUNDA_NS and name == "field":
                field_name, value = self._field(child)
                fields[field_name] = value
            else:
                raise self._unsupported(child, "listeners support camunda:field children only")
        return Listener(element.get("event", "start"), handler, fields)

    def _input_output(
        self, element: etree._Element
    ) -> tuple[tuple[tuple[str, Expression], ...], tuple[tuple[str, Expression], ...]]:
        inputs: list[tuple[str, Expression]] = []
        outputs: list[tuple[str, Expression]] = []
        for child in element:
            if not _is_element(child):
                continue
            ns, name = _local(child)
            if ns != CAMUNDA_NS or name not in ("inputParameter", "outputParameter"):
                raise self._unsupported(child, "not supported in camunda:inputOutput")
            if any(_is_element(grand) for grand in child):
                raise self._unsupported(child, "lists, maps and scripts are not supported")
            param = child.get("name")
            if not param:
                raise self._unsupported(child, "parameter without name")
            value = self._expr(child, (child.text or "").strip(), value=True)
            (inputs if name == "inputParameter" else outputs).append((param, value))
        return tuple(inputs), tuple(outputs)

    def _multi_instance(self, element: etree._Element) -> MultiInstance:
        collection = element.get(_C + "collection")
        if not collection:
            raise self._unsupported(element, "multi-instance needs camunda:collection")
        for child in element:
            if not _is_element(child):
                continue
            ns, name = _local(child)
            if ns == BPMN_NS and name == "extensionElements":
                self._check_extensions(child, allowed={"failedJobRetryTimeCycle"})
            else:
                raise self._unsupported(
                    child, "loopCardinality and completionCondition are not supported"
                )
        retry: RetryPolicy | None = None
        for cycle in element.iter(_C + "failedJobRetryTimeCycle"):
            retry = self._retry(cycle)
        return MultiInstance(
            sequential=element.get("isSequential", "false") == "true",
            collection=self._expr(element, collection),
            element_variable=element.get(_C + "elementVariable"),
            async_before=element.get(_C + "asyncBefore") == "true",
            async_after=element.get(_C + "asyncAfter") == "true",
            retry=retry,
        )

    def _message_name(self, element: etree._Element, owner: etree._Element) -> str:
        ref = element.get("messageRef")
        if not ref:
            raise self._unsupported(owner, "a message catch needs messageRef")
        name = self.messages.get(ref)
        if name is None:
            raise self._unsupported(owner, f"messageRef {ref!r} names no bpmn:message")
        if not name.strip():
            raise self._unsupported(owner, f"bpmn:message {ref!r} has no name")
        return name

    def _send_spec(self, owner: etree._Element, fields: dict[str, Expression]) -> SendSpec:
        # Presence and non-blankness are DSF rules, checked by validation; here we only build.
        missing = _constant("")
        return SendSpec(
            instantiates_canonical=fields.get("instantiatesCanonical", missing),
            message_name=fields.get("messageName", missing),
            profile=fields.get("profile", missing),
        )

    def _event(
        self,
        element: etree._Element,
        kind: NodeKind,
        definitions: list[etree._Element],
        attrs: dict[str, object],
    ) -> None:
        if len(definitions) > 1:
            raise self._unsupported(element, "multiple event definitions are not supported")
        event = EventKind.NONE
        if definitions:
            event = _EVENT_DEFINITIONS[_local(definitions[0])[1]]
        if event not in _ALLOWED_EVENTS[kind]:
            raise self._unsupported(
                definitions[0] if definitions else element,
                f"{event.value} event definition is not supported on bpmn:{kind.value}",
            )
        attrs["event"] = event
        if not definitions:
            return
        definition = definitions[0]
        inner_fields: dict[str, Expression] = {}
        for child in definition:
            if not _is_element(child):
                continue
            ns, name = _local(child)
            if ns == BPMN_NS and name == "extensionElements":
                for grand in child:
                    if not _is_element(grand):
                        continue
                    gns, gname = _local(grand)
                    if gns != CAMUNDA_NS or gname != "field":
                        raise self._unsupported(grand, "extension not supported here")
                    field_name, value = self._field(grand)
                    inner_fields[field_name] = value
            elif event is EventKind.TIMER and ns == BPMN_NS:
                attrs["timer"] = self._timer(child, name)
            elif event is EventKind.CONDITIONAL and ns == BPMN_NS and name == "condition":
                attrs["condition"] = self._expr(child, (child.text or "").strip())
            else:
                raise self._unsupported(child, "not supported in an event definition")
        if event is EventKind.MESSAGE:
            is_send = kind in (NodeKind.INTERMEDIATE_THROW_EVENT, NodeKind.END_EVENT)
            if is_send:
                handler = definition.get(_C + "class")
                if not handler:
                    raise self._unsupported(
                        element, "message send events need camunda:class (the handler name)"
                    )
                attrs["handler"] = handler
                attrs["fields"] = inner_fields
                attrs["send"] = self._send_spec(element, inner_fields)
                if definition.get("messageRef"):
                    attrs["message_name"] = self._message_name(definition, element)
            else:
                attrs["message_name"] = self._message_name(definition, element)
        elif event is EventKind.TIMER:
            if "timer" not in attrs:
                raise self._unsupported(element, "timer event without a time definition")
        elif event is EventKind.SIGNAL:
            ref = definition.get("signalRef")
            if not ref or ref not in self.signals or not self.signals[ref].strip():
                raise self._unsupported(element, "signal events need a named bpmn:signal")
            attrs["signal_name"] = self.signals[ref]
        elif event is EventKind.ERROR:
            ref = definition.get("errorRef")
            if ref:
                if ref not in self.errors:
                    raise self._unsupported(element, f"errorRef {ref!r} names no bpmn:error")
                attrs["error_code"] = self.errors[ref]
            elif kind is NodeKind.END_EVENT:
                raise self._unsupported(element, "error end events need errorRef")
            attrs["error_code_variable"] = definition.get(_C + "errorCodeVariable")
            attrs["error_message_variable"] = definition.get(_C + "errorMessageVariable")
        elif event is EventKind.CONDITIONAL:
            if "condition" not in attrs:
                raise self._unsupported(element, "conditional event without condition")
            attrs["variable_name"] = definition.get(_C + "variableName") or None
            events = definition.get(_C + "variableEvents") or ""
            names = frozenset(part.strip() for part in events.split(",") if part.strip())
            unknown = sorted(names - _VARIABLE_EVENTS)
            if unknown:
                raise self._unsupported(
                    definition,
                    f"camunda:variableEvents {', '.join(unknown)} (only create, update, delete)",
                )
            attrs["variable_events"] = names

    def _timer(self, element: etree._Element, name: str) -> TimerSpec:
        text = (element.text or "").strip()
        if name == "timeCycle":
            raise self._unsupported(element, "timer cycles are not supported on events")
        if name not in ("timeDuration", "timeDate"):
            raise self._unsupported(element, "unknown timer definition")
        kind = "duration" if name == "timeDuration" else "date"
        if is_expression(text):
            return TimerSpec(kind, None, None, self._expr(element, text))
        try:
            if kind == "duration":
                return TimerSpec(kind, parse_duration(text), None, None)
            parse_date(text)
            return TimerSpec(kind, None, text, None)
        except TimerError as exc:
            raise self._unsupported(element, exc.message) from exc

    # -- graph --------------------------------------------------------------------------------

    def _link(self, nodes: dict[str, Node], flows: dict[str, Flow]) -> dict[str, Node]:
        outgoing: dict[str, list[str]] = {}
        incoming: dict[str, list[str]] = {}
        for flow in flows.values():
            for end in (flow.source, flow.target):
                if end not in nodes:
                    raise UnsupportedElementError(
                        f"sequence flow {flow.id!r} refers to unknown element {end!r}",
                        source=self.source,
                        line=flow.line,
                    )
            if nodes[flow.source].parent != nodes[flow.target].parent:
                raise UnsupportedElementError(
                    f"sequence flow {flow.id!r} crosses a subprocess boundary",
                    source=self.source,
                    line=flow.line,
                )
            outgoing.setdefault(flow.source, []).append(flow.id)
            incoming.setdefault(flow.target, []).append(flow.id)
        boundaries: dict[str, list[str]] = {}
        starts: dict[str, list[str]] = {}
        for node in nodes.values():
            if node.kind is NodeKind.BOUNDARY_EVENT:
                target = nodes.get(_required(node.attached_to))
                if target is None or target.kind not in _ACTIVITIES:
                    raise UnsupportedElementError(
                        f"boundary event {node.id!r} is attached to {node.attached_to!r}, "
                        "which is not a task or subprocess",
                        source=self.source,
                        line=node.line,
                    )
                boundaries.setdefault(_required(node.attached_to), []).append(node.id)
            if node.kind is NodeKind.START_EVENT and node.parent is not None:
                if node.event is not EventKind.NONE:
                    raise UnsupportedElementError(
                        f"start event {node.id!r} of an embedded subprocess must be a none event",
                        source=self.source,
                        line=node.line,
                    )
                starts.setdefault(node.parent, []).append(node.id)
        linked: dict[str, Node] = {}
        for node in nodes.values():
            changes: dict[str, object] = {
                "incoming": tuple(incoming.get(node.id, ())),
                "outgoing": tuple(outgoing.get(node.id, ())),
                "boundaries": tuple(boundaries.get(node.id, ())),
            }
            changes["targets"] = tuple(flows[f].target for f in outgoing.get(node.id, ()))
            changes["simple"] = not (
                node.async_before
                or node.async_after
                or node.inputs
                or node.outputs
                or node.listeners
                or node.multi_instance is not None
                or boundaries.get(node.id)
            )
            if node.kind is NodeKind.SUB_PROCESS:
                sub_starts = starts.get(node.id, [])
                if len(sub_starts) != 1:
                    raise UnsupportedElementError(
                        f"subprocess {node.id!r} needs exactly one none start event",
                        source=self.source,
                        line=node.line,
                    )
                changes["start_node"] = sub_starts[0]
            linked[node.id] = replace(node, **changes)  # type: ignore[arg-type]
        for node in linked.values():
            self._check_node_flows(node, linked, flows)
        return linked

    def _check_node_flows(self, node: Node, nodes: dict[str, Node], flows: dict[str, Flow]) -> None:
        def fail(message: str) -> UnsupportedElementError:
            return UnsupportedElementError(
                f"bpmn:{node.kind.value} {node.id!r}: {message}", source=self.source, line=node.line
            )

        if node.kind is NodeKind.EVENT_BASED_GATEWAY:
            for flow_id in node.outgoing:
                target = nodes[flows[flow_id].target]
                catches = target.kind is NodeKind.RECEIVE_TASK or (
                    target.kind is NodeKind.INTERMEDIATE_CATCH_EVENT
                    and target.event
                    in (EventKind.MESSAGE, EventKind.TIMER, EventKind.SIGNAL, EventKind.CONDITIONAL)
                )
                if not catches:
                    raise fail("event-based gateways may only lead to catch events")
            if len(node.outgoing) < 2:
                raise fail("event-based gateways need at least two outgoing flows")
        if (
            node.kind is NodeKind.EXCLUSIVE_GATEWAY
            and node.default_flow is not None
            and node.default_flow not in node.outgoing
        ):
            raise fail(f"default flow {node.default_flow!r} is not an outgoing flow")
        if node.kind not in (NodeKind.EXCLUSIVE_GATEWAY,):
            for flow_id in node.outgoing:
                if flows[flow_id].condition is not None:
                    raise fail("conditional sequence flows are only supported after gateways")
        if node.kind is NodeKind.BOUNDARY_EVENT and node.incoming:
            raise fail("boundary events cannot have incoming flows")
        if node.kind is NodeKind.START_EVENT and node.incoming:
            raise fail("start events cannot have incoming flows")
        if node.kind is NodeKind.END_EVENT and node.outgoing:
            raise fail("end events cannot have outgoing flows")


_ACTIVITIES = {
    NodeKind.SERVICE_TASK,
    NodeKind.SEND_TASK,
    NodeKind.USER_TASK,
    NodeKind.RECEIVE_TASK,
    NodeKind.SUB_PROCESS,
}


def _required(value: _T | None) -> _T:
    if value is None:  # pragma: no cover - guarded by the parser's own checks
        raise UnsupportedElementError("internal: a required attribute is missing")
    return value


def _constant(text: str) -> Expression:
    def _value(_: VariableSource) -> object:
        return text

    return Expression(text, _value, constant=True)
