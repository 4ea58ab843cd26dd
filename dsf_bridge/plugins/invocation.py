"""Calling a registered handler for an engine effect, and turning the outcome into an event.

The production runtime and the in-memory harness both call handlers the same way: build the
context the handler sees from a :class:`~dsf_bridge.engine.events.CallHandler` or
:class:`~dsf_bridge.engine.events.SendTask` effect, run the function (sync or ``async``), and
report :class:`HandlerCompleted` with the variables it set, or :class:`HandlerFailed` with a BPMN
error code (catchable by error boundary events) or a technical failure message.

A handler that raises is logged at error with its traceback (the site's own log); the failure
message, which becomes the failed Task's ``error`` output and so travels to other sites, says
what and where: the exception's type, the handler, the element and the file and line of the
handler code that raised. The exception's message goes into it only for the bridge's own errors
(:class:`~dsf_bridge.errors.BridgeError`, written not to carry identifiers): a library's or a
plugin's message may quote the data it choked on.
"""

from __future__ import annotations

import functools
import inspect
import os
import traceback
import types
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import structlog

from dsf_bridge.engine.events import CallHandler, HandlerCompleted, HandlerFailed, SendTask
from dsf_bridge.errors import BridgeError
from dsf_bridge.plugins.registry import (
    BpmnError,
    Handler,
    HandlerContext,
    HandlerRegistry,
    SendContext,
)

__all__ = ["Invocation", "context_for", "failure_message", "invoke", "raised_at"]

log = structlog.get_logger("dsf_bridge.plugins")


@dataclass(frozen=True, slots=True)
class Invocation:
    """The event to feed back to the engine; ``send`` is the filled-in context of a send."""

    event: HandlerCompleted | HandlerFailed
    send: SendContext | None = None

    @property
    def ok(self) -> bool:
        return isinstance(self.event, HandlerCompleted)


def context_for(
    effect: CallHandler | SendTask, services: Mapping[str, object] | None = None
) -> HandlerContext:
    """The context a handler sees for ``effect``, with the runtime's ``services``."""
    if isinstance(effect, SendTask):
        return SendContext(
            effect.handler,
            effect.element_id,
            effect.business_key,
            effect.variables,
            effect.fields,
            None,
            instantiates_canonical=effect.instantiates_canonical,
            message_name=effect.message_name,
            profile=effect.profile,
            correlation_key=effect.correlation_key,
            target=effect.target,
            services=services or {},
        )
    return HandlerContext(
        effect.handler,
        effect.element_id,
        effect.business_key,
        effect.variables,
        effect.fields,
        effect.event,
        services=services or {},
    )


async def invoke(
    registry: HandlerRegistry,
    effect: CallHandler | SendTask,
    now: datetime,
    services: Mapping[str, object] | None = None,
) -> Invocation:
    """Run the handler ``effect`` names; never raises for a handler's own failure."""
    context = context_for(effect, services)
    registered = registry.get(effect.handler)
    if registered is None:
        message = f"no handler registered for {effect.handler!r}"
        return Invocation(HandlerFailed(effect.token, now, None, message))
    try:
        outcome = registered.function(context)
        if inspect.isawaitable(outcome):
            await outcome
    except BpmnError as exc:
        failed = HandlerFailed(effect.token, now, exc.code, exc.message, variables=context.updates)
        return Invocation(failed)
    except Exception as exc:  # a handler's bug must fail its step, not the runtime
        # Its other variables are rolled back; Task outputs it added go with the failing PUT.
        where = raised_at(exc, registered.function)
        log.error(
            "handler.failed",
            handler=effect.handler,
            error_type=_type_name(exc),
            error=str(exc),
            location=where,
            exc_info=exc,
        )
        failed = HandlerFailed(
            effect.token,
            now,
            None,
            failure_message(exc, effect.handler, effect.element_id, where),
            variables=context.task_output_updates,
        )
        return Invocation(failed)
    completed = HandlerCompleted(effect.token, now, context.updates, context.local_updates)
    return Invocation(completed, context if isinstance(context, SendContext) else None)


def failure_message(exc: BaseException, handler: str, element_id: str, where: str | None) -> str:
    """What a failed Task's ``error`` output says of a handler that raised ``exc`` (DSF puts
    ``exception.getMessage()`` there; we say where, and keep other code's messages local)."""
    reason = (exc.message or type(exc).__name__) if isinstance(exc, BridgeError) else None
    what = _type_name(exc) if reason is None else f"{reason} ({_type_name(exc)})"
    return f"{what} in handler {handler} at element {element_id}" + (f", {where}" if where else "")


def raised_at(exc: BaseException, function: Handler) -> str | None:
    """``path:line`` of the innermost frame of the traceback in the handler's own module (not
    the engine's or a library's frames), else of the innermost frame; the path from the
    module's top package (``my_plugin/handlers.py``), or the file's name."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    target: object = inspect.unwrap(function)
    if isinstance(target, functools.partial):
        target = target.func
    # A function or a method has its code; an object called as a handler, its __call__'s.
    code = getattr(target, "__code__", None) or getattr(type(target).__call__, "__code__", None)
    own = code.co_filename if isinstance(code, types.CodeType) else None
    frame = next((f for f in reversed(frames) if f.filename == own), frames[-1])
    module = getattr(target, "__module__", None) if frame.filename == own else None
    return f"{_short_path(frame.filename, module)}:{frame.lineno}"


def _short_path(filename: str, module: str | None) -> str:
    path = filename.replace(os.sep, "/")
    if module:
        tail = module.replace(".", "/") + (
            "/__init__.py" if path.endswith("__init__.py") else ".py"
        )
        if path.endswith("/" + tail) or path == tail:
            return tail
    return path.rsplit("/", 1)[-1]


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
