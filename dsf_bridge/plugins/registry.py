"""How BPMN elements find Python code: a registry from ``camunda:class`` names to handlers.

A process model names Java classes (``camunda:class="dev.dsf.bpe.service.LogPing"``); a Python
plugin registers a function under that exact name, so models written for the Java BPE run
unchanged::

    handlers = HandlerRegistry()

    @handlers.service("dev.dsf.bpe.service.SelectPingTargets")
    def select_targets(ctx: HandlerContext) -> None:
        ctx.set("targets", {"entries": [...]})

    @handlers.message_send("dev.dsf.bpe.message.SendPing")
    def send_ping(ctx: SendContext) -> None:
        ctx.add_input("http://dsf.dev/fhir/CodeSystem/ping", "endpoint-identifier", "...")

A handler gets a context with the variables it may read and collects the changes it makes; it
raises :class:`BpmnError` for a business error that an error boundary event may catch, and any
other exception for a technical failure. Handlers may be ``async def``.

Handlers that need the outside world (the local FHIR server, the site's identity) get it from
``ctx.services``, a mapping the runtime fills: the bridge provides :data:`SERVICE_FHIR_CLIENT`
(a :class:`~dsf_bridge.dsf.client.FhirClient` of the local DSF FHIR server) and
:data:`SERVICE_LOCAL_ORGANIZATION` (a :class:`~dsf_bridge.dsf.organization.LocalOrganization`)
and :data:`SERVICE_CALL_RETRY` (the site's :class:`~dsf_bridge.retry.RetryPolicy` for one call to
a remote server, ``[runtime] call_*``: a handler's own HTTP clients follow it) and, when the site
has one, :data:`SERVICE_FORWARD_PROXY` (its :class:`~dsf_bridge.proxy.ForwardProxy`, ``[proxy]``:
a handler's own HTTP clients route through it, asking ``proxy.route(url)``); tests put fakes
under a plugin's own names. ``ctx.service(name, kind)`` reads one, typed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dsf_bridge.dsf.questionnaires import QUESTIONNAIRE_ITEM_TEXTS
from dsf_bridge.dsf.tasks import (
    TASK_OUTPUT_PREFIX,
    task_output_value,
    task_output_variable,
    unstorable_json,
)
from dsf_bridge.engine.correlation import ALTERNATIVE_BUSINESS_KEY
from dsf_bridge.engine.model import NodeKind, ProcessDefinition
from dsf_bridge.errors import BridgeError, ProcessExecutionError, ProcessModelError
from dsf_bridge.proxy import ForwardProxy
from dsf_bridge.retry import CALL_RETRY, RetryPolicy

__all__ = [
    "SERVICE_CALL_RETRY",
    "SERVICE_FHIR_CLIENT",
    "SERVICE_FORWARD_PROXY",
    "SERVICE_LOCAL_ORGANIZATION",
    "BpmnError",
    "Handler",
    "HandlerContext",
    "HandlerKind",
    "HandlerRegistry",
    "SendContext",
    "used_handlers",
]


SERVICE_FHIR_CLIENT = "dsf.fhir_client"
SERVICE_CALL_RETRY = "bridge.call_retry"
SERVICE_FORWARD_PROXY = "bridge.forward_proxy"
SERVICE_LOCAL_ORGANIZATION = "dsf.local_organization"

_T = TypeVar("_T")


class BpmnError(Exception):
    """Raised by a handler to throw a BPMN error with ``code`` (error boundary events catch it)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.code = code
        self.message = message


def _json_value(name: str, value: object) -> object:
    """``value``, refused here, where a handler sets it, when the store cannot keep it (the
    engine's state is JSON, JSONB on PostgreSQL: no NaN or Infinity, no NUL in a string): at
    the handler's own line, not later in a write that fails on one database only."""
    try:
        json.dumps(value)
        problem = unstorable_json(value)
    except (TypeError, ValueError) as exc:
        problem = str(exc)
    if problem is not None:
        raise ProcessExecutionError(f"variable {name!r} cannot be stored: {problem}")
    return value


@dataclass
class HandlerContext:
    """What a handler sees of its execution, and the variable changes it makes."""

    handler: str
    element_id: str
    business_key: str
    variables: Mapping[str, object]
    fields: Mapping[str, object] = field(default_factory=dict)
    event: str | None = None
    updates: dict[str, object] = field(default_factory=dict)
    local_updates: dict[str, object] = field(default_factory=dict)
    services: Mapping[str, object] = field(default_factory=dict)

    def service(self, name: str, kind: type[_T]) -> _T:
        """The runtime service ``name``; a technical failure when it is missing or not a
        ``kind`` (the handler cannot run in this runtime)."""
        value = self.services.get(name)
        if not isinstance(value, kind):
            found = "nothing" if value is None else type(value).__name__
            raise ProcessExecutionError(
                f"handler {self.handler!r} needs service {name!r} ({kind.__name__}), "
                f"the runtime provides {found}"
            )
        return value

    def task(self) -> Mapping[str, Any]:
        """The ``task`` variable: what the runtime shows of the Task that started the instance
        or last reached it (id, requester, profile, inputs)."""
        task = self.get("task")
        if not isinstance(task, Mapping):
            raise BridgeError("the process has no 'task' variable (it was not started by a Task)")
        return task

    def forward_proxy(self) -> ForwardProxy | None:
        """The site's forward proxy (``[proxy]``), if it has one."""
        proxy = self.services.get(SERVICE_FORWARD_PROXY)
        return proxy if isinstance(proxy, ForwardProxy) else None

    def call_retry(self) -> RetryPolicy:
        """The site's policy for one call (``[runtime] call_*``); the default outside a
        bridge."""
        policy = self.services.get(SERVICE_CALL_RETRY)
        return policy if isinstance(policy, RetryPolicy) else CALL_RETRY

    def get(self, name: str, default: object = None) -> object:
        """A variable as set so far in this call, else as the execution sees it."""
        if name in self.local_updates:
            return self.local_updates[name]
        if name in self.updates:
            return self.updates[name]
        return self.variables.get(name, default)

    def has(self, name: str) -> bool:
        return name in self.local_updates or name in self.updates or name in self.variables

    def set(self, name: str, value: object) -> None:
        """Set a variable (Camunda ``setVariable``); values must be JSON-compatible (a
        :class:`~dsf_bridge.errors.ProcessExecutionError` here otherwise, which fails the
        step as any error of the handler)."""
        self.updates[name] = _json_value(name, value)

    def set_questionnaire_item_text(self, link_id: str, text: str) -> None:
        """In a user task's ``create`` listener: the QuestionnaireResponse the bridge creates
        shows ``text`` for item ``link_id`` (e.g. the request to approve, in a ``display``
        item), as DSF's ``DefaultUserTaskListener.beforeQuestionnaireResponseCreate`` may
        change it."""
        texts = self.get(QUESTIONNAIRE_ITEM_TEXTS)
        merged = dict(texts) if isinstance(texts, Mapping) else {}
        merged[link_id] = text
        self.set_local(QUESTIONNAIRE_ITEM_TEXTS, merged)

    def set_local(self, name: str, value: object) -> None:
        """Set a variable on this execution only (Camunda ``setVariableLocal``); values must
        be JSON-compatible, as for :meth:`set`."""
        self.local_updates[name] = _json_value(name, value)

    def add_task_output(self, task_id: str, output: Mapping[str, Any]) -> None:
        """Add an output (a FHIR ``Task.output``, JSON) to a Task this instance took in.

        It is written with the PUT that completes or fails the Task, on every DSF version (DSF
        1.x forbids updating a running Task; the Java v1 plugins do the same). An output added
        before the handler fails technically is still written with the failing PUT, as a Java
        delegate's error handling writes its Task. The same output twice is kept once.
        """
        name = task_output_variable(task_id, output)
        if self.has(name):
            return  # the same output again (a repeated handler): keep its first position
        prefix = name.rsplit(":", 1)[0] + ":"
        position = sum(
            1 for known in (*self.variables, *self.updates) if str(known).startswith(prefix)
        )
        self.updates[name] = task_output_value(position, output)

    @property
    def task_output_updates(self) -> dict[str, object]:
        """The variables :meth:`add_task_output` set in this call."""
        return {k: v for k, v in self.updates.items() if k.startswith(TASK_OUTPUT_PREFIX)}


@dataclass
class SendContext(HandlerContext):
    """The context of a message send handler: the Task about to be sent."""

    instantiates_canonical: str = ""
    message_name: str = ""
    profile: str = ""
    correlation_key: str | None = None
    target: Mapping[str, object] | None = None
    inputs: list[dict[str, object]] = field(default_factory=list)
    failure_errors: dict[str, str] = field(default_factory=dict)

    def add_input(self, system: str, code: str, value: object) -> None:
        """Add a Task input (besides message-name, business-key and correlation-key)."""
        self.inputs.append({"system": system, "code": code, "value": value})

    def use_alternative_business_key(self) -> str:
        """Send this Task with DSF's alternative business key instead of the instance's own:
        a UUID kept in the process variable ``alternativeBusinessKey`` (made on first use),
        as API v2's ``BusinessKeyStrategies.ALTERNATIVE`` and API v1's
        ``setAlternativeBusinessKey`` do. Replies carrying it reach this instance; the
        receiving site never learns the instance's own key. Returns the key."""
        existing = self.get(ALTERNATIVE_BUSINESS_KEY)
        key = existing if isinstance(existing, str) and existing else str(uuid.uuid4())
        if key != existing:
            self.set(ALTERNATIVE_BUSINESS_KEY, key)
        self.business_key = key
        return key

    def throw_on_failure(self, code: str, *, forbidden: str | None = None) -> None:
        """When the Task cannot be delivered, throw BPMN error ``code`` at this element (or
        ``forbidden`` when the remote server answered 403) instead of failing the instance.

        The Java BPE lets a send activity absorb delivery errors the same way (DSF's ping
        records "not-reachable" or "not-allowed" and goes on); an error boundary event on the
        send task catches it, ``camunda:errorMessageVariable`` gets what went wrong.
        """
        self.failure_errors = {"default": code}
        if forbidden is not None:
            self.failure_errors["403"] = forbidden


class HandlerKind:
    """The roles a handler can play; a class name is registered for one role."""

    SERVICE = "service"
    MESSAGE_SEND = "message_send"
    LISTENER = "listener"
    TASK_LISTENER = "task_listener"


Handler = Callable[[Any], Awaitable[None] | None]
_F = TypeVar("_F", bound=Handler)


@dataclass(frozen=True, slots=True)
class RegisteredHandler:
    class_name: str
    kind: str
    function: Handler


class HandlerRegistry:
    """Maps ``camunda:class`` names to Python handlers; one registry per plugin."""

    def __init__(self) -> None:
        self._handlers: dict[str, RegisteredHandler] = {}
        self._replies: set[str] = set()

    def register(self, class_name: str, kind: str, function: Handler) -> None:
        if not class_name.strip():
            raise ProcessModelError("handler class name must not be blank")
        existing = self._handlers.get(class_name)
        if existing is not None and existing.function is not function:
            raise ProcessModelError(f"handler {class_name!r} is registered twice")
        self._handlers[class_name] = RegisteredHandler(class_name, kind, function)

    def _decorator(self, class_name: str, kind: str) -> Callable[[_F], _F]:
        def _register(function: _F) -> _F:
            self.register(class_name, kind, function)
            return function

        return _register

    def service(self, class_name: str) -> Callable[[_F], _F]:
        """Register a service task handler (``bpmn:serviceTask camunda:class=...``)."""
        return self._decorator(class_name, HandlerKind.SERVICE)

    def message_send(self, class_name: str) -> Callable[[_F], _F]:
        """Register a message send handler (send task, message throw or message end event)."""
        return self._decorator(class_name, HandlerKind.MESSAGE_SEND)

    def listener(self, class_name: str) -> Callable[[_F], _F]:
        """Register an execution listener (``camunda:executionListener class=...``)."""
        return self._decorator(class_name, HandlerKind.LISTENER)

    def task_listener(self, class_name: str) -> Callable[[_F], _F]:
        """Register a user task listener (``camunda:taskListener class=...``)."""
        return self._decorator(class_name, HandlerKind.TASK_LISTENER)

    def replies_only_from_recipients(self, *message_names: str) -> None:
        """Accept these messages, when they continue a running instance, only from an
        organization the instance sent a Task to (for a message with a correlation-key: the
        Task sent with that key). Anyone else's Task fails "Unable to correlate Task ...".

        DSF correlates a message by business key (and correlation key) whoever sent it; a
        plugin that does not declare this keeps that behaviour.
        """
        for name in message_names:
            if not name.strip():
                raise ProcessModelError("message name must not be blank")
        self._replies.update(message_names)

    @property
    def reply_only_from_recipients(self) -> frozenset[str]:
        """The message names declared with :meth:`replies_only_from_recipients`."""
        return frozenset(self._replies)

    def get(self, class_name: str) -> RegisteredHandler | None:
        return self._handlers.get(class_name)

    def __contains__(self, class_name: object) -> bool:
        return class_name in self._handlers

    def __len__(self) -> int:
        return len(self._handlers)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def missing(self, definitions: Iterable[ProcessDefinition]) -> list[str]:
        """Class names the definitions use that have no handler (sorted, unique)."""
        needed: set[str] = set()
        for definition in definitions:
            needed.update(used_handlers(definition))
        return sorted(name for name in needed if name not in self._handlers)


def used_handlers(definition: ProcessDefinition) -> dict[str, str]:
    """Every ``camunda:class`` a definition names, with the role it plays there."""
    used: dict[str, str] = {}
    for node in definition.nodes.values():
        if node.handler is not None:
            kind = HandlerKind.SERVICE if node.kind is NodeKind.SERVICE_TASK else "message_send"
            used[node.handler] = kind
        for listener in node.listeners:
            used[listener.handler] = HandlerKind.LISTENER
        for listener in node.task_listeners:
            used[listener.handler] = HandlerKind.TASK_LISTENER
    return used
